"""Soak with faults: sessions speak without pause while tritonserver is killed and restarted and clients drop.

    python -m bench.soak [--seconds 90] [--sessions 8] [--fault-every 25]

Every session loops: speak a sentence, read its audio and end message, sometimes vanish mid-utterance and
reconnect. Every ``--fault-every`` seconds tritonserver (the server only: its model processes must die on
their own) is killed and started again on the same ports. At the end: utterances completed, errors by code,
bytes lost (audio received vs ``audioLengthMs``; must be 0), leaked streams, decoder states and sessions,
orphaned model processes (all must be 0), first-audio percentiles and recovery times. Numbers are printed
and written to results/soak.json; nothing is asserted.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SENTENCES = ["Soak tests find what short tests miss.", "The server keeps speaking while things break.",
             "Every byte that was promised must arrive.", "Short one.",
             "A longer sentence keeps the talker busy for a while, which is when faults hurt most."]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))] if ordered else float("nan")


class Tally:
    def __init__(self):
        self.completed = self.cut = self.dropped = self.bytes_lost = 0
        self.errors: Counter = Counter()
        self.first_audio: list[float] = []
        self.last_success = 0.0


async def session_loop(url: str, rng: random.Random, tally: Tally, stop: asyncio.Event) -> None:
    from websockets.asyncio.client import connect

    while not stop.is_set():
        try:
            async with connect(url, max_size=None, open_timeout=10) as ws:
                ready = json.loads(await ws.recv())
                if ready["type"] == "error":
                    tally.errors[ready["code"]] += 1
                    await asyncio.sleep(0.5)
                    continue
                await ws.send(json.dumps({"type": "start"}))
                json.loads(await ws.recv())
                while not stop.is_set():
                    if not await speak_once(ws, rng, tally):
                        break  # vanished on purpose: reconnect
        except Exception:  # the gateway refused or dropped us: try again
            tally.errors["CONNECTION"] += 1
            await asyncio.sleep(0.5)


async def speak_once(ws, rng: random.Random, tally: Tally) -> bool:
    """One utterance; False when the client vanished on purpose."""
    started, first, received, refused = time.monotonic(), None, 0, False
    vanish = rng.random() < 0.05
    await ws.send(json.dumps({"type": "speak", "text": rng.choice(SENTENCES)}))
    while True:
        try:  # a speak refused before it was accepted (e.g. MODEL_LOADING) gets an error and no end message
            frame = await asyncio.wait_for(ws.recv(), 1.0 if refused else 120)
        except asyncio.TimeoutError:
            if refused:  # back off, as a client should while the model is loading
                await asyncio.sleep(0.5)
                return True
            raise
        if isinstance(frame, bytes):
            first = first if first is not None else time.monotonic() - started
            received += len(frame)
            if vanish:
                ws.transport.abort()  # no close frame, mid-utterance
                tally.dropped += 1
                return False
            continue
        message = json.loads(frame)
        if message["type"] == "error":
            tally.errors[message["code"]] += 1
            refused = True  # an end message may still follow (an accepted utterance that failed)
        elif message["type"] == "complete":
            if message["cancelled"]:
                tally.cut += 1
            else:
                tally.completed += 1
                tally.last_success = time.monotonic()
                tally.bytes_lost += abs(round(message["audioLengthMs"] * 24000 / 1000) * 2 - received)
                if first is not None:
                    tally.first_audio.append(first)
            return True


async def faults(server, tally: Tally, every: float, stop: asyncio.Event, gateway_http: str, log_dir: Path,
                 until: float) -> list:
    """Kill tritonserver every ``every`` seconds (none in the last 30 s, so each recovery is seen) and start it
    again; returns recovery figures per fault."""
    from tools.gateway_local import gateway_ready
    from tools.triton_local import LocalTriton

    recoveries = []
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), every)
            break
        except asyncio.TimeoutError:
            if until - time.monotonic() < 30:
                continue
        server.kill(server_only=True)
        killed = time.monotonic()
        await asyncio.sleep(1.0)
        fresh = LocalTriton(server.model_repository, server.http_port, server.grpc_port, server.metrics_port,
                            log_path=log_dir / f"tritonserver-{len(recoveries) + 1}.log").start()
        await asyncio.to_thread(fresh.wait_ready, 300)
        triton_ready = time.monotonic()
        while not gateway_ready(gateway_http, timeout=1) and time.monotonic() - triton_ready < 60:
            await asyncio.sleep(0.05)
        gateway_ready = time.monotonic()
        while tally.last_success < triton_ready and time.monotonic() - triton_ready < 60 and not stop.is_set():
            await asyncio.sleep(0.05)
        recovered = tally.last_success >= triton_ready  # else none completed before the soak ended (or in 60 s)
        recoveries.append({"down_s": triton_ready - killed, "gateway_ready_after_triton_s": gateway_ready - triton_ready,
                           "first_success_after_triton_s": tally.last_success - triton_ready if recovered else None,
                           "orphans": len(fresh.model_processes(orphans_only=True))})
        server.process, server._log_file = fresh.process, fresh._log_file
    return recoveries


def _metric(url: str, name: str) -> float:
    from tools.triton_local import scrape_metrics

    return scrape_metrics(url).get(name, float("nan"))


async def soak(seconds: float, sessions: int, fault_every: float) -> dict:
    from tools.gateway_local import GatewayProcess
    from tools.render_model_repository import render, resolve
    from tools.triton_local import LocalTriton

    work = Path(tempfile.mkdtemp(prefix="soak-", dir=ROOT / "build"))
    values = resolve("cpu", {"MODEL_DIR": os.environ.get("QWEN_TTS_MODEL_DIR") or str(ROOT / "build" / "tiny-model")})
    server = LocalTriton(render(work / "model_repository", values), log_path=work / "tritonserver-0.log").start()
    server.wait_ready(300)
    gateway = GatewayProcess(server.grpc_url, values["VOICES_DIR"], work / "gateway.log", GATEWAY_LOG_LEVEL="WARNING",
                             GATEWAY_READY_POLL_S="0.5", GATEWAY_FRAMES_BASE="4", GATEWAY_FRAMES_PER_CHAR="1").start()
    tally, stop, rng = Tally(), asyncio.Event(), random.Random(11)
    try:
        gateway.wait_ready()
        clients = [asyncio.create_task(session_loop(gateway.ws, random.Random(rng.random()), tally, stop))
                   for _ in range(sessions)]
        chaos = asyncio.create_task(faults(server, tally, fault_every, stop, gateway.http, work,
                                           until=time.monotonic() + seconds))
        await asyncio.sleep(seconds)
        stop.set()
        recoveries = await chaos
        await asyncio.wait(clients, timeout=60)
        await asyncio.sleep(3)  # let both models publish their last counters
        leaks = {"talker_streams": _metric(server.metrics_url, "qwen_tts_talker_active_streams"),
                 "talker_queued": _metric(server.metrics_url, "qwen_tts_talker_queued_streams"),
                 "decoder_states": _metric(server.metrics_url, "qwen_tts_decoder_active_streams"),
                 "gateway_sessions": _metric(gateway.http + "/metrics", "tts_gateway_active_sessions"),
                 "orphaned_model_processes": len(server.model_processes(orphans_only=True))}
    finally:
        gateway.stop()
        server.stop()
    return {"seconds": seconds, "sessions": sessions, "faults": len(recoveries), "utterances_completed": tally.completed,
            "utterances_cut": tally.cut, "clients_dropped_mid_utterance": tally.dropped,
            "errors": dict(tally.errors), "bytes_lost": tally.bytes_lost, "leaks": leaks, "recoveries": recoveries,
            "first_audio_ms": {f"p{q}": 1000 * percentile(tally.first_audio, q) for q in (50, 95, 99)}}


def _seconds(value) -> str:
    return "none" if value is None else f"{value:.2f} s"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=90)
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--fault-every", type=float, default=25)
    parser.add_argument("--output", type=Path, default=ROOT / "results" / "soak.json")
    args = parser.parse_args(argv)
    results = asyncio.run(soak(args.seconds, args.sessions, args.fault_every))
    results["when"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2))
    print(f"{results['seconds']:.0f} s, {results['sessions']} sessions, {results['faults']} Triton kills: "
          f"{results['utterances_completed']} utterances completed, {results['utterances_cut']} cut by faults, "
          f"{results['clients_dropped_mid_utterance']} clients vanished mid-utterance")
    print(f"errors by code: {results['errors'] or 'none'}")
    print(f"bytes lost: {results['bytes_lost']} (must be 0); leaks: {results['leaks']} (all must be 0)")
    print("first audio: " + ", ".join(f"{k} {v:.0f} ms" for k, v in results["first_audio_ms"].items()))
    for index, r in enumerate(results["recoveries"], 1):
        print(f"fault {index}: Triton down {r['down_s']:.1f} s; gateway ready {r['gateway_ready_after_triton_s']:.2f} s "
              f"and first completed utterance {_seconds(r['first_success_after_triton_s'])} after Triton was ready; "
              f"orphaned model processes {r['orphans']}")
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
