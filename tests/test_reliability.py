"""Reliability, tried as an attacker would: malformed input, traversal, upload abuse, auth on every route,
origins (faults an operator meets: test_faults.py)."""
from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import random
import socket
import struct
from urllib.parse import quote

import httpx
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from gateway_helpers import collect, open_session, receive_json, send
from test_gateway import start_session
from test_voices import wav_bytes
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
    """Standard WebSocket behaviour: a text frame that is not UTF-8 closes 1007 (logged as one WARNING line, no
    traceback), one over the frame limit 1009."""
    gateway = make_gateway()
    async with open_session(gateway.ws) as ws:
        await receive_json(ws)
        await ws.send(b"\xff\xfe not utf-8", text=True)
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 10)
        assert closed.value.rcvd.code == 1007
    await asyncio.sleep(0.2)  # (the log line is written as the connection closes)
    log = gateway.log_path.read_text()
    assert "Traceback" not in log and log.count("a text message is not UTF-8") == 1, "one WARNING line, no traceback"
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
