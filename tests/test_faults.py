"""Faults, as an operator meets them: Triton killed mid-stream (sessions get recoverable errors, no model process
is left, the same sessions speak again once it is back), cancelled streams leaving nothing in flight, storms of
disconnects and cancels, a graceful drain on SIGTERM, and `make run` restarting a dead tritonserver."""
from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from client.triton_tts import synthesize
from conftest import ROOT, render_cpu_repository
from gateway_helpers import FAST, collect, hold_a_row, open_session, receive_json, send
from test_gateway import LONG, start_session
from tools.triton_local import LocalTriton, free_port
from triton_helpers import scrape_metrics, wait_until


async def test_triton_killed_mid_session_then_back(tiny_model_dir, voices_dir, tmp_path, make_gateway):
    """Killing Triton mid-utterance gives a recoverable TTS_UNAVAILABLE (the server is unreachable, not loading); the
    gateway stays up and recovers by itself."""
    repository = render_cpu_repository(tiny_model_dir, voices_dir, tmp_path / "repo")
    server = LocalTriton(repository, log_path=tmp_path / "triton.log").start().wait_ready(180)
    try:
        gateway = make_gateway(triton_url=server.grpc_url)
        gateway.wait_ready()
        async with open_session(gateway.ws) as ws:
            await hold_a_row(ws, "doomed")  # still being written when Triton dies
            server.kill()
            result = await collect(ws, timeout=30)
            error = result.of_type("error")[0]
            assert error["code"] == "TTS_UNAVAILABLE" and error["recoverable"] is True
            assert result.end["cancelled"] is True
            await send(ws, type="speak", text="Is anyone there?")
            assert (await receive_json(ws, 30))["code"] == "TTS_UNAVAILABLE"  # unreachable, not loading
            server = LocalTriton(repository, server.http_port, server.grpc_port, server.metrics_port,
                                 log_path=tmp_path / "triton2.log").start().wait_ready(180)
            gateway.wait_ready(60)
            await send(ws, type="speak", text="Back again.", requestId="back")
            result = await collect(ws, timeout=60)
            assert result.end["requestId"] == "back" and result.end["cancelled"] is False
            assert len(result.audio) > 0
    finally:
        server.stop()


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
        for index, ws in enumerate(sessions):  # (about faults, not admission: a busy start queues)
            await hold_a_row(ws, f"s{index}", maxWaitMs=20000)
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
        # Each tts request ends (the talker stopped by the decoder's cancel, its empty final chunk through the
        # decoder) long before its 1500 frames; only then is the server stopped (a request still ending when the
        # server stops is refused its next step and stays in flight).
        completed = 'nv_inference_request_success{model="tts",version="1"}'
        assert await wait_until(lambda: scrape_metrics(server.metrics_url)[completed] == 3, timeout=5)
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
        await hold_a_row(ws, "playing")  # still being written when the signal comes
        await send(ws, type="speak", text="Never started.", requestId="queued")
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
            assert reply.messages[-1]["code"] in ("TTS_UNAVAILABLE", "MODEL_LOADING")  # down, or restarted and loading
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
