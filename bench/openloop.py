"""Open-loop benchmark: what listeners hear as the arrival rate rises.

    python -m bench.openloop [--rates 0.5,1,2,3,4,6,8] [--seconds 40] [--transports ws,openai]
                             [--gateway http://127.0.0.1:8080]

Utterances arrive as a Poisson process, each on its own connection: a WebSocket session (`start`, then one
`speak`) or one OpenAI speech request (`response_format: pcm`, streamed). A simulated listener plays each one
at real time from its first byte (``tts_contract.listener.Listener``); every moment its buffer runs dry is an
underrun. Lengths are realistic: voice-agent replies of one or two sentences, 8-17 words, with the frame cap
near real speech (4 + 0.8 frames per character; the random-weight model never ends by itself). Per rate:
completed, refused (and how soon), first audio p50/p95/p99, utterances that underran, underruns and stall
seconds; the highest rate up to which every utterance is served with no underrun and p95 first audio <= 500
ms; and, beyond it, whether every utterance was either served in time without a gap or refused within 1.5 s. Without ``--gateway`` it starts
its own stack exactly as ``make run`` does (CPU profile, tiny model unless QWEN_TTS_MODEL_DIR is set). Prints
and writes results/openloop.json; nothing is asserted.
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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tts_contract.listener import Listener  # noqa: E402

SAMPLE_RATE = 24000
FRAMES_BASE, FRAMES_PER_CHAR = 4, 0.8  # near real speech: the random-weight model never stops by itself
P95_GOAL_S = 0.5
# Replies a voice agent gives: one or two sentences, 8-17 words.
REPLIES = [
    "Sure, I can help you with that right away.",
    "Your order has shipped and should arrive on Thursday afternoon.",
    "I found three restaurants nearby that are open until midnight.",
    "The meeting was moved to three o'clock. Do you want a reminder?",
    "It is currently sixteen degrees and cloudy in Berlin.",
    "Okay, I have added milk and eggs to your shopping list.",
    "Sorry, I did not catch that. Could you say it again?",
    "Your flight to Lisbon boards at gate twelve in forty minutes.",
    "The total comes to forty two dollars, including tax and delivery.",
    "I have booked a table for two at seven thirty tonight.",
    "That sounds great. Let me check the calendar for next week.",
    "Traffic is light, so you should get there in about twenty minutes.",
    "You have two new messages. The first one is from your sister.",
    "The package was left at the front door at ten fifteen this morning.",
    "I can transfer you to a specialist, or we can try again together.",
    "Your appointment is confirmed for Monday at nine in the morning.",
    "The battery is at eighty percent and charging normally.",
    "Here is a quick summary. Sales grew by twelve percent this quarter.",
    "I will remind you to call the pharmacy tomorrow before noon.",
    "There are no delays on your line at the moment.",
    "Good morning. You have four meetings today, and the first starts at nine.",
    "The recipe needs two cups of flour, one egg and a pinch of salt.",
    "Your password was changed successfully. Is there anything else I can do?",
    "The store closes at eight tonight and opens again at seven tomorrow.",
    "I could not find that contact. Would you like to add it now?",
    "The next train to the airport leaves in six minutes from platform two.",
    "Thanks for waiting. Your refund has been approved and processed.",
    "It looks like rain this afternoon, so take an umbrella with you.",
]


@dataclass
class Result:
    """One utterance as its listener experienced it."""

    transport: str
    arrival_s: float
    characters: int
    outcome: str = "failed"  # completed | refused | failed
    code: Optional[str] = None  # the error code, if any
    first_audio_s: Optional[float] = None
    refused_after_s: Optional[float] = None
    retry_after_ms: Optional[int] = None
    audio_s: float = 0.0
    underruns: int = 0
    stall_s: float = 0.0
    stalls: list = field(default_factory=list)


def _listen(result: Result, clock: Listener, started: float, nbytes: int) -> None:
    now = time.monotonic()
    if result.first_audio_s is None:
        result.first_audio_s = now - started
    clock.add(nbytes / 2 / SAMPLE_RATE, now)


def _finish(result: Result, clock: Listener) -> Result:
    result.audio_s, result.underruns = round(clock.audio_s, 3), clock.underruns
    result.stall_s, result.stalls = round(clock.stalled_s, 3), clock.stalls
    return result


async def ws_utterance(base: str, text: str, arrival: float, timeout: float) -> Result:
    """One WebSocket session: start, speak, listen until complete."""
    from websockets.asyncio.client import connect

    result, clock = Result("ws", round(arrival, 3), len(text)), Listener()
    url = base.replace("http", "ws", 1) + "/api/v1/speak"
    started = time.monotonic()
    try:
        async with asyncio.timeout(timeout):
            async with connect(url, max_size=None, open_timeout=10) as ws:
                ready = json.loads(await ws.recv())
                if ready["type"] == "error":  # refused at the door (too many sessions)
                    result.outcome, result.code = "refused", ready["code"]
                    result.refused_after_s = time.monotonic() - started
                    return result
                await ws.send(json.dumps({"type": "start", "language": "English"}))
                json.loads(await ws.recv())
                started = time.monotonic()
                await ws.send(json.dumps({"type": "speak", "text": text}))
                while True:
                    frame = await ws.recv()
                    if isinstance(frame, bytes):
                        _listen(result, clock, started, len(frame))
                        continue
                    message = json.loads(frame)
                    if message["type"] == "error":
                        result.code = message["code"]
                        if message["code"] == "RATE_LIMITED" and result.first_audio_s is None:
                            result.outcome = "refused"
                            result.refused_after_s = time.monotonic() - started
                            result.retry_after_ms = message.get("retryAfterMs")
                    elif message["type"] == "complete":
                        if result.code is None and not message.get("cancelled"):
                            result.outcome = "completed"
                        return _finish(result, clock)
    except (TimeoutError, OSError, Exception) as exc:  # noqa: B014 - every failure is a failed utterance
        result.code = result.code or type(exc).__name__
    return _finish(result, clock)


async def openai_utterance(http, base: str, text: str, arrival: float, timeout: float) -> Result:
    """One OpenAI speech request, streamed as raw PCM."""
    result, clock = Result("openai", round(arrival, 3), len(text)), Listener()
    body = {"model": "qwen3-tts", "input": text, "voice": "default", "response_format": "pcm",
            "language": "English"}
    started = time.monotonic()
    try:
        async with asyncio.timeout(timeout):
            async with http.stream("POST", base + "/v1/audio/speech", json=body) as response:
                if response.status_code != 200:
                    await response.aread()
                    payload = response.json().get("error", {}) if response.content else {}
                    result.code = payload.get("code") or str(response.status_code)
                    if response.status_code == 429:
                        result.outcome = "refused"
                        result.refused_after_s = time.monotonic() - started
                        retry = response.headers.get("retry-after-ms")
                        result.retry_after_ms = int(retry) if retry else None
                    return result
                async for chunk in response.aiter_raw():
                    if chunk:
                        _listen(result, clock, started, len(chunk))
                result.outcome = "completed"
    except Exception as exc:  # a body cut short is a failed utterance
        result.code = result.code or type(exc).__name__
    return _finish(result, clock)


def percentile(values: list, q: float) -> Optional[float]:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def summarise(results: list[Result], rate: float, seconds: float, budget_s: float) -> dict:
    completed = [r for r in results if r.outcome == "completed"]
    refused = [r for r in results if r.outcome == "refused"]
    firsts = [r.first_audio_s for r in completed]
    waits = [r.refused_after_s for r in refused]
    ms = lambda v: None if v is None else round(1000 * v)  # noqa: E731
    summary = {
        "rate": rate, "seconds": seconds, "arrivals": len(results), "completed": len(completed),
        "refused": len(refused), "failed": len(results) - len(completed) - len(refused),
        "errors": _count(r.code for r in results if r.code and r.outcome != "refused"),
        "first_audio_ms": {"p50": ms(percentile(firsts, 50)), "p95": ms(percentile(firsts, 95)),
                           "p99": ms(percentile(firsts, 99)), "max": ms(max(firsts, default=None))},
        "late": sum(1 for f in firsts if f > budget_s),
        "underran": sum(1 for r in completed if r.underruns), "underruns": sum(r.underruns for r in completed),
        "stall_s": round(sum(r.stall_s for r in completed), 3),
        "refused_after_ms": {"p50": ms(percentile(waits, 50)), "max": ms(max(waits, default=None))},
        "audio_s": round(sum(r.audio_s for r in completed), 1),
    }
    summary["holds"] = (summary["failed"] == 0 and summary["refused"] == 0 and summary["underruns"] == 0
                        and bool(firsts) and percentile(firsts, 95) <= P95_GOAL_S)
    # Beyond capacity: every utterance completes in time and without a gap, or is refused quickly.
    summary["honest"] = (summary["failed"] == 0 and summary["late"] == 0 and summary["underruns"] == 0
                         and (summary["refused_after_ms"]["max"] or 0) <= 1500)
    return summary


def _count(codes) -> dict:
    counts: dict = {}
    for code in codes:
        counts[code] = counts.get(code, 0) + 1
    return counts


async def run_rate(base: str, transport: str, rate: float, seconds: float, seed: int, timeout: float) -> list[Result]:
    """Poisson arrivals at ``rate`` per second for ``seconds``; waits for every utterance to end."""
    import httpx

    rng = random.Random(seed)
    arrivals, t = [], rng.expovariate(rate)
    while t < seconds:
        arrivals.append(t)
        t += rng.expovariate(rate)
    texts = [rng.choice(REPLIES) for _ in arrivals]
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=10), limits=limits) as http:
        started = time.monotonic()

        async def one(arrival: float, text: str) -> Result:
            await asyncio.sleep(max(0.0, started + arrival - time.monotonic()))
            if transport == "ws":
                return await ws_utterance(base, text, arrival, timeout)
            return await openai_utterance(http, base, text, arrival, timeout)

        return list(await asyncio.gather(*(one(a, x) for a, x in zip(arrivals, texts))))


def _talker_metrics(url: Optional[str]) -> dict:
    """The talker's counters on Triton's metrics port (when the benchmark runs its own stack)."""
    if not url:
        return {}
    from tools.triton_local import scrape_metrics

    return {name: value for name, value in scrape_metrics(url).items() if name.startswith("qwen_tts_talker")}


def sweep(base: str, transports: list[str], rates: list[float], seconds: float, budget_s: float,
          timeout: float, keep_going: bool, metrics_url: Optional[str] = None) -> dict:
    report: dict = {}
    for transport in transports:
        asyncio.run(run_rate(base, transport, 1.0, 1.5, 0, timeout))  # warm the path
        rows = []
        for index, rate in enumerate(rates):
            before = _talker_metrics(metrics_url)
            results = asyncio.run(run_rate(base, transport, rate, seconds, 1000 + index, timeout))
            row = summarise(results, rate, seconds, budget_s)
            after = _talker_metrics(metrics_url)
            if after:
                row["talker"] = {name.replace("qwen_tts_talker_", ""): round(after[name] - before.get(name, 0), 3)
                                 for name in after if name.endswith("_total") or "_total{" in name}
            rows.append({**row, "utterances": [asdict(r) for r in results]})
            print(_line(transport, row), flush=True)
            if row.get("talker"):
                print("        talker:", {k: v for k, v in row["talker"].items() if "held_back" in k or "late" in k
                                          or "skipped" in k or "rejected" in k}, flush=True)
            time.sleep(2.0)  # let the last streams drain before the next rate
            if not keep_going and not row["holds"] and row["completed"] == 0:
                break
        holding = None
        for row in rows:  # the highest rate up to which every rate holds
            if not row["holds"]:
                break
            holding = row["rate"]
        report[transport] = {"rates": rows, "highest_rate_holding": holding}
    return report


def _line(transport: str, row: dict) -> str:
    f, r = row["first_audio_ms"], row["refused_after_ms"]
    refused = f", refused {row['refused']} (after p50 {r['p50']} / max {r['max']} ms)" if row["refused"] else ""
    return (f"{transport:6} {row['rate']:>4g}/s: {row['completed']}/{row['arrivals']} completed{refused}, "
            f"failed {row['failed']} {row['errors'] or ''}; first audio p50/p95/p99 {f['p50']}/{f['p95']}/{f['p99']} ms"
            f" (late {row['late']}); underran {row['underran']} ({row['underruns']} underruns, {row['stall_s']} s)"
            f"{'  HOLDS' if row['holds'] else '  (refused fast, none late)' if row['honest'] else ''}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gateway", help="a running gateway's base URL (default: start a stack like make run)")
    parser.add_argument("--model-dir", default=os.environ.get("QWEN_TTS_MODEL_DIR") or str(ROOT / "build" / "tiny-model"))
    parser.add_argument("--rates", default="0.5,1,2,3,4,6,8", help="arrivals per second, comma-separated")
    parser.add_argument("--seconds", type=float, default=40.0, help="arrival window per rate")
    parser.add_argument("--transports", default="ws,openai")
    parser.add_argument("--budget-ms", type=float, default=1000.0, help="first audio later than this is late")
    parser.add_argument("--timeout", type=float, default=120.0, help="longest one utterance may take")
    parser.add_argument("--keep-going", action="store_true", help="run every rate even after one served nothing")
    parser.add_argument("--output", type=Path, default=ROOT / "results" / "openloop.json")
    parser.add_argument("--label", default="", help="a note stored with the results (e.g. before/after)")
    parser.add_argument("--aligner-dir", default="", help="serve this word aligner too (e.g. build/tiny-aligner)")
    args = parser.parse_args(argv)
    rates = [float(x) for x in args.rates.split(",")]
    transports = [t.strip() for t in args.transports.split(",") if t.strip()]
    stack = None
    try:
        if args.gateway:
            base = args.gateway.rstrip("/")
        else:
            stack = _start_stack(args.model_dir, aligner_dir=args.aligner_dir or None)
            base = stack[1].http
        report = sweep(base, transports, rates, args.seconds, args.budget_ms / 1000, args.timeout, args.keep_going,
                       stack[0].metrics_url if stack else None)
    finally:
        if stack is not None:
            stack[1].stop()
            stack[0].stop()
    results = {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "label": args.label,
               "frames_cap": f"{FRAMES_BASE} + {FRAMES_PER_CHAR}/char", "p95_goal_ms": 1000 * P95_GOAL_S, **report}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(_collapse(results) + "\n")
    for transport in transports:
        print(f"{transport}: highest rate with 0 underruns and p95 first audio <= {1000 * P95_GOAL_S:.0f} ms: "
              f"{report[transport]['highest_rate_holding']}/s")
    print(f"written to {args.output}")
    return 0


def _collapse(value, indent: int = 0) -> str:
    """JSON of ``value``, indented, except that each utterance (a dict inside a list) takes one line."""
    pad, inner = " " * indent, " " * (indent + 1)
    if isinstance(value, dict):
        items = [f"{inner}{json.dumps(k)}: {_collapse(v, indent + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}" if items else "{}"
    if isinstance(value, list) and value and all(isinstance(v, dict) and "arrival_s" in v for v in value):
        return "[\n" + ",\n".join(inner + json.dumps(v) for v in value) + "\n" + pad + "]"
    if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        return "[\n" + ",\n".join(inner + _collapse(v, indent + 1) for v in value) + "\n" + pad + "]"
    return json.dumps(value)


def start_triton(model_dir: str, voices_dir: Optional[str] = None, aligner_dir: Optional[str] = None,
                 prefix: str = "bench-openloop-"):
    """Triton as ``make run`` starts it (with the word aligner when ``aligner_dir`` is given), ready, rendered in a
    fresh folder under build/; returns (server, template values, that folder)."""
    from tools.render_model_repository import render, resolve
    from tools.triton_local import LocalTriton

    work = Path(tempfile.mkdtemp(prefix=prefix, dir=ROOT / "build"))
    overrides = {"MODEL_DIR": model_dir, **({"VOICES_DIR": voices_dir} if voices_dir else {}),
                 **({"ALIGNER_DIR": aligner_dir} if aligner_dir else {})}
    values = resolve("cpu", overrides)
    server = LocalTriton(render(work / "model_repository", values), log_path=work / "tritonserver.log").start()
    try:
        server.wait_ready(900)
    except BaseException:
        server.stop()
        raise
    return server, values, work


def start_gateway(server, values: dict, work: Path, name: str = "gateway", **env: str):
    """A ready gateway on ``server`` with the realistic frame cap (``env``: more of its settings)."""
    from tools.gateway_local import GatewayProcess

    gateway = GatewayProcess(server.grpc_url, values["VOICES_DIR"], work / f"{name}.log", GATEWAY_LOG_LEVEL="WARNING",
                             GATEWAY_FRAMES_BASE=str(FRAMES_BASE), GATEWAY_FRAMES_PER_CHAR=str(FRAMES_PER_CHAR), **env)
    try:
        gateway.start().wait_ready()
    except BaseException:
        gateway.stop()
        raise
    return gateway


def _start_stack(model_dir: str, voices_dir: Optional[str] = None, prefix: str = "bench-openloop-",
                 aligner_dir: Optional[str] = None):
    """Triton and the gateway as ``make run`` starts them, with the realistic frame cap."""
    server, values, work = start_triton(model_dir, voices_dir, aligner_dir, prefix)
    try:
        return server, start_gateway(server, values, work)
    except BaseException:
        server.stop()
        raise


if __name__ == "__main__":
    sys.exit(main())
