"""Word timestamps: what the `aligner` model returns for audio and the text it says.

Its `words` output is one JSON list per request, in the text's order:
``[{"text": "Don't", "startMs": 120, "endMs": 480, "charStart": 0, "charEnd": 5}, ...]``.
``text`` is the aligner's word (only letters, digits and apostrophes; one CJK character is one word);
``charStart``/``charEnd`` is where that word lies in the request's text (Python string indexes, end
exclusive), so ``text[:charEnd]`` ends at a word boundary. Times are integer milliseconds from the audio's start.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterable


_FIELDS = (("text", "text"), ("start_ms", "startMs"), ("end_ms", "endMs"), ("char_start", "charStart"),
           ("char_end", "charEnd"))


@dataclass(frozen=True)
class Word:
    text: str
    start_ms: int
    end_ms: int
    char_start: int
    char_end: int

    def shifted(self, ms: int, chars: int) -> "Word":
        """The same word in a longer audio and text that start ``ms`` and ``chars`` earlier."""
        return Word(self.text, self.start_ms + ms, self.end_ms + ms, self.char_start + chars, self.char_end + chars)

    def to_wire(self) -> dict:
        """The word as JSON carries it (the `words` tensor, and the gateway's `marks` messages)."""
        return {wire: getattr(self, field) for field, wire in _FIELDS}


def encode_words(words: Iterable[Word]) -> bytes:
    """The `words` output tensor's value: UTF-8 JSON."""
    return json.dumps([word.to_wire() for word in words], ensure_ascii=False,
                      separators=(",", ":")).encode("utf-8")


def decode_words(value: bytes | str) -> list[Word]:
    """The words of a `words` output tensor's value."""
    return [Word(**{field: item[wire] for field, wire in _FIELDS}) for item in json.loads(value)]
