"""In-flight batching changes nothing a listener can hear: every stream of a batch gets its solo run's codes,
whoever joins, leaves, ends at EOS or is cancelled beside it (fp32, CPU), with the batch's own shapes or padded
to buckets (what a CUDA graph per bucket needs); the decode step traces as one graph per bucket."""
from __future__ import annotations

import threading
from dataclasses import replace

import pytest
import torch

from conftest import SAMPLE_RATE, synthetic_reference
from tts_engine.serving.outbox import CallbackSink
from tts_engine.errors import Cancelled
from tts_engine.generation.prompt import SynthesisRequest
from tts_engine.generation.sampling import SamplingParams
from tts_engine.generation.talker import BatchedTalker, context_buckets
from tts_engine.graphs import batch_buckets
from tts_engine.serving.engine import Engine
from tts_engine.serving.pacing import FixedChunks
from tts_engine.serving.tickets import Deadline
from tts_engine.tiny_model import EOS_MARKER

PATIENT = Deadline(max_wait_s=120)  # these tests check codes, not deadlines: no job is refused for load
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
    engine = Engine(BatchedTalker(loaded.tts, rows=1, max_tokens=1024))
    try:
        return {name: engine.generate(request) for name, request in requests.items()}
    finally:
        engine.stop()


@pytest.fixture(scope="module", params=["own shapes", "padded to buckets"])
def engine(loaded, request):
    talker = BatchedTalker(loaded.tts, rows=8, max_tokens=1024, pad_batches=request.param == "padded to buckets")
    engine = Engine(talker)
    yield engine
    engine.stop()


def test_every_stream_of_a_changing_batch_equals_its_solo_run(engine, requests, solo):
    """Streams start together or join mid-way (when another's chunk arrives), end at EOS or the cap, one is
    cancelled mid-way; each stream's codes equal its solo run (the cancelled one: a prefix of it)."""
    codes = {name: [] for name in requests}
    ends: dict = {}
    finished = threading.Event()
    batches = []
    step = engine.talker.step

    def recording_step(streams=None):
        results = step(streams)
        batches.append(len(results))
        return results

    def start(name, joins=None, cancel_after=None):
        stream_id = engine.new_id()

        def on_chunk(chunk, index, last):
            codes[name].append(chunk)
            if joins and index == 1:  # a second stream joins while this one runs
                for other in joins:
                    start(other)
            if cancel_after and len(codes[name]) == cancel_after:
                engine.cancel(stream_id)

        def on_end(error):
            ends[name] = error
            if len(ends) == len(requests):
                finished.set()

        engine.submit(stream_id, requests[name], CallbackSink(on_chunk, on_end), PATIENT, FixedChunks())

    engine.talker.step = recording_step
    try:
        start("icl greedy", joins=["x-vector top_p", "x-vector, EOS after 6 frames"])
        start("x-vector seeded", joins=["icl sampled, greedy sub-talker"])
        start("short ICL, ends at EOS")
        start("icl penalty, cancelled mid-way", cancel_after=3)
        assert finished.wait(120)
    finally:
        engine.talker.step = step
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
    assert len(engine.talker) == 0


@pytest.mark.parametrize("pad_batches", [False, True], ids=["own shapes", "padded to buckets"])
def test_streams_stepped_in_any_subsets_equal_their_solo_runs(loaded, requests, solo, pad_batches):
    """Rows that sit out steps (waiting for their deadline) keep their state untouched: stepping random
    subsets of the batch gives every stream its solo codes, and padding rows never touch a waiting row."""
    import random

    talker = BatchedTalker(loaded.tts, rows=8, max_tokens=1024, pad_batches=pad_batches)
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


def test_padded_steps_use_a_bucket_of_rows_and_of_kv_blocks(loaded, requests):
    """Padded, 3 streams step as 4 rows (the last one the scratch row) over a bucket of KV blocks."""
    assert batch_buckets(8) == (1, 2, 4, 8) and batch_buckets(12) == (1, 2, 4, 8, 12)
    assert context_buckets(160) == (8, 16, 32, 64, 128, 160) and context_buckets(4) == (4,)
    talker = BatchedTalker(loaded.tts, rows=8, max_tokens=1024, pad_batches=True)
    streams = [talker.add(requests[name]) for name in ("icl greedy", "x-vector seeded", "x-vector top_p")]
    rows, text, blocks, _, _, _ = talker.prepare(streams)
    assert rows.tolist() == [s.row for s in streams] + [talker.scratch_row] and text.shape[0] == 4
    assert blocks in context_buckets(talker.pool.max_blocks) and blocks * 32 > max(s.length for s in streams)


def test_padding_rows_never_touch_a_streams_state(loaded, requests):
    """A padded step leaves every row it does not advance exactly as it was (padding goes to the scratch row
    and the scratch block)."""
    talker = BatchedTalker(loaded.tts, rows=8, max_tokens=1024, pad_batches=True)
    stepped = [talker.add(requests[name]) for name in ("icl greedy", "x-vector seeded", "x-vector top_p")]
    waiting = talker.add(requests["short ICL, ends at EOS"])
    before = talker.step_function.snapshot()
    talker.step(stepped)
    after = talker.step_function.snapshot()
    for name, value in before.items():
        if name in ("keys", "values"):
            for layer_before, layer_after in zip(value, after[name]):
                blocks = talker.pool.owned[waiting.row]
                assert torch.equal(layer_before[blocks], layer_after[blocks]), name
        else:
            assert torch.equal(value[waiting.row], after[name][waiting.row]), name


@pytest.mark.parametrize("noise", ["reference", "counter"])
def test_each_buckets_step_traces_as_one_graph_and_equals_the_eager_step(loaded, requests, noise):
    """torch dynamo traces every bucket's step with fullgraph=True (no graph break, no host synchronisation),
    and from the same state the traced step gives exactly the eager step's codes and state."""
    from tools.graph_check import check_bucket

    talker = BatchedTalker(loaded.tts, rows=4, max_tokens=1024, pad_batches=True, noise=noise)
    for size in talker.buckets:
        row = check_bucket(talker, size, steps=1, profile=False)
        assert row["trace_error"] is None, row
        assert row["traced_equal"], row


def test_counter_noise_gives_a_seeded_stream_the_same_codes_whatever_runs_beside_it(loaded, requests):
    """On the counter path a seeded stream's codes depend on its seed alone: alone, or batched with others
    and padded, it gets the same codes (and a different seed, different codes)."""
    from tts_engine.generation.prompt import SynthesisRequest

    def run(talker, names):
        streams = {talker.add(requests[name]): name for name in names}
        codes = {name: [] for name in names}
        while talker.active:
            for stream, frame in talker.step([s for s in talker.active if not s.finished]):
                codes[streams[stream]].append(frame)
            for stream in [s for s in talker.active if s.finished]:
                talker.remove(stream)
        return {name: torch.stack(frames) for name, frames in codes.items()}

    alone = run(BatchedTalker(loaded.tts, rows=1, max_tokens=1024, noise="counter"), ["x-vector seeded"])
    together = run(BatchedTalker(loaded.tts, rows=8, max_tokens=1024, noise="counter", pad_batches=True),
                   ["icl greedy", "x-vector seeded", "x-vector top_p"])
    assert torch.equal(alone["x-vector seeded"], together["x-vector seeded"])
    other = requests["x-vector seeded"]
    requests["other seed"] = SynthesisRequest(other.text, other.prompt, other.language,
                                              replace(other.params, seed=other.params.seed + 1))
    try:
        moved = run(BatchedTalker(loaded.tts, rows=1, max_tokens=1024, noise="counter"), ["other seed"])
    finally:
        del requests["other seed"]
    assert not torch.equal(moved["other seed"], alone["x-vector seeded"])


def test_counter_noise_is_exponential():
    """The hashed noise has the Exponential(1) distribution: mean and variance 1, positive, finite, and
    independent across tokens, frames, codebooks and seeds."""
    from tts_engine.generation.noise import exponential_noise, noise_keys

    seeds, frames = torch.arange(64), torch.arange(64) * 7
    noise = torch.cat([exponential_noise(noise_keys(seeds, frames + shift)[:, group], torch.arange(2048))
                       for group in range(16) for shift in range(2)])
    assert bool(torch.isfinite(noise).all()) and bool((noise > 0).all())
    assert abs(float(noise.mean()) - 1) < 0.01 and abs(float(noise.var()) - 1) < 0.03
    flat = noise.flatten()
    correlation = torch.corrcoef(torch.stack([flat[:-1], flat[1:]]))[0, 1]
    assert abs(float(correlation)) < 0.01


def test_the_same_request_twice_in_one_batch_gives_the_same_codes(engine, requests):
    """Two copies of one seeded request, side by side, get identical codes: rows never share an RNG."""
    request = requests["x-vector seeded"]
    results, done = [], threading.Semaphore(0)
    for _ in range(2):
        chunks = []
        results.append(chunks)
        engine.submit(engine.new_id(), request, CallbackSink(lambda chunk, i, last, chunks=chunks: chunks.append(chunk),
                                                             lambda error: done.release()), PATIENT)
    assert done.acquire(timeout=60) and done.acquire(timeout=60)
    assert torch.equal(torch.cat(results[0]), torch.cat(results[1]))
