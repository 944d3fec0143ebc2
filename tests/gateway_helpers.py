"""Helpers for gateway tests: run the real gateway process, talk to it with a real WebSocket client."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from websockets.asyncio.client import connect

from conftest import ROOT
from tools.triton_local import free_port

END_TYPES = ("complete", "audio_end")


class GatewayProcess:
    """`python -m gateway` on a free port, configured by environment variables."""

    def __init__(self, triton_url: str, voices_dir: Path, log_path: Path, **env: str):
        self.port = free_port()
        self.log_path = log_path
        self.env = {**os.environ, "TRITON_URL": triton_url, "GATEWAY_PORT": str(self.port),
                    "GATEWAY_HOST": "127.0.0.1", "QWEN_TTS_VOICES_DIR": str(voices_dir),
                    "GATEWAY_READY_POLL_S": "0.5", "PYTHONUNBUFFERED": "1", **env}
        self.process: Optional[subprocess.Popen] = None

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/api/v1/speak"

    def start(self, timeout: float = 30) -> "GatewayProcess":
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen([sys.executable, "-m", "gateway"], cwd=ROOT, env=self.env,
                                        stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.process.returncode}; see {self.log_path}")
            try:
                with urllib.request.urlopen(self.http + "/healthz", timeout=1):
                    return self
            except OSError:
                time.sleep(0.1)
        raise TimeoutError(f"gateway did not come up; see {self.log_path}")

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.http + "/readyz", timeout=2):
                    return
            except OSError:
                time.sleep(0.2)
        raise TimeoutError("gateway never became ready")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self._log.close()


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
