"""`make graph-check`: the talker's decode step and the codec decoder's step are each one static, capturable
function, on the machine this runs on.

    python -m tools.graph_check [--model-dir DIR | --preset full] [--device cpu|cuda] [--dtype fp32|bf16]
                                [--rows 16] [--steps 10]

For every batch bucket up to the rows it fills the batch with streams (greedy and sampled, x-vector and ICL
voices, different lengths), then from one and the same state runs the step eagerly and traced by torch dynamo
with ``fullgraph=True`` (a graph break or a host synchronisation fails the trace) — on CUDA also captured as a
CUDA graph and replayed — and checks that each gives exactly the eager step's codes and state. It prints the
ops per step (torch profiler, top-level ops) and the step time per bucket. The codec decoder's step is checked the
same way for (streams, frames) buckets of the pacing ladder, its streams at different points (new, a short past,
past the attention window). Exit status 0 only when every bucket traces (and captures) and matches.
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

    from tts_engine.graphs import capture_talker_steps, traced_once

    while len(talker.active) < size:
        talker.add(_requests(talker.tts, size, talker.max_tokens // 2)[len(talker.active)])
    streams = talker.active[:size]
    with torch.inference_mode():
        for _ in range(3):
            talker.step(streams)
        inputs = talker.prepare(streams)
        step = talker.step_function
        before = step.snapshot()
        eager = [x.clone() for x in step(*inputs)]
        after_eager = step.snapshot()
        row = {"bucket": size, "rows": inputs[0].shape[0], "kv_blocks": inputs[2]}
        step.restore(before)
        row["trace_error"], traced = traced_once(step, *inputs)
        row["traced_equal"] = row["trace_error"] is None and _same(list(traced), eager) and \
            _same(step.snapshot(), after_eager)
        if str(talker.device).startswith("cuda"):
            step.restore(before)
            graphs = capture_talker_steps(step, [inputs[0].shape[0]], [inputs[2]], talker.talker.config.hidden_size,
                                          talker.talker.dtype, talker.device, inputs[5])
            step.restore(before)
            captured = graphs.run((inputs[0].shape[0], inputs[2]), inputs[0], inputs[1])
            torch.cuda.synchronize()
            row["captured_equal"] = _same(list(captured), eager) and _same(step.snapshot(), after_eager)
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


DECODER_BUCKETS = [(1, 1), (1, 16), (4, 4), (16, 2), (16, 16)]  # (streams, frames): the pacing ladder's sizes


def check_decoder_bucket(decoder, streams: int, frames: int, repeats: int, profile: bool) -> dict:
    """Streams at different points (new, short past, past the attention window) decode one chunk of ``frames``:
    eager, traced (and on CUDA captured) from the same states must give the same audio and states."""
    import torch

    from tts_engine.graphs import CapturedGraphs, traced_once

    generator = torch.Generator().manual_seed(streams * 100 + frames)
    states = [decoder.new_state() for _ in range(streams)]
    for index, state in enumerate(states):
        past = (0, 5, 100)[index % 3]
        if past:
            decoder.decode(state, torch.randint(0, 2048, (past, decoder.num_quantizers), generator=generator))
    rows = torch.tensor([state.row for state in states], device=decoder.device)
    codes = torch.randint(0, 2048, (streams, decoder.num_quantizers, frames), generator=generator).to(decoder.device)
    slots = decoder.slots
    row = {"streams": streams, "frames": frames}
    try:
        with torch.inference_mode():
            before = (slots.values.clone(), slots.frames.clone())

            def restore():
                slots.values.copy_(before[0])
                slots.frames.copy_(before[1])

            eager = decoder.step(rows, codes).clone()
            after_eager = (slots.values.clone(), slots.frames.clone())
            restore()
            row["trace_error"], traced = traced_once(decoder.step, rows, codes)
            row["traced_equal"] = row["trace_error"] is None and _same([traced, slots.values, slots.frames],
                                                                       [eager, *after_eager])
            if str(decoder.device).startswith("cuda"):
                graphs = CapturedGraphs()
                restore()
                graphs.capture((streams, frames), decoder.step, rows, codes)
                restore()
                captured = graphs.run((streams, frames), rows, codes)
                torch.cuda.synchronize()
                row["captured_equal"] = _same([captured, slots.values, slots.frames], [eager, *after_eager])
            restore()
            if profile:
                from torch.profiler import profile as profiler

                with profiler() as prof:
                    decoder.step(rows, codes)
                row["ops"] = sum(1 for event in prof.events() if event.cpu_parent is None)
            timings = []
            for _ in range(repeats):
                restore()
                started = time.perf_counter()
                decoder.step(rows, codes)
                if str(decoder.device).startswith("cuda"):
                    torch.cuda.synchronize()
                timings.append(time.perf_counter() - started)
            row["step_ms"] = round(1000 * statistics.median(timings), 2)
    finally:
        for state in states:
            state.release()
    return row


def _report(name: str, row: dict) -> bool:
    good = row["trace_error"] is None and row["traced_equal"] and row.get("captured_equal", True)
    captured = f", captured {'equal' if row['captured_equal'] else 'DIFFERENT'}" if "captured_equal" in row else ""
    traced = "as one graph" if row["trace_error"] is None else "FAILED: " + row["trace_error"]
    print(f"{name}: traced {traced}, {'equal' if row['traced_equal'] else 'DIFFERENT'} to eager{captured}; "
          f"{row.get('ops', '-')} ops per step; {row['step_ms']} ms per step{'' if good else '  <-- FAILS'}",
          flush=True)
    return good


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", help="a model directory (default: the tiny model, built if needed)")
    parser.add_argument("--preset", choices=("tiny", "full"), default="tiny",
                        help="without --model-dir: the architecture to build with random weights")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="fp32 (CPU default) or bf16 (CUDA default)")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per bucket")
    parser.add_argument("--no-profile", action="store_true")
    args = parser.parse_args(argv)
    import torch

    from tts_engine.codec.decoder import StreamingDecoder
    from tts_engine.generation.talker import BatchedTalker
    from tts_engine.loading import load_model

    model_dir = args.model_dir or _built(args.preset)
    loaded = load_model(model_dir, device=args.device, dtype=args.dtype)
    torch.set_num_threads(1)
    talker = BatchedTalker(loaded.tts, rows=args.rows, max_tokens=4096 + 1024, pool_tokens=args.rows * 1024,
                           pad_batches=True, noise="counter")
    rows, ok = [], True
    for size in talker.buckets:
        row = check_bucket(talker, size, args.steps, not args.no_profile)
        rows.append(row)
        ok = _report(f"talker bucket {size:>3}", row) and ok
    decoder = StreamingDecoder(loaded.tts.model.speech_tokenizer.model)
    for streams, frames in DECODER_BUCKETS:
        if streams <= args.rows:
            row = check_decoder_bucket(decoder, streams, frames, args.steps, not args.no_profile)
            ok = _report(f"codec decoder {streams:>3} streams x {frames:>2} frames", row) and ok
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
