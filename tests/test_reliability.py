"""Reliability, tried as an attacker and as an operator would: malformed input, traversal, upload abuse, auth
on every route, origins, Triton killed mid-stream, disconnect and cancel storms, and a graceful drain."""
from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from client.triton_tts import synthesize
from conftest import ROOT, render_cpu_repository
from gateway_helpers import FAST, collect, open_session, receive_json, send
from test_gateway import LONG, start_session, wav_bytes
from tools.triton_local import LocalTriton, free_port
from triton_helpers import scrape_metrics, wait_until
from tts_contract.errors import ErrorCode

PROTOCOL_CODES = {code.value for code in ErrorCode}
TOKEN = "s3cret-token"


# -- malformed messages -------------------------------------------------------------------------------------

# Not one of these is a valid value for any field (a lone surrogate is the only string).
WRONG_VALUES = [1, -7, 2.5, True, None, [], [1, "x"], {}, {"a": 1}, 10**30, "\ud800"]
FIELDS = {"start": ["sampleRate", "encoding", "voice", "language", "authToken", "contractId", "audioTransport"],
          "speak": ["text", "voice", "language", "priority", "requestId"], "stop": ["reason"]}
VALID = {"start": {"type": "start"}, "speak": {"type": "speak", "text": "fine"}, "stop": {"type": "stop"}}


def malformed_messages(count: int = 1100, seed: int = 7) -> dict[str, list[str]]:
    """At least ``count`` malformed frames by kind: broken JSON, nesting, huge numbers, non-objects, bad types
    for every field, unknown types, lone surrogates, oversize frames. None of them is a valid message."""
    rng = random.Random(seed)
    kinds: dict[str, list[str]] = {"broken JSON": [], "wrong field types": [], "not an object": [],
                                   "bad type field": [], "deep nesting": [], "huge numbers": [],
                                   "lone surrogates": [], "oversize": []}
    valid_json = json.dumps({"type": "speak", "text": "Hello there."})
    for _ in range(600):
        cut = rng.randrange(1, len(valid_json) - 1)
        kinds["broken JSON"].append(valid_json[:cut] + rng.choice(["", "}", "]]", "\\", "'", "\x00", ",,"]))
    kinds["broken JSON"] += ["", " ", "nope", "{'type': 'speak'}", "{type: speak}", "[", "{", "NaN", "}{"]
    for kind, fields in FIELDS.items():
        for field in fields:
            for value in WRONG_VALUES:
                if value is None and (kind, field) != ("speak", "text"):
                    continue  # null means "absent" for optional fields: valid
                kinds["wrong field types"].append(json.dumps({**VALID[kind], field: value}))
    for _ in range(400):  # valid-looking messages with one field of a random wrong type
        kind = rng.choice(["start", "speak"])
        field = rng.choice(FIELDS[kind])
        value = rng.choice([v for v in WRONG_VALUES if v is not None and not isinstance(v, str)])
        kinds["wrong field types"].append(json.dumps({**VALID[kind], field: value}))
    kinds["not an object"] = [json.dumps(v) for v in (1, "speak", [1, 2], None, True, 2.5, [], [{"type": "speak"}])]
    kinds["bad type field"] = [json.dumps({"type": t}) for t in
                               (None, 1, "", "SPEAK", "speak ", "hello", "x" * 500, [], {}, True, "cancel!")]
    kinds["bad type field"].append(json.dumps({"text": "no type at all"}))
    kinds["deep nesting"] = ["[" * n + "]" * n for n in (1000, 5000, 20000)] + \
        ['{"type": "speak", "text": "x", "extra": ' + "[" * 3000 + "]" * 3000 + "}"]
    kinds["huge numbers"] = ['{"type": "start", "sampleRate": ' + "9" * n + "}" for n in (4301, 10000)] + \
        ['{"type": "start", "sampleRate": 1e400}', '{"type": "start", "sampleRate": -0}']
    for kind, fields in FIELDS.items():
        for field in fields:
            kinds["lone surrogates"].append(json.dumps({**VALID[kind], field: "Hello \ud800 there."}))
    kinds["lone surrogates"].append('{"type": "speak", "text": "ok", "\\udc00": 1}')
    kinds["oversize"] = [json.dumps({"type": "speak", "text": "x" * n}) for n in (70_000, 200_000)]
    assert sum(len(v) for v in kinds.values()) >= count, {k: len(v) for k, v in kinds.items()}
    return kinds


async def test_a_thousand_malformed_messages_get_errors_and_the_session_stays_usable(make_gateway):
    """Each malformed frame gets one `error` with a protocol code; after each kind the session still works."""
    gateway = make_gateway()
    gateway.wait_ready()
    kinds = malformed_messages()
    async with open_session(gateway.ws) as ws:
        await receive_json(ws)
        for kind, frames in kinds.items():
            for frame in frames:
                await ws.send(frame)
                reply = await receive_json(ws)
                assert reply["type"] == "error" and reply["code"] in PROTOCOL_CODES, (kind, frame[:80], reply)
            await send(ws, type="start", sampleRate=16000)
            assert (await receive_json(ws))["type"] == "started", kind
        await send(ws, type="speak", text="Still here after all that.")
        assert (await collect(ws)).end["cancelled"] is False
    assert sum(len(v) for v in kinds.values()) >= 1000


async def test_a_lone_surrogate_in_text_is_invalid_not_an_internal_error(make_gateway):
    """Text that is not valid Unicode is refused as INVALID_MESSAGE (not SYNTHESIS_ERROR), counted as nothing."""
    gateway = make_gateway()
    async with open_session(gateway.ws) as ws:
        await start_session(ws)
        await ws.send('{"type": "speak", "text": "Hello \\ud800 there.", "requestId": "r"}')
        reply = await receive_json(ws)
        assert reply["code"] == "INVALID_MESSAGE" and reply["requestId"] == "r" and "Unicode" in reply["message"]


async def test_invalid_utf8_closes_1007_and_oversize_frames_close_1009(make_gateway):
    """Standard WebSocket behaviour: a text frame that is not UTF-8 closes 1007, one over the frame limit 1009."""
    gateway = make_gateway()
    async with open_session(gateway.ws) as ws:
        await receive_json(ws)
        await ws.send(b"\xff\xfe not utf-8", text=True)
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 10)
        assert closed.value.rcvd.code == 1007
    async with open_session(gateway.ws) as ws:
        await receive_json(ws)
        await ws.send(json.dumps({"type": "speak", "text": "x" * 2_000_000}))
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 10)
        assert closed.value.rcvd.code == 1009


async def test_a_frame_just_over_the_limit_closes_1009_for_a_client_still_sending(make_gateway):
    """A text frame one byte over the 1 MiB frame limit, written whole by a client that reads only afterwards,
    still gets its 1009 close frame: the server reads and drops the rest instead of resetting the connection."""
    gateway = make_gateway()
    host, port = gateway.http.removeprefix("http://").split(":")
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 10)
    try:
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(f"GET /api/v1/speak HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                     f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
        assert b" 101 " in await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        size = (1 << 20) + 1
        mask = os.urandom(4)
        writer.write(bytes([0x81, 0x80 | 127]) + struct.pack(">Q", size) + mask + os.urandom(size))
        with contextlib.suppress(ConnectionError):
            await asyncio.wait_for(writer.drain(), 10)
        await asyncio.sleep(0.5)  # a client busy elsewhere reads late
        received = bytearray()
        with contextlib.suppress(ConnectionError):
            while chunk := await asyncio.wait_for(reader.read(65536), 10):
                received += chunk
    finally:
        writer.close()
    close_at = received.find(b"\x88")  # FIN + close opcode, after the ready message's frame
    assert close_at >= 0, f"no close frame, only {bytes(received[:60])!r}"
    assert struct.unpack(">H", received[close_at + 2:close_at + 4])[0] == 1009


# -- traversal and uploads ----------------------------------------------------------------------------------

TRAVERSALS = ["..", "../etc", "..%2F..%2Fetc", "%2e%2e", "a/../../b", "/etc/passwd", "..\\..\\x", "default/..",
              ".hidden", "x" * 65, "UPPER", "sp ace", "nul\x00byte", "ｄｅｆａｕｌｔ", "default%00", "~root",
              "%252e%252e", "voices/../..", "....//....//", "."]


async def test_voice_ids_never_escape_the_voices_directory(make_gateway, voices_dir):
    """Traversal-shaped ids on every route that takes one are refused, and nothing outside voices/ changes."""
    gateway = make_gateway()
    outside = voices_dir.parent / "outside.txt"
    outside.write_text("untouched")
    before = sorted(p.name for p in voices_dir.parent.iterdir())
    async with httpx.AsyncClient(base_url=gateway.http, timeout=30) as http:
        for voice_id in TRAVERSALS:
            deleted = await http.delete("/api/v1/voices/" + quote(voice_id, safe=""))
            assert deleted.status_code in (400, 404, 405), (voice_id, deleted.status_code)
            upload = await http.post("/api/v1/voices", files={"audio": ("a.wav", wav_bytes(3.2), "audio/wav")},
                                     data={"id": voice_id})
            assert upload.status_code == 400, (voice_id, upload.status_code, upload.text)
    async with open_session(gateway.ws) as ws:
        await receive_json(ws)
        for voice_id in TRAVERSALS:
            await send(ws, type="start", voice=voice_id)
            messages = [await receive_json(ws), await receive_json(ws)]
            assert messages[0]["code"] == "VOICE_NOT_FOUND" and messages[1]["voice"] == "default", voice_id
    assert outside.read_text() == "untouched" and sorted(p.name for p in voices_dir.parent.iterdir()) == before


async def test_an_upload_over_the_limit_is_refused_before_it_is_read(make_gateway):
    """A 100 MB Content-Length gets 413 at once (the body is never sent); a body without a length is cut."""
    gateway = make_gateway(GATEWAY_MAX_UPLOAD_BYTES="200000")
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
        sock.sendall(b"POST /api/v1/voices HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; "
                     b"boundary=x\r\nContent-Length: 104857600\r\n\r\n--x\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 413")

    async def endless():
        yield b"--x\r\nContent-Disposition: form-data; name=\"audio\"; filename=\"a.wav\"\r\n\r\n"
        for _ in range(100):
            yield b"\0" * 65536

    async with httpx.AsyncClient(base_url=gateway.http, timeout=30) as http:
        response = await http.post("/api/v1/voices", content=endless(),
                                   headers={"content-type": "multipart/form-data; boundary=x"})
        assert response.status_code == 413


@pytest.mark.parametrize("field, length", [("transcript", 1001), ("name", 101), ("description", 501),
                                           ("transcript", 10_000_000)])
async def test_oversized_upload_fields_are_refused(make_gateway, field, length):
    """Transcript, name and description have limits (1000, 100, 500 characters); beyond them: 400."""
    gateway = make_gateway()
    async with httpx.AsyncClient(base_url=gateway.http, timeout=60) as http:
        response = await http.post("/api/v1/voices", files={"audio": ("a.wav", wav_bytes(3.2), "audio/wav")},
                                   data={field: "x" * length})
        assert response.status_code in (400, 413), response.text


# -- auth and origins ---------------------------------------------------------------------------------------

async def test_every_route_but_health_needs_the_token(make_gateway):
    """With GATEWAY_AUTH_TOKENS set, voices routes answer 401 without a valid bearer token; health,
    readiness and metrics stay open."""
    gateway = make_gateway(GATEWAY_AUTH_TOKENS=TOKEN)
    gateway.wait_ready()
    good, bad = {"Authorization": f"Bearer {TOKEN}"}, {"Authorization": "Bearer wrong"}
    upload = {"files": {"audio": ("a.wav", wav_bytes(3.2), "audio/wav")}, "data": {"id": "authz"}}
    async with httpx.AsyncClient(base_url=gateway.http, timeout=60) as http:
        for headers in ({}, bad):
            assert (await http.get("/api/v1/voices", headers=headers)).status_code == 401
            assert (await http.post("/api/v1/voices", headers=headers, **upload)).status_code == 401
            assert (await http.delete("/api/v1/voices/default", headers=headers)).status_code == 401
        for path in ("/healthz", "/readyz", "/metrics"):
            assert (await http.get(path)).status_code == 200, path
        assert (await http.get("/api/v1/voices", headers=good)).status_code == 200
        assert (await http.post("/api/v1/voices", headers=good, **upload)).status_code == 201
        assert (await http.delete("/api/v1/voices/authz", headers=good)).status_code == 204


async def test_unauthenticated_sockets_get_unauthorized_then_1008_and_take_no_slot(make_gateway):
    """No token within the auth timeout: UNAUTHORIZED, close 1008. Waiting unauthenticated sockets do not
    take session slots, so a real client still gets in."""
    gateway = make_gateway(GATEWAY_AUTH_TOKENS=TOKEN, GATEWAY_MAX_SESSIONS="1", GATEWAY_IDLE_TIMEOUT_S="2")
    async with open_session(gateway.ws) as idle_one, open_session(gateway.ws) as idle_two:
        async with open_session(gateway.ws, additional_headers={"Authorization": f"Bearer {TOKEN}"}) as real:
            assert (await receive_json(real))["type"] == "ready"
        for idle in (idle_one, idle_two):
            error = await receive_json(idle, timeout=10)
            assert error["code"] == "UNAUTHORIZED" and error["recoverable"] is False
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(idle.recv(), 10)
            assert closed.value.rcvd.code == 1008


async def test_cross_origin_requests_are_refused_unless_allowed(make_gateway):
    """Browsers' cross-origin requests and upgrades are refused (403) unless the origin is allowed; allowed
    origins get CORS headers; the gateway's own origin always works, also behind a TLS proxy or one that
    rewrites Host."""
    gateway = make_gateway(GATEWAY_ALLOWED_ORIGINS="http://app.example")
    evil, allowed, own = "http://evil.example", "http://app.example", f"http://127.0.0.1:{gateway.port}"
    async with httpx.AsyncClient(base_url=gateway.http, timeout=60) as http:
        refused = await http.post("/api/v1/voices", headers={"Origin": evil},
                                  files={"audio": ("a.wav", wav_bytes(3.2), "audio/wav")}, data={"id": "csrf"})
        assert refused.status_code == 403
        assert (await http.get("/api/v1/voices", headers={"Origin": evil})).status_code == 403
        ok = await http.get("/api/v1/voices", headers={"Origin": allowed})
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == allowed
        preflight = await http.options("/api/v1/voices", headers={"Origin": allowed,
                                                                   "Access-Control-Request-Method": "POST"})
        assert preflight.status_code == 204 and "POST" in preflight.headers["access-control-allow-methods"]
        assert (await http.get("/api/v1/voices", headers={"Origin": own})).status_code == 200
        behind_tls_proxy = {"Origin": "https://tts.example", "Host": "tts.example"}
        assert (await http.get("/api/v1/voices", headers=behind_tls_proxy)).status_code == 200
        host_rewritten = {"Origin": "https://tts.example", "X-Forwarded-Host": "tts.example"}
        assert (await http.get("/api/v1/voices", headers=host_rewritten)).status_code == 200
        assert (await http.get("/api/v1/voices", headers={"Origin": "https://evil.example",
                                                          "X-Forwarded-Host": "tts.example"})).status_code == 403
    with pytest.raises(InvalidStatus) as rejected:
        async with open_session(gateway.ws, origin=evil):
            pass
    assert rejected.value.response.status_code == 403
    async with open_session(gateway.ws, origin=allowed) as ws:
        assert (await receive_json(ws))["type"] == "ready"


# -- faults --------------------------------------------------------------------------------------------------

async def test_triton_killed_mid_stream_with_four_sessions(tiny_model_dir, voices_dir, tmp_path, make_gateway):
    """Killing tritonserver (only the server: its model processes must follow) while four sessions speak:
    each gets a recoverable error and its end message; no model process is left; once Triton is back the
    same sessions speak again without restarting the gateway."""
    repository = render_cpu_repository(tiny_model_dir, voices_dir, tmp_path / "repo")
    server = LocalTriton(repository, log_path=tmp_path / "triton.log").start().wait_ready(180)
    restarted = None
    try:
        gateway = make_gateway(triton_url=server.grpc_url, GATEWAY_READY_POLL_S="0.5")
        gateway.wait_ready()
        sessions = [await open_session(gateway.ws).__aenter__() for _ in range(4)]
        for index, ws in enumerate(sessions):
            await start_session(ws, maxWaitMs=20000)  # about faults, not admission: a busy start queues
            await send(ws, type="speak", text=(LONG.rstrip(".") + ", ") * 3 + "and on.", requestId=f"s{index}")
        for ws in sessions:
            assert isinstance(await asyncio.wait_for(ws.recv(), 30), bytes)
        killed_at = time.monotonic()
        server.kill(server_only=True)
        for ws in sessions:
            result = await collect(ws, timeout=10)
            errors = result.of_type("error")
            assert errors and errors[0]["recoverable"] is True and result.end["cancelled"] is True
        print(f"recoverable errors reached all 4 sessions {time.monotonic() - killed_at:.2f} s after the kill")
        assert await wait_until(lambda: not server.model_processes(), timeout=15), \
            f"orphaned model processes: {server.model_processes()}"
        restarted = LocalTriton(repository, server.http_port, server.grpc_port, server.metrics_port,
                                log_path=tmp_path / "triton-2.log").start().wait_ready(180)
        assert await wait_until(lambda: httpx.get(gateway.http + "/readyz", timeout=5).status_code == 200, timeout=10)
        for ws in sessions:
            await send(ws, type="speak", text="Back again.")
            result = await collect(ws, timeout=60)
            assert result.end["cancelled"] is False and result.audio and not result.of_type("error")
        for ws in sessions:
            await ws.close()
    finally:
        for process in (server, restarted):
            if process is not None:
                process.stop()


async def _stream_until_first_audio(server: LocalTriton, **parameters) -> asyncio.Task:
    """A long ``tts`` stream straight to Triton, returned once its first audio has arrived."""
    first_audio = asyncio.Event()
    task = asyncio.create_task(synthesize(server.grpc_url, LONG, parameters={"min_new_tokens": 1500, **parameters},
                                          on_chunk=lambda audio: first_audio.set()))
    await asyncio.wait_for(first_audio.wait(), 60)
    return task


def _stop_group(server: LocalTriton, grace_s: float = 30) -> tuple[int, float]:
    """Stop tritonserver as operators and orchestrators do: SIGTERM to its process group, then SIGKILL to the
    server after ``grace_s``. Its exit code and the seconds it took."""
    started = time.monotonic()
    os.killpg(server.process.pid, signal.SIGTERM)
    try:
        code = server.process.wait(grace_s)
    except subprocess.TimeoutExpired:
        os.kill(server.process.pid, signal.SIGKILL)
        code = server.process.wait(5)
    return code, time.monotonic() - started


async def test_cancelled_streams_leave_nothing_in_flight(tiny_model_dir, voices_dir, tmp_path):
    """Streams their clients cancel mid-way leave no request in flight: tritonserver then stops gracefully,
    at once, instead of waiting out its exit timeout for requests that never end."""
    repository = render_cpu_repository(tiny_model_dir, voices_dir, tmp_path / "repo")
    server = LocalTriton(repository, log_path=tmp_path / "triton.log").start().wait_ready(180)
    try:
        for _ in range(3):
            task = await _stream_until_first_audio(server)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        assert await wait_until(lambda: scrape_metrics(server.metrics_url)["qwen_tts_talker_active_streams"] == 0,
                                timeout=10)
        code, seconds = _stop_group(server)
        log = (tmp_path / "triton.log").read_text()
        left_in_flight = re.findall(r"Model '\w+' \(version \d+\) has \d+ in-flight inferences", log)
        assert not left_in_flight and code == 0, f"exit code {code} after {seconds:.1f} s; {left_in_flight[:1]}"
    finally:
        server.stop()


async def test_model_processes_follow_a_server_stopped_mid_stream(tiny_model_dir, voices_dir, tmp_path):
    """Stopping tritonserver while a long stream runs (it waits out its exit timeout, then exits at once;
    2.51 may crash doing so, or hang in its crash handler until killed): its model processes do not outlive
    it."""
    repository = render_cpu_repository(tiny_model_dir, voices_dir, tmp_path / "repo")
    server = LocalTriton(repository, log_path=tmp_path / "triton.log").start().wait_ready(180)
    try:
        task = await _stream_until_first_audio(server)
        _stop_group(server, grace_s=15)
        task.cancel()
        assert await wait_until(lambda: not server.model_processes(), timeout=10), \
            f"model processes left behind: {server.model_processes()}"
    finally:
        server.stop()


async def test_disconnect_and_cancel_storms_leak_nothing(make_gateway, triton):
    """Many sessions that speak and vanish, and many speak+cancel pairs: afterwards no stream, decoder state
    or session is left, and the next utterance plays in full."""
    gateway = make_gateway(GATEWAY_MAX_SESSIONS="128")
    gateway.wait_ready()

    async def speak_and_vanish(index: int):
        ws = await open_session(gateway.ws).__aenter__()
        await receive_json(ws)
        await send(ws, type="speak", text=f"Gone in a moment, number {index}.")
        if index % 2:
            await asyncio.wait_for(ws.recv(), 30)  # some vanish after their first audio
        ws.transport.abort()  # no close frame: the socket just dies

    async def speak_and_cancel(ws, index: int):
        await send(ws, type="speak", text=f"Cancelled at once, number {index}.")
        await send(ws, type="cancel")
        assert (await collect(ws, timeout=60)).end["cancelled"] is True

    await asyncio.gather(*(speak_and_vanish(i) for i in range(40)))
    async with open_session(gateway.ws) as ws:
        await receive_json(ws)
        for index in range(40):
            await speak_and_cancel(ws, index)

    def left_over() -> dict:
        triton_now = scrape_metrics(triton.metrics_url)
        gateway_now = scrape_metrics(gateway.http + "/metrics")
        counts = {name: triton_now[name] for name in (
            "qwen_tts_talker_active_streams", "qwen_tts_talker_queued_streams", "qwen_tts_decoder_active_streams")}
        counts["tts_gateway_active_sessions"] = gateway_now["tts_gateway_active_sessions"]
        return {name: value for name, value in counts.items() if value}

    # the property is that nothing is left, not how fast: a loaded 2-core CI machine needs more than 30 s
    assert await wait_until(lambda: not left_over(), timeout=90), f"left over after the storms: {left_over()}"
    async with open_session(gateway.ws) as ws:
        await start_session(ws)
        await send(ws, type="speak", text="The next one plays in full.")
        result = await collect(ws, timeout=60)
        assert result.end["cancelled"] is False and len(result.audio) // 2 == round(result.end["audioLengthMs"] * 24)


async def test_sigterm_drains_every_session(make_gateway):
    """SIGTERM: the utterance playing ends with its end message, the queued one too (cancelled), then 1001."""
    gateway = make_gateway(GATEWAY_DRAIN_S="0.5")
    gateway.wait_ready()
    async with open_session(gateway.ws) as ws:
        await start_session(ws)
        await send(ws, type="speak", text=(LONG.rstrip(".") + ", ") * 3 + "and on.", requestId="playing")
        await send(ws, type="speak", text="Never started.", requestId="queued")
        assert isinstance(await asyncio.wait_for(ws.recv(), 30), bytes)
        gateway.process.send_signal(signal.SIGTERM)
        ends = [await collect(ws, timeout=20) for _ in range(2)]
        assert [r.end["requestId"] for r in ends] == ["playing", "queued"]
        assert ends[1].end["cancelled"] is True and not ends[1].audio
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 20)
        assert closed.value.rcvd.code == 1001
    assert gateway.process.wait(20) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it is done


def _processes(needle: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if needle in cmdline:
                pids.append(int(entry.name))
    return pids


async def test_make_run_restarts_a_dead_tritonserver_while_the_gateway_stays_up(tiny_model_dir, tmp_path):
    """`make run` (tools.run_stack): kill tritonserver and the same session gets MODEL_LOADING while it is
    down, then speaks again once the supervisor has restarted it; SIGTERM stops everything."""
    ports = {name: str(free_port()) for name in ("TRITON_HTTP_PORT", "TRITON_GRPC_PORT", "TRITON_METRICS_PORT",
                                                  "GATEWAY_PORT")}
    env = {**os.environ, **ports, "QWEN_TTS_MODEL_DIR": str(tiny_model_dir), "GATEWAY_READY_POLL_S": "0.5",
           "GATEWAY_SYNTHESIS_PARAMETERS": FAST["GATEWAY_SYNTHESIS_PARAMETERS"], "GATEWAY_FRAMES_BASE": "4",
           "GATEWAY_FRAMES_PER_CHAR": "1", "QWEN_TTS_LOG_DIR": str(tmp_path / "logs")}  # not make run's logs
    stack = subprocess.Popen([sys.executable, "-m", "tools.run_stack"], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    http = f"http://127.0.0.1:{ports['GATEWAY_PORT']}"
    try:
        assert await wait_until(lambda: _ready(http), timeout=240), "make run never became ready"
        async with open_session(f"ws://127.0.0.1:{ports['GATEWAY_PORT']}/api/v1/speak") as ws:
            await start_session(ws)
            await send(ws, type="speak", text="Before the crash.")
            assert (await collect(ws, timeout=60)).end["cancelled"] is False
            server = _processes(f"--grpc-port={ports['TRITON_GRPC_PORT']}")
            assert len(server) == 1
            os.kill(server[0], signal.SIGKILL)
            assert await wait_until(lambda: not _ready(http), timeout=10)
            await send(ws, type="speak", text="During the outage.", requestId="down")
            reply = await collect(ws, timeout=30, until=("complete", "error"))
            assert reply.messages[-1]["code"] in ("MODEL_LOADING", "SYNTHESIS_ERROR")
            assert reply.messages[-1]["recoverable"] is True
            assert await wait_until(lambda: _ready(http), timeout=240), "tritonserver was not restarted"
            await send(ws, type="speak", text="After the restart.", requestId="up")
            result = await collect(ws, timeout=60, until=("complete",))
            assert result.end["requestId"] == "up" and result.end["cancelled"] is False
    finally:
        stack.send_signal(signal.SIGTERM)
        stack.wait(60)
    assert stack.returncode == 0, stack.stderr.read().decode()[-2000:]
    assert not _processes(f"--grpc-port={ports['TRITON_GRPC_PORT']}")


def _ready(http: str) -> bool:
    try:
        return httpx.get(http + "/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
