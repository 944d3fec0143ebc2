"""The languages Qwen3-TTS speaks, and the one place a language name is normalised."""
from __future__ import annotations

from typing import Optional

LANGUAGES = ("English", "Chinese", "Japanese", "Korean", "German", "French", "Russian", "Portuguese",
             "Spanish", "Italian")
AUTO = "Auto"  # let the model infer the language from the text


class UnknownLanguage(ValueError):
    pass


def normalise_language(value: Optional[str], blank_is_auto: bool = True) -> str:
    """The canonical spelling ("English", ..., "Auto") of a language name in any case; None means Auto, and so
    does a blank name unless ``blank_is_auto`` is false (a client that names a language must name one)."""
    if not blank_is_auto and value is not None and not value.strip():
        raise UnknownLanguage(f"language {value!r} is blank; name one of {', '.join(LANGUAGES)}, or {AUTO} to "
                              "infer it from the text")
    name = (value or "").strip().lower() or AUTO.lower()
    for known in LANGUAGES + (AUTO,):
        if known.lower() == name:
            return known
    raise UnknownLanguage(f"unsupported language {value!r}; supported: {', '.join(LANGUAGES)}, {AUTO}")
