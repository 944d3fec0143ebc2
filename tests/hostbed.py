"""The multi-host test bed (tools/hostbed.py) for tests: the bed and its serving stack, skipped with the reason where
namespaces cannot be made here (not root, no iproute2, no dnsmasq)."""
from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from tools.hostbed import (  # noqa: F401 - what the tests use, from one place
    GATEWAY_ENV_VAR, TRITON_NAME, BedGateway, BedTriton, Heard, HostBed, Stack, env_overrides, hear, open_speaker,
    speak, triton_args, unavailable)

HELD_TEXT = "Hold the line while I think about it"  # as gateway_helpers.HELD_TEXT: its continuous stream stays open


def bed_or_skip(workdir: Path) -> HostBed:
    """A bed (not started) in ``workdir``, or the test skipped with why none can be made here."""
    reason = unavailable()
    if reason:
        pytest.skip(f"multi-host test bed unavailable: {reason}")
    return HostBed(workdir)


async def hold(gateway: BedGateway, request_id: str = "held") -> tuple:
    """A session on ``gateway`` whose utterance is still being written (continuous text, x-vector voice): its stream
    stays open on one endpoint until the text ends. Returns (socket, Heard) at its first audio; a reader task keeps
    filling the Heard (``heard.reader``)."""
    ws = await open_speaker(gateway.ws, voice="plain", textMode="continuous")
    heard = Heard(time.monotonic())
    await ws.send(json.dumps({"type": "append", "text": HELD_TEXT, "requestId": request_id}))
    heard.reader = asyncio.create_task(hear(ws, heard, timeout=120))
    await until(lambda: heard.audio or heard.reader.done(), 15, "no first audio for a held utterance")
    return ws, heard


async def until(condition, timeout: float, what: str, interval: float = 0.02) -> float:
    """Wait (bounded) until ``condition()`` is true; the seconds it took. AssertionError(``what``) past ``timeout``."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what} (waited {timeout:g} s)")
        await asyncio.sleep(interval)
    return time.monotonic() - started


async def where(stack: Stack, gateway: BedGateway) -> str:
    """The endpoint ``gateway`` sends a new utterance to now: an utterance is held there while its gateway's
    streams are read, then closed."""
    before = await asyncio.to_thread(stack.streams, gateway)
    ws, heard = await hold(gateway, "where")
    try:
        after = await asyncio.to_thread(stack.streams, gateway)
    finally:
        heard.reader.cancel()
        await ws.close()
    grown = [url for url, count in after.items() if count > before.get(url, 0)]
    assert len(grown) == 1, f"cannot tell where the utterance went: streams {before} -> {after}"
    return grown[0]
