"""Engine errors, each carrying a contract code that crosses Triton as a ``[CODE] message`` prefix."""
from __future__ import annotations

from tts_contract.errors import EngineCode, to_wire


class EngineError(Exception):
    code = EngineCode.SYNTHESIS_ERROR

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def wire(self) -> str:
        """The message as sent in a Triton error: the code in brackets, then the text."""
        return to_wire(self.code, self.message)


class InvalidText(EngineError):
    code = EngineCode.INVALID_TEXT


class InvalidRequest(EngineError):
    """A malformed input or an out-of-range parameter."""

    code = EngineCode.INVALID_REQUEST


class UnsupportedLanguage(EngineError):
    code = EngineCode.INVALID_CONFIG


class VoiceNotFound(EngineError):
    code = EngineCode.VOICE_NOT_FOUND


class InvalidAudio(EngineError):
    code = EngineCode.INVALID_AUDIO


class ModelDirError(EngineError):
    """The model directory is missing or incomplete."""

    code = EngineCode.MODEL_LOADING


class Cancelled(EngineError):
    code = EngineCode.CANCELLED


class Overloaded(EngineError):
    """The talker cannot start a stream in time for its first audio, its line is full, or a stream waited too long
    for a row."""

    code = EngineCode.OVERLOADED


class Unfollowable(EngineError):
    """A voice or instruction this model cannot follow (tts_contract.models.conditioning_error): refused, never
    dropped."""

    def __init__(self, code: EngineCode, message: str):
        super().__init__(message)
        self.code = code
