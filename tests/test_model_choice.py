"""The gateway picks a served model by name: a real gateway in front of `family_triton` (three tiny models: `base`,
the default, served as Triton's `tts`; `custom`, CustomVoice with speakers aria, kai and mei, taking instructions;
`design`, VoiceDesign), reached by the official `openai` SDK and real WebSocket clients. What a request gets is
checked against a direct Triton request to that model's ensemble with the same seed; plus the pure logic of
choosing a model (aliases, the default, what is served) against endpoints set by hand."""
from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import httpx
import numpy as np
import openai
import pytest
import tritonclient.grpc.aio as grpcclient

from gateway.audio import AudioConverter
from gateway.config import Settings
from gateway.endpoints import Endpoint, Endpoints
from gateway.engine_stream import SynthesisFailed, encode_voice
from gateway.models import Catalog, ModelUnavailable
from gateway_helpers import collect, open_session, receive_json, send, serve_gateway
from triton_helpers import scrape_metrics, stream, string_input, wait_until
from tts_contract.errors import EngineCode
from tts_contract.models import ServedModel, Speaker

SEED = 1234
SENTENCE = "Hello from one of the family."
DESCRIPTION = "A bright, quick young voice."
INSTRUCTIONS = "Speak very happily."
# what the gateway sends every stream (FAST's frame cap, seeded instead of greedy: instructions must show)
PARAMETERS = {"seed": SEED, "frames_per_char": 1.0, "frames_base": 4}
ENSEMBLES = {"base": "tts", "custom": "tts_custom", "design": "tts_design"}
TALKERS = {"base": "talker", "custom": "talker_custom", "design": "talker_design"}


@pytest.fixture(scope="module")
def gateway(family_triton, voices_dir, tmp_path_factory):
    """A gateway in front of the three models, `tts-1-hd` aliased to `custom`."""
    yield from serve_gateway(family_triton.grpc_url, voices_dir, tmp_path_factory.mktemp("family-gw"),
                             GATEWAY_SYNTHESIS_PARAMETERS=json.dumps({"seed": SEED}),
                             GATEWAY_MODEL_ALIASES="tts-1-hd=custom")


@pytest.fixture
def sdk(gateway):
    with openai.OpenAI(base_url=gateway.http + "/v1", api_key="x", max_retries=0, timeout=60) as client:
        yield client


async def direct_pcm(family_triton, model: str, text: str = SENTENCE, voice=None, language="Auto",
                     instruct=None) -> bytes:
    """PCM16 of one request straight to ``model``'s ensemble, with the parameters the gateway sends."""
    client = grpcclient.InferenceServerClient(family_triton.grpc_url)
    try:
        result = await stream(client, ENSEMBLES[model], text, voice=voice, language=language, parameters=PARAMETERS,
                              extra_inputs=[string_input("instruct", instruct)] if instruct else [], timeout=60)
    finally:
        await client.close()
    assert result.error is None, result.error
    return AudioConverter(24000, "pcm16").encode(result.audio())


def assert_same_pcm(ours: bytes, theirs: bytes) -> None:
    """Equal PCM16, give or take one step (a batched decoder forward can move a float's last bit)."""
    a, b = np.frombuffer(ours, "<i2").astype(int), np.frombuffer(theirs, "<i2").astype(int)
    assert len(a) > 12000 and len(a) == len(b) and np.abs(a - b).max() <= 1


def openai_pcm(sdk, model: str, voice: str = "alloy", **params) -> bytes:
    return sdk.audio.speech.create(model=model, voice=voice, input=SENTENCE, response_format="pcm", **params).content


def finished_streams(family_triton, talker: str) -> float:
    """Streams ``talker`` ended by generating them to their end (end of speech, or the frame cap)."""
    metrics = scrape_metrics(family_triton.metrics_url)
    return sum(value for key, value in metrics.items() if key.startswith("qwen_tts_talker_streams_total{")
               and f'model="{talker}"' in key and ('outcome="eos"' in key or 'outcome="max_new_tokens"' in key))


async def start(ws, **fields) -> dict:
    """``ready``, then ``start`` with ``fields``: the first message answering it."""
    assert (await receive_json(ws))["type"] == "ready"
    await send(ws, type="start", **fields)
    return await receive_json(ws)


# -- the OpenAI endpoint -----------------------------------------------------------------------------------

def test_models_lists_each_served_model_then_the_aliases(sdk):
    """`models.list()` names base (the default), custom and design with their kind, size, speakers and whether
    they take instructions, then the aliases, each naming its model."""
    listed = {model.id: model.model_dump() for model in sdk.models.list()}
    assert list(listed)[:3] == ["base", "custom", "design"]
    assert [(listed[m]["kind"], listed[m]["takesInstruct"]) for m in ("base", "custom", "design")] == [
        ("base", False), ("custom_voice", True), ("voice_design", True)]
    assert listed["custom"]["speakers"] == ["aria", "kai", "mei"] and listed["custom"]["size"] == "1.7B"
    assert listed["tts-1"]["aliasOf"] == "base" and listed["qwen3-tts"]["aliasOf"] == "base"
    assert listed["tts-1-hd"]["aliasOf"] == "custom" and listed["tts-1-hd"]["kind"] == "custom_voice"


@pytest.mark.parametrize("model", ["base", "custom", "design"])
async def test_the_sdk_reaches_each_model_by_name(sdk, family_triton, model):
    """`model` picks the served model: the audio equals a request to that model's ensemble with the same seed
    (OpenAI's voice name is the default voice, the default speaker, or, for design, no voice)."""
    expected = await direct_pcm(family_triton, model, voice="default" if model == "base" else None)
    assert_same_pcm(await asyncio.to_thread(openai_pcm, sdk, model), expected)


async def test_an_alias_reaches_its_model(sdk, family_triton):
    """`tts-1-hd`, aliased to custom by GATEWAY_MODEL_ALIASES, speaks with the custom model."""
    assert_same_pcm(await asyncio.to_thread(openai_pcm, sdk, "tts-1-hd"), await direct_pcm(family_triton, "custom"))


def test_an_unknown_model_is_not_found_listing_the_served_models(sdk):
    """An unknown model is a 404 model_not_found whose message lists the served models and the aliases."""
    with pytest.raises(openai.NotFoundError) as raised:
        openai_pcm(sdk, "custom-2")
    body = raised.value.body
    assert body["code"] == "model_not_found" and body["param"] == "model"
    assert "served: base, custom, design" in body["message"] and "tts-1-hd" in body["message"]


async def test_instructions_reach_the_custom_model(sdk, family_triton):
    """`instructions` to the custom model change its audio (same seed) to what the ensemble gives with them as
    instruct."""
    plain = await asyncio.to_thread(openai_pcm, sdk, "custom")
    instructed = await asyncio.to_thread(openai_pcm, sdk, "custom", extra_body={"instructions": INSTRUCTIONS})
    assert instructed != plain
    assert_same_pcm(instructed, await direct_pcm(family_triton, "custom", instruct=INSTRUCTIONS))


def test_instructions_to_the_base_model_are_refused(sdk):
    """`instructions` to the Base model are a 400 naming `instructions`, saying it is a Base model."""
    with pytest.raises(openai.BadRequestError) as raised:
        openai_pcm(sdk, "base", voice="default", extra_body={"instructions": INSTRUCTIONS})
    assert raised.value.body["param"] == "instructions" and "is a Base model" in raised.value.body["message"]


async def test_voice_names_a_speaker_of_the_custom_model(sdk, family_triton):
    """For the custom model, `voice` names one of its speakers (any case)."""
    assert_same_pcm(await asyncio.to_thread(openai_pcm, sdk, "custom", voice="Kai"),
                    await direct_pcm(family_triton, "custom", voice="kai"))


def test_an_unknown_speaker_is_not_found_listing_the_speakers(sdk):
    """A voice the custom model has no speaker for is a 404 voice_not_found listing its speakers."""
    with pytest.raises(openai.NotFoundError) as raised:
        openai_pcm(sdk, "custom", voice="bob")
    assert raised.value.body["code"] == "voice_not_found" and "aria, kai, mei" in raised.value.body["message"]


# -- the speak protocol ------------------------------------------------------------------------------------

@pytest.mark.parametrize("model", ["base", "custom", "design"])
async def test_speak_reaches_each_model_by_name(gateway, family_triton, model):
    """`start.model` picks the served model, `started` names it, and a speak's audio equals a request to that
    model's ensemble with the same seed (design: its voice described by `instruct`)."""
    instruct = DESCRIPTION if model == "design" else None
    async with open_session(gateway.ws) as ws:
        started = await start(ws, model=model, textMode="sentences", instruct=instruct)
        assert started["type"] == "started" and started["model"] == model, started
        assert started["voice"] == {"base": "default", "custom": "aria", "design": None}[model]
        await send(ws, type="speak", text=SENTENCE)
        result = await collect(ws)
    assert result.end["cancelled"] is False, result.messages
    voice = "default" if model == "base" else None
    assert_same_pcm(bytes(result.audio), await direct_pcm(family_triton, model, voice=voice, language="English",
                                                          instruct=instruct))


async def test_start_with_an_unknown_model_is_invalid_config_listing_the_served_models(gateway):
    """A `start` naming a model not served is INVALID_CONFIG listing the served models; no `started`."""
    async with open_session(gateway.ws) as ws:
        error = await start(ws, model="nonesuch")
    assert error["type"] == "error" and error["code"] == "INVALID_CONFIG"
    assert "served: base, custom, design" in error["message"]


async def test_instruct_on_the_base_model_is_refused(gateway):
    """`instruct` with the Base model is INVALID_CONFIG saying why; no `started`."""
    async with open_session(gateway.ws) as ws:
        error = await start(ws, model="base", instruct=INSTRUCTIONS)
    assert error["type"] == "error" and error["code"] == "INVALID_CONFIG" and "is a Base model" in error["message"]


async def test_an_unknown_speaker_is_voice_not_found(gateway):
    """A voice the custom model has no speaker for is VOICE_NOT_FOUND listing its speakers; the session starts
    with the default speaker."""
    async with open_session(gateway.ws) as ws:
        error = await start(ws, model="custom", voice="bob")
        started = await receive_json(ws)
    assert error["code"] == "VOICE_NOT_FOUND" and "aria, kai, mei" in error["message"]
    assert started["type"] == "started" and started["voice"] == "aria"


async def test_appended_text_is_spoken_by_the_custom_model(gateway, family_triton):
    """Text appended as it is written is one continuous stream on the custom model's talker, with an
    instruction, to its end."""
    await asyncio.sleep(1.0)  # earlier tests' streams published (the talkers publish a few times a second)
    before = finished_streams(family_triton, "talker_custom")
    async with open_session(gateway.ws) as ws:
        started = await start(ws, model="custom", voice="mei", instruct=INSTRUCTIONS)
        assert started["textMode"] == "continuous", started  # auto: a named speaker waits for no reference clip
        for piece in ("Text arrives ", "a few words ", "at a time, ", "as an LLM writes it."):
            await send(ws, type="append", text=piece, requestId="written")
            await asyncio.sleep(0.05)
        await send(ws, type="end")
        result = await collect(ws)
    assert result.end["cancelled"] is False and result.end["requestId"] == "written", result.messages
    assert len(result.audio) > 2 * 24000  # more than a second of speech
    assert await wait_until(lambda: finished_streams(family_triton, "talker_custom") == before + 1, timeout=5)


async def test_readiness_reports_each_model(gateway):
    """/readyz lists each model with its kind and the endpoints serving it, and names the default."""
    async with httpx.AsyncClient(base_url=gateway.http, timeout=10) as http:
        body = (await http.get("/readyz")).json()
    assert body["defaultModel"] == "base"
    assert {name: (m["kind"], m["endpoints"]) for name, m in body["models"].items()} == {
        "base": ("base", 1), "custom": ("custom_voice", 1), "design": ("voice_design", 1)}
    (capacity,) = body["capacity"].values()
    assert set(capacity["models"]) == {"base", "custom", "design"} and capacity["models"]["custom"]["rows"] >= 1


# -- choosing a model, without servers --------------------------------------------------------------------

BASE = ServedModel("base", "base", "0.6B")
CUSTOM = ServedModel("custom", "custom_voice", "1.7B", "tts_custom", "talker_custom",
                     speakers=(Speaker("aria"), Speaker("kai")))


async def endpoints_serving(*models: ServedModel, ready=True) -> Endpoints:
    """Endpoints with one endpoint (never contacted) serving ``models``."""
    endpoints = Endpoints(("127.0.0.1:9",))
    endpoint: Endpoint = endpoints.endpoints[0]
    endpoint.ready = ready
    endpoint.models = {m.name: m for m in models}
    endpoint.loaded = frozenset(name for m in models for name in (m.tts_model, m.talker_model))
    return endpoints


async def test_openai_names_mean_the_default_model_unless_aliased():
    """tts-1 and a later gpt-4o-mini-tts snapshot mean the default model; an alias names its own."""
    endpoints = await endpoints_serving(BASE, CUSTOM)
    catalog = Catalog(endpoints, Settings(model_aliases={"tts-1-hd": "custom"}))
    try:
        assert [catalog.resolve(n).name for n in ("tts-1", "gpt-4o-mini-tts-2027-01-01", "tts-1-hd", None)] == [
            "base", "base", "custom", "base"]
    finally:
        await endpoints.close()


async def test_the_configured_default_model_is_used_when_none_is_named():
    """GATEWAY_DEFAULT_MODEL decides what a request naming no model (or OpenAI's names) gets."""
    endpoints = await endpoints_serving(BASE, CUSTOM)
    catalog = Catalog(endpoints, Settings(default_model="custom"))
    try:
        assert catalog.resolve(None).name == "custom" and catalog.resolve("tts-1").name == "custom"
        assert list(catalog.served()) == ["custom", "base"]
    finally:
        await endpoints.close()


async def test_a_known_model_that_is_not_ready_is_loading_not_unknown():
    """A model an endpoint described but does not serve now (a pod restarting) is `loading`, not unknown."""
    endpoints = await endpoints_serving(BASE, CUSTOM)
    endpoints.endpoints[0].loaded = frozenset({"tts", "talker"})
    catalog = Catalog(endpoints, Settings())
    try:
        with pytest.raises(ModelUnavailable) as raised:
            catalog.resolve("custom")
        assert raised.value.loading
        with pytest.raises(ModelUnavailable) as raised:
            catalog.resolve("other")
        assert not raised.value.loading and "served: base" in raised.value.message
    finally:
        await endpoints.close()


async def test_choose_picks_only_endpoints_serving_the_model():
    """Routing for a model skips a usable endpoint that does not serve it, whatever its headroom."""
    endpoints = Endpoints(("127.0.0.1:9", "127.0.0.1:10"))
    only_base, both = endpoints.endpoints
    for endpoint, models in ((only_base, (BASE,)), (both, (BASE, CUSTOM))):
        endpoint.ready = True
        endpoint.models = {m.name: m for m in models}
        endpoint.loaded = frozenset(name for m in models for name in (m.tts_model, m.talker_model))
    only_base.talkers = {"talker": {"headroom": 10}}
    both.talkers = {"talker": {"headroom": 1}, "talker_custom": {"headroom": 1}}
    try:
        assert {endpoints.choose(model="custom") for _ in range(4)} == {both}
        assert endpoints.choose(model="base") is only_base
    finally:
        await endpoints.close()


async def test_a_voice_upload_without_a_voice_encoder_says_why():
    """With no voice encoder served (no Base model), a voice encode fails at once saying so, not as a
    transport failure."""
    endpoints = await endpoints_serving(CUSTOM)
    try:
        with pytest.raises(SynthesisFailed) as raised:
            await encode_voice(endpoints, np.zeros(24000, np.float32), 24000, None)
        assert raised.value.code == EngineCode.MODEL_LOADING and not raised.value.transport
        assert "no voice encoder" in raised.value.message and "custom" in raised.value.message
    finally:
        await endpoints.close()


class FakeTriton:
    """A Triton client whose model repository index the test sets (server ready; every talker silent)."""

    def __init__(self, models: dict):
        self.models = models  # Triton model name -> state

    async def is_server_ready(self):
        return True

    async def get_model_repository_index(self):
        return SimpleNamespace(models=[SimpleNamespace(name=n, state=s) for n, s in self.models.items()])

    async def close(self):
        pass


@pytest.mark.parametrize("repository, ready", [
    ({"tts_custom": "READY", "talker_custom": "READY", "codec_decoder": "READY"}, True),
    ({"tts": "READY", "talker": "READY", "codec_decoder": "READY", "voice_encoder": "UNAVAILABLE"}, False),
    ({"tts": "UNAVAILABLE", "talker": "READY", "codec_decoder": "READY", "voice_encoder": "READY"}, False),
], ids=["no voice encoder in the repository", "its voice encoder not loaded", "no tts ensemble ready"])
async def test_an_endpoint_is_ready_with_a_tts_ensemble_and_its_voice_encoder_if_it_has_one(
        monkeypatch, repository, ready):
    """An endpoint is ready with at least one `tts` ensemble ready and the voice encoder where its repository has
    one (a deployment with no Base model has none)."""
    endpoint = Endpoint("127.0.0.1:9")
    await endpoint.client.close()
    endpoint.client = FakeTriton(repository)

    async def silent(talker):  # (the talkers' status is not what this checks)
        pass

    monkeypatch.setattr(endpoint, "_refresh_status", silent)
    try:
        assert await endpoint.check_ready() is ready
    finally:
        await endpoint.close()


@pytest.mark.parametrize("value, words", [("tts-1", "is not alias=model"), ("tts-1=", "is not alias=model"),
                                          ("TTS=base", "invalid model name"), ("a=x,a=y", "twice")])
def test_bad_model_aliases_stop_the_start(monkeypatch, value, words):
    """A malformed GATEWAY_MODEL_ALIASES is a configuration error naming what is wrong."""
    monkeypatch.setenv("GATEWAY_MODEL_ALIASES", value)
    with pytest.raises(ValueError, match=words):
        Settings.from_env()


async def test_a_talker_restarted_with_another_checkpoint_replaces_the_model_it_served(monkeypatch):
    """When the talker behind a name comes back describing another model, the endpoint forgets the old one: no
    request for the old name reaches the new checkpoint."""
    endpoint = Endpoint("127.0.0.1:9")
    await endpoint.client.close()
    answers = iter([BASE, ServedModel("qwen3-tts-1.7b-base", "base", "1.7B")])

    async def command(_command, outputs=(), talker=None, timeout_s=2.0):
        body = {"rows": 4, "headroom": 4, "model": next(answers).to_json()}
        return SimpleNamespace(as_numpy=lambda name: [json.dumps(body).encode()])

    monkeypatch.setattr(endpoint, "command", command)
    await endpoint._refresh_status("talker")
    assert set(endpoint.models) == {"base"}
    await endpoint._refresh_status("talker")
    assert set(endpoint.models) == {"qwen3-tts-1.7b-base"}


async def test_a_voice_design_utterance_is_one_stream(sdk, family_triton):
    """A VoiceDesign model designs a voice per stream: an OpenAI input of several sentences goes to it as one stream
    (each sentence its own stream would change the voice mid-answer), and the answer names the model that spoke."""
    await asyncio.sleep(0.6)  # the talker's counters of earlier tests published (every 0.25 s)
    before = finished_streams(family_triton, "talker_design")
    answer = sdk.audio.speech.with_raw_response.create(
        model="design", voice="alloy", response_format="pcm", instructions=DESCRIPTION,
        input="One sentence here. Then another one. And a third, to be sure.")
    assert answer.headers["x-model"] == "design" and len(answer.content) > 24000
    assert await wait_until(lambda: finished_streams(family_triton, "talker_design") >= before + 1, timeout=10)
    await asyncio.sleep(0.6)
    assert finished_streams(family_triton, "talker_design") == before + 1
