"""Several models in one Triton deployment (`family_triton`: the tiny Base as the default `tts`/`talker`, the tiny
CustomVoice as `tts_custom`/`talker_custom`, the tiny VoiceDesign as `tts_design`/`talker_design`): each kind's
streamed codes and audio equal qwen-tts's, what a model cannot follow is refused, rows stay isolated, and a
cancelled request stops its own talker's stream."""
from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
import torch

from conftest import FAMILY
from reference import (FLOAT32_TOLERANCE, qwen_kwargs, reference_custom_voice, reference_generation,
                       reference_voice_design, rms)
from triton_helpers import command_inputs, scrape_metrics, stream, string_input, wait_until
from tts_contract import commands

TEXT = "Streaming speech arrives in pieces, and the first piece should come quickly."
DESCRIPTION = "A deep, calm male voice with a slight rasp."
CODES = ("codes", "context_codes", "stream_id", "final")
GREEDY = {"greedy": True, "max_new_tokens": 30}
SEEDED = {"seed": 1234, "max_new_tokens": 30}


@pytest.fixture
async def family(family_triton):
    """A gRPC client of the three-model tritonserver."""
    import tritonclient.grpc.aio as grpcclient

    client = grpcclient.InferenceServerClient(family_triton.grpc_url)
    yield client
    await client.close()


def instruct_input(instruct):
    return [string_input("instruct", instruct)] if instruct is not None else []


async def status(client, talker: str) -> dict:
    result = await stream(client, talker, outputs=("status",), extra_inputs=command_inputs(commands.Status()),
                          timeout=30)
    assert result.error is None, result.error
    return json.loads(result.arrays("status")[0][0])


def codes_of(result) -> torch.Tensor:
    assert result.error is None, result.error
    return torch.from_numpy(np.concatenate(result.arrays("codes"))).long()


def series(metrics: dict, name: str, **labels) -> float:
    """The value of ``name``'s one series that carries exactly ``labels`` (0 when absent)."""
    wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    for key, value in metrics.items():
        metric, _, rest = key.partition("{")
        if metric == name and ",".join(sorted(rest.rstrip("}").split(","))) == wanted:
            return value
    return 0.0


def assert_audio_equal(streamed: np.ndarray, expected: np.ndarray) -> None:
    assert streamed.shape == expected.shape
    level = rms(expected)
    assert level > 0.05
    assert np.abs(streamed - expected).max() <= FLOAT32_TOLERANCE * level


# -- each talker is its own model --------------------------------------------------------------------------

async def test_each_talker_status_names_its_served_model(family):
    """Each talker's status names its served model: name, kind, size, speakers and the Triton models serving it."""
    models = {talker: (await status(family, talker))["model"]
              for talker in ("talker", "talker_custom", "talker_design")}
    assert [(m["name"], m["kind"], m["ttsModel"], m["talkerModel"]) for m in models.values()] == [
        (FAMILY[0], "base", "tts", "talker"), (FAMILY[1], "custom_voice", "tts_custom", "talker_custom"),
        (FAMILY[2], "voice_design", "tts_design", "talker_design")]
    assert [s["name"] for s in models["talker_custom"]["speakers"]] == ["aria", "kai", "mei"]
    assert models["talker_custom"]["size"] == "1.7B" and models["talker_custom"]["takesInstruct"] is True
    assert models["talker"]["speakers"] == [] and models["talker"]["takesInstruct"] is False


async def test_the_default_model_keeps_the_plain_names_and_clones(family, loaded, voices_dir):
    """The first configured model is served as `talker`, and its codes still equal generate_voice_clone's."""
    folder = voices_dir / "default"
    prompt = loaded.tts.create_voice_clone_prompt(ref_audio=str(folder / "reference.wav"),
                                                  ref_text=(folder / "transcript.txt").read_text().strip())[0]
    result = await stream(family, "talker", TEXT, voice="default", language="English", parameters=GREEDY,
                          outputs=CODES)
    expected, _ = reference_generation(loaded.tts, prompt, TEXT, **qwen_kwargs(GREEDY))
    assert torch.equal(codes_of(result), expected)


# -- CustomVoice and VoiceDesign equal qwen-tts ------------------------------------------------------------

CUSTOM_CASES = {
    "greedy speaker": ("kai", None, GREEDY),
    "seeded speaker with instruction": ("aria", "Speak very happily, a little fast.", SEEDED),
}


@pytest.mark.parametrize("case", list(CUSTOM_CASES))
async def test_custom_voice_talker_codes_equal_generate_custom_voice(family, custom_voice, case):
    """A named speaker (with an instruction) through talker_custom gives generate_custom_voice's codes."""
    speaker, instruct, params = CUSTOM_CASES[case]
    result = await stream(family, "talker_custom", TEXT, voice=speaker, language="English", parameters=params,
                          outputs=CODES, extra_inputs=instruct_input(instruct))
    expected, _ = reference_custom_voice(custom_voice.tts, TEXT, speaker, instruct, seed=params.get("seed"),
                                         **qwen_kwargs(params))
    got = codes_of(result)
    assert len(got) == 29 and torch.equal(got, expected)
    assert all(c.shape == (0, 16) for c in result.arrays("context_codes"))  # no reference clip to prime with


async def test_tts_custom_audio_equals_generate_custom_voice(family, custom_voice):
    """tts_custom's streamed audio equals generate_custom_voice's one-shot audio (seeded, with an instruction)."""
    speaker, instruct, params = CUSTOM_CASES["seeded speaker with instruction"]
    result = await stream(family, "tts_custom", TEXT, voice=speaker, language="English", parameters=params,
                          extra_inputs=instruct_input(instruct))
    assert result.error is None, result.error
    _, expected = reference_custom_voice(custom_voice.tts, TEXT, speaker, instruct, seed=params["seed"],
                                         **qwen_kwargs(params))
    assert_audio_equal(result.audio(), expected)


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
async def test_voice_design_talker_codes_equal_generate_voice_design(family, voice_design, params):
    """A voice described in words through talker_design gives generate_voice_design's codes."""
    result = await stream(family, "talker_design", TEXT, language="English", parameters=params, outputs=CODES,
                          extra_inputs=instruct_input(DESCRIPTION))
    expected, _ = reference_voice_design(voice_design.tts, TEXT, DESCRIPTION, seed=params.get("seed"),
                                         **qwen_kwargs(params))
    got = codes_of(result)
    assert len(got) == 29 and torch.equal(got, expected)


async def test_tts_design_audio_equals_generate_voice_design(family, voice_design):
    """tts_design's streamed audio equals generate_voice_design's one-shot audio (seeded)."""
    result = await stream(family, "tts_design", TEXT, language="English", parameters=SEEDED,
                          extra_inputs=instruct_input(DESCRIPTION))
    assert result.error is None, result.error
    _, expected = reference_voice_design(voice_design.tts, TEXT, DESCRIPTION, seed=SEEDED["seed"],
                                         **qwen_kwargs(SEEDED))
    assert_audio_equal(result.audio(), expected)


# -- what a model cannot follow is refused -----------------------------------------------------------------

@pytest.mark.parametrize("model, voice, instruct, code, words", [
    ("tts", None, "Very happy.", "INVALID_CONFIG", "is a Base model"),
    ("tts_custom", "bob", None, "VOICE_NOT_FOUND", "has no speaker 'bob'; its speakers: aria, kai, mei"),
    ("tts_design", "aria", DESCRIPTION, "INVALID_CONFIG", "takes no voice"),
], ids=["instruct to base", "unknown speaker", "voice to voice design"])
async def test_what_a_model_cannot_follow_is_refused(family, model, voice, instruct, code, words):
    """An instruction to the Base model, an unknown speaker and a voice for the VoiceDesign model are each refused
    with their code and the reason; the model serves on."""
    bad = await stream(family, model, "Hello there.", voice=voice, extra_inputs=instruct_input(instruct),
                       parameters={"max_new_tokens": 6})
    assert bad.error is not None and f"[{code}]" in bad.error and words in bad.error, bad.error
    good = await stream(family, model, "Still here.", parameters={"max_new_tokens": 6, "greedy": True})
    assert good.error is None and good.audio().size == 5 * 1920


# -- rows are isolated -------------------------------------------------------------------------------------

MIXED = [("aria", None), ("kai", "Very happy."), ("mei", None), ("kai", "Sad and slow.")]


async def test_concurrent_custom_voice_requests_each_equal_their_own_reference(family, family_triton, custom_voice):
    """Four talker_custom requests at once with different speakers and instructions step together, and each
    equals its own generate_custom_voice reference (which differ pairwise: a row that saw another's conditioning
    would fail)."""
    params = [{"seed": 100 + i, "max_new_tokens": 24} for i in range(len(MIXED))]
    expected = [reference_custom_voice(custom_voice.tts, TEXT, speaker, instruct, seed=p["seed"], **qwen_kwargs(p))[0]
                for (speaker, instruct), p in zip(MIXED, params)]
    assert all(not torch.equal(a, b) for i, a in enumerate(expected) for b in expected[i + 1:])
    before = scrape_metrics(family_triton.metrics_url)
    results = await asyncio.gather(*(stream(family, "talker_custom", TEXT, voice=speaker, language="English",
                                            parameters=p, outputs=CODES, extra_inputs=instruct_input(instruct))
                                     for (speaker, instruct), p in zip(MIXED, params)))
    for index, (result, want) in enumerate(zip(results, expected)):
        assert torch.equal(codes_of(result), want), f"row {index} ({MIXED[index]})"
    await asyncio.sleep(1.0)  # the talkers publish their counters a few times a second
    after = scrape_metrics(family_triton.metrics_url)
    steps, rows = (series(after, name, model="talker_custom") - series(before, name, model="talker_custom")
                   for name in ("qwen_tts_talker_steps_total", "qwen_tts_talker_step_streams_total"))
    assert rows / steps > 1.5, "the four streams should have stepped together"


# -- cancellation reaches the right talker -----------------------------------------------------------------

async def test_cancelling_a_tts_custom_request_stops_its_talker_stream(family, family_triton):
    """Cancelling a tts_custom stream stops talker_custom's stream within a chunk or two (the decoder's `cancel`
    command reaches the talker that runs it) and frees the decoder state."""
    before = scrape_metrics(family_triton.metrics_url)
    result = await stream(family, "tts_custom", TEXT, voice="kai", parameters={"max_new_tokens": 4000, "greedy": True},
                          stop_after=2)
    assert len(result.responses) == 2

    def cancelled():
        now = scrape_metrics(family_triton.metrics_url)
        return series(now, "qwen_tts_talker_streams_total", model="talker_custom", outcome="cancelled") > \
            series(before, "qwen_tts_talker_streams_total", model="talker_custom", outcome="cancelled") and \
            series(now, "qwen_tts_decoder_streams_freed_total", reason="cancelled") > \
            series(before, "qwen_tts_decoder_streams_freed_total", reason="cancelled")

    assert await wait_until(cancelled, timeout=20)
    assert (await status(family, "talker_custom"))["active"] == 0
    after = scrape_metrics(family_triton.metrics_url)
    generated = series(after, "qwen_tts_talker_frames_total", model="talker_custom") - \
        series(before, "qwen_tts_talker_frames_total", model="talker_custom")
    assert generated < 120, f"generation went on for {generated} frames after the cancel"


# -- metrics -----------------------------------------------------------------------------------------------

async def test_each_talker_publishes_its_own_gauges(family, family_triton):
    """While talker_custom runs a stream, its active-streams gauge (labelled model="talker_custom") says 1 and the
    default talker's (unlabelled, as in a one-model deployment) says 0: the talkers' gauges never overwrite each
    other."""
    task = asyncio.create_task(stream(family, "tts_custom", TEXT, voice="kai", timeout=60,
                                      parameters={"max_new_tokens": 4000, "min_new_tokens": 4000, "greedy": True}))
    try:
        def seen():
            now = scrape_metrics(family_triton.metrics_url)
            return series(now, "qwen_tts_talker_active_streams", model="talker_custom") == 1 and \
                series(now, "qwen_tts_talker_active_streams") == 0
        assert await wait_until(seen, timeout=15)
        await asyncio.sleep(0.6)  # a few publishing rounds of every talker later, still so
        assert seen()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert await wait_until(lambda: series(scrape_metrics(family_triton.metrics_url), "qwen_tts_talker_active_streams",
                                           model="talker_custom") == 0, timeout=20)
