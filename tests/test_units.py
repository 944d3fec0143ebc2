"""Pure-logic units: the voice store, the stream scheduler, the decoder stream table, the render tool."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import SAMPLE_RATE, synthetic_reference
from tools.render_model_repository import RenderError, render, resolve
from tts_engine.codec.streams import StreamTable
from tts_engine.errors import InvalidRequest, Overloaded, VoiceNotFound
from tts_engine.generation.admission import Delivery
from tts_engine.generation.pacing import FixedChunks
from tts_engine.generation.sampling import SamplingParams
from tts_engine.generation.scheduler import StreamJob, StreamScheduler
from tts_engine.voices.prompts import VoicePrompt
from tts_engine.voices.store import VoiceStore, checked_voice_id


# -- voices -----------------------------------------------------------------------------------------------

def _fake_builder(calls):
    def build(audio, sample_rate, ref_text):
        calls.append((len(audio), sample_rate, ref_text))
        code = None if ref_text is None else torch.zeros((3, 16), dtype=torch.long)
        return VoicePrompt(spk_embedding=torch.full((8,), float(len(calls))), ref_code=code, ref_text=ref_text)
    return build


def _add_voice(root, voice_id, transcript=None, meta=None, seconds=3.0):
    folder = root / voice_id
    folder.mkdir(parents=True)
    sf.write(folder / "reference.wav", synthetic_reference(seconds=seconds), SAMPLE_RATE)
    if transcript is not None:
        (folder / "transcript.txt").write_text(transcript)
    if meta is not None:
        import json
        (folder / "metadata.json").write_text(json.dumps(meta))
    return folder


@pytest.mark.parametrize("voice_id", ["../etc", "a/b", "", "UPPER", "x" * 65, "dot.dot", "spa ce"])
def test_voice_ids_outside_the_pattern_are_refused(voice_id):
    """Ids that are not [a-z0-9_-]{1,64} are refused before any path is built."""
    with pytest.raises(InvalidRequest):
        checked_voice_id(voice_id)


def test_voice_prompt_is_computed_once_then_served_from_cache(tmp_path):
    """The first lookup computes and writes the prompt; later ones (even a new store) read it back."""
    _add_voice(tmp_path, "alice", transcript="Hello.", meta={"isDefault": True})
    calls = []
    store = VoiceStore(tmp_path, _fake_builder(calls), fingerprint="m1")
    assert store.get_prompt("alice")[1].ref_text == "Hello."
    store.get_prompt("alice")
    VoiceStore(tmp_path, _fake_builder(calls), fingerprint="m1").get_prompt(None)
    assert len(calls) == 1 and (tmp_path / "alice" / "prompt.safetensors").is_file()


def test_voice_prompt_is_recomputed_when_transcript_or_model_changes(tmp_path):
    """Changing the transcript or the model fingerprint invalidates the cached prompt."""
    folder = _add_voice(tmp_path, "bob", transcript="One.")
    calls = []
    VoiceStore(tmp_path, _fake_builder(calls), fingerprint="m1").get_prompt("bob")
    (folder / "transcript.txt").write_text("Two.")
    assert VoiceStore(tmp_path, _fake_builder(calls), fingerprint="m1").get_prompt("bob")[1].ref_text == "Two."
    VoiceStore(tmp_path, _fake_builder(calls), fingerprint="m2").get_prompt("bob")
    assert len(calls) == 3


def test_voice_without_transcript_is_x_vector_only(tmp_path):
    """No transcript.txt means an x-vector-only prompt."""
    _add_voice(tmp_path, "carol")
    calls = []
    _, prompt = VoiceStore(tmp_path, _fake_builder(calls)).get_prompt("carol")
    assert prompt.x_vector_only and calls[0][2] is None


def test_voice_listing_skips_empty_slots_and_marks_the_default(tmp_path):
    """Folders without reference.wav (like the makima slot) are not listed; isDefault is reported."""
    _add_voice(tmp_path, "dora", meta={"name": "Dora", "language": "German", "isDefault": True})
    _add_voice(tmp_path, "erin")
    (tmp_path / "makima").mkdir()
    voices = VoiceStore(tmp_path).list()
    assert [(v.id, v.name, v.is_default) for v in voices] == [("dora", "Dora", True), ("erin", "erin", False)]
    with pytest.raises(VoiceNotFound):
        VoiceStore(tmp_path).get_prompt("makima")


def test_unknown_voice_raises_voice_not_found(tmp_path):
    """A well-formed id with no folder raises VoiceNotFound."""
    with pytest.raises(VoiceNotFound):
        VoiceStore(tmp_path, _fake_builder([])).get_prompt("nobody")


# -- scheduler ---------------------------------------------------------------------------------------------

@dataclass(eq=False)
class _FakeStream:
    request: "_FakeRequest"
    length: int = 1
    frames: int = 0
    finished: bool = False
    finish_reason: str = None
    text_open: bool = False

    @property
    def params(self):
        return self.request.params

    def text_ready(self) -> bool:
        return True


@dataclass
class _FakeRequest:
    frames: int
    fail_at_frame: int = None  # the whole batched step fails when this stream reaches that frame
    start_error: Exception = None
    text: str = "fake"
    prompt: object = field(default_factory=lambda: SimpleNamespace(ref_code=None))
    feed: object = None

    @property
    def params(self):
        return SamplingParams(max_new_tokens=self.frames + 1)


class _FakeTalker:
    """Stands in for BatchedTalker: each stream yields ``frames`` zero frames; records what it was asked."""

    def __init__(self, slots):
        self.slots, self.active, self.added, self.batches = slots, [], [], []

    def __len__(self):
        return len(self.active)

    def ready_to_start(self, request) -> bool:
        return True

    def add(self, request):
        self.added.append(request)
        if request.start_error:
            raise request.start_error
        stream = _FakeStream(request)
        self.active.append(stream)
        return stream

    def add_many(self, requests):
        results = []
        for request in requests:
            try:
                results.append(self.add(request))
            except Exception as exc:
                results.append(exc)
        return results

    def free_tokens(self):
        return 10**9

    def remove(self, stream):
        self.active.remove(stream)

    def step(self, streams=None):
        streams = self.active if streams is None else streams
        self.batches.append(len(streams))
        results = []
        for stream in streams:
            if stream.request.fail_at_frame == stream.frames:
                raise RuntimeError("boom")
            stream.frames += 1
            if stream.frames == stream.request.frames:
                stream.finished, stream.finish_reason = True, "eos"
            results.append((stream, torch.zeros(16, dtype=torch.long)))
        return results


def _job(name, request, log, done, cancelled=lambda: False, delivery=None, errors=None):
    def on_end(error, job):
        log.append((name, "end", type(error).__name__ if error else None))
        if errors is not None and error is not None:
            errors[name] = error
        done.release()

    return StreamJob(request=request, on_chunk=lambda chunk, i, last: log.append((name, len(chunk), last)),
                     on_end=on_end, is_cancelled=cancelled, policy=FixedChunks((2, 4)), label=name,
                     delivery=delivery or Delivery())


def _ends(log):
    return [entry[0] for entry in log if entry[1] == "end"]


def test_scheduler_steps_streams_together_so_short_ones_finish_first():
    """A short job submitted with a long one ends long before it: every step advances both."""
    log, done, talker = [], threading.Semaphore(0), _FakeTalker(slots=4)
    scheduler = StreamScheduler(talker)
    try:
        scheduler.submit(_job("long", _FakeRequest(200), log, done))
        scheduler.submit(_job("short", _FakeRequest(3), log, done))
        assert done.acquire(timeout=10) and done.acquire(timeout=10)
    finally:
        scheduler.stop()
    assert _ends(log) == ["short", "long"]
    assert [e[1:] for e in log if e[0] == "short"] == [(2, False), (1, True), ("end", None)]
    assert max(talker.batches) == 2


def test_scheduler_ends_each_job_exactly_once_whatever_happens():
    """A failure at start and a cancellation each end only their own job, once; the others complete."""
    log, done = [], threading.Semaphore(0)
    flag = threading.Event()
    scheduler = StreamScheduler(_FakeTalker(slots=4), cancel_check_interval_s=0)
    try:
        scheduler.submit(_job("bad-start", _FakeRequest(5, start_error=InvalidRequest("nope")), log, done))
        scheduler.submit(_job("cancel", _FakeRequest(10**9), log, done, cancelled=flag.is_set))
        scheduler.submit(_job("fine", _FakeRequest(5), log, done))
        time.sleep(0.2)
        flag.set()
        for _ in range(3):
            assert done.acquire(timeout=10)
    finally:
        scheduler.stop()
    ends = {entry[0]: entry[2] for entry in log if entry[1] == "end"}
    assert ends == {"bad-start": "InvalidRequest", "cancel": "Cancelled", "fine": None}
    assert len(_ends(log)) == 3


def test_a_failing_step_ends_its_streams_and_the_loop_goes_on():
    """An exception inside a batched step ends every stream of that step with it; later jobs still run."""
    log, done = [], threading.Semaphore(0)
    scheduler = StreamScheduler(_FakeTalker(slots=4))
    try:
        scheduler.submit(_job("crash", _FakeRequest(50, fail_at_frame=3), log, done))
        scheduler.submit(_job("neighbour", _FakeRequest(50), log, done))
        assert done.acquire(timeout=10) and done.acquire(timeout=10)
        scheduler.submit(_job("after", _FakeRequest(5), log, done))
        assert done.acquire(timeout=10)
    finally:
        scheduler.stop()
    ends = {entry[0]: entry[2] for entry in log if entry[1] == "end"}
    assert ends == {"crash": "RuntimeError", "neighbour": "RuntimeError", "after": None}


def test_the_serving_loop_and_the_decode_worker_run_with_their_configured_torch_threads():
    """The talker's loop and codec_decoder's worker set torch's thread count in their own threads, leaving the
    caller's setting alone (3 and 5: counts nothing else uses)."""
    from triton_support.queueing import BatchingWorker

    before, seen, done = torch.get_num_threads(), [], threading.Semaphore(0)
    talker = _FakeTalker(slots=1)
    step = talker.step
    talker.step = lambda streams=None: (seen.append(torch.get_num_threads()), step(streams))[1]
    scheduler = StreamScheduler(talker, torch_threads=3)
    try:
        scheduler.submit(_job("one", _FakeRequest(1), [], done))
        assert done.acquire(timeout=10)
    finally:
        scheduler.stop()
    worker = BatchingWorker(lambda batch: (seen.append(torch.get_num_threads()), done.release()),
                            lambda batch, error: None, max_batch=4, name="test",
                            on_start=lambda: torch.set_num_threads(5))
    try:
        worker.put("request")
        assert done.acquire(timeout=10)
    finally:
        worker.stop()
    assert seen == [3, 5] and torch.get_num_threads() == before


def test_scheduler_limits_active_streams():
    """Beyond the talker's slots, jobs wait in line and start as others finish."""
    log, done, talker = [], threading.Semaphore(0), _FakeTalker(slots=1)
    scheduler = StreamScheduler(talker)
    try:
        for name in ("a", "b", "c"):
            scheduler.submit(_job(name, _FakeRequest(4), log, done))
        for _ in range(3):
            assert done.acquire(timeout=10)
    finally:
        scheduler.stop()
    assert _ends(log) == ["a", "b", "c"]
    assert [e[0] for e in log][:3] == ["a", "a", "a"]  # a ran alone until its end
    assert max(talker.batches) == 1


def test_a_full_waiting_line_is_refused_with_overloaded():
    """With every slot busy and max_queued jobs waiting, the next submit raises Overloaded at once."""
    log, done = [], threading.Semaphore(0)
    scheduler = StreamScheduler(_FakeTalker(slots=1), max_queued=2)
    try:
        scheduler.submit(_job("running", _FakeRequest(10**9), log, done, cancelled=lambda: len(log) > 50))
        time.sleep(0.2)
        scheduler.submit(_job("w1", _FakeRequest(2), log, done))
        scheduler.submit(_job("w2", _FakeRequest(2), log, done))
        with pytest.raises(Overloaded):
            scheduler.submit(_job("w3", _FakeRequest(2), log, done))
        for _ in range(3):
            assert done.acquire(timeout=10)
    finally:
        scheduler.stop()
    assert sorted(_ends(log)) == ["running", "w1", "w2"]


def test_a_job_that_waited_too_long_is_refused_and_never_started():
    """A job still waiting after max_queue_wait_s ends with Overloaded without reaching the talker."""
    log, done, talker = [], threading.Semaphore(0), _FakeTalker(slots=1)
    scheduler = StreamScheduler(talker, max_queue_wait_s=0.3)
    try:
        until = time.monotonic() + 0.8
        scheduler.submit(_job("running", _FakeRequest(10**9), log, done, cancelled=lambda: time.monotonic() > until))
        late = _FakeRequest(2)
        scheduler.submit(_job("late", late, log, done))
        assert done.acquire(timeout=10) and done.acquire(timeout=10)
    finally:
        scheduler.stop()
    assert ("late", "end", "Overloaded") in log and late not in talker.added


def test_a_job_cancelled_while_waiting_never_starts():
    """A job cancelled before a slot frees up ends Cancelled and never reaches the talker."""
    log, done, talker = [], threading.Semaphore(0), _FakeTalker(slots=1)
    gone = threading.Event()
    scheduler = StreamScheduler(talker)
    try:
        scheduler.submit(_job("running", _FakeRequest(200), log, done))
        waiting = _FakeRequest(2)
        scheduler.submit(_job("waiting", waiting, log, done, cancelled=gone.is_set))
        gone.set()
        assert done.acquire(timeout=10) and done.acquire(timeout=10)
    finally:
        scheduler.stop()
    assert ("waiting", "end", "Cancelled") in log and waiting not in talker.added


def test_waiting_jobs_leave_the_line_while_every_row_stays_busy():
    """With the only row busy for good, a waiting job that is cancelled and one that waits past
    max_queue_wait_s both end at once, not when a row frees up."""
    log, done, talker = [], threading.Semaphore(0), _FakeTalker(slots=1)
    running_cancelled, gone = threading.Event(), threading.Event()
    scheduler = StreamScheduler(talker, max_queue_wait_s=0.5)
    try:
        scheduler.submit(_job("running", _FakeRequest(10**9), log, done, cancelled=running_cancelled.is_set))
        scheduler.submit(_job("cancelled", _FakeRequest(2), log, done, cancelled=gone.is_set))
        scheduler.submit(_job("expired", _FakeRequest(2), log, done))
        gone.set()
        assert done.acquire(timeout=10) and done.acquire(timeout=10)
        assert "running" not in _ends(log)
    finally:
        running_cancelled.set()
        done.acquire(timeout=10)
        scheduler.stop()
    ends = {entry[0]: entry[2] for entry in log if entry[1] == "end"}
    assert ends["cancelled"] == "Cancelled" and ends["expired"] == "Overloaded"
    assert len(talker.added) == 1


def test_a_new_request_that_cannot_start_in_time_is_refused_at_once_with_a_retry_hint():
    """With the only row busy for good, a new request is refused within its short hold (not after the queue's
    patience), with when to retry in its message; the running stream goes on."""
    from tts_contract.delivery import retry_after_ms

    log, done, errors = [], threading.Semaphore(0), {}
    stop = threading.Event()
    scheduler = StreamScheduler(_FakeTalker(slots=1), max_queue_wait_s=30, max_hold_s=0.3)
    try:
        scheduler.submit(_job("running", _FakeRequest(10**9), log, done, cancelled=stop.is_set))
        time.sleep(0.1)
        submitted = time.monotonic()
        scheduler.submit(_job("new", _FakeRequest(2), log, done, errors=errors))
        assert done.acquire(timeout=5)
        assert time.monotonic() - submitted < 0.6
        assert isinstance(errors["new"], Overloaded) and retry_after_ms(str(errors["new"])) >= 100
        assert "running" not in _ends(log)
    finally:
        stop.set()
        done.acquire(timeout=5)
        scheduler.stop()


def test_waiting_requests_start_earliest_deadline_first():
    """When the row frees, the continuation whose listener runs dry soonest starts first, then the one with
    more audio left, then a new request that said it can wait 5 s."""
    log, done, talker = [], threading.Semaphore(0), _FakeTalker(slots=1)
    stop = threading.Event()
    scheduler = StreamScheduler(talker)
    try:
        scheduler.submit(_job("running", _FakeRequest(10**9), log, done, cancelled=stop.is_set))
        time.sleep(0.1)
        for name, delivery in (("patient", Delivery(max_wait_s=5)), ("relaxed", Delivery(lead_s=3, continuation=True)),
                               ("urgent", Delivery(lead_s=2, continuation=True))):
            scheduler.submit(_job(name, _FakeRequest(2), log, done, delivery=delivery))
        time.sleep(0.2)
        stop.set()
        for _ in range(4):
            assert done.acquire(timeout=10)
    finally:
        scheduler.stop()
    assert _ends(log) == ["running", "urgent", "relaxed", "patient"]


def test_continuations_are_never_refused_for_load():
    """A later sentence of a playing utterance waits for the busy row well past a new request's hold, and
    starts when it frees."""
    log, done = [], threading.Semaphore(0)
    until = time.monotonic() + 1.0
    scheduler = StreamScheduler(_FakeTalker(slots=1), max_hold_s=0.2)
    try:
        scheduler.submit(_job("running", _FakeRequest(10**9), log, done, cancelled=lambda: time.monotonic() > until))
        scheduler.submit(_job("next sentence", _FakeRequest(2), log, done,
                              delivery=Delivery(lead_s=0.1, continuation=True)))
        assert done.acquire(timeout=10) and done.acquire(timeout=10)
    finally:
        scheduler.stop()
    ends = {entry[0]: entry[2] for entry in log if entry[1] == "end"}
    assert ends == {"running": "Cancelled", "next sentence": None}


def test_the_real_time_batch_bounds_how_many_new_streams_run():
    """With a step costing 10 ms per stream and 1.5x real time asked of each stream, at most 5 streams run at
    once, though 8 rows are free; the others start as those finish."""
    class TimedTalker(_FakeTalker):
        def step(self, streams=None):
            time.sleep(0.010 * len(streams if streams is not None else self.active))
            return super().step(streams)

    log, done, talker = [], threading.Semaphore(0), TimedTalker(slots=8)
    scheduler = StreamScheduler(talker, speed=1.5)
    scheduler.step_times.update({batch: 0.010 * batch for batch in range(1, 9)})
    try:
        for index in range(8):
            scheduler.submit(_job(f"s{index}", _FakeRequest(20), log, done, delivery=Delivery(max_wait_s=30)))
        for _ in range(8):
            assert done.acquire(timeout=10)
    finally:
        scheduler.stop()
    assert max(talker.batches) == 5 and len(_ends(log)) == 8


# -- decoder stream table ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stream_table_decoder(loaded):
    from tts_engine.codec.decoder import StreamingDecoder

    return StreamingDecoder(loaded.tts.model.speech_tokenizer.model)


def test_stream_table_frees_state_on_final_cancel_and_idle(stream_table_decoder):
    """State is held per stream and released by `final`, by cancel, and by the idle timeout."""
    table = StreamTable(stream_table_decoder, idle_timeout=10)
    codes = np.ones((2, 16), dtype=np.int32)
    for stream_id in (1, 2, 3):
        table.decode(stream_id, codes, None, final=False)
    table.decode(1, codes, None, final=True)
    assert table.cancel(2) and not table.cancel(2)
    assert len(table) == 1
    assert table.expire(now=time.monotonic() + 11) == 1 and len(table) == 0
    assert table.freed == {"final": 1, "cancelled": 1, "failed": 0, "idle": 1}


def test_stream_table_refuses_bad_codes_and_late_context(stream_table_decoder):
    """Out-of-range codes, wrong shapes and context codes after the first chunk are refused."""
    table = StreamTable(stream_table_decoder)
    with pytest.raises(InvalidRequest):
        table.decode(7, np.full((1, 16), 5000, dtype=np.int32), None, False)
    with pytest.raises(InvalidRequest):
        table.decode(7, np.zeros((1, 8), dtype=np.int32), None, False)
    table.decode(8, np.zeros((1, 16), dtype=np.int32), None, False)
    with pytest.raises(InvalidRequest):
        table.decode(8, np.zeros((1, 16), dtype=np.int32), np.zeros((2, 16), dtype=np.int32), False)
    assert len(table) == 0 and table.freed["failed"] == 1  # a stream that failed holds no state
    with pytest.raises(InvalidRequest, match="context codes out of the codebook range"):
        table.decode(9, np.zeros((1, 16), dtype=np.int32), np.full((2, 16), 5000, dtype=np.int32), False)


def test_a_failed_stream_is_never_decoded_again_from_a_fresh_state(stream_table_decoder):
    """Two chunks of one stream in one batch: when the first fails, the second fails with it (decoding it
    from a fresh state would send wrong audio as if nothing happened); other streams are unaffected."""
    from tts_engine.codec.streams import DecodeItem

    table = StreamTable(stream_table_decoder)
    good = np.zeros((2, 16), dtype=np.int32)
    results = table.decode_many([DecodeItem(1, np.full((2, 16), 5000, dtype=np.int32)), DecodeItem(2, good),
                                 DecodeItem(1, good, final=True)])
    assert isinstance(results[0], InvalidRequest) and results[2] is results[0]
    assert isinstance(results[1], np.ndarray) and len(table) == 1


# -- render tool -------------------------------------------------------------------------------------------

def test_gpu_profile_renders_gpu_kinds_and_single_decoder(tmp_path):
    """The GPU profile renders KIND_GPU, bf16 and cuda; talker and codec_decoder have exactly one instance."""
    values = resolve("gpu", {"MODEL_DIR": "/models/qwen", "VOICE_ENCODER_INSTANCES": "2"}, environ={})
    repo = render(tmp_path / "repo", values)
    talker = (repo / "talker" / "config.pbtxt").read_text()
    assert "count: 1 kind: KIND_GPU" in talker and '"bf16"' in talker and '"cuda"' in talker
    assert "count: 2 kind: KIND_GPU" in (repo / "voice_encoder" / "config.pbtxt").read_text()
    assert "count: 1 kind: KIND_GPU" in (repo / "codec_decoder" / "config.pbtxt").read_text()
    assert (repo / "tts" / "1").is_dir() and (repo / "talker" / "1" / "model.py").is_file()
    assert "${" not in "".join(p.read_text() for p in repo.rglob("config.pbtxt"))


@pytest.mark.parametrize("overrides, message", [
    ({}, "MODEL_DIR is empty"),
    ({"MODEL_DIR": "/m", "KIND": "KIND_TPU"}, "KIND"),
    ({"MODEL_DIR": "/m", "VOICE_ENCODER_INSTANCES": "0"}, "positive integer"),
    ({"MODEL_DIR": "/m", "NOPE": "1"}, "unknown parameter"),
])
def test_render_refuses_bad_values(overrides, message):
    """Missing model dir, bad kinds, bad counts and unknown names are refused with a clear message."""
    with pytest.raises(RenderError, match=message):
        resolve("cpu", overrides, environ={})


@pytest.mark.parametrize("message, code, text", [
    ("in ensemble 'tts', [VOICE_NOT_FOUND] voice 'x' not found", "VOICE_NOT_FOUND", "voice 'x' not found"),
    ("[StatusCode.INTERNAL] [INTERNAL] [INVALID_TEXT] text is empty", "INVALID_TEXT", "text is empty"),
    ("Socket closed", "SYNTHESIS_ERROR", "Socket closed"),
])
def test_engine_error_codes_survive_triton_prefixes(message, code, text):
    """The first known [CODE] in a Triton error message is the code; what follows is the text."""
    from tts_contract.errors import parse_wire

    assert parse_wire(message) == (code, text)


def test_tiny_model_build_is_deterministic(tiny_model_dir, tmp_path):
    """Building the tiny model twice gives byte-identical weights and tokenizer."""
    from tts_engine.tiny_model import build_tiny_model

    again = build_tiny_model(tmp_path / "tiny")
    for name in ("model.safetensors", "speech_tokenizer/model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (tiny_model_dir / name).read_bytes(), name


# -- gateway admission ----------------------------------------------------------------------------------------

def _one_slot_pool(queue_timeout_s: float):
    from gateway.triton_client import TritonPool

    pool = TritonPool(["127.0.0.1:9"], queue_timeout_s=queue_timeout_s, streams_per_endpoint=1,
                      first_audio_budget_s=1.0)
    pool.endpoints[0].ready = True  # no server is asked: admission is pure bookkeeping
    return pool


async def test_a_freed_slot_goes_to_the_waiting_request_whose_listener_needs_audio_first():
    """Waiting requests are served earliest deadline first: a later sentence whose listener runs dry in 0.3 s
    goes before one whose listener has 2 s, and both before a new request that said it can wait 5 s."""
    import asyncio

    pool = _one_slot_pool(queue_timeout_s=10)
    held, token = await pool._acquire()
    patient = asyncio.create_task(pool._acquire(max_wait_s=5))
    await asyncio.sleep(0.01)
    relaxed = asyncio.create_task(pool._acquire(continuing=True, lead_s=2.0))
    await asyncio.sleep(0.01)
    urgent = asyncio.create_task(pool._acquire(continuing=True, lead_s=0.3))
    await asyncio.sleep(0.01)
    order = []
    for _ in range(3):
        pool._release(held, token)
        done, _ = await asyncio.wait({patient, relaxed, urgent} - set(order), timeout=1,
                                     return_when=asyncio.FIRST_COMPLETED)
        assert len(done) == 1
        order.append(done.pop())
        held, token = order[-1].result()
    assert order == [urgent, relaxed, patient]


async def test_a_new_utterance_is_refused_at_once_when_no_slot_frees_within_its_budget():
    """With the only slot taken for longer than the first-audio budget, a new utterance is refused at once with
    a retry hint, while a later sentence of a playing utterance waits and gets the slot when it frees."""
    import asyncio

    from gateway.triton_client import SynthesisFailed
    from tts_contract.errors import EngineCode

    pool = _one_slot_pool(queue_timeout_s=10)
    held, token = await pool._acquire()
    later = asyncio.create_task(pool._acquire(continuing=True, lead_s=1.0))
    started = time.monotonic()
    with pytest.raises(SynthesisFailed) as refused:
        await pool._acquire()
    assert time.monotonic() - started < 0.05
    assert refused.value.code == EngineCode.OVERLOADED and refused.value.retry_after_ms >= 100
    await asyncio.sleep(0.2)
    assert not later.done()
    pool._release(held, token)
    assert (await asyncio.wait_for(later, 1))[0] is held


async def test_a_request_that_can_wait_queues_until_its_max_wait():
    """A new request with max_wait_s waits for a slot instead of being refused, and is refused once that
    wait is over."""
    import asyncio

    from gateway.triton_client import SynthesisFailed

    pool = _one_slot_pool(queue_timeout_s=10)
    held, token = await pool._acquire()
    waiting = asyncio.create_task(pool._acquire(max_wait_s=2))
    await asyncio.sleep(0.1)
    assert not waiting.done()
    pool._release(held, token)
    held, token = await asyncio.wait_for(waiting, 1)
    started = time.monotonic()
    with pytest.raises(SynthesisFailed):
        await pool._acquire(max_wait_s=0.2)
    assert 0.15 < time.monotonic() - started < 1.0


# -- incremental text ---------------------------------------------------------------------------------------

async def test_buffered_text_waits_until_appends_pause_for_the_idle_time():
    """The idle flush counts from the last append: words arriving every 0.1 s are never cut mid-sentence."""
    import asyncio

    from gateway.text import TextFeed

    feed = TextFeed(idle_s=0.3)
    sentence = asyncio.create_task(feed.next())
    words = "a slow writer takes its time with this sentence".split()
    for word in words:
        feed.append(word + " ")
        await asyncio.sleep(0.1)
        assert not sentence.done()
    assert await asyncio.wait_for(sentence, 2) == " ".join(words)


async def test_a_fragment_after_blank_text_is_flushed_when_idle():
    """Text that arrives after a blank append (an LLM's newlines) is still spoken after the idle time."""
    import asyncio

    from gateway.text import TextFeed

    feed = TextFeed(idle_s=0.2)
    feed.append("Hello there.\n")
    assert await feed.next() == "Hello there."
    feed.append("\n\n")
    waiting = asyncio.create_task(feed.next())
    await asyncio.sleep(0.05)
    feed.append("And then")
    assert await asyncio.wait_for(waiting, 2) == "And then"


def test_a_long_text_without_sentence_ends_is_split_between_words():
    """Past the sentence limit with no sentence end, buffered text is cut at its last break: no word is split,
    and the unfinished last word waits for more text."""
    from gateway.text import TextFeed

    feed = TextFeed(max_sentence_chars=400)
    feed.append("x" * 390 + " aa  bb   cc")
    assert feed.take_ready().endswith(" aa  bb") and feed.take_ready() is None
    feed.append("c done.")
    feed.close()
    assert feed.take_ready() == "ccc done."


# -- continuous text: segments ------------------------------------------------------------------------------

async def _segments(text: "OpenText") -> list[str]:
    """Every segment's text as a stream would receive it (opening text, then pieces)."""
    out, start = [], 0
    while True:
        segment = text.segment(start)
        received = segment.text
        async for piece, _ in segment.pieces(len(received)):
            received += piece
        out.append(received)
        if segment.last:
            return out
        start = segment.end


async def test_a_long_continuous_text_is_cut_at_sentence_ends_past_the_segment_length():
    """Each stream's text ends at the first sentence end past segment_chars; together they are the whole text."""
    from gateway.text import OpenText

    sentences = [f"Sentence number {n} says a few words." for n in range(12)]
    text = OpenText(segment_chars=100, hard_chars=2000)
    text.append(" ".join(sentences))
    text.close()
    segments = await _segments(text)
    assert "".join(segments) == " ".join(sentences) and len(segments) > 2
    for segment in segments[:-1]:
        assert len(segment) > 100 and segment.rstrip().endswith(".")


async def test_a_continuous_text_without_sentence_ends_is_cut_at_a_space_before_the_talker_limit():
    """No sentence end at all: segments end at a space and never exceed hard_chars."""
    from gateway.text import OpenText

    words = " ".join(f"word{n}" for n in range(200))
    text = OpenText(segment_chars=100, hard_chars=300)
    text.append(words)
    text.close()
    segments = await _segments(text)
    assert "".join(segments) == words and all(len(s) <= 300 for s in segments)
    assert all(s.endswith(" ") for s in segments[:-1])


# -- auth ------------------------------------------------------------------------------------------------------

def test_a_jwks_file_with_an_unusable_key_still_serves_its_good_keys(tmp_path):
    """A JWKS holding a key the gateway cannot use (unknown type, a curve that does not fit its algorithm) skips
    that key and verifies tokens signed with the others."""
    import json

    import jwt
    from cryptography.hazmat.primitives.asymmetric import ec
    from jwt.algorithms import ECAlgorithm

    from gateway.auth import Authenticator, AuthSettings

    good, wrong_curve = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP384R1())
    keys = [{"kty": "X9", "kid": "strange"},
            {**json.loads(ECAlgorithm.to_jwk(wrong_curve.public_key())), "kid": "mislabelled", "alg": "ES256"},
            {**json.loads(ECAlgorithm.to_jwk(good.public_key())), "kid": "good"}]
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": keys}))
    auth = Authenticator(AuthSettings(jwks_file=str(tmp_path / "jwks.json")))
    signed = jwt.encode({"sub": "s", "exp": time.time() + 60}, good, algorithm="ES256", headers={"kid": "good"})
    assert auth.verify(signed).subject == "s" and list(auth._keys) == ["good"]


def test_opaque_tokens_are_not_limited_per_subject_but_jwt_subjects_are():
    """The per-subject limit holds a JWT subject to its count; an opaque (shared) token is never limited."""
    from gateway.auth import Identity, SubjectSessions

    sessions = SubjectSessions(limit=1)
    alice, shared = Identity("alice", time.time() + 60), Identity("token:abc", shared=True)
    assert sessions.try_open(alice) and not sessions.try_open(alice)
    assert all(sessions.try_open(shared) for _ in range(5))
    sessions.close(alice)
    assert sessions.try_open(alice)
