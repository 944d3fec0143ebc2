"""Run the real tritonserver shipped in the nvidia-pytriton wheel, without Docker.

Builds a backend directory from the wheel's Python backend and the stub for this interpreter, sets the
library path, and puts this virtual environment first on PATH (the stub takes its Python from there).
Each server's Python backend names its shared-memory regions with the server's pid, so that the regions a
killed server leaves in /dev/shm are removed once its processes are gone (see ``LocalTriton.reap``).
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tts_contract import keepalive  # noqa: E402  (the flags must match the gateway's pings)
SHM_DIR = Path("/dev/shm")
# The Python backend names each model instance's region <prefix><uuid>. The prefix carries the pid of the
# server that created it: a region is stale once no live process has that pid or process group (the model
# processes share the server's group) and none maps it. The backend's default prefix is never touched.
SHM_PREFIX = "qwen_tts_triton_"
_SHM_OWNER = re.compile(rf"^{SHM_PREFIX}(\d+)_")


def pytriton_root() -> Path:
    try:
        import pytriton
    except ImportError:
        raise SystemExit("nvidia-pytriton is not installed: run `make setup`") from None
    return Path(pytriton.__file__).resolve().parent / "tritonserver"


def backend_dir(dest: Path = ROOT / "build" / "triton-backends") -> Path:
    """A --backend-directory holding the Python backend and the stub for this Python version."""
    src = pytriton_root()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = src / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise SystemExit(f"the pytriton wheel has no Python backend stub for Python {version}")
    python_dir = dest / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for source in (src / "backends" / "python" / "libtriton_python.so",
                   src / "backends" / "python" / "triton_python_backend_utils.py", stub):
        target = python_dir / source.name
        if target.is_symlink() or target.exists():
            target.unlink()
        target.symlink_to(source)
    return dest


def server_env(base: Optional[dict] = None) -> dict:
    env = dict(os.environ if base is None else base)
    libs = [str(pytriton_root().parent.parent / "nvidia_pytriton.libs"), sysconfig.get_config_var("LIBDIR") or ""]
    env["LD_LIBRARY_PATH"] = ":".join([p for p in libs if p] + [env.get("LD_LIBRARY_PATH", "")]).rstrip(":")
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def shm_prefix(pid) -> str:
    return f"{SHM_PREFIX}{pid}_"


def shm_prefix_arg(pid) -> str:
    """The flag that gives the Python backend of the server running as ``pid`` its region prefix."""
    return f"--backend-config=python,shm-region-prefix-name={shm_prefix(pid)}"


def process_dirs() -> list[Path]:
    """/proc/<pid> of every process now."""
    return [entry for entry in Path("/proc").iterdir() if entry.name.isdigit()]


def stat_fields(entry: Path) -> list[str]:
    """The fields of /proc/<pid>/stat after the command name: state, ppid, pgrp, ... (OSError once it is gone)."""
    return (entry / "stat").read_text().rsplit(")", 1)[1].split()


def _live_ids() -> set[int]:
    """Pids and process groups of the live processes (zombies excluded: they hold no memory, and nothing here
    may reap the orphans a killed server leaves, so they can linger as zombies)."""
    ids = set()
    for entry in process_dirs():
        try:
            fields = stat_fields(entry)
        except (OSError, IndexError):
            continue
        if fields[0] not in ("Z", "X"):
            ids.update((int(entry.name), int(fields[2])))
    return ids


def _mapped_regions() -> set[str]:
    """Names of our regions that some process maps (a process we may not inspect is skipped)."""
    names = set()
    marker = f"{SHM_DIR}/{SHM_PREFIX}"
    for entry in process_dirs():
        try:
            maps = (entry / "maps").read_text()
        except OSError:
            continue
        if marker in maps:
            names.update(line.rsplit("/", 1)[1].removesuffix(" (deleted)")
                         for line in maps.splitlines() if marker in line)
    return names


def _unlink(paths) -> list[str]:
    removed = []
    for path in paths:
        try:
            path.unlink()
            removed.append(path.name)
        except FileNotFoundError:
            pass
    return removed


def remove_stale_regions() -> list[str]:
    """Remove the regions left by servers of ours whose processes are all gone; the names removed."""
    if not SHM_DIR.is_dir():
        return []
    owned = [(path, int(match.group(1))) for path in SHM_DIR.iterdir() if (match := _SHM_OWNER.match(path.name))]
    if not owned:
        return []
    live = _live_ids()
    candidates = [path for path, owner in owned if owner not in live]
    mapped = _mapped_regions() if candidates else set()
    return _unlink(path for path in candidates if path.name not in mapped)


def scrape_metrics(url: str) -> dict[str, float]:
    """A Prometheus text page (Triton's metrics port, the gateway's /metrics) as {series: value}."""
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalTriton:
    """A tritonserver child process with its own ports and log file."""

    def __init__(self, model_repository: Path, http_port: int = 0, grpc_port: int = 0, metrics_port: int = 0,
                 log_path: Optional[Path] = None, extra_args: tuple = (), env: Optional[dict] = None):
        self.model_repository = Path(model_repository)
        self.http_port = http_port or free_port()
        self.grpc_port = grpc_port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.log_path = log_path
        self.extra_args = tuple(extra_args)
        self.env = server_env(env)
        self.process: Optional[subprocess.Popen] = None
        self.shm_prefix: Optional[str] = None  # known once started: it carries the server's pid
        self._log_file = None

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def command(self, pid: Optional[int] = None) -> list[str]:
        """The server's command line; with ``pid`` (the pid it will run as), its shared-memory prefix too."""
        binary = pytriton_root() / "bin" / "tritonserver"
        shm = () if pid is None else (shm_prefix_arg(pid),)
        return [
            str(binary), f"--model-repository={self.model_repository}",
            f"--backend-directory={backend_dir()}",
            f"--http-port={self.http_port}", f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}", "--allow-metrics=true", "--allow-gpu-metrics=false",
            "--pinned-memory-pool-byte-size=0", "--exit-timeout-secs=5", "--disable-auto-complete-config",
            "--log-verbose=0", *keepalive.triton_flags(), *shm, *self.extra_args,
        ]

    def start(self) -> "LocalTriton":
        remove_stale_regions()
        if self.log_path:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log_file = self._log_file or open(self.log_path, "ab")
        out = self._log_file or None
        # The prefix must name the server's own pid, known only once it runs: a shell execs the server in its
        # place (same pid, and the new session makes it the group leader) with $$ in the prefix.
        launcher = ["/bin/sh", "-c", f'exec "$@" {shm_prefix_arg("$$")}', "sh", *self.command()]
        self.process = subprocess.Popen(launcher, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        self.shm_prefix = shm_prefix(self.process.pid)
        return self

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=1) as response:
                return response.status == 200
        except OSError:
            return False

    def wait_ready(self, timeout: float = 120.0) -> "LocalTriton":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited with code {self.process.returncode}; "
                                   f"see {self.log_path or 'its output'}")
            if self.is_ready():
                return self
            time.sleep(0.2)
        raise TimeoutError(f"tritonserver not ready after {timeout:.0f} s; see {self.log_path}")

    def stop(self, timeout: float = 15.0) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
        if self.process is not None:
            self.reap()
        if self._log_file:
            self._log_file.close()
            self._log_file = None

    def kill(self, server_only: bool = False) -> None:
        """Hard kill (for failure tests): the whole process group, or only tritonserver itself, which is what
        a crash looks like to its model processes."""
        if self.process is not None and self.process.poll() is None:
            if server_only:
                os.kill(self.process.pid, signal.SIGKILL)
            else:
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(5)

    def reap(self, timeout: float = 10.0) -> list[str]:
        """Once the server has exited: kill what is left of its process group, wait until none of it is alive,
        then remove the shared-memory regions it left in /dev/shm (a killed server cannot). The names removed;
        none while the server runs or when its group outlives ``timeout`` (the next start removes them then)."""
        if self.process is None or self.process.poll() is None:
            return []
        self._sweep_group()
        deadline = time.monotonic() + timeout
        # Model processes still map the regions until they are gone; a group that lingers is left alone.
        while self.process.pid in _live_ids():
            if time.monotonic() > deadline:
                return []
            time.sleep(0.05)
        return _unlink(SHM_DIR.glob(f"{self.shm_prefix}*")) if self.shm_prefix else []

    def _sweep_group(self) -> None:
        """Kill whatever is left in the server's process group (model processes, their watchers) once the
        server is gone, so no test or benchmark leaves memory behind."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def model_processes(self, orphans_only: bool = False) -> list[int]:
        """PIDs of Python-backend stubs serving this model repository; with ``orphans_only``, those whose
        parent is not this server's current process (left behind by an earlier one)."""
        pids = []
        for entry in process_dirs():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                parent = int(stat_fields(entry)[1])
            except (OSError, ValueError, IndexError):
                continue
            if "triton_python_backend_stub" in cmdline and str(self.model_repository) in cmdline and \
                    not (orphans_only and self.process is not None and parent == self.process.pid):
                pids.append(int(entry.name))
        return pids

    def __enter__(self):
        return self.start().wait_ready()

    def __exit__(self, *exc):
        self.stop()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Run tritonserver from the nvidia-pytriton wheel (foreground).")
    parser.add_argument("--model-repository", type=Path, default=ROOT / "build" / "model_repository")
    parser.add_argument("--http-port", type=int, default=int(os.environ.get("TRITON_HTTP_PORT", 8000)))
    parser.add_argument("--grpc-port", type=int, default=int(os.environ.get("TRITON_GRPC_PORT", 8001)))
    parser.add_argument("--metrics-port", type=int, default=int(os.environ.get("TRITON_METRICS_PORT", 8002)))
    args, extra = parser.parse_known_args(argv)
    server = LocalTriton(args.model_repository, args.http_port, args.grpc_port, args.metrics_port,
                         extra_args=tuple(extra))
    remove_stale_regions()
    command = server.command(pid=os.getpid())  # exec keeps this pid: the prefix names the server
    print("+ " + " ".join(command), flush=True)
    os.execve(command[0], command, server.env)


if __name__ == "__main__":
    sys.exit(main())
