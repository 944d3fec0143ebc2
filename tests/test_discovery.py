"""Triton pods found through DNS (``dns://name:port`` in TRITON_URLS): two real tritonservers join and leave a
gateway's endpoints under load, through an injected resolver, with no gateway restart."""
from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest

from gateway.config import Settings
from gateway.discovery import Discovery, parse_dns_entry
from gateway.endpoints import Endpoints
from gateway.engine_stream import SynthesisFailed
from gateway.speech import sentence_audio
from gateway.text import SentenceFeed, split_sentences
from triton_helpers import wait_until
from tts_contract.listener import Listener

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
    """Clients speaking one utterance after another through the endpoints, noting where each stream was opened
    and how each utterance ended: completed, refused for load (OVERLOADED: on this shared CPU two servers can be
    at real-time capacity), or failed with the server (transport); any other exception escapes and fails the
    test."""

    def __init__(self, endpoints: Endpoints, clients: int = 3):
        self.endpoints = endpoints
        self.opened: list[tuple[float, str]] = []  # (when, endpoint url) of every stream
        self.outcomes: Counter = Counter()
        self.errors: list[SynthesisFailed] = []
        self.running = True
        opened = endpoints.stream_opened

        def record(endpoint):
            self.opened.append((time.monotonic(), endpoint.url))
            opened(endpoint)

        endpoints.stream_opened = record
        self.tasks = [asyncio.create_task(self._client(index)) for index in range(clients)]

    async def _client(self, index: int) -> None:
        number = 0
        while self.running:
            number += 1
            text = f"Client {index} says hello, number {number}. And once more."
            try:
                async for _ in sentence_audio(self.endpoints, SETTINGS, SentenceFeed(400, split_sentences(text, 400)),
                                              None, "English", Listener()):
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
        """Streams opened at or after ``moment``, by the endpoint serving them."""
        return Counter(url for at, url in self.opened if at >= moment)


@pytest.fixture
async def discovered(two_tritons):
    """A endpoints whose only entry is a DNS name, resolved every 0.2 s, that at first names the first server."""
    first, second = two_tritons
    dns = FakeDns(first.grpc_url)
    endpoints = Endpoints()
    discovery = Discovery(endpoints, [NAME], resolver=dns, interval_s=0.2)
    await discovery.refresh()
    await endpoints.check_ready()
    endpoints.start_polling(0.2)
    discovery.start()
    try:
        yield endpoints, dns, first, second
    finally:
        discovery.close()
        await endpoints.close()


async def test_a_triton_that_appears_in_dns_takes_new_streams_within_seconds(discovered):
    """Under load on one server, a second one that the name starts resolving to serves new utterances within
    seconds, and every utterance completes."""
    endpoints, dns, first, second = discovered
    load = Load(endpoints)
    try:
        assert await wait_until(lambda: len(load.opened) >= 2, timeout=60)
        joined = time.monotonic()
        dns.urls = [first.grpc_url, second.grpc_url]
        assert await wait_until(lambda: load.since(joined)[second.grpc_url] >= 1, timeout=15), \
            f"the new endpoint took no stream: {load.since(joined)}"
    finally:
        await load.stop()
    assert load.outcomes["completed"] > 0 and set(load.outcomes) <= {"completed", "OVERLOADED"}, load.errors


async def test_a_triton_that_leaves_dns_is_drained_then_removed(discovered):
    """When the name stops resolving to a server, it takes no new stream, its streams in flight end normally,
    and it leaves the endpoints once they have; no utterance fails."""
    endpoints, dns, first, second = discovered
    dns.urls = [first.grpc_url, second.grpc_url]
    assert await wait_until(lambda: all(b.ready for b in endpoints.endpoints) and len(endpoints.endpoints) == 2, timeout=30)
    load = Load(endpoints, clients=4)
    try:
        assert await wait_until(lambda: load.since(0)[second.grpc_url] >= 1, timeout=60)
        dns.urls = [first.grpc_url]
        assert await wait_until(lambda: any(b.draining for b in endpoints.endpoints) or len(endpoints.endpoints) == 1,
                                timeout=5)
        left = time.monotonic()
        assert await wait_until(lambda: [b.url for b in endpoints.endpoints] == [first.grpc_url], timeout=60), \
            f"the leaving endpoint was not removed: {endpoints.report()}"
        assert await wait_until(lambda: load.since(left)[first.grpc_url] >= 2, timeout=60)
        assert load.since(left)[second.grpc_url] == 0
    finally:
        await load.stop()
    assert load.outcomes["completed"] > 0 and set(load.outcomes) <= {"completed", "OVERLOADED"}, load.errors


async def test_a_triton_that_dies_as_it_leaves_loses_no_utterance_without_a_recoverable_error(discovered):
    """A server killed while it streams and gone from DNS: its utterances end with a recoverable error (or
    move to the other server before their first audio), later ones are served by the survivor."""
    endpoints, dns, first, second = discovered
    dns.urls = [first.grpc_url, second.grpc_url]
    assert await wait_until(lambda: all(b.ready for b in endpoints.endpoints) and len(endpoints.endpoints) == 2, timeout=30)
    load = Load(endpoints, clients=4)
    try:
        assert await wait_until(lambda: any(b.streams for b in endpoints.endpoints if b.url == second.grpc_url),
                                timeout=60)
        second.kill()
        dns.urls = [first.grpc_url]
        gone = time.monotonic()
        assert await wait_until(lambda: load.since(gone)[first.grpc_url] >= 3, timeout=90)
    finally:
        await load.stop()
    assert load.outcomes["completed"] > 0 and set(load.outcomes) <= {"completed", "OVERLOADED", "transport"}, \
        load.errors
    assert await wait_until(lambda: [b.url for b in endpoints.endpoints] == [first.grpc_url], timeout=10)
