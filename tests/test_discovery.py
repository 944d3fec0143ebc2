"""Triton pods found through DNS (``dns://name:port`` in TRITON_URLS): two real tritonservers join and leave a
running pool under load, through an injected resolver, with no gateway restart."""
from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest

from gateway.config import Settings
from gateway.delivery import PlaybackClock
from gateway.discovery import Discovery, parse_dns_entry
from gateway.synthesis import sentence_audio
from gateway.text import TextFeed, split_sentences
from gateway.triton_client import SynthesisFailed, TritonPool
from triton_helpers import wait_until

NAME = "dns://tritons.test.svc:8001"
SETTINGS = Settings(frames_base=10, frames_per_char=0.8)  # realistic lengths: the random model never ends


class FakeDns:
    """A resolver whose answer the test changes, as a headless Service's records change with its ready pods."""

    def __init__(self, *urls: str):
        self.urls = list(urls)
        self.asked = 0

    async def __call__(self, name: str, port: int) -> list[str]:
        assert (name, port) == parse_dns_entry(NAME)
        self.asked += 1
        return list(self.urls)


class Load:
    """Clients speaking one utterance after another through the pool, noting where each utterance's slot was
    taken and how each ended: completed, refused for load (OVERLOADED: on this shared CPU two servers can be at
    real-time capacity), or failed with the server (transport); any other exception escapes and fails the test."""

    def __init__(self, pool: TritonPool, clients: int = 3):
        self.pool = pool
        self.seats = []
        self.outcomes: Counter = Counter()
        self.errors: list[SynthesisFailed] = []
        self.running = True
        take = pool.seat

        async def seat(max_wait_s: float = 0.0):
            taken = await take(max_wait_s)
            self.seats.append(taken)
            return taken

        pool.seat = seat
        self.tasks = [asyncio.create_task(self._client(index)) for index in range(clients)]

    async def _client(self, index: int) -> None:
        number = 0
        while self.running:
            number += 1
            text = f"Client {index} says hello, number {number}. And once more."
            try:
                async for _ in sentence_audio(self.pool, SETTINGS, TextFeed(400, split_sentences(text, 400)), None,
                                              "English", PlaybackClock()):
                    pass
                self.outcomes["completed"] += 1
            except SynthesisFailed as failure:
                self.outcomes["transport" if failure.transport else failure.code.name] += 1
                self.errors.append(failure)
                await asyncio.sleep(0.2)

    async def stop(self) -> None:
        self.running = False
        await asyncio.wait_for(asyncio.gather(*self.tasks), 120)

    def since(self, moment: float) -> Counter:
        """Utterances whose slot was taken at or after ``moment``, by the endpoint serving them."""
        return Counter(seat.endpoint.url for seat in self.seats if seat.taken >= moment)


@pytest.fixture
async def discovered(two_tritons):
    """A pool whose only entry is a DNS name, resolved every 0.2 s, that at first names the first server."""
    first, second = two_tritons
    dns = FakeDns(first.grpc_url)
    pool = TritonPool([], queue_timeout_s=30, first_audio_budget_s=30)
    discovery = Discovery(pool, [NAME], resolver=dns, interval_s=0.2)
    await discovery.refresh()
    await pool.check_ready()
    pool.start_polling(0.2)
    discovery.start()
    try:
        yield pool, dns, first, second
    finally:
        discovery.close()
        await pool.close()


async def test_a_triton_that_appears_in_dns_takes_new_streams_within_seconds(discovered):
    """Under load on one server, a second one that the name starts resolving to serves new utterances within
    seconds, and every utterance completes."""
    pool, dns, first, second = discovered
    load = Load(pool)
    try:
        assert await wait_until(lambda: len(load.seats) >= 2, timeout=60)
        joined = time.monotonic()
        dns.urls = [first.grpc_url, second.grpc_url]
        assert await wait_until(lambda: load.since(joined)[second.grpc_url] >= 1, timeout=15), \
            f"the new endpoint took no stream: {load.since(joined)}"
    finally:
        await load.stop()
    assert load.outcomes["completed"] > 0 and set(load.outcomes) <= {"completed", "OVERLOADED"}, load.errors


async def test_a_triton_that_leaves_dns_is_drained_then_removed(discovered):
    """When the name stops resolving to a server, it takes no new stream, its streams in flight end normally,
    and it leaves the pool once they have; no utterance fails."""
    pool, dns, first, second = discovered
    dns.urls = [first.grpc_url, second.grpc_url]
    assert await wait_until(lambda: all(b.ready for b in pool.endpoints) and len(pool.endpoints) == 2, timeout=30)
    load = Load(pool, clients=4)
    try:
        assert await wait_until(lambda: load.since(0)[second.grpc_url] >= 1, timeout=60)
        dns.urls = [first.grpc_url]
        assert await wait_until(lambda: any(b.draining for b in pool.endpoints) or len(pool.endpoints) == 1,
                                timeout=5)
        left = time.monotonic()
        assert await wait_until(lambda: [b.url for b in pool.endpoints] == [first.grpc_url], timeout=60), \
            f"the leaving endpoint was not removed: {pool.headroom()}"
        assert await wait_until(lambda: load.since(left)[first.grpc_url] >= 2, timeout=60)
        assert load.since(left)[second.grpc_url] == 0
    finally:
        await load.stop()
    assert load.outcomes["completed"] > 0 and set(load.outcomes) <= {"completed", "OVERLOADED"}, load.errors


async def test_a_triton_that_dies_as_it_leaves_loses_no_utterance_without_a_recoverable_error(discovered):
    """A server killed while it streams and gone from DNS: its utterances end with a recoverable error (or
    move to the other server before their first audio), later ones are served by the survivor."""
    pool, dns, first, second = discovered
    dns.urls = [first.grpc_url, second.grpc_url]
    assert await wait_until(lambda: all(b.ready for b in pool.endpoints) and len(pool.endpoints) == 2, timeout=30)
    load = Load(pool, clients=4)
    try:
        assert await wait_until(lambda: any(b.in_flight for b in pool.endpoints if b.url == second.grpc_url),
                                timeout=60)
        second.kill()
        dns.urls = [first.grpc_url]
        gone = time.monotonic()
        assert await wait_until(lambda: load.since(gone)[first.grpc_url] >= 3, timeout=90)
    finally:
        await load.stop()
    assert load.outcomes["completed"] > 0 and set(load.outcomes) <= {"completed", "OVERLOADED", "transport"}, \
        load.errors
    assert await wait_until(lambda: [b.url for b in pool.endpoints] == [first.grpc_url], timeout=10)
