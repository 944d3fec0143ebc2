"""The serving loop: admits queued requests into the batched talker and steps every active stream at once.

One thread owns the talker. Each iteration it admits waiting jobs (bounded prefill work, so running streams
never stall for long), drops cancelled ones, runs one batched step, and hands each stream's frames to its
chunker. A new stream's first chunk therefore comes a couple of steps after its prefill, whatever else
runs. Requests beyond capacity wait in a bounded FIFO queue; a full queue or a too-long wait is refused.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from tts_contract.audio import NUM_CODEBOOKS
from tts_contract.limits import DEFAULT_CHUNK_SCHEDULE

from ..errors import Cancelled, EngineError, Overloaded
from .prompt import SynthesisRequest
from .talker import BatchedTalker, TalkerStream

log = logging.getLogger(__name__)
OUTCOMES = ("eos", "max_new_tokens", "cancelled", "rejected", "error")


@dataclass(frozen=True)
class ChunkSchedule:
    """How many frames go into each streamed chunk: small first chunks for latency, then larger ones."""

    sizes: tuple[int, ...] = DEFAULT_CHUNK_SCHEDULE

    def size(self, chunk_index: int) -> int:
        return self.sizes[min(chunk_index, len(self.sizes) - 1)]

    @classmethod
    def parse(cls, text: str) -> "ChunkSchedule":
        """Parse ``"2,4,8,16"``: chunk i has sizes[i] frames, the last size repeats."""
        try:
            sizes = tuple(int(part) for part in str(text).split(",") if part.strip())
        except ValueError:
            raise ValueError(f"chunk schedule {text!r} must be comma-separated integers") from None
        if not sizes or any(not 1 <= s <= 512 for s in sizes):
            raise ValueError(f"chunk schedule {text!r}: every size must be within 1..512")
        return cls(sizes)


class Chunker:
    """Groups one stream's frames into chunks of the scheduled sizes; the last chunk takes the remainder."""

    def __init__(self, schedule: ChunkSchedule):
        self.schedule = schedule
        self.pending: list[torch.Tensor] = []
        self.chunks_sent = 0

    def add(self, frame: Optional[torch.Tensor], finished: bool) -> Optional[torch.Tensor]:
        """Take the step's frame (None when the step produced none); returns a [n,16] chunk when one is due."""
        if frame is not None:
            self.pending.append(frame)
        if self.pending and (finished or len(self.pending) >= self.schedule.size(self.chunks_sent)):
            chunk = torch.stack(self.pending)
            self.pending = []
            self.chunks_sent += 1
            return chunk
        return None


@dataclass(eq=False)
class StreamJob:
    """One request: what to synthesise, and where its chunks and its end go."""

    request: SynthesisRequest
    on_chunk: Callable[[torch.Tensor, int, bool], None]  # (codes [n,16], chunk index, is_last)
    on_end: Callable[[Optional[BaseException], "StreamJob"], None]  # called exactly once
    is_cancelled: Callable[[], bool] = lambda: False
    schedule: ChunkSchedule = field(default_factory=ChunkSchedule)
    label: str = ""
    submitted: float = field(default_factory=time.monotonic)
    stream: Optional[TalkerStream] = None
    chunker: Optional[Chunker] = None
    cancel_checked: float = 0.0
    ended: bool = False


@dataclass
class Generation:
    """Everything one job produced: its chunks in order and why it ended."""

    chunks: list = field(default_factory=list)
    finish_reason: Optional[str] = None

    @property
    def codes(self) -> torch.Tensor:
        """All frames, [frames, 16] (zero rows when the stream ended before its first frame)."""
        return torch.cat(self.chunks) if self.chunks else torch.zeros((0, NUM_CODEBOOKS), dtype=torch.long)


@dataclass
class SchedulerStats:
    """Plain counters the loop updates; a metrics thread reads them (no call leaves the loop)."""

    frames: int = 0
    steps: int = 0
    step_rows: int = 0  # sum of batch sizes: / steps = mean batch
    step_seconds: float = 0.0
    active: int = 0
    queued: int = 0
    outcomes: Counter = field(default_factory=Counter)


class StreamScheduler:
    def __init__(self, talker: BatchedTalker, max_queued: int = 64, max_queue_wait_s: float = 30.0,
                 prefill_tokens_per_step: int = 512, cancel_check_interval_s: float = 0.05, name: str = "talker",
                 torch_threads: Optional[int] = 1):
        self.talker = talker
        self.torch_threads = torch_threads
        self.max_queued = max_queued
        self.max_queue_wait_s = max_queue_wait_s
        self.prefill_tokens_per_step = prefill_tokens_per_step
        self.cancel_check_interval_s = cancel_check_interval_s
        self.stats = SchedulerStats()
        self._incoming: "queue.Queue[Optional[StreamJob]]" = queue.Queue()
        self._swept = 0.0  # when the waiting line was last checked for cancelled and expired jobs
        self._jobs: dict[TalkerStream, StreamJob] = {}
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"{name}-scheduler", daemon=True)
        self._thread.start()

    @property
    def capacity(self) -> int:
        return self.talker.slots

    def submit(self, job: StreamJob) -> None:
        """Queue a job; raises Overloaded when ``max_queued`` jobs are already waiting."""
        if self._stopping.is_set():
            raise EngineError("server is shutting down")
        if self._incoming.qsize() >= self.max_queued:
            raise Overloaded(f"{self.max_queued} requests are already waiting for the talker; try again shortly")
        self._incoming.put(job)
        self.stats.queued = self._incoming.qsize()

    def generate(self, request: SynthesisRequest, schedule: Optional[ChunkSchedule] = None,
                 timeout: float = 300.0, is_cancelled: Callable[[], bool] = lambda: False) -> Generation:
        """Run one request to its end through this serving loop and collect its chunks (tests, bench,
        warm-up). Raises the error the stream ended with."""
        result, ended, failure = Generation(), threading.Event(), []

        def on_end(error, job):
            result.finish_reason = job.stream.finish_reason if job.stream is not None else None
            failure.append(error)
            ended.set()

        self.submit(StreamJob(request=request, on_chunk=lambda chunk, index, last: result.chunks.append(chunk),
                              on_end=on_end, is_cancelled=is_cancelled, schedule=schedule or ChunkSchedule(),
                              label="generate"))
        if not ended.wait(timeout):
            raise TimeoutError(f"generation did not end within {timeout:g} s")
        if failure[0] is not None:
            raise failure[0]
        return result

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        self._incoming.put(None)
        self._thread.join(timeout)

    # -- the loop ---------------------------------------------------------------------------------------

    def _run(self) -> None:
        if self.torch_threads:
            # A step is a chain of small ops: on a 2-core CPU one intra-op thread ran it 1.3x faster than two
            # (in a thread other than the main one, a second OpenMP team competes with the first).
            torch.set_num_threads(self.torch_threads)
        while not self._stopping.is_set():
            try:
                self._admit()
                self._sweep_waiting()
                self._drop_cancelled()
                if self.talker.active:
                    self._step()
            except BaseException as exc:  # a bug in the step fails the streams in it, never the loop
                log.exception("talker step failed")
                for job in list(self._jobs.values()):
                    self._end(job, exc)
        for job in list(self._jobs.values()):
            self._end(job, EngineError("server is shutting down"))
        while True:  # fail jobs that were never admitted
            try:
                job = self._incoming.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                self._end(job, EngineError("server is shutting down"))

    def _admit(self) -> None:
        """Start waiting jobs while rows are free, within this step's prefill budget (at least one job)."""
        budget = self.prefill_tokens_per_step
        block = not self.talker.active
        while len(self.talker) < self.talker.slots and budget > 0:
            try:
                job = self._incoming.get(block=block, timeout=0.2 if block else None)
            except queue.Empty:
                break
            if job is None:
                break
            block = False
            refusal = self._refusal(job)
            if refusal is not None:
                self._end(job, refusal)
                continue
            try:
                job.stream = self.talker.add(job.request)
            except BaseException as exc:
                self._end(job, exc)
                continue
            budget -= job.stream.length
            job.chunker = Chunker(job.schedule)
            self._jobs[job.stream] = job
            if job.stream.finished:  # EOS or max_new_tokens before any frame
                self._end(job, None)
        self.stats.queued = self._incoming.qsize()
        self.stats.active = len(self.talker)

    def _sweep_waiting(self, interval_s: float = 0.25) -> None:
        """While every row is busy, end the waiting jobs that were cancelled or waited too long, so that they
        neither hold places in line nor wait past ``max_queue_wait_s`` for a slot to free."""
        now = time.monotonic()
        if len(self.talker) < self.talker.slots or now - self._swept < interval_s:
            return
        self._swept = now
        with self._incoming.mutex:  # in place, under the queue's own lock: the line keeps its order
            waiting = [job for job in self._incoming.queue if job is not None]
        for job in waiting:
            refusal = self._refusal(job)
            if refusal is None:
                continue
            with self._incoming.mutex:
                self._incoming.queue.remove(job)
            self._end(job, refusal)
        self.stats.queued = self._incoming.qsize()

    def _refusal(self, job: StreamJob) -> Optional[EngineError]:
        """Why a waiting job must not start (cancelled, or waited too long), or None."""
        if self._check_cancelled(job, force=True):
            return Cancelled("cancelled before it started")
        waited = time.monotonic() - job.submitted
        if waited > self.max_queue_wait_s:
            return Overloaded(f"waited {waited:.0f} s for a free talker slot; try again shortly")
        return None

    def _check_cancelled(self, job: StreamJob, force: bool = False) -> bool:
        """Ask the job (at most every ``cancel_check_interval_s``: the check may be a call to another process)."""
        now = time.monotonic()
        if not force and now - job.cancel_checked < self.cancel_check_interval_s:
            return False
        job.cancel_checked = now
        return job.is_cancelled()

    def _drop_cancelled(self) -> None:
        for job in list(self._jobs.values()):
            if self._check_cancelled(job):
                self._end(job, Cancelled(f"cancelled after {job.stream.frames} frames"))

    def _step(self) -> None:
        started = time.perf_counter()
        results = self.talker.step()
        stats = self.stats
        stats.step_seconds += time.perf_counter() - started
        stats.steps += 1
        stats.step_rows += len(results)
        stats.frames += len(results)
        for stream, frame in results:
            job = self._jobs[stream]
            chunk = job.chunker.add(frame, stream.finished)
            if chunk is not None:
                try:
                    job.on_chunk(chunk, job.chunker.chunks_sent - 1, stream.finished)
                except BaseException as exc:  # a failing consumer ends its own stream only
                    self._end(job, exc)
                    continue
            if stream.finished:
                self._end(job, None)

    def _end(self, job: StreamJob, error: Optional[BaseException]) -> None:
        if job.ended:
            return
        job.ended = True
        stream = job.stream
        if stream is not None and self._jobs.pop(stream, None) is not None:
            try:
                self.talker.remove(stream)
            except Exception:  # the job must still end (exactly once), and the loop go on
                log.exception("stream %s: could not free its talker row", job.label)
        self.stats.active = len(self.talker)
        if error is None:
            outcome = stream.finish_reason if stream else "eos"
        elif isinstance(error, Cancelled):
            outcome = "cancelled"
        elif isinstance(error, EngineError):
            outcome = "rejected"
        else:
            outcome = "error"
            log.error("stream %s failed: %s", job.label, error, exc_info=error)
        if outcome == "cancelled":
            log.info("stream %s cancelled after %d frames", job.label, stream.frames if stream else 0)
        self.stats.outcomes[outcome] += 1
        try:
            job.on_end(error, job)
        except Exception:  # the callback's failure must not take the loop down
            log.exception("stream %s: end callback failed", job.label)
