"""perf_analyzer sweep over concurrency for `tts` and `talker`, reporting time to first response.

    python -m tools.perf [--url localhost:8001] [--models tts,talker] [--concurrency 1,2,4,8] [--out perf/results]

perf_analyzer's printed latency for streaming models is the last response's; the time to first response
comes from its profile export, which this script summarises (p50/p95/p99, responses/s).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q / 100
    low, high = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (k - low)


def summarise_export(export: dict) -> list[dict]:
    """One row per experiment: time to first response and to last response (ms), requests, responses/s."""
    rows = []
    for experiment in export.get("experiments", []):
        requests = experiment.get("requests", [])
        first, last, responses = [], [], 0
        for request in requests:
            stamps = request.get("response_timestamps") or []
            if not stamps:
                continue
            first.append((stamps[0] - request["timestamp"]) / 1e6)
            last.append((stamps[-1] - request["timestamp"]) / 1e6)
            responses += len(stamps)
        bounds = experiment.get("window_boundaries") or []
        seconds = (bounds[-1] - bounds[0]) / 1e9 if len(bounds) >= 2 else None
        info = experiment.get("experiment", {})
        rows.append({
            "mode": info.get("mode"), "value": info.get("value"), "requests": len(first),
            "ttfr_ms_p50": percentile(first, 50), "ttfr_ms_p95": percentile(first, 95),
            "ttfr_ms_p99": percentile(first, 99), "last_response_ms_p50": percentile(last, 50),
            "responses_per_s": responses / seconds if seconds else None,
            "ttfr_ms_mean": statistics.fmean(first) if first else float("nan"),
        })
    return rows


def find_perf_analyzer(install: bool = True) -> str | None:
    """PERF_ANALYZER, perf_analyzer on PATH, or the project's private install (made on first use)."""
    found = os.environ.get("PERF_ANALYZER") or shutil.which("perf_analyzer")
    if found or not install:
        return found
    script = ROOT / "tools" / "install_perf_analyzer.sh"
    done = subprocess.run(["bash", str(script)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    path = done.stdout.strip().splitlines()[-1] if done.returncode == 0 and done.stdout.strip() else ""
    return str(ROOT / path) if path else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=os.environ.get("PERF_URL", "localhost:8001"))
    parser.add_argument("--models", default=os.environ.get("PERF_MODELS", "tts,talker"))
    parser.add_argument("--concurrency", default=os.environ.get("PERF_CONCURRENCY", "1,2,4,8"))
    parser.add_argument("--max-new-tokens", type=int, default=int(os.environ.get("PERF_MAX_NEW_TOKENS", 120)))
    parser.add_argument("--requests", type=int, default=int(os.environ.get("PERF_REQUESTS", 16)),
                        help="requests per measurement window (count windows: stable on slow CPUs too)")
    parser.add_argument("--out", type=Path, default=ROOT / "perf" / "results")
    parser.add_argument("--no-install", action="store_true", help="do not install perf_analyzer when missing")
    args = parser.parse_args(argv)
    binary = find_perf_analyzer(install=not args.no_install)
    if binary is None:
        print("perf_analyzer not found (set PERF_ANALYZER or put it on PATH). On a GPU node run:\n"
              "  docker compose --profile perf run --rm perf", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {}
    for model in args.models.split(","):
        data = ROOT / "perf" / f"{model}_input.json"
        for concurrency in (int(c) for c in args.concurrency.split(",")):
            export = args.out / f"{model}_c{concurrency}.json"
            export.unlink(missing_ok=True)  # perf_analyzer refuses to overwrite an export
            command = [binary, "-m", model, "-u", args.url, "-i", "grpc", "--streaming",
                       "--input-data", str(data), f"--concurrency-range={concurrency}:{concurrency}",
                       "--request-parameter", f"max_new_tokens:{args.max_new_tokens}:int",
                       "--measurement-mode=count_windows",
                       f"--measurement-request-count={max(args.requests, 2 * concurrency)}",
                       "--stability-percentage=100", "--max-trials=6", "--profile-export-file", str(export)]
            print("+ " + " ".join(command), flush=True)
            done = subprocess.run(command)
            if done.returncode != 0:
                print(f"perf_analyzer failed for {model} at concurrency {concurrency}", file=sys.stderr)
                return done.returncode
            rows = summarise_export(json.loads(export.read_text()))
            summary.setdefault(model, {})[str(concurrency)] = rows[-1] if rows else {}
            row = summary[model][str(concurrency)]
            print(f"{model} c={concurrency}: time to first response p50 {row.get('ttfr_ms_p50', float('nan')):.0f} ms,"
                  f" p95 {row.get('ttfr_ms_p95', float('nan')):.0f} ms", flush=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"summary written to {args.out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
