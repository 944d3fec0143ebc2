"""The engine: one thread owns the talker and runs the same pass again and again:

    commands -> text -> scheduler.schedule(now) -> execute on the talker -> scheduler.update -> outbox

Everything from other threads arrives as a command on one queue, keyed by stream id (submit, cancel, text, and
calls such as calibration); text still being written is appended to its stream's thread-safe feed on the caller's
thread (tokenising it there, off the stepping thread), and the queue says which stream's text changed. Chunks and ends leave through the
outbox's sender thread, so the step never waits for a response to be sent. A stream ends one way: the scheduler's
end event, whether it finished, failed, was refused or was cancelled (by anyone, with ``cancel``).
"""
from __future__ import annotations

import itertools
import logging
import queue
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..errors import EngineError, InvalidRequest
from ..generation.prompt import SynthesisRequest
from ..generation.talker import TalkerStream
from ..recent import RecentIds
from .calibration import Calibration, measure
from .outbox import Collector, Generation, Outbox, Sink
from .pacing import ChunkPolicy
from .scheduler import Scheduler, SchedulerConfig
from .tickets import HELD, Deadline, End, Outcome, Plan, Ticket

log = logging.getLogger(__name__)
_SUBMIT, _CANCEL, _TEXT, _CALL = "submit", "cancel", "text", "call"
IDLE_TEXT_CHECK_S = 1.0  # how often every open text is checked for having gone idle


@dataclass(eq=False)
class _Stream:
    ticket: Ticket
    request: SynthesisRequest
    row: Optional[TalkerStream] = None  # its talker row, once started


class Engine:
    """The talker's serving loop (see the module). ``text_idle_s``: text still being written with nothing new for
    this long is closed as if it had ended; ``recalibrate_s``: how old the step-time calibration may get before an
    idle loop measures it again."""

    def __init__(self, talker, config: Optional[SchedulerConfig] = None, policy: Optional[ChunkPolicy] = None,
                 name: str = "talker", torch_threads: Optional[int] = 1, text_idle_s: float = 60.0,
                 recalibrate_s: float = 300.0):
        self.talker = talker
        self.config = config or SchedulerConfig(rows=talker.rows)
        self.scheduler = Scheduler(self.config, policy)
        self.costs = self.scheduler.costs
        self.torch_threads, self.text_idle_s = torch_threads, text_idle_s
        self.recalibrate_s, self.idle_recalibrate_s = recalibrate_s, 2.0
        self._calibration: Optional[Calibration] = None
        self._calibrated_at = 0.0
        self._idle_since: Optional[float] = None
        self.outbox = Outbox(name, on_failure=self.cancel)
        self._commands: "queue.SimpleQueue" = queue.SimpleQueue()
        self._streams: dict[int, _Stream] = {}  # the stepping thread's own
        self._feeds: dict = {}  # texts still being written, by stream id (appended from any thread)
        self._text_changed: set[int] = set()  # streams whose text changed since the last pass
        self._idle_checked = 0.0
        self._early_cancels = RecentIds(4096)  # cancels that came before their stream (the stepping thread's own)
        self._prefix, self._counter = secrets.randbits(31) << 32, itertools.count(1)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"{name}-engine", daemon=True)
        self._thread.start()

    @property
    def stats(self):
        return self.scheduler.stats

    @property
    def rows(self) -> int:
        return self.config.rows

    def status(self) -> dict:
        """The capacity a router needs to know (read from the figures the loop keeps; never waits for it)."""
        return self.stats.status(self.config.rows, self.scheduler.margin_s)

    # -- what other threads call ------------------------------------------------------------------------------

    def new_id(self) -> int:
        """A stream id unique across processes and restarts: a random per-process prefix and a counter."""
        return self._prefix | next(self._counter)

    def submit(self, stream_id: int, request: SynthesisRequest, sink: Sink, deadline: Deadline = Deadline(),
               policy: Optional[ChunkPolicy] = None) -> None:
        """Start a stream (``stream_id`` from ``new_id``): its chunks and its end go to ``sink`` on the output
        thread (a refusal too, as its end). A request whose text is still arriving (``request.feed``) takes
        ``append_text``/``flush_text``/``end_text`` by its id."""
        if self._stopping.is_set():
            raise EngineError("server is shutting down")
        if not self.outbox.open(stream_id, sink):
            raise InvalidRequest(f"stream {stream_id:x} exists already")
        if request.feed is not None:
            request.feed.on_append = lambda: self._commands.put((_TEXT, stream_id))  # text arrived: wake for it
            self._feeds[stream_id] = request.feed
        self._commands.put((_SUBMIT, stream_id, request, deadline, policy, time.monotonic()))

    def cancel(self, stream_id: int, error: Optional[BaseException] = None) -> None:
        """End a stream at the next pass (``error``: why, default Cancelled). Never blocks; a cancel that comes
        before its stream ends it as soon as it arrives."""
        self._commands.put((_CANCEL, stream_id, error))

    def append_text(self, stream_id: int, piece) -> None:
        """More of a stream's text (str, or UTF-8 bytes split anywhere). Raises what is wrong (no such open text,
        closed, bad UTF-8, too long)."""
        self._feed(stream_id).append(piece)

    def flush_text(self, stream_id: int) -> None:
        """The stream's text so far is final as written: its held-back last word is committed now."""
        self._feed(stream_id).flush()

    def end_text(self, stream_id: int) -> None:
        """The stream's text is complete."""
        self._feed(stream_id).close()

    def _feed(self, stream_id: int):
        feed = self._feeds.get(stream_id)
        if feed is None:
            raise InvalidRequest(f"stream {stream_id:x} has no open text (never opened, or it has ended)")
        return feed

    def _wake(self) -> None:
        self._commands.put(None)

    def generate(self, request: SynthesisRequest, policy: Optional[ChunkPolicy] = None, timeout: float = 300.0,
                 deadline: Optional[Deadline] = None) -> Generation:
        """Run one request to its end and collect its chunks (tests, benchmarks, warm-up); raises the error the
        stream ended with."""
        sink, stream_id = Collector(), self.new_id()
        self.submit(stream_id, request, sink, deadline or Deadline(max_wait_s=timeout), policy)
        if not sink.done.wait(timeout):
            self.cancel(stream_id)
            raise TimeoutError(f"generation did not end within {timeout:g} s")
        if sink.error is not None:
            raise sink.error
        return sink.result

    def call(self, command: Callable[[], object], timeout: float = 600.0):
        """Run ``command`` on the stepping thread between two passes and return its result."""
        done, outcome = threading.Event(), []
        self._commands.put((_CALL, command, done, outcome))
        if not done.wait(timeout):
            raise TimeoutError(f"the serving loop did not run the command within {timeout:g} s")
        value, error = outcome[0]
        if error is not None:
            raise error
        return value

    def calibrate(self, request: SynthesisRequest, sizes=None, steps: int = 8,
                  decode_probe: Optional[Callable[[], dict]] = None) -> dict[int, float]:
        """Measure the step time at each batch size (the talker's buckets up to its rows) with copies of
        ``request``, and the decode cost of each chunk size (``decode_probe``), before serving. Start-up shares the
        machine with other models loading, so the loop measures again once it has been idle a while soon after,
        and every ``recalibrate_s``; real steps refine the numbers in between."""
        self._calibration = Calibration.of(request, sizes or self.talker.buckets_up_to_rows(), steps, decode_probe)
        measured = self.call(lambda: self._measure(abortable=False))
        self._calibrated_at -= self.recalibrate_s - 5.0  # measure again at the first idle moment after 5 s
        return measured

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        self._wake()
        self._thread.join(timeout)
        self.outbox.stop(timeout)

    # -- the loop ---------------------------------------------------------------------------------------------

    def _run(self) -> None:
        if self.torch_threads:
            # A step is a chain of small ops: on a 2-core CPU one intra-op thread ran it 1.3x faster than two
            # (in a thread other than the main one, a second OpenMP team competes with the first).
            torch.set_num_threads(self.torch_threads)
        while not self._stopping.is_set():
            try:
                self._take_commands()
                now = time.monotonic()
                self._feed_text(now)
                plan = self.scheduler.schedule(now, self.talker.free_tokens())
                outcome = self._execute(plan)
                self._emit(self.scheduler.update(plan, outcome, time.monotonic()))
                if not plan.step and not plan.start:
                    self._recalibrate_when_idle()
            except BaseException as exc:  # a bug in a step fails the streams in it, never the loop
                log.exception("talker step failed")
                self._emit(self.scheduler.fail(exc))
        self._shut_down()

    def _take_commands(self) -> None:
        """Apply every queued command; wait for one while there is nothing to step."""
        wait = self._idle_wait()
        try:
            command = self._commands.get(timeout=wait) if wait else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            if command is not None:
                self._apply(command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _idle_wait(self) -> float:
        """How long a pass may wait for a command: not at all while a row can step; briefly while rows wait for
        their text (held frames may come due) or streams wait in line; otherwise until woken (text arriving wakes
        the loop; idle texts are checked every IDLE_TEXT_CHECK_S)."""
        scheduler = self.scheduler
        if scheduler.has_ready_rows():
            return 0.0
        return 0.02 if scheduler.stats.active or scheduler.in_line else 0.2

    def _apply(self, command: tuple) -> None:
        kind = command[0]
        if kind == _SUBMIT:
            _, stream_id, request, deadline, policy, submitted = command
            self._add(stream_id, request, deadline, policy, submitted)
        elif kind == _TEXT:
            self._text_changed.add(command[1])
        elif kind == _CANCEL:
            _, stream_id, error = command
            if self.scheduler.ticket(stream_id) is not None:
                self.scheduler.cancel(stream_id, error)
            elif stream_id not in self._streams:  # (ended streams were forgotten: no harm remembering it)
                self._early_cancels.add(stream_id, error)
        elif kind == _CALL:
            _, function, done, outcome = command
            try:
                outcome.append((function(), None))
            except BaseException as exc:
                outcome.append((None, exc))
            done.set()

    def _add(self, stream_id: int, request: SynthesisRequest, deadline: Deadline, policy, submitted: float) -> None:
        characters = len(request.text)
        reference = request.reference_codes
        ticket = Ticket(stream_id, submitted=submitted, deadline=deadline, characters=characters,
                        frame_cap=request.params.frame_cap(characters), policy=policy,
                        # role and codec tags, the voice's reference frames, about a token per 3 characters of text
                        # (an instruction's too, counted at one per 2: it may be CJK)
                        prompt_tokens=16 + (0 if reference is None else len(reference)) + characters // 3
                        + len(request.instruct or "") // 2,
                        awaiting_text=request.feed is not None)
        self._streams[stream_id] = _Stream(ticket, request)
        self._emit(self.scheduler.add(ticket))
        if stream_id in self._early_cancels:  # its cancel came first (a watcher can see it before the submit)
            self.scheduler.cancel(stream_id, self._early_cancels.pop(stream_id))
        if request.feed is not None:
            self._text_changed.add(stream_id)

    def _feed_text(self, now: float) -> None:
        """Text that arrived since the last pass: streams whose prompt can now be built exactly line up, running
        rows get their new text ids; every IDLE_TEXT_CHECK_S, text idle for ``text_idle_s`` is closed. A failure
        (idle text ending inside a character, say) ends its own stream only."""
        changed, self._text_changed = self._text_changed, set()
        if now - self._idle_checked >= IDLE_TEXT_CHECK_S:
            self._idle_checked = now
            changed.update(stream_id for stream_id, feed in list(self._feeds.items()) if self._idle(feed, now))
        for stream_id in changed:
            stream, feed = self._streams.get(stream_id), self._feeds.get(stream_id)
            if stream is None or feed is None:
                continue  # ended, or submitted and not taken yet (taking it looks at its text)
            ticket, row = stream.ticket, stream.row
            held = ticket.state == HELD
            if not held and (row is None or not row.text_open):
                continue
            try:
                if self._idle(feed, now):
                    feed.close()
                if held:
                    if not self.talker.ready_to_start(stream.request):
                        continue
                else:
                    self.talker.feed_text(row)
                    ticket.awaiting_text = not row.text_ready()
            except BaseException as exc:  # noqa: BLE001 - cancelled, bad text, a bug: this stream ends
                self.scheduler.cancel(stream_id, exc)
                continue
            stream.request.text = feed.text
            ticket.characters = len(stream.request.text)
            ticket.frame_cap = stream.request.params.frame_cap(ticket.characters)
            if held:
                self.scheduler.text_ready(stream_id, now)

    def _idle(self, feed, now: float) -> bool:
        """Text still open with nothing new for ``text_idle_s``: closed as if it had ended."""
        return not feed.closed and now - feed.last_append > self.text_idle_s

    def _execute(self, plan: Plan) -> Outcome:
        """Run the plan on the talker: free the rows of the streams that end, prefill the new ones together, step."""
        outcome, streams, talker = Outcome(), self._streams, self.talker
        for ticket, _ in plan.end:
            self._free_row(streams.get(ticket.id))
        if plan.start:
            started = time.perf_counter()
            results = talker.add_many([streams[t.id].request for t in plan.start])
            outcome.prefill_s = time.perf_counter() - started
            for ticket, row in zip(plan.start, results):  # every row recorded first: whatever fails, it is freed
                if not isinstance(row, BaseException):
                    row.key, streams[ticket.id].row = ticket.id, row
            for ticket, row in zip(plan.start, results):
                if isinstance(row, BaseException):
                    outcome.started[ticket.id] = row
                    continue
                outcome.started[ticket.id] = row.length
                if row.finished:  # EOS or max_new_tokens before any frame
                    outcome.finished[ticket.id] = row.finish_reason
                ticket.awaiting_text = not row.text_ready()
        rows = [row for ticket in plan.step if (row := streams[ticket.id].row) is not None
                and not row.finished and row.text_ready()]
        if rows:
            started = time.perf_counter()
            stepped = talker.step(rows)
            outcome.step_s = time.perf_counter() - started
            outcome.stepped = len(stepped)
            frames, finished, tickets = outcome.frames, outcome.finished, self.scheduler.ticket
            for row, frame in stepped:
                frames[row.key] = frame
                if row.finished:
                    finished[row.key] = row.finish_reason
                elif row.text_open:
                    tickets(row.key).awaiting_text = not row.text_ready()
        return outcome

    def _emit(self, events: list) -> None:
        """Free what ended streams held, then hand the events to the output thread."""
        for event in events:
            if isinstance(event, End):
                self._free_row(self._streams.pop(event.stream_id, None))
                self._feeds.pop(event.stream_id, None)
        self.outbox.put(events)

    def _free_row(self, stream: Optional[_Stream]) -> None:
        if stream is None or stream.row is None:
            return
        row, stream.row = stream.row, None
        try:
            self.talker.remove(row)
        except Exception:  # the stream must still end (exactly once), and the loop go on
            log.exception("stream %x: could not free its talker row", stream.ticket.id)

    def _measure(self, abortable: bool = True) -> dict[int, float]:
        """One calibration pass; an abortable one stops between sizes as soon as a command arrives."""
        steps = measure(self.talker, self._calibration, self.costs,
                        interrupted=(lambda: not self._commands.empty()) if abortable else (lambda: False))
        self._calibrated_at = time.monotonic()
        return steps

    def _recalibrate_when_idle(self) -> None:
        now = time.monotonic()
        if self.scheduler.running or self.scheduler.waiting:
            self._idle_since = None
            return
        self._idle_since = self._idle_since or now
        if self._calibration is not None and now - self._idle_since >= self.idle_recalibrate_s and \
                now - self._calibrated_at >= self.recalibrate_s:
            steps = self._measure()
            log.info("measured again while idle: step ms by batch %s; decode ms by chunk frames %s",
                     {b: round(1000 * t, 1) for b, t in steps.items()},
                     {f: round(1000 * t, 1) for f, t in self.costs.decode.snapshot().items()})

    def _shut_down(self) -> None:
        """End every stream (those never taken from the queue too), then let the output thread finish."""
        stopping = EngineError("server is shutting down")
        events = self.scheduler.end_all(stopping)
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            if command is None:
                continue
            if command[0] == _SUBMIT:
                events.append(End(command[1], stopping, "rejected"))
            elif command[0] == _CALL:
                command[3].append((None, stopping))
                command[2].set()
        self._emit(events)
        for stream in list(self._streams.values()):
            self._free_row(stream)
        self._streams.clear()
