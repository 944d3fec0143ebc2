"""The engine on its own: prompts, cancellation, validation (fidelity proofs: test_fidelity.py)."""
from __future__ import annotations

import time

import pytest
import torch

from conftest import generate
from tts_engine.errors import Cancelled, InvalidRequest, InvalidText, ModelDirError, UnsupportedLanguage
from tts_engine.loading import check_model_dir
from tts_engine.voices.prompts import VoicePrompt
from tts_engine.generation.sampling import SamplingParams
from tts_engine.generation.talker import BatchedTalker
from tts_engine.generation.prompt import SynthesisRequest, build_talker_inputs
from tts_engine.serving.engine import Engine
from tts_engine.serving.pacing import DeadlinePacing, FixedChunks

TEXT = "The quick brown fox jumps over the lazy dog."


@pytest.mark.parametrize("mode", ["icl", "xvector"])
def test_prompt_roundtrip_gives_identical_greedy_output(loaded, engine, icl_prompt, xvector_prompt, mode, tmp_path):
    """A prompt saved to safetensors and loaded back yields identical greedy codes."""
    prompt = icl_prompt if mode == "icl" else xvector_prompt
    path = tmp_path / "prompt.safetensors"
    prompt.save(path, {"model": "tiny"})
    restored, meta = VoicePrompt.load(path)
    assert meta["model"] == "tiny" and restored.ref_text == prompt.ref_text
    before = generate(loaded, engine, prompt, TEXT, greedy=True, max_new_tokens=12).codes
    after = generate(loaded, engine, restored, TEXT, greedy=True, max_new_tokens=12).codes
    assert torch.equal(before, after)


def test_cancellation_stops_generation_between_steps(loaded, xvector_prompt):
    """A cancel that arrives during a step stops the stream before its next step: it ends Cancelled with the
    frames it had, and every one of them was sent."""
    from tts_engine.serving.outbox import CallbackSink

    talker = BatchedTalker(loaded.tts, rows=2, max_tokens=1024)
    engine = Engine(talker)
    received, ended = [], []
    stream_id = engine.new_id()
    step = talker.step

    def step_then_cancel(streams=None):
        results = step(streams)
        if results and results[0][0].frames == 3:
            engine.cancel(stream_id)
        return results

    talker.step = step_then_cancel
    request = SynthesisRequest(TEXT, xvector_prompt, "English", SamplingParams(greedy=True, max_new_tokens=500))
    try:
        engine.submit(stream_id, request, CallbackSink(lambda chunk, index, last: received.append(chunk),
                                                       ended.append), policy=FixedChunks((1,)))
        deadline = time.monotonic() + 30
        while not ended and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        engine.stop()
    assert isinstance(ended[0], Cancelled) and "after 3 frames" in str(ended[0]) and len(received) == 3


def test_reference_codes_equal_the_prompts(loaded):
    """The codec decoder's own encoding of a reference clip equals the prompt's codes (so priming hits)."""
    import soundfile as sf

    from conftest import ROOT
    from tts_engine.voices.prompts import build_prompt, reference_codes

    audio, sample_rate = sf.read(ROOT / "voices" / "default" / "reference.wav", dtype="float32")
    prompt = build_prompt(loaded.tts, audio, sample_rate, "A transcript.")
    assert torch.equal(reference_codes(loaded.tts.model.speech_tokenizer, audio, sample_rate), prompt.ref_code)


def test_empty_text_is_refused(loaded, xvector_prompt):
    """Whitespace-only text raises InvalidText before any model work."""
    with pytest.raises(InvalidText):
        build_talker_inputs(loaded.tts, SynthesisRequest("   ", xvector_prompt, "English"))


def test_unknown_language_is_refused_with_the_supported_list(loaded, xvector_prompt):
    """An unknown language raises an error that lists the supported ones."""
    with pytest.raises(UnsupportedLanguage, match="English"):
        build_talker_inputs(loaded.tts, SynthesisRequest(TEXT, xvector_prompt, "Klingon"))


@pytest.mark.parametrize("values, message", [
    ({"temperature": 0}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"max_new_tokens": 10**9}, "max_new_tokens"),
    ({"top_k": "many"}, "wrong type"),
    ({"bogus": 1}, "unknown parameter"),
])
def test_absurd_sampling_parameters_are_refused(values, message):
    """Out-of-range, mistyped or unknown sampling parameters raise InvalidRequest naming the problem."""
    with pytest.raises(InvalidRequest, match=message):
        SamplingParams.from_mapping(values)


def test_sampling_parameters_accept_strings_from_triton():
    """Triton request parameters may arrive as strings; valid ones are converted."""
    params = SamplingParams.from_mapping({"temperature": "0.5", "greedy": "true", "seed": 7})
    assert params.temperature == 0.5 and params.greedy and params.seed == 7


def test_missing_model_dir_names_the_problem(tmp_path):
    """A missing or incomplete model directory raises ModelDirError saying what is missing."""
    with pytest.raises(ModelDirError, match="does not exist"):
        check_model_dir(tmp_path / "nope")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelDirError, match="speech_tokenizer/model.safetensors"):
        check_model_dir(tmp_path)


def test_chunk_policies_reject_nonsense():
    """A policy with impossible chunk sizes or margins is refused."""
    with pytest.raises(ValueError):
        FixedChunks((0,))
    with pytest.raises(ValueError):
        DeadlinePacing(first_chunk_frames=4, max_chunk_frames=2)
    with pytest.raises(ValueError):
        DeadlinePacing(margin_s=-0.1)


