"""The gateway for real: its own process, a real tritonserver behind it, real WebSocket and HTTP clients."""
from __future__ import annotations

import asyncio
import base64
import json

import httpx
import numpy as np
import pytest
import soxr
from websockets.exceptions import ConnectionClosed

from gateway_helpers import collect, open_session, receive_json, send, serve_gateway
from triton_helpers import scrape_metrics, wait_until

LONG = "This sentence is long enough to keep the model busy for a while, which is what a cancel test needs."


def frames_for(text: str) -> int:
    """Frames the FAST settings generate for one sentence (max_new_tokens - 1)."""
    return 4 + len(text) - 1


@pytest.fixture(scope="module")
def gateway(triton, voices_dir, tmp_path_factory):
    yield from serve_gateway(triton.grpc_url, voices_dir, tmp_path_factory.mktemp("gw"), GATEWAY_MAX_TEXT_CHARS="3000")


async def start_session(ws, **start) -> dict:
    ready = await receive_json(ws)
    assert ready["type"] == "ready"
    if start is not None:
        await send(ws, type="start", **start)
        started = await receive_json(ws)
        assert started["type"] == "started", started
        return started
    return ready


# -- the two client kinds ----------------------------------------------------------------------------------

async def test_spec_client_flow(gateway):
    """start → started, speak → binary PCM → complete (bytes match audioLengthMs), stop → stopped, close 1000."""
    async with open_session(gateway.ws) as ws:
        ready = await receive_json(ws)
        assert ready["voiceLoaded"] == "default" and ready["sessionId"]
        assert ready["capabilities"]["streaming"] is True and "pcm32f" in ready["capabilities"]["encodings"]
        assert len(ready["capabilities"]["languages"]) >= 10
        await send(ws, type="start", sampleRate=24000, encoding="pcm16", language="English", contractId="c-1")
        started = await receive_json(ws)
        assert started == {"type": "started", "sampleRate": 24000, "encoding": "pcm16", "voice": "default",
                           "language": "English", "textMode": "sentences",  # auto, with an ICL voice
                           "wordTimestamps": False,  # (not asked for)
                           "model": "qwen3-tts-0.6b-base"}  # the served model (named from its kind and size)
        await send(ws, type="speak", text="Hello there.", requestId="req-1")
        result = await collect(ws)
        complete = result.end
        assert complete["type"] == "complete" and complete["cancelled"] is False
        assert complete["requestId"] == "req-1" and complete["charactersProcessed"] == 12
        assert len(result.audio) == frames_for("Hello there.") * 1920 * 2
        assert len(result.audio) // 2 == round(complete["audioLengthMs"] * 24)
        assert 0 < complete["firstAudioMs"] <= complete["durationMs"]
        await send(ws, type="stop", reason="done here")
        assert await receive_json(ws) == {"type": "stopped", "reason": "done here"}
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 5)
        assert closed.value.rcvd.code == 1000


async def test_legacy_client_flow(gateway):
    """Without start: speak → binary PCM16 24 kHz → audio_end with the legacy fields."""
    async with open_session(gateway.ws) as ws:
        await receive_json(ws)  # ready; legacy clients ignore it
        await send(ws, type="speak", text="Legacy hello.")
        result = await collect(ws)
        assert result.end == {"type": "audio_end", "sample_rate": 24000, "format": "pcm_s16le", "channels": 1,
                              "cancelled": False}
        assert len(result.audio) == frames_for("Legacy hello.") * 1920 * 2
        assert not result.of_type("complete")


async def test_base64_transport_with_pcm32f_at_48k(gateway):
    """audioTransport base64 sends numbered audioChunk messages, the last one final, at the session's format."""
    async with open_session(gateway.ws) as ws:
        await start_session(ws, sampleRate=48000, encoding="pcm32f", audioTransport="base64")
        await send(ws, type="speak", text="Chunks as text.")
        result = await collect(ws)
        chunks = result.of_type("audioChunk")
        assert not result.audio and len(chunks) >= 3
        assert [c["sequenceNumber"] for c in chunks] == list(range(len(chunks)))
        assert [c["isFinal"] for c in chunks] == [False] * (len(chunks) - 1) + [True]
        data = b"".join(base64.b64decode(c["data"]) for c in chunks)
        samples = np.frombuffer(data, dtype="<f4")
        assert abs(samples.size - frames_for("Chunks as text.") * 1920 * 2) <= 2  # 24 kHz → 48 kHz
        assert samples.size == round(result.end["audioLengthMs"] * 48)
        assert chunks[1]["timestampMs"] > chunks[0]["timestampMs"] == 0


async def test_resampled_stream_has_no_seams(gateway):
    """Streaming resampling equals resampling the whole utterance at once: no clicks at chunk boundaries."""
    text = "Resampling must be seamless."
    async with open_session(gateway.ws) as ws:
        await start_session(ws, sampleRate=24000, encoding="pcm32f")
        await send(ws, type="speak", text=text)
        native = np.frombuffer(bytes((await collect(ws)).audio), dtype="<f4")
        await send(ws, type="start", sampleRate=16000, encoding="pcm32f")
        await receive_json(ws)
        await send(ws, type="speak", text=text)
        streamed = np.frombuffer(bytes((await collect(ws)).audio), dtype="<f4")
    whole = soxr.resample(native, 24000, 16000, quality="HQ")
    assert abs(streamed.size - whole.size) <= 1
    n = min(streamed.size, whole.size)
    assert np.abs(streamed[:n] - whole[:n]).max() < 1e-4


# -- errors ------------------------------------------------------------------------------------------------

async def test_invalid_messages_get_errors_and_the_session_goes_on(gateway):
    """Not JSON, no type, unknown type and wrong field types each get INVALID_MESSAGE; the session still works."""
    async with open_session(gateway.ws) as ws:
        await receive_json(ws)
        for raw in ("not json", "[1, 2]", json.dumps({"text": "x"}), json.dumps({"type": "dance"}),
                    json.dumps({"type": "start", "sampleRate": "fast"}),
                    json.dumps({"type": "speak", "text": 42})):
            await ws.send(raw)
            error = await receive_json(ws)
            assert error["type"] == "error" and error["code"] == "INVALID_MESSAGE", raw
            assert error["recoverable"] is False and error["message"]
        await ws.send(b"\x00\x01binary frames are ignored")
        await send(ws, type="speak", text="Still fine.", unknownField=True)
        assert (await collect(ws)).end["cancelled"] is False


@pytest.mark.parametrize("message", [{"type": "speak"}, {"type": "speak", "text": "  \n "},
                                     {"type": "speak", "text": "x" * 3001, "requestId": "too-long"}])
async def test_bad_text_gets_invalid_text(gateway, message):
    """Missing, blank or too long text gets INVALID_TEXT (with the requestId when there is one)."""
    async with open_session(gateway.ws) as ws:
        await receive_json(ws)
        await ws.send(json.dumps(message))
        error = await receive_json(ws)
        assert error["code"] == "INVALID_TEXT" and error["recoverable"] is False
        assert error.get("requestId") == message.get("requestId")


async def test_unknown_voice_falls_back_to_the_default(gateway):
    """start with an unknown voice: VOICE_NOT_FOUND (recoverable), then started reports the voice in use."""
    async with open_session(gateway.ws) as ws:
        await receive_json(ws)
        await send(ws, type="start", voice="nobody")
        error = await receive_json(ws)
        assert error["code"] == "VOICE_NOT_FOUND" and error["recoverable"] is True
        started = await receive_json(ws)
        assert started["type"] == "started" and started["voice"] == "default"
        await send(ws, type="speak", text="Default voice.", voice="../../etc")
        assert (await receive_json(ws))["code"] == "VOICE_NOT_FOUND"
        assert (await collect(ws)).end["cancelled"] is False


@pytest.mark.parametrize("start", [{"sampleRate": 12345}, {"encoding": "mp3"}, {"language": "Klingon"},
                                   {"language": ""}, {"language": "  "}, {"audioTransport": "carrier-pigeon"}])
async def test_unsupported_config_is_refused_and_the_old_one_kept(gateway, start):
    """An unsupported start gets INVALID_CONFIG, no started, and the previous config stays in force."""
    async with open_session(gateway.ws) as ws:
        await start_session(ws, sampleRate=16000)
        await send(ws, type="start", **start)
        error = await receive_json(ws)
        assert error["code"] == "INVALID_CONFIG" and error["recoverable"] is False
        await send(ws, type="speak", text="Old config.")
        result = await collect(ws)
        assert len(result.audio) // 2 == round(result.end["audioLengthMs"] * 16)  # still 16 kHz


@pytest.mark.parametrize("language", ["", "  ", "Klingon"])
async def test_a_speak_in_a_blank_or_unknown_language_is_invalid_config(gateway, language):
    """A speak whose language is blank or unknown gets INVALID_CONFIG with its request id, and nothing plays."""
    async with open_session(gateway.ws) as ws:
        await start_session(ws)
        await send(ws, type="speak", text="Which language?", language=language, requestId="l")
        error = await receive_json(ws)
        assert (error["code"], error["requestId"]) == ("INVALID_CONFIG", "l") and "language" in error["message"]
        await send(ws, type="speak", text="The session's language.")
        assert (await collect(ws)).end["cancelled"] is False


async def test_tts_unavailable_while_triton_is_unreachable(make_gateway):
    """With no Triton behind it, readyz is 503 and speak gets TTS_UNAVAILABLE (recoverable; nothing is loading)."""
    from tools.triton_local import free_port

    gateway = make_gateway(triton_url=f"127.0.0.1:{free_port()}")
    async with httpx.AsyncClient(timeout=10) as http:
        assert (await http.get(gateway.http + "/readyz")).status_code == 503
        assert (await http.get(gateway.http + "/healthz")).status_code == 200
    async with open_session(gateway.ws) as ws:
        await receive_json(ws)
        await send(ws, type="speak", text="Anyone there?", requestId="r")
        error = await receive_json(ws)
        assert error == {"type": "error", "code": "TTS_UNAVAILABLE", "message": error["message"],
                         "recoverable": True, "requestId": "r"}


async def test_no_audio_progress_times_out(make_gateway):
    """When no audio arrives within the synthesis deadline, the client gets TIMEOUT and the session goes on."""
    gateway = make_gateway(GATEWAY_SYNTHESIS_TIMEOUT_S="0.001")
    gateway.wait_ready()
    async with open_session(gateway.ws) as ws:
        await start_session(ws)
        await send(ws, type="speak", text="Too slow for this deadline.", requestId="t")
        result = await collect(ws)
        error = result.of_type("error")[0]
        assert error["code"] == "TIMEOUT" and error["recoverable"] is True and error["requestId"] == "t"
        assert result.end["cancelled"] is True
        await send(ws, type="start", sampleRate=8000)
        assert (await receive_json(ws))["type"] == "started"


async def test_too_many_sessions_are_refused_with_1013(make_gateway):
    """Beyond GATEWAY_MAX_SESSIONS a new connection gets RATE_LIMITED and close code 1013."""
    gateway = make_gateway(GATEWAY_MAX_SESSIONS="1")
    async with open_session(gateway.ws) as first:
        await receive_json(first)
        async with open_session(gateway.ws) as second:
            error = await receive_json(second)
            assert error["code"] == "RATE_LIMITED" and error["recoverable"] is True
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(second.recv(), 5)
            assert closed.value.rcvd.code == 1013
        await send(first, type="speak", text="First still works.")
        assert (await collect(first)).end["type"] == "audio_end"


async def test_too_many_queued_utterances_are_refused(make_gateway):
    """Beyond GATEWAY_MAX_QUEUED_UTTERANCES a speak gets RATE_LIMITED; the queued ones still play."""
    gateway = make_gateway(GATEWAY_MAX_QUEUED_UTTERANCES="1")
    gateway.wait_ready()
    async with open_session(gateway.ws) as ws:
        await start_session(ws)
        for index in range(3):
            await send(ws, type="speak", text=f"Queued number {index}.", requestId=str(index))
        results = [await collect(ws, until=("complete", "error"))]
        while len([r for r in results if r.end]) < 2:
            results.append(await collect(ws))
        errors = [m for r in results for m in r.of_type("error")]
        assert [(e["code"], e["requestId"]) for e in errors] == [("RATE_LIMITED", "2")]
        assert [r.end["requestId"] for r in results if r.end] == ["0", "1"]


async def test_complete_reports_what_a_listener_heard(gateway):
    """`complete` says how often a listener playing at real time ran dry and for how long; the gateway's
    metrics count the same, with the lead each chunk found."""
    async with open_session(gateway.ws) as ws:
        await start_session(ws)
        await send(ws, type="speak", text="Two sentences here. And a second one to follow it.")
        complete = (await collect(ws)).end
    assert complete["underruns"] == 0 and complete["stallMs"] == 0
    metrics = scrape_metrics(gateway.http + "/metrics")
    assert "tts_gateway_underruns_total" in metrics and "tts_gateway_stall_seconds_total" in metrics
    assert metrics["tts_gateway_lead_seconds_count"] > 0 and metrics["tts_gateway_chunk_audio_seconds_count"] > 0


async def test_readiness_shows_each_endpoints_real_time_headroom(gateway):
    """/readyz lists each Triton endpoint's rows and, as its talker reports them, its real-time batch and
    headroom."""
    async with httpx.AsyncClient(base_url=gateway.http, timeout=10) as http:
        body = (await http.get("/readyz")).json()
    (capacity,) = body["capacity"].values()
    assert capacity["ready"] is True and capacity["rows"] == 16
    assert 1 <= capacity["realtime_batch"] <= 16 and 0 <= capacity["headroom"] <= 16


async def test_auth_tokens(make_gateway):
    """With auth configured: a bad or missing token closes with 1008; header, query and start tokens work."""
    gateway = make_gateway(GATEWAY_AUTH_TOKENS="s3cret,other")
    async with open_session(gateway.ws) as ws:  # no token anywhere: start without authToken
        await send(ws, type="start")
        error = await receive_json(ws)
        assert error["code"] == "UNAUTHORIZED" and error["recoverable"] is False
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 5)
        assert closed.value.rcvd.code == 1008
    async with open_session(gateway.ws + "?token=wrong") as ws:
        assert (await receive_json(ws))["code"] == "UNAUTHORIZED"
    async with open_session(gateway.ws, additional_headers={"Authorization": "Bearer s3cret"}) as ws:
        assert (await receive_json(ws))["type"] == "ready"
    async with open_session(gateway.ws + "?token=other") as ws:
        assert (await receive_json(ws))["type"] == "ready"
    async with open_session(gateway.ws) as ws:
        await send(ws, type="start", authToken="s3cret", sampleRate=16000)
        assert (await receive_json(ws))["type"] == "ready"
        assert (await receive_json(ws))["type"] == "started"


# -- cancellation, order, priority, concurrency ------------------------------------------------------------

async def test_cancel_mid_utterance_stops_generation_in_triton(gateway, triton):
    """cancel ends the utterance promptly with cancelled: true, and Triton's talker stops that stream."""
    before = scrape_metrics(triton.metrics_url)['qwen_tts_talker_streams_total{outcome="cancelled"}']
    async with open_session(gateway.ws) as ws:
        await start_session(ws)
        await send(ws, type="speak", text=LONG * 3, requestId="c")
        first = await asyncio.wait_for(ws.recv(), 30)
        assert isinstance(first, bytes)
        await send(ws, type="cancel")
        result = await collect(ws, timeout=5)
        assert result.end["cancelled"] is True and result.end["requestId"] == "c"
        assert result.end_at < 2.0
    assert await wait_until(lambda: scrape_metrics(triton.metrics_url)[
        'qwen_tts_talker_streams_total{outcome="cancelled"}'] > before, timeout=20)
    assert await wait_until(lambda: scrape_metrics(triton.metrics_url)["qwen_tts_talker_active_streams"] == 0,
                            timeout=20)


async def test_disconnect_mid_utterance_leaves_nothing_running(gateway, triton):
    """A client that vanishes mid-utterance has its Triton stream cancelled and the decoder state freed."""
    before = scrape_metrics(triton.metrics_url)['qwen_tts_talker_streams_total{outcome="cancelled"}']
    async with open_session(gateway.ws) as ws:
        await receive_json(ws)
        await send(ws, type="speak", text=LONG * 3)
        assert isinstance(await asyncio.wait_for(ws.recv(), 30), bytes)
    assert await wait_until(lambda: scrape_metrics(triton.metrics_url)[
        'qwen_tts_talker_streams_total{outcome="cancelled"}'] > before, timeout=20)
    assert await wait_until(lambda: scrape_metrics(triton.metrics_url)["qwen_tts_talker_active_streams"] == 0
                            and scrape_metrics(triton.metrics_url)["qwen_tts_decoder_active_streams"] == 0,
                            timeout=20)


async def test_two_sentences_play_in_order_without_a_gap(gateway):
    """A two-sentence utterance is exactly sentence one's audio followed by sentence two's."""
    first, second = "The first sentence comes first.", "Then the second one follows!"
    async with open_session(gateway.ws) as ws:
        await receive_json(ws)
        pieces = []
        for text in (first, second, f"{first} {second}"):
            await send(ws, type="speak", text=text)
            pieces.append(bytes((await collect(ws)).audio))
    assert len(pieces[0]) > 0 and len(pieces[1]) > 0
    # Same samples in the same order, nothing between: equal up to PCM16 rounding (the two sentences of the
    # joint utterance may be decoded in one batch, which changes float results in the last bit).
    joint, parts = (np.frombuffer(p, dtype="<i2").astype(int) for p in (pieces[2], pieces[0] + pieces[1]))
    assert joint.shape == parts.shape
    assert np.abs(joint - parts).max() <= 1


async def test_high_priority_interrupts(gateway):
    """A high-priority speak cancels the current utterance and the queue (each ends, cancelled), then plays."""
    async with open_session(gateway.ws) as ws:
        await start_session(ws)
        await send(ws, type="speak", text=LONG * 3, requestId="long")
        await send(ws, type="speak", text="Queued behind.", requestId="queued")
        assert isinstance(await asyncio.wait_for(ws.recv(), 30), bytes)
        await send(ws, type="speak", text="Urgent news.", priority="high", requestId="urgent")
        ends = []
        while len(ends) < 3:
            ends.append((await collect(ws)).end)
        # every speak ends exactly once: the one playing and the one queued, cancelled, then the urgent one
        assert [(e["requestId"], e["cancelled"]) for e in ends] == [("long", True), ("queued", True),
                                                                      ("urgent", False)]
        await send(ws, type="speak", text="After.", requestId="after")
        assert (await collect(ws)).end["requestId"] == "after"


async def test_eight_concurrent_sessions_each_get_their_own_audio(gateway):
    """Eight sessions speaking at once each receive complete audio of their own text."""
    texts = [f"Session number {i} says {'hello ' * (i + 1)}." for i in range(8)]

    async def one(text):
        async with open_session(gateway.ws) as ws:
            await start_session(ws)
            await send(ws, type="speak", text=text, requestId=text)
            return text, await collect(ws, timeout=120)

    results = await asyncio.gather(*(one(t) for t in texts))
    for text, result in results:
        assert result.end["requestId"] == text and result.end["cancelled"] is False
        assert len(result.audio) == frames_for(text) * 1920 * 2


# -- operations --------------------------------------------------------------------------------------------

async def test_health_readiness_and_metrics(gateway):
    """healthz and readyz answer 200, and /metrics exposes the tts_gateway_ families."""
    async with httpx.AsyncClient(base_url=gateway.http, timeout=10) as http:
        assert (await http.get("/healthz")).json() == {"status": "ok"}
        assert (await http.get("/readyz")).status_code == 200
        text = (await http.get("/metrics")).text
    for name in ("tts_gateway_active_sessions", "tts_gateway_utterances_total", "tts_gateway_errors_total",
                 "tts_gateway_time_to_first_audio_seconds_bucket", "tts_gateway_real_time_factor_bucket",
                 "tts_gateway_audio_seconds_total", "tts_gateway_triton_ready{endpoint="):
        assert name in text, name
