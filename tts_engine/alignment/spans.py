"""Where the aligner's words lie in the text they came from, and which word splitter a language takes.

qwen-asr cleans the text before aligning it: it keeps letters, digits and apostrophes, splits on spaces (Japanese
with nagisa, Korean with soynlp) and makes each CJK ideograph a word of its own. Its words, joined, are the text's
kept characters in order, so each word maps back to the span from its first to its last character.
"""
from __future__ import annotations

import unicodedata
from typing import Optional, Sequence

from tts_contract.languages import AUTO, normalise_language


def is_kept(char: str) -> bool:
    """A character the aligner keeps in a word (qwen-asr's rule: letters, digits and the apostrophe)."""
    return char == "'" or unicodedata.category(char)[0] in "LN"


def word_spans(text: str, words: Sequence[str]) -> list[tuple[int, int]]:
    """(start, end) of each word in ``text``, in order: from its first character to just after its last.

    Each word's characters are matched in order from where the previous word ended, skipping what the aligner
    dropped (spaces, punctuation); a word the text does not hold there gets an empty span at that point."""
    spans = []
    cursor = 0
    for word in words:
        position, start = cursor, None
        for char in word:
            found = text.find(char, position)
            if found < 0:
                start = None
                break
            start = found if start is None else start
            position = found + len(char)
        if start is None:
            spans.append((cursor, cursor))
            continue
        spans.append((start, position))
        cursor = position
    return spans


def _has(text: str, *ranges: tuple[int, int]) -> bool:
    return any(low <= ord(char) <= high for char in text for low, high in ranges)


KANA = ((0x3040, 0x30FF), (0x31F0, 0x31FF), (0xFF66, 0xFF9F))  # hiragana, katakana (and their extensions)
HANGUL = ((0x1100, 0x11FF), (0x3130, 0x318F), (0xAC00, 0xD7AF))  # jamo, compatibility jamo, syllables


def alignment_language(language: Optional[str], text: str) -> str:
    """The language the aligner splits ``text`` as: the named one, or for Auto (and none) Japanese when the text
    has kana, Korean when it has Hangul, else English.

    Only Japanese and Korean have splitters of their own in qwen-asr; every other language (Chinese included:
    each ideograph is a word) is split the same way, on spaces, so English stands for all of them."""
    name = normalise_language(language)
    if name != AUTO:
        return name
    if _has(text, *KANA):
        return "Japanese"
    if _has(text, *HANGUL):
        return "Korean"
    return "English"


def has_words(text: str) -> bool:
    """Whether the aligner finds any word in ``text`` (one kept character is enough)."""
    return any(is_kept(char) for char in text)
