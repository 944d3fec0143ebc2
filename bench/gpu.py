"""GPU benchmark: the engine in-process, full-size architecture, bf16, the decode step captured as CUDA graphs.

    python -m bench.gpu [--model-dir DIR] [--streams 1,8,32,64,128] [--rates 5,10,20,40,80] [--seconds 20]

Without ``--model-dir`` it builds the full-size 0.6B architecture with random weights (``tiny_model --preset
full``; random weights never end by themselves, so every stream is capped near real speech: 0.8 frames per
character). It measures, on one GPU:
- the step time at each batch size (every stream in one captured step), and what that gives per stream
  (real-time factor) and in all (audio seconds per second);
- first audio of one stream: prefill, the first chunk's steps and its decode;
- an open-loop run at rising rates: Poisson arrivals of voice-agent replies into the real serving loop (pacing,
  admission) with their chunks decoded by the streaming decoder on the same GPU, each played at real time from
  its first chunk by a simulated listener; per rate served, refused, first audio p50/p95 and underruns, and the
  highest rate with no underrun and p95 first audio <= 100 ms;
- GPU memory: the weights, the KV pool, and per stream.
Writes results/gpu_bench.json. Runs on a CPU too (slowly; the tiny model with ``--model-dir build/tiny-model``),
which is how it is tested where no GPU is at hand. ``make bench-gpu``; see README: Benchmarks.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import random
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.openloop import REPLIES, percentile  # noqa: E402

FRAMES_PER_CHAR, FRAMES_BASE = 0.8, 4
P95_GOAL_S = 0.1


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _memory(device: str) -> float:
    import torch

    return torch.cuda.memory_allocated() / 2**30 if device.startswith("cuda") else 0.0


def step_times(talker, prompt, counts, steps: int = 20) -> dict:
    """Median step time with ``n`` streams in one step (the streams never end: EOS is suppressed)."""
    from tts_engine.generation.prompt import SynthesisRequest
    from tts_engine.generation.sampling import SamplingParams

    rows = {}
    for n in counts:
        streams = [talker.add(SynthesisRequest(REPLIES[i % len(REPLIES)], prompt, "English",
                                               SamplingParams(seed=i, max_new_tokens=steps + 8,
                                                              min_new_tokens=steps + 8))) for i in range(n)]
        timings = []
        for _ in range(steps):
            started = time.perf_counter()
            talker.step(streams)
            _sync(str(talker.device))
            timings.append(time.perf_counter() - started)
        for stream in streams:
            talker.remove(stream)
        step = statistics.median(timings[2:])
        rows[str(n)] = {"step_ms": round(1000 * step, 2), "rtf_per_stream": round(step / 0.08, 3),
                        "audio_s_per_s": round(n * 0.08 / step, 1)}
        print(f"{n:>4} streams: step {1000 * step:.2f} ms, {n * 0.08 / step:.0f} audio-s/s", flush=True)
    return rows


def open_loop(engine, decoder, prompt, rate: float, seconds: float, seed: int) -> dict:
    """Poisson arrivals into the serving loop; chunks decoded on arrival; listeners at real time."""
    from tts_contract.listener import Listener
    from tts_engine.errors import Overloaded
    from tts_engine.generation.prompt import SynthesisRequest
    from tts_engine.generation.sampling import SamplingParams
    from tts_engine.serving.outbox import CallbackSink

    rng = random.Random(seed)
    chunks: "queue.Queue" = queue.Queue()
    records, lock = [], threading.Lock()

    def submit(index: int, text: str) -> None:
        record = {"submitted": time.monotonic(), "first": None, "clock": Listener(), "refused": False,
                  "state": decoder.new_state(), "ended": threading.Event()}
        with lock:
            records.append(record)
        frames = int(FRAMES_BASE + FRAMES_PER_CHAR * len(text))
        request = SynthesisRequest(text, prompt, "English", SamplingParams(seed=index, max_new_tokens=frames + 1,
                                                                           min_new_tokens=frames + 1))
        engine.submit(engine.new_id(), request, CallbackSink(lambda chunk, i, last: chunks.put((record, chunk)),
                                                             lambda error: chunks.put((record, error))))

    def decode_loop(stop: threading.Event) -> None:  # the codec decoder's work, as codec_decoder does it
        while not stop.is_set() or not chunks.empty():
            try:
                record, item = chunks.get(timeout=0.05)
            except queue.Empty:
                continue
            if item is None or isinstance(item, BaseException):
                record["refused"] = isinstance(item, Overloaded)
                record["ended"].set()
                continue
            audio = decoder.decode(record["state"], item)
            now = time.monotonic()
            if record["first"] is None:
                record["first"] = now - record["submitted"]
            record["clock"].add(len(audio) / 24000, now)

    stop = threading.Event()
    worker = threading.Thread(target=decode_loop, args=(stop,), daemon=True)
    worker.start()
    started, t, index = time.monotonic(), rng.expovariate(rate), 0
    while t < seconds:
        time.sleep(max(0.0, started + t - time.monotonic()))
        submit(index, rng.choice(REPLIES))
        index += 1
        t += rng.expovariate(rate)
    for record in list(records):
        record["ended"].wait(120)
    stop.set()
    worker.join(30)
    served = [r for r in records if not r["refused"] and r["first"] is not None]
    firsts = [r["first"] for r in served]
    row = {"rate": rate, "arrivals": len(records), "served": len(served),
           "refused": sum(1 for r in records if r["refused"]),
           "first_audio_ms": {"p50": round(1000 * (percentile(firsts, 50) or 0)),
                              "p95": round(1000 * (percentile(firsts, 95) or 0))},
           "underran": sum(1 for r in served if r["clock"].underruns),
           "stall_s": round(sum(r["clock"].stalled_s for r in served), 3)}
    row["holds"] = bool(served) and not row["refused"] and not row["underran"] and \
        (percentile(firsts, 95) or 1) <= P95_GOAL_S
    print(f"{rate:>5g}/s: {row['served']}/{row['arrivals']} served, refused {row['refused']}, first audio "
          f"p50/p95 {row['first_audio_ms']['p50']}/{row['first_audio_ms']['p95']} ms, underran {row['underran']}"
          f"{'  HOLDS' if row['holds'] else ''}", flush=True)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", help="default: build the full-size architecture with random weights")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--streams", default="1,8,32,64,128")
    parser.add_argument("--rates", default="5,10,20,40,80")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--no-graphs", action="store_true", help="step eagerly (what graphs buy)")
    parser.add_argument("--output", type=Path, default=ROOT / "results" / "gpu_bench.json")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from tts_engine.codec.decoder import StreamingDecoder
    from tts_engine.serving.engine import Engine
    from tts_engine.serving.scheduler import SchedulerConfig
    from tts_engine.generation.talker import BatchedTalker
    from tts_engine.graphs import batch_buckets
    from tts_engine.loading import load_model
    from tts_engine.voices.prompts import build_prompt
    from tts_engine.voices.store import VoiceStore

    model_dir = args.model_dir or str(ROOT / "build" / "full-random-model")
    if not args.model_dir and not (Path(model_dir) / "config.json").exists():
        from tts_engine.tiny_model import build_tiny_model

        print("building the full-size architecture with random weights ...", flush=True)
        build_tiny_model(model_dir, preset="full")
    started = time.perf_counter()
    loaded = load_model(model_dir, device=args.device, dtype=args.dtype)
    results = {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "model_dir": model_dir,
               "device": loaded.device, "dtype": str(loaded.dtype), "load_s": round(time.perf_counter() - started, 1)}
    if loaded.device.startswith("cuda"):
        results["gpu"] = torch.cuda.get_device_name()
    weights_gib = _memory(loaded.device)
    store = VoiceStore(ROOT / "voices", builder=lambda a, sr, t: build_prompt(loaded.tts, a, sr, t),
                       fingerprint=loaded.fingerprint)
    prompt = store.get_prompt(None)[1]
    graphs = loaded.device.startswith("cuda") and not args.no_graphs
    counts = [int(n) for n in args.streams.split(",")]
    rows = max(args.rows, max(counts))
    talker = BatchedTalker(loaded.tts, rows=rows, max_tokens=2048, pool_tokens=rows * 1024,
                           pad_batches=graphs, noise="counter" if graphs else "reference")
    results["memory_gib"] = {"weights": round(weights_gib, 2), "kv_pool": round(talker.pool.nbytes / 2**30, 2),
                             "kv_per_token_kib": round(talker.pool.bytes_per_token / 1024, 1)}
    if graphs:
        started = time.perf_counter()
        talker.capture_graphs()
        results["capture_s"] = round(time.perf_counter() - started, 1)
        results["memory_gib"]["after_capture"] = round(_memory(loaded.device), 2)
    with torch.inference_mode():
        results["steps"] = step_times(talker, prompt, counts)
    decoder = StreamingDecoder(loaded.tts.model.speech_tokenizer.model, capacity=2 * rows + 1,
                               buckets=batch_buckets(rows) if graphs else None)
    if graphs:
        started = time.perf_counter()
        decoder.capture_graphs()
        results["decoder_capture_s"] = round(time.perf_counter() - started, 1)
    engine = Engine(talker, SchedulerConfig(rows=rows, max_queued=4 * rows), torch_threads=None, name="bench-gpu")
    try:
        from tts_engine.generation.prompt import SynthesisRequest
        from tts_engine.generation.sampling import SamplingParams

        engine.calibrate(SynthesisRequest("Calibrating the step time.", prompt, "English", SamplingParams(seed=0)))
        results["open_loop"] = [open_loop(engine, decoder, prompt, float(rate), args.seconds, 1000 + i)
                                for i, rate in enumerate(args.rates.split(","))]
        results["memory_gib"]["peak"] = round(torch.cuda.max_memory_allocated() / 2**30, 2) \
            if loaded.device.startswith("cuda") else 0.0
    finally:
        engine.stop()
    holding = [row["rate"] for row in results["open_loop"] if row["holds"]]
    results["highest_rate_holding"] = max(holding) if holding else None
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=1))
    print(json.dumps({k: v for k, v in results.items() if k not in ("open_loop",)}, indent=1))
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
