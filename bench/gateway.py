"""Gateway benchmark: time to first audio through the gateway vs straight to Triton, and under load.

    python -m bench.gateway [--runs 10] [--sessions 1,4,8]

Prints numbers and writes results/bench_gateway.json; nothing is asserted.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT = "The gateway should add almost nothing to the wait."
FRAMES_BASE, FRAMES_PER_CHAR = 4, 1  # the same frame budget for both paths


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


async def via_gateway(url: str) -> float:
    from client.speak import speak

    result = await speak(url, TEXT, language="English")
    return result["first_audio_s"]


async def via_triton(url: str) -> float:
    from client.triton_tts import synthesize

    parameters = {"max_new_tokens": FRAMES_BASE + FRAMES_PER_CHAR * len(TEXT)}
    result = await synthesize(url, TEXT, voice="default", language="English", parameters=parameters)
    return result["first_audio_s"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", default=os.environ.get("QWEN_TTS_MODEL_DIR") or str(ROOT / "build" / "tiny-model"))
    parser.add_argument("--profile", default="cpu", choices=("cpu", "gpu"))
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--sessions", default="1,4,8")
    parser.add_argument("--output", type=Path, default=ROOT / "results" / "bench_gateway.json")
    args = parser.parse_args(argv)
    from tools.render_model_repository import render, resolve
    from tools.triton_local import LocalTriton, free_port

    work = Path(tempfile.mkdtemp(prefix="bench-gw-", dir=ROOT / "build"))
    repository = render(work / "model_repository", resolve(args.profile, {"MODEL_DIR": args.model_dir,
                                                                          "MAX_ACTIVE_STREAMS": "16"}))
    server = LocalTriton(repository, log_path=work / "tritonserver.log").start()
    port = free_port()
    gateway = None
    try:
        server.wait_ready(900)
        env = {**os.environ, "TRITON_URL": server.grpc_url, "GATEWAY_PORT": str(port), "GATEWAY_HOST": "127.0.0.1",
               "GATEWAY_FRAMES_BASE": str(FRAMES_BASE), "GATEWAY_FRAMES_PER_CHAR": str(FRAMES_PER_CHAR),
               "GATEWAY_LOG_LEVEL": "WARNING"}
        gateway = subprocess.Popen([sys.executable, "-m", "gateway"], cwd=ROOT, env=env,
                                   stdout=open(work / "gateway.log", "wb"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        ws_url = f"ws://127.0.0.1:{port}/api/v1/speak"
        asyncio.run(via_gateway(ws_url))  # warm both paths
        asyncio.run(via_triton(server.grpc_url))
        direct, gated = [], []
        for _ in range(args.runs):  # interleaved, so drift affects both alike
            direct.append(asyncio.run(via_triton(server.grpc_url)))
            gated.append(asyncio.run(via_gateway(ws_url)))
        results = {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "model_dir": args.model_dir,
                   "text_chars": len(TEXT), "runs": args.runs,
                   "ttfa_direct_ms_p50": 1000 * statistics.median(direct),
                   "ttfa_gateway_ms_p50": 1000 * statistics.median(gated)}
        results["gateway_overhead_ms_p50"] = results["ttfa_gateway_ms_p50"] - results["ttfa_direct_ms_p50"]
        results["sessions"] = {}
        for n in (int(x) for x in args.sessions.split(",")):
            samples = []
            for _ in range(max(1, args.runs // n) if n > 1 else args.runs):
                async def many():
                    return await asyncio.gather(*(via_gateway(ws_url) for _ in range(n)))
                samples.extend(asyncio.run(many()))
            results["sessions"][str(n)] = {"ttfa_p50_ms": 1000 * percentile(samples, 50),
                                           "ttfa_p95_ms": 1000 * percentile(samples, 95), "samples": len(samples)}
    finally:
        if gateway is not None:
            gateway.terminate()
            gateway.wait(10)
        server.stop()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2))
    print(f"TTFA straight to Triton p50 {results['ttfa_direct_ms_p50']:.0f} ms; through the gateway p50 "
          f"{results['ttfa_gateway_ms_p50']:.0f} ms; gateway overhead {results['gateway_overhead_ms_p50']:+.1f} ms")
    for n, row in results["sessions"].items():
        print(f"{n:>2} sessions: TTFA p50 {row['ttfa_p50_ms']:.0f} ms, p95 {row['ttfa_p95_ms']:.0f} ms "
              f"({row['samples']} utterances)")
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
