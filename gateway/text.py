"""An utterance's text: split into sentences, each synthesised as its own stream (all at once, or as it arrives:
``SentenceFeed``), or kept whole as one continuous stream while it is being written (``WrittenText``, spoken in
``TextSegment``s)."""
from __future__ import annotations

import asyncio
import re
import time
from collections import deque
from typing import Optional

_SENTENCE_END = re.compile(r"(?<=[.!?;…。！？；])\s+|(?<=[。！？；])")
_SOFT_BREAK = re.compile(r"(?<=[,:，、：])\s*|\s+")


def split_sentences(text: str, max_chars: int = 400, min_chars: int = 12) -> list[str]:
    """Sentences of at most ``max_chars``; very short fragments join their neighbour."""
    pieces = [p.strip() for p in _SENTENCE_END.split(text.strip()) if p and p.strip()]
    merged: list[str] = []
    for piece in pieces:
        if merged and len(merged[-1]) < min_chars and len(merged[-1]) + 1 + len(piece) <= max_chars:
            merged[-1] = f"{merged[-1]} {piece}"
        else:
            merged.append(piece)
    out: list[str] = []
    for sentence in merged:
        out.extend(_hard_split(sentence, max_chars))
    return out


def packed_sentences(text: str, max_chars: int) -> list[str]:
    """The text's sentences packed into as few pieces of at most ``max_chars`` as they fit (one piece when the
    whole text fits): for a VoiceDesign model, which designs a new voice for each stream."""
    pieces: list[str] = []
    for sentence in split_sentences(text, max_chars):
        if pieces and len(pieces[-1]) + 1 + len(sentence) <= max_chars:
            pieces[-1] = f"{pieces[-1]} {sentence}"
        else:
            pieces.append(sentence)
    return pieces


def _hard_split(sentence: str, max_chars: int) -> list[str]:
    """Split an over-long sentence at commas or spaces (or anywhere, as a last resort)."""
    if len(sentence) <= max_chars:
        return [sentence]
    parts, current = [], ""
    for token in _SOFT_BREAK.split(sentence):
        if not token:
            continue
        candidate = f"{current} {token}".strip() if current else token
        if len(candidate) <= max_chars:
            current = candidate
            continue
        if current:
            parts.append(current)
        while len(token) > max_chars:
            parts.append(token[:max_chars])
            token = token[max_chars:]
        current = token
    if current:
        parts.append(current)
    return parts


class SentenceFeed:
    """An utterance's sentences as they become available: all at once (``speak``), or as text is appended
    (``append``/``flush``/``end``: an LLM writing its answer). A sentence is complete once its closing
    punctuation is followed by more text; ``flush`` (or ``idle_s`` without an append) sends what is buffered,
    ``close`` ends the feed."""

    def __init__(self, max_sentence_chars: int = 400, sentences: Optional[list[str]] = None, idle_s: float = 5.0):
        self.max_sentence_chars, self.idle_s = max_sentence_chars, idle_s
        self._ready: deque[str] = deque(sentences or [])
        self._buffer = ""
        self.closed = sentences is not None
        self._changed = asyncio.Event()
        self._last_append = time.monotonic()

    def append(self, text: str) -> None:
        self._buffer += text
        self._last_append = time.monotonic()
        self._changed.set()  # restarts the idle wait
        matches = list(_SENTENCE_END.finditer(self._buffer))
        cut = matches[-1].end() if matches else 0
        if not cut and len(self._buffer) > self.max_sentence_chars:  # no sentence end in sight: split softly,
            breaks = list(_SOFT_BREAK.finditer(self._buffer))  # keeping the last (maybe unfinished) word
            cut = breaks[-1].end() if breaks and breaks[-1].end() > 0 else len(self._buffer)
        if cut:
            self._emit(self._buffer[:cut])
            self._buffer = self._buffer[cut:]

    def flush(self) -> None:
        self._emit(self._buffer)
        self._buffer = ""

    def close(self) -> None:
        self.flush()
        self.closed = True
        self._changed.set()

    def take_ready(self) -> Optional[str]:
        """The next complete sentence if one is waiting, else None (never waits)."""
        return self._ready.popleft() if self._ready else None

    async def next(self) -> Optional[str]:
        """The next sentence, waiting for text as long as it takes; None once the feed is closed and empty.
        Buffered text with no append for ``idle_s`` is sent as if flushed."""
        while not self._ready and not self.closed:
            self._changed.clear()
            idle_left = self._last_append + self.idle_s - time.monotonic() if self._buffer.strip() else None
            if idle_left is not None and idle_left <= 0:
                self.flush()
                continue
            try:
                async with asyncio.timeout(idle_left):
                    await self._changed.wait()
            except TimeoutError:
                pass  # the loop flushes if no append came meanwhile
        return self._ready.popleft() if self._ready else None

    def _emit(self, text: str) -> None:
        if text.strip():
            self._ready.extend(split_sentences(text, self.max_sentence_chars))
            self._changed.set()


class WrittenText:
    """An utterance's text as continuous synthesis (``textMode`` continuous): pieces, flushes and the end, in the
    order they came. A long text is spoken as several streams (segments), each cut at the first sentence end
    after ``segment_chars`` (or at a space before ``hard_chars``, the talker's limit): one stream's speaking rate
    is reported to drift upward over ~25 s. All the text is kept, so a stream that must start again elsewhere
    opens with its text so far. Text with no append for ``idle_s`` is flushed (its last word committed)."""

    def __init__(self, idle_s: float = 5.0, segment_chars: int = 400, hard_chars: int = 2000):
        self.idle_s, self.segment_chars, self.hard_chars = idle_s, segment_chars, hard_chars
        self.text = ""
        self.flushed_to = 0  # the text up to here is final as written
        self.closed = False
        self.on_waiting = None  # told True/False when a stream starts/stops waiting for the writer
        self._changed = asyncio.Event()
        self._last_append = time.monotonic()

    def append(self, text: str) -> None:
        self.text += text
        self._last_append = time.monotonic()
        self._changed.set()

    def flush(self) -> None:
        if len(self.text) > self.flushed_to:
            self.flushed_to = len(self.text)
            self._changed.set()

    def close(self) -> None:
        self.closed = True
        self._changed.set()

    def segment(self, start: int) -> "TextSegment":
        """The stream of the text from character ``start``, up to its cut (or the end)."""
        return TextSegment(self, start)

    def cut(self, start: int) -> Optional[int]:
        """Where the segment starting at ``start`` ends, once that is known: the end of the first sentence ending
        past ``segment_chars``, else (past ``hard_chars``) the last space or comma before it; None while unknown."""
        if len(self.text) - start <= self.segment_chars:
            return None
        ending = _SENTENCE_END.search(self.text, start + self.segment_chars)
        if ending is not None and ending.end() - start <= self.hard_chars:
            return ending.end()
        if len(self.text) - start <= self.hard_chars:
            return None
        breaks = [m.end() for m in _SOFT_BREAK.finditer(self.text, start, start + self.hard_chars) if m.end() > start]
        return breaks[-1] if breaks else start + self.hard_chars

    async def _wait(self) -> None:
        """Until the text changes; flushes it once it has been idle for ``idle_s``."""
        self._changed.clear()
        idle_left = self._last_append + self.idle_s - time.monotonic() if self.flushed_to < len(self.text) else None
        if idle_left is not None and idle_left <= 0:
            self.flush()
            return
        if self.on_waiting:
            self.on_waiting(True)
        try:
            async with asyncio.timeout(idle_left):
                await self._changed.wait()
        except TimeoutError:
            pass  # the caller's next round flushes if no append came meanwhile
        finally:
            if self.on_waiting:
                self.on_waiting(False)


class TextSegment:
    """One synthesis stream's share of a ``WrittenText``: the text from ``start`` to its cut."""

    def __init__(self, source: WrittenText, start: int):
        self.source, self.start = source, start
        self.end: Optional[int] = None  # where it ended, once it has

    @property
    def text(self) -> str:
        """Its text so far (what a stream opening now starts with)."""
        cut = self.source.cut(self.start)
        return self.source.text[self.start:cut if cut is not None else len(self.source.text)]

    @property
    def last(self) -> bool:
        """Whether it ended with the whole text (rather than at a cut)."""
        return self.end is not None and self.source.closed and self.end >= len(self.source.text)

    async def pieces(self, offset: int):
        """(new text, flush) from ``offset`` (in this segment) on, as they come; ends at the cut, or once the text
        is closed and all of it given."""
        source, position, flushed = self.source, self.start + offset, self.start
        while True:
            cut = source.cut(self.start)
            stop = cut if cut is not None else len(source.text)
            flush = source.flushed_to > flushed and source.flushed_to <= stop
            if stop > position or flush:
                piece, position = source.text[position:stop], stop
                flushed = max(flushed, min(source.flushed_to, stop))
                yield piece, flush
                continue
            if cut is not None or source.closed:
                self.end = stop
                return
            await source._wait()
