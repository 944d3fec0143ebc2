"""OpenAI's speech API, driven by the official `openai` SDK (a client nobody here wrote): streaming and not,
every format, speed, server-sent events, the models list, each error as the SDK reports it, and the requests
voice-agent frameworks (LiveKit Agents, Pipecat, the OpenAI Agents SDK) send by default."""
from __future__ import annotations

import asyncio
import base64
import io
import json
import shutil
import struct
import time

import av
import httpx
import numpy as np
import openai
import pytest

from gateway.config import Settings
from gateway_helpers import collect, open_session, send, serve_gateway
from test_gateway import LONG, start_session
from triton_helpers import scrape_metrics, wait_until

TOKEN = "openai-test-token"
MODEL = "qwen3-tts"
SERVED = "qwen3-tts-0.6b-base"  # the tiny model's served name: none is configured, so from its kind and size
TEXT = "Hello from the OpenAI endpoint. It streams while it speaks."
SHORT = "Hello from an agent."
# OpenAI's speech model names and built-in voices, as the `openai` SDK documents them (SpeechModel and Voice in
# openai/types/audio/), plus the older gpt-4o-mini-tts snapshot the SDK's docstring names
OPENAI_MODELS = ["tts-1", "tts-1-hd", "gpt-4o-mini-tts", "gpt-4o-mini-tts-2025-03-20", "gpt-4o-mini-tts-2025-12-15"]
OPENAI_VOICES = ["alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage", "shimmer", "verse",
                 "marin", "cedar"]
# The OpenAI Agents SDK's default TTSModelSettings.instructions (src/agents/voice/model.py)
AGENTS_INSTRUCTIONS = "You will receive partial sentences. Do not complete the sentence just read out the text."


@pytest.fixture(scope="module")
def gateway(triton, voices_dir, tmp_path_factory):
    yield from serve_gateway(triton.grpc_url, voices_dir, tmp_path_factory.mktemp("gw"))


@pytest.fixture(scope="module")
def drop_in_gateway(triton, voices_dir, tmp_path_factory):
    """A gateway set up for drop-in use: two OpenAI voice names mapped (nova to a voice that does not exist),
    instructions ignored."""
    yield from serve_gateway(triton.grpc_url, voices_dir, tmp_path_factory.mktemp("drop-in-gw"),
                             GATEWAY_OPENAI_VOICE_MAP="alloy=plain, nova=ghost", GATEWAY_OPENAI_IGNORE_INSTRUCTIONS="1")


@pytest.fixture
def client(gateway):
    with openai.OpenAI(base_url=gateway.http + "/v1", api_key="not-needed", max_retries=0, timeout=60) as sdk:
        yield sdk


@pytest.fixture
def drop_in_client(drop_in_gateway):
    with openai.OpenAI(base_url=drop_in_gateway.http + "/v1", api_key="x", max_retries=0, timeout=60) as sdk:
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


def test_models_lists_the_served_model_and_its_openai_names(client):
    """`models.list()` names the served model (its name from its kind and size), then the names it answers to
    (qwen3-tts and OpenAI's model names); `models.retrieve()` finds each, and an unknown model id is a
    NotFoundError."""
    assert [model.id for model in client.models.list()] == [SERVED, MODEL, *OPENAI_MODELS]
    assert client.models.retrieve(MODEL).owned_by == "qwen"
    assert client.models.retrieve("gpt-4o-mini-tts").id == "gpt-4o-mini-tts"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-5")


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
    """An unknown voice (not OpenAI's, not stored) is a 404 (NotFoundError) with code voice_not_found, naming the
    voices there are."""
    with pytest.raises(openai.NotFoundError) as raised:
        speech(client, voice="bob")
    assert raised.value.body["code"] == "voice_not_found" and "default" in raised.value.body["message"]


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b'{"input": "hi", "voice": "default"}',
                                  b'{"model": "qwen3-tts", "input": 7}',
                                  b'{"model": "qwen3-tts", "input": ' + b"[" * 20_000 + b"}",
                                  b'{"model": "qwen3-tts", "input": "hi", "speed": 1e999}'])
def test_malformed_bodies_get_openai_shaped_400s(gateway, body):
    """Broken JSON, deep nesting, a non-object, a missing `model`, a wrong type, an infinite speed: 400 with an
    `error` object, never a 500."""
    response = httpx.post(gateway.http + "/v1/audio/speech", content=body, timeout=10,
                          headers={"content-type": "application/json"})
    assert response.status_code == 400 and set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_a_lone_surrogate_in_the_input_is_a_bad_request(gateway):
    """Text that cannot be UTF-8 (a lone surrogate, which JSON can carry) is a 400 naming `input`."""
    response = httpx.post(gateway.http + "/v1/audio/speech", timeout=10, headers={"content-type": "application/json"},
                          content=b'{"model": "qwen3-tts", "voice": "default", "input": "Hello \\ud800 there."}')
    assert response.status_code == 400 and response.json()["error"]["param"] == "input"


def test_an_oversized_body_is_refused_before_it_is_read(gateway):
    """A body over the limit is a 413 (decided from its Content-Length)."""
    response = httpx.post(gateway.http + "/v1/audio/speech", timeout=10, headers={"content-type": "application/json"},
                          content=b'{"model": "qwen3-tts", "input": "' + b"x" * 200_000 + b'"}')
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


def test_an_unreachable_triton_is_503_tts_unavailable(make_gateway):
    """Without a reachable Triton the endpoint answers 503 (an InternalServerError to the SDK), code tts_unavailable
    (nothing is loading)."""
    gateway = make_gateway(triton_url="127.0.0.1:9")
    with openai.OpenAI(base_url=gateway.http + "/v1", api_key="x", max_retries=0) as sdk:
        with pytest.raises(openai.InternalServerError) as raised:
            speech(sdk)
    assert raised.value.status_code == 503 and raised.value.body["code"] == "tts_unavailable"


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


# -- as voice-agent frameworks call it ------------------------------------------------------------------------


async def test_livekit_default_request_gets_sse_mp3_and_usage(gateway):
    """LiveKit Agents' OpenAI TTS as set up by default (gpt-4o-mini-tts, voice ash, mp3, speed 1.0, sse) gets a
    request id and mp3 deltas that decode to the utterance, then a done event with usage, read the way the plugin
    reads them."""
    # livekit/agents at da6af86: livekit-plugins/livekit-plugins-openai/livekit/plugins/openai/tts.py
    # (TTS.__init__ defaults; ChunkedStream._run builds the request and parses the body)
    async with openai.AsyncClient(base_url=gateway.http + "/v1", api_key="x", max_retries=0) as sdk:
        expected = await sdk.audio.speech.create(model=MODEL, voice="default", input=SHORT, response_format="pcm",
                                                 timeout=60)
        async with sdk.audio.speech.with_streaming_response.create(
                input=SHORT, model="gpt-4o-mini-tts", voice="ash", response_format="mp3", speed=1.0,
                instructions=openai.omit, stream_format="sse", timeout=httpx.Timeout(30, connect=10)) as stream:
            media_type = stream.headers["content-type"].split(";")[0].strip().lower()
            request_id = stream.request_id  # the plugin warns on every utterance without one
            mp3, types, usage = bytearray(), [], None
            async for line in stream.iter_lines():
                if line.startswith("data: "):
                    event = json.loads(line[6:])
                    types.append(event["type"])
                    if event["type"] == "speech.audio.delta":
                        mp3 += base64.b64decode(event.get("delta") or event.get("audio"))
                    elif event["type"] == "speech.audio.done":
                        usage = event["usage"]
    assert media_type == "text/event-stream" and request_id.startswith("req_")
    assert set(types[:-1]) == {"speech.audio.delta"} and types[-1] == "speech.audio.done"
    assert decoded_seconds(bytes(mp3)) == pytest.approx(len(expected.content) / 2 / 24000, abs=0.1)
    assert usage["input_tokens"] == len(SHORT) and usage["output_tokens"] > 0


async def test_pipecat_default_request_gets_the_default_voices_pcm(gateway):
    """Pipecat's OpenAITTSService as set up by default (gpt-4o-mini-tts, voice alloy, pcm, no speed or
    instructions) gets 24 kHz PCM: the default voice's samples."""
    # pipecat-ai/pipecat at acead05: src/pipecat/services/openai/tts.py (the default settings in
    # OpenAITTSService.__init__; run_tts builds the request and reads the body)
    async def run_tts() -> bytes:
        async with openai.AsyncOpenAI(api_key="x", base_url=gateway.http + "/v1") as client:
            async with client.audio.speech.with_streaming_response.create(
                    input=SHORT, model="gpt-4o-mini-tts", voice="alloy", response_format="pcm") as r:
                assert r.status_code == 200
                return b"".join([chunk async for chunk in r.iter_bytes(4800) if chunk])

    pcm = await asyncio.wait_for(run_tts(), 60)
    async with openai.AsyncOpenAI(base_url=gateway.http + "/v1", api_key="x", max_retries=0, timeout=60) as sdk:
        expected = await sdk.audio.speech.create(model=MODEL, voice="default", input=SHORT, response_format="pcm")
    assert_same_pcm(pcm, expected.content)


def agents_sdk_request(client):
    """The request the OpenAI Agents SDK's voice pipeline sends by default: its own instructions every time."""
    # openai/openai-agents-python at 7f7a44f: src/agents/voice/models/openai_tts.py (OpenAITTSModel.run),
    # src/agents/voice/model.py (TTSModelSettings), src/agents/voice/models/openai_model_provider.py (the model)
    return client.audio.speech.with_streaming_response.create(
        model="gpt-4o-mini-tts", voice="ash", input=SHORT, response_format="pcm", speed=openai.omit,
        extra_body={"instructions": AGENTS_INSTRUCTIONS})


def test_instructions_are_refused_by_a_model_that_takes_none(client):
    """Instructions (the OpenAI Agents SDK's default ones) are a 400 naming `instructions`, not silently dropped:
    the Base model takes none."""
    with pytest.raises(openai.BadRequestError) as raised:
        with agents_sdk_request(client):
            pass
    assert raised.value.body["param"] == "instructions" and raised.value.body["code"] == "unsupported_parameter"
    assert "GATEWAY_OPENAI_IGNORE_INSTRUCTIONS" in raised.value.body["message"]


@pytest.mark.parametrize("instructions", ["", "  ", None])
def test_empty_instructions_are_not_refused(client, instructions):
    """Empty, blank or null instructions ask for nothing and are accepted."""
    assert len(speech(client, input=SHORT, response_format="pcm", extra_body={"instructions": instructions})) > 0


def test_instructions_are_ignored_with_the_flag(drop_in_client, drop_in_gateway):
    """With GATEWAY_OPENAI_IGNORE_INSTRUCTIONS=1 the Agents SDK's request speaks as if it had no instructions,
    says so in a header, and the log says so without the instructions' text."""
    with agents_sdk_request(drop_in_client) as response:
        assert response.headers["x-instructions-ignored"] == "true"
        pcm = response.read()
    plain = drop_in_client.audio.speech.create(model="gpt-4o-mini-tts", voice="ash", input=SHORT, response_format="pcm")
    assert "x-instructions-ignored" not in plain.response.headers
    assert_same_pcm(pcm, plain.content)
    log = drop_in_gateway.log_path.read_text()
    assert f"instructions of {len(AGENTS_INSTRUCTIONS)} characters ignored" in log
    assert "partial sentences" not in log


def test_openai_voice_names_speak_in_the_default_voice(client):
    """Each of OpenAI's voice names, unmapped, speaks in the default voice instead of being a 404."""
    expected = speech(client, input=SHORT, response_format="pcm")
    for voice in OPENAI_VOICES:
        assert_same_pcm(speech(client, voice=voice, input=SHORT, response_format="pcm"), expected)


def test_voice_map_entries_speak_in_their_voices(drop_in_client):
    """GATEWAY_OPENAI_VOICE_MAP's alloy=plain speaks in the voice plain, and an OpenAI name it leaves out in the
    default voice."""
    def pcm(voice):
        return drop_in_client.audio.speech.create(model=MODEL, voice=voice, input=SHORT, response_format="pcm").content

    assert_same_pcm(pcm("alloy"), pcm("plain"))
    assert_same_pcm(pcm("echo"), pcm("default"))
    assert pcm("alloy") != pcm("default")


def test_a_map_entry_to_a_missing_voice_is_not_found_naming_the_entry(drop_in_client, drop_in_gateway):
    """A map entry whose voice does not exist (nova=ghost) is a 404 naming the entry, and was logged at start."""
    with pytest.raises(openai.NotFoundError) as raised:
        drop_in_client.audio.speech.create(model=MODEL, voice="nova", input=SHORT, response_format="pcm")
    assert raised.value.body["code"] == "voice_not_found" and raised.value.body["param"] == "voice"
    assert "'ghost'" in raised.value.body["message"] and "GATEWAY_OPENAI_VOICE_MAP" in raised.value.body["message"]
    assert "GATEWAY_OPENAI_VOICE_MAP names voices that are not in" in drop_in_gateway.log_path.read_text()


def test_a_map_entry_wins_over_a_stored_voice_which_wins_over_the_default(client, drop_in_client, voices_dir):
    """A stored voice named like an OpenAI voice is spoken as itself where the map leaves the name out, and the
    map's entry is spoken where it has one."""
    stored = {"echo": voices_dir / "plain", "alloy": voices_dir / "default"}  # echo sounds like plain, alloy not
    for name, source in stored.items():
        (voices_dir / name).mkdir()
        for part in ("reference.wav", "transcript.txt"):
            if (source / part).is_file():
                shutil.copy(source / part, voices_dir / name / part)
        (voices_dir / name / "metadata.json").write_text(json.dumps({"name": name.title()}))
    try:
        plain = speech(client, voice="plain", input=SHORT, response_format="pcm")
        assert_same_pcm(speech(client, voice="echo", input=SHORT, response_format="pcm"), plain)
        assert_same_pcm(drop_in_client.audio.speech.create(model=MODEL, voice="alloy", input=SHORT,
                                                           response_format="pcm").content, plain)
    finally:
        for name in stored:
            shutil.rmtree(voices_dir / name)


@pytest.mark.parametrize("model", [MODEL, *OPENAI_MODELS])
def test_openai_model_names_are_accepted(client, model):
    """The served model's id and each of OpenAI's speech model names speak."""
    assert len(speech(client, model=model, input=SHORT, response_format="pcm")) > 0


def test_an_unknown_model_is_not_found_listing_the_accepted_names(client):
    """An unknown model is a 404 (NotFoundError) with code model_not_found, naming the models accepted."""
    with pytest.raises(openai.NotFoundError) as raised:
        speech(client, model="gpt-5-tts")
    body = raised.value.body
    assert body["code"] == "model_not_found" and body["param"] == "model" and body["type"] == "invalid_request_error"
    assert all(name in body["message"] for name in [MODEL, *OPENAI_MODELS])


def test_null_optional_fields_take_their_defaults(gateway):
    """Optional fields sent as null (voice, speed, formats, instructions) mean what leaving them out means."""
    response = httpx.post(gateway.http + "/v1/audio/speech", timeout=60,
                          json={"model": MODEL, "input": SHORT, "voice": None, "speed": None, "response_format": None,
                                "stream_format": None, "instructions": None})
    assert response.status_code == 200 and response.headers["content-type"] == "audio/wav"


@pytest.mark.parametrize("env, message", [
    ({"GATEWAY_OPENAI_VOICE_MAP": "alloy"}, "is not name=voice_id"),
    ({"GATEWAY_OPENAI_VOICE_MAP": "alloy=,nova=x"}, "is not name=voice_id"),
    ({"GATEWAY_OPENAI_VOICE_MAP": "alloy=My Voice"}, "is not a voice name"),
    ({"GATEWAY_OPENAI_VOICE_MAP": "alloy=a,alloy=b"}, "names 'alloy' twice"),
    ({"GATEWAY_OPENAI_IGNORE_INSTRUCTIONS": "maybe"}, "must be 1 or 0"),
])
def test_bad_openai_settings_stop_the_start(monkeypatch, env, message):
    """A malformed voice map or flag is a configuration error naming the variable and what is wrong."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message) as raised:
        Settings.from_env()
    assert next(iter(env)) in str(raised.value)
