"""A small fault-injecting TCP proxy (asyncio): every connection to ``--listen`` is relayed to ``--target``, each
chunk read from either side delivered to the other ``delay_ms`` later, and, with probability ``loss``, held back
``stall_ms`` more, as a lost segment waits for its retransmission (what follows it on that connection waits too:
order is kept, as TCP keeps it). No packaged proxy does this here (no netem in the kernel), so the multi-host test
bed (tools/hostbed.py) runs this one inside a host of its own.

    python -m tools.faultproxy --listen 10.231.7.41:8001 --target 10.231.7.11:8001

Settings change while it runs: a line ``delay_ms=200 loss=0.05 stall_ms=300`` on standard input (any subset; the
others keep their values) applies to the chunks read from then on. It prints ``listening`` once it accepts and
``ok <settings>`` after each change.
"""
from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time

CHUNK = 65536


class Faults:
    def __init__(self, delay_ms: float = 0.0, loss: float = 0.0, stall_ms: float = 300.0, seed: int = 0):
        self.delay_ms, self.loss, self.stall_ms = delay_ms, loss, stall_ms
        self.random = random.Random(seed)
        self.chunks = 0
        self.stalled = 0

    def update(self, line: str) -> str:
        for item in line.split():
            key, _, value = item.partition("=")
            if key not in ("delay_ms", "loss", "stall_ms"):
                raise ValueError(f"unknown setting {key!r}")
            setattr(self, key, float(value))
        return self.describe()

    def describe(self) -> str:
        return f"delay_ms={self.delay_ms:g} loss={self.loss:g} stall_ms={self.stall_ms:g}"

    def hold_s(self) -> float:
        """How long the chunk read now waits before it is delivered."""
        self.chunks += 1
        hold = self.delay_ms / 1000
        if self.loss and self.random.random() < self.loss:
            self.stalled += 1
            hold += self.stall_ms / 1000
        return hold


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, faults: Faults) -> None:
    """Relay one direction: read chunks as they come, deliver each when it is due (never before the one before)."""
    due: asyncio.Queue = asyncio.Queue()

    async def deliver():
        while True:
            at, data = await due.get()
            if data is None:
                break
            wait = at - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()

    delivering = asyncio.create_task(deliver())
    last = 0.0
    try:
        while True:
            data = await reader.read(CHUNK)
            last = max(last, time.monotonic() + faults.hold_s()) if data else last
            await due.put((last, data or None))
            if not data:
                break
        await delivering
    finally:
        delivering.cancel()


async def _relay(client_reader, client_writer, target: tuple[str, int], faults: Faults, connections: set) -> None:
    try:
        upstream_reader, upstream_writer = await asyncio.open_connection(*target)
    except OSError:
        client_writer.close()
        return
    task = asyncio.current_task()
    connections.add(task)
    try:
        await asyncio.gather(_pump(client_reader, upstream_writer, faults),
                             _pump(upstream_reader, client_writer, faults))
    except (OSError, asyncio.IncompleteReadError):
        pass
    finally:
        connections.discard(task)
        for writer in (client_writer, upstream_writer):
            writer.close()


async def serve(listen: tuple[str, int], target: tuple[str, int], faults: Faults) -> None:
    connections: set = set()
    server = await asyncio.start_server(lambda r, w: _relay(r, w, target, faults, connections), *listen,
                                        reuse_address=True)
    print("listening", faults.describe(), flush=True)
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    async with server:
        while line := await stdin.readline():
            try:
                print("ok", faults.update(line.decode()), flush=True)
            except ValueError as exc:
                print("error", exc, flush=True)
    # standard input closed: whoever started the proxy is gone


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen", type=_address, required=True, help="address:port to accept on")
    parser.add_argument("--target", type=_address, required=True, help="address:port to relay to")
    parser.add_argument("--delay-ms", type=float, default=0.0)
    parser.add_argument("--loss", type=float, default=0.0)
    parser.add_argument("--stall-ms", type=float, default=300.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    asyncio.run(serve(args.listen, args.target, Faults(args.delay_ms, args.loss, args.stall_ms, args.seed)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
