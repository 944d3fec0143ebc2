"""Fidelity figures: how far streamed audio is from one-shot decoding, correct and deliberately broken.

    python -m bench.fidelity [--model-dir DIR]

Streams random codes through the stateful decoder in float64, float32 and bfloat16 and compares with one
decode of all frames; then breaks each piece of streaming state once and measures the damage; then checks
greedy codes against qwen-tts in bfloat16. Numbers are printed and written to results/fidelity.json; the
tests assert the bounds (tests/test_fidelity.py), this only reports.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
SCHEDULES = [(1,), (2, 4, 8, 16), (7,), (64,), (150, 50)]


def decoder_figures(loaded, results: dict) -> None:
    """Streamed vs one-shot in three dtypes, and each broken state's damage (float64)."""
    import numpy as np
    import torch

    from reference import float64_codec, rms
    from test_fidelity import BROKEN_STATES, random_codes, stream_decode
    from tts_engine.codec.decoder import StreamingDecoder

    codes = random_codes(200, 0)
    results.update(frames=len(codes), streamed_vs_one_shot={}, broken_states_float64={})
    exact = None  # the float64 one-shot decode: how far each dtype's streamed and one-shot output are from it
    for name, dtype in (("float64", torch.float64), ("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        codec = loaded.tts.model.speech_tokenizer.model
        decoder = StreamingDecoder(float64_codec(codec) if dtype == torch.float64 else copy.deepcopy(codec).to(dtype))
        expected = decoder.decode_full(codes)
        exact = expected if exact is None else exact
        streamed = {sizes: stream_decode(decoder, codes, sizes) for sizes in SCHEDULES}
        worst = max(float(np.abs(audio - expected).max()) for audio in streamed.values())
        results["streamed_vs_one_shot"][name] = {
            "max_abs": worst, "rms": rms(expected), "max_abs_over_rms": worst / rms(expected),
            "rms_of_diff_over_rms": max(rms(audio - expected) for audio in streamed.values()) / rms(expected),
            "one_shot_vs_float64_rms_over_rms": rms(expected - exact) / rms(exact),
            "streamed_vs_float64_rms_over_rms": max(rms(audio - exact) for audio in streamed.values()) / rms(exact)}
        if name == "float64":
            for broken, corrupt in BROKEN_STATES.items():
                error = float(np.abs(stream_decode(decoder, codes, (2, 4, 8, 16), corrupt=corrupt) - expected).max())
                results["broken_states_float64"][broken] = error
            with torch.inference_mode():
                approx = decoder.decoder.chunked_decode(codes.T.unsqueeze(0), chunk_size=8, left_context_size=25)
            results["upstream_25_frame_context_max_abs"] = float(np.abs(approx[0, 0].float().numpy() - expected).max())


def bf16_codes_equal_qwen_tts(model_dir: str) -> bool:
    """Greedy codes of the serving loop vs qwen-tts, both in bfloat16 on this CPU."""
    import torch

    from conftest import SAMPLE_RATE, synthetic_reference
    from reference import qwen_kwargs, reference_generation
    from tts_engine.generation.prompt import SynthesisRequest
    from tts_engine.generation.sampling import SamplingParams
    from tts_engine.serving.engine import Engine
    from tts_engine.generation.talker import BatchedTalker
    from tts_engine.loading import load_model
    from tts_engine.voices.prompts import build_prompt

    bf16 = load_model(model_dir, device="cpu", dtype="bf16")
    prompt = build_prompt(bf16.tts, synthetic_reference(), SAMPLE_RATE, "Hello there, this is my voice.")
    text = "The quick brown fox jumps over the lazy dog."
    engine = Engine(BatchedTalker(bf16.tts, rows=1, max_tokens=1024), name="fidelity")
    try:
        got = engine.generate(SynthesisRequest(text, prompt, "English",
                                                  SamplingParams(greedy=True, max_new_tokens=60))).codes
    finally:
        engine.stop()
    expected, _ = reference_generation(bf16.tts, prompt, text, **qwen_kwargs({"greedy": True, "max_new_tokens": 60}))
    return bool(torch.equal(got, expected))


def report(results: dict) -> None:
    for name, row in results["streamed_vs_one_shot"].items():
        print(f"streamed vs one-shot, {name:8s}: max |diff| {row['max_abs']:.2e} "
              f"({row['max_abs_over_rms']:.1e} x RMS {row['rms']:.3f}); RMS of diff {row['rms_of_diff_over_rms']:.1e} "
              f"x RMS; vs float64 one-shot: one-shot {row['one_shot_vs_float64_rms_over_rms']:.1e}, "
              f"streamed {row['streamed_vs_float64_rms_over_rms']:.1e} x RMS")
    for broken, error in results["broken_states_float64"].items():
        print(f"broken: {broken:45s} max |diff| {error:.2e}")
    print(f"upstream 25-frame-context chunked decode: max |diff| {results['upstream_25_frame_context_max_abs']:.2e}")
    print(f"bfloat16 greedy codes equal qwen-tts: {results['bfloat16_greedy_codes_equal_qwen_tts']}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", default=str(ROOT / "build" / "tiny-model"))
    parser.add_argument("--output", type=Path, default=ROOT / "results" / "fidelity.json")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from tts_engine.loading import load_model

    results = {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "model_dir": args.model_dir}
    decoder_figures(load_model(args.model_dir, device="cpu", dtype="fp32"), results)
    results["bfloat16_greedy_codes_equal_qwen_tts"] = bf16_codes_equal_qwen_tts(args.model_dir)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2))
    report(results)
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
