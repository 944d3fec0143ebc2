"""Engine errors, each with a stable code that crosses Triton as a ``[CODE] message`` prefix."""
from __future__ import annotations

import re


class EngineError(Exception):
    """Base class: ``code`` is one of the names in ``ERROR_CODES``."""

    code = "SYNTHESIS_ERROR"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def wire(self) -> str:
        """The message as sent in a Triton error: the code in brackets, then the text."""
        return f"[{self.code}] {self.message}"


class InvalidText(EngineError):
    code = "INVALID_TEXT"


class InvalidRequest(EngineError):
    """A malformed input or an out-of-range parameter."""

    code = "INVALID_REQUEST"


class UnsupportedLanguage(EngineError):
    code = "INVALID_CONFIG"


class VoiceNotFound(EngineError):
    code = "VOICE_NOT_FOUND"


class InvalidAudio(EngineError):
    code = "INVALID_AUDIO"


class ModelDirError(EngineError):
    """The model directory is missing or incomplete."""

    code = "MODEL_LOADING"


class Cancelled(EngineError):
    code = "CANCELLED"


class Overloaded(EngineError):
    """Every talker slot is busy and the waiting line is full, or a request waited too long for a slot."""

    code = "OVERLOADED"


# One table: every code that can appear in an engine error, and what it means.
ERROR_CODES = {
    "INVALID_TEXT": "text missing, empty, or too long",
    "INVALID_REQUEST": "malformed input tensor or out-of-range sampling parameter",
    "INVALID_CONFIG": "unsupported language",
    "VOICE_NOT_FOUND": "unknown voice id",
    "INVALID_AUDIO": "reference audio unusable (too short, too long, silent, bad sample rate)",
    "MODEL_LOADING": "model directory missing or incomplete",
    "CANCELLED": "the request was cancelled by the client",
    "OVERLOADED": "the talker is at capacity and its waiting line is full (or the wait was too long)",
    "SYNTHESIS_ERROR": "unexpected failure inside the model",
}

_WIRE = re.compile(r"\[([A-Z_]+)\]\s*")


def parse_wire(message: str) -> tuple[str, str]:
    """Split a Triton error message into (code, text); unknown shapes map to SYNTHESIS_ERROR.

    Triton may prefix the model's message (e.g. "in ensemble 'tts', "), so the first known code wins."""
    message = message or ""
    for match in _WIRE.finditer(message):
        if match.group(1) in ERROR_CODES:
            return match.group(1), message[match.end():].strip()
    return "SYNTHESIS_ERROR", message.strip()
