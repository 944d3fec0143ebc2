"""An utterance's words on its own audio clock, from the aligner, as its audio is generated.

The aligner is given a *window*: the audio since the last settled word and the text after it. While the utterance
is still being generated, the window's text is what the talker has read by then (estimated from the audio's
length: the talker reads ahead of what it says, so the estimate errs long), and a word *settles* once it ended
``settle_s`` before the window's end and is not the window's last: later audio cannot move it. Settled words are
final; the next window starts where the last one ended (a multiple of 80 ms, so a whole number of samples). When
generation is over, the rest of the audio is aligned against the rest of the text and every word settles.

Each window's words equal the aligner's on exactly that audio and text (``aligned`` in a marks message names
the window), so a client can check them. Audio before the window is dropped: memory stays bounded by the window,
which alignments keep short (every ``interval_s`` with marks; at ``max_window_s`` without).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Awaitable, Callable, Optional

import numpy as np

from tts_contract.audio import SAMPLE_RATE

from .alignment import AlignerUnavailable, Word, align

log = logging.getLogger("gateway.words")
SAMPLES_PER_MS = SAMPLE_RATE // 1000
# The talker reads its text ahead of the audio: a window's text is what 20 characters a second (fast speech) read
# over its audio and one second more would reach. Too long only crowds the window's tail, which never settles.
READ_AHEAD_CHARS_PER_S = 20.0
READ_AHEAD_S = 1.0
# What was heard is aligned on the audio up to this far past the listener's position (not all that was generated:
# generation runs seconds ahead of playback, and the aligner's cost grows with the audio it is given).
HEARD_CONTEXT_MS = 1000

Aligner = Callable[[np.ndarray, str], Awaitable[list[Word]]]
MarksSink = Callable[[list[Word], dict], Awaitable[None]]


def read_ahead_chars(text: str, audio_s: float) -> int:
    """How much of ``text`` (from its start) the talker has read by ``audio_s`` of audio, cut after a word."""
    limit = int((audio_s + READ_AHEAD_S) * READ_AHEAD_CHARS_PER_S)
    if limit >= len(text):
        return len(text)
    while limit < len(text) and not text[limit].isspace():  # finish the word it is in
        limit += 1
    return limit


def heard_prefix(text: str, words: list[Word], heard_ms: float) -> str:
    """``text`` as written up to the end of the last word that ended by ``heard_ms`` ("" when none did)."""
    ends = [w.char_end for w in words if w.end_ms <= heard_ms]
    return text[:max(ends)] if ends else ""


class UtteranceWords:
    """Aligns one utterance's audio and text window by window (see the module). ``text()`` is the utterance's text as
    written so far; ``on_marks``, when given, receives each window's settled words (and asks for an alignment every
    ``interval_s`` of new audio)."""

    def __init__(self, aligner: Aligner, text: Callable[[], str], on_marks: Optional[MarksSink] = None,
                 interval_s: float = 0.64, settle_s: float = 0.4, max_window_s: float = 60.0):
        self._align, self._text, self._on_marks = aligner, text, on_marks
        self.interval_s, self.settle_s, self.max_window_s = interval_s, settle_s, max_window_s
        self.settled: list[Word] = []
        self.failed: Optional[str] = None  # why the aligner could not be used (then no more marks)
        self._chunks: list[np.ndarray] = []  # the window's audio
        self._window_samples = 0
        self._start_ms = 0  # the window's start on the utterance's clock
        self._start_char = 0  # ...and in its text
        self._unaligned_samples = 0  # audio added since the last alignment began
        self._generated = False  # all audio is in
        self._all_settled = False  # ...and every word has settled (heard text needs no more alignment)
        self._aligning: Optional[asyncio.Task] = None

    @property
    def audio_ms(self) -> float:
        return self._start_ms + self._window_samples / SAMPLES_PER_MS

    def add_audio(self, chunk: np.ndarray) -> None:
        """Generated audio (float32, 24 kHz), in order; starts an alignment in the background when one is due."""
        if not chunk.size or self.failed:
            return
        self._chunks.append(chunk)
        self._window_samples += chunk.size
        self._unaligned_samples += chunk.size
        due = self.interval_s if self._on_marks is not None else self.max_window_s
        if self._aligning is None and self._unaligned_samples >= due * SAMPLE_RATE:
            self._aligning = asyncio.get_running_loop().create_task(self._settle(final=False))

    async def finish(self) -> None:
        """All audio is in: with marks asked for, align the rest and settle every word (sending the last marks);
        without, nothing (what a listener heard is aligned only if an interrupt asks)."""
        self._generated = True
        if self._on_marks is None:
            return
        await self._wait()
        if not self.failed and self._window_samples and self._start_char < len(self._text()):
            await self._settle(final=True)
        self._all_settled = not self.failed

    async def heard_text(self, heard_ms: float, timeout_s: float) -> Optional[str]:
        """The text up to the last word that ended by ``heard_ms``, from the audio generated so far; None when the
        aligner could not say (failed, or took longer than ``timeout_s``)."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._wait()
                words = list(self.settled)
                text = self._text()
                if heard_ms > (words[-1].end_ms if words else 0) and self._window_samples and \
                        self._start_char < len(text) and not self.failed and not self._all_settled:
                    window, chars = self._window(final=self._generated, until_ms=heard_ms + HEARD_CONTEXT_MS)
                    words += [w.shifted(self._start_ms, self._start_char) for w in await self._align(window, chars)]
        except (AlignerUnavailable, TimeoutError) as exc:
            reason = str(exc) or f"the aligner took over {timeout_s:g} s"
            log.warning("what the listener heard is unknown: %s", reason)
            return None
        except Exception:  # a bug costs the heard text, never the utterance's end message
            log.exception("what the listener heard is unknown")
            return None
        if self.failed:
            return None
        return heard_prefix(text, words, heard_ms)

    def close(self) -> None:
        if self._aligning is not None:
            self._aligning.cancel()

    async def _wait(self) -> None:
        if self._aligning is not None:
            await asyncio.gather(self._aligning, return_exceptions=True)

    def _window(self, final: bool, until_ms: Optional[float] = None) -> tuple[np.ndarray, str]:
        """The window's audio (up to ``until_ms`` on the utterance's clock, if given) and its text: all of the
        rest when ``final`` and the audio is whole, else what the talker had read by the audio's end."""
        audio = np.concatenate(self._chunks) if len(self._chunks) != 1 else self._chunks[0]
        self._chunks = [audio]
        if until_ms is not None and (until_ms - self._start_ms) * SAMPLES_PER_MS < audio.size:
            audio, final = audio[:max(0, int((until_ms - self._start_ms) * SAMPLES_PER_MS))], False
        rest = self._text()[self._start_char:]
        return audio, rest if final else rest[:read_ahead_chars(rest, audio.size / SAMPLE_RATE)]


    async def _settle(self, final: bool) -> None:
        try:
            self._unaligned_samples = 0
            audio, text = self._window(final)
            if not text.strip():
                return
            words = await self._align(audio, text)
            window_ms = audio.size / SAMPLES_PER_MS
            settled = words if final else []
            if not final:
                for index, word in enumerate(words[:-1]):  # the window's last word may go on past its end
                    if word.end_ms > window_ms - 1000 * self.settle_s:
                        break
                    settled = words[:index + 1]
            if not settled:
                return
            aligned = {"startMs": self._start_ms, "endMs": self._start_ms + int(window_ms),
                       "charStart": self._start_char, "charEnd": self._start_char + len(text)}
            absolute = [w.shifted(self._start_ms, self._start_char) for w in settled]
            self.settled += absolute
            if not final:  # the next window starts where the last settled word ended
                self._advance(settled[-1].end_ms, settled[-1].char_end)
            if self._on_marks is not None:
                await self._on_marks(absolute, aligned)
        except AlignerUnavailable as exc:
            self.failed = str(exc)
            log.warning("word marks stop for this utterance: %s", exc)
        except Exception:  # a bug costs this utterance its marks, never its audio
            self.failed = "internal error"
            log.exception("word marks stop for this utterance")
        finally:
            if asyncio.current_task() is self._aligning:
                self._aligning = None

    def _advance(self, end_ms: int, char_end: int) -> None:
        drop = end_ms * SAMPLES_PER_MS
        audio = np.concatenate(self._chunks) if len(self._chunks) != 1 else self._chunks[0]
        self._chunks = [audio[drop:]]
        self._window_samples = audio.size - drop
        self._start_ms += end_ms
        self._start_char += char_end


def utterance_words(endpoints, settings, language: Optional[str], text: Callable[[], str],
                    on_marks: Optional[MarksSink] = None) -> Optional[UtteranceWords]:
    """A tracker of an utterance's words through the endpoints' aligner; None when no endpoint serves one."""
    if not endpoints.aligner:
        return None

    async def aligner(audio: np.ndarray, window_text: str) -> list[Word]:
        return await align(endpoints, audio, window_text, language)

    return UtteranceWords(aligner, text, on_marks, settings.marks_interval_s, settings.marks_settle_s)


@contextlib.contextmanager
def closing(words: Optional[UtteranceWords]):
    """Stops a tracker's background alignment however the utterance ends."""
    try:
        yield words
    finally:
        if words is not None:
            words.close()
