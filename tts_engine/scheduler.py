"""Runs many talker streams on one model from one thread, one step each in turn.

Round-robin stepping means a new short request gets its first chunk after a few steps, however long
the other streams are; a single worker thread also keeps torch and the model free of concurrent use.
Batching the active streams into one forward per step is the natural next stage of this loop.
"""
from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .errors import Cancelled, EngineError
from .talker import ChunkSchedule, TalkerStream

log = logging.getLogger(__name__)


@dataclass
class StreamJob:
    """One request: how to create its stream, and where its chunks and its end go."""

    start: Callable[[], TalkerStream]  # builds the stream (prompt, prefill inputs); may raise EngineError
    on_chunk: Callable[[torch.Tensor, int, bool], None]  # (codes [n,16], chunk index, is_last)
    on_end: Callable[[Optional[BaseException], "StreamJob"], None]  # called exactly once
    is_cancelled: Callable[[], bool] = lambda: False
    schedule: ChunkSchedule = field(default_factory=ChunkSchedule)
    label: str = ""
    stream: Optional[TalkerStream] = None
    pending: list = field(default_factory=list)
    chunks_sent: int = 0


class SchedulerObserver:
    """Hooks for metrics; all are called from the scheduler thread only."""

    def on_frames(self, count: int) -> None: ...
    def on_end(self, job: StreamJob, outcome: str) -> None: ...
    def on_active(self, count: int) -> None: ...


class StreamScheduler:
    def __init__(self, max_active: int = 16, observer: Optional[SchedulerObserver] = None, name: str = "talker"):
        self.max_active = max_active
        self.observer = observer or SchedulerObserver()
        self._incoming: "queue.Queue[Optional[StreamJob]]" = queue.Queue()
        self._active: list[StreamJob] = []
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"{name}-scheduler", daemon=True)
        self._thread.start()

    def submit(self, job: StreamJob) -> None:
        if self._stopping.is_set():
            raise EngineError("server is shutting down")
        self._incoming.put(job)

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        self._incoming.put(None)
        self._thread.join(timeout)

    # -- the loop ---------------------------------------------------------------------------------------

    def _admit(self) -> None:
        block = not self._active
        while len(self._active) < self.max_active:
            try:
                job = self._incoming.get(block=block, timeout=0.5 if block else None)
            except queue.Empty:
                return
            if job is None:
                return
            block = False
            self._active.append(job)
            self.observer.on_active(len(self._active))

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._admit()
            for job in list(self._active):
                try:
                    done = self._advance(job)
                except BaseException as exc:  # every failure ends that job only, never the loop
                    self._end(job, exc)
                else:
                    if done:
                        self._end(job, None)
        for job in list(self._active):
            self._end(job, EngineError("server is shutting down"))
        while True:  # fail jobs that were never admitted
            try:
                job = self._incoming.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                self._end(job, EngineError("server is shutting down"))

    def _advance(self, job: StreamJob) -> bool:
        """One step of one job; True when the job is finished."""
        if job.is_cancelled():
            if job.stream is not None:
                job.stream.cancel()
            raise Cancelled(f"cancelled after {job.stream.frames if job.stream else 0} frames")
        if job.stream is None:
            job.stream = job.start()
        stream = job.stream
        frame = stream.step()
        if frame is not None:
            job.pending.append(frame)
            self.observer.on_frames(1)
        if job.pending and (stream.finished or len(job.pending) >= job.schedule.size(job.chunks_sent)):
            chunk = torch.stack(job.pending)
            job.pending = []
            job.on_chunk(chunk, job.chunks_sent, stream.finished)
            job.chunks_sent += 1
        return stream.finished

    def _end(self, job: StreamJob, error: Optional[BaseException]) -> None:
        if job in self._active:
            self._active.remove(job)
            self.observer.on_active(len(self._active))
        if error is None:
            outcome = job.stream.finish_reason if job.stream else "ok"
        elif isinstance(error, Cancelled):
            outcome = "cancelled"
        elif isinstance(error, EngineError):
            outcome = "rejected"
        else:
            outcome = "error"
            log.exception("stream %s failed", job.label, exc_info=error)
        if outcome == "cancelled":
            log.info("stream %s cancelled after %d frames", job.label, job.stream.frames if job.stream else 0)
        try:
            self.observer.on_end(job, outcome)
        finally:
            job.on_end(error, job)
