"""Triton endpoints found through DNS: a ``dns://name:port`` entry of TRITON_URLS stands for every address the name
resolves to (a Kubernetes headless Service publishes one per ready pod), resolved again every
TRITON_DISCOVERY_INTERVAL_S. Addresses that appear join the endpoints (used once their Triton is ready); addresses that
disappear are drained (no new streams; those in flight end normally, or move on with a recoverable error)."""
from __future__ import annotations

import asyncio
import logging
import socket
from typing import Awaitable, Callable, Optional
from urllib.parse import urlsplit

log = logging.getLogger("gateway.discovery")
DNS_SCHEME = "dns://"
RESOLVE_TIMEOUT_S = 2.0

Resolver = Callable[[str, int], Awaitable[list[str]]]  # (name, port) -> endpoint urls ("host:port")


async def resolve_endpoints(name: str, port: int) -> list[str]:
    """An endpoint for every address ``name`` resolves to, on ``port``: its IPv4 addresses, or its IPv6 ones when
    it has none (a dual-stack Service lists each pod under both: one pod must not count as two endpoints)."""
    infos = await asyncio.get_running_loop().getaddrinfo(name, port, type=socket.SOCK_STREAM)
    by_family = {socket.AF_INET: set(), socket.AF_INET6: set()}
    for family, *_, address in infos:
        by_family.setdefault(family, set()).add(address[0])
    chosen = by_family[socket.AF_INET] or by_family[socket.AF_INET6]
    return [endpoint_url(address, port) for address in sorted(chosen)]


def parse_dns_entry(entry: str) -> Optional[tuple[str, int]]:
    """(name, port) of a ``dns://name:port`` entry; None for a plain ``host:port`` endpoint."""
    if not entry.startswith(DNS_SCHEME):
        return None
    parts = urlsplit(entry)
    try:
        port = parts.port
    except ValueError:
        port = None
    try:
        parts.hostname.encode("idna") if parts.hostname else None  # a name no resolver could take
    except UnicodeError:
        port = None
    if not parts.hostname or port is None or parts.path not in ("", "/"):
        raise ValueError(f"TRITON_URLS entry {entry!r}: expected dns://<name>:<port>, e.g. "
                         "dns://triton-headless.tts.svc.cluster.local:8001")
    return parts.hostname, port


def endpoint_url(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


class Discovery:
    """Keeps the ``Endpoints`` equal to the static entries plus what the DNS entries resolve to now.
    A name that fails to resolve keeps its last addresses (a DNS blip must not drain every pod)."""

    def __init__(self, endpoints, entries: list[str], resolver: Resolver = resolve_endpoints, interval_s: float = 5.0):
        self.endpoints, self.resolver, self.interval_s = endpoints, resolver, interval_s
        parsed = [(entry, parse_dns_entry(entry)) for entry in entries]
        self.static = [entry for entry, name in parsed if name is None]
        self.names = [name for _, name in parsed if name is not None]
        self.found: dict[tuple[str, int], list[str]] = {}  # each name's addresses at its last good resolution
        self._task: Optional[asyncio.Task] = None

    @property
    def dynamic(self) -> bool:
        return bool(self.names)

    async def refresh(self) -> list[str]:
        """Resolve every name once and hand the endpoints their URLs; returns them."""
        for name, port in self.names:
            try:
                found = await asyncio.wait_for(self.resolver(name, port), RESOLVE_TIMEOUT_S)
            except (OSError, TimeoutError, UnicodeError) as exc:
                log.warning("cannot resolve %s (%s); keeping its %d known endpoints", name, exc,
                            len(self.found.get((name, port), [])))
                continue
            if not found and self.found.get((name, port)):
                log.warning("%s resolves to no address now: draining its endpoints", name)
            self.found[(name, port)] = list(found)
        urls = list(dict.fromkeys(self.static + [url for urls in self.found.values() for url in urls]))
        self.endpoints.set_endpoints(urls)
        return urls

    def start(self) -> None:
        if not self.dynamic:
            return

        async def loop():
            while True:
                await asyncio.sleep(self.interval_s)
                try:
                    await self.refresh()
                except Exception:  # never let discovery die: the endpoints known stay in use
                    log.exception("endpoint discovery failed; trying again in %g s", self.interval_s)

        self._task = asyncio.create_task(loop())

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
