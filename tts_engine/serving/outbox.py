"""Output leaves the stepping thread here: the loop puts each pass's events (chunks, ends) in one queue and goes
on stepping; one sender thread hands them, in order, to each stream's sink (in Triton, its responses; in process,
a ``Collector`` or a ``CallbackSink``). Whatever a sink costs (serialising codes, a call into the Triton parent),
the step never waits for it.

A sink that fails on a chunk has its stream cancelled with that error (through the engine, the one way a stream
ends); its later chunks are dropped, and its end still comes, once.
"""
from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol

import torch

from tts_contract.audio import NUM_CODEBOOKS

from ..errors import Cancelled, EngineError
from .tickets import Chunk, End

log = logging.getLogger(__name__)


class Sink(Protocol):
    """Where one stream's output goes. Called on the sender thread only, in order; ``end`` exactly once."""

    def chunk(self, codes: torch.Tensor, index: int, last: bool) -> None:
        """``codes``: [frames, 16] on the CPU; ``last``: the stream ends with this chunk."""

    def end(self, error: Optional[BaseException], reason: str) -> None:
        """The stream ended (``error`` None: normally, ``reason`` says how)."""


@dataclass
class Generation:
    """Everything one stream produced (``Engine.generate``): its chunks in order and why it ended."""

    chunks: list = field(default_factory=list)
    finish_reason: Optional[str] = None

    @property
    def codes(self) -> torch.Tensor:
        """All frames, [frames, 16] (zero rows when the stream ended before its first frame)."""
        return torch.cat(self.chunks) if self.chunks else torch.zeros((0, NUM_CODEBOOKS), dtype=torch.long)


class Collector:
    """A sink that keeps a stream's chunks (``generate``)."""

    def __init__(self):
        self.result, self.error, self.done = Generation(), None, threading.Event()

    def chunk(self, codes, index, last):
        self.result.chunks.append(codes)

    def end(self, error, reason):
        self.error, self.result.finish_reason = error, reason if error is None else None
        self.done.set()


class CallbackSink:
    """A sink made of two callbacks: ``on_chunk(codes, index, last)`` and ``on_end(error)`` (benchmarks, tests)."""

    def __init__(self, on_chunk=lambda codes, index, last: None, on_end=lambda error: None):
        self._on_chunk, self._on_end = on_chunk, on_end

    def chunk(self, codes, index, last):
        self._on_chunk(codes, index, last)

    def end(self, error, reason):
        self._on_end(error)


class Outbox:
    """The events queue and its sender thread. ``on_failure(stream_id, error)``: a sink failed on a chunk."""

    def __init__(self, name: str, on_failure: Callable[[int, BaseException], None]):
        self._queue: "queue.SimpleQueue" = queue.SimpleQueue()
        self._sinks: dict[int, Sink] = {}  # streams whose end has not been handed out yet
        self._failed: set[int] = set()
        self._on_failure = on_failure
        self._thread = threading.Thread(target=self._run, name=f"{name}-output", daemon=True)
        self._thread.start()

    def open(self, stream_id: int, sink: Sink) -> bool:
        """A stream's sink, before any of its events; False (nothing changed) when that stream is open already."""
        return self._sinks.setdefault(stream_id, sink) is sink

    def put(self, events: list) -> None:
        if events:
            self._queue.put(events)

    def stop(self, timeout: float = 5.0) -> None:
        """Hand out what is queued, then stop the sender."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            events = self._queue.get()
            if events is None:
                return
            for event in events:
                try:
                    self._deliver(event)
                except Exception:  # a bug in a sink must not stop the output of every other stream
                    log.exception("stream %x: its output failed", event.stream_id)

    def _deliver(self, event) -> None:
        if isinstance(event, Chunk):
            sink = self._sinks.get(event.stream_id)
            if sink is None or event.stream_id in self._failed:
                return
            try:
                sink.chunk(torch.stack(event.frames), event.index, event.last)
            except Exception as exc:  # the consumer is gone or broken: this stream ends, with this error
                self._failed.add(event.stream_id)
                self._on_failure(event.stream_id, exc)
            return
        sink = self._sinks.pop(event.stream_id, None)
        self._failed.discard(event.stream_id)
        if isinstance(event, End) and sink is not None:
            _log_end(event)
            sink.end(event.error, event.reason)


def _log_end(end: End) -> None:
    if end.error is None or isinstance(end.error, (Cancelled, EngineError)):
        if isinstance(end.error, Cancelled):
            log.info("stream %x %s", end.stream_id, end.error)
        return
    log.error("stream %x failed: %s", end.stream_id, end.error, exc_info=end.error)
