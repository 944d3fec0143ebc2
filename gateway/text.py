"""An utterance's text: split into sentences, each synthesised as its own request (all at once, or as it arrives),
or kept whole as one continuous stream while it is being written."""
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


class TextFeed:
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


class OpenText:
    """An utterance's text as one continuous synthesis stream (``textMode`` continuous): pieces, flushes and the
    end, in the order they came. All of it is kept, so a stream that must start again elsewhere opens with the
    text so far. Buffered text with no append for ``idle_s`` is flushed (its last word committed)."""

    def __init__(self, idle_s: float = 5.0):
        self.idle_s = idle_s
        self.text = ""
        self.flushed_to = 0  # the text up to here is final as written
        self.closed = False
        self.on_waiting = None  # told True/False when the stream starts/stops waiting for the writer
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

    async def pieces(self, start: int, waiting=None):
        """(new text, flush) from character ``start`` on, as they come; ends once the text is closed and all of it
        given. ``waiting(bool)`` is told when it starts and stops waiting for the writer."""
        offset, flushed = start, 0  # a flush of the text before ``start`` is news to a request opened with it
        while True:
            self._changed.clear()
            if len(self.text) > offset or self.flushed_to > flushed:
                piece, offset = self.text[offset:], len(self.text)
                flush = self.flushed_to > flushed
                flushed = max(flushed, self.flushed_to)
                yield piece, flush
                continue
            if self.closed:
                return
            idle_left = self._last_append + self.idle_s - time.monotonic() if self.flushed_to < len(self.text) \
                else None
            if idle_left is not None and idle_left <= 0:
                self.flush()
                continue
            if waiting:
                waiting(True)
            try:
                async with asyncio.timeout(idle_left):
                    await self._changed.wait()
            except TimeoutError:
                pass  # the loop flushes if no append came meanwhile
            finally:
                if waiting:
                    waiting(False)
