"""Error codes: the engine's (carried in Triton error messages as ``[CODE] message``), the speak protocol's
(sent to apps, each recoverable or not), and how the first become the second."""
from __future__ import annotations

import re
from enum import Enum


class EngineCode(str, Enum):
    INVALID_TEXT = "INVALID_TEXT"  # text missing, empty, or too long
    INVALID_REQUEST = "INVALID_REQUEST"  # malformed input tensor, bad voice id, bad sampling parameter
    INVALID_CONFIG = "INVALID_CONFIG"  # unsupported language
    VOICE_NOT_FOUND = "VOICE_NOT_FOUND"
    INVALID_AUDIO = "INVALID_AUDIO"  # reference audio unusable (undecodable, too short or long, silent)
    MODEL_LOADING = "MODEL_LOADING"  # model directory missing or incomplete, model not loaded
    CANCELLED = "CANCELLED"
    OVERLOADED = "OVERLOADED"  # no row in time for the first audio, the line full, or the wait too long
    SYNTHESIS_ERROR = "SYNTHESIS_ERROR"  # anything unexpected inside a model
    # the gateway's, never a model's: the speech server could not be reached or stopped making progress (a lost
    # connection, a silent host) — its model is not loading; another endpoint, or a retry, may serve
    UNAVAILABLE = "UNAVAILABLE"


class ErrorCode(str, Enum):
    """The speak protocol's error codes (docs/PROTOCOL.md)."""

    INVALID_MESSAGE = "INVALID_MESSAGE"
    INVALID_TEXT = "INVALID_TEXT"
    VOICE_NOT_FOUND = "VOICE_NOT_FOUND"
    INVALID_CONFIG = "INVALID_CONFIG"
    MODEL_LOADING = "MODEL_LOADING"
    SYNTHESIS_ERROR = "SYNTHESIS_ERROR"
    TIMEOUT = "TIMEOUT"
    RATE_LIMITED = "RATE_LIMITED"
    UNAUTHORIZED = "UNAUTHORIZED"
    TTS_UNAVAILABLE = "TTS_UNAVAILABLE"


RECOVERABLE = {
    ErrorCode.INVALID_MESSAGE: False,
    ErrorCode.INVALID_TEXT: False,
    ErrorCode.VOICE_NOT_FOUND: True,
    ErrorCode.INVALID_CONFIG: False,
    ErrorCode.MODEL_LOADING: True,
    ErrorCode.SYNTHESIS_ERROR: True,
    ErrorCode.TIMEOUT: True,
    ErrorCode.RATE_LIMITED: True,
    ErrorCode.UNAUTHORIZED: False,
    ErrorCode.TTS_UNAVAILABLE: True,
}

# Every engine code, as an app sees it.
PROTOCOL_CODE = {
    EngineCode.INVALID_TEXT: ErrorCode.INVALID_TEXT,
    EngineCode.INVALID_REQUEST: ErrorCode.INVALID_MESSAGE,
    EngineCode.INVALID_CONFIG: ErrorCode.INVALID_CONFIG,
    EngineCode.VOICE_NOT_FOUND: ErrorCode.VOICE_NOT_FOUND,
    EngineCode.INVALID_AUDIO: ErrorCode.INVALID_MESSAGE,
    EngineCode.MODEL_LOADING: ErrorCode.MODEL_LOADING,
    EngineCode.CANCELLED: ErrorCode.SYNTHESIS_ERROR,
    EngineCode.OVERLOADED: ErrorCode.RATE_LIMITED,
    EngineCode.SYNTHESIS_ERROR: ErrorCode.SYNTHESIS_ERROR,
    EngineCode.UNAVAILABLE: ErrorCode.TTS_UNAVAILABLE,
}

# Every protocol code, as an HTTP status (REST routes).
HTTP_STATUS = {
    ErrorCode.INVALID_MESSAGE: 400,
    ErrorCode.INVALID_TEXT: 400,
    ErrorCode.VOICE_NOT_FOUND: 404,
    ErrorCode.INVALID_CONFIG: 400,
    ErrorCode.MODEL_LOADING: 503,
    ErrorCode.SYNTHESIS_ERROR: 500,
    ErrorCode.TIMEOUT: 504,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.TTS_UNAVAILABLE: 503,
}

_WIRE = re.compile(r"\[([A-Z_]+)\]\s*")


def to_wire(code: EngineCode, message: str) -> str:
    """An engine error as a Triton error message: the code in brackets, then the text."""
    return f"[{EngineCode(code).value}] {message}"


def parse_wire(message: str) -> tuple[EngineCode, str]:
    """Split a Triton error message into (code, text); unknown shapes are SYNTHESIS_ERROR.

    Triton may prefix the model's message (e.g. "in ensemble 'tts', "), so the first known code wins."""
    message = message or ""
    for match in _WIRE.finditer(message):
        if match.group(1) in EngineCode.__members__:
            return EngineCode(match.group(1)), message[match.end():].strip()
    return EngineCode.SYNTHESIS_ERROR, message.strip()
