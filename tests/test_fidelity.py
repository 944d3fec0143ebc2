"""Fidelity proofs that can fail: the serving loop's codes equal qwen-tts's, streamed audio equals a one-shot
decode, and each stateful part of the streaming decoder, when wrong, gives an error far above the tolerance.

The tiny model is "awake" (tts_engine.tiny_model): its decoder has the parameter scales of a trained one,
so every piece of streaming state changes the audio, and its talker emits EOS where the text has '~'.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import SAMPLE_RATE, generate, synthetic_reference
from reference import EXACT_TOLERANCE, FLOAT32_TOLERANCE, float64_codec, qwen_kwargs, reference_generation, rms
from tts_engine.codec.decoder import StreamingDecoder, prime
from tts_engine.serving.pacing import FixedChunks
from tts_engine.tiny_model import EOS_MARKER

TEXT = "The quick brown fox jumps over the lazy dog."


def random_codes(frames: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 2048, (frames, 16), generator=torch.Generator().manual_seed(seed))


def stream_decode(decoder: StreamingDecoder, codes: torch.Tensor, sizes, state=None, corrupt=None) -> np.ndarray:
    """Decode ``codes`` in chunks of ``sizes`` (the last size repeats); ``corrupt(decoder, state)`` runs before
    chunk 3."""
    state = state if state is not None else decoder.new_state()
    pieces, start, index = [], 0, 0
    while start < len(codes):
        if corrupt is not None and index == 3:
            with torch.inference_mode():
                corrupt(decoder, state)
        size = sizes[min(index, len(sizes) - 1)]
        pieces.append(decoder.decode(state, codes[start:start + size]))
        start, index = start + size, index + 1
    return np.concatenate(pieces)


def warmed_up(decoder: StreamingDecoder) -> StreamingDecoder:
    """The decoder after one throw-away decode. In about 1 of 15 fresh processes the very first one-shot
    decode (upstream's forward) came out ~1e-4 x RMS away from every later one, even in float64; what
    the tests compare is the steady state, as in serving, where the model warms up at load."""
    decoder.decode_full(random_codes(8, 99))
    return decoder


@pytest.fixture(scope="module")
def decoder(loaded):
    """The streaming decoder in the serving dtype (float32)."""
    return warmed_up(StreamingDecoder(loaded.tts.model.speech_tokenizer.model))


@pytest.fixture(scope="module")
def decoder64(loaded):
    """The same decoder weights in float64: streaming must equal one-shot up to rounding alone."""
    return warmed_up(StreamingDecoder(float64_codec(loaded.tts.model.speech_tokenizer.model)))


# -- the tiny model is awake ------------------------------------------------------------------------------

def test_tiny_decoder_output_looks_like_audio(decoder):
    """Zero-mean, speech-level, changing over time, and driven by the codes (not by biases)."""
    first, second = decoder.decode_full(random_codes(100, 0)), decoder.decode_full(random_codes(100, 1))
    level = rms(first)
    assert 0.1 < level < 0.4
    assert abs(float(first.mean())) < 0.05 * level
    frame_levels = first.reshape(100, -1).std(axis=1)
    assert frame_levels.max() > 1.5 * frame_levels.min(), "the level must vary from frame to frame"
    assert rms(first - second) > 0.5 * level, "unrelated codes must give unrelated audio"


def test_no_tiny_model_part_sits_at_an_identity_like_initial_value(loaded):
    """ConvNeXt and transformer layer scales, Snake parameters and norm weights are all away from init."""
    decoder = loaded.tts.model.speech_tokenizer.model.decoder
    kinds = {}
    for module in list(decoder.modules()) + list(loaded.tts.model.talker.modules()):
        name = type(module).__name__
        if name.endswith("ConvNeXtBlock"):
            kinds.setdefault("convnext", []).append(module.gamma)
        elif name.endswith("LayerScale"):
            kinds.setdefault("layer_scale", []).append(module.scale)
        elif name == "SnakeBeta":
            kinds.setdefault("snake", []).extend([module.alpha, module.beta])
        elif name.endswith("RMSNorm"):
            kinds.setdefault("rms_norm", []).append(module.weight - 1.0)
    assert set(kinds) == {"convnext", "layer_scale", "snake", "rms_norm"}
    for kind, tensors in kinds.items():
        values = torch.cat([t.detach().flatten() for t in tensors]).abs()
        assert values.min() > 1e-3 or kind in ("snake", "rms_norm"), kind
        assert values.mean() > 0.02, f"{kind} sits near its initial value"


# -- streaming decode: exact, and every piece of state matters --------------------------------------------

@pytest.mark.parametrize("sizes", [(1,), (2, 4, 8, 16), (7,), (64,), (150, 50)])
def test_streamed_decode_equals_one_shot_in_float64(decoder64, sizes):
    """With per-stream state, chunked decoding equals one decode of all frames, for any chunk schedule."""
    codes = random_codes(200, 0)
    expected = decoder64.decode_full(codes)
    streamed = stream_decode(decoder64, codes, sizes)
    assert streamed.shape == expected.shape == (200 * decoder64.samples_per_frame,)
    assert np.abs(streamed - expected).max() <= EXACT_TOLERANCE


@pytest.mark.parametrize("sizes", [(1,), (2, 4, 8, 16), (7,)])
def test_streamed_decode_equals_one_shot_in_float32(decoder, sizes):
    """In the serving dtype the difference is float32 rounding only, far below any state bug."""
    codes = random_codes(200, 0)
    expected = decoder.decode_full(codes)
    assert np.abs(stream_decode(decoder, codes, sizes) - expected).max() <= FLOAT32_TOLERANCE * rms(expected)


def test_streams_decoded_in_one_batch_each_equal_their_one_shot_decode(decoder64, icl_prompt):
    """Chunks of streams at different points (new, short past, a full window, primed with reference codes)
    decoded together in one forward: each row equals its own stream's one-shot decode."""
    histories = {"new": 0, "short past": 5, "full window": 100, "primed": 0}
    codes = {name: random_codes(past + 12, seed) for seed, (name, past) in enumerate(histories.items())}
    context = {name: (icl_prompt.ref_code if name == "primed" else None) for name in histories}
    states, streamed = {}, {name: [] for name in histories}
    for name, past in histories.items():
        states[name] = prime(decoder64, context[name])
        if past:
            streamed[name].append(stream_decode(decoder64, codes[name][:past], (7, 30), state=states[name]))
    names = list(histories)
    for start in range(0, 12, 4):  # three batched chunks of 4 frames
        offsets = [histories[name] + start for name in names]
        audio = decoder64.decode_batch([states[name] for name in names],
                                       [codes[name][offset:offset + 4] for name, offset in zip(names, offsets)])
        for name, piece in zip(names, audio):
            streamed[name].append(piece)
    for name in names:
        full = torch.cat([context[name], codes[name]]) if context[name] is not None else codes[name]
        skip = 0 if context[name] is None else len(context[name]) * decoder64.samples_per_frame
        expected = decoder64.decode_full(full)[skip:]
        assert np.abs(np.concatenate(streamed[name]) - expected).max() <= EXACT_TOLERANCE, name


def _zero_tails(*prefixes):
    def corrupt(decoder, state):
        hit = [key for key in decoder.layout if key.startswith(prefixes)]
        assert hit, f"no state under {prefixes}"
        for key in hit:
            decoder.piece(state, key).zero_()
    return corrupt


def _forget_oldest_cached_frame(decoder, state):
    keep = decoder.window - 1
    decoder.piece(state, "attention")[:, :, :, keep - min(state.frames, keep)] = 0


def _shift_positions(decoder, state):
    decoder.slots.frames[state.row] += 1


# Each stateful part of the decoder, deliberately wrong (keys: StreamingDecoder.layout, module paths).
BROKEN_STATES = {
    "attention cache forgets its oldest frame": _forget_oldest_cached_frame,
    "rotary positions off by one": _shift_positions,
    "causal-conv tail lost (pre_conv)": _zero_tails("pre_conv"),
    "causal-conv tails lost (residual units)": _zero_tails("decoder.1.block.2.conv1", "decoder.3.block.3.conv1"),
    "causal-conv tail lost (output conv)": _zero_tails("decoder.6"),
    "transposed-conv overlap lost (decoder block)": _zero_tails("decoder.2.block.1"),
    "ConvNeXt tails lost": _zero_tails("upsample.0.1.dwconv", "upsample.1.1.dwconv"),
}


@pytest.mark.parametrize("broken", list(BROKEN_STATES))
def test_each_wrong_decoder_state_is_caught(decoder64, broken):
    """A deliberately wrong state gives an error at least 10x the tolerance: the exactness tests can fail."""
    codes = random_codes(120, 2)
    expected = decoder64.decode_full(codes)
    streamed = stream_decode(decoder64, codes, (2, 4, 8, 16), corrupt=BROKEN_STATES[broken])
    assert np.abs(streamed - expected).max() >= 10 * EXACT_TOLERANCE


@pytest.mark.parametrize("streams,frames", [(1, 1), (4, 8)])
def test_decoder_step_traces_as_one_graph_and_equals_the_eager_step(decoder, streams, frames):
    """torch dynamo traces the codec decoder's step with fullgraph=True (no graph break, no host
    synchronisation), and from the same states it gives exactly the eager step's audio and states."""
    from tools.graph_check import check_decoder_bucket

    row = check_decoder_bucket(decoder, streams, frames, repeats=1, profile=False)
    assert row["trace_error"] is None, row
    assert row["traced_equal"], row


def test_padding_rows_never_touch_a_real_decoder_state(decoder64):
    """Three streams padded to a bucket of four decode exactly what they decode unpadded, chunk after chunk."""
    codes = [random_codes(24, seed) for seed in range(3)]
    padded_states = [decoder64.new_state() for _ in codes]
    plain_states = [state.clone() for state in padded_states]
    decoder64.buckets = (1, 2, 4)
    try:
        padded = [decoder64.decode_batch(padded_states, [c[i:i + 8] for c in codes]) for i in range(0, 24, 8)]
    finally:
        decoder64.buckets = None
    plain = [decoder64.decode_batch(plain_states, [c[i:i + 8] for c in codes]) for i in range(0, 24, 8)]
    for chunk_padded, chunk_plain in zip(padded, plain):
        for a, b in zip(chunk_padded, chunk_plain):
            assert np.array_equal(a, b)


def test_decoder_state_table_grows_without_disturbing_streams(loaded):
    """With more streams than rows the state table doubles mid-stream, and each stream still equals its one-shot
    decode; a released row is given out again zeroed."""
    decoder = warmed_up(StreamingDecoder(float64_codec(loaded.tts.model.speech_tokenizer.model), capacity=2))
    states, decoded = [], []
    for round_ in range(3):  # a new stream joins each round; each stream decodes 10 more frames per round
        states.append(decoder.new_state())
        decoded.append([])
        for index, state in enumerate(states):
            start = 10 * (round_ - index)
            decoded[index].append(decoder.decode(state, random_codes(30 - 10 * index, index)[start:start + 10]))
    assert (decoder.slots.capacity, decoder.slots.generation) == (4, 2)  # 2 rows (1 + scratch), then 4
    for index, pieces in enumerate(decoded):
        expected = decoder.decode_full(random_codes(30 - 10 * index, index))
        assert np.abs(np.concatenate(pieces) - expected).max() <= EXACT_TOLERANCE
    row = states[0].row
    states[0].release()
    reused = decoder.new_state()
    assert reused.row == row and reused.frames == 0 and not decoder.slots.values[row].any()


def test_upstream_short_context_decode_is_not_exact(decoder64):
    """The 25-frame-context chunked decode differs from one-shot: the reason the stateful decoder exists."""
    codes = random_codes(120, 3)
    expected = decoder64.decode_full(codes)
    with torch.inference_mode():
        approx = decoder64.decoder.chunked_decode(codes.T.unsqueeze(0), chunk_size=8, left_context_size=25)
    assert np.abs(approx[0, 0].float().numpy() - expected).max() >= 10 * EXACT_TOLERANCE


def test_primed_state_continues_after_reference_codes(decoder64, icl_prompt):
    """A state primed with the voice's reference codes decodes new frames as the tail of one long decode."""
    new, context = random_codes(30, 5), icl_prompt.ref_code
    expected = decoder64.decode_full(torch.cat([context, new]))[len(context) * decoder64.samples_per_frame:]
    state = prime(decoder64, context)
    streamed = np.concatenate([decoder64.decode(state, new[:4]), decoder64.decode(state.clone(), new[4:])])
    assert np.abs(streamed - expected).max() <= EXACT_TOLERANCE
    unprimed = stream_decode(decoder64, new, (4, 26))
    assert np.abs(unprimed - expected).max() >= 10 * EXACT_TOLERANCE, "priming must matter"


# -- codes: the serving loop equals qwen-tts ---------------------------------------------------------------

@pytest.mark.parametrize("mode", ["icl", "xvector"])
def test_greedy_codes_equal_generate_voice_clone(loaded, engine, icl_prompt, xvector_prompt, mode):
    """Greedy codes from the serving loop equal qwen-tts generate_voice_clone's, in both prompt modes."""
    prompt = icl_prompt if mode == "icl" else xvector_prompt
    expected, _ = reference_generation(loaded.tts, prompt, TEXT, do_sample=False, subtalker_dosample=False,
                                       max_new_tokens=40)
    got = generate(loaded, engine, prompt, TEXT, greedy=True, max_new_tokens=40)
    assert got.codes.shape == expected.shape == (39, 16)
    assert torch.equal(got.codes, expected)


# name: (parameters, the same without the option under test). Each option must change the codes, or its
# parity check would prove nothing.
SAMPLING_CASES = {
    "defaults": ({}, None),
    "top_p": ({"top_p": 0.8}, {}),
    "temperature and top_k": ({"temperature": 0.6, "top_k": 8}, {}),
    "top_p without top_k": ({"top_k": 0, "top_p": 0.5}, {"top_k": 0}),
    "repetition penalty": ({"top_k": 4, "repetition_penalty": 1.5}, {"top_k": 4, "repetition_penalty": 1.0}),
    "repetition penalty, greedy": ({"greedy": True, "repetition_penalty": 1.5},
                                   {"greedy": True, "repetition_penalty": 1.0}),
    "sub-talker options": ({"subtalker_temperature": 1.3, "subtalker_top_k": 5, "subtalker_top_p": 0.7}, {}),
    "greedy talker, sampled sub-talker": ({"greedy": True, "subtalker_greedy": False}, {}),
    "sampled talker, greedy sub-talker": ({"subtalker_greedy": True}, {}),
}


@pytest.mark.parametrize("case", list(SAMPLING_CASES))
def test_seeded_sampling_equals_generate_voice_clone(loaded, engine, icl_prompt, case):
    """With sampling, the same seed gives qwen-tts's codes for every option, and each option matters."""
    options, baseline = SAMPLING_CASES[case]
    params = {"max_new_tokens": 30, **options}
    expected, _ = reference_generation(loaded.tts, icl_prompt, TEXT, seed=1234, **qwen_kwargs(params))
    got = generate(loaded, engine, icl_prompt, TEXT, seed=1234, **params).codes
    assert torch.equal(got, expected)
    if baseline is not None:
        without = generate(loaded, engine, icl_prompt, TEXT, seed=1234, max_new_tokens=30, **baseline).codes
        assert not torch.equal(got, without), f"{case}: the option changed nothing, so this check proves nothing"


# -- stopping rules: EOS through qwen-tts's own logic ------------------------------------------------------

@pytest.fixture(scope="module")
def short_icl_prompt(loaded):
    """An ICL voice with a short (3 s) reference, so a long text runs past it and is read while speaking."""
    from tts_engine.voices.prompts import build_prompt

    return build_prompt(loaded.tts, synthetic_reference(seconds=3.0, seed=4), SAMPLE_RATE, "Hi.")


EOS_TEXT = "Short clips make the text run past the reference, so the talker reads it as it speaks ~ and stops."
# (text, min_new_tokens, frames): where the marker sits decides the frame count; min_new_tokens can veto it.
EOS_CASES = {
    "EOS mid-text": ("Hello there ~ and then some.", 2, 6),
    "EOS before any frame": (f"{EOS_MARKER} Hello there.", 0, 0),
    "EOS first token vetoed by min_new_tokens=1": (f"{EOS_MARKER} Hello there.", 1, None),
    "EOS after one frame": (f"A{EOS_MARKER} Hello there.", 1, 1),
    "EOS second token vetoed by min_new_tokens=2": (f"A{EOS_MARKER} Hello there.", 2, None),
}


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "seeded"])
@pytest.mark.parametrize("case", list(EOS_CASES))
def test_stopping_equals_generate_voice_clone(loaded, engine, xvector_prompt, case, sampled):
    """EOS and min_new_tokens stop the serving loop at the same frame as qwen-tts (None: no EOS, the cap)."""
    text, min_new_tokens, frames = EOS_CASES[case]
    params = {"max_new_tokens": 25, "min_new_tokens": min_new_tokens, "greedy": not sampled}
    expected, _ = reference_generation(loaded.tts, xvector_prompt, text, seed=7, min_new_tokens=min_new_tokens,
                                       **qwen_kwargs(params))
    got = generate(loaded, engine, xvector_prompt, text, seed=7, **params)
    assert torch.equal(got.codes, expected)
    assert len(got.codes) == (24 if frames is None else frames)
    assert got.finish_reason == ("max_new_tokens" if frames is None else "eos")


def test_icl_stopping_equals_generate_voice_clone(loaded, engine, short_icl_prompt):
    """In ICL mode, text that runs past the reference is read while speaking; EOS stops both at once."""
    expected, _ = reference_generation(loaded.tts, short_icl_prompt, EOS_TEXT, do_sample=False,
                                       subtalker_dosample=False, max_new_tokens=100)
    got = generate(loaded, engine, short_icl_prompt, EOS_TEXT, greedy=True, max_new_tokens=100)
    assert torch.equal(got.codes, expected)
    assert got.finish_reason == "eos" and 10 < len(got.codes) < 99


# -- the whole path: codes through the streaming decoder equal qwen-tts's audio ----------------------------

@pytest.mark.parametrize("mode", ["icl", "xvector"])
def test_streamed_audio_equals_generate_voice_clone_audio(loaded, engine, decoder, icl_prompt, xvector_prompt, mode):
    """The serving loop's chunks through the stateful decoder reproduce qwen-tts's waveform (cut after the
    reference in ICL mode)."""
    prompt = icl_prompt if mode == "icl" else xvector_prompt
    _, expected = reference_generation(loaded.tts, prompt, TEXT, do_sample=False, subtalker_dosample=False,
                                       max_new_tokens=40)
    generated = generate(loaded, engine, prompt, TEXT, policy=FixedChunks((1, 3)), greedy=True,
                         max_new_tokens=40)
    state = prime(decoder, prompt.ref_code)
    audio = np.concatenate([decoder.decode(state, chunk) for chunk in generated.chunks])
    assert audio.shape == expected.shape == (39 * decoder.samples_per_frame,)
    assert np.abs(audio - expected).max() <= FLOAT32_TOLERANCE * rms(expected)


def test_chunks_follow_a_fixed_schedule(loaded, engine, xvector_prompt):
    """The serving loop's chunks have the scheduled sizes; the last chunk carries the remainder."""
    generated = generate(loaded, engine, xvector_prompt, TEXT, policy=FixedChunks((2, 4, 8)), greedy=True,
                         max_new_tokens=21)
    assert [len(chunk) for chunk in generated.chunks] == [2, 4, 8, 6]
    assert generated.finish_reason == "max_new_tokens"
