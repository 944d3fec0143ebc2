"""Core benchmark: what batching buys, in-process and through Triton.

    python -m bench.core [--model-dir DIR] [--device cpu|cuda] [--streams 1,4,16,32] [--triton-streams 1,4,16]

In-process (the serving loop alone): aggregate frames/s with 1..N concurrent streams, sampled (the serving
default) and greedy, with the mean step time and batch size; time to first audio and per-frame time of one
stream through the loop and the streaming decoder; the codec decoder's cost per frame decoding 1 vs 16
streams at once. Through Triton (tts ensemble over gRPC): aggregate audio seconds per wall second and
first-audio p50/p95 at each concurrency. Numbers are printed and written to results/bench_core.json;
nothing is asserted.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import queue
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tts_engine.serving.tickets import Deadline  # noqa: E402

PATIENT = Deadline(max_wait_s=600)  # a benchmark is not a listener: no job is refused for load
TEXT = "Benchmarks measure what users feel: the wait before the first sound, and the pace after it."
FRAME_SECONDS = 0.08  # 1920 samples at 24 kHz


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def _setup(model_dir: str, device: str, dtype):
    from tts_engine.loading import load_model
    from tts_engine.voices.prompts import build_prompt
    from tts_engine.voices.store import VoiceStore

    loaded = load_model(model_dir, device, dtype)
    store = VoiceStore(ROOT / "voices", builder=lambda a, sr, t: build_prompt(loaded.tts, a, sr, t),
                       fingerprint=loaded.fingerprint)
    return loaded, store.get_prompt(None)[1]


def engine_throughput(loaded, prompt, counts: list[int], frames: int, greedy: bool, pad_batches: bool = False,
                      noise: str = "reference") -> dict:
    """Aggregate frames/s of the serving loop with n streams submitted at once (talker only)."""
    from tts_engine.generation.prompt import SynthesisRequest
    from tts_engine.generation.sampling import SamplingParams
    from tts_engine.generation.talker import BatchedTalker
    from tts_engine.serving.engine import Engine
    from tts_engine.serving.outbox import CallbackSink
    from tts_engine.serving.scheduler import SchedulerConfig

    talker = BatchedTalker(loaded.tts, rows=max(counts), max_tokens=frames + 1024, pad_batches=pad_batches,
                           noise=noise, pool_tokens=max(counts) * (frames + 1024))
    engine = Engine(talker, SchedulerConfig(rows=talker.rows, max_queued=max(counts), realtime_admission=False),
                       name="bench")
    rows = {}
    try:
        for n in [1] + counts:  # the first run warms up
            done = threading.Semaphore(0)
            stats = engine.stats
            steps, step_rows, step_seconds, produced = stats.steps, stats.step_rows, stats.step_seconds, stats.frames
            started = time.perf_counter()
            for i in range(n):
                request = SynthesisRequest(TEXT, prompt, "English",
                                           SamplingParams(max_new_tokens=frames + 1, seed=i, greedy=greedy))
                engine.submit(engine.new_id(), request, CallbackSink(on_end=lambda error: done.release()),
                                 PATIENT)
            for _ in range(n):
                done.acquire()
            wall = time.perf_counter() - started
            taken = stats.steps - steps
            rows[str(n)] = {"frames_per_s": (stats.frames - produced) / wall,
                            "step_ms": 1000 * (stats.step_seconds - step_seconds) / taken,
                            "mean_batch": (stats.step_rows - step_rows) / taken}
    finally:
        engine.stop()
    base = rows[str(counts[0])]["frames_per_s"]
    for row in rows.values():
        row["vs_first"] = row["frames_per_s"] / base
    return {str(n): rows[str(n)] for n in counts}


def single_stream(loaded, prompt, frames: int, runs: int) -> dict:
    """One stream through the serving loop, its chunks decoded as they arrive (the codec process's work)."""
    import torch

    from tts_engine.codec.decoder import StreamingDecoder, prime
    from tts_engine.generation.prompt import SynthesisRequest
    from tts_engine.generation.sampling import SamplingParams
    from tts_engine.generation.talker import BatchedTalker
    from tts_engine.serving.engine import Engine
    from tts_engine.serving.outbox import CallbackSink
    from tts_engine.serving.pacing import FixedChunks

    decoder = StreamingDecoder(loaded.tts.model.speech_tokenizer.model)
    primed = prime(decoder, prompt.ref_code)  # the server primes the default voice at load
    engine = Engine(BatchedTalker(loaded.tts, rows=1, max_tokens=frames + 1024), name="bench")

    def sync():
        if loaded.device.startswith("cuda"):
            torch.cuda.synchronize()

    ttfa, per_frame = [], []
    try:
        for run in range(runs + 1):  # run 0 warms up
            request = SynthesisRequest(TEXT, prompt, "English", SamplingParams(max_new_tokens=frames + 1, seed=run))
            chunks: "queue.Queue" = queue.Queue()
            start = time.perf_counter()
            engine.submit(engine.new_id(), request,
                             CallbackSink(lambda chunk, index, last: chunks.put(chunk), lambda error: chunks.put(error)),
                             PATIENT, FixedChunks())
            state, first, produced = primed.clone(), None, 0
            while torch.is_tensor(item := chunks.get(timeout=600)):
                decoder.decode(state, item)
                sync()
                produced += len(item)
                if first is None:
                    first = time.perf_counter() - start
            if isinstance(item, BaseException):
                raise item
            if run:
                ttfa.append(first)
                per_frame.append((time.perf_counter() - start) / produced)
    finally:
        engine.stop()
    return {"ttfa_ms": 1000 * statistics.median(ttfa), "per_frame_ms": 1000 * statistics.median(per_frame),
            "rtf": statistics.median(per_frame) / FRAME_SECONDS, "runs": runs, "frames": frames}


def decoder_cost(loaded, counts=(1, 16), chunk: int = 4, rounds: int = 20) -> dict:
    """Codec decoder time per frame when decoding ``n`` streams' chunks in one forward (steady state)."""
    import torch

    from tts_engine.codec.decoder import StreamingDecoder

    decoder = StreamingDecoder(loaded.tts.model.speech_tokenizer.model)
    generator = torch.Generator().manual_seed(0)
    rows = {}
    for n in counts:
        states = [decoder.new_state() for _ in range(n)]
        for _ in range(20):  # past the 72-frame window: the state every long stream has
            decoder.decode_batch(states, [torch.randint(0, 2048, (chunk, 16), generator=generator)] * n)
        started = time.perf_counter()
        for _ in range(rounds):
            decoder.decode_batch(states, [torch.randint(0, 2048, (chunk, 16), generator=generator)] * n)
        if loaded.device.startswith("cuda"):
            torch.cuda.synchronize()
        rows[str(n)] = {"ms_per_frame": 1000 * (time.perf_counter() - started) / (rounds * n * chunk)}
    base = rows[str(counts[0])]["ms_per_frame"]
    for row in rows.values():
        row["vs_first"] = row["ms_per_frame"] / base
    return rows


async def _one(url: str, frames: int, seed: int) -> dict:
    from client.triton_tts import synthesize

    result = await synthesize(url, TEXT, language="English", parameters={"max_new_tokens": frames + 1, "seed": seed})
    return {"ttfa": result["first_audio_s"], "total": result["total_s"], "frames": result["audio"].size // 1920}


def through_triton(model_dir: str, profile: str, frames: int, counts: list[int], max_active: int) -> dict:
    from tools.render_model_repository import render, resolve
    from tools.triton_local import LocalTriton

    work = Path(tempfile.mkdtemp(prefix="bench-", dir=ROOT / "build"))
    # Speech alone: no aligner (the GPU profile's default aligner directory need not exist where this runs).
    repository = render(work / "model_repository", resolve(profile, {"MODEL_DIR": model_dir, "ALIGNER_DIR": "",
                                                                     "MAX_ACTIVE_STREAMS": str(max_active)}))
    server = LocalTriton(repository, log_path=work / "tritonserver.log").start()
    try:
        server.wait_ready(timeout=900)
        asyncio.run(_one(server.grpc_url, 4, 0))  # a first request, like any client's
        rows = {}
        for n in counts:
            async def many():
                start = time.perf_counter()
                results = await asyncio.gather(*(_one(server.grpc_url, frames, 100 + i) for i in range(n)))
                return results, time.perf_counter() - start

            results, wall = asyncio.run(many())
            audio_s = sum(r["frames"] for r in results) * FRAME_SECONDS
            ttfas = [r["ttfa"] for r in results]
            rows[str(n)] = {"audio_s_per_wall_s": audio_s / wall, "wall_s": wall,
                            "ttfa_p50_ms": 1000 * percentile(ttfas, 50), "ttfa_p95_ms": 1000 * percentile(ttfas, 95)}
        base = rows[str(counts[0])]["audio_s_per_wall_s"]
        for row in rows.values():
            row["vs_first"] = row["audio_s_per_wall_s"] / base
        return rows
    finally:
        server.stop()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", default=os.environ.get("QWEN_TTS_MODEL_DIR") or str(ROOT / "build" / "tiny-model"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--profile", default="cpu", choices=("cpu", "gpu"))
    parser.add_argument("--frames", type=int, default=80, help="frames per stream")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--streams", default="1,4,16,32", help="in-process concurrency sweep")
    parser.add_argument("--triton-streams", default="1,4,16", help="through-Triton concurrency sweep")
    parser.add_argument("--skip-triton", action="store_true")
    parser.add_argument("--pad-batches", action="store_true",
                        help="in-process sweeps pad each step to a batch bucket and its KV span to a span bucket "
                             "(the shapes a CUDA graph per bucket needs) instead of the batch's own shapes")
    parser.add_argument("--noise", default="reference", choices=("reference", "counter"),
                        help="sampling noise: each request's generator drawn on the host (reference) or a hash "
                             "drawn inside the step (counter)")
    parser.add_argument("--output", type=Path, default=ROOT / "results" / "bench_core.json")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    counts = [int(n) for n in args.streams.split(",")]
    loaded, prompt = _setup(args.model_dir, args.device, args.dtype)
    results = {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "host": platform.node(),
               "cpus": os.cpu_count(), "model_dir": args.model_dir, "device": args.device, "frames": args.frames,
               "single_stream": single_stream(loaded, prompt, args.frames, args.runs),
               "pad_batches": args.pad_batches, "noise": args.noise,
               "engine_sampled": engine_throughput(loaded, prompt, counts, args.frames, False, args.pad_batches,
                                                   args.noise),
               "engine_greedy": engine_throughput(loaded, prompt, counts, args.frames, True, args.pad_batches,
                                                  args.noise),
               "decoder": decoder_cost(loaded)}
    del loaded
    if not args.skip_triton:
        triton_counts = [int(n) for n in args.triton_streams.split(",")]
        results["triton"] = through_triton(args.model_dir, args.profile, args.frames, triton_counts,
                                           max_active=max(triton_counts))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2))
    single = results["single_stream"]
    print(f"one stream, in-process: TTFA {single['ttfa_ms']:.0f} ms, {single['per_frame_ms']:.1f} ms/frame, "
          f"RTF {single['rtf']:.2f}")
    for mode in ("sampled", "greedy"):
        for n, row in results[f"engine_{mode}"].items():
            print(f"engine {mode:7s} {n:>2} streams: {row['frames_per_s']:7.1f} frames/s (x{row['vs_first']:.1f}), "
                  f"step {row['step_ms']:.1f} ms, mean batch {row['mean_batch']:.1f}")
    for n, row in results["decoder"].items():
        print(f"codec decoder {n:>2} streams at once: {row['ms_per_frame']:.2f} ms/frame (x{row['vs_first']:.2f})")
    for n, row in results.get("triton", {}).items():
        print(f"Triton tts {n:>2} streams: {row['audio_s_per_wall_s']:.1f} audio s per wall s (x{row['vs_first']:.1f}), "
              f"first audio p50 {row['ttfa_p50_ms']:.0f} ms, p95 {row['ttfa_p95_ms']:.0f} ms")
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
