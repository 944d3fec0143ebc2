"""Host time per step outside the model: what the serving loop itself costs per row, and how long the stepping
thread spends sending.

    python -m bench.host_overhead [--rows 16,64,128] [--step-ms 20] [--send-us 100] [--steps 150]
                                  [--output results/host_overhead.json]

The real serving loop (the engine over the batched talker, the tiny model's prefill, the talker's own per-row
bookkeeping) runs with the model step replaced by one of fixed, known cost (``--step-ms``: it sleeps, returns
frames of zeros and never ends a stream). Chunks go through the real emission path: the engine's outbox, the
Triton adapter's ``CodesSink`` (serialising each chunk's codes), the cancellation watcher asking about every
stream, and a response sender whose ``send`` costs ``--send-us`` (a stand-in for the call into the Triton parent).

For each row count, every row streams until the loop is in steady state; over ``--steps`` steps it measures the
time between two steps minus the fixed step (the loop's own time, sending and pacing included), per row, and the
milliseconds per step the stepping thread spent inside ``send``. Writes
``{"rows": {"16": {"host_us_per_row": ..., "send_ms_on_step_thread": ...}, ...}}``. Nothing is asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TEXT = "Benchmarks measure what users feel: the wait before the first sound, and the pace after it."


class FixedCostStep:
    """Stands in for the decode step (``real``, whose tables the prefill still reads): sleeps ``seconds``, returns
    zero frames and code 0 (never EOS); records when each step began and its batch."""

    def __init__(self, real, seconds: float):
        self.real, self.seconds = real, seconds
        self.starts: list[tuple[float, int]] = []
        self._outputs = {}

    def __getattr__(self, name):
        return getattr(self.real, name)

    def __call__(self, rows, text, blocks, noise_sub, noise_code0, candidates):
        import torch

        started = time.perf_counter()
        self.starts.append((started, rows.shape[0]))
        outputs = self._outputs.get(rows.shape[0])
        if outputs is None:
            outputs = self._outputs[rows.shape[0]] = (torch.zeros((rows.shape[0], 16), dtype=torch.long),
                                                      torch.zeros(rows.shape[0], dtype=torch.long))
        time.sleep(max(0.0, self.seconds - (time.perf_counter() - started)))
        return outputs


class _Sender:
    """A response sender whose ``send`` costs ``seconds`` (the call into the Triton parent); it notes the time
    spent on the stepping thread."""

    def __init__(self, seconds: float, stepping: threading.Event, spent: list):
        self.seconds, self.stepping, self.spent = seconds, stepping, spent

    def send(self, response=None, flags=0):
        started = time.perf_counter()
        time.sleep(self.seconds)
        if self.stepping.is_set() and threading.current_thread().name.endswith("-engine"):
            self.spent.append(time.perf_counter() - started)


def _pb_utils():
    """The pieces of triton_python_backend_utils the codes sink uses, without Triton."""
    return SimpleNamespace(Tensor=lambda name, value: (name, value),
                           InferenceResponse=lambda output_tensors=(), error=None: output_tensors,
                           TritonError=lambda message: message, TRITONSERVER_RESPONSE_COMPLETE_FINAL=1)


def measure(loaded, prompt, rows: int, step_s: float, send_s: float, steps: int) -> dict:
    from triton_support.cancellation import CancellationWatcher
    from triton_support.streaming import CodesSink
    from tts_engine.generation.prompt import SynthesisRequest
    from tts_engine.generation.sampling import SamplingParams
    from tts_engine.generation.talker import BatchedTalker
    from tts_engine.serving.engine import Engine
    from tts_engine.serving.scheduler import SchedulerConfig
    from tts_engine.serving.tickets import Deadline

    frames = 2048  # more than the benchmark steps: streams end when it stops the engine
    talker = BatchedTalker(loaded.tts, rows=rows, max_tokens=frames + 1024, pool_tokens=rows * 1024)
    step = talker.step_function = FixedCostStep(talker.step_function, step_s)
    engine = Engine(talker, SchedulerConfig(rows=rows, max_queued=rows), name="host-overhead")
    watcher = CancellationWatcher(engine.cancel)
    stepping, spent = threading.Event(), []
    pb_utils = _pb_utils()
    try:
        for _ in range(rows):
            request = SimpleNamespace(get_response_sender=lambda: _Sender(send_s, stepping, spent),
                                      is_cancelled=lambda: False)
            synthesis = SynthesisRequest(TEXT, prompt, "English", SamplingParams(greedy=True, max_new_tokens=frames,
                                                                               min_new_tokens=frames))
            stream_id = engine.new_id()
            engine.submit(stream_id, synthesis, CodesSink(pb_utils, request, stream_id, prompt.ref_code, watcher),
                          Deadline(max_wait_s=120))
        deadline = time.monotonic() + 120
        while (not step.starts or step.starts[-1][1] < rows) and time.monotonic() < deadline:
            time.sleep(0.05)
        warm = len(step.starts) + 20  # pacing settles: first chunks are out, chunks grow to the largest
        while len(step.starts) < warm + 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        stepping.set()
        spent.clear()
        chunks_before, start = engine.stats.chunks, len(step.starts)
        while len(step.starts) < start + steps + 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        stepping.clear()
        window = step.starts[start:start + steps + 1]
        chunks = engine.stats.chunks - chunks_before
    finally:
        engine.stop()
        watcher.stop()
    gaps = [(b[0] - a[0]) - step_s for a, b in zip(window, window[1:]) if a[1] == rows]
    host_ms = statistics.median(gaps) * 1000
    return {"host_us_per_row": round(1000 * host_ms / rows, 2), "host_ms_per_step": round(host_ms, 3),
            "host_ms_per_step_mean": round(1000 * statistics.mean(gaps), 3),
            "send_ms_on_step_thread": round(1000 * sum(spent) / max(1, len(gaps)), 3),
            "chunks_per_step": round(chunks / max(1, len(gaps)), 2), "steps": len(gaps)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", default=str(ROOT / "build" / "tiny-model"))
    parser.add_argument("--rows", default="16,64,128")
    parser.add_argument("--step-ms", type=float, default=20.0, help="the stand-in model step's cost")
    parser.add_argument("--send-us", type=float, default=100.0, help="each response send's cost")
    parser.add_argument("--steps", type=int, default=150, help="steps measured per row count")
    parser.add_argument("--output", type=Path, default=ROOT / "results" / "host_overhead.json")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from tts_engine.loading import load_model
    from tts_engine.tiny_model import build_tiny_model, is_current
    from tts_engine.voices.prompts import build_prompt
    from tts_engine.voices.store import VoiceStore

    if not is_current(Path(args.model_dir)):
        build_tiny_model(args.model_dir)
    loaded = load_model(args.model_dir, device="cpu", dtype="fp32")
    store = VoiceStore(ROOT / "voices", builder=lambda a, sr, t: build_prompt(loaded.tts, a, sr, t),
                       fingerprint=loaded.fingerprint)
    prompt = store.get_prompt(None)[1]
    results = {"step_ms": args.step_ms, "send_us": args.send_us, "rows": {}}
    for rows in [int(n) for n in args.rows.split(",")]:
        row = results["rows"][str(rows)] = measure(loaded, prompt, rows, args.step_ms / 1000, args.send_us / 1e6,
                                                   args.steps)
        print(f"{rows:>4} rows: host {row['host_ms_per_step']:.2f} ms per step = {row['host_us_per_row']:.1f} us "
              f"per row; stepping thread sent {row['send_ms_on_step_thread']:.2f} ms per step "
              f"({row['chunks_per_step']:.1f} chunks per step)", flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
