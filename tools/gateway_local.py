"""Run the gateway (`python -m gateway`) as a child process: for `make run`, benchmarks and tests."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Optional

from tools.triton_local import ROOT, free_port


def gateway_ready(http: str, timeout: float = 2.0) -> bool:
    """True when the gateway at ``http`` answers /readyz with 200 (Triton ready behind it)."""
    try:
        with urllib.request.urlopen(http + "/readyz", timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False


class GatewayProcess:
    """`python -m gateway` on a free port, configured by environment variables."""

    def __init__(self, triton_url: str, voices_dir: Path, log_path: Path, port: Optional[int] = None, **env: str):
        self.port = port or free_port()
        self.log_path = Path(log_path)
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
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
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
            if gateway_ready(self.http):
                return
            time.sleep(0.2)
        raise TimeoutError("gateway never became ready")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None
