"""Real-time delivery: chunks paced by each listener's deadline, what a listener hears, and the measurements
admission relies on (pure logic, then the serving loop with a slowed step)."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from tts_contract.audio import FRAME_SECONDS
from tts_contract.deadlines import retry_after_ms, with_retry_after
from tts_contract.listener import Listener
from tts_engine.errors import InvalidRequest
from tts_engine.serving.costs import CostCurve, place_free_times, realtime_batch
from tts_engine.serving.pacing import DeadlinePacing, FixedChunks, Pacer, most_urgent
from tts_engine.serving.tickets import Deadline

FRAME = torch.zeros(16, dtype=torch.long)


def feed(pacer: Pacer, frames: int, now: float, step_s: float = 0.02, deliver_s: float = 0.01) -> list[int]:
    """Give the pacer ``frames`` frames, one per step of ``step_s`` from ``now``: the sizes of the chunks it sent."""
    sizes = []
    for index in range(frames):
        chunk = pacer.add(FRAME, False, now + index * step_s, step_s, deliver_s)
        if chunk is not None:
            sizes.append(len(chunk))
    return sizes


# -- pacing -------------------------------------------------------------------------------------------------

def test_the_first_chunk_lasts_past_the_next_step_with_the_margin():
    """The first chunk is the smallest ladder size that covers margin + next step + decode: 4 frames for a 150 ms
    margin, 1 frame when the margin is small."""
    assert feed(Pacer.start(DeadlinePacing(margin_s=0.15), 0.0), 4, 0.0)[:1] == [4]
    assert feed(Pacer.start(DeadlinePacing(margin_s=0.04), 0.0), 1, 0.0) == [1]


def test_frames_are_held_while_the_listener_has_audio_and_sent_before_it_runs_low():
    """After the first chunk, frames wait while the lead is large; a chunk goes out once holding one more step
    would leave the listener less than the margin, sized by the ladder."""
    pacer = Pacer.start(DeadlinePacing(margin_s=0.15), 0.0)
    for _ in range(4):
        chunk = pacer.add(FRAME, False, 0.0, 0.02, 0.01)
    assert len(chunk) == 4 and pacer.lead(0.0) == pytest.approx(0.32)
    assert pacer.add(FRAME, False, 0.05, 0.02, 0.01) is None  # lead 0.27: 0.27 - 0.03 >= 0.15
    assert pacer.add(FRAME, False, 0.10, 0.02, 0.01) is None  # lead 0.22 - 0.03 = 0.19
    chunk = pacer.add(FRAME, False, 0.15, 0.02, 0.01)  # 0.17 - 0.03 = 0.14 < 0.15: due; of 3 held, 2 go
    assert len(chunk) == 2 and len(pacer.pending) == 1 and pacer.listener.audio_s == pytest.approx(6 * FRAME_SECONDS)


def test_a_fast_stream_grows_its_chunks_up_to_the_largest():
    """A stream far faster than real time sends ever larger chunks, none larger than the largest size."""
    sizes = feed(Pacer.start(DeadlinePacing(margin_s=0.15, max_chunk_frames=16), 0.0), 200, 0.0, step_s=0.01)
    assert sizes[0] == 4 and max(sizes) == 16 and sizes[-3:] == [16, 16, 16]
    assert all(size in (1, 2, 4, 8, 16) for size in sizes)


def test_a_stream_barely_faster_than_real_time_sends_small_chunks_and_never_runs_dry():
    """At 1.1x real time the lead stays thin: chunks stay small and the listener never runs dry."""
    pacer = Pacer.start(DeadlinePacing(margin_s=0.15), 0.0)
    sizes = feed(pacer, 60, 0.0, step_s=0.072)
    assert sizes[0] == 4 and max(sizes) <= 4 and pacer.listener.underruns == 0


def test_a_continuation_holds_its_frames_until_its_listener_needs_them():
    """A continuation whose listener still has 2 s of audio sends nothing while that lasts (up to the largest
    chunk), then paces like any stream."""
    pacer = Pacer.start(DeadlinePacing(margin_s=0.15, max_chunk_frames=16), 10.0, lead_s=2.0)
    assert pacer.lead(10.0) == pytest.approx(2.0)
    assert feed(pacer, 10, 10.0, step_s=0.02) == []
    assert pacer.add(FRAME, False, 11.85, 0.02, 0.01) is not None  # 2.0 - 1.85 - 0.03 < 0.15


def test_a_late_chunk_counts_an_underrun_and_restarts_the_listener():
    """A chunk sent after the listener ran dry counts once, with the stall, and playback restarts from it."""
    pacer = Pacer.start(FixedChunks((1,)), 0.0)
    pacer.add(FRAME, False, 0.0)
    pacer.add(FRAME, False, 0.05)
    assert pacer.listener.underruns == 0 and pacer.lead(0.05) == pytest.approx(0.11)
    pacer.add(FRAME, False, 0.46)  # the listener ran dry at 0.16
    listener = pacer.listener
    assert listener.underruns == 1 and listener.last_stall == pytest.approx(0.30) and pacer.lead(0.46) == pytest.approx(0.08)


def test_fixed_chunks_ignore_the_deadline():
    """FixedChunks sends the scheduled sizes whatever the listener has (tests use it for repeatable chunks)."""
    assert feed(Pacer.start(FixedChunks((2, 4)), 0.0), 12, 0.0) == [2, 4, 4]


def test_streams_closest_to_their_deadlines_come_first():
    """Playing streams rank by their lead, new ones by the time left of their first-audio budget."""
    playing_low, playing_high = Pacer.start(FixedChunks((1,)), 0.0), Pacer.start(FixedChunks((1,)), 0.0)
    for pacer, frames in ((playing_low, 1), (playing_high, 10)):
        for _ in range(frames):
            pacer.add(FRAME, False, 0.0)
    new = Pacer.start(FixedChunks((1,)), 0.0, budget_s=0.5)
    assert most_urgent([playing_high, new, playing_low], 0.0, 2) == [2, 1]


# -- what a listener hears -------------------------------------------------------------------------------------

def test_a_listener_counts_each_time_its_buffer_runs_dry():
    """Playback starts with the first audio and runs at real time; audio after the buffer ran out is a stall."""
    clock = Listener()
    assert clock.add(0.5, 10.0) == 0.0 and clock.add(0.5, 10.4) == 0.0
    assert clock.lead(10.5) == pytest.approx(0.5)
    assert clock.add(0.2, 11.3) == pytest.approx(0.3)
    assert clock.underruns == 1 and clock.stalled_s == pytest.approx(0.3) and clock.playing_until == pytest.approx(11.5)


def test_a_gap_while_the_text_is_still_being_written_is_not_a_stall():
    """A dry buffer while the next text was not written yet is the writer's gap, not an underrun; once the text
    came, a late chunk is a stall again."""
    clock = Listener()
    clock.add(0.5, 0.0)
    clock.pause(0.2)
    clock.resume(1.0)
    assert clock.add(0.5, 1.2) == 0.0 and clock.underruns == 0
    assert clock.add(0.5, 2.0) == pytest.approx(0.3) and clock.underruns == 1


# -- measurements admission relies on ---------------------------------------------------------------------------

def test_step_times_are_monotone_interpolated_and_robust_to_one_slow_step():
    """Baselines are interpolated and never decrease with the batch; recent runs replace a baseline only once
    there are enough of them, so one cold step does not count."""
    curve = CostCurve(min_runs=3, refresh_s=0)
    curve.update({1: 0.010, 4: 0.016, 8: 0.014})
    assert curve(2) == pytest.approx(0.012) and curve(8) == pytest.approx(0.016)
    assert curve(16) == pytest.approx(0.032)  # beyond the largest known: in proportion
    curve.observe(1, 0.5)
    assert curve(1) == pytest.approx(0.010)
    for _ in range(3):
        curve.observe(1, 0.02)
    assert curve(1) == pytest.approx(0.02)


def test_sizes_not_running_follow_the_machines_contention_and_old_runs_expire():
    """A size without recent runs costs its baseline scaled by how much slower the recent runs are than theirs;
    runs older than max_age_s no longer count."""
    curve = CostCurve(min_runs=1, max_age_s=0.05, refresh_s=0)
    curve.update({1: 0.010, 4: 0.020})
    curve.observe(4, 0.080)
    assert curve(4) == pytest.approx(0.080) and curve(1) == pytest.approx(0.040)  # 4x slower than idle
    time.sleep(0.1)
    curve.observe(1, 0.020)
    assert curve(1) == pytest.approx(0.020) and curve(4) == pytest.approx(0.040)  # now 2x: the 4s expired


def test_the_real_time_batch_is_the_largest_whose_step_keeps_the_speed():
    """With steps of 10 ms per stream, 1.5x real time allows 5 streams (53 ms), 1x allows 8 (80 ms)."""
    curve = CostCurve()
    curve.update({1: 0.010, 8: 0.080, 16: 0.160})
    assert realtime_batch(curve, 1.5, 16) == 5 and realtime_batch(curve, 1.0, 16) == 8
    assert realtime_batch(CostCurve(), 1.5, 16) == 16  # nothing measured: the slots


def test_places_free_as_running_streams_finish():
    """Free places first, then one as each running stream is expected to finish."""
    assert place_free_times([0.9, 0.3, 2.0], free_now=1, count=3) == [0.0, 0.3, 0.9]


def test_deadline_parameters_are_validated_and_refusals_carry_their_retry_hint():
    """Deadline parameters parse from request parameters (bad ones are named); a refusal says when to retry."""
    deadline = Deadline.from_mapping({"lead_ms": 1500, "continuation": "true", "max_wait_ms": 2000})
    assert deadline == Deadline(lead_s=1.5, continuation=True, max_wait_s=2.0)
    with pytest.raises(InvalidRequest, match="lead_ms"):
        Deadline.from_mapping({"lead_ms": -1})
    with pytest.raises(InvalidRequest, match="continuation"):
        Deadline.from_mapping({"continuation": 2})
    assert retry_after_ms(with_retry_after("[OVERLOADED] busy", 1234)) == 1234
    assert retry_after_ms("[OVERLOADED] busy") is None


# -- the serving loop ------------------------------------------------------------------------------------------

def test_deadline_pacing_keeps_a_slow_stream_ahead_of_its_listener(loaded, xvector_prompt):
    """With every step slowed to 60 ms (a stream at 1.3x real time), a listener that plays each chunk from its
    arrival never runs dry: chunks go out as soon as the listener needs them (a fixed 2, 4, 8, 16 schedule needs
    2x real time and runs dry after its first chunks)."""
    from tts_engine.generation.prompt import SynthesisRequest
    from tts_engine.generation.sampling import SamplingParams
    from tts_engine.generation.talker import BatchedTalker
    from tts_engine.serving.engine import Engine

    talker = BatchedTalker(loaded.tts, rows=2, max_tokens=1024)
    step = talker.step

    def slow_step(streams=None):
        started = time.perf_counter()
        results = step(streams)
        time.sleep(max(0.0, 0.060 - (time.perf_counter() - started)))
        return results

    talker.step = slow_step
    engine = Engine(talker)
    listener, done = Listener(), threading.Event()

    class Playing:
        def chunk(self, codes, index, last):
            listener.add(len(codes) * FRAME_SECONDS)

        def end(self, error, reason):
            done.set()

    request = SynthesisRequest("A slow stream must still play without a gap.", xvector_prompt, "English",
                               SamplingParams(greedy=True, max_new_tokens=41))
    try:
        engine.submit(engine.new_id(), request, Playing(), Deadline(max_wait_s=30))
        assert done.wait(60)
    finally:
        engine.stop()
    assert listener.audio_s == pytest.approx(40 * FRAME_SECONDS)
    assert listener.underruns == 0, f"the listener ran dry: {listener.stalls}"
