"""In-flight batching changes nothing a listener can hear: every stream of a batch gets its solo run's codes,
whoever joins, leaves, ends at EOS or is cancelled beside it (fp32, CPU), with the batch's own shapes or
padded to fixed shapes (what a CUDA graph per batch bucket needs)."""
from __future__ import annotations

import threading

import pytest
import torch

from conftest import SAMPLE_RATE, synthetic_reference
from tts_engine.errors import Cancelled
from tts_engine.generation.admission import Delivery
from tts_engine.generation.sampling import SamplingParams
from tts_engine.generation.scheduler import StreamJob, StreamScheduler
from tts_engine.generation.talker import BatchedTalker, batch_buckets
from tts_engine.generation.prompt import SynthesisRequest
from tts_engine.generation.pacing import FixedChunks
from tts_engine.tiny_model import EOS_MARKER

PATIENT = Delivery(max_wait_s=120)  # these tests check codes, not deadlines: no job is refused for load
LONG = "Streaming speech arrives in pieces, and the first piece should come quickly to the listener."
SHORT = "Hi there."


@pytest.fixture(scope="module")
def short_icl_prompt(loaded):
    from tts_engine.voices.prompts import build_prompt

    return build_prompt(loaded.tts, synthetic_reference(seconds=3.0, seed=4), SAMPLE_RATE, "Hi.")


@pytest.fixture(scope="module")
def requests(icl_prompt, xvector_prompt, short_icl_prompt):
    """Different prompt modes and lengths, greedy and seeded (several options), EOS and the frame cap."""
    def request(prompt, text, **params):
        return SynthesisRequest(text, prompt, "English", SamplingParams(**params))

    return {
        "icl greedy": request(icl_prompt, LONG, greedy=True, max_new_tokens=40),
        "x-vector seeded": request(xvector_prompt, LONG, seed=1, max_new_tokens=60),
        "short ICL, ends at EOS": request(short_icl_prompt, LONG + f" Then it stops {EOS_MARKER} here.",
                                          greedy=True, max_new_tokens=200),
        "x-vector top_p": request(xvector_prompt, SHORT, seed=2, top_p=0.7, max_new_tokens=25),
        "icl sampled, greedy sub-talker": request(icl_prompt, SHORT, seed=3, subtalker_greedy=True,
                                                  max_new_tokens=50),
        "x-vector, EOS after 6 frames": request(xvector_prompt, f"Hello there {EOS_MARKER} and then some.", seed=4,
                                                max_new_tokens=40),
        "icl penalty, cancelled mid-way": request(icl_prompt, LONG, seed=5, repetition_penalty=1.3,
                                                  max_new_tokens=80),
    }


@pytest.fixture(scope="module")
def solo(loaded, requests):
    """Each request run alone, in its own shapes: the reference every batched run must reproduce."""
    scheduler = StreamScheduler(BatchedTalker(loaded.tts, slots=1, max_tokens=1024))
    try:
        return {name: scheduler.generate(request) for name, request in requests.items()}
    finally:
        scheduler.stop()


@pytest.fixture(scope="module", params=["own shapes", "fixed shapes"])
def scheduler(loaded, request):
    talker = BatchedTalker(loaded.tts, slots=8, max_tokens=1024, fixed_shapes=request.param == "fixed shapes")
    scheduler = StreamScheduler(talker, cancel_check_interval_s=0)
    yield scheduler
    scheduler.stop()


def test_every_stream_of_a_changing_batch_equals_its_solo_run(scheduler, requests, solo):
    """Streams start together or join mid-way (when another's chunk arrives), end at EOS or the cap, one is
    cancelled mid-way; each stream's codes equal its solo run (the cancelled one: a prefix of it)."""
    codes = {name: [] for name in requests}
    ends: dict = {}
    finished = threading.Event()
    batches = []
    step = scheduler.talker.step

    def recording_step(streams=None):
        results = step(streams)
        batches.append(len(results))
        return results

    def job(name, joins=None, cancel_after=None):
        def on_chunk(chunk, index, last):
            codes[name].append(chunk)
            if joins and index == 1:  # a second stream joins while this one runs
                for other in joins:
                    scheduler.submit(job(other))

        def on_end(error, job):
            ends[name] = error
            if len(ends) == len(requests):
                finished.set()

        cancelled = (lambda: len(codes[name]) >= cancel_after) if cancel_after else (lambda: False)
        return StreamJob(request=requests[name], on_chunk=on_chunk, on_end=on_end, is_cancelled=cancelled,
                         policy=FixedChunks(), label=name, delivery=PATIENT)

    scheduler.talker.step = recording_step
    try:
        scheduler.submit(job("icl greedy", joins=["x-vector top_p", "x-vector, EOS after 6 frames"]))
        scheduler.submit(job("x-vector seeded", joins=["icl sampled, greedy sub-talker"]))
        scheduler.submit(job("short ICL, ends at EOS"))
        scheduler.submit(job("icl penalty, cancelled mid-way", cancel_after=3))
        assert finished.wait(120)
    finally:
        scheduler.talker.step = step
    assert max(batches) >= 5 and len(set(batches)) >= 3, f"the batch never changed much: {batches}"
    for name in requests:
        got = torch.cat(codes[name]) if codes[name] else torch.zeros((0, 16), dtype=torch.long)
        expected = solo[name].codes
        if name.endswith("cancelled mid-way"):
            assert isinstance(ends[name], Cancelled)
            assert 0 < len(got) < len(expected) and torch.equal(got, expected[:len(got)]), name
        else:
            assert ends[name] is None, (name, ends[name])
            assert torch.equal(got, expected), name
    assert solo["short ICL, ends at EOS"].finish_reason == "eos"
    assert len(solo["x-vector, EOS after 6 frames"].codes) == 6
    assert len(scheduler.talker) == 0


@pytest.mark.parametrize("fixed_shapes", [False, True], ids=["own shapes", "fixed shapes"])
def test_streams_stepped_in_any_subsets_equal_their_solo_runs(loaded, requests, solo, fixed_shapes):
    """Rows that sit out steps (waiting for their deadline) keep their state untouched: stepping random
    subsets of the batch gives every stream its solo codes, and padding rows never touch a waiting row."""
    import random

    talker = BatchedTalker(loaded.tts, slots=8, max_tokens=1024, fixed_shapes=fixed_shapes)
    names = [name for name in requests if not name.endswith("cancelled mid-way")]
    streams = {talker.add(requests[name]): name for name in names}
    frames = {name: [] for name in names}
    rng = random.Random(7)
    while talker.active:
        running = [s for s in talker.active if not s.finished]
        chosen = [s for s in running if rng.random() < 0.5] or running[:1]
        for stream, frame in talker.step(chosen):
            frames[streams[stream]].append(frame)
        for stream in [s for s in talker.active if s.finished]:
            talker.remove(stream)
    for name in names:
        got = torch.stack(frames[name]) if frames[name] else torch.zeros((0, 16), dtype=torch.long)
        assert torch.equal(got, solo[name].codes), name


def test_fixed_shapes_pad_each_batch_to_a_bucket_and_attend_over_the_whole_arena(loaded, requests):
    """With fixed shapes, 3 streams run as a batch of 4 rows over all 1024 cached positions."""
    assert batch_buckets(8) == (1, 2, 4, 8) and batch_buckets(12) == (1, 2, 4, 8, 12)
    talker = BatchedTalker(loaded.tts, slots=8, max_tokens=1024, fixed_shapes=True)
    for name in ("icl greedy", "x-vector seeded", "x-vector top_p"):
        talker.add(requests[name])
    seen = []
    forward = talker.talker.model.forward
    talker.talker.model.forward = lambda **kw: (seen.append(tuple(kw["attention_mask"].shape)), forward(**kw))[1]
    try:
        assert len(talker.step()) == 3
    finally:
        talker.talker.model.forward = forward
    assert seen == [(4, 1024)]


def test_the_same_request_twice_in_one_batch_gives_the_same_codes(scheduler, requests):
    """Two copies of one seeded request, side by side, get identical codes: rows never share an RNG."""
    request = requests["x-vector seeded"]
    results, done = [], threading.Semaphore(0)
    for _ in range(2):
        chunks = []
        results.append(chunks)
        scheduler.submit(StreamJob(request=request, on_chunk=lambda chunk, i, last, chunks=chunks: chunks.append(chunk),
                                   on_end=lambda error, job: done.release(), delivery=PATIENT))
    assert done.acquire(timeout=60) and done.acquire(timeout=60)
    assert torch.equal(torch.cat(results[0]), torch.cat(results[1]))
