"""An utterance's words, window by window (gateway/words.py): pure logic, with a scripted aligner standing in for
the real one (the real aligner through Triton is tests/test_turn_taking.py's)."""
from __future__ import annotations

import asyncio

import numpy as np

from gateway.alignment import AlignerUnavailable, Word
from gateway.words import UtteranceWords, heard_prefix, read_ahead_chars

RATE = 24000
TEXT = "One two, three four five."


def words_of(text: str, ms_per_word: int = 400) -> list[Word]:
    """Each space-separated word of ``text`` (punctuation off), one after another, ``ms_per_word`` each."""
    words, position = [], 0
    for index, token in enumerate(text.split()):
        start = text.index(token, position)
        core = token.strip(",.")
        words.append(Word(core, index * ms_per_word, (index + 1) * ms_per_word, start, start + len(core)))
        position = start + len(token)
    return words


class ScriptedAligner:
    """Answers each window with evenly spaced words, and records what it was given."""

    def __init__(self, fail: bool = False):
        self.calls: list[tuple[int, str]] = []
        self.fail = fail

    async def __call__(self, audio: np.ndarray, text: str) -> list[Word]:
        self.calls.append((audio.size, text))
        if self.fail:
            raise AlignerUnavailable("down")
        return words_of(text)


def marking_tracker(aligner: ScriptedAligner, sent: list) -> UtteranceWords:
    """A tracker of TEXT that asks for marks (into ``sent``) every 0.5 s of audio, settling 0.4 s back."""
    async def on_marks(words, aligned):
        sent.append((words, aligned))

    return UtteranceWords(aligner, lambda: TEXT, on_marks, interval_s=0.5, settle_s=0.4)


def seconds(s: float) -> np.ndarray:
    return np.zeros(int(s * RATE), np.float32)


def test_heard_prefix_cuts_after_the_last_word_that_ended():
    """The heard text is the input as written up to the end of the last word that ended by then."""
    words = words_of(TEXT)
    assert heard_prefix(TEXT, words, 799) == "One"
    assert heard_prefix(TEXT, words, 800) == "One two"
    assert heard_prefix(TEXT, words, 10_000) == "One two, three four five"
    assert heard_prefix(TEXT, words, 0) == ""


def test_read_ahead_finishes_the_word_it_falls_in():
    """The text the talker has read is cut after a whole word."""
    text = "abcdefghij " * 10
    cut = read_ahead_chars(text, 0.0)
    assert cut >= 20 and (cut == len(text) or text[cut].isspace())


async def test_words_settle_only_well_before_the_window_end():
    """Marks carry words that ended settle_s before the aligned audio's end, never the window's last word."""
    aligner, sent = ScriptedAligner(), []
    tracker = marking_tracker(aligner, sent)
    tracker.add_audio(seconds(1.6))
    await asyncio.sleep(0.01)
    assert sent, "an alignment was due"
    words, aligned = sent[0]
    # window 1.6 s: words end at 0.4, 0.8, 1.2, 1.6, 2.0 -> those ending by 1.2 settle (and not the last)
    assert [w.text for w in words] == ["One", "two", "three"]
    assert aligned == {"startMs": 0, "endMs": 1600, "charStart": 0, "charEnd": len(TEXT)}


async def test_the_next_window_starts_where_the_last_settled_word_ended():
    """After words settle, the aligner sees only the audio and text after them, and times come back shifted."""
    aligner, sent = ScriptedAligner(), []
    tracker = marking_tracker(aligner, sent)
    tracker.add_audio(seconds(1.6))
    await asyncio.sleep(0.01)
    tracker.add_audio(seconds(0.8))
    await tracker.finish()
    assert aligner.calls[1] == (int(1.2 * RATE), TEXT[len("One two, three"):])
    rest, aligned = sent[1]
    assert [w.text for w in rest] == ["four"]
    assert rest[0].start_ms == 1200 and rest[0].char_start == TEXT.index("four")
    assert aligned["startMs"] == 1200 and aligned["charStart"] == len("One two, three")
    assert [w.text for w in sent[-1][0]] == ["five"]  # the last window, once all audio is in


async def test_heard_text_aligns_the_unsettled_audio_at_the_interruption():
    """Without marks asked, the heard text still comes from aligning the audio generated so far."""
    aligner = ScriptedAligner()
    tracker = UtteranceWords(aligner, lambda: TEXT)
    tracker.add_audio(seconds(1.0))
    assert await tracker.heard_text(850, timeout_s=1) == "One two"
    assert aligner.calls == [(RATE, TEXT)]


async def test_heard_text_is_none_when_the_aligner_fails():
    """An aligner that fails gives no heard text (null), never a guess."""
    tracker = UtteranceWords(ScriptedAligner(fail=True), lambda: TEXT)
    tracker.add_audio(seconds(1.0))
    assert await tracker.heard_text(850, timeout_s=1) is None
