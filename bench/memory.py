"""Memory benchmark: how much a process serving N streams holds, weights and KV included.

    python -m bench.memory [--preset full|full-1.7b | --model-dir DIR] [--streams 10] [--seconds 20] [--dtype bf16]
                           [--frames 8] [--compare full,full-1.7b] [--step-batches 1,16]

Without ``--model-dir`` it builds the preset's architecture (``full``: 0.6B Base, ``full-1.7b``: 1.7B Base) with
random weights. It loads the model, starts
``--streams`` streams whose KV blocks hold ``--seconds`` of speech each (the prompt included: the default voice's
reference frames and the text), steps them ``--frames`` times, and reports the process's resident memory (peak and
now), the weights, the KV pool in use, and KV bytes per stream-second. KV is given out in blocks as streams grow,
so memory follows use: the pool is sized for these streams, not for slots x the longest context.

``--compare``: the step time of each listed preset at each of ``--step-batches`` streams, each preset in a process
of its own, one after another in this run (ratios of one run: this machine is shared and noisy), and each one's
ratio to the first. Writes results/memory.json (``full``) or results/memory_<preset>.json; nothing is asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _status(field: str) -> float:
    """A /proc/self/status field in GiB (VmRSS: resident now; VmHWM: the peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    return 0.0


def model_dir_for(preset: str) -> str:
    """The random-weight model of ``preset`` (built here the first time: a few minutes for full-1.7b)."""
    from tts_engine.tiny_model import build_tiny_model, is_current

    model_dir = ROOT / "build" / ("full-random-model" if preset == "full" else f"{preset}-random-model")
    if not is_current(model_dir, preset):
        build_tiny_model(model_dir, preset=preset)
    return str(model_dir)


def _load(model_dir: str, device: str, dtype: str):
    """The model and the default voice's prompt, computed by this checkpoint's own speaker encoder."""
    from tts_engine.loading import load_model
    from tts_engine.voices.prompts import build_prompt
    from tts_engine.voices.store import VoiceStore

    loaded = load_model(model_dir, device=device, dtype=dtype)
    store = VoiceStore(ROOT / "voices", builder=lambda a, sr, t: build_prompt(loaded.tts, a, sr, t),
                       fingerprint=loaded.fingerprint)
    return loaded, store.get_prompt(None)[1]


def _request(prompt, seed: int, frames: int):
    from tts_engine.generation.prompt import SynthesisRequest
    from tts_engine.generation.sampling import SamplingParams

    return SynthesisRequest("Memory follows use: each stream holds only the blocks it fills.", prompt, "English",
                            SamplingParams(seed=seed, max_new_tokens=frames, min_new_tokens=frames))


def step_times(model_dir: str, device: str, dtype: str, batches: list[int], frames: int) -> dict:
    """Mean seconds of one batched step at each batch size (the first step of each batch is not counted)."""
    import torch

    from tts_engine.generation.talker import BatchedTalker

    loaded, prompt = _load(model_dir, device, dtype)
    talker = BatchedTalker(loaded.tts, rows=max(batches), max_tokens=1024, pool_tokens=max(batches) * 1024)
    times = {}
    with torch.inference_mode():
        for batch in batches:
            streams = [talker.add(_request(prompt, i, frames + 8)) for i in range(batch)]
            talker.step(streams)
            started = time.perf_counter()
            for _ in range(frames):
                talker.step(streams)
            times[batch] = (time.perf_counter() - started) / frames
            for stream in streams:
                talker.remove(stream)
    return {"kind": loaded.kind, "size": loaded.size, "step_s": {str(b): round(t, 4) for b, t in times.items()}}


def compare_steps(presets: list[str], args) -> dict:
    """Each preset's step times, measured in a child process of its own (so neither's memory or caches count
    for the other), one after another; ratios to the first preset."""
    measured = {}
    for preset in presets:
        model_dir = model_dir_for(preset)
        child = subprocess.run([sys.executable, "-m", "bench.memory", "--steps-only", "--model-dir", model_dir,
                                "--device", args.device, "--dtype", args.dtype, "--step-batches", args.step_batches,
                                "--frames", str(args.frames)], cwd=ROOT, capture_output=True, text=True, check=True)
        measured[preset] = json.loads(child.stdout.strip().splitlines()[-1])
        print(preset, json.dumps(measured[preset]), flush=True)
    first = measured[presets[0]]["step_s"]
    for preset in presets:
        measured[preset]["ratio_to_" + presets[0]] = {b: round(t / first[b], 2)
                                                      for b, t in measured[preset]["step_s"].items()}
    return measured


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="full", choices=("full", "full-1.7b"),
                        help="the random-weight architecture to build and measure (without --model-dir)")
    parser.add_argument("--model-dir")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--streams", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=20.0, help="speech per stream, its prompt included")
    parser.add_argument("--frames", type=int, default=8, help="decode steps actually run")
    parser.add_argument("--compare", default="", help="presets whose step times to measure too, e.g. full,full-1.7b")
    parser.add_argument("--step-batches", default="1,16", help="batch sizes of the step-time comparison")
    parser.add_argument("--steps-only", action="store_true", help=argparse.SUPPRESS)  # a --compare child
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    batches = [int(b) for b in args.step_batches.split(",")]
    if args.steps_only:
        print(json.dumps(step_times(args.model_dir, args.device, args.dtype, batches, args.frames)))
        return 0
    from tts_engine.generation.talker import BatchedTalker

    model_dir = args.model_dir or model_dir_for(args.preset)
    start_rss = _status("VmRSS")
    loaded, prompt = _load(model_dir, args.device, args.dtype)
    weights = sum(p.numel() * p.element_size() for p in loaded.tts.model.parameters()) / 2**30
    talker_weights = sum(p.numel() * p.element_size() for p in loaded.tts.model.talker.parameters()) / 2**30
    after_load = _status("VmRSS")
    frames = int(args.seconds * 12.5)
    tokens_per_stream = frames + (0 if prompt.ref_code is None else len(prompt.ref_code)) + 64
    talker = BatchedTalker(loaded.tts, rows=args.streams, max_tokens=tokens_per_stream + 64,
                           pool_tokens=args.streams * (tokens_per_stream + 64))
    streams = [talker.add(_request(prompt, i, frames)) for i in range(args.streams)]
    for stream in streams:  # the blocks a stream holds once its 20 s are spoken
        talker.pool.ensure(stream.row, stream.length + frames)
    started = time.perf_counter()
    with torch.inference_mode():
        for _ in range(args.frames):
            talker.step(streams)
    step_s = (time.perf_counter() - started) / args.frames
    used_tokens = talker.pool.used_blocks * talker.pool.block_tokens
    kv_used = used_tokens * talker.pool.bytes_per_token / 2**30
    results = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "model_dir": model_dir, "device": args.device,
        "dtype": args.dtype, "kind": loaded.kind, "size": loaded.size, "streams": args.streams,
        "seconds_per_stream": args.seconds, "tokens_per_stream": tokens_per_stream, "weights_gib": round(weights, 2),
        "talker_weights_gib": round(talker_weights, 2),
        "kv_pool_gib": round(talker.pool.nbytes / 2**30, 2), "kv_in_use_gib": round(kv_used, 2),
        "kv_kib_per_token": round(talker.pool.bytes_per_token / 1024, 1),
        "kv_mib_per_stream_second": round(talker.pool.bytes_per_token * 12.5 / 2**20, 2),
        "kv_mib_per_20s_stream": round(talker.pool.bytes_per_token * tokens_per_stream / 2**20, 1),
        "rss_before_load_gib": round(start_rss, 2), "rss_after_load_gib": round(after_load, 2),
        "rss_now_gib": round(_status("VmRSS"), 2), "rss_peak_gib": round(_status("VmHWM"), 2),
        "step_s": round(step_s, 3)}
    del talker, streams, loaded
    if args.compare:
        results["step_comparison"] = compare_steps(args.compare.split(","), args)
    output = args.output or ROOT / "results" / ("memory.json" if args.preset == "full" or args.model_dir
                                                else f"memory_{args.preset.replace('-', '_')}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))
    print(f"{args.streams} streams of {args.seconds:g} s: process peak {results['rss_peak_gib']} GiB "
          f"(weights {results['weights_gib']} GiB, KV in use {results['kv_in_use_gib']} GiB, "
          f"{results['kv_mib_per_stream_second']} MiB per stream-second); written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
