"""Core benchmark: time to first audio and per-frame time in-process vs through Triton, and throughput.

    python -m bench.core [--model-dir DIR] [--device cpu|cuda] [--frames 80] [--concurrency 1,2,4,8]

Numbers are printed and written to results/bench_core.json; nothing is asserted.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT = "Benchmarks measure what users feel: the wait before the first sound, and the pace after it."


def in_process(model_dir: str, device: str, dtype: str | None, frames: int, runs: int) -> dict:
    """The serving loop and the streaming decoder in one process: chunks are decoded as the loop sends them."""
    import queue

    import torch

    from tts_engine.decoder import StreamingDecoder, prime
    from tts_engine.model import load_model
    from tts_engine.prompts import build_prompt
    from tts_engine.sampling import SamplingParams
    from tts_engine.scheduler import StreamJob, StreamScheduler
    from tts_engine.talker import BatchedTalker, ChunkSchedule, SynthesisRequest
    from tts_engine.voices import VoiceStore

    loaded = load_model(model_dir, device, dtype)
    store = VoiceStore(ROOT / "voices", builder=lambda a, sr, t: build_prompt(loaded.tts, a, sr, t),
                       fingerprint=loaded.fingerprint)
    _, prompt = store.get_prompt(None)
    decoder = StreamingDecoder(loaded.tts.model.speech_tokenizer.model)
    primed = prime(decoder, prompt.ref_code)  # the server caches this per voice too
    scheduler = StreamScheduler(BatchedTalker(loaded.tts, slots=1, max_tokens=frames + 1024), name="bench")

    def sync():
        if loaded.device.startswith("cuda"):
            torch.cuda.synchronize()

    ttfa, per_frame = [], []
    try:
        for run in range(runs + 1):  # run 0 warms up
            request = SynthesisRequest(TEXT, prompt, "English", SamplingParams(max_new_tokens=frames, seed=run))
            chunks: "queue.Queue" = queue.Queue()
            start = time.perf_counter()
            scheduler.submit(StreamJob(request=request, on_chunk=lambda chunk, index, last: chunks.put(chunk),
                                       on_end=lambda error, job: chunks.put(error or job.stream.frames),
                                       schedule=ChunkSchedule(), label="bench"))
            state, first = primed.clone(), None
            while torch.is_tensor(item := chunks.get(timeout=600)):
                decoder.decode(state, item)
                sync()
                if first is None:
                    first = time.perf_counter() - start
            if isinstance(item, BaseException):
                raise item
            total = time.perf_counter() - start
            if run:
                ttfa.append(first)
                per_frame.append(total / item)
    finally:
        scheduler.stop()
    return {"ttfa_ms": 1000 * statistics.median(ttfa), "per_frame_ms": 1000 * statistics.median(per_frame),
            "rtf": statistics.median(per_frame) * 12.5, "runs": runs, "frames": frames - 1}


async def _one(url: str, frames: int, seed: int) -> dict:
    from client.triton_tts import synthesize

    result = await synthesize(url, TEXT, language="English", parameters={"max_new_tokens": frames, "seed": seed})
    got = result["audio"].size // 1920
    return {"ttfa": result["first_audio_s"], "total": result["total_s"], "frames": got}


def through_triton(model_dir: str, profile: str, frames: int, runs: int, concurrency: list[int]) -> dict:
    from tools.render_model_repository import render, resolve
    from tools.triton_local import LocalTriton

    work = Path(tempfile.mkdtemp(prefix="bench-", dir=ROOT / "build"))
    max_active = str(max(concurrency + [8]))
    repository = render(work / "model_repository", resolve(profile, {"MODEL_DIR": model_dir,
                                                                     "MAX_ACTIVE_STREAMS": max_active}))
    server = LocalTriton(repository, log_path=work / "tritonserver.log").start()
    try:
        server.wait_ready(timeout=900)
        asyncio.run(_one(server.grpc_url, 4, 0))  # warm-up
        singles = [asyncio.run(_one(server.grpc_url, frames, seed)) for seed in range(1, runs + 1)]
        single = {"ttfa_ms": 1000 * statistics.median(r["ttfa"] for r in singles),
                  "per_frame_ms": 1000 * statistics.median(r["total"] / r["frames"] for r in singles),
                  "runs": runs, "frames": frames - 1}
        single["rtf"] = single["per_frame_ms"] / 1000 * 12.5
        sweep = {}
        for n in concurrency:
            async def many():
                start = time.perf_counter()
                results = await asyncio.gather(*(_one(server.grpc_url, frames, 100 + i) for i in range(n)))
                return results, time.perf_counter() - start

            results, wall = asyncio.run(many())
            total_frames = sum(r["frames"] for r in results)
            ttfas = sorted(r["ttfa"] for r in results)
            sweep[str(n)] = {"aggregate_frames_per_s": total_frames / wall, "wall_s": wall,
                             "ttfa_p50_ms": 1000 * statistics.median(ttfas),
                             "ttfa_max_ms": 1000 * ttfas[-1],
                             # wall time over the audio one stream received: < 1 means faster than real time
                             "rtf_per_stream": wall / (total_frames / n / 12.5)}
        return {"single": single, "concurrency": sweep}
    finally:
        server.stop()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", default=os.environ.get("QWEN_TTS_MODEL_DIR") or str(ROOT / "build" / "tiny-model"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--profile", default="cpu", choices=("cpu", "gpu"))
    parser.add_argument("--frames", type=int, default=81, help="max_new_tokens per request (frames + 1)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--concurrency", default="1,2,4,8")
    parser.add_argument("--skip-triton", action="store_true")
    parser.add_argument("--output", type=Path, default=ROOT / "results" / "bench_core.json")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    concurrency = [int(n) for n in args.concurrency.split(",")]
    results = {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "host": platform.node(),
               "cpus": os.cpu_count(), "model_dir": args.model_dir, "device": args.device,
               "in_process": in_process(args.model_dir, args.device, args.dtype, args.frames, args.runs)}
    if not args.skip_triton:
        results["triton"] = through_triton(args.model_dir, args.profile, args.frames, args.runs, concurrency)
        single, local = results["triton"]["single"], results["in_process"]
        results["serving_overhead"] = {
            "per_frame_ratio": single["per_frame_ms"] / local["per_frame_ms"],
            "ttfa_extra_ms": single["ttfa_ms"] - local["ttfa_ms"]}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2))
    local = results["in_process"]
    print(f"in-process : TTFA {local['ttfa_ms']:.0f} ms, {local['per_frame_ms']:.1f} ms/frame, RTF {local['rtf']:.2f}")
    if "triton" in results:
        single = results["triton"]["single"]
        print(f"via Triton : TTFA {single['ttfa_ms']:.0f} ms, {single['per_frame_ms']:.1f} ms/frame, "
              f"RTF {single['rtf']:.2f}")
        overhead = results["serving_overhead"]
        print(f"overhead   : x{overhead['per_frame_ratio']:.2f} per frame, +{overhead['ttfa_extra_ms']:.0f} ms TTFA")
        for n, row in results["triton"]["concurrency"].items():
            print(f"{n:>2} streams : {row['aggregate_frames_per_s']:.1f} frames/s aggregate, "
                  f"RTF per stream {row['rtf_per_stream']:.2f}, "
                  f"TTFA p50 {row['ttfa_p50_ms']:.0f} ms, max {row['ttfa_max_ms']:.0f} ms")
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
