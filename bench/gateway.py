"""Gateway benchmark: time to first audio through the gateway vs straight to Triton, and under load.

    python -m bench.gateway [--runs 10] [--sessions 1,8,32] [--utterances 2]

Under load, each of N sessions is one WebSocket that speaks U utterances one after another, all sessions at
once; errors are counted by code. Prints numbers and writes results/bench_gateway.json; nothing is asserted.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
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


async def session(url: str, utterances: int) -> tuple[list[float], list[str]]:
    """One WebSocket session speaking ``utterances`` utterances in turn: their first-audio times and error codes."""
    from websockets.asyncio.client import connect

    firsts, errors = [], []
    async with connect(url, max_size=None, open_timeout=30) as ws:
        ready = json.loads(await ws.recv())
        if ready["type"] == "error":
            return firsts, [ready["code"]]
        await ws.send(json.dumps({"type": "start", "language": "English"}))
        json.loads(await ws.recv())
        for index in range(utterances):
            started, first = time.monotonic(), None
            await ws.send(json.dumps({"type": "speak", "text": TEXT, "requestId": str(index)}))
            while True:
                frame = await asyncio.wait_for(ws.recv(), 120)
                if isinstance(frame, bytes):
                    first = first if first is not None else time.monotonic() - started
                    continue
                message = json.loads(frame)
                if message["type"] == "error":
                    errors.append(message["code"])
                elif message["type"] == "complete":
                    break
            if first is not None:
                firsts.append(first)
    return firsts, errors


async def via_triton(url: str) -> float:
    from client.triton_tts import synthesize

    parameters = {"max_new_tokens": FRAMES_BASE + FRAMES_PER_CHAR * len(TEXT)}
    result = await synthesize(url, TEXT, voice="default", language="English", parameters=parameters)
    return result["first_audio_s"]


def measure(ws_url: str, triton_url: str, runs: int, sessions: list[int], utterances: int) -> dict:
    asyncio.run(via_gateway(ws_url))  # warm both paths
    asyncio.run(via_triton(triton_url))
    direct, gated = [], []
    for _ in range(runs):  # interleaved, so drift affects both alike
        direct.append(asyncio.run(via_triton(triton_url)))
        gated.append(asyncio.run(via_gateway(ws_url)))
    results = {"text_chars": len(TEXT), "runs": runs, "ttfa_direct_ms_p50": 1000 * statistics.median(direct),
               "ttfa_gateway_ms_p50": 1000 * statistics.median(gated), "sessions": {}}
    results["gateway_overhead_ms_p50"] = results["ttfa_gateway_ms_p50"] - results["ttfa_direct_ms_p50"]
    for n in sessions:
        async def load():
            started = time.monotonic()
            outcomes = await asyncio.gather(*(session(ws_url, utterances) for _ in range(n)))
            return outcomes, time.monotonic() - started

        outcomes, wall = asyncio.run(load())
        firsts = [t for f, _ in outcomes for t in f]
        errors: dict = {}
        for _, codes in outcomes:
            for code in codes:
                errors[code] = errors.get(code, 0) + 1
        results["sessions"][str(n)] = {
            "utterances": n * utterances, "completed_with_audio": len(firsts), "errors": errors, "wall_s": wall,
            "ttfa_p50_ms": 1000 * percentile(firsts, 50) if firsts else None,
            "ttfa_p95_ms": 1000 * percentile(firsts, 95) if firsts else None}
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", default=os.environ.get("QWEN_TTS_MODEL_DIR") or str(ROOT / "build" / "tiny-model"))
    parser.add_argument("--profile", default="cpu", choices=("cpu", "gpu"))
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--sessions", default="1,8,32")
    parser.add_argument("--utterances", type=int, default=2, help="utterances per session under load")
    parser.add_argument("--output", type=Path, default=ROOT / "results" / "bench_gateway.json")
    args = parser.parse_args(argv)
    from tools.gateway_local import GatewayProcess
    from tools.render_model_repository import render, resolve
    from tools.triton_local import LocalTriton

    work = Path(tempfile.mkdtemp(prefix="bench-gw-", dir=ROOT / "build"))
    values = resolve(args.profile, {"MODEL_DIR": args.model_dir})
    server = LocalTriton(render(work / "model_repository", values), log_path=work / "tritonserver.log").start()
    gateway = None
    try:
        server.wait_ready(900)
        gateway = GatewayProcess(server.grpc_url, values["VOICES_DIR"], work / "gateway.log", GATEWAY_LOG_LEVEL="WARNING",
                                 GATEWAY_FRAMES_BASE=str(FRAMES_BASE), GATEWAY_FRAMES_PER_CHAR=str(FRAMES_PER_CHAR))
        gateway.start().wait_ready()
        results = measure(gateway.ws, server.grpc_url, args.runs, [int(x) for x in args.sessions.split(",")],
                          args.utterances)
    finally:
        if gateway is not None:
            gateway.stop()
        server.stop()
    results = {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "model_dir": args.model_dir, **results}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2))
    print(f"TTFA straight to Triton p50 {results['ttfa_direct_ms_p50']:.0f} ms; through the gateway p50 "
          f"{results['ttfa_gateway_ms_p50']:.0f} ms; gateway overhead {results['gateway_overhead_ms_p50']:+.1f} ms")
    for n, row in results["sessions"].items():
        print(f"{n:>2} sessions x {args.utterances}: {row['completed_with_audio']}/{row['utterances']} with audio, "
              f"errors {row['errors'] or 'none'}, TTFA p50 {row['ttfa_p50_ms'] or 0:.0f} ms, "
              f"p95 {row['ttfa_p95_ms'] or 0:.0f} ms, {row['wall_s']:.1f} s")
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
