"""Capacity is the engines' to decide; the gateway routes: against a real tritonserver whose talker holds one
stream, a new utterance is refused at once with the engine's own retry hint, a client that can wait waits in the
engine's line, a storm of speak+cancel never takes the busy row, and a client that leaves while waiting leaves the
line at once."""
from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from gateway_helpers import (HELD_TEXT, collect, hold_a_row, open_session, release_the_row, send)
from test_gateway import frames_for, start_session
from test_openai import MODEL
from triton_helpers import scrape_metrics, wait_until


async def test_full_capacity_refuses_a_speak_at_once_with_retry_after(make_gateway, one_row_triton):
    """With the engine's only row busy, a speak is refused at once (not after a wait) with the engine's own
    RATE_LIMITED, recoverable, with retryAfterMs; the playing utterance goes on and the session stays usable."""
    gateway = make_gateway(one_row_triton.grpc_url)
    gateway.wait_ready()
    async with open_session(gateway.ws) as busy, open_session(gateway.ws) as waiting:
        await hold_a_row(busy)
        await start_session(waiting)
        asked = time.monotonic()
        await send(waiting, type="speak", text="Is there room for me?", requestId="w")
        result = await collect(waiting)
        assert time.monotonic() - asked < 0.8  # (the engine holds a new stream up to 0.3 s for a row to free)
        error = result.of_type("error")[0]
        assert error["code"] == "RATE_LIMITED" and error["recoverable"] is True and error["requestId"] == "w"
        assert isinstance(error["retryAfterMs"], int) and error["retryAfterMs"] > 0
        assert result.end["cancelled"] is True and not result.audio
        await release_the_row(busy)
        await send(waiting, type="speak", text="Now there is room.")
        again = await collect(waiting)
        assert again.end["cancelled"] is False and again.audio and not again.of_type("error")


async def test_a_client_that_can_wait_is_queued_instead_of_refused(make_gateway, one_row_triton):
    """A session that says it can wait (start.maxWaitMs) waits in the engine's line for the busy row and plays once
    it frees."""
    gateway = make_gateway(one_row_triton.grpc_url)
    gateway.wait_ready()
    async with open_session(gateway.ws) as busy, open_session(gateway.ws) as patient:
        await hold_a_row(busy)
        await start_session(patient, maxWaitMs=30000)
        await send(patient, type="speak", text="I can wait for my turn.")
        assert await wait_until(lambda: scrape_metrics(one_row_triton.metrics_url)[
            "qwen_tts_talker_queued_streams"] == 1, timeout=5), "it waits in the engine's line"
        await asyncio.sleep(1.0)  # well past the hold of a stream that cannot wait
        await release_the_row(busy)
        result = await collect(patient)
        assert result.end["cancelled"] is False and result.audio and not result.of_type("error")


async def test_utterances_cancelled_while_every_row_is_busy_never_start(make_gateway, one_row_triton):
    """Speak+cancel storms while the engine's only row is busy: each ends cancelled at once, the talker never steps
    one of them (it generated exactly the frames of the two utterances that played), and the next utterance plays
    normally."""
    gateway = make_gateway(one_row_triton.grpc_url)
    gateway.wait_ready()
    frames = lambda: scrape_metrics(one_row_triton.metrics_url)["qwen_tts_talker_frames_total"]  # noqa: E731
    async with open_session(gateway.ws) as busy, open_session(gateway.ws) as storm:
        await start_session(storm)
        before = frames()
        await hold_a_row(busy)
        for index in range(20):
            await send(storm, type="speak", text=f"Never mind number {index}.")
            await send(storm, type="cancel")
            assert (await collect(storm)).end["cancelled"] is True
        await release_the_row(busy)
        await send(storm, type="speak", text="This one plays.")
        assert (await collect(storm)).end["cancelled"] is False
        expected = frames_for(HELD_TEXT) + frames_for("This one plays.")
        assert await wait_until(lambda: frames() == before + expected, timeout=5), \
            f"the talker generated {frames() - before} frames; the two that played take {expected}"


async def test_a_full_server_answers_429_at_once_with_retry_after(make_gateway, one_row_triton):
    """With the engine's only row busy, the next request is at once a RateLimitError carrying retry-after-ms (the
    engine's own hint, which the SDK's own retries honour)."""
    gateway = make_gateway(one_row_triton.grpc_url)
    gateway.wait_ready()
    async with open_session(gateway.ws) as busy:
        await hold_a_row(busy)
        async with openai.AsyncOpenAI(base_url=gateway.http + "/v1", api_key="x", max_retries=0, timeout=60) as sdk:
            asked = time.monotonic()
            with pytest.raises(openai.RateLimitError) as raised:
                await sdk.audio.speech.create(model=MODEL, voice="default", input="Is there room?",
                                              response_format="pcm")
            assert time.monotonic() - asked < 0.8  # (within the engine's 0.3 s hold, not the row's release)
        assert int(raised.value.response.headers["retry-after-ms"]) > 0
        assert raised.value.body["code"] == "rate_limit_exceeded"
        await release_the_row(busy)


async def test_a_client_that_leaves_while_waiting_for_a_row_never_starts(make_gateway, one_row_triton):
    """A request that said it can wait (max_wait_ms), waiting in the engine's line behind the busy row, whose client
    goes away leaves the line at once (its stream cancelled by its key), without waiting for its turn."""
    gateway = make_gateway(one_row_triton.grpc_url, GATEWAY_QUEUE_TIMEOUT_S="60")
    gateway.wait_ready()
    talker = lambda: scrape_metrics(one_row_triton.metrics_url)  # noqa: E731
    cancelled = 'qwen_tts_talker_streams_total{outcome="cancelled"}'
    async with open_session(gateway.ws) as busy:
        await hold_a_row(busy)
        before = talker()[cancelled]
        async with httpx.AsyncClient(base_url=gateway.http, timeout=1.0) as http:
            with pytest.raises(httpx.ReadTimeout):  # waiting in line; then this client leaves
                await http.post("/v1/audio/speech", json={"model": MODEL, "input": "Hi.", "voice": "default",
                                                          "max_wait_ms": 30000})
        assert await wait_until(lambda: talker()["qwen_tts_talker_queued_streams"] == 0 and
                                talker()[cancelled] == before + 1, timeout=3)
        metrics = scrape_metrics(gateway.http + "/metrics")
        assert metrics['tts_gateway_openai_speech_requests_total{outcome="cancelled"}'] == 1
        await release_the_row(busy)
