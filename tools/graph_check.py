"""`make graph-check`: the decode step is one static, capturable function, on the machine this runs on.

    python -m tools.graph_check [--model-dir DIR | --preset full] [--device cpu|cuda] [--dtype fp32|bf16]
                                [--slots 16] [--steps 10]

For every batch bucket up to the slots it fills the batch with streams (greedy and sampled, x-vector and ICL
voices, different lengths), then from one and the same state runs the step eagerly and traced by torch dynamo
with ``fullgraph=True`` (a graph break or a host synchronisation fails the trace) — on CUDA also captured as a
CUDA graph and replayed — and checks that each gives exactly the eager step's codes and state. It prints the
ops per step (torch profiler, top-level ops) and the step time per bucket. Exit status 0 only when every bucket
traces (and captures) and matches.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hello there.",
         "Streaming speech arrives in pieces, and the first piece should come quickly to the listener."]


def _requests(tts, count: int, frames: int):
    """Mixed requests: greedy and sampled (top-p, penalty), x-vector and ICL voices, short and long texts."""
    import numpy as np

    from tts_engine.generation.prompt import SynthesisRequest
    from tts_engine.generation.sampling import SamplingParams
    from tts_engine.voices.prompts import build_prompt

    rng = np.random.default_rng(0)
    clip = (0.1 * np.sin(np.arange(24000 * 3) * 0.03) + 0.01 * rng.standard_normal(24000 * 3)).astype(np.float32)
    voices = [build_prompt(tts, clip, 24000, None), build_prompt(tts, clip, 24000, "Hello there, this is a voice.")]
    options = [dict(greedy=True), dict(seed=1), dict(seed=2, top_p=0.8), dict(seed=3, repetition_penalty=1.3,
                                                                           subtalker_greedy=True)]
    return [SynthesisRequest(TEXTS[i % len(TEXTS)], voices[i % 2], "English",
                             SamplingParams(max_new_tokens=frames, min_new_tokens=frames, **options[i % len(options)]))
            for i in range(count)]


def _same(a, b) -> bool:
    import torch

    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return torch.equal(a, b)


def check_bucket(talker, size: int, steps: int, profile: bool) -> dict:
    """Fill ``size`` rows, step them a little, then compare eager, traced (and captured) steps from one state."""
    import torch

    from tts_engine.generation.graphs import CapturedSteps, traces_as_one_graph

    while len(talker.active) < size:
        talker.add(_requests(talker.tts, size, talker.max_tokens // 2)[len(talker.active)])
    streams = talker.active[:size]
    with torch.inference_mode():
        for _ in range(3):
            talker.step(streams)
        inputs = talker.prepare(streams)
        step = talker.step_function
        before = step.snapshot()
        eager = step(*inputs)
        after_eager = step.snapshot()
        row = {"bucket": size, "rows": inputs[0].shape[0], "kv_blocks": inputs[2]}
        step.restore(before)
        row["trace_error"] = traces_as_one_graph(step, *inputs)
        traced_same = row["trace_error"] is None and _same(step.snapshot(), after_eager)
        row["traced_equal"] = traced_same
        if str(talker.device).startswith("cuda"):
            step.restore(before)
            graphs = CapturedSteps(step, talker.talker.config.hidden_size, talker.talker.dtype, talker.device,
                                   inputs[5])
            graphs.capture([inputs[0].shape[0]], [inputs[2]])
            step.restore(before)
            captured = graphs.run(inputs[0], inputs[1], inputs[2])
            torch.cuda.synchronize()
            row["captured_equal"] = _same(list(captured), list(eager)) and _same(step.snapshot(), after_eager)
        step.restore(after_eager)
        if profile:
            from torch.profiler import profile as profiler

            with profiler() as prof:
                step(*inputs)
            row["ops"] = sum(1 for event in prof.events() if event.cpu_parent is None)
        timings = []
        for _ in range(steps):
            started = time.perf_counter()
            talker.step(streams)
            if str(talker.device).startswith("cuda"):
                torch.cuda.synchronize()
            timings.append(time.perf_counter() - started)
        row["step_ms"] = round(1000 * statistics.median(timings), 2)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", help="a model directory (default: the tiny model, built if needed)")
    parser.add_argument("--preset", choices=("tiny", "full"), default="tiny",
                        help="without --model-dir: the architecture to build with random weights")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="fp32 (CPU default) or bf16 (CUDA default)")
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per bucket")
    parser.add_argument("--no-profile", action="store_true")
    args = parser.parse_args(argv)
    import torch

    from tts_engine.generation.talker import BatchedTalker
    from tts_engine.loading import load_model

    model_dir = args.model_dir or _built(args.preset)
    loaded = load_model(model_dir, device=args.device, dtype=args.dtype)
    torch.set_num_threads(1)
    talker = BatchedTalker(loaded.tts, slots=args.slots, max_tokens=4096 + 1024, pool_tokens=args.slots * 1024,
                           pad_batches=True, noise="counter")
    rows, ok = [], True
    for size in talker.buckets:
        row = check_bucket(talker, size, args.steps, not args.no_profile)
        rows.append(row)
        good = row["trace_error"] is None and row["traced_equal"] and row.get("captured_equal", True)
        ok = ok and good
        captured = f", captured {'equal' if row['captured_equal'] else 'DIFFERENT'}" if "captured_equal" in row else ""
        print(f"bucket {size:>3}: traced {'as one graph' if row['trace_error'] is None else 'FAILED: ' + row['trace_error']}"
              f", {'equal' if row['traced_equal'] else 'DIFFERENT'} to eager{captured}; "
              f"{row.get('ops', '-')} ops per step; {row['step_ms']} ms per step"
              f"{'' if good else '  <-- FAILS'}", flush=True)
    print(f"graph-check {'passed' if ok else 'FAILED'} on {loaded.device} ({loaded.dtype}, {model_dir})")
    return 0 if ok else 1


def _built(preset: str) -> str:
    from tts_engine.tiny_model import build_tiny_model, is_current

    target = ROOT / "build" / ("tiny-model" if preset == "tiny" else "full-random-model")
    if preset == "tiny":
        if not is_current(target):
            build_tiny_model(target)
    elif not (target / "config.json").exists():
        build_tiny_model(target, preset="full")
    return str(target)


if __name__ == "__main__":
    sys.exit(main())
