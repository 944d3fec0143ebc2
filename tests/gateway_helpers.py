"""Helpers for gateway tests: run the real gateway process, talk to it with a real WebSocket client."""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Optional

from websockets.asyncio.client import connect

from tools.gateway_local import GatewayProcess

END_TYPES = ("complete", "audio_end")
# Greedy and short: each sentence gets 4 + one frame per character, so tests know its length.
FAST = {"GATEWAY_SYNTHESIS_PARAMETERS": json.dumps({"greedy": True}), "GATEWAY_FRAMES_BASE": "4",
        "GATEWAY_FRAMES_PER_CHAR": "1"}


def serve_gateway(triton_url: str, voices_dir, log_dir, **env: str):
    """A ready gateway (FAST settings unless ``env`` overrides them) for a fixture to yield, stopped after."""
    process = GatewayProcess(triton_url, voices_dir, log_dir / "gateway.log", **{**FAST, **env}).start()
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()


@dataclass
class Utterance:
    """What one utterance produced on the socket, in order."""

    messages: list = field(default_factory=list)  # JSON messages, in arrival order
    audio: bytearray = field(default_factory=bytearray)  # binary frames concatenated
    first_audio_at: Optional[float] = None
    end_at: Optional[float] = None

    def of_type(self, kind: str) -> list[dict]:
        return [m for m in self.messages if m["type"] == kind]

    @property
    def end(self) -> Optional[dict]:
        ends = [m for m in self.messages if m["type"] in END_TYPES]
        return ends[-1] if ends else None


async def receive_json(ws, timeout: float = 10.0) -> dict:
    """The next JSON message (binary frames in between are an error here)."""
    message = await asyncio.wait_for(ws.recv(), timeout)
    assert isinstance(message, str), "expected a JSON message, got audio"
    return json.loads(message)


async def send(ws, **message) -> None:
    await ws.send(json.dumps(message))


async def collect(ws, timeout: float = 60.0, until=END_TYPES, stop_on_error: bool = False) -> Utterance:
    """Read frames until an end message (or, optionally, an error) arrives."""
    result = Utterance()
    start = time.monotonic()

    async def run():
        while True:
            frame = await ws.recv()
            if isinstance(frame, bytes):
                if result.first_audio_at is None:
                    result.first_audio_at = time.monotonic() - start
                result.audio.extend(frame)
                continue
            message = json.loads(frame)
            result.messages.append(message)
            if message["type"] in until or (stop_on_error and message["type"] == "error"):
                result.end_at = time.monotonic() - start
                return

    await asyncio.wait_for(run(), timeout)
    return result


def open_session(url: str, **kwargs):
    return connect(url, open_timeout=10, close_timeout=5, max_size=None, **kwargs)


HELD_TEXT = "Hold the line while I think about it"  # 36 characters: its FAST cap is 40 tokens, 39 frames


async def hold_a_row(ws, request_id: str = "holding", **start) -> None:
    """Start an utterance whose text is still being written (x-vector voice, continuous text): it is in progress,
    holding its engine row, until ``release_the_row``, however fast the machine generates (a long `speak` ended
    before a test's next step on a fast machine). Returns at its first audio."""
    assert (await receive_json(ws))["type"] == "ready"
    await send(ws, type="start", voice="plain", textMode="continuous", **start)
    assert (await receive_json(ws))["textMode"] == "continuous"
    await send(ws, type="append", text=HELD_TEXT, requestId=request_id)
    assert isinstance(await asyncio.wait_for(ws.recv(), 30), bytes)


async def release_the_row(ws) -> Utterance:
    """End the held utterance's text: it speaks to its end and frees its row."""
    await send(ws, type="end")
    result = await collect(ws)
    assert result.end["cancelled"] is False and result.end["requestId"] == "holding", result.messages
    return result
