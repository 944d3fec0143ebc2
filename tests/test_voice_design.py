"""Voices for every kind, through a real gateway in front of `family_triton` (tiny `base`, the default; `custom`,
CustomVoice with speakers aria, kai and mei; `design`, VoiceDesign): the voice list names cloned voices and each
CustomVoice model's speakers, and a voice designed from words is kept as a cloned voice that speaks on the Base
model, the same voice every time."""
from __future__ import annotations


import httpx
import numpy as np
import pytest
import soundfile as sf
import tritonclient.grpc.aio as grpcclient

from gateway_helpers import collect, open_session, receive_json, send, serve_gateway
from triton_helpers import stream, string_input

DESCRIPTION = "A warm, low voice, calm and unhurried."
SAMPLE = "Hello, it is nice to meet you. This is how I sound when I read aloud."  # 69 characters: 123 tokens
SEED = 77


@pytest.fixture(scope="module")
def gateway(family_triton, voices_dir, tmp_path_factory):
    yield from serve_gateway(family_triton.grpc_url, voices_dir, tmp_path_factory.mktemp("design-gw"))


@pytest.fixture
def designed(gateway, voices_dir):
    """A voice designed by the `design` model (removed after the test)."""
    answer = httpx.post(f"{gateway.http}/api/v1/voices/design", timeout=120, json={
        "description": DESCRIPTION, "text": SAMPLE, "language": "English", "name": "Calm narrator", "seed": SEED})
    assert answer.status_code == 201, answer.text
    voice = answer.json()
    yield voice
    httpx.delete(f"{gateway.http}/api/v1/voices/{voice['id']}", timeout=10)


def _design(gateway, **body) -> httpx.Response:
    return httpx.post(f"{gateway.http}/api/v1/voices/design", json=body, timeout=60)


async def _direct(family_triton, model: str, text: str, **inputs) -> np.ndarray:
    """The audio of one request straight to ``model``'s ensemble (greedy, as the gateway's test settings)."""
    client = grpcclient.InferenceServerClient(family_triton.grpc_url)
    try:
        extra = [string_input("instruct", inputs.pop("instruct"))] if "instruct" in inputs else []
        result = await stream(client, model, text, parameters=inputs.pop("parameters"), extra_inputs=extra,
                              timeout=60, **inputs)
    finally:
        await client.close()
    assert result.error is None, result.error
    return result.audio()


async def test_a_designed_voice_is_the_voice_design_models_clip_kept_as_a_cloned_voice(gateway, family_triton,
                                                                                       designed, voices_dir):
    """The kept clip is what the VoiceDesign model says for the description, text and seed, with its transcript
    and a metadata entry naming how it was designed."""
    assert designed["kind"] == "cloned" and designed["name"] == "Calm narrator"
    assert designed["designed"] == {"model": "design", "description": DESCRIPTION, "text": SAMPLE, "seed": SEED}
    folder = voices_dir / designed["id"]
    clip, rate = sf.read(folder / "reference.wav", dtype="float32")
    expected = await _direct(family_triton, "tts_design", SAMPLE, language="English", instruct=DESCRIPTION,
                             parameters={"greedy": True, "seed": SEED, "max_new_tokens": 123})
    assert rate == 24000 and len(clip) == len(expected) > 3 * 24000
    assert np.abs(clip - expected).max() < 1.5 / 32768  # kept as 16-bit PCM
    assert (folder / "transcript.txt").read_text().strip() == SAMPLE


async def test_a_designed_voice_is_listed_and_speaks_on_the_base_model(gateway, family_triton, designed):
    """The list offers the designed voice to the Base model; a session speaking with it on `base` gets the Base
    model's audio for that voice, the same as a direct request naming it."""
    listed = {v["id"]: v for v in httpx.get(f"{gateway.http}/api/v1/voices", timeout=10).json()["voices"]}
    assert listed[designed["id"]]["models"] == ["base"]
    async with open_session(gateway.ws) as ws:
        assert (await receive_json(ws))["type"] == "ready"
        await send(ws, type="start", model="base", voice=designed["id"], encoding="pcm32f")
        started = await receive_json(ws)
        assert (started["model"], started["voice"]) == ("base", designed["id"])
        await send(ws, type="speak", text="The same voice, every time.", requestId="kept")
        utterance = await collect(ws)
    assert utterance.end["type"] == "complete"
    got = np.frombuffer(utterance.audio, dtype="<f4")
    expected = await _direct(family_triton, "tts", "The same voice, every time.", voice=designed["id"],
                             language="English",
                             parameters={"greedy": True, "frames_per_char": 1.0, "frames_base": 4})
    assert len(got) == len(expected) and np.abs(got - expected).max() < 1e-4


def test_the_voice_list_names_each_custom_voice_models_speakers(gateway):
    """Each named speaker is listed with its kind and the served model it belongs to; cloned voices name the Base
    models that can use them."""
    voices = httpx.get(f"{gateway.http}/api/v1/voices", timeout=10).json()["voices"]
    speakers = {v["id"]: v for v in voices if v["kind"] == "speaker"}
    assert set(speakers) == {"aria", "kai", "mei"}
    assert all(v["model"] == "custom" and "English" in v["languages"] for v in speakers.values())
    assert speakers["mei"]["dialect"] == "sichuan_dialect" and speakers["aria"]["isDefault"]
    cloned = [v for v in voices if v["kind"] == "cloned"]
    assert cloned and all(v["models"] == ["base"] for v in cloned)


@pytest.mark.parametrize("body, words", [
    ({"text": SAMPLE}, "'description' is required"),
    ({"description": DESCRIPTION}, "'text' is required"),
    ({"description": DESCRIPTION, "text": SAMPLE, "language": "Klingon"}, "unsupported language"),
    ({"description": DESCRIPTION, "text": SAMPLE, "language": 5}, "'language' must be a string"),
    ({"description": DESCRIPTION, "text": SAMPLE, "model": "base"}, "needs a VoiceDesign model"),
    ({"description": DESCRIPTION, "text": SAMPLE, "model": "nope"}, "served: base, custom, design"),
    ({"description": "x" * 501, "text": SAMPLE}, "the limit is 500"),
    ({"description": DESCRIPTION, "text": SAMPLE, "seed": -1}, "non-negative integer"),
], ids=["no description", "no text", "unknown language", "language not a string", "a base model", "an unknown model", "too long",
        "bad seed"])
def test_a_bad_design_request_is_refused_saying_why(gateway, body, words):
    """Each malformed design request gets a 400 naming what is wrong, before anything is generated."""
    answer = _design(gateway, **body)
    assert answer.status_code == 400 and words in answer.json()["error"]


def test_a_sample_too_short_for_a_voice_is_refused(gateway, voices_dir):
    """A sample that comes out under 3 s (the tiny model stops at once at '~') is refused, and nothing is kept."""
    before = sorted(p.name for p in voices_dir.iterdir())
    answer = _design(gateway, description=DESCRIPTION, text="~ Hi there.", seed=1)
    assert answer.status_code == 400 and "at least 3 s" in answer.json()["error"]
    assert sorted(p.name for p in voices_dir.iterdir()) == before


def test_without_a_voice_design_model_designing_is_refused_clearly(triton, voices_dir, tmp_path):
    """A deployment with no VoiceDesign model answers 503 naming what it serves."""
    for gateway in serve_gateway(triton.grpc_url, voices_dir, tmp_path):
        answer = _design(gateway, description=DESCRIPTION, text=SAMPLE)
        assert answer.status_code == 503 and "no VoiceDesign model is served" in answer.json()["error"]
