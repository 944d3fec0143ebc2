"""A multi-host test bed on one machine: real separate hosts as network namespaces, for faults across hosts.

Each host is a namespace of its own (``ip netns``) with one interface, ``eth0``, and its own address in a /24 of
10.231.0.0/16 that no interface of this machine uses yet; all are joined by a bridge, which lives in a namespace of
its own, with one veth into the root namespace so that the process running the bed (tests, benchmarks: it stays
in the root namespace) reaches every host at its address. Nothing is routed anywhere else: the hosts have no
default route, and only addresses of the bed are ever used.

A DNS host runs dnsmasq (Debian's ``dnsmasq-base``) answering names under ``bed.test`` from a hosts file the bed
rewrites (SIGHUP reloads it; TTL 1 s), so pods join and leave by DNS as in Kubernetes; every host's
``/etc/netns/<ns>/resolv.conf`` names it (``ip netns exec`` gives a namespace its own resolver that way).

Faults: ``partition(host)``/``heal(host)`` drop every packet leaving and entering a host's interface, silently
(``tc``: an htb class whose leaf is a zero-length pfifo, with u32 filters matching everything: the kernel here has
no netem and no prio); ``kill(process)``; ``dns.set(name, hosts)``; and ``proxy(...)``, a fault-injecting TCP proxy
(tools/faultproxy.py) in a host of its own, for delay and loss.

Every namespace, link, process and /etc/netns file of a bed is named with the prefix ``qtb<pid>-`` (the root veth:
``qtb<pid>``); ``close`` removes them all, and a bed whose process is gone (a run that was killed) is removed when
the next one starts.

    with HostBed(workdir) as bed:
        t1 = bed.add_host("t1")
        triton = bed.triton(t1, repository).start().wait_ready()
        bed.dns.set("triton.bed.test", [t1])
        gateway = bed.gateway(bed.add_host("g1"), voices, TRITON_URLS="dns://triton.bed.test:8001").start()
        bed.partition(t1); ...; bed.heal(t1)
"""
from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import random
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Union

from tools.triton_local import ROOT, LocalTriton, remove_stale_regions, shm_prefix, shm_prefix_arg

PREFIX = "qtb"
_BED_NS = re.compile(rf"^{PREFIX}(\d+)-")
_BED_LINK = re.compile(rf"^{PREFIX}(\d+)$")
NETNS_ETC = Path("/etc/netns")
DOMAIN = "bed.test"
TRITON_NAME = f"triton.{DOMAIN}"
DNS_PORT = 53
TRITON_HTTP, TRITON_GRPC, TRITON_METRICS = 8000, 8001, 8002
GATEWAY_PORT = 8080
REDIS_PORT = 6379
# HTTP from the bed's own process never goes through a proxy (only the bed's addresses are used).
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class BedUnavailable(RuntimeError):
    """Namespaces cannot be made here (not root, no iproute2, no dnsmasq); the message says which."""


def _run(*argv: str, check: bool = True, timeout: float = 20) -> subprocess.CompletedProcess:
    result = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def unavailable() -> Optional[str]:
    """Why a bed cannot be made on this machine; None when it can (a namespace is made and removed to be sure)."""
    if os.geteuid() != 0:
        return "the multi-host test bed needs root (network namespaces: ip netns)"
    for tool, package in (("ip", "iproute2"), ("tc", "iproute2"), ("dnsmasq", "dnsmasq-base")):
        if shutil.which(tool) is None:
            return f"the multi-host test bed needs `{tool}` (apt-get install {package}; scripts/setup.sh does)"
    probe = f"{PREFIX}{os.getpid()}-probe"
    try:
        made = _run("ip", "netns", "add", probe, check=False)
        if made.returncode != 0:
            return f"cannot make a network namespace here: {made.stderr.strip()}"
        up = _run("ip", "-n", probe, "link", "set", "lo", "up", check=False)
        if up.returncode != 0:
            return f"cannot configure a network namespace here: {up.stderr.strip()}"
    finally:
        _run("ip", "netns", "del", probe, check=False)
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _namespaces() -> list[str]:
    listed = _run("ip", "netns", "list", check=False).stdout
    return [line.split()[0] for line in listed.splitlines() if line.strip()]


def _kill_namespace(ns: str) -> None:
    """Kill every process in ``ns``, then remove it (the kernel frees it and its links once they are gone)."""
    for _ in range(3):
        pids = [int(p) for p in _run("ip", "netns", "pids", ns, check=False).stdout.split() if p.isdigit()]
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
    _run("ip", "netns", "del", ns, check=False)
    shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)


def remove_stale_beds() -> list[str]:
    """Remove what beds of processes that are gone left behind (namespaces, root veths, /etc/netns files); the
    names removed."""
    removed = []
    for ns in _namespaces():
        match = _BED_NS.match(ns)
        if match and not _alive(int(match.group(1))):
            _kill_namespace(ns)
            removed.append(ns)
    for line in _run("ip", "-o", "link", "show", check=False).stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0] if line.count(":") >= 2 else ""
        match = _BED_LINK.match(name)
        if match and not _alive(int(match.group(1))):
            _run("ip", "link", "del", name, check=False)
            removed.append(name)
    if NETNS_ETC.is_dir():
        for entry in NETNS_ETC.iterdir():
            match = _BED_NS.match(entry.name)
            if match and not _alive(int(match.group(1))):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(str(entry))
    if removed:
        remove_stale_regions()  # the shared memory of Tritons killed with their bed
    return removed


def _free_subnet() -> ipaddress.IPv4Network:
    """A /24 of 10.231.0.0/16 that no interface or route of the root namespace uses."""
    used = _run("ip", "-4", "-o", "addr", "show", check=False).stdout + _run("ip", "-4", "route", check=False).stdout
    start = os.getpid() % 200 + 20
    for third in list(range(start, 250)) + list(range(20, start)):
        if f"10.231.{third}." not in used:
            return ipaddress.IPv4Network(f"10.231.{third}.0/24")
    raise BedUnavailable("no free /24 in 10.231.0.0/16 for the test bed")


@dataclass(frozen=True)
class Host:
    """One host of the bed: its namespace, its address, and its port on the bridge."""

    name: str
    ns: str
    address: str
    port: str  # its veth's other end, on the bridge (in the bridge's namespace)

    def __str__(self) -> str:
        return f"{self.name} ({self.address})"


# -- DNS ---------------------------------------------------------------------------------------------------------

def _dns_query(server: str, name: str, timeout: float = 1.0) -> Optional[list[str]]:
    """The A records ``server`` answers for ``name`` (sorted); [] for no address (NXDOMAIN, no data); None when it
    does not answer within ``timeout``."""
    ident = random.randrange(1 << 16)
    question = b"".join(bytes([len(part)]) + part.encode() for part in name.split(".")) + b"\0"
    query = struct.pack(">HHHHHH", ident, 0x0100, 1, 0, 0, 0) + question + struct.pack(">HH", 1, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(query, (server, DNS_PORT))
        try:
            reply = sock.recv(4096)
        except OSError:
            return None
    answer_id, flags, _, count = struct.unpack(">HHHH", reply[:8])
    if answer_id != ident or flags & 0x000F not in (0, 3):
        return None
    offset = 12 + len(question) + 4
    addresses = []
    for _ in range(count):
        while reply[offset] and reply[offset] & 0xC0 != 0xC0:  # the record's name (labels, or a pointer)
            offset += reply[offset] + 1
        offset += 2 if reply[offset] & 0xC0 == 0xC0 else 1
        kind, _, _, length = struct.unpack(">HHIH", reply[offset:offset + 10])
        offset += 10
        if kind == 1 and length == 4:
            addresses.append(socket.inet_ntoa(reply[offset:offset + 4]))
        offset += length
    return sorted(addresses)


class BedDns:
    """dnsmasq on the bed's DNS host, answering names under ``bed.test`` from a hosts file (TTL 1 s)."""

    def __init__(self, bed: "HostBed", host: Host):
        self.bed, self.host = bed, host
        self.hosts_file = bed.workdir / "dns-hosts"
        self.records: dict[str, list[str]] = {}
        self.process: Optional[subprocess.Popen] = None

    def start(self) -> "BedDns":
        self._write()
        self.process = self.bed.popen(self.host, [
            "dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "--no-poll", "--conf-file=/dev/null",
            f"--addn-hosts={self.hosts_file}", f"--listen-address={self.host.address}", "--bind-interfaces",
            f"--port={DNS_PORT}", "--local-ttl=1", "--neg-ttl=1", f"--local=/{DOMAIN}/", "--pid-file=",
            "--user=root", "--group=root", "--log-facility=-", "--cache-size=0"],
            log_path=self.bed.workdir / "dnsmasq.log", name="dnsmasq")
        deadline = time.monotonic() + 10
        while _dns_query(self.host.address, f"nothing.{DOMAIN}", 0.3) is None:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dnsmasq did not answer; see {self.bed.workdir / 'dnsmasq.log'}")
            time.sleep(0.1)
        return self

    def _write(self) -> None:
        lines = [f"{address} {name}" for name, addresses in sorted(self.records.items()) for address in addresses]
        scratch = self.hosts_file.with_suffix(".new")
        scratch.write_text("".join(line + "\n" for line in lines))
        scratch.replace(self.hosts_file)

    def set(self, name: str, hosts: Iterable[Union[Host, str]], timeout: float = 5.0) -> None:
        """Make ``name`` resolve to ``hosts`` (none: it stops resolving), and wait until dnsmasq answers so."""
        addresses = sorted(h.address if isinstance(h, Host) else h for h in hosts)
        self.records[name] = addresses
        self._write()
        if self.process is None:
            return
        self.process.send_signal(signal.SIGHUP)  # dnsmasq reads its hosts files again and clears its cache
        deadline = time.monotonic() + timeout
        while self.resolve(name) != addresses:
            if time.monotonic() > deadline:
                raise TimeoutError(f"dnsmasq still answers {self.resolve(name)} for {name}, not {addresses}")
            time.sleep(0.05)

    def resolve(self, name: str) -> Optional[list[str]]:
        """What the bed's DNS answers for ``name`` now (asked from the root namespace)."""
        return _dns_query(self.host.address, name)


# -- the bed -----------------------------------------------------------------------------------------------------

class HostBed:
    """Network namespaces joined by a bridge, a DNS host, and the processes run in them (see the module)."""

    def __init__(self, workdir: Optional[Path] = None, dns: bool = True):
        self.pid = os.getpid()
        self.prefix = f"{PREFIX}{self.pid}-"
        self.root_link = f"{PREFIX}{self.pid}"
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="hostbed-"))
        self.with_dns = dns
        self.hosts: dict[str, Host] = {}
        self.partitioned: set[str] = set()
        self.processes: list[subprocess.Popen] = []
        self.services: list = []  # started Tritons, gateways, Redis, proxies: stopped first on close
        self.dns: Optional[BedDns] = None
        self.subnet: Optional[ipaddress.IPv4Network] = None
        self.bridge_ns = self.prefix + "br"
        self._next_address = 10
        self._started = False

    # -- topology ------------------------------------------------------------------------------------------------

    def address(self, index: int) -> str:
        return str(self.subnet.network_address + index)

    @property
    def root_address(self) -> str:
        """The root namespace's address on the bed (the tests' and benchmarks' own)."""
        return self.address(1)

    def start(self) -> "HostBed":
        reason = unavailable()
        if reason:
            raise BedUnavailable(reason)
        remove_stale_beds()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.subnet = _free_subnet()
        self._started = True
        try:
            _run("ip", "netns", "add", self.bridge_ns)
            _run("ip", "-n", self.bridge_ns, "link", "set", "lo", "up")
            _run("ip", "-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
            _run("ip", "-n", self.bridge_ns, "link", "set", "br0", "up")
            _run("ip", "link", "add", self.root_link, "type", "veth", "peer", "name", "root", "netns", self.bridge_ns)
            _run("ip", "-n", self.bridge_ns, "link", "set", "root", "master", "br0", "up")
            _run("ip", "addr", "add", f"{self.root_address}/{self.subnet.prefixlen}", "dev", self.root_link)
            _run("ip", "link", "set", self.root_link, "up")
            if self.with_dns:
                self.dns = BedDns(self, self.add_host("dns", index=2)).start()
        except BaseException:
            self.close()
            raise
        return self

    def add_host(self, name: str, index: Optional[int] = None) -> Host:
        """A new host ``name`` (a few letters and digits) on the bridge, with its own address and the bed's DNS."""
        if not re.fullmatch(r"[a-z][a-z0-9]{0,9}", name) or name in self.hosts or name in ("br", "probe"):
            raise ValueError(f"bad or duplicate host name {name!r}")
        if index is None:
            self._next_address += 1
            index = self._next_address
        host = Host(name, self.prefix + name, self.address(index), f"h-{name}")
        _run("ip", "netns", "add", host.ns)
        self.hosts[name] = host
        _run("ip", "-n", host.ns, "link", "set", "lo", "up")
        _run("ip", "-n", self.bridge_ns, "link", "add", host.port, "type", "veth", "peer", "name", "eth0",
             "netns", host.ns)
        _run("ip", "-n", self.bridge_ns, "link", "set", host.port, "master", "br0", "up")
        _run("ip", "-n", host.ns, "addr", "add", f"{host.address}/{self.subnet.prefixlen}", "dev", "eth0")
        _run("ip", "-n", host.ns, "link", "set", "eth0", "up")
        etc = NETNS_ETC / host.ns
        etc.mkdir(parents=True, exist_ok=True)
        dns = self.address(2)
        (etc / "resolv.conf").write_text(f"nameserver {dns}\noptions timeout:1 attempts:2\n")
        self._wait_reachable(host)
        return host

    def _wait_reachable(self, host: Host, timeout: float = 5.0) -> None:
        """Until the new interface passes traffic (duplicate address detection, the bridge learning it)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = _run("ip", "-n", host.ns, "-o", "addr", "show", "dev", "eth0", check=False).stdout
            if "tentative" not in state and "UP" in _run("ip", "-n", host.ns, "link", "show", "eth0").stdout:
                return
            time.sleep(0.05)

    # -- processes -----------------------------------------------------------------------------------------------

    def command(self, host: Host, argv: list[str]) -> list[str]:
        """``argv`` run inside ``host`` (``ip netns exec`` execs it: the process keeps the pid it is started as)."""
        return ["ip", "netns", "exec", host.ns, *argv]

    def popen(self, host: Host, argv: list[str], env: Optional[dict] = None, log_path: Optional[Path] = None,
              name: str = "", stdin=subprocess.DEVNULL, cwd: Optional[Path] = None) -> subprocess.Popen:
        """Start ``argv`` inside ``host`` in a process group of its own (output to ``log_path``, working directory
        ``cwd``, the checkout by default); stopped on close."""
        log = open(log_path or self.workdir / f"{host.name}-{name or Path(argv[0]).name}.log", "ab")
        try:
            process = subprocess.Popen(self.command(host, argv), env=env, stdout=log, stderr=subprocess.STDOUT,
                                       stdin=stdin, cwd=cwd or ROOT, start_new_session=True)
        finally:
            log.close()
        self.processes.append(process)
        return process

    @staticmethod
    def kill(process: subprocess.Popen, sig: int = signal.SIGKILL, timeout: float = 10) -> None:
        """Send ``sig`` to ``process``'s whole group (a crash, with SIGKILL) and wait for it."""
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, sig)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(5)

    # -- faults --------------------------------------------------------------------------------------------------

    def partition(self, host: Host) -> None:
        """Drop every packet leaving and entering ``host``, silently (no reset, no ICMP): a host that stops
        answering. Both ends of its veth get an htb qdisc whose only filter sends everything to a zero-length
        pfifo."""
        for ns, dev in ((host.ns, "eth0"), (self.bridge_ns, host.port)):
            _run("tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "handle", "1:", "htb", "default", "10")
            for minor in ("10", "20"):
                _run("tc", "-n", ns, "class", "replace", "dev", dev, "parent", "1:", "classid", f"1:{minor}", "htb",
                     "rate", "10gbit", "quantum", "60000")
            _run("tc", "-n", ns, "qdisc", "replace", "dev", dev, "parent", "1:20", "handle", "20:", "pfifo",
                 "limit", "0")
            _run("tc", "-n", ns, "filter", "add", "dev", dev, "parent", "1:", "protocol", "all", "prio", "1", "u32",
                 "match", "u32", "0", "0", "flowid", "1:20")
        self.partitioned.add(host.name)

    def heal(self, host: Host) -> None:
        """Undo ``partition``: the host's packets flow again."""
        for ns, dev in ((host.ns, "eth0"), (self.bridge_ns, host.port)):
            _run("tc", "-n", ns, "qdisc", "del", "dev", dev, "root", check=False)
        self.partitioned.discard(host.name)

    def dropped(self, host: Host) -> int:
        """Packets the partition of ``host`` dropped so far (both directions)."""
        total = 0
        for ns, dev in ((host.ns, "eth0"), (self.bridge_ns, host.port)):
            stats = _run("tc", "-n", ns, "-s", "qdisc", "show", "dev", dev, check=False).stdout
            total += sum(int(n) for n in re.findall(r"pfifo 20:.*?dropped (\d+)", stats, re.S))
        return total

    # -- services ------------------------------------------------------------------------------------------------

    def triton(self, host: Host, repository: Path, log_path: Optional[Path] = None,
               extra_args: tuple = ()) -> "BedTriton":
        server = BedTriton(self, host, repository, log_path or self.workdir / f"{host.name}-tritonserver.log",
                           extra_args)
        self.services.append(server)
        return server

    def gateway(self, host: Host, voices_dir: Path, **env: str) -> "BedGateway":
        gateway = BedGateway(self, host, voices_dir, **env)
        self.services.append(gateway)
        return gateway

    def redis(self, host: Host) -> "BedRedis":
        redis = BedRedis(self, host)
        self.services.append(redis)
        return redis

    def proxy(self, host: Host, target: Host, port: int, **faults: float) -> "FaultProxy":
        """A fault-injecting TCP proxy (tools/faultproxy.py) on ``host``:``port`` relaying to ``target``:``port``."""
        proxy = FaultProxy(self, host, target, port, **faults)
        self.services.append(proxy)
        return proxy

    # -- clean-up ------------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop every process, then remove every namespace, link and /etc/netns file of the bed."""
        for service in reversed(self.services):
            with contextlib.suppress(Exception):
                service.stop()
        for process in self.processes:
            with contextlib.suppress(Exception):
                self.kill(process, signal.SIGTERM, timeout=5)
        if not self._started:
            return
        for ns in [h.ns for h in self.hosts.values()] + [self.bridge_ns]:
            with contextlib.suppress(Exception):
                _kill_namespace(ns)
        _run("ip", "link", "del", self.root_link, check=False)
        for ns in _namespaces():  # anything else of this bed (a host whose set-up failed half-way)
            if ns.startswith(self.prefix):
                _kill_namespace(ns)
        self._started = False

    def __enter__(self) -> "HostBed":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """(status, body) of a GET to one of the bed's hosts (never through a proxy); (0, b"") when unreachable."""
    try:
        with _HTTP.open(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


class BedTriton(LocalTriton):
    """A tritonserver inside a host of the bed, on the standard ports at the host's address (LocalTriton's shared
    memory prefix, stop, kill and reap as they are: ``ip netns exec`` execs it, so it keeps its pid)."""

    def __init__(self, bed: HostBed, host: Host, repository: Path, log_path: Path, extra_args: tuple = ()):
        super().__init__(repository, TRITON_HTTP, TRITON_GRPC, TRITON_METRICS, log_path=log_path,
                         extra_args=extra_args)
        self.bed, self.host = bed, host

    @property
    def grpc_url(self) -> str:
        return f"{self.host.address}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.host.address}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host.address}:{self.metrics_port}/metrics"

    def start(self) -> "BedTriton":
        remove_stale_regions()
        if self.log_path:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log_file = self._log_file or open(self.log_path, "ab")
        launcher = self.bed.command(self.host, ["/bin/sh", "-c", f'exec "$@" {shm_prefix_arg("$$")}', "sh",
                                                *self.command()])
        self.process = subprocess.Popen(launcher, env=self.env, stdout=self._log_file or None,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        self.shm_prefix = shm_prefix(self.process.pid)
        return self

    def is_ready(self) -> bool:
        return http_get(f"{self.http_url}/v2/health/ready", timeout=1)[0] == 200

    def metric(self, name: str) -> Optional[float]:
        """One series' value from its metrics page (None when unreachable or absent)."""
        status, body = http_get(self.metrics_url, timeout=1)
        if status != 200:
            return None
        for line in body.decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rpartition(" ")[2])
        return None


GATEWAY_ROOT_VAR = "HOSTBED_GATEWAY_ROOT"  # another tree's gateway/ and tts_contract/ (an earlier commit's, say)


class BedGateway:
    """``python -m gateway`` inside a host of the bed, on port 8080 at the host's address. $HOSTBED_GATEWAY_ROOT
    runs the gateway of another tree (``git archive <commit> gateway tts_contract | tar -x -C <dir>``): its working
    directory comes first on the module path."""

    def __init__(self, bed: HostBed, host: Host, voices_dir: Path, **env: str):
        self.bed, self.host = bed, host
        self.root = Path(os.environ.get(GATEWAY_ROOT_VAR) or ROOT)
        self.log_path = bed.workdir / f"{host.name}-gateway.log"
        self.env = {**os.environ, "GATEWAY_HOST": "0.0.0.0", "GATEWAY_PORT": str(GATEWAY_PORT),
                    "TRITON_URLS": f"dns://{TRITON_NAME}:{TRITON_GRPC}", "QWEN_TTS_VOICES_DIR": str(voices_dir),
                    "GATEWAY_READY_POLL_S": "0.5", "TRITON_DISCOVERY_INTERVAL_S": "0.5", "PYTHONUNBUFFERED": "1",
                    **env}
        self.env.pop("TRITON_URL", None)
        self.process: Optional[subprocess.Popen] = None

    @property
    def http(self) -> str:
        return f"http://{self.host.address}:{GATEWAY_PORT}"

    @property
    def ws(self) -> str:
        return f"ws://{self.host.address}:{GATEWAY_PORT}/api/v1/speak"

    def start(self, timeout: float = 60) -> "BedGateway":
        self.process = self.bed.popen(self.host, [sys.executable, "-m", "gateway"], env=self.env,
                                      log_path=self.log_path, cwd=self.root)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.process.returncode}; see {self.log_path}")
            if http_get(self.http + "/healthz", timeout=1)[0] == 200:
                return self
            time.sleep(0.1)
        raise TimeoutError(f"gateway did not come up; see {self.log_path}")

    def readyz(self, timeout: float = 2.0) -> Optional[dict]:
        """Its /readyz answer (200 or 503), None when it does not answer."""
        status, body = http_get(self.http + "/readyz", timeout)
        try:
            return json.loads(body) if status else None
        except ValueError:
            return None

    def is_ready(self) -> bool:
        return http_get(self.http + "/readyz", timeout=2)[0] == 200

    def wait_ready(self, timeout: float = 60) -> "BedGateway":
        deadline = time.monotonic() + timeout
        while not self.is_ready():
            if time.monotonic() > deadline:
                raise TimeoutError(f"gateway never became ready; see {self.log_path}")
            time.sleep(0.1)
        return self

    def kill(self) -> None:
        if self.process is not None:
            self.bed.kill(self.process)

    def stop(self) -> None:
        if self.process is not None:
            self.bed.kill(self.process, signal.SIGTERM, timeout=10)


class BedRedis:
    """redis-server inside a host of the bed, at the host's address (nothing persisted)."""

    def __init__(self, bed: HostBed, host: Host):
        self.bed, self.host = bed, host
        self.process: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"redis://{self.host.address}:{REDIS_PORT}/0"

    def start(self, timeout: float = 10) -> "BedRedis":
        binary = shutil.which("redis-server")
        if binary is None:
            raise BedUnavailable("redis-server not found: apt-get install redis-server (scripts/setup.sh does)")
        self.process = self.bed.popen(self.host, [
            binary, "--port", str(REDIS_PORT), "--bind", self.host.address, "--save", "", "--appendonly", "no",
            "--protected-mode", "no", "--daemonize", "no", "--loglevel", "warning"], name="redis")
        deadline = time.monotonic() + timeout
        while not self.answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not answer; see {self.bed.workdir}")
            time.sleep(0.05)
        return self

    def answers(self) -> bool:
        try:
            with socket.create_connection((self.host.address, REDIS_PORT), timeout=0.5) as connection:
                connection.sendall(b"PING\r\n")
                return connection.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is not None:
            self.bed.kill(self.process, signal.SIGTERM, timeout=5)


class FaultProxy:
    """tools/faultproxy.py inside a host of the bed; ``set(delay_ms=..., loss=..., stall_ms=...)`` while it runs."""

    def __init__(self, bed: HostBed, host: Host, target: Host, port: int, **faults: float):
        self.bed, self.host, self.target, self.port = bed, host, target, port
        self.faults = {"delay_ms": 0.0, "loss": 0.0, "stall_ms": 300.0, **faults}
        self.process: Optional[subprocess.Popen] = None

    @property
    def address(self) -> str:
        return self.host.address

    def start(self, timeout: float = 10) -> "FaultProxy":
        argv = [sys.executable, "-m", "tools.faultproxy", "--listen", f"{self.host.address}:{self.port}",
                "--target", f"{self.target.address}:{self.port}",
                *(f"--{key.replace('_', '-')}={value}" for key, value in self.faults.items())]
        self.process = self.bed.popen(self.host, argv, name="faultproxy", stdin=subprocess.PIPE,
                                      env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection((self.host.address, self.port), timeout=0.5):
                    return self
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the fault proxy did not listen; see {self.bed.workdir}")
                time.sleep(0.05)

    def set(self, **faults: float) -> None:
        """Change its delay, loss or stall (for the chunks it reads from now on)."""
        self.faults.update(faults)
        line = " ".join(f"{key}={value}" for key, value in faults.items()) + "\n"
        self.process.stdin.write(line.encode())
        self.process.stdin.flush()

    def stop(self) -> None:
        if self.process is not None:
            with contextlib.suppress(Exception):
                self.process.stdin.close()
            self.bed.kill(self.process, signal.SIGTERM, timeout=5)


# -- a serving stack on the bed ----------------------------------------------------------------------------------

GATEWAY_ENV_VAR = "HOSTBED_GATEWAY_ENV"  # KEY=VALUE ... given to every gateway replica (mechanisms off, say)
TRITON_ARGS_VAR = "HOSTBED_TRITON_ARGS"  # extra tritonserver flags for every Triton of the bed


def env_overrides(raw: Optional[str] = None) -> dict[str, str]:
    """``KEY=VALUE`` pairs (space or comma separated) from ``raw``, else from $HOSTBED_GATEWAY_ENV."""
    raw = os.environ.get(GATEWAY_ENV_VAR, "") if raw is None else raw
    pairs = {}
    for item in shlex.split(raw.replace(",", " ")):
        key, equals, value = item.partition("=")
        if not equals or not key:
            raise ValueError(f"{GATEWAY_ENV_VAR}: {item!r} is not KEY=VALUE")
        pairs[key] = value
    return pairs


def triton_args(raw: Optional[str] = None) -> tuple[str, ...]:
    return tuple(shlex.split(os.environ.get(TRITON_ARGS_VAR, "") if raw is None else raw))


_SERIES = re.compile(r'^(\w+)(?:\{([^}]*)\})? (\S+)$')


def metric_series(text: str, name: str) -> dict[str, float]:
    """Values of series ``name`` on a Prometheus page, by their labels' values joined ("" when it has none)."""
    found = {}
    for line in text.splitlines():
        match = _SERIES.match(line)
        if match and match.group(1) == name:
            labels = ",".join(re.findall(r'="([^"]*)"', match.group(2) or ""))
            found[labels] = float(match.group(3))
    return found


class Stack:
    """Tritons (hosts t1, t2...), gateway replicas (g1, g2...) finding them by DNS, and Redis (host ``redis``,
    when redis-server is installed and ``redis`` is asked for) on a bed."""

    def __init__(self, bed: HostBed, repository: Path, voices_dir: Path, tritons: int = 2, gateways: int = 2,
                 redis: bool = True, gateway_env: Optional[dict] = None, extra_triton_args: tuple = ()):
        self.bed, self.repository, self.voices_dir = bed, Path(repository), Path(voices_dir)
        self.n_tritons, self.n_gateways = tritons, gateways
        self.want_redis = redis and shutil.which("redis-server") is not None
        self.gateway_env = dict(gateway_env or {})
        self.extra_triton_args = tuple(extra_triton_args)
        self.tritons: list[BedTriton] = []
        self.gateways: list[BedGateway] = []
        self.redis: Optional[BedRedis] = None

    def start(self, timeout: float = 300) -> "Stack":
        bed = self.bed
        self.tritons = [bed.triton(bed.add_host(f"t{i + 1}"), self.repository, extra_args=self.extra_triton_args)
                        for i in range(self.n_tritons)]
        for triton in self.tritons:  # (they load together)
            triton.start()
        if self.want_redis:
            self.redis = bed.redis(bed.add_host("redis")).start()
            self.gateway_env.setdefault("GATEWAY_REDIS_URL", self.redis.url)
        bed.dns.set(TRITON_NAME, [t.host for t in self.tritons])
        for triton in self.tritons:
            triton.wait_ready(timeout)
        self.gateways = [bed.gateway(bed.add_host(f"g{i + 1}"), self.voices_dir, **self.gateway_env)
                         for i in range(self.n_gateways)]
        for gateway in self.gateways:
            gateway.start()
        self.wait_settled(60)
        return self

    # -- what the gateways see -----------------------------------------------------------------------------------

    def triton_at(self, url: str) -> BedTriton:
        return next(t for t in self.tritons if t.grpc_url == url)

    def other(self, triton: BedTriton) -> BedTriton:
        return next(t for t in self.tritons if t is not triton)

    @staticmethod
    def seen(gateway: BedGateway, timeout: float = 1.0) -> Optional[dict[str, bool]]:
        """The Triton endpoints ``gateway`` knows and whether each is usable now, from its /metrics (which, unlike
        /readyz, checks nothing itself); None when the gateway does not answer."""
        status, body = http_get(gateway.http + "/metrics", timeout)
        if status != 200:
            return None
        return {url: value == 1 for url, value in metric_series(body.decode(), "tts_gateway_triton_ready").items()}

    @staticmethod
    def streams(gateway: BedGateway) -> dict[str, int]:
        """``gateway``'s streams open on each endpoint now (its /readyz: ask only while the endpoints answer)."""
        answer = gateway.readyz(timeout=5) or {}
        return {url: figures.get("streams", 0) for url, figures in answer.get("capacity", {}).items()}

    def expected(self) -> dict[str, bool]:
        """What a settled gateway sees: every running Triton that DNS lists and that is not partitioned, usable."""
        listed = set(self.bed.dns.records.get(TRITON_NAME, []))
        return {t.grpc_url: True for t in self.tritons
                if t.host.address in listed and t.process is not None and t.process.poll() is None
                and t.host.name not in self.bed.partitioned}

    def settled(self) -> bool:
        expected = self.expected()
        for gateway in self.gateways:
            seen = self.seen(gateway)
            if seen is None or {url: ok for url, ok in seen.items() if ok} != expected:
                return False
        return True

    def wait_settled(self, timeout: float = 30) -> float:
        """Until every gateway uses exactly the Tritons it should (``expected``); the seconds it took."""
        started = time.monotonic()
        while not self.settled():
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"gateways see {[self.seen(g) for g in self.gateways]}, expected "
                                   f"{self.expected()}")
            time.sleep(0.05)
        return time.monotonic() - started

    def restore(self, timeout: float = 240) -> None:
        """Undo every fault: heal every host, DNS lists every Triton, dead Tritons and gateways started again,
        Redis answering; then wait until the gateways use every Triton."""
        for name in list(self.bed.partitioned):
            self.bed.heal(self.bed.hosts[name])
        self.bed.dns.set(TRITON_NAME, [t.host for t in self.tritons])
        dead = [t for t in self.tritons if t.process is None or t.process.poll() is not None]
        for triton in dead:
            triton.reap()
            triton.start()
        for triton in dead:
            triton.wait_ready(timeout)
        if self.redis is not None and (self.redis.process is None or self.redis.process.poll() is not None):
            self.redis.start()
        for gateway in self.gateways:
            if gateway.process is None or gateway.process.poll() is not None:
                gateway.start()
        self.wait_settled(60)


# -- clients -----------------------------------------------------------------------------------------------------

@dataclass
class Heard:
    """What a client received for one utterance, with arrival times (time.monotonic())."""

    sent_at: float
    messages: list = None  # (arrived, message)
    audio: list = None  # (arrived, bytes)
    closed_at: Optional[float] = None  # the socket closed before the utterance ended

    def __post_init__(self):
        self.messages = [] if self.messages is None else self.messages
        self.audio = [] if self.audio is None else self.audio

    @property
    def first_audio_at(self) -> Optional[float]:
        return self.audio[0][0] if self.audio else None

    @property
    def error(self) -> Optional[dict]:
        return next((m for _, m in self.messages if m["type"] == "error"), None)

    @property
    def error_at(self) -> Optional[float]:
        return next((t for t, m in self.messages if m["type"] == "error"), None)

    @property
    def end(self) -> Optional[dict]:
        return next((m for _, m in self.messages if m["type"] in ("complete", "audio_end")), None)

    @property
    def completed(self) -> bool:
        """Ended normally, with audio and no error."""
        return self.end is not None and not self.end.get("cancelled") and self.error is None and bool(self.audio)

    def audio_seconds(self, sample_rate: int = 24000) -> float:
        return sum(len(data) for _, data in self.audio) / 2 / sample_rate

    def longest_gap(self, after: float) -> float:
        """The longest wait for audio after ``after`` (from ``after`` to the next audio, between audio, and from
        the last audio to the end or now)."""
        times = [after] + [t for t, _ in self.audio if t > after]
        ended = next((t for t, m in self.messages if m["type"] in ("complete", "audio_end")), None)
        times.append(ended or self.closed_at or time.monotonic())
        return max(b - a for a, b in zip(times, times[1:])) if len(times) > 1 else 0.0


async def hear(ws, heard: Heard, timeout: float) -> Heard:
    """Read one utterance's frames into ``heard`` until its end message, the socket closing, or ``timeout``
    (TimeoutError; what came so far stays in ``heard``)."""
    from websockets.exceptions import ConnectionClosed

    async def run():
        while True:
            try:
                frame = await ws.recv()
            except ConnectionClosed:
                heard.closed_at = time.monotonic()
                return
            now = time.monotonic()
            if isinstance(frame, bytes):
                heard.audio.append((now, frame))
                continue
            message = json.loads(frame)
            heard.messages.append((now, message))
            if message["type"] in ("complete", "audio_end"):
                return

    async with asyncio.timeout(timeout):
        await run()
    return heard


def connect(url: str, open_timeout: float = 5.0):
    """A WebSocket client to one of the bed's gateways (never through a proxy)."""
    from websockets.asyncio.client import connect as ws_connect

    return ws_connect(url, open_timeout=open_timeout, close_timeout=2, max_size=None, proxy=None)


async def open_speaker(url: str, open_timeout: float = 5.0, **start):
    """A connected session that got `ready` and sent `start` (``start``: its fields); the caller closes it."""
    ws = await connect(url, open_timeout)
    try:
        async with asyncio.timeout(open_timeout):
            ready = json.loads(await ws.recv())
        if ready.get("type") != "ready":
            raise RuntimeError(f"expected ready, got {ready}")
        await ws.send(json.dumps({"type": "start", **start}))
        async with asyncio.timeout(open_timeout):
            started = json.loads(await ws.recv())
        if started.get("type") != "started":
            raise RuntimeError(f"expected started, got {started}")
        return ws
    except BaseException:
        await ws.close()
        raise


async def speak(ws, text: str, request_id: str, timeout: float = 60.0, **fields) -> Heard:
    """One `speak` on an open session, heard to its end (bounded by ``timeout``)."""
    heard = Heard(time.monotonic())
    await ws.send(json.dumps({"type": "speak", "text": text, "requestId": request_id, **fields}))
    return await hear(ws, heard, timeout)
