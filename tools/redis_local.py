"""A real redis-server on a free local port (Debian's `redis-server`; scripts/setup.sh installs it), for the tests,
the benchmarks and `make run` with several gateway replicas: the interrupt bus between them."""
from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Optional

from tools.triton_local import free_port


class RedisUnavailable(RuntimeError):
    pass


class LocalRedis:
    """`redis-server` bound to 127.0.0.1 on ``port`` (a free one by default), nothing persisted."""

    def __init__(self, log_path: Path, port: Optional[int] = None):
        self.port = port or free_port()
        self.log_path = Path(log_path)
        self.process: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> "LocalRedis":
        binary = shutil.which("redis-server")
        if binary is None:
            raise RedisUnavailable("redis-server not found: apt-get install redis-server (scripts/setup.sh does)")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--protected-mode", "yes", "--daemonize", "no", "--loglevel", "warning"],
            stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RedisUnavailable(f"redis-server exited with {self.process.returncode}; see {self.log_path}")
            if self.answers():
                return self
            time.sleep(0.05)
        raise RedisUnavailable(f"redis-server did not answer within {timeout:g} s; see {self.log_path}")

    def answers(self) -> bool:
        """Whether it answers PING now."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as connection:
                connection.sendall(b"PING\r\n")
                return connection.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        """Gone at once, as a crashed or partitioned Redis is."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None
