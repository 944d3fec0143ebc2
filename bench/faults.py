"""Faults across hosts, measured on real separate hosts (the namespace test bed, tools/hostbed.py): two tritonservers
(t1, t2), two gateway replicas (g1, g2) finding them by DNS (dns://triton.bed.test:8001, dnsmasq on a host of its
own), Redis between the replicas, and a fault-injecting TCP proxy (px) in front of t1 for delay and loss.

    python -m bench.faults [--only triton_partition,dns_leave] [--hold 5] [--gateway-env "K=V ..."]

For each fault (one Triton host partitioned; 200 ms delay each way on the link to t1; 5 % loss on it (a chunk held
back 300 ms, as a retransmission); a Triton host killed (then started again); a gateway replica killed (then
started again); t1 no longer resolving; Redis partitioned) the same traffic: four sessions (two on each replica)
playing a paragraph written as an LLM writes it (a word every 0.15 s: their streams are open when the fault
starts, however fast the model), and, while it lasts, a new session every half second (alternately on each
replica; a client whose replica refuses the connection tries the other, as behind a load balancer) speaking one
sentence. Measured:

- playing: which were on the faulty host, how they ended (error code and how long after the fault, or completed)
  and how long their listeners' buffers ran dry;
- new: served (first audio, how long), refused (RATE_LIMITED with a retry hint) or lost (anything else: an error,
  no answer), with the goal of 0 lost and none waiting past its first-audio budget;
- the gateways: how long until both stopped using the faulty host (their /metrics), and after the fault heals,
  until both use it again and until a stream runs there again.

Realistic lengths: the tiny random model never ends speech by itself, so the gateways cap it at 12 + 0.8 frames
per character (about real speech). Numbers go to results/faults.json with the command that produced them.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tools.hostbed import (  # noqa: E402
    TRITON_GRPC, TRITON_NAME, BedGateway, Heard, HostBed, Stack, connect, env_overrides, hear, http_get,
    metric_series, triton_args, unavailable)

PARAGRAPH = ("The weather this afternoon stays mild with a light breeze from the west and a few clouds. "
             "Later in the evening the clouds thicken and a little rain may fall before midnight.")  # 32 words
SENTENCE = "Your order has been confirmed and the courier will bring it to your door tomorrow morning."  # ≈ 7 s
PLAYING_SESSIONS = 4
WORD_EVERY_S = 0.15  # the playing sessions' text comes as an LLM writes it: a word every 0.15 s (≈ 5 s in all)
NEW_EVERY_S = 0.5
PROBE_EVERY_S = 0.25
RECOVERY_WINDOW_S = 8.0
BUDGET_S = 1.0  # the gateways' first-audio budget (GATEWAY_FIRST_AUDIO_BUDGET_MS default)
GOALS = {"noticed_s": 1.0, "lost_not_playing": 0, "first_audio_budget_s": BUDGET_S, "recovered_s": 2.0}
GATEWAY_ENV = {"GATEWAY_SYNTHESIS_PARAMETERS": json.dumps({"greedy": True}), "GATEWAY_FRAMES_BASE": "12",
               "GATEWAY_FRAMES_PER_CHAR": "0.8"}
FAULTS = ("baseline", "triton_partition", "delay_200ms", "loss_5pct", "triton_killed", "gateway_killed",
          "dns_leave", "redis_partition")


# -- the clients ---------------------------------------------------------------------------------------------------

def listener_stall(heard: Heard, after: float, sample_rate: int = 24000) -> float:
    """Seconds a listener playing ``heard`` in real time from its first audio waited with an empty buffer after
    ``after`` (monotonic)."""
    until, stalled = None, 0.0
    for arrived, data in heard.audio:
        seconds = len(data) / 2 / sample_rate
        if until is None:
            until = arrived
        elif arrived > until:
            if arrived > after:
                stalled += arrived - max(until, after)
            until = arrived
        until += seconds
    end = next((t for t, m in heard.messages if m["type"] in ("complete", "audio_end")), None)
    if heard.error is not None or heard.closed_at is not None:  # it ended early: the silence after is not a stall
        return round(stalled, 3)
    if end is None and until is not None and time.monotonic() > until > after:
        stalled += time.monotonic() - until
    return round(stalled, 3)


async def write(ws, words: list[str], request_id: str) -> None:
    """Append ``words`` one every WORD_EVERY_S (the first few at once, as an LLM's first tokens), then end."""
    from websockets.exceptions import ConnectionClosed

    try:
        await ws.send(json.dumps({"type": "append", "text": " ".join(words[:3]), "requestId": request_id}))
        for word in words[3:]:
            await asyncio.sleep(WORD_EVERY_S)
            await ws.send(json.dumps({"type": "append", "text": " " + word}))
        await ws.send(json.dumps({"type": "end"}))
    except ConnectionClosed:
        pass


async def session(url: str, text: Optional[str], request_id: str, heard: Heard, contract: Optional[str] = None,
                  text_mode: Optional[str] = None):
    """A session speaking ``text`` (None: the caller writes it), its start sent; returns the socket."""
    ws = await connect(url, open_timeout=3)
    try:
        async with asyncio.timeout(3):
            ready = json.loads(await ws.recv())
            if ready["type"] != "ready":
                raise ConnectionError(f"refused: {ready}")
            await ws.send(json.dumps({"type": "start", **({"contractId": contract} if contract else {}),
                                      **({"textMode": text_mode} if text_mode else {})}))
            started = json.loads(await ws.recv())
            if started["type"] != "started":
                raise ConnectionError(f"refused: {started}")
    except BaseException:
        await ws.close()
        raise
    heard.sent_at = time.monotonic()
    if text is not None:
        await ws.send(json.dumps({"type": "speak", "text": text, "requestId": request_id}))
    return ws


async def new_utterance(gateways: list[BedGateway], first: int, request_id: str) -> dict:
    """One new session and utterance, on ``gateways[first]`` or, when that replica refuses the connection, the
    other one; what happened to it."""
    started = time.monotonic()
    record = {"gateway": gateways[first].host.name, "connect_refused": [], "started_at": started}
    for index in (first, 1 - first):
        heard = Heard(time.monotonic())
        try:
            ws = await session(gateways[index].ws, SENTENCE, request_id, heard)
        except Exception as exc:  # refused, reset, no answer
            record["connect_refused"].append({"gateway": gateways[index].host.name, "error": type(exc).__name__,
                                              "after_s": round(time.monotonic() - started, 3)})
            continue
        try:
            await hear(ws, heard, timeout=40)
        except TimeoutError:
            pass
        finally:
            await ws.close()
        record.update(served_by=gateways[index].host.name, **outcome(heard, started))
        return record
    record.update(kind="lost", why="no replica accepted the session", error=None)
    return record


def outcome(heard: Heard, started: float) -> dict:
    """served / refused / lost, with times from ``started`` (when the client began)."""
    if heard.completed:
        return {"kind": "served", "first_audio_s": round(heard.first_audio_at - started, 3),
                "audio_s": round(heard.audio_seconds(), 2)}
    error = heard.error
    if error is not None and error["code"] == "RATE_LIMITED" and not heard.audio:
        return {"kind": "refused", "after_s": round(heard.error_at - started, 3),
                "retry_after_ms": error.get("retryAfterMs")}
    why = error["code"] if error else ("socket closed" if heard.closed_at else "no end in time")
    return {"kind": "lost", "why": why, "after_s": round((heard.error_at or heard.closed_at or time.monotonic())
                                                         - started, 3), "had_audio": bool(heard.audio)}


def _public(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "started_at"}


def summary(values: list[float]) -> Optional[dict]:
    if not values:
        return None
    return {"n": len(values), "p50": round(statistics.median(values), 3), "max": round(max(values), 3)}


# -- watching the gateways -----------------------------------------------------------------------------------------

class Watch:
    """Polls both gateways' /metrics (which check nothing themselves) every 50 ms: which Triton endpoints each uses,
    and whether its interrupt bus is up."""

    def __init__(self, gateways: list[BedGateway]):
        self.gateways = gateways
        self.timeline: list[tuple[float, str, Optional[dict], Optional[bool]]] = []
        self._task: Optional[asyncio.Task] = None

    def _poll(self, gateway: BedGateway):
        status, body = http_get(gateway.http + "/metrics", timeout=0.5)
        if status != 200:
            return None, None
        text = body.decode()
        seen = {url: value == 1 for url, value in metric_series(text, "tts_gateway_triton_ready").items()}
        bus = metric_series(text, "tts_gateway_interrupt_bus_up").get("")
        return seen, None if bus is None else bus == 1

    async def _run(self):
        while True:
            polls = await asyncio.gather(*(asyncio.to_thread(self._poll, g) for g in self.gateways))
            now = time.monotonic()
            for gateway, (seen, bus) in zip(self.gateways, polls):
                self.timeline.append((now, gateway.host.name, seen, bus))
            await asyncio.sleep(0.05)

    def start(self):
        self._task = asyncio.create_task(self._run())

    async def stop(self):
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    def first(self, after: float, condition: Callable[[Optional[dict], Optional[bool]], bool]) -> Optional[float]:
        """Seconds after ``after`` until the condition held on every gateway at once (None: never)."""
        latest: dict[str, bool] = {}
        for when, name, seen, bus in self.timeline:
            if when < after:
                continue
            latest[name] = condition(seen, bus)
            if len(latest) == len(self.gateways) and all(latest.values()):
                return round(when - after, 3)
        return None


# -- one trial -----------------------------------------------------------------------------------------------------

class Bench:
    def __init__(self, stack: Stack, hold_s: float):
        self.stack, self.hold_s = stack, hold_s
        self.bed = stack.bed
        self.t1, self.t2 = stack.tritons
        self.g1, self.g2 = stack.gateways
        self.px_host = self.bed.add_host("px")
        self.proxy = self.bed.proxy(self.px_host, self.t1.host, TRITON_GRPC).start()
        self.px_url = f"{self.px_host.address}:{TRITON_GRPC}"

    async def wait_using(self, urls: set[str], timeout: float = 30) -> None:
        """Until both gateways use exactly ``urls``."""
        deadline = time.monotonic() + timeout
        while True:
            seen = [await asyncio.to_thread(self.stack.seen, g) for g in self.stack.gateways]
            if all(s is not None and {u for u, ok in s.items() if ok} == urls for s in seen):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"gateways see {seen}, expected {urls}")
            await asyncio.sleep(0.1)

    async def start_playing(self) -> list[dict]:
        """PLAYING_SESSIONS sessions speaking PARAGRAPH as an LLM writes it (continuous text, a word every
        WORD_EVERY_S), started one by one so that each one's endpoint is known; returns at their first audio."""
        playing = []
        for index in range(PLAYING_SESSIONS):
            gateway = self.stack.gateways[index % 2]
            before = await asyncio.to_thread(self.stack.streams, gateway)
            heard = Heard(time.monotonic())
            ws = await session(gateway.ws, None, f"playing-{index}", heard, text_mode="continuous")
            writer = asyncio.create_task(write(ws, PARAGRAPH.split(), f"playing-{index}"))
            reader = asyncio.create_task(hear(ws, heard, timeout=90))
            deadline = time.monotonic() + 10
            while not heard.audio and not reader.done() and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            after = await asyncio.to_thread(self.stack.streams, gateway)
            grown = [url for url, n in after.items() if n > before.get(url, 0)]
            playing.append({"ws": ws, "heard": heard, "reader": reader, "writer": writer, "gateway": gateway.host.name,
                            "endpoint": grown[0] if len(grown) == 1 else None})
        return playing

    async def trial(self, name: str, victim: Optional[str], inject, heal, setup=None, teardown=None,
                    serving_url: Optional[str] = None) -> dict:
        """Run the traffic through one fault. ``inject``/``heal``: blocking callables (heal may return the time the
        faulty part was back, e.g. a restarted Triton's readiness); ``victim``: the endpoint url the fault hits (a
        gateway's host name for a replica, "redis" for Redis); ``serving_url``: where a stream counts as the victim
        serving again."""
        if setup:
            await setup()
        gateways = self.stack.gateways
        playing = await self.start_playing()
        await asyncio.sleep(1.0)
        watch = Watch(gateways)
        watch.start()
        await asyncio.sleep(0.2)
        new_tasks, probe_tasks = [], []
        fault_at = time.monotonic()  # (the fault starts with the call: a kill, say, returns once the process is gone)
        await asyncio.to_thread(inject) if inject else None
        index = 0
        while time.monotonic() < fault_at + self.hold_s:
            new_tasks.append(asyncio.create_task(new_utterance(gateways, index % 2, f"new-{index}")))
            index += 1
            await asyncio.sleep(NEW_EVERY_S)
        heal_started = time.monotonic()
        back = await asyncio.to_thread(heal) if heal else None
        back_at = back if isinstance(back, float) else time.monotonic()
        serving_again = None
        watch_url = serving_url or victim
        while time.monotonic() < back_at + RECOVERY_WINDOW_S:
            probe_tasks.append(asyncio.create_task(new_utterance(gateways, index % 2, f"probe-{index}")))
            index += 1
            if serving_again is None and watch_url and ":" in watch_url:
                streams = await asyncio.gather(*(asyncio.to_thread(self.stack.streams, g) for g in gateways))
                if any(s.get(watch_url, 0) > 0 for s in streams):
                    serving_again = round(time.monotonic() - back_at, 3)
            await asyncio.sleep(PROBE_EVERY_S)
        news = await asyncio.gather(*new_tasks)
        probes = await asyncio.gather(*probe_tasks)
        # streams the faulty Triton's talker still runs 1 s and 5 s after every probe ended (a leak stays)
        left = {}
        if victim and ":" in victim:
            ended = time.monotonic()
            for after in (1.0, 5.0):
                await asyncio.sleep(max(0.0, ended + after - time.monotonic()))
                answer = await asyncio.to_thread(gateways[-1].readyz, 5)
                left[f"{after:g}s"] = ((answer or {}).get("capacity", {}).get(victim, {}) or {}).get("active")
        for item in playing:
            try:
                await asyncio.wait_for(asyncio.shield(item["reader"]), 40)
            except (TimeoutError, asyncio.TimeoutError):
                item["reader"].cancel()
            except Exception:
                pass
            item["writer"].cancel()
            await item["ws"].close()
        await watch.stop()
        result = self.report(name, victim, playing, news, probes, watch, fault_at, heal_started, back_at,
                             serving_again)
        result["after_heal"]["streams_active_there_after_the_last_probe"] = left or None
        if teardown:
            await teardown()
        await asyncio.to_thread(self.stack.restore)
        return result

    def report(self, name, victim, playing, news, probes, watch: Watch, fault_at, heal_started, back_at,
               serving_again) -> dict:
        hit = [p for p in playing if victim and (p["endpoint"] == victim or p["gateway"] == victim)]
        if victim and ":" in victim:
            noticed = watch.first(fault_at, lambda seen, bus: seen is not None and not seen.get(victim, False))
            usable = watch.first(back_at, lambda seen, bus: seen is not None and seen.get(victim, False))
        elif victim == "redis":
            noticed = watch.first(fault_at, lambda seen, bus: bus is False)
            usable = watch.first(back_at, lambda seen, bus: bus is True)
        else:  # a gateway replica: usable again once a new session there is served
            noticed = None
            back = [r["started_at"] + r["first_audio_s"] for r in probes
                    if r["kind"] == "served" and r.get("served_by") == victim]
            usable = round(min(back) - heal_started, 3) if victim and back else None
        ended = {}
        for p in playing:
            heard = p["heard"]
            kind = "completed" if heard.completed else (heard.error or {}).get("code") or \
                ("socket closed" if heard.closed_at else "no end in time")
            ended[kind] = ended.get(kind, 0) + 1
        errors_after = [round((p["heard"].error_at or p["heard"].closed_at) - fault_at, 3) for p in hit
                        if (p["heard"].error_at or p["heard"].closed_at)]
        def kinds(records):
            return {k: sum(1 for r in records if r["kind"] == k) for k in ("served", "refused", "lost")}
        served = [r["first_audio_s"] for r in news if r["kind"] == "served"]
        result = {
            "victim": victim,
            "playing": {
                "sessions": len(playing), "on_faulty_part": len(hit), "ended": ended,
                "faulty_part_error_or_close_after_s": errors_after,
                "faulty_part_completed": sum(1 for p in hit if p["heard"].completed),
                "listener_stall_after_fault_s": summary([listener_stall(p["heard"], fault_at) for p in playing]),
                # the gateway's own count (it leaves out the writer's gaps), from each end message
                "reported_stall_ms": summary([(p["heard"].end or {}).get("stallMs", 0) for p in playing
                                              if p["heard"].end is not None]),
            },
            "new_during_fault": {
                **kinds(news), "sent": len(news),
                "first_audio_s": summary(served),
                "over_budget": sum(1 for s in served if s > BUDGET_S),
                "connect_refused_then_elsewhere": sum(1 for r in news if r["connect_refused"] and
                                                      r["kind"] == "served"),
                "lost_detail": [_public(r) for r in news if r["kind"] == "lost"][:5],
                "refused_detail": [_public(r) for r in news if r["kind"] == "refused"][:3],
            },
            "gateways_stopped_using_it_s": noticed,
            "after_heal": {
                "heal_took_s": round(back_at - heal_started, 3),
                "usable_on_both_gateways_s": usable,
                "stream_there_again_s": serving_again,
                "probes": kinds(probes), "probe_first_audio_s": summary([r["first_audio_s"] for r in probes
                                                                        if r["kind"] == "served"]),
            },
        }
        lost_not_playing = result["new_during_fault"]["lost"]
        noticed_measure = min(errors_after + ([noticed] if noticed is not None else []), default=None)
        recovered = usable if usable is not None else serving_again
        silent_host = name in ("triton_partition", "triton_killed", "gateway_killed", "dns_leave")
        result["goals_met"] = {  # (noticing within 1 s is asked of a host that fails; delay and loss need not be)
            "noticed_within_1s": None if noticed_measure is None or not silent_host
            else noticed_measure <= GOALS["noticed_s"],
            "no_new_utterance_lost": lost_not_playing == 0,
            "no_new_utterance_past_budget": result["new_during_fault"]["over_budget"] == 0,
            "recovered_within_2s": None if recovered is None else recovered <= GOALS["recovered_s"],
        }
        return result

    # -- the faults ----------------------------------------------------------------------------------------------

    async def run(self, name: str) -> dict:
        t1_url, px_url = self.t1.grpc_url, self.px_url
        both = {self.t1.grpc_url, self.t2.grpc_url}

        async def through_proxy():
            await asyncio.to_thread(self.bed.dns.set, TRITON_NAME, [self.px_host, self.t2.host])
            await self.wait_using({px_url, self.t2.grpc_url})

        async def direct():
            self.proxy.set(delay_ms=0, loss=0)
            await asyncio.to_thread(self.bed.dns.set, TRITON_NAME, [self.t1.host, self.t2.host])
            await self.wait_using(both)

        def restart_triton():
            self.t1.reap()
            self.t1.start().wait_ready(240)
            return time.monotonic()

        def restart_gateway():
            self.g1.start()
            return None

        if name == "baseline":
            return await self.trial(name, None, None, None)
        if name == "triton_partition":
            return await self.trial(name, t1_url, lambda: self.bed.partition(self.t1.host),
                                    lambda: self.bed.heal(self.t1.host))
        if name == "delay_200ms":
            return await self.trial(name, px_url, lambda: self.proxy.set(delay_ms=200),
                                    lambda: self.proxy.set(delay_ms=0), setup=through_proxy, teardown=direct)
        if name == "loss_5pct":
            return await self.trial(name, px_url, lambda: self.proxy.set(loss=0.05, stall_ms=300),
                                    lambda: self.proxy.set(loss=0), setup=through_proxy, teardown=direct)
        if name == "triton_killed":
            return await self.trial(name, t1_url, self.t1.kill, restart_triton)
        if name == "gateway_killed":
            return await self.trial(name, "g1", self.g1.kill, restart_gateway)
        if name == "dns_leave":
            return await self.trial(name, t1_url, lambda: self.bed.dns.set(TRITON_NAME, [self.t2.host]),
                                    lambda: self.bed.dns.set(TRITON_NAME, [self.t1.host, self.t2.host]))
        if name == "redis_partition":
            if self.stack.redis is None:
                return {"skipped": "redis-server is not installed"}
            return await self.trial(name, "redis", lambda: self.bed.partition(self.stack.redis.host),
                                    lambda: self.bed.heal(self.stack.redis.host))
        raise ValueError(name)


def gateway_tree() -> dict:
    """Which gateway the run measured: the checkout's commit (and whether gateway/ or tts_contract/ had changes on
    top), or the tree $HOSTBED_GATEWAY_ROOT named."""
    import subprocess

    if os.environ.get("HOSTBED_GATEWAY_ROOT"):
        return {"root": os.environ["HOSTBED_GATEWAY_ROOT"]}

    def git(*argv):
        result = subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True)
        return result.stdout.strip() if result.returncode == 0 else None

    return {"commit": git("rev-parse", "--short", "HEAD"),
            "changed": bool(git("status", "--porcelain", "gateway", "tts_contract"))}


def render_repository(model_dir: Path, voices_dir: Path, out: Path) -> Path:
    from tools.render_model_repository import render, resolve

    values = resolve("cpu", {"MODEL_DIR": str(model_dir), "VOICES_DIR": str(voices_dir), "MAX_ACTIVE_STREAMS": "16"},
                     environ={})
    return render(out, values)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help=f"comma-separated faults (of {', '.join(FAULTS)})")
    parser.add_argument("--hold", type=float, default=5.0, help="seconds each fault lasts (default 5)")
    parser.add_argument("--gateway-env", default=None,
                        help="KEY=VALUE ... for both replicas (default: $HOSTBED_GATEWAY_ENV), e.g. "
                             "GATEWAY_GRPC_KEEPALIVE_MS=0")
    parser.add_argument("--output", type=Path, default=ROOT / "results" / "faults.json")
    parser.add_argument("--keep", action="store_true", help="keep the bed's logs (printed) after the run")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(FAULTS)
    for name in names:
        if name not in FAULTS:
            parser.error(f"unknown fault {name!r}")
    reason = unavailable()
    if reason:
        print(f"bench.faults: {reason}", file=sys.stderr)
        return 2
    model_dir = Path(os.environ.get("QWEN_TTS_TINY_MODEL_DIR", ROOT / "build" / "tiny-model"))
    from tts_engine.tiny_model import build_tiny_model, is_current

    if not is_current(model_dir, "tiny"):
        build_tiny_model(model_dir, "tiny")
    work = Path(tempfile.mkdtemp(prefix="bench-faults-", dir=ROOT / "build"))
    voices = work / "voices"
    shutil.copytree(ROOT / "voices" / "default", voices / "default",
                    ignore=shutil.ignore_patterns("prompt*.safetensors*"))
    repository = render_repository(model_dir, voices, work / "model_repository")
    overrides = env_overrides(args.gateway_env)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the bed is removed on the way out
    results = {}
    started = time.monotonic()
    with HostBed(work / "bed") as bed:
        stack = Stack(bed, repository, voices, gateway_env={**GATEWAY_ENV, **overrides},
                      extra_triton_args=triton_args()).start()
        print(f"bed up in {time.monotonic() - started:.0f} s: {', '.join(str(h) for h in bed.hosts.values())}",
              flush=True)
        bench = Bench(stack, args.hold)
        for name in names:
            t = time.monotonic()
            results[name] = asyncio.run(bench.run(name))
            print(f"== {name} ({time.monotonic() - t:.0f} s)\n{json.dumps(results[name], indent=1)}", flush=True)
    command = "python -m bench.faults" + (f" --only {args.only}" if args.only else "") + \
        (f" --hold {args.hold:g}" if args.hold != 5.0 else "") + \
        (f" --gateway-env '{args.gateway_env}'" if args.gateway_env else "")
    if os.environ.get("HOSTBED_GATEWAY_ENV") and args.gateway_env is None:
        command = f"HOSTBED_GATEWAY_ENV='{os.environ['HOSTBED_GATEWAY_ENV']}' " + command
    document = {
        "command": command,
        "note": ("Real separate hosts on one machine (network namespaces, tools/hostbed.py): t1 and t2 tritonservers "
                 "(tiny model, CPU), g1 and g2 gateway replicas on dns://triton.bed.test:8001 (dnsmasq), Redis; a "
                 "fault-injecting proxy px in front of t1 for delay and loss. Traffic per fault: 4 sessions playing "
                 "a paragraph when it starts, a new session every 0.5 s while it lasts, probes every 0.25 s after "
                 "it heals. Times in seconds from the fault (or from its healing)."),
        "gateway": gateway_tree(),
        "gateway_env": {**GATEWAY_ENV, **overrides},
        "hold_s": args.hold, "goals": GOALS, "cpus": os.cpu_count(),
        "wall_s": round(time.monotonic() - started, 1),
        "faults": results,
    }
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"logs kept in {work}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
