"""Interrupt latency: from `POST /api/v1/contracts/{id}/interrupt` to the last interrupted session's `complete`.

    python -m bench.interrupts [--trials 20] [--sessions 4] [--output results/interrupts.json]

One tritonserver (the tiny model, and the tiny aligner when it is built, as ``make run`` serves them), a real
redis-server and two gateway replicas sharing it. Each trial: every session of one contract speaks a long text,
(appended, still being written), and once each has played a random 0.3–1.0 s the interrupt is posted to the first replica. Scenarios:
- ``one_replica``: all sessions on the replica that takes the interrupt;
- ``two_replicas``: half on each, the other half reached through Redis;
- ``redis_killed``: Redis killed first; the first replica's sessions must still end at once (and the request
  must not hang), the other replica's play on (counted, then cancelled).
Prints numbers and writes them; nothing is asserted.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TEXT = ("Here is the long answer you asked for, read slowly and in full, so that there is plenty of it still to "
        "come when you decide you have heard enough and start talking over it, which is exactly what this "
        "measures, one trial after another, until the numbers settle down.")


def _percentile(values: list, q: float):
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)


async def _speak_until_playing(ws, request_id: str, contract: str) -> None:
    """An answer still being written (as an LLM writes it): in progress until interrupted, however fast the
    machine generates."""
    await ws.send(json.dumps({"type": "start", "contractId": contract, "encoding": "pcm16"}))
    while json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] != "started":
        pass
    await ws.send(json.dumps({"type": "append", "text": TEXT, "requestId": request_id}))
    while not isinstance(await asyncio.wait_for(ws.recv(), 30), bytes):
        pass


async def _until_complete(ws, timeout: float) -> tuple[float, dict]:
    async with asyncio.timeout(timeout):
        while True:
            frame = await ws.recv()
            if isinstance(frame, str):
                message = json.loads(frame)
                if message["type"] == "complete":
                    return time.monotonic(), message


async def _trial(gateways, placement: list, rng: random.Random, contract: str, bus_alive: bool) -> dict:
    import httpx
    from websockets.asyncio.client import connect

    sockets = [await connect(gateways[p].ws, max_size=None, open_timeout=10) for p in placement]
    try:
        for ws in sockets:
            json.loads(await ws.recv())  # ready
        await asyncio.gather(*(_speak_until_playing(ws, f"u{i}", contract) for i, ws in enumerate(sockets)))
        await asyncio.sleep(rng.uniform(0.3, 1.0))
        reachable = [ws for ws, p in zip(sockets, placement) if p == 0 or bus_alive]
        waiting = [asyncio.create_task(_until_complete(ws, 10)) for ws in reachable]
        async with httpx.AsyncClient(timeout=10) as http:
            posted = time.monotonic()
            answer = (await http.post(f"{gateways[0].http}/api/v1/contracts/{contract}/interrupt")).json()
            answered = time.monotonic()
        ends = await asyncio.gather(*waiting)
        last = max(at for at, _ in ends)
        unreached = [ws for ws in sockets if ws not in reachable]
        still_playing = 0
        for ws in unreached:  # the other replica never heard it (the bus is down): its utterance plays on
            try:
                await _until_complete(ws, 0.5)
            except TimeoutError:
                still_playing += 1
            await ws.send(json.dumps({"type": "cancel"}))
            await _until_complete(ws, 10)
        return {"last_complete_ms": 1000 * (last - posted), "answer_ms": 1000 * (answered - posted),
                "interrupted": sum(1 for _, m in ends if m.get("interrupted")), "reached": len(reachable),
                "other_replica_still_playing": still_playing, "heard_text_given":
                    sum(1 for _, m in ends if m.get("heardText") is not None), "answer": answer}
    finally:
        for ws in sockets:
            await ws.close()


def _summary(trials: list) -> dict:
    last = [t["last_complete_ms"] for t in trials]
    answer = [t["answer_ms"] for t in trials]
    return {"trials": len(trials), "post_to_last_complete_ms": {"p50": _percentile(last, 0.5),
                                                                 "p95": _percentile(last, 0.95),
                                                                 "max": round(max(last), 1),
                                                                 "mean": round(statistics.mean(last), 1)},
            "post_answered_ms": {"p50": _percentile(answer, 0.5), "p95": _percentile(answer, 0.95)},
            "sessions_interrupted": sum(t["interrupted"] for t in trials),
            "sessions_expected": sum(t["reached"] for t in trials),
            "with_heard_text": sum(t["heard_text_given"] for t in trials),
            "other_replica_still_playing": sum(t["other_replica_still_playing"] for t in trials)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", default=str(ROOT / "build" / "tiny-model"))
    parser.add_argument("--aligner-dir", default=str(ROOT / "build" / "tiny-aligner"))
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--output", type=Path, default=ROOT / "results" / "interrupts.json")
    args = parser.parse_args(argv)
    from bench.openloop import start_gateway, start_triton
    from tools.redis_local import LocalRedis

    aligner = Path(args.aligner_dir).is_dir()
    server, values, work = start_triton(args.model_dir, aligner_dir=args.aligner_dir if aligner else None,
                                        prefix="bench-interrupts-")
    redis = LocalRedis(work / "redis.log").start()
    gateways = []
    rng = random.Random(args.seed)
    results = {"sessions": args.sessions, "aligner": aligner, "scenarios": {}}
    try:
        for index in range(2):
            gateways.append(start_gateway(server, values, work, f"gateway-{index}", GATEWAY_REDIS_URL=redis.url))
        time.sleep(1.0)  # both subscribed
        half = [0] * (args.sessions - args.sessions // 2) + [1] * (args.sessions // 2)
        scenarios = [("one_replica", [0] * args.sessions, True), ("two_replicas", half, True),
                     ("redis_killed", half, False)]
        for name, placement, bus_alive in scenarios:
            if not bus_alive:
                redis.kill()
                time.sleep(2.0)  # the replicas notice
            trials = [asyncio.run(_trial(gateways, placement, rng, f"{name}-{t}", bus_alive))
                      for t in range(args.trials)]
            results["scenarios"][name] = _summary(trials)
            print(name, json.dumps(results["scenarios"][name]), flush=True)
    finally:
        for gateway in gateways:
            gateway.stop()
        redis.stop()
        server.stop()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
