"""The one place that decides what runs: admission by deadline within the real-time capacity, honest refusals,
which rows step, and, from what a step made, which frames go to their listeners and which streams end.

Plain data in, decisions out: no threads, no model, no I/O, and time is an argument, so each decision is tested on
its own. The engine loop feeds it (``add``, ``cancel``, ``text_ready``), asks it for a ``Plan`` each pass
(``schedule``), executes the plan on the model and hands back what that gave (``update``), which returns the
events (chunks, ends) for the output thread.

Waiting streams are served earliest deadline first: a new stream's deadline is its first-audio budget, a
continuation's (the next sentence of an utterance that is playing) its listener's lead. New streams start within
the real-time batch (the largest whose measured step keeps every stream ahead of real time by ``speed``), while no
running stream is falling behind and the KV memory the running ones will still need allows; continuations may go
beyond the real-time batch, up to the rows, once they are due, and are never refused for load. A new stream that
cannot get its first audio within its budget (or within ``max_hold_s`` unless it said it can wait) is refused at
once, with when to try again. When more rows are ready than the real-time batch, the ones closest to their
deadlines step and the others wait a step.

(A little over 400 lines on purpose: the parts of one decision, admission, refusal, stepping, pacing and ends,
are kept in one class so the order of a pass reads in one place; its data, costs and pacing are modules of
their own.)
"""
from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass
from typing import Optional

from tts_contract.deadlines import DEFAULT_FIRST_AUDIO_BUDGET_MS, with_retry_after

from ..errors import Cancelled, EngineError, Overloaded
from .costs import CostModel, place_free_times, realtime_batch
from .pacing import ChunkPolicy, DeadlinePacing, Pacer, most_urgent
from .stats import EngineStats
from .tickets import ENDED, HELD, RUNNING, WAITING, Chunk, End, Outcome, Plan, Ticket

# A stream whose listener has less than this part of the pacing margin left is falling behind.
BEHIND = 0.5
MAX_LEADS = 4096  # chunk leads kept for the metrics publisher between its reads


@dataclass(frozen=True)
class SchedulerConfig:
    """``rows``: streams the talker holds at once; ``max_queued``: streams waiting at most (more are refused);
    ``max_queue_wait_s``: the longest any stream waits in line; ``prefill_tokens_per_pass``: prompt tokens started
    per pass (running streams never stall long for new ones); ``speed``: how much faster than real time every
    stepped stream must run; ``first_audio_budget_s``: the default budget of a stream's first audio;
    ``max_hold_s``: how long a new stream that did not say it can wait may wait for a row;
    ``realtime_admission``: False admits up to the rows whatever the step time (throughput benchmarks)."""

    rows: int
    max_queued: int = 64
    max_queue_wait_s: float = 30.0
    prefill_tokens_per_pass: int = 512
    speed: float = 1.5
    first_audio_budget_s: float = DEFAULT_FIRST_AUDIO_BUDGET_MS / 1000
    max_hold_s: float = 0.3
    realtime_admission: bool = True


class Scheduler:
    def __init__(self, config: SchedulerConfig, policy: Optional[ChunkPolicy] = None,
                 costs: Optional[CostModel] = None):
        self.config = config
        self.policy = policy or DeadlinePacing()
        self.margin_s = getattr(self.policy, "margin_s", 0.0)
        self.first_chunk_frames = getattr(self.policy, "first_chunk_frames", 2)
        self.costs = costs or CostModel()
        self.stats = EngineStats()
        self._tickets: dict[int, Ticket] = {}  # every ticket not ended, by stream id
        self._line: list = []  # waiting tickets: a heap of (admit_by, sequence, ticket)
        self._held: dict[int, Ticket] = {}  # tickets whose text cannot start them yet
        self._running: dict[int, Ticket] = {}  # in the order they started
        self._cancels: list[Ticket] = []  # cancelled since the last pass
        self._returning: list[float] = []  # when the clients refused for load were told to try again
        self._events: list = []  # events not handed out yet (a pass that fails still hands out its ends)
        self._sequence = itertools.count()

    @property
    def waiting(self) -> int:
        """Streams not started yet (in line, or held for their text)."""
        return len(self._line) + len(self._held)

    @property
    def running(self) -> list[Ticket]:
        return list(self._running.values())

    @property
    def in_line(self) -> int:
        """Streams in line (held ones wait for their text, not for the loop)."""
        return len(self._line)

    def has_ready_rows(self) -> bool:
        """Whether a running stream can step now (not waiting for its text, not finished)."""
        return any(not t.awaiting_text and t.finish is None for t in self._running.values())

    def ticket(self, stream_id: int) -> Optional[Ticket]:
        return self._tickets.get(stream_id)

    # -- what comes in ------------------------------------------------------------------------------------------

    def add(self, ticket: Ticket) -> list:
        """A new stream (its id unique: the engine's); returns its end event at once (Overloaded) when
        ``max_queued`` new streams are already waiting (a continuation is never refused for load). One whose text
        cannot start it yet (``awaiting_text``) waits without a place in line until ``text_ready``."""
        if self.waiting >= self.config.max_queued and not ticket.deadline.continuation:
            self._end(ticket, Overloaded(with_retry_after(
                f"{self.config.max_queued} requests are already waiting for the talker",
                self._retry_ms(self._retry_after_s(ticket.submitted)))))
            return self._take_events()
        self._tickets[ticket.id] = ticket
        if ticket.awaiting_text:
            ticket.state = HELD
            self._held[ticket.id] = ticket
        else:
            self._line_up(ticket)
        return []

    def text_ready(self, stream_id: int, now: float) -> None:
        """A held stream's text now lets it start: it lines up, its first-audio budget counting from now."""
        ticket = self._held.pop(stream_id, None)
        if ticket is not None:
            ticket.awaiting_text, ticket.ready_at = False, now
            self._line_up(ticket)

    def cancel(self, stream_id: int, error: Optional[BaseException] = None) -> bool:
        """End a stream at the next pass, with ``error`` (default: Cancelled); False when it is unknown or
        already ending. Whoever asks (a client through Triton, the decoder, a timeout), this is the one way."""
        ticket = self._tickets.get(stream_id)
        if ticket is None or ticket.ending or ticket.end_error is not None:
            return False
        ticket.end_error = error or Cancelled(f"cancelled after {ticket.frames} frames" if ticket.state == RUNNING
                                              else "cancelled before it started")
        self._cancels.append(ticket)
        return True

    # -- one pass -----------------------------------------------------------------------------------------------

    def schedule(self, now: float, free_kv_tokens: int) -> Plan:
        """What this pass does (see ``Plan``): ``free_kv_tokens`` is what the KV pool can still give out."""
        plan = Plan()
        for ticket in self._cancels:
            if not ticket.ending:
                self._leave(plan, ticket, ticket.end_error)
        self._cancels.clear()
        limit = self._admission_limit()
        # Streams whose listeners got within half the margin of running dry: the machine gives less than the
        # measured step times promised (other work on it), so nothing new starts until they catch up.
        # (A stream waiting for its writer's text is not behind: its listener waits for the writer, not for us.)
        behind = sum(1 for t in self._running.values() if t.pacer.listener.play_start is not None
                     and not t.awaiting_text and t.pacer.lead(now) < self.margin_s * BEHIND) \
            if self.config.realtime_admission else 0
        self._admit(plan, now, limit, behind, free_kv_tokens)
        self._refuse_late(plan, now, limit)
        self._choose_steps(plan, now)
        stats = self.stats
        stats.realtime_batch, stats.behind = limit, behind
        stats.active, stats.queued = len(self._running), self.waiting
        stats.headroom = 0 if behind else max(0, limit - len(self._running) - len(self._line))
        stats.step_s = self.costs.step.predict(max(1, len(self._running)))
        return plan

    def update(self, plan: Plan, outcome: Outcome, now: float) -> list:
        """Take what executing ``plan`` gave; returns the events: each stream's due chunk and each end."""
        stats, costs = self.stats, self.costs
        for ticket, error in plan.end:
            self._end(ticket, error)
        for ticket in plan.start:
            started = outcome.started.get(ticket.id)
            if isinstance(started, BaseException):
                self._end(ticket, started)
            elif started is not None:
                ticket.kv_tokens = started
        if plan.start:
            costs.observe_prefill(outcome.prefill_s)
        if outcome.stepped:
            costs.step.observe(outcome.stepped, outcome.step_s)
            stats.steps += 1
            stats.step_rows += outcome.stepped
            stats.frames += outcome.stepped
            stats.step_seconds += outcome.step_s
        for stream_id, reason in outcome.finished.items():
            ticket = self._running.get(stream_id)
            if ticket is not None:
                ticket.finish = reason
        self._pace(outcome.frames, now)
        stats.active = len(self._running)
        return self._take_events()

    # -- admission ----------------------------------------------------------------------------------------------

    def _line_up(self, ticket: Ticket) -> None:
        ticket.state = WAITING
        heapq.heappush(self._line, (self._admit_by(ticket), next(self._sequence), ticket))

    def _budget_s(self, ticket: Ticket) -> float:
        """How long after its budget started a stream may wait for its first audio."""
        budget = ticket.deadline.first_audio_budget_s or self.config.first_audio_budget_s
        return max(budget, ticket.deadline.max_wait_s)

    def _first_audio_due(self, ticket: Ticket) -> float:
        """The latest a new stream's first chunk may leave, to reach its listener within its budget."""
        return ticket.budget_from + self._budget_s(ticket) - self.margin_s

    def _admit_by(self, ticket: Ticket) -> float:
        """Its place in line: when its listener needs its first chunk (earliest deadline first)."""
        if ticket.deadline.continuation:
            return ticket.budget_from + ticket.deadline.lead_s - self.margin_s
        return ticket.budget_from + self._budget_s(ticket)

    def _admission_limit(self) -> int:
        """Streams that may run at once: the real-time batch, at most the rows."""
        rows = self.config.rows
        return realtime_batch(self.costs.step, self.config.speed, rows) if self.config.realtime_admission else rows

    def _admit(self, plan: Plan, now: float, limit: int, behind: int, free_kv_tokens: int) -> None:
        """Start waiting streams earliest deadline first (see the module), within this pass's prefill budget."""
        if not self._line:
            return
        config, costs = self.config, self.costs
        budget = config.prefill_tokens_per_pass
        # KV memory is given out as streams grow: keep room for what the running ones will still need.
        kv_headroom = free_kv_tokens - sum(max(0, t.kv_needed - t.kv_tokens) for t in self._running.values())
        while self._line and len(self._running) < config.rows and budget > 0:
            admit_by, _, ticket = self._line[0]
            if now - self._waiting_since(ticket) > config.max_queue_wait_s:
                heapq.heappop(self._line)
                self._leave(plan, ticket, self._waited_too_long(now, ticket))
                continue
            running = len(self._running)
            first_audio = costs.first_audio_s(running + 1, self.first_chunk_frames)
            needed = ticket.kv_needed
            if ticket.deadline.continuation:
                if running >= limit and admit_by > now + first_audio:
                    break  # not due yet
            elif running >= limit or behind or needed > kv_headroom:
                self.stats.held_back["capacity" if running >= limit else "behind" if behind else "memory"] += 1
                break
            elif now + first_audio > self._first_audio_due(ticket):
                heapq.heappop(self._line)  # it would start, but too late for its first audio
                self._leave(plan, ticket, self._too_late(now))
                continue
            heapq.heappop(self._line)
            ticket.state = RUNNING
            # A listener with audio left plays this stream's audio when that runs out.
            ticket.pacer = Pacer.start(ticket.policy or self.policy, ticket.budget_from, ticket.deadline.lead_s,
                                       self._budget_s(ticket))
            self._running[ticket.id] = ticket
            plan.start.append(ticket)
            kv_headroom -= needed
            budget -= ticket.prompt_tokens

    def _refuse_late(self, plan: Plan, now: float, limit: int) -> None:
        """Refuse, at once, each waiting new stream whose place in line would not free before its first audio is
        due (continuations wait: their utterance is playing)."""
        if not self._line:
            self.stats.retry_after_s = 0.0
            return
        waiting = [entry[2] for entry in sorted(self._line)]
        self._returning = [at for at in self._returning if at > now]
        # Every place in line, then the one a stream refused now would get (behind the clients coming back).
        frees = place_free_times(self._remaining_s(), max(0, limit - len(self._running)),
                                 len(waiting) + len(self._returning) + 1)
        first_audio = self.costs.first_audio_s(limit, self.first_chunk_frames)
        self.stats.retry_after_s = frees[-1] + first_audio  # what a refusal now would say
        refused, place = [], 0  # (ticket, whether it waited too long)
        for ticket in waiting:
            if now - self._waiting_since(ticket) > self.config.max_queue_wait_s:
                refused.append((ticket, True))
                continue
            if not ticket.deadline.continuation:
                wait = frees[place]
                # A listener waits for a row only briefly (a client that said it can wait, longer): an estimate
                # that far ahead is rarely right, and a fast "busy" beats a late one.
                hold = ticket.deadline.max_wait_s or self.config.max_hold_s
                if now + wait + first_audio > self._first_audio_due(ticket) or now + wait > ticket.budget_from + hold:
                    refused.append((ticket, False))
                    continue
            place += 1
        if not refused:
            return
        self._drop_from_line([ticket for ticket, _ in refused])  # at once: none is ahead of the others refused
        for ticket, waited in refused:
            ticket.ending = True
            plan.end.append((ticket, self._waited_too_long(now, ticket) if waited else self._too_late(now)))

    def _remaining_s(self) -> list[float]:
        """Each running stream's expected remaining generation time at the current step time."""
        step = self.costs.step.predict(max(1, len(self._running)))
        return [max(4.0, t.expected_frames - t.frames) * step for t in self._running.values()]

    def _retry_after_s(self, now: float) -> float:
        """When a stream refused now should try again: when the row it would get frees, behind the streams in line
        and the clients refused before it that will be back first (each refusal names a later row, so retries do
        not all come back together and meet a full engine again). It will be back then too."""
        self._returning = [at for at in self._returning if at > now]
        limit = self.stats.realtime_batch or self.config.rows
        ahead = len(self._line) + len(self._returning)
        frees = place_free_times(self._remaining_s(), max(0, limit - len(self._running)), ahead + 1)
        retry_s = frees[ahead] + self.costs.first_audio_s(limit, self.first_chunk_frames)
        self._returning.append(now + retry_s)
        return retry_s

    def _retry_ms(self, retry_after_s: float) -> int:
        return max(100, int(1000 * retry_after_s))

    def _too_late(self, now: float) -> Overloaded:
        return Overloaded(with_retry_after(
            "the talker cannot start this stream in time for its first audio (at real-time capacity)",
            self._retry_ms(self._retry_after_s(now))))

    def _waiting_since(self, ticket: Ticket) -> float:
        """Since when a stream has been waiting for a row: its budget's start, or for a continuation the moment it
        came due (its listener may have had many seconds of audio when it was sent)."""
        return max(ticket.budget_from, self._admit_by(ticket)) if ticket.deadline.continuation else ticket.budget_from

    def _waited_too_long(self, now: float, ticket: Ticket) -> Overloaded:
        return Overloaded(with_retry_after(f"waited {now - self._waiting_since(ticket):.0f} s for a free talker row",
                                           self._retry_ms(self._retry_after_s(now))))

    # -- stepping and pacing ------------------------------------------------------------------------------------

    def _choose_steps(self, plan: Plan, now: float) -> None:
        """Every ready row steps while a step of all of them keeps real time (batching is what makes a step cheap);
        beyond that, the rows closest to their deadlines step and the others wait this step."""
        ready = [t for t in self._running.values() if not t.awaiting_text and t.finish is None]
        limit = realtime_batch(self.costs.step, 1.0, len(ready)) if self.config.realtime_admission and ready \
            else len(ready)
        if len(ready) > limit:
            urgent = most_urgent([t.pacer for t in ready], now, limit)
            self.stats.skipped_rows += len(ready) - limit
            ready = [ready[i] for i in sorted(urgent)]
        plan.step = ready

    def _pace(self, frames: dict, now: float) -> None:
        """Hand each running stream's new frame (or nothing) to its pacer; the chunks that are due become events,
        and the streams the model ended, their ends."""
        stats = self.stats
        waiting_text = 0
        next_step = self.costs.step.predict(max(1, len(self._running)))
        decode = self.costs.decode
        decode_costs: dict[int, float] = {}  # per chunk size, once per pass
        for ticket in list(self._running.values()):
            frame = frames.get(ticket.id)
            if frame is not None:
                ticket.frames += 1
                ticket.kv_tokens += 1
            pacer, finished = ticket.pacer, ticket.finish is not None
            if ticket.awaiting_text:
                waiting_text += 1
                if ticket.text_wait_since is None:  # a gap its listener hears from now is the writer's
                    ticket.text_wait_since = now
                    pacer.listener.pause(now)
            elif ticket.text_wait_since is not None:
                stats.text_wait_s += now - ticket.text_wait_since
                ticket.text_wait_since = None
                pacer.listener.resume(now)
            held = len(pacer.pending) + (frame is not None) + 1
            deliver = decode_costs.get(held)
            if deliver is None:
                deliver = decode_costs[held] = decode(held)
            chunk = pacer.add(frame, finished, now, next_step, deliver, drain=ticket.awaiting_text)
            if chunk is not None:
                listener = pacer.listener
                stats.chunks += 1
                stats.chunk_frames += len(chunk)
                stats.leads.append(listener.last_lead)
                if listener.last_stall:
                    stats.underruns += 1
                    stats.stalled_s += listener.last_stall
                self._events.append(Chunk(ticket.id, chunk, pacer.chunks - 1, finished))
            if finished:
                self._end(ticket, None)
        if len(stats.leads) > MAX_LEADS:  # bounded if nobody reads them
            del stats.leads[:-MAX_LEADS]
        stats.waiting_text = waiting_text + len(self._held)

    # -- ends ---------------------------------------------------------------------------------------------------

    def _drop_from_line(self, tickets) -> None:
        """Take these tickets out of the line (one rebuild of the heap, however many)."""
        gone = {id(ticket) for ticket in tickets}
        self._line = [entry for entry in self._line if id(entry[2]) not in gone]
        heapq.heapify(self._line)

    def _leave(self, plan: Plan, ticket: Ticket, error: BaseException) -> None:
        """Take a stream out of line (or its row) now; it ends with ``error`` when the plan is done."""
        ticket.ending = True
        self._held.pop(ticket.id, None)
        self._running.pop(ticket.id, None)
        if ticket.state == WAITING:
            self._drop_from_line([ticket])
        plan.end.append((ticket, error))

    def _end(self, ticket: Ticket, error: Optional[BaseException]) -> None:
        if ticket.state == ENDED:
            return
        if ticket.state == WAITING and not ticket.ending:
            self._drop_from_line([ticket])
        ticket.state, ticket.ending = ENDED, True
        self._tickets.pop(ticket.id, None)
        self._held.pop(ticket.id, None)
        self._running.pop(ticket.id, None)
        if error is None:
            outcome = ticket.finish or "eos"
        elif isinstance(error, Cancelled):
            outcome = "cancelled"
        elif isinstance(error, EngineError):
            outcome = "rejected"
        else:
            outcome = "error"
        self.stats.outcomes[outcome] += 1
        self._events.append(End(ticket.id, error, outcome))

    def _take_events(self) -> list:
        events, self._events = self._events, []
        return events

    def end_all(self, error: BaseException) -> list:
        """End every stream (the loop is stopping); returns the events not handed out yet."""
        for ticket in list(self._tickets.values()):
            self._end(ticket, error)
        self._line.clear()
        self._cancels.clear()
        return self._take_events()

    def fail(self, error: BaseException) -> list:
        """A pass failed (a bug in the step, or here): the streams it was ending end as planned, the running ones
        with ``error``; those waiting go on. Returns every event not handed out yet, those the failed pass made
        before it failed included, so each stream still ends exactly once."""
        for ticket in list(self._tickets.values()):
            if ticket.ending or ticket.state == RUNNING:
                self._end(ticket, ticket.end_error if ticket.ending and ticket.end_error else error)
        return self._take_events()
