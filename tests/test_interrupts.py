"""Interrupts by contract: every session of a conversation stops what it plays, on every gateway replica (through a
real Redis), and a bus that is down costs the other replicas only."""
from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from gateway_helpers import collect, hold_a_row, open_session, receive_json, release_the_row, send
from triton_helpers import wait_until
from tools.redis_local import LocalRedis

INTERRUPT_WAIT_S = 10.0  # every wait for an interrupted utterance's `complete` is bounded by this


@pytest.fixture
def redis_server(tmp_path):
    """A real redis-server of the test's own (it may kill it)."""
    server = LocalRedis(tmp_path / "redis.log").start()
    try:
        yield server
    finally:
        server.stop()


async def interrupt(gateway, contract_id: str, token: str = None) -> dict:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient(timeout=10) as http:
        response = await http.post(f"{gateway.http}/api/v1/contracts/{contract_id}/interrupt", headers=headers)
    assert response.status_code == 200, response.text
    return response.json()


async def interrupted_end(ws) -> dict:
    """The held utterance's end message after an interrupt."""
    end = (await collect(ws, timeout=INTERRUPT_WAIT_S)).end
    assert end["type"] == "complete" and end["requestId"] == "holding", end
    return end


async def test_an_interrupt_stops_every_session_of_the_contract_and_no_other(make_gateway):
    """Two sessions of contract c1 end with interrupted: true and what they heard; a session of c2 plays on."""
    gateway = make_gateway()
    gateway.wait_ready()
    async with open_session(gateway.ws) as first, open_session(gateway.ws) as second, \
            open_session(gateway.ws) as other:
        await hold_a_row(first, contractId="c1")
        await hold_a_row(second, contractId="c1")
        await hold_a_row(other, contractId="c2")
        answer = await interrupt(gateway, "c1")
        assert answer["sessions"] == 2 and answer["utterances"] == 2, answer
        for ws in (first, second):
            end = await interrupted_end(ws)
            assert end["interrupted"] is True and end["cancelled"] is True
            assert isinstance(end["heardMs"], int) and 0 <= end["heardMs"] <= end["audioLengthMs"]
            assert "heardText" in end
        await release_the_row(other)  # c2 was not touched: it speaks to its end


async def test_a_websocket_interrupt_message_stops_its_own_contract(make_gateway):
    """`{"type": "interrupt"}` from a session interrupts its conversation, the sender's own utterance included."""
    gateway = make_gateway()
    gateway.wait_ready()
    async with open_session(gateway.ws) as speaking, open_session(gateway.ws) as listening:
        await hold_a_row(speaking, contractId="talk")
        assert (await receive_json(listening))["type"] == "ready"
        await send(listening, type="start", contractId="talk")
        assert (await receive_json(listening))["type"] == "started"
        await send(listening, type="interrupt")
        assert (await interrupted_end(speaking))["interrupted"] is True


async def test_interrupts_stay_within_the_token_subject(make_gateway):
    """Another subject's session with the same contractId is not interrupted (a contract is per subject)."""
    gateway = make_gateway(GATEWAY_AUTH_TOKENS="token-alice,token-bob")
    gateway.wait_ready()
    alice_headers = {"additional_headers": {"Authorization": "Bearer token-alice"}}
    bob_headers = {"additional_headers": {"Authorization": "Bearer token-bob"}}
    async with open_session(gateway.ws, **alice_headers) as alice, open_session(gateway.ws, **bob_headers) as bob:
        await hold_a_row(alice, contractId="shared-name")
        await hold_a_row(bob, contractId="shared-name")
        answer = await interrupt(gateway, "shared-name", token="token-alice")
        assert answer["sessions"] == 1
        assert (await interrupted_end(alice))["interrupted"] is True
        await release_the_row(bob)


async def test_a_contract_id_beyond_the_limit_is_refused(make_gateway):
    """A 60,000-character contractId gets INVALID_CONFIG (bounded like every other string)."""
    gateway = make_gateway()
    gateway.wait_ready()
    async with open_session(gateway.ws) as ws:
        assert (await receive_json(ws))["type"] == "ready"
        await send(ws, type="start", contractId="x" * 60_000)
        error = await receive_json(ws)
        assert error["type"] == "error" and error["code"] == "INVALID_CONFIG" and "limit" in error["message"]


async def test_an_interrupt_reaches_a_session_on_another_replica_through_redis(make_gateway, redis_server):
    """Sessions of one contract on two gateway replicas both end when one replica takes the interrupt."""
    replicas = await two_replicas(make_gateway, redis_server)
    async with open_session(replicas[0].ws) as here, open_session(replicas[1].ws) as there:
        await hold_a_row(here, contractId="across")
        await hold_a_row(there, contractId="across")
        answer = await interrupt(replicas[0], "across")
        assert answer["otherReplicas"] == "told" and answer["sessions"] == 1
        for ws in (here, there):
            assert (await interrupted_end(ws))["interrupted"] is True


async def two_replicas(make_gateway, redis_server) -> list:
    """Two gateway replicas sharing the Redis bus, ready and subscribed."""
    replicas = [make_gateway(GATEWAY_REDIS_URL=redis_server.url) for _ in range(2)]
    for replica in replicas:
        replica.wait_ready()
        assert await wait_until(lambda r=replica: bus_state(r)["connected"], timeout=10)
    return replicas


def bus_state(gateway) -> dict:
    return httpx.get(f"{gateway.http}/readyz", timeout=5).json()["interruptBus"]


def bus_metric(gateway) -> float:
    for line in httpx.get(f"{gateway.http}/metrics", timeout=5).text.splitlines():
        if line.startswith("tts_gateway_interrupt_bus_up "):
            return float(line.split()[1])
    raise AssertionError("no tts_gateway_interrupt_bus_up metric")


async def test_with_redis_down_interrupts_stay_local_and_speech_goes_on(make_gateway, redis_server):
    """Redis killed mid-conversation: readiness and the metric say so, a local interrupt still works at once, the
    other replica's session plays on, and new speech is served."""
    replicas = await two_replicas(make_gateway, redis_server)
    async with open_session(replicas[0].ws) as here, open_session(replicas[1].ws) as there:
        await hold_a_row(here, contractId="redis-down")
        await hold_a_row(there, contractId="redis-down")
        redis_server.kill()
        assert await wait_until(lambda: not bus_state(replicas[0])["connected"], timeout=10), \
            "readiness should say the bus is down"
        assert bus_metric(replicas[0]) == 0
        assert httpx.get(f"{replicas[0].http}/readyz", timeout=5).status_code == 200  # speech is still served
        started = time.monotonic()
        answer = await interrupt(replicas[0], "redis-down")
        assert answer["otherReplicas"].startswith("not told") and answer["sessions"] == 1
        assert (await interrupted_end(here))["interrupted"] is True
        assert time.monotonic() - started < 5, "a local interrupt must not wait on the dead bus"
        await release_the_row(there)  # the other replica never heard it: its utterance plays to its end
        await send(here, type="speak", text="Still speaking.")
        assert (await collect(here, timeout=30)).end["cancelled"] is False


async def test_the_bus_reconnects_when_redis_comes_back(make_gateway, redis_server, tmp_path):
    """After Redis restarts on the same port, interrupts reach the other replica again."""
    replicas = await two_replicas(make_gateway, redis_server)
    redis_server.kill()
    assert await wait_until(lambda: not bus_state(replicas[1])["connected"], timeout=10)
    revived = LocalRedis(tmp_path / "redis-2.log", port=redis_server.port).start()
    try:
        for replica in replicas:
            assert await wait_until(lambda r=replica: bus_state(r)["connected"], timeout=10)
        async with open_session(replicas[1].ws) as there:
            await hold_a_row(there, contractId="back")
            assert (await interrupt(replicas[0], "back"))["otherReplicas"] == "told"
            assert (await interrupted_end(there))["interrupted"] is True
    finally:
        revived.stop()
