"""Text that grows while it is spoken: appended in pieces (bytes split anywhere, or str), tokenised as it grows,
and committed only where the ids can no longer change, so the committed ids always equal tokenising the whole
text. The talker feeds one committed id per step; a row whose next id is not committed yet waits."""
from __future__ import annotations

import codecs
import threading
import time
from typing import Callable, Optional

from ..errors import InvalidRequest, InvalidText

# qwen-tts wraps the text as a chat turn (Qwen3TTSModel._build_assistant_text); the talker reads the first three
# ids as the role, the fourth as the first text token, and the last five as the turn's end.
TURN_PREFIX = "<|im_start|>assistant\n"
TURN_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"
ROLE_IDS = 3
SUFFIX_IDS = 5


class TextFeed:
    """One utterance's text as it arrives. ``tokenize(str) -> ids`` and ``pre_split(str) -> [(piece, (start,
    end))]`` are the model's tokenizer and its pre-tokenizer. ``ids`` are the committed ids of the whole turn
    (prefix, text so far; once closed, the suffix too). Thread-safe: text is appended from any thread while the
    serving loop reads ``ids``."""

    def __init__(self, tokenize: Callable[[str], list], pre_split: Callable[[str], list], max_chars: int = 100_000):
        self._tokenize, self._pre_split, self.max_chars = tokenize, pre_split, max_chars
        self._decoder = codecs.getincrementaldecoder("utf-8")("strict")
        self._text = ""
        self._ids: list[int] = []
        self._stable_chars = 0  # characters of the text whose ids are committed
        self.closed = False
        self.last_append = time.monotonic()
        self.on_append: Optional[Callable[[], None]] = None  # told after text arrives or the feed closes
        self._lock = threading.Lock()

    @classmethod
    def for_tokenizer(cls, tokenizer, **kwargs) -> "TextFeed":
        """A feed over a Hugging Face fast tokenizer (qwen-tts's ``processor.tokenizer``)."""
        pre_tokenizer = tokenizer.backend_tokenizer.pre_tokenizer
        return cls(lambda text: tokenizer(text, add_special_tokens=False)["input_ids"],
                   pre_tokenizer.pre_tokenize_str, **kwargs)

    @property
    def text(self) -> str:
        with self._lock:
            return self._text

    @property
    def ids(self) -> list[int]:
        with self._lock:
            return list(self._ids)

    @property
    def text_ids(self) -> int:
        """Committed ids of the text itself (not the turn's role or end)."""
        with self._lock:
            return max(0, len(self._ids) - ROLE_IDS - (SUFFIX_IDS if self.closed else 0))

    def append(self, piece) -> None:
        """Add text (str, or UTF-8 bytes split anywhere: an incomplete character waits for its other bytes)."""
        with self._lock:
            if self.closed:
                raise InvalidText("the text was already closed")
            try:
                text = self._decoder.decode(piece) if isinstance(piece, (bytes, bytearray)) else str(piece)
            except UnicodeDecodeError as exc:
                raise InvalidText(f"text is not valid UTF-8: {exc.reason}") from None
            if len(self._text) + len(text) > self.max_chars:
                raise InvalidText(f"text longer than {self.max_chars} characters")
            self._text += text
            self.last_append = time.monotonic()
            self._commit()
        if self.on_append is not None:
            self.on_append()

    def close(self) -> None:
        """No more text: everything is committed, and the turn's end with it."""
        with self._lock:
            if self.closed:
                return
            try:
                self._text += self._decoder.decode(b"", final=True)
            except UnicodeDecodeError:
                raise InvalidText("text ends inside a UTF-8 character") from None
            if not self._text.strip():
                raise InvalidText("text is empty")
            ids = self._tokenize(TURN_PREFIX + self._text + TURN_SUFFIX)
            if ids[:len(self._ids)] != self._ids:  # pragma: no cover - the stability rule failed
                raise RuntimeError("committed text ids changed at the close")
            self._ids, self._stable_chars, self.closed = ids, len(self._text), True
        if self.on_append is not None:
            self.on_append()

    def _commit(self) -> None:
        """Commit the ids of the text up to its last pre-token (a word, number or run that may still grow)."""
        turn = TURN_PREFIX + self._text
        starts = [start for _, (start, _) in self._pre_split(turn) if start >= len(TURN_PREFIX)]
        # Candidate boundaries, latest first: the start of the last pre-token, then of those before it (used only
        # if tokenising up to a later one disagrees with tokenising the whole text so far).
        whole = None
        for boundary in reversed(starts):
            boundary -= len(TURN_PREFIX)
            if boundary <= self._stable_chars:
                return
            ids = self._tokenize(turn[:len(TURN_PREFIX) + boundary])
            whole = whole if whole is not None else self._tokenize(turn)
            if whole[:len(ids)] == ids:
                self._ids, self._stable_chars = ids, boundary
                return


class OpenTexts:
    """Texts still being written, by the key their client gave them: more text and the end arrive addressed to
    that key. Thread-safe."""

    def __init__(self):
        self._feeds: dict[int, TextFeed] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._feeds)

    def open(self, key: int, feed: TextFeed) -> None:
        with self._lock:
            if key in self._feeds:
                raise InvalidRequest(f"text key {key} is already open")
            self._feeds[key] = feed

    def append(self, key: int, piece: bytes, end: bool) -> None:
        """Continue (and with ``end``, close) the text with this key."""
        with self._lock:
            feed = self._feeds.get(key)
        if feed is None:
            raise InvalidRequest(f"no open text with key {key} (never opened, or its stream has ended)")
        if piece:
            feed.append(piece)
        if end:
            feed.close()

    def forget(self, key: int) -> None:
        with self._lock:
            self._feeds.pop(key, None)
