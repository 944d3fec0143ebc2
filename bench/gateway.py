"""Gateway benchmark: time to first audio through the gateway vs straight to Triton, and under load.

    python -m bench.gateway [--runs 10] [--sessions 1,8,16x3,32x2] [--utterances 2]

Under load (closed loop), each of N sessions is one legacy client (no `start`) that speaks U utterances one
after another, all sessions at once, and honours RATE_LIMITED (waits `retryAfterMs`, then speaks the same text
again): utterances served and lost, refusals and how soon they came, retries served, first audio (from the
speak that was served, and from the first speak: what the listener waited, retries included), and what a
listener playing each utterance at real time hears. Prints numbers and writes results/bench_gateway.json;
nothing is asserted.
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


async def session(url: str, utterances: int, max_retries: int = 20) -> dict:
    """One legacy client (no `start`: `speak`, PCM16 frames, `audio_end`) speaking ``utterances`` utterances in
    turn, honouring RATE_LIMITED: it waits ``retryAfterMs`` and speaks the same text again. Its listener plays
    each utterance at real time from its first byte."""
    from websockets.asyncio.client import connect

    from tts_contract.listener import Listener

    out = {"firsts": [], "waits": [], "errors": [], "refusals": [], "retry_after_ms": [], "retries_served": 0,
           "lost": 0, "underruns": 0, "stall_s": 0.0}
    async with connect(url, max_size=None, open_timeout=30) as ws:
        ready = json.loads(await ws.recv())
        if ready["type"] == "error":
            out["errors"].append(ready["code"])
            out["lost"] = utterances
            return out
        for index in range(utterances):
            asked = time.monotonic()  # the listener waits from here, retries included
            for attempt in range(max_retries + 1):
                started, first, refused, listener = time.monotonic(), None, None, Listener()
                await ws.send(json.dumps({"type": "speak", "text": TEXT, "requestId": str(index)}))
                while True:
                    frame = await asyncio.wait_for(ws.recv(), 120)
                    now = time.monotonic()
                    if isinstance(frame, bytes):
                        first = first if first is not None else now - started
                        listener.add(len(frame) / 2 / 24000, now)
                        continue
                    message = json.loads(frame)
                    if message["type"] == "error":
                        out["errors"].append(message["code"])
                        if message["code"] == "RATE_LIMITED" and first is None:
                            refused = message.get("retryAfterMs") or 1000
                            out["refusals"].append(now - started)
                            out["retry_after_ms"].append(refused)
                    elif message["type"] == "audio_end":
                        break
                if refused is None:
                    if first is not None:
                        out["firsts"].append(first)
                        out["waits"].append(started + first - asked)
                        out["retries_served"] += attempt > 0
                        out["underruns"] += listener.underruns
                        out["stall_s"] += listener.stalled_s
                    break
                await asyncio.sleep(refused / 1000)
            else:
                out["lost"] += 1
    return out


async def via_triton(url: str) -> float:
    from client.triton_tts import synthesize

    parameters = {"max_new_tokens": FRAMES_BASE + FRAMES_PER_CHAR * len(TEXT)}
    result = await synthesize(url, TEXT, voice="default", language="English", parameters=parameters)
    return result["first_audio_s"]


def measure(ws_url: str, triton_url: str, runs: int, loads: list[tuple[int, int]]) -> dict:
    asyncio.run(via_gateway(ws_url))  # warm both paths
    asyncio.run(via_triton(triton_url))
    direct, gated = [], []
    for _ in range(runs):  # interleaved, so drift affects both alike
        direct.append(asyncio.run(via_triton(triton_url)))
        gated.append(asyncio.run(via_gateway(ws_url)))
    results = {"text_chars": len(TEXT), "runs": runs, "ttfa_direct_ms_p50": 1000 * statistics.median(direct),
               "ttfa_gateway_ms_p50": 1000 * statistics.median(gated), "sessions": {}}
    results["gateway_overhead_ms_p50"] = results["ttfa_gateway_ms_p50"] - results["ttfa_direct_ms_p50"]
    for n, utterances in loads:
        async def load():
            started = time.monotonic()
            outcomes = await asyncio.gather(*(session(ws_url, utterances) for _ in range(n)))
            return outcomes, time.monotonic() - started

        outcomes, wall = asyncio.run(load())
        firsts = [t for o in outcomes for t in o["firsts"]]
        waits = [t for o in outcomes for t in o["waits"]]
        refusals = [t for o in outcomes for t in o["refusals"]]
        errors: dict = {}
        for o in outcomes:
            for code in o["errors"]:
                errors[code] = errors.get(code, 0) + 1
        results["sessions"][f"{n}x{utterances}"] = {
            "utterances": n * utterances, "served": len(firsts), "lost": sum(o["lost"] for o in outcomes),
            "refusals": len(refusals), "refused_after_ms_max": round(1000 * max(refusals)) if refusals else None,
            "retry_after_ms_p50": percentile([r for o in outcomes for r in o["retry_after_ms"]], 50)
            if refusals else None,
            "served_after_a_retry": sum(o["retries_served"] for o in outcomes), "errors": errors, "wall_s": wall,
            "underruns": sum(o["underruns"] for o in outcomes),
            "stall_s": round(sum(o["stall_s"] for o in outcomes), 3),
            "ttfa_p50_ms": 1000 * percentile(firsts, 50) if firsts else None,
            "ttfa_p95_ms": 1000 * percentile(firsts, 95) if firsts else None,
            # what the listener waited for its first audio from its first speak, refusals and retries included
            "wait_p50_ms": 1000 * percentile(waits, 50) if waits else None,
            "wait_p95_ms": 1000 * percentile(waits, 95) if waits else None}
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", default=os.environ.get("QWEN_TTS_MODEL_DIR") or str(ROOT / "build" / "tiny-model"))
    parser.add_argument("--profile", default="cpu", choices=("cpu", "gpu"))
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--sessions", default="1,8,16x3,32x2",
                        help="loads: N (sessions, --utterances each) or NxU (N sessions of U utterances)")
    parser.add_argument("--utterances", type=int, default=2, help="utterances per session under load")
    parser.add_argument("--output", type=Path, default=ROOT / "results" / "bench_gateway.json")
    args = parser.parse_args(argv)
    from tools.gateway_local import GatewayProcess
    from tools.render_model_repository import render, resolve
    from tools.triton_local import LocalTriton

    work = Path(tempfile.mkdtemp(prefix="bench-gw-", dir=ROOT / "build"))
    # Speech alone: no aligner (the GPU profile's default aligner directory need not exist where this runs).
    values = resolve(args.profile, {"MODEL_DIR": args.model_dir, "ALIGNER_DIR": ""})
    server = LocalTriton(render(work / "model_repository", values), log_path=work / "tritonserver.log").start()
    gateway = None
    try:
        server.wait_ready(900)
        gateway = GatewayProcess(server.grpc_url, values["VOICES_DIR"], work / "gateway.log", GATEWAY_LOG_LEVEL="WARNING",
                                 GATEWAY_FRAMES_BASE=str(FRAMES_BASE), GATEWAY_FRAMES_PER_CHAR=str(FRAMES_PER_CHAR))
        gateway.start().wait_ready()
        loads = [(int(x.split("x")[0]), int(x.split("x")[1]) if "x" in x else args.utterances)
                 for x in args.sessions.split(",")]
        results = measure(gateway.ws, server.grpc_url, args.runs, loads)
    finally:
        if gateway is not None:
            gateway.stop()
        server.stop()
    results = {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "model_dir": args.model_dir, **results}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2))
    print(f"TTFA straight to Triton p50 {results['ttfa_direct_ms_p50']:.0f} ms; through the gateway p50 "
          f"{results['ttfa_gateway_ms_p50']:.0f} ms; gateway overhead {results['gateway_overhead_ms_p50']:+.1f} ms")
    for load, row in results["sessions"].items():
        print(f"{load:>5}: {row['served']}/{row['utterances']} served, {row['lost']} lost; {row['refusals']} refusals "
              f"(latest {row['refused_after_ms_max']} ms after the speak, retry hint p50 {row['retry_after_ms_p50']} "
              f"ms; {row['served_after_a_retry']} served after a retry); TTFA p50 {row['ttfa_p50_ms'] or 0:.0f} ms, "
              f"p95 {row['ttfa_p95_ms'] or 0:.0f} ms; waited from the first speak p50 {row['wait_p50_ms'] or 0:.0f} ms, "
              f"p95 {row['wait_p95_ms'] or 0:.0f} ms; underruns {row['underruns']} ({row['stall_s']} s); "
              f"{row['wall_s']:.1f} s")
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
