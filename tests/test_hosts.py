"""Faults across hosts, on real separate hosts (network namespaces: tools/hostbed.py): two tritonservers, two gateway
replicas finding them by DNS (dnsmasq on a host of its own) and Redis, each at its own address. A Triton host
partitioned (every packet dropped, silently) or killed, a model process frozen, a pod leaving DNS, a gateway replica
killed: the listener of an utterance already playing gets a recoverable TTS_UNAVAILABLE within about a second, new
utterances are served by the other host within their first-audio budget, and the host is used again within 2 s of
coming back.

The bed starts once for the module (the Tritons load once); each test starts from a healthy stack. To see a test
fail with a gateway mechanism off, pass it to both replicas:

    HOSTBED_GATEWAY_ENV="GATEWAY_GRPC_KEEPALIVE_MS=0 GATEWAY_PROGRESS_DEADLINE_MS=0" \\
        .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_hosts.py
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time

import pytest
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from conftest import render_cpu_repository
from gateway.config import Settings
from gateway_helpers import FAST
from hostbed import (TRITON_NAME, Heard, Stack, bed_or_skip, env_overrides, hear, hold, open_speaker, speak,
                     triton_args, until, where)
from tools.triton_local import process_dirs, stat_fields

NOTICE_S = float(os.environ.get("HOSTBED_NOTICE_S", "1.5"))  # "within about a second", on 2 shared cores
RECOVER_S = 2.0  # a host that is back is used again within this long
FIRST_AUDIO_S = 1.0 + 0.5  # the gateway's first-audio budget (GATEWAY_FIRST_AUDIO_BUDGET_MS) and some slack
# The progress deadline's grace past a listener's lead, as the replicas are configured (0: the deadline is off)
GRACE_S = int(env_overrides().get("GATEWAY_PROGRESS_DEADLINE_MS", Settings.progress_deadline_ms)) / 1000
# One sentence (one stream) of about 30 s of audio at FAST's frame cap (the tiny model generates it in a second or
# two: a fault meant to hit it comes at its first audio).
LONG = ("This sentence keeps going without a single stop so that its audio streams for many seconds while the "
        "test does something unkind to the host that is speaking it right now and watches what the listener gets "
        "and when it gets it and whether the words that were still to come arrive from somewhere else or end with "
        "a clear and recoverable error that tells the application to try once more on a healthy host instead")
# Text as an LLM writes it: a word every WORD_EVERY_S (its stream stays open however fast the machine is).
WRITTEN = ("Let me check that for you while the numbers come in from the other system and then I will read "
           "them out one by one so that you can write them down and ask me about any of them").split()
WORD_EVERY_S = 0.15
SHORT = "Served from the other host."
UNAVAILABLE = "TTS_UNAVAILABLE"


@pytest.fixture(scope="module")
def stack(tiny_model_dir, voices_dir, tmp_path_factory):
    """Two Tritons (t1, t2), two gateways (g1, g2) on dns://triton.bed.test:8001, Redis: one bed for the module."""
    work = tmp_path_factory.mktemp("hosts")
    bed = bed_or_skip(work / "bed")
    repository = render_cpu_repository(tiny_model_dir, voices_dir, work / "model_repository")
    with bed:
        yield Stack(bed, repository, voices_dir, gateway_env={**FAST, **env_overrides()},
                    extra_triton_args=triton_args()).start()


@pytest.fixture(autouse=True)
def healthy(stack):
    """Every test starts with every host healed, every Triton and gateway running, DNS listing both Tritons."""
    stack.restore()
    yield
    for pid in getattr(stack, "frozen", []):  # a frozen model process of a test that failed half-way
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


class Playing:
    """An utterance playing on a session: LONG spoken (``written`` False) or WRITTEN appended a word at a time, as an
    LLM writes (continuous text; ``end`` after the last word). ``heard`` fills as it plays."""

    def __init__(self, gateway, written: bool):
        self.gateway, self.written = gateway, written
        self.ws = self.heard = self.writer = None

    async def start(self) -> "Playing":
        """Start it and return at its first audio."""
        self.ws = await open_speaker(self.gateway.ws, **({"textMode": "continuous"} if self.written else {}))
        self.heard = Heard(time.monotonic())
        if self.written:
            await self.ws.send(json.dumps({"type": "append", "text": " ".join(WRITTEN[:4]), "requestId": "playing"}))
            self.writer = asyncio.create_task(self._write())
        else:
            await self.ws.send(json.dumps({"type": "speak", "text": LONG, "requestId": "playing"}))
        self.heard.reader = asyncio.create_task(hear(self.ws, self.heard, timeout=120))
        await until(lambda: self.heard.audio or self.heard.reader.done(), 15, "no first audio for the playing "
                    "utterance")
        return self

    async def _write(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            for word in WRITTEN[4:]:
                await asyncio.sleep(WORD_EVERY_S)
                await self.ws.send(json.dumps({"type": "append", "text": " " + word}))
            await self.ws.send(json.dumps({"type": "end"}))

    def lead(self, now: float) -> float:
        """What its listener (playing from the first audio in real time) still has to play at ``now``."""
        return self.heard.audio_seconds() - (now - self.heard.first_audio_at)

    async def where(self, stack: Stack):
        """The Triton its stream runs on (its gateway's streams)."""
        streams = await asyncio.to_thread(stack.streams, self.gateway)
        return stack.triton_at(next(url for url, n in streams.items() if n))

    async def close(self) -> None:
        for task in (self.writer, getattr(self.heard, "reader", None)):
            if task is not None:
                task.cancel()
        if self.ws is not None:
            await self.ws.close()


async def fresh(gateway, request_id: str) -> Heard:
    """A new session on ``gateway`` speaking SHORT, heard to its end (bounded)."""
    ws = await open_speaker(gateway.ws)
    try:
        return await speak(ws, SHORT, request_id, timeout=15)
    finally:
        await ws.close()


def new_utterance_problems(results, label: str) -> list[str]:
    """What is wrong with utterances sent after a fault: each must be served, first audio within the budget."""
    problems = []
    for index, result in enumerate(results):
        if isinstance(result, BaseException):
            problems.append(f"{label} #{index}: {type(result).__name__}: {result}")
        elif not result.completed:
            problems.append(f"{label} #{index}: not served: {[m for _, m in result.messages]}")
        elif result.first_audio_at - result.sent_at > FIRST_AUDIO_S:
            problems.append(f"{label} #{index}: first audio after {result.first_audio_at - result.sent_at:.2f} s "
                            f"(budget {FIRST_AUDIO_S:g} s)")
    return problems


async def playing_problems(heard: Heard, fault_at: float) -> list[str]:
    """The utterance that was playing when its host failed must end, with a recoverable TTS_UNAVAILABLE, within
    NOTICE_S."""
    with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
        await asyncio.wait_for(asyncio.shield(heard.reader), NOTICE_S + 3)
    if heard.error is None:
        state = "still open" if not heard.reader.done() else f"ended {[m for _, m in heard.messages]}"
        return [f"the playing utterance got no error within {NOTICE_S + 3:g} s of the fault ({state}; its last "
                f"audio {heard.audio[-1][0] - fault_at:+.2f} s from the fault)"]
    problems = []
    noticed = heard.error_at - fault_at
    if noticed > NOTICE_S:
        problems.append(f"the playing utterance's error came {noticed:.2f} s after the fault (goal: {NOTICE_S:g} s)")
    if heard.error["code"] != UNAVAILABLE or heard.error.get("recoverable") is not True:
        problems.append(f"the playing utterance ended with {heard.error['code']} (recoverable: "
                        f"{heard.error.get('recoverable')}), expected a recoverable {UNAVAILABLE}")
    print(f"playing utterance: {heard.error['code']} {noticed:.2f} s after the fault")
    return problems


async def served_after_fault(stack: Stack, fault_at: float) -> list[str]:
    """New utterances on both gateways, at once and again once the fault should be noticed, are all served."""
    g1, g2 = stack.gateways
    problems = []
    at_once = await asyncio.gather(fresh(g1, "new-g1"), fresh(g2, "new-g2"), return_exceptions=True)
    problems += new_utterance_problems(at_once, "sent right after the fault")
    await asyncio.sleep(max(0.0, fault_at + NOTICE_S - time.monotonic()))
    later = await asyncio.gather(fresh(g1, "later-g1"), fresh(g2, "later-g2"), return_exceptions=True)
    problems += new_utterance_problems(later, f"sent {NOTICE_S:g} s after the fault")
    return problems


async def used_again(stack: Stack, victim, back_at: float) -> list[str]:
    """Both gateways use ``victim`` again within RECOVER_S of ``back_at``, and a new utterance goes there."""
    problems = []
    try:
        took = await until(lambda: all((stack.seen(g) or {}).get(victim.grpc_url) for g in stack.gateways),
                           RECOVER_S + 8, f"{victim.host} not usable again on both gateways")
        took = time.monotonic() - back_at
        print(f"{victim.host} usable again on both gateways {took:.2f} s after it came back")
        if took > RECOVER_S:
            problems.append(f"{victim.host} was usable again {took:.2f} s after it came back (goal {RECOVER_S:g} s)")
    except AssertionError as exc:
        return problems + [str(exc)]
    for gateway in stack.gateways:
        holds = await holds_until(stack, gateway, victim.grpc_url, 6)
        if holds is None:
            problems.append(f"{gateway.host} sent none of 6 new utterances held at once to {victim.host}")
        elif holds > 1:
            print(f"{gateway.host}: the utterance that went to {victim.host} was the {holds}th held at once "
                  f"(it reports less headroom: {victim_active(stack, gateway, victim)} streams active there)")
    return problems


async def holds_until(stack: Stack, gateway, url: str, most: int):
    """Hold utterances on ``gateway`` one more at a time (each stays open: routing goes by the headroom engines
    report, so a host that still runs streams is chosen once the other is as busy) until one goes to ``url``; how
    many it took (None: none of ``most``)."""
    held = []
    try:
        for count in range(1, most + 1):
            before = await asyncio.to_thread(stack.streams, gateway)
            held.append(await hold(gateway, f"where-{count}"))
            after = await asyncio.to_thread(stack.streams, gateway)
            if after.get(url, 0) > before.get(url, 0):
                return count
        return None
    finally:
        for ws, heard in held:
            heard.reader.cancel()
            await ws.close()


def victim_active(stack: Stack, gateway, victim) -> int:
    """Streams the victim's talker reports active (to ``gateway``'s /readyz)."""
    answer = gateway.readyz(timeout=5) or {}
    return answer.get("capacity", {}).get(victim.grpc_url, {}).get("active", -1)


def model_process(triton, model: str) -> int:
    """The pid of the Python-backend process serving ``model`` for ``triton``."""
    for entry in process_dirs():
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            parent = int(stat_fields(entry)[1])
        except (OSError, ValueError, IndexError):
            continue
        if parent == triton.process.pid and f"/{model}/1/model.py" in cmdline:
            return int(entry.name)
    raise AssertionError(f"no {model} process for {triton.host}")


# -- the tests ---------------------------------------------------------------------------------------------------

async def test_a_partitioned_triton_host_is_noticed_within_a_second_and_used_again_after(stack):
    """A Triton host that goes silent mid-utterance costs that utterance only (TTS_UNAVAILABLE within about 1 s),
    new utterances are served by the other host, and the host serves again within 2 s of the partition healing."""
    playing = await Playing(stack.gateways[0], written=True).start()
    victim = await playing.where(stack)
    try:
        fault_at = time.monotonic()
        await asyncio.to_thread(stack.bed.partition, victim.host)
        problems = await playing_problems(playing.heard, fault_at)
        problems += await served_after_fault(stack, fault_at)
        await asyncio.to_thread(stack.bed.heal, victim.host)
        problems += await used_again(stack, victim, time.monotonic())
    finally:
        stack.bed.heal(victim.host)
        await playing.close()
    assert not problems, "\n".join(problems)


async def test_b_a_killed_triton_host_costs_only_its_playing_utterance(stack):
    """A Triton host killed mid-utterance: that utterance ends with TTS_UNAVAILABLE at once, new utterances are
    served by the other host, and once the host is back up both gateways use it within 2 s."""
    playing = await Playing(stack.gateways[0], written=True).start()
    victim = await playing.where(stack)
    try:
        fault_at = time.monotonic()
        await asyncio.to_thread(victim.kill)
        problems = await playing_problems(playing.heard, fault_at)
        problems += await served_after_fault(stack, fault_at)
        await asyncio.to_thread(victim.reap)
        await asyncio.to_thread(lambda: victim.start().wait_ready(240))
        problems += await used_again(stack, victim, time.monotonic())
    finally:
        await playing.close()
    assert not problems, "\n".join(problems)


async def test_c_a_pod_that_leaves_dns_is_drained_and_new_utterances_go_to_the_other(stack):
    """A Triton that stops resolving is drained by both gateways within a second: its utterance in flight ends
    normally, new utterances go to the other host, and it is used again within 2 s of resolving again."""
    g1, g2 = stack.gateways
    ws, held = await hold(g1, "in-flight")
    victim = stack.triton_at(next(url for url, n in (await asyncio.to_thread(stack.streams, g1)).items() if n))
    survivor = stack.other(victim)
    problems = []
    try:
        left_at = time.monotonic()
        await asyncio.to_thread(stack.bed.dns.set, TRITON_NAME, [survivor.host])
        try:
            await until(lambda: not any((stack.seen(g) or {}).get(victim.grpc_url) for g in stack.gateways),
                        NOTICE_S, f"{victim.host} still used by a gateway after leaving DNS")
        except AssertionError as exc:
            problems.append(str(exc))
        for gateway in (g1, g2):
            places = [await where(stack, gateway) for _ in range(2)]
            if set(places) != {survivor.grpc_url}:
                problems.append(f"{gateway.host} sent new utterances to {places} after {victim.host} left DNS")
        await ws.send(json.dumps({"type": "end"}))
        await asyncio.wait_for(asyncio.shield(held.reader), 15)
        if not held.completed:
            problems.append(f"the utterance in flight on the drained pod did not end normally: "
                            f"{[m for _, m in held.messages]}")
        print(f"{victim.host} left DNS; drained in flight, new utterances on {survivor.host} "
              f"({time.monotonic() - left_at:.1f} s)")
        await asyncio.to_thread(stack.bed.dns.set, TRITON_NAME, [t.host for t in stack.tritons])
        problems += await used_again(stack, victim, time.monotonic())
    finally:
        held.reader.cancel()
        await ws.close()
    assert not problems, "\n".join(problems)


async def test_d_a_killed_gateway_replica_leaves_the_other_serving(stack):
    """A gateway replica killed: its sessions see their socket close at once, a reconnect there is refused at once,
    the other replica serves new sessions within the first-audio budget and its own session plays on."""
    g1, g2 = stack.gateways
    ws1, on_g1 = await hold(g1, "on-g1")
    ws2, on_g2 = await hold(g2, "on-g2")
    problems = []
    try:
        killed_at = time.monotonic()
        await asyncio.to_thread(g1.kill)
        await asyncio.wait_for(asyncio.shield(on_g1.reader), 5)
        if on_g1.closed_at is None or on_g1.closed_at - killed_at > NOTICE_S:
            problems.append(f"g1's session did not see its socket close within {NOTICE_S:g} s")
        refused_at = time.monotonic()
        try:
            await (await open_speaker(g1.ws, open_timeout=3)).close()
            problems.append("a new session on the killed replica was accepted")
        except (OSError, InvalidHandshake, TimeoutError) as exc:
            if time.monotonic() - refused_at > NOTICE_S:
                problems.append(f"connecting to the killed replica took {time.monotonic() - refused_at:.2f} s to "
                                f"fail ({type(exc).__name__})")
        problems += new_utterance_problems([await fresh(g2, "elsewhere")], "new session on g2")
        await ws2.send(json.dumps({"type": "end"}))
        await asyncio.wait_for(asyncio.shield(on_g2.reader), 15)
        if not on_g2.completed:
            problems.append(f"g2's own session did not play on: {[m for _, m in on_g2.messages]}")
        await asyncio.to_thread(g1.start)
        await until(lambda: stack.settled(), 30, "g1 restarted but not settled")
    finally:
        for socket_, heard in ((ws1, on_g1), (ws2, on_g2)):
            heard.reader.cancel()
            with contextlib.suppress(ConnectionClosed, OSError):
                await socket_.close()
    assert not problems, "\n".join(problems)


async def frozen_talker(stack: Stack, written: bool) -> list[str]:
    """Freeze the talker process serving a playing utterance at its first audio (SIGSTOP: its server still answers
    pings and its HTTP health checks), and say what went wrong: the utterance must end with TTS_UNAVAILABLE by its progress
    deadline (its listener's lead plus the grace), and new utterances sent as it froze (two on each gateway at once:
    some are routed to the frozen host) must be served by the other host within their first-audio budget."""
    playing = await Playing(stack.gateways[0], written=written).start()
    victim = await playing.where(stack)
    talker = model_process(victim, "talker")
    stack.frozen = [talker]
    problems = []
    try:
        fault_at = time.monotonic()
        os.kill(talker, signal.SIGSTOP)
        lead = playing.lead(fault_at)
        bound = max(lead, 0.0) + max(GRACE_S, 2.0) + 2
        # New utterances at once, before anything can have noticed: some are routed to the frozen host.
        sent = asyncio.gather(*(fresh(g, f"new-{g.host.name}-{i}") for g in stack.gateways for i in range(2)),
                              return_exceptions=True)
        with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(playing.heard.reader), bound)
        heard = playing.heard
        if heard.error is None:
            problems.append(f"the playing utterance got no error within {bound:.1f} s of its talker freezing "
                            f"(listener's lead {lead:.2f} s; "
                            f"{'still open' if not heard.reader.done() else [m for _, m in heard.messages]})")
        else:
            late = heard.error_at - fault_at - max(lead, 0.0)
            print(f"frozen talker: {heard.error['code']} {heard.error_at - fault_at:.2f} s after (lead {lead:.2f} s)")
            if late > GRACE_S + 0.5:
                problems.append(f"the error came {late:.2f} s after the listener's buffer ran dry (progress "
                                f"deadline: {GRACE_S:g} s past it)")
            if heard.error["code"] != UNAVAILABLE or heard.error.get("recoverable") is not True:
                problems.append(f"the playing utterance ended with {heard.error['code']}, expected {UNAVAILABLE}")
        problems += new_utterance_problems(await sent, "sent as the talker froze")
    finally:
        os.kill(talker, signal.SIGCONT)
        stack.frozen = []
        await playing.close()
        # Triton's Python backend does not survive a stub frozen for seconds (it aborts on a lock it cannot take,
        # a few seconds later): the victim is started afresh for the next test.
        await asyncio.to_thread(victim.kill)
    return problems


async def test_e_a_frozen_model_process_is_noticed_by_the_progress_deadline(stack):
    """A talker frozen mid-sentence while its server still answers pings (as by a hung GPU): the playing utterance
    ends with TTS_UNAVAILABLE by its progress deadline, and new utterances are served by the other host."""
    problems = await frozen_talker(stack, written=False)
    assert not problems, "\n".join(problems)


async def test_f_a_frozen_model_process_is_noticed_while_the_text_is_still_being_written(stack):
    """The same with text still being written (an LLM's answer, a word every 150 ms): audio is due for the words
    already sent, so the progress deadline holds while the writer writes."""
    problems = await frozen_talker(stack, written=True)
    assert not problems, "\n".join(problems)
