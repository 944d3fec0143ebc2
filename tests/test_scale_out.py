"""The gateway spreading sessions over two real tritonservers, and surviving the loss of one."""
from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import pytest

from gateway_helpers import FAST, GatewayProcess, collect, hold_a_row, open_session, receive_json, send
from test_gateway import start_session
from triton_helpers import scrape_metrics, wait_until
from tools.triton_local import LocalTriton


def frames(server: LocalTriton) -> float:
    return scrape_metrics(server.metrics_url)["qwen_tts_talker_frames_total"]


async def test_utterances_move_to_the_healthy_endpoint_when_one_dies(two_tritons, voices_dir, tmp_path):
    """Both endpoints serve; after one is killed, only the utterance in flight on it fails, later ones work."""
    first, second = two_tritons
    gateway = GatewayProcess(first.grpc_url, voices_dir, tmp_path / "gateway.log",
                             TRITON_URLS=f"{first.grpc_url},{second.grpc_url}", **FAST).start()
    try:
        gateway.wait_ready()
        async with httpx.AsyncClient(timeout=10) as http:
            status = (await http.get(gateway.http + "/readyz")).json()["triton"]
        assert status == {first.grpc_url: True, second.grpc_url: True}
        async with open_session(gateway.ws) as ws:
            await start_session(ws)
            for index in range(4):
                await send(ws, type="speak", text=f"Spread number {index}.")
                assert (await collect(ws)).end["cancelled"] is False
            # (the talker publishes its metrics every quarter second)
            assert await wait_until(lambda: frames(first) > 0 and frames(second) > 0, timeout=5), \
                "both endpoints should have served"

        # An utterance whose text is still being written: it stays on one endpoint until the test is done with it.
        async with open_session(gateway.ws) as ws:
            await hold_a_row(ws, "in-flight")

            # The endpoint holding it, as the gateway counts its streams (Triton's metrics lag a quarter second).
            streams = httpx.get(gateway.http + "/readyz", timeout=10).json()["capacity"]
            (victim,) = [s for s in two_tritons if streams[s.grpc_url]["streams"] == 1]
            survivor = next(s for s in two_tritons if s is not victim)
            victim.kill()
            result = await collect(ws, timeout=30)
            assert result.end["requestId"] == "in-flight" and result.end["cancelled"] is True
            assert result.of_type("error")[0]["code"] == "TTS_UNAVAILABLE"

            before = frames(survivor)
            for index in range(3):
                await send(ws, type="speak", text=f"After the loss {index}.", requestId=str(index))
                result = await collect(ws, timeout=60)
                assert result.end["cancelled"] is False and not result.of_type("error"), result.messages
            assert await wait_until(lambda: frames(survivor) > before, timeout=5)
        async with open_session(gateway.ws) as ws:  # a new session after the loss
            await receive_json(ws)
            await send(ws, type="speak", text="New session, healthy endpoint.")
            assert (await collect(ws, timeout=60)).end["cancelled"] is False
        assert await wait_until(lambda: httpx.get(gateway.http + "/readyz").json()["triton"] ==
                                {victim.grpc_url: False, survivor.grpc_url: True}, timeout=10)
    finally:
        gateway.stop()


SILENT_TEXT = ("A long answer that keeps speaking while its server goes silent, sentence after sentence, so that the "
               "listener is still waiting for more when nothing comes any more. " * 3)


@pytest.mark.parametrize("mechanism, env, within_s", [
    ("keepalive", {"GATEWAY_PROGRESS_DEADLINE_MS": "0"}, 2.0),
    ("progress deadline", {"GATEWAY_GRPC_KEEPALIVE_MS": "0"}, 5.0),
])
async def test_a_silent_triton_ends_its_utterance_at_once_and_the_next_goes_elsewhere(two_tritons, voices_dir,
                                                                                        tmp_path, mechanism, env,
                                                                                        within_s):
    """A Triton that stops answering (stopped: its connections stay open, nothing comes back) ends the utterance it
    was playing with a recoverable TTS_UNAVAILABLE within about a second (keepalive: pings go unanswered), or
    within the listener's lead plus the progress deadline (with keepalive off); the next utterance is served by
    the other Triton. Without either it would wait for the 20 s synthesis timeout."""
    first, second = two_tritons
    gateway = GatewayProcess(first.grpc_url, voices_dir, tmp_path / "gateway.log",
                             TRITON_URLS=f"{first.grpc_url},{second.grpc_url}",
                             **{**FAST, "GATEWAY_FRAMES_PER_CHAR": "0.8", **env}).start()
    victim = None
    try:
        gateway.wait_ready()
        async with open_session(gateway.ws) as ws:
            await start_session(ws)
            await send(ws, type="speak", text=SILENT_TEXT, requestId="silenced")
            assert isinstance(await asyncio.wait_for(ws.recv(), 30), bytes), "audio first"
            streams = httpx.get(gateway.http + "/readyz", timeout=10).json()["capacity"]
            (victim,) = [s for s in two_tritons if streams[s.grpc_url]["streams"] == 1]
            os.killpg(victim.process.pid, signal.SIGSTOP)
            stopped = time.monotonic()
            result = await collect(ws, timeout=30)
            noticed = time.monotonic() - stopped
            error = result.of_type("error")[0]
            assert error["code"] == "TTS_UNAVAILABLE" and error["recoverable"] is True
            assert result.end["cancelled"] is True
            assert noticed < within_s, f"{mechanism}: noticed after {noticed:.1f} s"
            await send(ws, type="speak", text="Served by the other one.", requestId="next")
            again = await collect(ws, timeout=30)
            assert again.end["requestId"] == "next" and again.end["cancelled"] is False and again.audio
    finally:
        if victim is not None:
            os.killpg(victim.process.pid, signal.SIGCONT)
        gateway.stop()
