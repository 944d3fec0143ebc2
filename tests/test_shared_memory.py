"""The Python backend's shared memory in /dev/shm: each tritonserver we start names its regions with its own
pid, and what a killed one leaves there is removed once its processes are gone, never what a live one uses."""
from __future__ import annotations

import mmap
import os
import subprocess
import threading
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import render_cpu_repository
from tools.run_stack import supervise
from tools.triton_local import SHM_DIR, LocalTriton, remove_stale_regions, shm_prefix


def _regions(prefix: str) -> list[str]:
    return sorted(path.name for path in SHM_DIR.glob(f"{prefix}*"))


def test_the_supervisor_removes_the_shared_memory_of_a_killed_server(tiny_model_dir, voices_dir, tmp_path):
    """After `kill -9` of tritonserver, `make run`'s supervisor has removed every region with the dead server's
    prefix by the time it restarts it."""
    repository = render_cpu_repository(tiny_model_dir, voices_dir, tmp_path / "repo")
    server = LocalTriton(repository, log_path=tmp_path / "triton.log").start().wait_ready(180)
    killed, left, restarted, stop = server.shm_prefix, [], threading.Event(), []

    def restart():  # stands in for the restart: records what is left, then ends the supervisor
        left.extend(_regions(killed))
        stop.append(True)
        restarted.set()

    server.start = restart
    gateway = SimpleNamespace(process=SimpleNamespace(poll=lambda: None), log_path=None, start=lambda: None)
    supervisor = threading.Thread(target=supervise, args=(server, gateway, stop), daemon=True)
    try:
        assert _regions(killed), f"no region named {killed}*: the prefix did not reach the Python backend"
        supervisor.start()
        server.kill(server_only=True)
        assert restarted.wait(30), "the supervisor did not restart the killed server"
        assert left == [], f"left in /dev/shm when the server was restarted: {left}"
    finally:
        stop.append(True)
        supervisor.join(10)
        server.stop()


@pytest.fixture
def fake_regions():
    """Create region files by name under /dev/shm; all are removed after the test."""
    made: list[Path] = []

    def make(name: str) -> Path:
        path = SHM_DIR / name
        path.write_bytes(b"\0" * mmap.PAGESIZE)
        made.append(path)
        return path

    yield make
    for path in made:
        path.unlink(missing_ok=True)


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait(10)
    return process.pid


def test_start_removes_regions_of_dead_servers_only(fake_regions):
    """Stale-region sweep at start: a dead server's regions go; a live process's, and the backend's default
    names (servers not started by us), stay."""
    tag = uuid.uuid4().hex
    dead = fake_regions(f"{shm_prefix(_dead_pid())}{tag}")
    alive = fake_regions(f"{shm_prefix(os.getpid())}{tag}")
    foreign = fake_regions(f"triton_python_backend_shm_region_{tag}")
    remove_stale_regions()  # another test run's start may sweep too: what is left is what counts
    assert not dead.exists()
    assert alive.exists() and foreign.exists()


def test_a_region_still_mapped_is_kept_though_its_server_is_gone(fake_regions):
    """A dead server's region that some process still maps (a model process on its way out) is kept."""
    region = fake_regions(f"{shm_prefix(_dead_pid())}{uuid.uuid4().hex}")
    with open(region, "r+b") as handle, mmap.mmap(handle.fileno(), 0) as mapped:
        remove_stale_regions()
        assert region.exists()
        mapped[0] = 1  # still in use here
    remove_stale_regions()
    assert not region.exists()
