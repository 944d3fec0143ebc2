"""The engine on its own: exact parity with qwen-tts, exact streaming decode, prompts, validation."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tts_engine.decoder import StreamingDecoder, prime
from tts_engine.errors import Cancelled, InvalidRequest, InvalidText, ModelDirError, UnsupportedLanguage
from tts_engine.model import check_model_dir
from tts_engine.prompts import VoicePrompt
from tts_engine.sampling import SamplingParams
from tts_engine.talker import ChunkSchedule, SynthesisRequest, TalkerStream, generate_codes, iter_chunks

TEXT = "The quick brown fox jumps over the lazy dog."


def reference_codes(tts, prompt: VoicePrompt, text: str, **generate_kwargs) -> tuple[torch.Tensor, np.ndarray]:
    """Codes and audio from qwen-tts's public generate_voice_clone (codes captured on their way out)."""
    captured = {}
    inner = tts.model.generate

    def spy(*args, **kwargs):
        codes_list, hidden = inner(*args, **kwargs)
        captured["codes"] = codes_list[0]
        return codes_list, hidden

    tts.model.generate = spy
    try:
        wavs, _ = tts.generate_voice_clone(text=text, language="English", voice_clone_prompt=[prompt.to_item()],
                                           **generate_kwargs)
    finally:
        del tts.model.generate
    return captured["codes"], wavs[0]


@pytest.fixture(scope="module")
def decoder(loaded):
    return StreamingDecoder(loaded.tts.model.speech_tokenizer.model)


@pytest.mark.parametrize("mode", ["icl", "xvector"])
def test_greedy_codes_equal_generate_voice_clone(loaded, icl_prompt, xvector_prompt, mode):
    """Greedy codes from the engine equal qwen-tts generate_voice_clone's codes, in both prompt modes."""
    prompt = icl_prompt if mode == "icl" else xvector_prompt
    expected, _ = reference_codes(loaded.tts, prompt, TEXT, do_sample=False, subtalker_dosample=False,
                                  max_new_tokens=40)
    params = SamplingParams(greedy=True, max_new_tokens=40)
    got = generate_codes(loaded.tts, SynthesisRequest(TEXT, prompt, "English", params))
    assert got.shape == expected.shape == (39, 16)
    assert torch.equal(got, expected)


def test_seeded_sampling_equals_generate_voice_clone(loaded, icl_prompt):
    """With sampling on, the same seed gives the same codes as qwen-tts under torch.manual_seed."""
    torch.manual_seed(1234)
    expected, _ = reference_codes(loaded.tts, icl_prompt, TEXT, max_new_tokens=30, do_sample=True, top_k=50,
                                  temperature=0.9, repetition_penalty=1.05, subtalker_dosample=True)
    got = generate_codes(loaded.tts, SynthesisRequest(TEXT, icl_prompt, "English",
                                                      SamplingParams(seed=1234, max_new_tokens=30)))
    assert torch.equal(got, expected)


def test_streamed_audio_equals_generate_voice_clone_audio(loaded, xvector_prompt, decoder):
    """Streaming the engine's codes through the stateful decoder reproduces qwen-tts's waveform."""
    _, expected_audio = reference_codes(loaded.tts, xvector_prompt, TEXT, do_sample=False,
                                        subtalker_dosample=False, max_new_tokens=40)
    stream = TalkerStream(loaded.tts, SynthesisRequest(TEXT, xvector_prompt, "English",
                                                       SamplingParams(greedy=True, max_new_tokens=40)))
    state = decoder.new_state()
    audio = np.concatenate([decoder.decode(state, chunk) for chunk in iter_chunks(stream, ChunkSchedule((1, 3)))])
    assert audio.shape == expected_audio.shape
    assert np.abs(audio - expected_audio).max() <= 1e-4
    assert np.abs(expected_audio).max() > 1e-3, "the tiny decoder must not output silence"


@pytest.mark.parametrize("schedule", [(1,), (2, 4, 8, 16), (7,), (64,), (150, 50)])
def test_streamed_decode_equals_one_shot(decoder, schedule):
    """Chunked decoding with per-stream state equals one decode of all frames, for any chunk schedule."""
    codes = torch.randint(0, 2048, (200, 16), generator=torch.Generator().manual_seed(0))
    expected = decoder.decode_full(codes)
    assert np.abs(expected).max() > 1e-3
    state, pieces, start = decoder.new_state(), [], 0
    for index in range(len(codes)):
        size = ChunkSchedule(schedule).size(index)
        pieces.append(decoder.decode(state, codes[start:start + size]))
        start += size
        if start >= len(codes):
            break
    streamed = np.concatenate(pieces)
    assert streamed.shape == expected.shape == (200 * decoder.samples_per_frame,)
    assert np.abs(streamed - expected).max() <= 1e-4


def test_upstream_short_context_decode_is_not_exact(decoder):
    """The 25-frame-context chunked decode differs from one-shot: the reason the stateful decoder exists."""
    codes = torch.randint(0, 2048, (120, 16), generator=torch.Generator().manual_seed(3))
    expected = decoder.decode_full(codes)
    with torch.inference_mode():
        approx = decoder.decoder.chunked_decode(codes.T.unsqueeze(0), chunk_size=8, left_context_size=25)
    assert np.abs(approx[0, 0].numpy() - expected).max() > 1e-3


def test_primed_state_continues_after_reference_codes(decoder, icl_prompt):
    """A state primed with the voice's reference codes decodes new frames as the tail of one long decode."""
    new = torch.randint(0, 2048, (30, 16), generator=torch.Generator().manual_seed(5))
    context = icl_prompt.ref_code
    expected = decoder.decode_full(torch.cat([context, new]))[len(context) * decoder.samples_per_frame:]
    state = prime(decoder, context)
    streamed = np.concatenate([decoder.decode(state, new[:4]), decoder.decode(state.clone(), new[4:])])
    assert np.abs(streamed - expected).max() <= 1e-4


@pytest.mark.parametrize("mode", ["icl", "xvector"])
def test_prompt_roundtrip_gives_identical_greedy_output(loaded, icl_prompt, xvector_prompt, mode, tmp_path):
    """A prompt saved to safetensors and loaded back yields identical greedy codes."""
    prompt = icl_prompt if mode == "icl" else xvector_prompt
    path = tmp_path / "prompt.safetensors"
    prompt.save(path, {"model": "tiny"})
    restored, meta = VoicePrompt.load(path)
    assert meta["model"] == "tiny" and restored.ref_text == prompt.ref_text
    params = SamplingParams(greedy=True, max_new_tokens=12)
    before = generate_codes(loaded.tts, SynthesisRequest(TEXT, prompt, "English", params))
    after = generate_codes(loaded.tts, SynthesisRequest(TEXT, restored, "English", params))
    assert torch.equal(before, after)


def test_chunks_follow_the_schedule(loaded, xvector_prompt):
    """Chunks come out with the scheduled sizes; the last chunk carries the remainder."""
    stream = TalkerStream(loaded.tts, SynthesisRequest(TEXT, xvector_prompt, "English",
                                                       SamplingParams(greedy=True, max_new_tokens=21)))
    sizes = [len(chunk) for chunk in iter_chunks(stream, ChunkSchedule((2, 4, 8)))]
    assert sizes == [2, 4, 8, 6]
    assert stream.finish_reason == "max_new_tokens"


def test_cancellation_stops_generation_between_steps(loaded, xvector_prompt):
    """When the cancel check turns true, generation stops at the next step boundary."""
    stream = TalkerStream(loaded.tts, SynthesisRequest(TEXT, xvector_prompt, "English",
                                                       SamplingParams(greedy=True, max_new_tokens=500)))
    received = []
    with pytest.raises(Cancelled):
        for chunk in iter_chunks(stream, ChunkSchedule((1,)), is_cancelled=lambda: len(received) >= 3):
            received.append(chunk)
    assert stream.frames == 3 and stream.finish_reason == "cancelled"


def test_empty_text_is_refused(loaded, xvector_prompt):
    """Whitespace-only text raises InvalidText before any model work."""
    with pytest.raises(InvalidText):
        TalkerStream(loaded.tts, SynthesisRequest("   ", xvector_prompt, "English"))


def test_unknown_language_is_refused_with_the_supported_list(loaded, xvector_prompt):
    """An unknown language raises an error that lists the supported ones."""
    with pytest.raises(UnsupportedLanguage, match="English"):
        TalkerStream(loaded.tts, SynthesisRequest(TEXT, xvector_prompt, "Klingon"))


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


def test_chunk_schedule_parsing():
    """Chunk schedules parse from comma lists and reject nonsense."""
    assert ChunkSchedule.parse("2, 4,8").sizes == (2, 4, 8)
    assert ChunkSchedule.parse("2,4").size(10) == 4
    with pytest.raises(ValueError):
        ChunkSchedule.parse("0")
    with pytest.raises(ValueError):
        ChunkSchedule.parse("a,b")
