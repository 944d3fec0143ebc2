"""OpenAI's speech API, driven by the official `openai` SDK (a client nobody here wrote): streaming and not,
every format, speed, server-sent events, the models list, and each error as the SDK reports it."""
from __future__ import annotations

import base64
import io
import json
import struct
import time

import av
import httpx
import numpy as np
import openai
import pytest

from gateway_helpers import collect, open_session, send, serve_gateway
from test_gateway import LONG, start_session
from triton_helpers import scrape_metrics, wait_until

TOKEN = "openai-test-token"
MODEL = "qwen3-tts"
TEXT = "Hello from the OpenAI endpoint. It streams while it speaks."


@pytest.fixture(scope="module")
def gateway(triton, voices_dir, tmp_path_factory):
    yield from serve_gateway(triton.grpc_url, voices_dir, tmp_path_factory.mktemp("gw"))


@pytest.fixture
def client(gateway):
    with openai.OpenAI(base_url=gateway.http + "/v1", api_key="not-needed", max_retries=0, timeout=60) as sdk:
        yield sdk


def speech(client, **params) -> bytes:
    """One non-streaming request: the whole body."""
    return client.audio.speech.create(**{"model": MODEL, "voice": "default", "input": TEXT, **params}).content


def assert_same_pcm(ours: bytes, theirs: bytes) -> None:
    """Equal PCM16, give or take one step: which streams share a batched decoder forward can move a float's
    last bit (README: Exactness)."""
    a, b = np.frombuffer(ours, "<i2").astype(int), np.frombuffer(theirs, "<i2").astype(int)
    assert len(a) > 12000 and len(a) == len(b) and np.abs(a - b).max() <= 1


def decoded_seconds(data: bytes) -> float:
    """Duration of an encoded body, decoded by ffmpeg."""
    with av.open(io.BytesIO(data)) as container:
        return sum(frame.samples / frame.sample_rate for frame in container.decode(audio=0))


def test_models_lists_the_served_model(client):
    """`models.list()` and `models.retrieve()` name the model; an unknown model id is a NotFoundError."""
    assert [model.id for model in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).owned_by == "qwen"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("tts-1")


def test_wav_streams_with_an_open_length_header(client):
    """The streamed WAV's first bytes arrive long before its last, its header leaves the length open, and the
    PCM behind it is the utterance's audio."""
    started, arrivals, body = time.monotonic(), [], bytearray()
    with client.audio.speech.with_streaming_response.create(model=MODEL, voice="default", input=LONG,
                                                            response_format="wav") as response:
        assert response.headers["content-type"] == "audio/wav"
        assert "content-length" not in response.headers  # chunked: it streams
        for chunk in response.iter_bytes():
            arrivals.append(time.monotonic() - started)
            body += chunk
    assert body[:4] == b"RIFF" and body[8:16] == b"WAVEfmt "
    assert struct.unpack("<I", body[4:8])[0] == struct.unpack("<I", body[40:44])[0] == 0xFFFFFFFF
    assert struct.unpack("<IHHIIHH", body[16:36]) == (16, 1, 1, 24000, 48000, 2, 16)
    assert len(arrivals) > 3 and arrivals[0] < arrivals[-1] / 2
    assert len(body) - 44 > 24000 * 2  # over a second of audio


async def test_pcm_equals_the_speak_protocols_audio(gateway):
    """The same text gives the same samples through the SDK (pcm) as through a WebSocket session (pcm16 24 kHz)."""
    async with openai.AsyncOpenAI(base_url=gateway.http + "/v1", api_key="x", max_retries=0) as sdk:
        response = await sdk.audio.speech.create(model=MODEL, voice="default", input=TEXT, response_format="pcm",
                                                 extra_body={"language": "English"})  # a session's default
        pcm = response.content
    async with open_session(gateway.ws) as ws:
        await start_session(ws)
        await send(ws, type="speak", text=TEXT)
        spoken = await collect(ws)
    assert_same_pcm(pcm, bytes(spoken.audio))


@pytest.mark.parametrize("response_format", ["mp3", "opus", "flac", "aac"])
def test_compressed_formats_decode_to_the_same_duration(client, response_format):
    """mp3, opus (Ogg), flac and aac (ADTS) bodies decode to the pcm body's duration (give or take the codec's
    padding), with the format's content type."""
    pcm_seconds = len(speech(client, response_format="pcm")) / 2 / 24000
    response = client.audio.speech.create(model=MODEL, voice="default", input=TEXT, response_format=response_format)
    assert response.response.headers["content-type"] == {"mp3": "audio/mpeg", "opus": "audio/ogg",
                                                         "flac": "audio/flac", "aac": "audio/aac"}[response_format]
    assert decoded_seconds(response.content) == pytest.approx(pcm_seconds, abs=0.1)


@pytest.mark.parametrize("speed", [0.5, 2.0, 4.0])
def test_speed_changes_the_duration(client, speed):
    """`speed` stretches or shortens the audio by that factor (pitch kept, by ffmpeg's atempo)."""
    normal = len(speech(client, response_format="pcm")) / 2 / 24000
    changed = len(speech(client, response_format="pcm", speed=speed)) / 2 / 24000
    assert changed == pytest.approx(normal / speed, rel=0.03)


def test_sse_sends_audio_deltas_then_done_with_usage(client, gateway):
    """`stream_format="sse"`: `speech.audio.delta` events whose audio joins into the pcm body, then one
    `speech.audio.done` with usage."""
    expected = speech(client, response_format="pcm")
    with httpx.stream("POST", gateway.http + "/v1/audio/speech", timeout=60,
                      json={"model": MODEL, "voice": "default", "input": TEXT, "response_format": "pcm",
                            "stream_format": "sse"}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
    deltas, done = events[:-1], events[-1]
    assert deltas and all(event["type"] == "speech.audio.delta" for event in deltas)
    assert_same_pcm(b"".join(base64.b64decode(event["audio"]) for event in deltas), expected)
    assert done["type"] == "speech.audio.done"
    assert done["usage"]["input_tokens"] == len(TEXT)
    assert done["usage"]["output_tokens"] == round(len(expected) / 2 / 1920)


def test_a_voice_may_be_given_as_an_object(client):
    """`voice` as `{"id": ...}` (the SDK's custom-voice form) works like the plain id."""
    assert_same_pcm(speech(client, voice={"id": "default"}, response_format="pcm"),
                    speech(client, response_format="pcm"))


@pytest.mark.parametrize("params, param", [
    ({"input": ""}, "input"),
    ({"input": "   "}, "input"),
    ({"input": "x" * 5001}, "input"),
    ({"response_format": "ogg_vorbis"}, "response_format"),
    ({"speed": 4.5}, "speed"),
    ({"speed": 0.1}, "speed"),
    ({"stream_format": "chunks"}, "stream_format"),
    ({"extra_body": {"language": "Klingon"}}, "language"),
    ({"extra_body": {"language": " "}}, "language"),
])
def test_bad_input_is_a_bad_request_naming_the_parameter(client, params, param):
    """Each invalid parameter is a 400 (the SDK's BadRequestError) whose error names it."""
    with pytest.raises(openai.BadRequestError) as raised:
        speech(client, **params)
    assert raised.value.body["param"] == param and raised.value.body["type"] == "invalid_request_error"


def test_an_unknown_voice_is_not_found(client):
    """An unknown voice is a 404 (NotFoundError) with code voice_not_found, naming the voices there are."""
    with pytest.raises(openai.NotFoundError) as raised:
        speech(client, voice="alloy")
    assert raised.value.body["code"] == "voice_not_found" and "default" in raised.value.body["message"]


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b'{"input": "hi", "voice": "default"}',
                                  b'{"model": "m", "input": 7}', b'{"model": "m", "input": ' + b"[" * 20_000 + b"}",
                                  b'{"model": "m", "input": "hi", "speed": 1e999}'])
def test_malformed_bodies_get_openai_shaped_400s(gateway, body):
    """Broken JSON, deep nesting, a non-object, a missing `model`, a wrong type, an infinite speed: 400 with an
    `error` object, never a 500."""
    response = httpx.post(gateway.http + "/v1/audio/speech", content=body, timeout=10,
                          headers={"content-type": "application/json"})
    assert response.status_code == 400 and set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_a_lone_surrogate_in_the_input_is_a_bad_request(gateway):
    """Text that cannot be UTF-8 (a lone surrogate, which JSON can carry) is a 400 naming `input`."""
    response = httpx.post(gateway.http + "/v1/audio/speech", timeout=10, headers={"content-type": "application/json"},
                          content=b'{"model": "m", "voice": "default", "input": "Hello \\ud800 there."}')
    assert response.status_code == 400 and response.json()["error"]["param"] == "input"


def test_an_oversized_body_is_refused_before_it_is_read(gateway):
    """A body over the limit is a 413 (decided from its Content-Length)."""
    response = httpx.post(gateway.http + "/v1/audio/speech", timeout=10, headers={"content-type": "application/json"},
                          content=b'{"model": "m", "input": "' + b"x" * 200_000 + b'"}')
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"


def test_a_token_is_required_when_auth_is_on(make_gateway):
    """With auth on, a wrong key is the SDK's AuthenticationError (OpenAI's 401 body); the right one speaks."""
    gateway = make_gateway(GATEWAY_AUTH_TOKENS=TOKEN)
    gateway.wait_ready()
    with openai.OpenAI(base_url=gateway.http + "/v1", api_key="wrong", max_retries=0) as sdk:
        with pytest.raises(openai.AuthenticationError) as raised:
            speech(sdk)
        assert raised.value.body["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            sdk.models.list()
    with openai.OpenAI(base_url=gateway.http + "/v1", api_key=TOKEN, max_retries=0) as sdk:
        assert len(speech(sdk, response_format="pcm")) > 24000


def test_model_loading_is_503(make_gateway):
    """Without a ready Triton the endpoint answers 503 (an InternalServerError to the SDK), code model_loading."""
    gateway = make_gateway(triton_url="127.0.0.1:9")
    with openai.OpenAI(base_url=gateway.http + "/v1", api_key="x", max_retries=0) as sdk:
        with pytest.raises(openai.InternalServerError) as raised:
            speech(sdk)
    assert raised.value.status_code == 503 and raised.value.body["code"] == "model_loading"


async def test_a_client_that_goes_away_cancels_its_synthesis(gateway, triton):
    """Closing the response mid-stream cancels the Triton requests: the talker's streams drain at once."""
    async with openai.AsyncOpenAI(base_url=gateway.http + "/v1", api_key="x", max_retries=0) as sdk:
        async with sdk.audio.speech.with_streaming_response.create(
                model=MODEL, voice="default", input=(LONG + " ") * 4, response_format="pcm") as response:
            async for _ in response.iter_bytes():
                break
        cancelled = 'tts_gateway_openai_speech_requests_total{outcome="cancelled"}'
        assert await wait_until(lambda: scrape_metrics(gateway.http + "/metrics")[cancelled] >= 1, timeout=5)
        assert await wait_until(lambda: scrape_metrics(triton.metrics_url)["qwen_tts_talker_active_streams"] == 0,
                                timeout=5)
