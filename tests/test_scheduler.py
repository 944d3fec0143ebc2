"""The scheduler's decisions on plain data: no thread, no model, time passed in. A pretend model starts every
planned stream and gives every planned step one frame."""
from __future__ import annotations

import pytest
import torch

from tts_contract.deadlines import retry_after_ms
from tts_contract.speech_length import CAP_FRAMES_BASE, CAP_FRAMES_PER_CHAR, expected_frames, frame_cap
from tts_engine.errors import Cancelled, InvalidRequest, Overloaded
from tts_engine.serving.pacing import FixedChunks
from tts_engine.serving.scheduler import Scheduler, SchedulerConfig
from tts_engine.serving.tickets import Chunk, Deadline, End, Outcome, Ticket

FRAME = torch.zeros(16, dtype=torch.long)
STEP_S = 0.01  # the pretend model's step: 10 ms whatever the batch (unless a test says otherwise)


def make(rows: int = 1, step_s=STEP_S, **config) -> Scheduler:
    scheduler = Scheduler(SchedulerConfig(rows=rows, **config), FixedChunks((1,)))
    scheduler.costs.step.update({1: step_s} if not callable(step_s) else {b: step_s(b) for b in range(1, rows + 1)})
    return scheduler


def ticket(stream_id: int, now: float = 0.0, characters: int = 20, **fields) -> Ticket:
    return Ticket(stream_id, submitted=now, characters=characters, frame_cap=10_000, **fields)


class PretendModel:
    """Executes plans: starts succeed unless named in ``fail``, each step gives one frame, a stream named in
    ``lengths`` finishes after that many frames. Keeps every event and every step's streams."""

    def __init__(self, scheduler: Scheduler, lengths: dict = None, fail: dict = None, step_s=lambda batch: STEP_S):
        self.scheduler, self.lengths, self.fail, self.step_s = scheduler, lengths or {}, fail or {}, step_s
        self.events, self.steps, self.frames = [], [], {}

    def run(self, now: float, free_kv_tokens: int = 10**9):
        plan = self.scheduler.schedule(now, free_kv_tokens)
        outcome = Outcome()
        for t in plan.start:
            outcome.started[t.id] = self.fail.get(t.id, 20)
        stepped = [t for t in plan.step if not isinstance(outcome.started.get(t.id), BaseException)]
        for t in stepped:
            self.frames[t.id] = self.frames.get(t.id, 0) + 1
            outcome.frames[t.id] = FRAME
            if self.frames[t.id] >= self.lengths.get(t.id, 10**9):
                outcome.finished[t.id] = "eos"
        outcome.stepped = len(stepped)
        outcome.step_s = self.step_s(len(stepped))
        self.steps.append([t.id for t in stepped])
        events = self.scheduler.update(plan, outcome, now)
        self.events.extend(events)
        return plan, events

    def ends(self) -> dict:
        return {e.stream_id: e.error for e in self.events if isinstance(e, End)}

    def end_order(self) -> list:
        return [e.stream_id for e in self.events if isinstance(e, End)]


def started_order(model: PretendModel) -> list:
    seen = []
    for step in model.steps:
        for stream_id in step:
            if stream_id not in seen:
                seen.append(stream_id)
    return seen


# -- admission ---------------------------------------------------------------------------------------------

def test_waiting_streams_start_earliest_deadline_first():
    """When the row frees, the continuation whose listener runs dry soonest starts first, then the one with more
    audio left, then a new stream that said it can wait 5 s, whatever order they came in."""
    scheduler = make(rows=1)
    model = PretendModel(scheduler, lengths={1: 3, 2: 3, 3: 3, 4: 3})
    scheduler.add(ticket(1))
    model.run(0.0)
    scheduler.add(ticket(2, 0.01, deadline=Deadline(max_wait_s=5)))
    scheduler.add(ticket(3, 0.02, deadline=Deadline(lead_s=3, continuation=True)))
    scheduler.add(ticket(4, 0.03, deadline=Deadline(lead_s=2, continuation=True)))
    for index in range(1, 20):
        model.run(0.03 + index * STEP_S)
    assert model.end_order() == [1, 4, 3, 2]
    assert all(error is None for error in model.ends().values())


def test_a_new_stream_is_refused_at_once_with_an_honest_retry_hint():
    """With the only row busy for 2 s more, a new stream is refused in the first pass (not after waiting), and its
    hint says when the row frees plus a first audio: a retry then is served."""
    scheduler = make(rows=1)
    model = PretendModel(scheduler, lengths={1: 200})
    scheduler.add(ticket(1, characters=int((200 - 12) / 1.2)))  # expected: 200 frames
    model.run(0.0)
    scheduler.add(ticket(2, 0.0))
    plan, events = model.run(STEP_S)
    (refusal,) = [e.error for e in events if isinstance(e, End) and e.stream_id == 2]
    assert isinstance(refusal, Overloaded)
    hint_s = retry_after_ms(str(refusal)) / 1000
    assert hint_s == pytest.approx(198 * STEP_S + 2 * STEP_S, abs=0.02)  # its 198 frames left, then a first audio
    now = STEP_S
    while 1 not in model.ends():
        now += STEP_S
        model.run(now)
    scheduler.add(ticket(3, STEP_S + hint_s))
    model.run(STEP_S + hint_s)
    assert 3 in started_order(model) and 3 not in model.ends()


def test_clients_refused_one_after_another_are_told_to_come_back_at_different_times():
    """Each refusal for load names a later row than the one before it (the clients refused earlier come back
    first), so retries do not all come back together; once a client's time to come back has passed, it no longer
    counts."""
    scheduler = make(rows=1)
    model = PretendModel(scheduler)
    scheduler.add(ticket(1, characters=int((200 - 12) / 1.2)))  # expected: 200 frames, 2 s
    model.run(0.0)
    hints = []
    for stream_id in (2, 3, 4):
        scheduler.add(ticket(stream_id, STEP_S))
        _, events = model.run(STEP_S)
        hints += [retry_after_ms(str(e.error)) for e in events if isinstance(e, End)]
    assert hints[0] < hints[1] < hints[2], hints
    scheduler.add(ticket(5, 10.0))  # long after every one of them was due back
    _, events = model.run(10.0)
    (late,) = [retry_after_ms(str(e.error)) for e in events if isinstance(e, End)]
    assert abs(late - hints[0]) <= 50 and late < hints[1], (late, hints)


def test_continuations_are_never_refused_for_load():
    """A later sentence of a playing utterance waits for the busy row far past a new stream's hold, and starts
    when the row frees."""
    scheduler = make(rows=1, max_hold_s=0.2)
    model = PretendModel(scheduler, lengths={1: 150, 2: 2})
    scheduler.add(ticket(1))
    model.run(0.0)
    scheduler.add(ticket(2, 0.0, deadline=Deadline(lead_s=0.1, continuation=True)))
    for index in range(1, 160):
        model.run(index * STEP_S)
    assert model.ends() == {1: None, 2: None}


def busy_line(max_queued: int) -> Scheduler:
    """One row, taken; ``max_queued`` new streams that can wait fill the line."""
    scheduler = make(rows=1, max_queued=max_queued)
    scheduler.add(ticket(1))
    PretendModel(scheduler).run(0.0)
    for stream_id in range(2, 2 + max_queued):
        assert scheduler.add(ticket(stream_id, deadline=Deadline(max_wait_s=10))) == []
    return scheduler


def test_a_full_line_never_refuses_a_continuation():
    """With the line full of new streams, the next sentence of an utterance that is playing still gets in line."""
    scheduler = busy_line(max_queued=1)
    assert scheduler.add(ticket(9, deadline=Deadline(lead_s=2.0, continuation=True))) == []
    assert scheduler.waiting == 2


def test_new_streams_run_within_the_real_time_batch():
    """With a step costing 10 ms per stream and 1.5x real time asked of each, 5 streams run at once though 8
    rows are free; the others wait (they said they can) and start as those finish."""
    scheduler = make(rows=8, step_s=lambda batch: 0.010 * batch, speed=1.5)
    model = PretendModel(scheduler, lengths={i: 20 for i in range(8)}, step_s=lambda batch: 0.010 * batch)
    for index in range(8):
        scheduler.add(ticket(index, deadline=Deadline(max_wait_s=30)))
    for index in range(200):
        model.run(index * 0.05)
    assert max(len(step) for step in model.steps) == 5
    assert sorted(model.ends()) == list(range(8)) and all(e is None for e in model.ends().values())
    assert scheduler.stats.realtime_batch == 5


def test_rows_beyond_the_real_time_step_step_by_urgency():
    """When more rows are ready than a real-time step can carry (continuations let in past the real-time batch),
    the ones whose listeners need audio soonest step and the others wait."""
    scheduler = make(rows=4, step_s=lambda batch: 0.030 * batch, speed=1.0)  # a 2-row step: 60 ms < 80 ms
    model = PretendModel(scheduler, step_s=lambda batch: 0.030 * batch)
    for index, lead in enumerate((5.0, 0.1, 5.0, 0.2)):
        scheduler.add(ticket(index, deadline=Deadline(lead_s=lead, continuation=True)))
    plan, _ = model.run(10.0)  # every one of them is due
    assert len(plan.start) == 4 and sorted(t.id for t in plan.step) == [1, 3]
    assert scheduler.stats.skipped_rows == 2


def test_a_full_line_refuses_the_next_stream():
    """With max_queued streams already waiting, the next one ends Overloaded at once."""
    scheduler = busy_line(max_queued=2)
    (refusal,) = scheduler.add(ticket(9))
    assert isinstance(refusal.error, Overloaded) and "already waiting" in str(refusal.error)


def test_a_stream_that_waited_too_long_is_refused_and_never_started():
    """A stream still waiting after max_queue_wait_s ends Overloaded without a row."""
    scheduler = make(rows=1, max_queue_wait_s=0.3)
    model = PretendModel(scheduler)
    scheduler.add(ticket(1))
    model.run(0.0)
    scheduler.add(ticket(2, 0.0, deadline=Deadline(max_wait_s=10)))
    for index in range(1, 50):
        model.run(index * STEP_S)
    assert isinstance(model.ends()[2], Overloaded) and 2 not in started_order(model)


def test_running_streams_falling_behind_hold_new_streams_back():
    """While a running stream's listener is within half the pacing margin of running dry, nothing new starts."""
    scheduler = Scheduler(SchedulerConfig(rows=4))  # deadline pacing, 150 ms margin
    scheduler.costs.step.update({1: STEP_S})
    model = PretendModel(scheduler)
    scheduler.add(ticket(1, deadline=Deadline(lead_s=0.05, continuation=True)))
    model.run(0.0)
    scheduler.add(ticket(2, 0.0))
    plan, _ = model.run(0.12)  # its listener has 10 ms of its 130 ms left: the machine was stalled
    assert scheduler.stats.behind == 1 and not plan.start and scheduler.stats.held_back["behind"] == 1


def test_kv_memory_the_running_streams_will_need_holds_new_streams_back():
    """A new stream waits while the KV pool, less what the running streams will still take, cannot hold it."""
    scheduler = make(rows=4)
    model = PretendModel(scheduler)
    scheduler.add(ticket(1, characters=100))
    model.run(0.0, free_kv_tokens=10_000)
    scheduler.add(ticket(2, characters=100, deadline=Deadline(max_wait_s=10)))
    plan, _ = model.run(0.01, free_kv_tokens=200)
    assert not plan.start and scheduler.stats.held_back["memory"] == 1


def test_text_still_being_written_holds_no_place_and_its_budget_starts_when_it_can_start():
    """A stream whose text cannot start it yet waits outside the line (never refused for it); once its text is
    ready its first-audio budget counts from then."""
    scheduler = make(rows=1)
    model = PretendModel(scheduler)
    scheduler.add(ticket(1, 0.0, awaiting_text=True))
    for index in range(300):  # 3 s, far past any budget
        model.run(index * STEP_S)
    assert model.ends() == {} and scheduler.stats.waiting_text == 1
    scheduler.text_ready(1, 3.0)
    plan, _ = model.run(3.0)
    assert [t.id for t in plan.start] == [1]


# -- ends ----------------------------------------------------------------------------------------------------

def test_a_cancel_takes_a_running_stream_out_before_the_next_step():
    """Cancelled between two passes, a running stream is not stepped again: it ends at the next pass, Cancelled,
    with the frames it had."""
    scheduler = make(rows=2)
    model = PretendModel(scheduler)
    scheduler.add(ticket(1))
    scheduler.add(ticket(2))
    for index in range(3):
        model.run(index * STEP_S)
    assert scheduler.cancel(1)
    plan, events = model.run(3 * STEP_S)
    assert [t.id for t in plan.step] == [2]
    (end,) = [e for e in events if isinstance(e, End)]
    assert end.stream_id == 1 and isinstance(end.error, Cancelled) and model.frames[1] == 3


def test_a_stream_cancelled_while_waiting_never_starts():
    """A waiting stream that is cancelled leaves the line at the next pass, Cancelled, without a row."""
    scheduler = make(rows=1)
    model = PretendModel(scheduler)
    scheduler.add(ticket(1))
    model.run(0.0)
    scheduler.add(ticket(2, 0.0, deadline=Deadline(max_wait_s=10)))
    model.run(STEP_S)
    scheduler.cancel(2)
    model.run(2 * STEP_S)
    assert isinstance(model.ends()[2], Cancelled) and 2 not in started_order(model) and scheduler.waiting == 0


def test_every_stream_ends_exactly_once_whatever_happens():
    """A failed start, a cancel (sent twice), a refusal and a normal end each give one end event; a cancel after
    the end is ignored."""
    scheduler = make(rows=2, max_hold_s=0.0)
    model = PretendModel(scheduler, lengths={3: 2}, fail={1: InvalidRequest("bad prompt")})
    for stream_id in (1, 2, 3):
        scheduler.add(ticket(stream_id, deadline=Deadline(max_wait_s=10)))
    model.run(0.0)  # 1 fails to start, 2 runs
    model.run(STEP_S)  # 3 takes the freed row
    scheduler.add(ticket(4, STEP_S))  # both rows busy, no patience: refused
    model.run(2 * STEP_S)
    scheduler.cancel(2)
    scheduler.cancel(2)
    for index in range(3, 6):
        model.run(index * STEP_S)
    assert not scheduler.cancel(3)
    model.run(1.0)
    ends = [e.stream_id for e in model.events if isinstance(e, End)]
    assert sorted(ends) == [1, 2, 3, 4]
    errors = model.ends()
    assert isinstance(errors[1], InvalidRequest) and isinstance(errors[2], Cancelled) and errors[3] is None
    assert isinstance(errors[4], Overloaded)
    assert scheduler.stats.outcomes == {"rejected": 2, "cancelled": 1, "eos": 1}


def test_a_pass_that_fails_still_ends_every_stream_it_touched_exactly_once():
    """When a pass fails after the scheduler planned it (a bug in the step, or in the scheduler), the streams it was
    ending end as planned, the running ones with the failure, the waiting ones go on; nothing ends twice."""
    scheduler = make(rows=2)
    model = PretendModel(scheduler)
    for stream_id in (1, 2):
        scheduler.add(ticket(stream_id))
    model.run(0.0)
    for stream_id in (3, 4):
        scheduler.add(ticket(stream_id, deadline=Deadline(max_wait_s=10)))
    scheduler.cancel(1)
    plan = scheduler.schedule(STEP_S, 10**9)  # 1 leaves, 3 takes its row; then the step fails
    assert [t.id for t in plan.start] == [3]
    events = scheduler.fail(RuntimeError("boom"))
    ends = {e.stream_id: e.error for e in events if isinstance(e, End)}
    assert isinstance(ends[1], Cancelled) and isinstance(ends[2], RuntimeError) and isinstance(ends[3], RuntimeError)
    assert 4 not in ends and scheduler.waiting == 1
    assert scheduler.fail(RuntimeError("again")) == []


def test_the_last_chunk_says_it_is_last_and_the_end_follows():
    """A finished stream's held frames go out as its last chunk, then its end."""
    scheduler = Scheduler(SchedulerConfig(rows=1), FixedChunks((4,)))
    model = PretendModel(scheduler, lengths={1: 6})
    scheduler.add(ticket(1))
    for index in range(6):
        model.run(index * STEP_S)
    chunks = [(len(e.frames), e.last) for e in model.events if isinstance(e, Chunk)]
    assert chunks == [(4, False), (2, True)] and isinstance(model.events[-1], End)


# -- the speech length, one formula --------------------------------------------------------------------------

@pytest.mark.parametrize("characters", [0, 1, 5, 20, 100, 400, 2000, 5000])
def test_the_frame_cap_is_always_above_the_expected_length(characters):
    """The cap that stops runaway speech leaves room for the expected speech of every length (the estimates
    and the cap come from one module)."""
    cap = frame_cap(characters)
    assert cap == CAP_FRAMES_BASE + int(CAP_FRAMES_PER_CHAR * characters)
    assert expected_frames(characters) < cap - 1 and expected_frames(characters, cap) == expected_frames(characters)
