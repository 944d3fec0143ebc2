"""Splitting long text into sentences, so each is synthesised as its own request."""
from __future__ import annotations

import re

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
