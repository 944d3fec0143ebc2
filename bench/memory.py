"""Memory benchmark: how much a process serving N streams holds, weights and KV included.

    python -m bench.memory [--model-dir DIR] [--streams 10] [--seconds 20] [--dtype bf16] [--frames 8]

Without ``--model-dir`` it builds the full-size 0.6B architecture with random weights. It loads the model, starts
``--streams`` streams whose KV blocks hold ``--seconds`` of speech each (the prompt included: the default voice's
reference frames and the text), steps them ``--frames`` times, and reports the process's resident memory (peak and
now), the weights, the KV pool in use, and KV bytes per stream-second. KV is given out in blocks as streams grow,
so memory follows use: the pool is sized for these streams, not for slots x the longest context.
Writes results/memory.json; nothing is asserted.
"""
from __future__ import annotations

import argparse
import json
import os
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--streams", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=20.0, help="speech per stream, its prompt included")
    parser.add_argument("--frames", type=int, default=8, help="decode steps actually run")
    parser.add_argument("--output", type=Path, default=ROOT / "results" / "memory.json")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from tts_engine.generation.prompt import SynthesisRequest
    from tts_engine.generation.sampling import SamplingParams
    from tts_engine.generation.talker import BatchedTalker
    from tts_engine.loading import load_model
    from tts_engine.voices.prompts import build_prompt
    from tts_engine.voices.store import VoiceStore

    model_dir = args.model_dir or str(ROOT / "build" / "full-random-model")
    if not args.model_dir and not (Path(model_dir) / "config.json").exists():
        from tts_engine.tiny_model import build_tiny_model

        build_tiny_model(model_dir, preset="full")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    start_rss = _status("VmRSS")
    loaded = load_model(model_dir, device=args.device, dtype=args.dtype)
    weights = sum(p.numel() * p.element_size() for p in loaded.tts.model.parameters()) / 2**30
    after_load = _status("VmRSS")
    store = VoiceStore(ROOT / "voices", builder=lambda a, sr, t: build_prompt(loaded.tts, a, sr, t),
                       fingerprint=loaded.fingerprint)
    prompt = store.get_prompt(None)[1]
    frames = int(args.seconds * 12.5)
    tokens_per_stream = frames + (0 if prompt.ref_code is None else len(prompt.ref_code)) + 64
    talker = BatchedTalker(loaded.tts, rows=args.streams, max_tokens=tokens_per_stream + 64,
                           pool_tokens=args.streams * (tokens_per_stream + 64))
    streams = [talker.add(SynthesisRequest("Memory follows use: each stream holds only the blocks it fills.",
                                           prompt, "English", SamplingParams(seed=i, max_new_tokens=frames,
                                                                             min_new_tokens=frames)))
               for i in range(args.streams)]
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
        "dtype": args.dtype, "streams": args.streams, "seconds_per_stream": args.seconds,
        "tokens_per_stream": tokens_per_stream, "weights_gib": round(weights, 2),
        "kv_pool_gib": round(talker.pool.nbytes / 2**30, 2), "kv_in_use_gib": round(kv_used, 2),
        "kv_kib_per_token": round(talker.pool.bytes_per_token / 1024, 1),
        "kv_mib_per_stream_second": round(talker.pool.bytes_per_token * 12.5 / 2**20, 2),
        "rss_before_load_gib": round(start_rss, 2), "rss_after_load_gib": round(after_load, 2),
        "rss_now_gib": round(_status("VmRSS"), 2), "rss_peak_gib": round(_status("VmHWM"), 2),
        "step_s": round(step_s, 3)}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))
    print(f"{args.streams} streams of {args.seconds:g} s: process peak {results['rss_peak_gib']} GiB "
          f"(weights {results['weights_gib']} GiB, KV in use {results['kv_in_use_gib']} GiB, "
          f"{results['kv_mib_per_stream_second']} MiB per stream-second); written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
