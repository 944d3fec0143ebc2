"""The engine loop on a stand-in talker: streams step together, every stream ends exactly once, a cancel stops its
row within one pass whoever sends it, and neither output nor Triton's cancellation ever holds up the step."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from engine_helpers import FakeRequest, FakeTalker
from triton_support.cancellation import CancellationWatcher
from tts_engine.errors import Cancelled, InvalidRequest
from tts_engine.serving.engine import Engine
from tts_engine.serving.pacing import FixedChunks
from tts_engine.serving.scheduler import SchedulerConfig
from tts_engine.serving.tickets import Deadline


class Recorder:
    """A sink that logs what it gets and releases ``done`` at the end; ``on_chunk`` runs on each chunk."""

    def __init__(self, name: str, log: list, done: threading.Semaphore, on_chunk=None):
        self.name, self.log, self.done, self.on_chunk = name, log, done, on_chunk
        self.error = None

    def chunk(self, codes, index, last):
        self.log.append((self.name, len(codes), last))
        if self.on_chunk is not None:
            self.on_chunk(index)

    def end(self, error, reason):
        self.error = error
        self.log.append((self.name, "end", type(error).__name__ if error else None))
        self.done.release()


def submit(engine: Engine, name: str, request: FakeRequest, log: list, done, deadline=Deadline(max_wait_s=10),
           **sink) -> tuple[int, Recorder]:
    stream_id, recorder = engine.new_id(), Recorder(name, log, done, **sink)
    engine.submit(stream_id, request, recorder, deadline, FixedChunks((2, 4)))
    return stream_id, recorder


def ends(log: list) -> dict:
    return {entry[0]: entry[2] for entry in log if entry[1] == "end"}


@pytest.fixture
def run():
    engines = []

    def start(talker: FakeTalker, **config) -> Engine:
        engine = Engine(talker, SchedulerConfig(rows=talker.rows, **config), name="test")
        engines.append(engine)
        return engine

    yield start
    for engine in engines:
        engine.stop()


def test_streams_step_together_so_short_ones_finish_first(run):
    """A short stream submitted with a long one ends long before it: every step advances both."""
    log, done, talker = [], threading.Semaphore(0), FakeTalker(rows=4)
    engine = run(talker)
    submit(engine, "long", FakeRequest(200), log, done)
    submit(engine, "short", FakeRequest(3), log, done)
    assert done.acquire(timeout=10) and done.acquire(timeout=10)
    assert [entry[0] for entry in log if entry[1] == "end"] == ["short", "long"]
    assert [e[1:] for e in log if e[0] == "short"] == [(2, False), (1, True), ("end", None)]
    assert max(talker.batches) == 2


def test_every_stream_ends_exactly_once_whatever_happens(run):
    """A failure at start and a cancellation each end only their own stream, once; the others complete."""
    log, done = [], threading.Semaphore(0)
    engine = run(FakeTalker(rows=4))
    submit(engine, "bad-start", FakeRequest(5, start_error=InvalidRequest("nope")), log, done)
    cancelled, _ = submit(engine, "cancel", FakeRequest(10**9), log, done)
    submit(engine, "fine", FakeRequest(5), log, done)
    time.sleep(0.2)
    engine.cancel(cancelled)
    engine.cancel(cancelled)
    for _ in range(3):
        assert done.acquire(timeout=10)
    assert not done.acquire(timeout=0.3)
    assert ends(log) == {"bad-start": "InvalidRequest", "cancel": "Cancelled", "fine": None}
    assert len([entry for entry in log if entry[1] == "end"]) == 3


def test_a_failing_step_ends_its_streams_and_the_loop_goes_on(run):
    """An exception inside a batched step ends every stream of that step with it; later streams still run."""
    log, done = [], threading.Semaphore(0)
    engine = run(FakeTalker(rows=4))
    submit(engine, "crash", FakeRequest(50, fail_at_frame=3), log, done)
    submit(engine, "neighbour", FakeRequest(50), log, done)
    assert done.acquire(timeout=10) and done.acquire(timeout=10)
    submit(engine, "after", FakeRequest(5), log, done)
    assert done.acquire(timeout=10)
    assert ends(log) == {"crash": "RuntimeError", "neighbour": "RuntimeError", "after": None}


def test_the_loop_and_the_decode_worker_run_with_their_configured_torch_threads(run):
    """The engine's loop and codec_decoder's worker set torch's thread count in their own threads, leaving the
    caller's setting alone (3 and 5: counts nothing else uses)."""
    from triton_support.queueing import BatchingWorker

    before, seen, done = torch.get_num_threads(), [], threading.Semaphore(0)
    talker = FakeTalker(rows=1)
    talker.on_step = lambda streams: seen.append(torch.get_num_threads())
    engine = Engine(talker, name="threads", torch_threads=3)
    try:
        submit(engine, "one", FakeRequest(1), [], done)
        assert done.acquire(timeout=10)
    finally:
        engine.stop()
    worker = BatchingWorker(lambda batch: (seen.append(torch.get_num_threads()), done.release()),
                            lambda batch, error: None, max_batch=4, name="test",
                            on_start=lambda: torch.set_num_threads(5))
    try:
        worker.put("request")
        assert done.acquire(timeout=10)
    finally:
        worker.stop()
    assert seen == [3, 5] and torch.get_num_threads() == before


def test_a_cancel_that_comes_before_its_stream_ends_it_at_once(run):
    """A cancel may overtake its stream (Triton's cancellation seen before the submit is taken): the stream then
    ends cancelled as soon as it comes, without a frame."""
    log, done, talker = [], threading.Semaphore(0), FakeTalker(rows=2)
    engine = run(talker)
    stream_id = engine.new_id()
    engine.cancel(stream_id)
    time.sleep(0.1)  # taken by the loop before the stream exists
    engine.submit(stream_id, FakeRequest(10**6), Recorder("early", log, done), Deadline(max_wait_s=10))
    assert done.acquire(timeout=10)
    assert log == [("early", "end", "Cancelled")] and sum(talker.batches) == 0


class _Request:
    """A Triton request as the cancellation watcher sees it."""

    def __init__(self, cancelled=lambda: False):
        self.cancelled = cancelled

    def is_cancelled(self) -> bool:
        return self.cancelled()


@pytest.mark.parametrize("sender", ["engine command", "Triton client", "failing consumer"])
def test_a_cancel_stops_its_row_within_one_pass_whoever_sends_it(run, sender):
    """Whoever cancels (a `cancel` command, as the decoder sends; the client, through Triton's cancellation; a
    consumer whose response failed), the cancel reaches the scheduler as one command by id, the row is not
    stepped again after it arrived, and the stream ends once, with the cancel's reason."""
    log, done = [], threading.Semaphore(0)
    talker = FakeTalker(rows=2, step_s=0.002)
    engine = run(talker)
    frames_at_cancel = []
    cancel = engine.scheduler.cancel

    def arrived(stream_id, error=None):  # on the stepping thread, at the top of a pass
        frames_at_cancel.append(talker.streams[0].frames)
        return cancel(stream_id, error)

    engine.scheduler.cancel = arrived
    watcher = CancellationWatcher(engine.cancel, interval_s=0.01)
    client_cancelled = threading.Event()
    try:
        def on_chunk(index):
            if index == 2:
                if sender == "failing consumer":
                    raise ConnectionError("the client is gone")
                client_cancelled.set()

        stream_id, recorder = submit(engine, "doomed", FakeRequest(10**6), log, done, on_chunk=on_chunk)
        if sender == "engine command":
            talker.on_step = lambda streams: streams[0].frames == 20 and engine.cancel(stream_id)
        elif sender == "Triton client":
            watcher.watch(stream_id, _Request(client_cancelled.is_set))
        assert done.acquire(timeout=10)
    finally:
        watcher.stop()
    assert len(frames_at_cancel) == 1, "one cancel command reached the scheduler"
    assert talker.streams[0].frames == frames_at_cancel[0], "the row stepped after its cancel arrived"
    expected = ConnectionError if sender == "failing consumer" else Cancelled
    assert isinstance(recorder.error, expected) and not talker.active
    assert [entry for entry in log if entry[1] == "end"] == [("doomed", "end", expected.__name__)]


def test_a_parent_that_hangs_in_is_cancelled_never_holds_up_the_loop(run):
    """While the watcher is stuck asking Triton about one stream, the loop steps and ends every stream, that one
    too; its final response waits until the call returns and is then sent, once."""
    log, done, talker = [], threading.Semaphore(0), FakeTalker(rows=4)
    engine = run(talker)
    asking, hang = threading.Event(), threading.Event()

    def stuck():
        asking.set()
        hang.wait(30)
        return False

    watcher = CancellationWatcher(engine.cancel, interval_s=0.01)
    finals = []
    try:
        hung_id = engine.new_id()
        watcher.watch(hung_id, _Request(stuck))
        assert asking.wait(5)

        class Final(Recorder):
            def end(self, error, reason):
                watcher.release(hung_id, lambda: finals.append(time.monotonic()))
                super().end(error, reason)

        engine.submit(hung_id, FakeRequest(30), Final("hung", log, done), Deadline(max_wait_s=10))
        submit(engine, "other", FakeRequest(30), log, done)
        assert done.acquire(timeout=10) and done.acquire(timeout=10)
        assert ends(log) == {"hung": None, "other": None} and not finals
        hang.set()
        deadline = time.monotonic() + 5
        while not finals and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(finals) == 1
    finally:
        hang.set()
        watcher.stop()


def test_a_slow_consumer_never_slows_the_step(run):
    """Output leaves the stepping thread: with the only sink blocked on its first chunk, the loop still steps the
    stream to its end; the chunks then arrive, in order."""
    log, done, talker = [], threading.Semaphore(0), FakeTalker(rows=1)
    engine = run(talker)
    blocked = threading.Event()
    submit(engine, "slow", FakeRequest(40), log, done, on_chunk=lambda index: index == 0 and blocked.wait(10))
    deadline = time.monotonic() + 10
    while sum(talker.batches) < 40 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sum(talker.batches) == 40 and len(log) <= 1
    blocked.set()
    assert done.acquire(timeout=10)
    sizes = [entry[1] for entry in log if entry[1] != "end"]
    assert sum(sizes) == 40 and log[-1] == ("slow", "end", None)
