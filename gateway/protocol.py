"""The speak protocol: one typed class per wire message, one table of error codes.

Client messages are validated here; anything malformed becomes a ProtocolError with the right code.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

from tts_contract.audio import SAMPLE_RATE
from tts_contract.deadlines import MAX_WAIT_LIMIT_MS
from tts_contract.errors import RECOVERABLE, ErrorCode
from tts_contract.languages import AUTO, LANGUAGES, UnknownLanguage
from tts_contract.languages import normalise_language as _normalise_language

SAMPLE_RATES = (8000, 16000, 22050, 24000, 44100, 48000)  # the rates the gateway resamples to
ENCODINGS = ("pcm16", "pcm32f")
TEXT_MODES = ("auto", "continuous", "sentences")  # how appended text is spoken (see SPEAK_PROTOCOL: textMode)
TRANSPORTS = ("binary", "base64")

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001  # the gateway is shutting down
CLOSE_POLICY = 1008  # unauthorized
CLOSE_SERVICE_RESTART = 1012  # connecting while the gateway shuts down
CLOSE_TRY_AGAIN = 1013  # too many sessions


class ProtocolError(Exception):
    def __init__(self, code: ErrorCode, message: str, request_id: Optional[str] = None):
        super().__init__(message)
        self.code, self.message, self.request_id = code, message, request_id


# -- client -> server --------------------------------------------------------------------------------------

class _ClientMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # unknown fields are ignored


class Start(_ClientMessage):
    type: Literal["start"]
    sampleRate: StrictInt = SAMPLE_RATE
    encoding: StrictStr = "pcm16"
    voice: Optional[StrictStr] = None
    language: StrictStr = "English"
    authToken: Optional[StrictStr] = None
    contractId: Optional[StrictStr] = None
    audioTransport: StrictStr = "binary"
    maxWaitMs: StrictInt = Field(0, ge=0, le=MAX_WAIT_LIMIT_MS)  # this session's utterances may queue this long
    textMode: StrictStr = "auto"  # how appended text is spoken: continuous, sentences, or auto
    wordTimestamps: StrictBool = False  # stream `marks` (word times on each utterance's audio clock)
    model: Optional[StrictStr] = None  # a served model's name or alias (None: keep the session's; at first the default)
    instruct: Optional[StrictStr] = None  # a style instruction, or a VoiceDesign model's voice description


class _TextMessage(_ClientMessage):
    """Text to speak, with the utterance's overrides (speak, and the append that opens an utterance)."""

    text: Optional[StrictStr] = None
    voice: Optional[StrictStr] = None
    language: Optional[StrictStr] = None
    priority: StrictStr = "normal"
    requestId: Optional[StrictStr] = None
    maxWaitMs: Optional[StrictInt] = Field(None, ge=0, le=MAX_WAIT_LIMIT_MS)  # None: the session's
    textMode: Optional[StrictStr] = None  # None: the session's


class Speak(_TextMessage):
    type: Literal["speak"]


class Append(_TextMessage):
    """Text for the open streamed utterance (opening one when none is open)."""

    type: Literal["append"]


class Flush(_ClientMessage):
    type: Literal["flush"]


class End(_ClientMessage):
    type: Literal["end"]


class Cancel(_ClientMessage):
    type: Literal["cancel"]


class Stop(_ClientMessage):
    type: Literal["stop"]
    reason: StrictStr = "user_requested"


class Played(_ClientMessage):
    """What the client has really played of an utterance (its own clock corrects the server's estimate)."""

    type: Literal["played"]
    requestId: Optional[StrictStr] = None  # None: the utterance playing now
    ms: StrictInt = Field(ge=0, le=24 * 3600 * 1000)


class Interrupt(_ClientMessage):
    """Stop what plays in every session of this subject's conversation ``contractId``, on every replica."""

    type: Literal["interrupt"]
    contractId: Optional[StrictStr] = None  # None: this session's own contract


CLIENT_MESSAGES = {"start": Start, "speak": Speak, "append": Append, "flush": Flush, "end": End, "cancel": Cancel,
                   "stop": Stop, "played": Played, "interrupt": Interrupt}
ClientMessage = Union[Start, Speak, Append, Flush, End, Cancel, Stop, Played, Interrupt]


def parse_client_message(raw: str) -> ClientMessage:
    """Parse one text frame, or raise ProtocolError(INVALID_MESSAGE) saying what is wrong."""
    try:
        data = json.loads(raw)
    except RecursionError:
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, "message is nested too deeply") from None
    except (ValueError, TypeError) as exc:  # bad JSON, or an integer beyond Python's 4300-digit limit
        detail = "has a number too large to read" if "digits" in str(exc) else "is not valid JSON"
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, f"message {detail}") from None
    if not isinstance(data, dict):
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, "message must be a JSON object")
    request_id = data.get("requestId") if isinstance(data.get("requestId"), str) else None
    bad_string = invalid_unicode(data)
    if bad_string is not None:
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, f"'{bad_string}' is not valid Unicode (a lone surrogate)",
                            None if bad_string == "requestId" else request_id)
    kind = data.get("type")
    if kind is None:
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, "message has no 'type'", request_id)
    cls = CLIENT_MESSAGES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        shown = repr(kind) if len(repr(kind)) <= 40 else repr(kind)[:37] + "..."
        raise ProtocolError(ErrorCode.INVALID_MESSAGE,
                            f"unknown message type {shown}; expected one of {', '.join(CLIENT_MESSAGES)}", request_id)
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, f"invalid '{kind}' message: {problems}", request_id) from None


def invalid_unicode(value, path: str = "") -> Optional[str]:
    """The path of the first string (or key) that cannot be encoded as UTF-8, or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "message"
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        inner = f"{path}.{key}" if path else str(key)
        found = invalid_unicode(key, inner) if isinstance(key, str) else None
        found = found or invalid_unicode(item, inner)
        if found:
            return found
    return None


def normalise_language(value: str) -> str:
    """Canonical language name, or raise INVALID_CONFIG (a language given as blank too: "Auto" says "infer it")."""
    try:
        return _normalise_language(value, blank_is_auto=False)
    except UnknownLanguage as exc:
        raise ProtocolError(ErrorCode.INVALID_CONFIG, str(exc)) from None


# -- server -> client --------------------------------------------------------------------------------------

@dataclass
class _ServerMessage:
    def to_json(self) -> str:
        data = {"type": self.type}  # type: ignore[attr-defined]
        data.update({k: v for k, v in asdict(self).items() if v is not None or k in self._keep_none})
        return json.dumps(data)

    _keep_none = ()


@dataclass
class Ready(_ServerMessage):
    sessionId: str
    voiceLoaded: Optional[str]
    capabilities: dict = field(default_factory=lambda: {
        "streaming": True, "languages": list(LANGUAGES) + [AUTO], "encodings": list(ENCODINGS),
        "sampleRates": list(SAMPLE_RATES)})
    type = "ready"
    _keep_none = ("voiceLoaded",)


@dataclass
class Started(_ServerMessage):
    sampleRate: int
    encoding: str
    voice: Optional[str]
    language: str
    textMode: str = "sentences"
    wordTimestamps: bool = False  # whether `marks` come (asked for, and this deployment has an aligner)
    model: Optional[str] = None  # the served model the session's utterances go to (None: not described yet)
    instruct: Optional[str] = None  # the session's instruction, when it has one
    type = "started"
    _keep_none = ("voice",)


@dataclass
class AudioChunk(_ServerMessage):
    data: str
    sequenceNumber: int
    isFinal: bool
    timestampMs: int
    type = "audioChunk"


@dataclass
class Complete(_ServerMessage):
    durationMs: int
    charactersProcessed: int
    audioLengthMs: int
    firstAudioMs: Optional[int]
    cancelled: bool
    requestId: Optional[str] = None
    underruns: int = 0  # times the audio came later than real-time playback from its first audio needed it
    stallMs: int = 0  # how long a listener playing at real time would have waited, in all
    interrupted: Optional[bool] = None  # true when an interrupt (by contract) ended it
    heardMs: Optional[int] = None  # a cancelled or interrupted utterance: audio its listener had played
    heardText: Optional[str] = None  # ...and its text as written up to the last word that ended by then
    type = "complete"
    _keep_none = ("firstAudioMs",)

    def __post_init__(self):
        if self.heardMs is not None:  # heardText is null (not absent) when no aligner could say it
            self._keep_none = ("firstAudioMs", "heardText")


@dataclass
class Interrupted(_ServerMessage):
    """An interrupt came while the listener still played an utterance whose audio had all been sent (its
    `complete` is out already): what it heard of it."""

    requestId: Optional[str]
    heardMs: int
    heardText: Optional[str]
    audioLengthMs: int
    type = "interrupted"
    _keep_none = ("requestId", "heardText")


@dataclass
class Marks(_ServerMessage):
    """Words whose times have settled, on the utterance's own audio clock (0 = its first sample). ``aligned`` is
    the window of audio and text the aligner was given for them (times and characters within the utterance)."""

    words: list
    requestId: Optional[str] = None
    aligned: Optional[dict] = None
    type = "marks"


@dataclass
class AudioEnd(_ServerMessage):
    cancelled: bool
    sample_rate: int = SAMPLE_RATE
    format: str = "pcm_s16le"
    channels: int = 1
    type = "audio_end"


@dataclass
class Error(_ServerMessage):
    code: str
    message: str
    recoverable: bool
    requestId: Optional[str] = None
    retryAfterMs: Optional[int] = None  # RATE_LIMITED because capacity stayed full: when to try again
    type = "error"

    @classmethod
    def of(cls, code: ErrorCode, message: str, request_id: Optional[str] = None,
           retry_after_ms: Optional[int] = None) -> "Error":
        return cls(code=code.value, message=message, recoverable=RECOVERABLE[code], requestId=request_id,
                   retryAfterMs=retry_after_ms)


@dataclass
class Stopped(_ServerMessage):
    reason: str
    type = "stopped"
