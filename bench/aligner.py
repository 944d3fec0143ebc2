"""The word aligner's cost per second of audio, at 1 and at 16 concurrent streams.

    python -m bench.aligner [--presets tiny,full] [--repeats 5] [--full-repeats 2] [--output results/aligner.json]

Utterances of 3-10 s (a voiced synthetic signal at 24 kHz, about 2.5 words per second of English) go through
``WordAligner.align_batch`` on CPU in float32, as the Triton model runs them: one stream is one utterance per
call; 16 streams are one call with 16 utterances (one dynamic batch, aligned one after another: its last
utterance waits for the whole call). Beside it, qwen-asr's own padded batch (``align()`` on all 16 at once),
which the aligner does not use because it is not exact: how many of the 16 it changes is reported too.
``tiny`` is the tiny random-weight aligner, ``full`` the real Qwen3-ForcedAligner-0.6B sizes with random weights
(built under build/ on first use, 1.8 GB; its tokenizer is the tiny one, which cuts words into more tokens than
the real one). The best of the repeats counts. Prints numbers and writes them; nothing is asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
WORDS = ("the next train to the airport leaves at ten past four from platform two and your order should arrive "
         "by wednesday afternoon so please tell everyone who was invited about the new time").split()
SAMPLE_RATE = 24000
STREAMS = 16
ALIGNER_DIRS = {"tiny": ROOT / "build" / "tiny-aligner", "full": ROOT / "build" / "aligner-full"}


def utterances(count: int, seed: int) -> list:
    """(audio, text) pairs of 3-10 s, deterministic."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import synthetic_reference

    rng = np.random.default_rng(seed)
    made = []
    for index in range(count):
        seconds = float(rng.uniform(3.0, 10.0))
        words = [str(w) for w in rng.choice(WORDS, max(1, round(seconds * 2.5)))]
        text = " ".join(words).capitalize() + "."
        made.append((synthetic_reference(seconds=seconds, seed=seed * 100 + index), text))
    return made


def _timed(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def measure(preset: str, repeats: int) -> dict:
    import torch

    from tts_engine.alignment import AlignItem, load_aligner
    from tts_engine.alignment.tiny_aligner import ensure_tiny_aligner

    aligner = load_aligner(ensure_tiny_aligner(ALIGNER_DIRS[preset], preset), device="cpu", dtype="fp32")
    batch = utterances(STREAMS, seed=1)
    items = [AlignItem(audio, SAMPLE_RATE, text, "English") for audio, text in batch]
    audio_s = sum(len(audio) for audio, _ in batch) / SAMPLE_RATE
    padded_result = []

    def padded():
        padded_result[:] = aligner.aligner.align([(a, SAMPLE_RATE) for a, _ in batch], [t for _, t in batch],
                                                 ["English"] * len(batch))

    aligner.align_batch(items)  # warm-up: the first call at each shape allocates
    padded()
    one_each, sixteen, padded_runs = [[] for _ in items], [], []
    for _ in range(repeats):  # interleaved, so that a busy moment of a shared machine hits all three alike
        for index, item in enumerate(items):
            one_each[index].append(_timed(lambda: aligner.align_batch([item])))
        sixteen.append(_timed(lambda: aligner.align_batch(items)))
        padded_runs.append(_timed(padded))
    exact = aligner.align_batch(items)
    changed = sum(1 for words, result in zip(exact, padded_result)
                  if [(w.start_ms, w.end_ms) for w in words]
                  != [(round(r.start_time * 1000), round(r.end_time * 1000)) for r in result])
    # Best of the repeats (per utterance for one stream): on a shared machine the other runs measure the
    # neighbours as much as the aligner.
    one_stream = sum(min(runs) for runs in one_each)
    return {
        "utterances": STREAMS, "audio_s": round(audio_s, 1), "torch_threads": torch.get_num_threads(),
        "repeats": repeats, "load_average_1min": round(os.getloadavg()[0], 1),
        "ms_per_audio_s": {"1_stream": round(1000 * one_stream / audio_s, 1),
                           "16_streams": round(1000 * min(sixteen) / audio_s, 1),
                           "16_streams_qwen_asr_padded_batch": round(1000 * min(padded_runs) / audio_s, 1)},
        "latency_s": {"1_stream_median_utterance": round(statistics.median(min(runs) for runs in one_each), 3),
                      "16_streams_whole_batch": round(min(sixteen), 2),
                      "16_streams_qwen_asr_padded_batch": round(min(padded_runs), 2)},
        "padded_batch_items_changed": f"{changed}/{STREAMS}",
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="tiny,full")
    parser.add_argument("--repeats", type=int, default=5, help="runs of the tiny preset (best one counts)")
    parser.add_argument("--full-repeats", type=int, default=2, help="runs of the full preset (about 2 min each)")
    parser.add_argument("--output", type=Path, default=ROOT / "results" / "aligner.json")
    args = parser.parse_args(argv)
    results = {"device": "cpu", "dtype": "fp32", "cpu_count": os.cpu_count(), "machine": platform.processor()
               or platform.machine(), "presets": {}}
    for preset in args.presets.split(","):
        results["presets"][preset] = measure(preset, args.full_repeats if preset == "full" else args.repeats)
        print(preset, json.dumps(results["presets"][preset]), flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
