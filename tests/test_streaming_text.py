"""Text that arrives while it is spoken: committed ids always equal tokenising the whole text, and a stream fed its
text in pieces, at any pace, speaks exactly what qwen-tts generates offline for the whole text."""
from __future__ import annotations

import random
import threading
import time

import pytest
import torch

from reference import qwen_kwargs, reference_generation
from tts_engine.errors import InvalidText
from tts_engine.generation.prompt import SynthesisRequest
from tts_engine.generation.sampling import SamplingParams
from tts_engine.generation.text_feed import TURN_PREFIX, TURN_SUFFIX, TextFeed

TEXTS = [
    "Hello there, it's a fine day: 3.14 apples cost $2,50! Don't they'll we've.",
    "Ünïcödé café naïve — 日本語です。 Emoji 🎉 too, x.y and a.b.c end.",
    "Spaces  double   and\nnewlines\n\nhere...  trailing ?! (parenthesised) [brackets] done",
]
SPOKEN = "The quick brown fox jumps over the lazy dog, and then it rests a while."


@pytest.fixture(scope="module")
def tokenizer(loaded):
    return loaded.tts.processor.tokenizer


def whole_turn_ids(tokenizer, text: str) -> list:
    return tokenizer(TURN_PREFIX + text + TURN_SUFFIX, add_special_tokens=False)["input_ids"]


def byte_pieces(text: str, rng: random.Random, most: int = 7) -> list:
    """The text's UTF-8 bytes cut at random places (inside characters too), 1 to ``most`` bytes each."""
    data, pieces, start = text.encode(), [], 0
    while start < len(data):
        size = rng.randint(1, most)
        pieces.append(data[start:start + size])
        start += size
    return pieces


@pytest.mark.parametrize("text", TEXTS)
def test_committed_ids_always_equal_tokenising_the_whole_text(tokenizer, text):
    """Fed in random byte pieces (one byte at a time included), the committed ids are at every moment a prefix
    of the whole text's ids, and after the close they are all of them."""
    expected = whole_turn_ids(tokenizer, text)
    for seed in range(12):
        feed = TextFeed.for_tokenizer(tokenizer)
        for piece in byte_pieces(text, random.Random(seed), most=1 if seed == 0 else 7):
            feed.append(piece)
            assert feed.ids == expected[:len(feed.ids)]
        assert len(feed.ids) < len(expected), "the last word is held back until the close"
        feed.close()
        assert feed.ids == expected


def test_fed_ids_equal_what_qwen_tts_tokenises(loaded, tokenizer):
    """The turn's ids are exactly the ones qwen-tts builds for the whole text."""
    feed = TextFeed.for_tokenizer(tokenizer)
    feed.append(TEXTS[0])
    feed.close()
    assert feed.ids == loaded.tts._tokenize_texts([loaded.tts._build_assistant_text(TEXTS[0])])[0][0].tolist()


def test_a_word_that_may_still_grow_is_held_back(tokenizer):
    """"Hello wor" commits "Hello" only; "Hello world " commits both words."""
    feed = TextFeed.for_tokenizer(tokenizer)
    feed.append("Hello wor")
    assert feed.ids == tokenizer(TURN_PREFIX + "Hello", add_special_tokens=False)["input_ids"]
    feed.append("ld and")
    assert feed.ids == tokenizer(TURN_PREFIX + "Hello world", add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("pieces,close,error", [
    ([b"caf\xc3"], True, "ends inside a UTF-8 character"),
    ([b"\xff\xfe"], False, "not valid UTF-8"),
    (["   "], True, "empty"),
])
def test_bad_text_is_refused_clearly(tokenizer, pieces, close, error):
    """Invalid UTF-8, text ending inside a character, and empty text each get a specific error."""
    feed = TextFeed.for_tokenizer(tokenizer)
    with pytest.raises(InvalidText, match=error):
        for piece in pieces:
            feed.append(piece)
        if close:
            feed.close()


def test_text_after_the_close_is_refused(tokenizer):
    """Appending to closed text is an error, not a silent loss."""
    feed = TextFeed.for_tokenizer(tokenizer)
    feed.append("Done.")
    feed.close()
    with pytest.raises(InvalidText, match="already closed"):
        feed.append(" more")


# -- the engine: exact for any arrival schedule ------------------------------------------------------------

def _feed_slowly(feed: TextFeed, text: str, seed: int, delay_s: float) -> threading.Thread:
    """Append ``text`` in random byte pieces with random pauses (up to ``delay_s``) from another thread, then
    close it, as an LLM writing its answer would."""
    rng = random.Random(seed)

    def run():
        try:
            for piece in byte_pieces(text, rng):
                feed.append(piece)
                time.sleep(rng.uniform(0, delay_s))
            feed.close()
        except BaseException as exc:  # the test reads it: a writer that failed must fail the test
            thread.error = exc
            raise

    thread = threading.Thread(target=run, daemon=True)
    thread.error = None
    thread.start()
    return thread


def _fed_request(tokenizer, prompt, params: dict) -> tuple[SynthesisRequest, TextFeed]:
    feed = TextFeed.for_tokenizer(tokenizer)
    return SynthesisRequest("", prompt, "English", SamplingParams(**params), feed=feed), feed


@pytest.mark.parametrize("params", [dict(greedy=True, max_new_tokens=60), dict(seed=7, max_new_tokens=60)],
                         ids=["greedy", "seeded"])
def test_fed_text_speaks_exactly_the_whole_text(loaded, engine, xvector_prompt, tokenizer, params):
    """An x-vector stream fed its text in random pieces with random pauses (it starves often: the talker reads
    a text id per step) gives the codes qwen-tts generates for the whole text, while another stream runs."""
    expected, _ = reference_generation(loaded.tts, xvector_prompt, SPOKEN, seed=params.get("seed"),
                                       **qwen_kwargs(params))
    beside = threading.Thread(target=engine.generate, daemon=True, args=(SynthesisRequest(
        "A neighbour speaking at the same time.", xvector_prompt, "English", SamplingParams(seed=3, max_new_tokens=30)),))
    beside.start()
    request, feed = _fed_request(tokenizer, xvector_prompt, params)
    waited = engine.stats.text_wait_s
    writer = _feed_slowly(feed, SPOKEN, seed=1, delay_s=0.12)
    got = engine.generate(request, timeout=120)
    writer.join(10)
    assert writer.error is None, writer.error
    beside.join(60)
    assert engine.stats.text_wait_s > waited + 0.2, "the stream must have starved for the test to mean anything"
    assert torch.equal(got.codes, expected)


LONG_SPOKEN = (SPOKEN + " It keeps talking about the weather, the trains, the small cafe by the river, and the long "
               "walk home after dark, until the lights go out.")


@pytest.mark.parametrize("params", [dict(greedy=True, max_new_tokens=120), dict(seed=11, max_new_tokens=120)],
                         ids=["greedy", "seeded"])
def test_icl_stream_starts_once_its_text_fills_the_reference_alignment(loaded, engine, icl_prompt, tokenizer,
                                                                       params):
    """An ICL voice lines reference text + text up with its reference frames: its stream starts as soon as the
    text reaches past them (before the text is closed), and its codes equal qwen-tts's for the whole text."""
    from tts_engine.serving.outbox import CallbackSink
    from tts_engine.serving.tickets import Deadline

    expected, _ = reference_generation(loaded.tts, icl_prompt, LONG_SPOKEN, seed=params.get("seed"),
                                       **qwen_kwargs(params))
    request, feed = _fed_request(tokenizer, icl_prompt, params)
    chunks, first_chunk_at, ended = [], [], threading.Event()

    def on_chunk(chunk, index, last):
        chunks.append(chunk)
        first_chunk_at.append(time.monotonic())

    engine.submit(engine.new_id(), request, CallbackSink(on_chunk, lambda error: ended.set()),
                  Deadline(max_wait_s=120))
    writer = _feed_slowly(feed, LONG_SPOKEN, seed=2, delay_s=0.06)
    assert ended.wait(120)
    writer.join(10)
    assert writer.error is None, writer.error
    closed_at = feed.last_append
    assert first_chunk_at and first_chunk_at[0] < closed_at, "it must start before its text is complete"
    assert torch.equal(torch.cat(chunks), expected)


def test_idle_text_is_closed_as_if_it_had_ended(loaded, xvector_prompt, tokenizer):
    """Text that stops arriving is closed after the idle limit: the stream ends instead of waiting for ever."""
    from tts_engine.generation.talker import BatchedTalker
    from tts_engine.serving.engine import Engine

    idle_engine = Engine(BatchedTalker(loaded.tts, rows=2, max_tokens=1024), name="idle-text", text_idle_s=0.5)
    try:
        request, feed = _fed_request(tokenizer, xvector_prompt, dict(greedy=True, max_new_tokens=30))
        feed.append("Said, and then nothing more")
        started = time.monotonic()
        got = idle_engine.generate(request, timeout=60)
        assert feed.closed and got.codes.shape[0] > 0 and time.monotonic() - started < 30
    finally:
        idle_engine.stop()


def test_flush_commits_the_last_word_and_what_follows_goes_on_from_there(tokenizer):
    """After a flush the held-back word is committed; text after it is tokenised from there, so a flush between
    two words still gives the whole text's ids."""
    feed = TextFeed.for_tokenizer(tokenizer)
    feed.append("Hello there")
    held = len(feed.ids)
    feed.flush()
    assert len(feed.ids) > held
    feed.append(" and then some words.")
    feed.close()
    assert feed.ids == whole_turn_ids(tokenizer, "Hello there and then some words.")


def test_feeds_take_text_from_many_threads_while_the_model_tokenises(loaded, tokenizer):
    """Feeds appended from several threads at once, while the serving loop's own tokenizer is busy, all commit
    the right ids (a fast tokenizer shared across threads fails with "Already borrowed")."""
    errors, feeds = [], [TextFeed.for_tokenizer(tokenizer) for _ in range(4)]

    def write(feed):
        try:
            for character in TEXTS[0]:
                feed.append(character)
            feed.close()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    writers = [threading.Thread(target=write, args=(feed,)) for feed in feeds]
    for writer in writers:
        writer.start()
    while any(writer.is_alive() for writer in writers):  # as qwen-tts's prompt construction does (padding on)
        loaded.tts._tokenize_texts([loaded.tts._build_assistant_text(TEXTS[1] * 20)])
    assert not errors, errors
    assert all(feed.ids == whole_turn_ids(tokenizer, TEXTS[0]) for feed in feeds)


def test_idle_text_that_cannot_be_closed_ends_its_own_stream_only(loaded, xvector_prompt, tokenizer):
    """Text left idle inside a UTF-8 character cannot be closed: that stream ends with a clear error, and a
    stream beside it is not touched."""
    from tts_engine.generation.talker import BatchedTalker
    from tts_engine.serving.engine import Engine

    idle_engine = Engine(BatchedTalker(loaded.tts, rows=2, max_tokens=1024), name="broken-text", text_idle_s=0.5)
    try:
        request, feed = _fed_request(tokenizer, xvector_prompt, dict(greedy=True, max_new_tokens=40))
        feed.append("Spoken words and then a broken caf\xc3".encode("latin-1"))
        beside = threading.Thread(target=lambda: results.append(idle_engine.generate(SynthesisRequest(
            "A neighbour speaking at the same time.", xvector_prompt, "English",
            SamplingParams(greedy=True, max_new_tokens=150)), timeout=60)))
        results = []
        beside.start()
        with pytest.raises(InvalidText, match="inside a UTF-8 character"):
            idle_engine.generate(request, timeout=60)
        beside.join(60)
        assert results and results[0].codes.shape[0] == 149
    finally:
        idle_engine.stop()
