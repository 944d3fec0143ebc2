"""Text that grows while it is spoken: appended in pieces (bytes split anywhere, or str), tokenised as it grows,
and committed only where the ids can no longer change, so the committed ids always equal tokenising the whole
text. The talker feeds one committed id per step; a row whose next id is not committed yet waits."""
from __future__ import annotations

import codecs
import copy
import threading
import time
from typing import Callable, Optional

from ..errors import InvalidText

# qwen-tts wraps the text as a chat turn (Qwen3TTSModel._build_assistant_text); the talker reads the first three
# ids as the role, the fourth as the first text token, and the last five as the turn's end.
TURN_PREFIX = "<|im_start|>assistant\n"
TURN_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"
ROLE_IDS = 3
SUFFIX_IDS = 5


_PRIVATE_TOKENIZERS: dict = {}  # id(tokenizer) -> (tokenizer, its copy for feeds, the lock that copy is used under)
_PRIVATE_LOCK = threading.Lock()


def _private_tokenizer(tokenizer) -> tuple:
    with _PRIVATE_LOCK:
        entry = _PRIVATE_TOKENIZERS.get(id(tokenizer))
        if entry is None or entry[0] is not tokenizer:
            entry = _PRIVATE_TOKENIZERS[id(tokenizer)] = (tokenizer, copy.deepcopy(tokenizer), threading.Lock())
        return entry[1], entry[2]


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
        self._flushed_ids: list[int] = []  # ids fixed by flushes (the turn's start included)
        self._flushed_chars = 0  # characters of the text those cover
        self.closed = False
        self.last_append = time.monotonic()
        self.on_append: Optional[Callable[[], None]] = None  # told after text arrives or the feed closes
        self._lock = threading.Lock()

    @classmethod
    def for_tokenizer(cls, tokenizer, **kwargs) -> "TextFeed":
        """A feed over a Hugging Face fast tokenizer (qwen-tts's ``processor.tokenizer``). Feeds tokenise with a
        private copy of it, one call at a time: a fast tokenizer used from two threads at once fails ("Already
        borrowed"), text arrives on request threads, and the serving loop uses the model's own copy meanwhile."""
        private, lock = _private_tokenizer(tokenizer)
        pre_tokenizer = private.backend_tokenizer.pre_tokenizer

        def tokenize(text: str) -> list:
            with lock:
                return private(text, add_special_tokens=False)["input_ids"]

        def pre_split(text: str) -> list:
            with lock:
                return pre_tokenizer.pre_tokenize_str(text)

        return cls(tokenize, pre_split, **kwargs)

    @property
    def text(self) -> str:
        with self._lock:
            return self._text

    @property
    def ids(self) -> list[int]:
        with self._lock:
            return list(self._ids)

    def snapshot(self) -> tuple[list, bool]:
        """The committed ids and whether the text is closed, read together."""
        with self._lock:
            return list(self._ids), self.closed

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

    def flush(self) -> None:
        """The text so far is final as written: commit it all, the last word too (what follows is tokenised on
        its own, so the ids equal tokenising the whole text only where the flush fell between two words)."""
        with self._lock:
            if self.closed:
                return
            segment = self._text[self._flushed_chars:]
            if segment:
                self._ids = self._flushed_ids + self._tokenize(self._head() + segment)
                self._flushed_ids, self._flushed_chars = list(self._ids), len(self._text)
                self._stable_chars = len(self._text)
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
            ids = self._flushed_ids + self._tokenize(self._head() + self._text[self._flushed_chars:] + TURN_SUFFIX)
            if ids[:len(self._ids)] != self._ids:  # pragma: no cover - the stability rule failed
                raise RuntimeError("committed text ids changed at the close")
            self._ids, self._stable_chars, self.closed = ids, len(self._text), True
        if self.on_append is not None:
            self.on_append()

    def _head(self) -> str:
        """What the unflushed text is tokenised after: the turn's start, or nothing after a flush."""
        return "" if self._flushed_chars else TURN_PREFIX

    def _commit(self) -> None:
        """Commit the ids of the text up to its last pre-token (a word, number or run that may still grow)."""
        head, offset = self._head(), self._flushed_chars
        segment = head + self._text[offset:]
        starts = [start for _, (start, _) in self._pre_split(segment) if start >= len(head)]
        # Candidate boundaries, latest first: the start of the last pre-token, then of those before it (used only
        # if tokenising up to a later one disagrees with tokenising the whole text so far).
        whole = None
        for start in reversed(starts):
            boundary = offset + start - len(head)  # in the text
            if boundary <= self._stable_chars:
                return
            ids = self._tokenize(segment[:start])
            whole = whole if whole is not None else self._tokenize(segment)
            if whole[:len(ids)] == ids:
                self._ids, self._stable_chars = self._flushed_ids + ids, boundary
                return
