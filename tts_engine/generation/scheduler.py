"""The serving loop: admits waiting requests into the batched talker by deadline, steps the streams whose
listeners need audio, and hands each stream's frames to its pacer, which sends them as chunks in time.

One thread owns the talker. Each pass it takes new requests and commands, admits waiting jobs earliest
deadline first (bounded prefill work, so running streams never stall for long) within the real-time
capacity, refuses at once those that could not get their first audio within their budget, drops cancelled
ones, and runs one batched step. When more streams are active than the real-time batch (continuations that
came due), the step advances those closest to their deadlines and the others wait a step.
"""
from __future__ import annotations

import heapq
import itertools
import logging
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import torch

from tts_contract.audio import NUM_CODEBOOKS
from tts_contract.delivery import DEFAULT_FIRST_AUDIO_BUDGET_MS, with_retry_after

from ..errors import Cancelled, EngineError, Overloaded
from .admission import CostCurve, Delivery, place_free_times, realtime_batch
from .pacing import ChunkPolicy, DeadlinePacing, Pacer, most_urgent
from .prompt import SynthesisRequest
from .talker import BatchedTalker, TalkerStream

log = logging.getLogger(__name__)
# A stream whose listener has less than this part of the pacing margin left is falling behind.
BEHIND = 0.5
OUTCOMES = ("eos", "max_new_tokens", "cancelled", "rejected", "error")
# A stream's expected length when it has no frame cap of its own: about a frame per character, and more
# (the model says each text token over several frames) for short texts.
EXPECTED_FRAMES_PER_CHAR = 1.2
EXPECTED_FRAMES_BASE = 12


@dataclass(eq=False)
class StreamJob:
    """One request: what to synthesise, when its listener needs it, and where its chunks and its end go."""

    request: SynthesisRequest
    on_chunk: Callable[[torch.Tensor, int, bool], None]  # (codes [n,16], chunk index, is_last)
    on_end: Callable[[Optional[BaseException], "StreamJob"], None]  # called exactly once
    is_cancelled: Callable[[], bool] = lambda: False
    policy: Optional[ChunkPolicy] = None  # None: the scheduler's
    delivery: Delivery = field(default_factory=Delivery)
    label: str = ""
    submitted: float = field(default_factory=time.monotonic)
    stream: Optional[TalkerStream] = None
    pacer: Optional[Pacer] = None
    cancel_checked: float = 0.0
    ended: bool = False
    text_wait_since: Optional[float] = None  # when its row began waiting for more text


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
    """Plain numbers the loop updates; a metrics thread reads them (no call leaves the loop)."""

    frames: int = 0
    steps: int = 0
    step_rows: int = 0  # sum of batch sizes: / steps = mean batch
    step_seconds: float = 0.0
    active: int = 0
    queued: int = 0
    realtime_batch: int = 0  # streams that can step together and stay ahead of real time
    headroom: int = 0  # new streams that could start now
    step_s: float = 0.0  # the predicted step time at the current batch
    retry_after_s: float = 0.0  # when a place is expected to free (0: one is free now)
    chunks: int = 0
    chunk_frames: int = 0
    underruns: int = 0  # chunks sent after their listener ran dry (this process's view)
    stalled_s: float = 0.0
    skipped_rows: int = 0  # active streams that waited a step because their listeners had audio enough
    waiting_text: int = 0  # streams (started or not) waiting for more of their text
    text_wait_s: float = 0.0  # seconds started streams sat out waiting for their text, summed over streams
    behind: int = 0  # active streams whose listeners are within half the pacing margin of running dry
    held_back: Counter = field(default_factory=Counter)  # loop passes a new job waited, by reason
    leads: list = field(default_factory=list)  # lead at each chunk, drained by the metrics publisher
    outcomes: Counter = field(default_factory=Counter)

    def take_leads(self) -> list:
        """The leads recorded since the last call (for a histogram)."""
        taken, self.leads = self.leads, []
        return taken

    def status(self, slots: int, margin_s: float = 0.0) -> dict:
        """What a load balancer or the gateway needs to know, as plain JSON-able values."""
        return {"slots": slots, "margin_ms": round(1000 * margin_s), "active": self.active, "queued": self.queued, "realtime_batch": self.realtime_batch,
                "headroom": self.headroom, "behind": self.behind, "step_ms": round(1000 * self.step_s, 2),
                "retry_after_ms": int(1000 * self.retry_after_s)}


class StreamScheduler:
    """The talker's serving loop. ``speed``: how much faster than real time every stepped stream must run
    (the real-time batch is the largest whose measured step allows it); ``first_audio_budget_s``: the default
    budget of a request's first audio; ``decode_cost(frames)``: seconds to decode a chunk (pacing);
    ``recalibrate_s``: how old the step-time calibration may get before an idle loop measures it again;
    ``max_hold_s``: how long a new request (one that did not say it can wait) may wait for a place;
    ``realtime_admission``: False admits up to the slots whatever the step time (throughput benchmarks);
    ``text_idle_s``: text still arriving with nothing new for this long is closed as if it had ended."""

    def __init__(self, talker: BatchedTalker, max_queued: int = 64, max_queue_wait_s: float = 30.0,
                 prefill_tokens_per_step: int = 512, cancel_check_interval_s: float = 0.05, name: str = "talker",
                 torch_threads: Optional[int] = 1, policy: Optional[ChunkPolicy] = None, speed: float = 1.5,
                 first_audio_budget_s: float = DEFAULT_FIRST_AUDIO_BUDGET_MS / 1000,
                 decode_cost: Optional[Callable[[int], float]] = None, recalibrate_s: float = 300.0,
                 max_hold_s: float = 0.3, realtime_admission: bool = True, text_idle_s: float = 60.0):
        self.talker = talker
        self.torch_threads = torch_threads
        self.max_queued = max_queued
        self.max_queue_wait_s = max_queue_wait_s
        self.prefill_tokens_per_step = prefill_tokens_per_step
        self.cancel_check_interval_s = cancel_check_interval_s
        self.policy = policy or DeadlinePacing()
        self.margin_s = getattr(self.policy, "margin_s", 0.0)
        self.speed = speed
        self.first_audio_budget_s = first_audio_budget_s
        self.max_hold_s = max_hold_s
        self.realtime_admission = realtime_admission
        self.text_idle_s = text_idle_s
        self.decode_cost = decode_cost or CostCurve()  # empty: decoding assumed free until measured
        self.step_times = CostCurve()
        self.prefill_s = 0.0  # moving average of one prefill
        self.recalibrate_s, self.idle_recalibrate_s = recalibrate_s, 2.0
        self._calibration = None  # (request, sizes, steps) once calibrate() ran
        self._calibrated_at = 0.0
        self._idle_since: Optional[float] = None
        self.stats = SchedulerStats()
        self._incoming: "queue.Queue[Optional[StreamJob]]" = queue.Queue()
        self._commands: "queue.Queue[Callable[[], None]]" = queue.Queue()
        self._line: list = []  # waiting jobs: a heap of (admit_by, sequence, job)
        self._text_waiting: list[StreamJob] = []  # jobs whose prompt needs more of their text
        self._sequence = itertools.count()
        self._jobs: dict[TalkerStream, StreamJob] = {}
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"{name}-scheduler", daemon=True)
        self._thread.start()

    @property
    def capacity(self) -> int:
        return self.talker.slots

    def submit(self, job: StreamJob) -> None:
        """Queue a job; raises Overloaded when ``max_queued`` jobs are already waiting. A job whose text is still
        arriving (``request.feed``) waits for it without a place in line until its prompt can be built."""
        if self._stopping.is_set():
            raise EngineError("server is shutting down")
        if self._incoming.qsize() + len(self._line) + len(self._text_waiting) >= self.max_queued:
            raise Overloaded(with_retry_after(f"{self.max_queued} requests are already waiting for the talker",
                                              max(100, int(1000 * self.stats.retry_after_s))))
        if job.request.feed is not None:
            job.request.feed.on_append = self._wake
        self._incoming.put(job)

    def _wake(self) -> None:
        """Wake a loop that waits for work (more text arrived)."""
        self._incoming.put(None)

    def generate(self, request: SynthesisRequest, policy: Optional[ChunkPolicy] = None, timeout: float = 300.0,
                 is_cancelled: Callable[[], bool] = lambda: False, delivery: Optional[Delivery] = None) -> Generation:
        """Run one request to its end through this serving loop and collect its chunks (tests, bench,
        warm-up). Raises the error the stream ended with."""
        result, ended, failure = Generation(), threading.Event(), []

        def on_end(error, job):
            result.finish_reason = job.stream.finish_reason if job.stream is not None else None
            failure.append(error)
            ended.set()

        self.submit(StreamJob(request=request, on_chunk=lambda chunk, index, last: result.chunks.append(chunk),
                              on_end=on_end, is_cancelled=is_cancelled, policy=policy,
                              delivery=delivery or Delivery(max_wait_s=timeout), label="generate"))
        if not ended.wait(timeout):
            raise TimeoutError(f"generation did not end within {timeout:g} s")
        if failure[0] is not None:
            raise failure[0]
        return result

    def call(self, command: Callable[[], object], timeout: float = 600.0):
        """Run ``command`` on the serving loop's thread between two passes and return its result."""
        done, outcome = threading.Event(), []

        def run():
            try:
                outcome.append((command(), None))
            except BaseException as exc:
                outcome.append((None, exc))
            done.set()

        self._commands.put(run)
        self._incoming.put(None)  # wake an idle loop
        if not done.wait(timeout):
            raise TimeoutError(f"the serving loop did not run the command within {timeout:g} s")
        value, error = outcome[0]
        if error is not None:
            raise error
        return value

    def calibrate(self, request: SynthesisRequest, sizes=None, steps: int = 8,
                  decode_probe: Optional[Callable[[], dict]] = None) -> dict[int, float]:
        """Measure the step time at each batch size (the talker's buckets up to its slots) with copies of
        ``request``, and the decode cost of each chunk size (``decode_probe``), before serving: real-time
        capacity and pacing start from these numbers. Start-up shares the machine with other models loading,
        so the loop measures again once it has been idle a while soon after, and every ``recalibrate_s``; real
        steps refine the numbers in between."""
        frames = steps + 2  # EOS suppressed throughout: every stream steps every time
        request = replace(request, params=replace(request.params, min_new_tokens=frames, max_new_tokens=frames))
        self._calibration = (request, tuple(sizes or self.talker.buckets_up_to_slots()), steps, decode_probe)
        measured = self.call(lambda: self._measure(abortable=False))
        self._calibrated_at -= self.recalibrate_s - 5.0  # measure again at the first idle moment after 5 s
        return measured

    def _measure(self, abortable: bool = True) -> dict[int, float]:
        """One calibration pass (on the loop's thread); an abortable one stops between sizes as soon as a job
        arrives."""
        request, sizes, steps, decode_probe = self._calibration
        if decode_probe is not None:
            self.decode_cost.update(decode_probe())
        measured = {}
        for size in sizes:
            if abortable and not self._incoming.empty():
                break
            streams = [self.talker.add(request) for _ in range(size)]
            timings = []
            try:
                for _ in range(steps):
                    started = time.perf_counter()
                    self.talker.step(streams)
                    timings.append(time.perf_counter() - started)
            finally:
                for stream in streams:
                    self.talker.remove(stream)
            measured[size] = min(timings[1:])  # the first step of a new batch shape allocates
        self.step_times.update(measured)
        self._calibrated_at = time.monotonic()
        self._update_capacity()
        return self.step_times.snapshot()

    def _recalibrate_when_idle(self) -> None:
        now = time.monotonic()
        if self.talker.active or self._line:
            self._idle_since = None
            return
        self._idle_since = self._idle_since or now
        if self._calibration is not None and now - self._idle_since >= self.idle_recalibrate_s and \
                now - self._calibrated_at >= self.recalibrate_s:
            steps = self._measure()
            log.info("measured again while idle: step ms by batch %s; decode ms by chunk frames %s",
                     {b: round(1000 * t, 1) for b, t in steps.items()},
                     {f: round(1000 * t, 1) for f, t in self.decode_cost.snapshot().items()})

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
                self._take_incoming()
                self._run_commands()
                self._feed_text()
                self._admit()
                self._drop_cancelled()
                if self.talker.active:
                    self._step()
                else:
                    self._recalibrate_when_idle()
            except BaseException as exc:  # a bug in the step fails the streams in it, never the loop
                log.exception("talker step failed")
                for job in list(self._jobs.values()):
                    self._end(job, exc)
        for job in list(self._jobs.values()):
            self._end(job, EngineError("server is shutting down"))
        self._take_incoming(block=False)
        for job in [entry[2] for entry in self._line] + self._text_waiting:  # fail jobs never admitted
            self._end(job, EngineError("server is shutting down"))
        self._line.clear()
        self._text_waiting.clear()

    def _take_incoming(self, block: Optional[bool] = None) -> None:
        """Move submitted jobs into the waiting line (waiting for one while there is nothing else to do)."""
        timeout = 0.2
        if block is None:
            steppable = any(s.text_ready() for s in self.talker.active if not s.finished)
            block = not steppable and not self._line and self._commands.empty()
            if self.talker.active:  # every row waits for text: wake soon for pacing (held frames may be due)
                timeout = 0.02
        while True:
            try:
                job = self._incoming.get(block=block, timeout=timeout if block else None)
            except queue.Empty:
                break
            block = False
            if job is None:
                continue
            if job.request.feed is None:
                self._line_up(job)
            else:  # _feed_text, later in this pass, lines it up once its text allows
                self._text_waiting.append(job)
        self.stats.queued = len(self._line) + len(self._text_waiting)

    def _line_up(self, job: StreamJob) -> None:
        heapq.heappush(self._line, (self._admit_by(job), next(self._sequence), job))

    def _feed_text(self) -> None:
        """Text that arrived since the last pass: jobs whose prompt can now be built line up (their first-audio
        budget counts from now: until their text came they could not start), running rows get their new text
        ids, and text idle for ``text_idle_s`` is closed."""
        now = time.monotonic()
        for job in list(self._text_waiting):
            feed = job.request.feed
            try:
                if self._check_cancelled(job):
                    raise Cancelled("cancelled while waiting for its text")
                if not feed.closed and now - feed.last_append > self.text_idle_s:
                    feed.close()
                ready = self.talker.ready_to_start(job.request)
            except BaseException as exc:  # noqa: BLE001 - cancelled, text that cannot be closed (empty), a bug:
                self._text_waiting.remove(job)  # this job ends, never left waiting
                self._end(job, exc)
                continue
            if ready:
                self._text_waiting.remove(job)
                job.submitted, job.request.text = now, feed.text
                self._line_up(job)
        for stream in [s for s in self.talker.active if s.text_open]:
            feed = stream.request.feed
            try:
                if not feed.closed and now - feed.last_append > self.text_idle_s:
                    feed.close()
                self.talker.feed_text(stream)
            except BaseException as exc:  # noqa: BLE001 - e.g. idle text ending inside a character: its job ends
                self._end(self._jobs[stream], exc)
                continue
            stream.request.text = feed.text

    def _run_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            command()

    def _budget_s(self, job: StreamJob) -> float:
        """How long after submission a job may wait for its first audio."""
        budget = job.delivery.first_audio_budget_s or self.first_audio_budget_s
        return max(budget, job.delivery.max_wait_s)

    def _first_audio_due(self, job: StreamJob) -> float:
        """The latest a new job's first chunk may leave, to reach its listener within its budget."""
        return job.submitted + self._budget_s(job) - self.margin_s

    def _admit_by(self, job: StreamJob) -> float:
        """The job's place in line: when its listener needs its first chunk (earliest deadline first)."""
        if job.delivery.continuation:
            return job.submitted + job.delivery.lead_s - self.margin_s
        return job.submitted + self._budget_s(job)

    def _first_audio_s(self, batch: int) -> float:
        """Expected time from admission to a new stream's first chunk at this batch size."""
        frames = getattr(self.policy, "first_chunk_frames", 2)
        return self.prefill_s + (frames + 1) * self.step_times.predict(batch) + self.decode_cost(frames)

    def _update_capacity(self) -> int:
        slots = self.talker.slots
        self.stats.realtime_batch = realtime_batch(self.step_times, self.speed, slots) if self.realtime_admission \
            else slots
        limit = min(slots, self.stats.realtime_batch)
        self.stats.headroom = 0 if self.stats.behind else max(0, limit - len(self.talker) - len(self._line))
        self.stats.step_s = self.step_times.predict(max(1, len(self.talker)))
        self.stats.active = len(self.talker)
        return limit

    @staticmethod
    def _expected_frames(request: SynthesisRequest) -> float:
        """How long a request's speech should be (its frame cap, or about a frame per character if shorter)."""
        return min(request.params.max_new_tokens - 1,
                   EXPECTED_FRAMES_BASE + EXPECTED_FRAMES_PER_CHAR * len(request.text))

    def _remaining_s(self) -> list[float]:
        """Each active stream's expected remaining generation time at the current step time."""
        step = self.step_times.predict(max(1, len(self.talker)))
        return [max(4.0, self._expected_frames(stream.request) - stream.frames) * step
                for stream in self.talker.active]

    def _kv_tokens_needed(self, request: SynthesisRequest) -> int:
        """KV tokens a new request should need: its prompt (role and codec tags, the voice's reference frames,
        about a token per 3 characters of text) and its expected speech."""
        reference = request.prompt.ref_code
        prompt = 16 + (0 if reference is None else len(reference)) + len(request.text) // 3
        return int(prompt + self._expected_frames(request))

    def _kv_headroom(self) -> int:
        """KV tokens free once the running streams grow to their expected lengths (memory is given out as
        streams grow, so admission keeps room for what the admitted ones will still need)."""
        growth = sum(max(0, self._kv_tokens_needed(stream.request) - stream.length) for stream in self.talker.active)
        return self.talker.free_tokens() - growth

    def _admit(self) -> None:
        """Start waiting jobs earliest deadline first: within the real-time batch, or beyond it (up to the
        slots) for continuations whose listeners need them now; within this pass's prefill budget. Then refuse
        the new requests that can no longer get their first audio in time."""
        limit = self._update_capacity()
        budget = self.prefill_tokens_per_step
        now = time.monotonic()
        # Streams whose listeners got within half the margin of running dry: the machine gives less than the
        # measured step times promised (other work on it), so nothing new starts until they catch up.
        self.stats.behind = sum(1 for job in self._jobs.values()
                                if job.pacer.play_start is not None and job.pacer.lead(now) < self.margin_s * BEHIND) \
            if self.realtime_admission else 0
        starting, headroom = [], self._kv_headroom()
        while self._line and len(self.talker) + len(starting) < self.talker.slots and budget > 0:
            admit_by, _, job = self._line[0]
            refusal = self._refusal(job, now)
            if refusal is not None:
                heapq.heappop(self._line)
                self._end(job, refusal)
                continue
            running = len(self.talker) + len(starting)
            first_audio = self._first_audio_s(running + 1)
            needed = self._kv_tokens_needed(job.request)
            if job.delivery.continuation:
                if running >= limit and admit_by > now + first_audio:
                    break  # not due yet
            elif running >= limit or self.stats.behind or needed > headroom:
                reason = "capacity" if running >= limit else "behind" if self.stats.behind else "memory"
                self.stats.held_back[reason] += 1
                break
            elif now + first_audio > self._first_audio_due(job):
                heapq.heappop(self._line)  # it would start, but too late for its first audio
                self._end(job, self._too_late())
                continue
            heapq.heappop(self._line)
            starting.append(job)
            headroom -= needed
            budget -= needed - self._expected_frames(job.request)  # its prompt
        if starting:
            self._start(starting)
        self._refuse_late(now, limit)
        self._update_capacity()
        self.stats.queued = len(self._line)

    def _start(self, jobs: list[StreamJob]) -> None:
        """Prefill ``jobs`` together (one forward) and start their pacers; a job whose start failed ends."""
        started = time.perf_counter()
        results = self.talker.add_many([job.request for job in jobs])
        elapsed = time.perf_counter() - started
        self.prefill_s = elapsed if not self.prefill_s else self.prefill_s + 0.1 * (elapsed - self.prefill_s)
        for job, result in zip(jobs, results):
            if isinstance(result, BaseException):
                self._end(job, result)
                continue
            job.stream = result
            # A listener with audio left starts this stream's audio when that runs out, counted from submission.
            job.pacer = Pacer.start(job.policy or self.policy, job.submitted, job.delivery.lead_s, self._budget_s(job))
            self._jobs[job.stream] = job
            if job.stream.finished:  # EOS or max_new_tokens before any frame
                self._end(job, None)

    def _refuse_late(self, now: float, limit: int) -> None:
        """Refuse, at once, each waiting new request whose place in line would not free before its first audio
        is due (continuations wait: their utterance is playing). Cancelled ones leave the line."""
        if not self._line:
            self.stats.retry_after_s = 0.0
            return
        waiting = [entry[2] for entry in sorted(self._line)]
        free_now = max(0, limit - len(self.talker))
        frees = place_free_times(self._remaining_s(), free_now, len(waiting))
        first_audio = self._first_audio_s(limit)
        self.stats.retry_after_s = frees[0] + first_audio
        refused, place = [], 0
        for job in waiting:
            refusal = self._refusal(job, now)
            if refusal is None and not job.delivery.continuation:
                wait = frees[min(place, len(frees) - 1)]
                # A listener waits for a place only briefly (a client that said it can wait, longer): an
                # estimate that far ahead is rarely right, and a fast "busy" beats a late one.
                hold = self.max_hold_s if not job.delivery.max_wait_s else job.delivery.max_wait_s
                if now + wait + first_audio > self._first_audio_due(job) or now + wait > job.submitted + hold:
                    refusal = self._too_late(wait + first_audio)
            if refusal is not None:
                refused.append((job, refusal))
            else:
                place += 1
        if refused:
            gone = {id(job) for job, _ in refused}
            self._line = [entry for entry in self._line if id(entry[2]) not in gone]
            heapq.heapify(self._line)
            for job, refusal in refused:
                self._end(job, refusal)

    def _too_late(self, retry_after_s: Optional[float] = None) -> Overloaded:
        retry_ms = max(100, int(1000 * (self.stats.retry_after_s if retry_after_s is None else retry_after_s)))
        return Overloaded(with_retry_after(
            "the talker cannot start this stream in time for its first audio (at real-time capacity)", retry_ms))

    def _refusal(self, job: StreamJob, now: float) -> Optional[EngineError]:
        """Why a waiting job must not start (cancelled, or waited too long), or None."""
        if self._check_cancelled(job, force=False):
            return Cancelled("cancelled before it started")
        waited = now - job.submitted
        if waited > self.max_queue_wait_s:
            return Overloaded(with_retry_after(f"waited {waited:.0f} s for a free talker slot",
                                               max(100, int(1000 * self.stats.retry_after_s))))
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
        now = time.monotonic()
        active = [s for s in self.talker.active if not s.finished and s.text_ready()]
        waiting_text = [s for s in self.talker.active if not s.finished and not s.text_ready()]
        self._count_text_waits(active, waiting_text, now)
        if not active:  # every row waits for its text: only pacing (frames held back may be due)
            self._pace([], waiting_text, now, self.step_times.predict(len(waiting_text)))
            return
        # Everyone steps while a step of all of them still keeps real time (batching is what makes a step cheap);
        # beyond that, the streams closest to their deadlines step and the others wait this step.
        limit = realtime_batch(self.step_times, 1.0, len(active)) if self.realtime_admission else len(active)
        chosen = active
        if len(active) > limit:
            urgent = most_urgent([self._jobs[s].pacer for s in active], now, limit)
            chosen = [active[i] for i in sorted(urgent)]
            self.stats.skipped_rows += len(active) - len(chosen)
        started = time.perf_counter()
        results = self.talker.step(chosen)
        elapsed = time.perf_counter() - started
        self.step_times.observe(len(chosen), elapsed)
        stats = self.stats
        stats.step_seconds += elapsed
        stats.steps += 1
        stats.step_rows += len(results)
        stats.frames += len(results)
        stepped = {stream for stream, _ in results}
        self._pace(results, [s for s in active if s not in stepped] + waiting_text, time.monotonic(),
                   self.step_times.predict(len(active)))

    def _count_text_waits(self, ready: list, waiting: list, now: float) -> None:
        for stream in waiting:
            job = self._jobs[stream]
            job.text_wait_since = job.text_wait_since or now
        for stream in ready:
            job = self._jobs[stream]
            if job.text_wait_since is not None:
                self.stats.text_wait_s += now - job.text_wait_since
                job.text_wait_since = None
        self.stats.waiting_text = len(waiting) + len(self._text_waiting)

    def _pace(self, results: list, others: list, now: float, next_step: float) -> None:
        """Hand each stream's new frame (``results``), or nothing (``others``), to its pacer; send what is due."""
        stats = self.stats
        for stream, frame in results + [(s, None) for s in others]:
            job = self._jobs[stream]
            held = len(job.pacer.pending) + (frame is not None)
            chunk = job.pacer.add(frame, stream.finished, now, next_step, self.decode_cost(held + 1),
                                  drain=not stream.text_ready())
            if chunk is not None:
                stats.chunks += 1
                stats.chunk_frames += len(chunk)
                stats.leads.append(job.pacer.last_lead)
                del stats.leads[:-4096]  # bounded if nobody reads them
                if job.pacer.last_stall:
                    stats.underruns += 1
                    stats.stalled_s += job.pacer.last_stall
                try:
                    job.on_chunk(chunk, job.pacer.chunks - 1, stream.finished)
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
