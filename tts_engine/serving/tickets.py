"""The scheduler's plain data: a stream's deadline and ticket (numbers only, no model state), what one pass plans,
what executing it gave, and the events it produces (chunks and ends, for the output thread)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from tts_contract import deadlines as names
from tts_contract.speech_length import expected_frames

from ..errors import InvalidRequest
from .pacing import ChunkPolicy, Pacer


@dataclass(frozen=True)
class Deadline:
    """When a stream's listener needs its audio (request parameters; see tts_contract.deadlines)."""

    lead_s: float = 0.0  # audio the listener already has ahead of this stream's first audio
    continuation: bool = False  # a later sentence of an utterance that is playing: never refused for load
    first_audio_budget_s: Optional[float] = None  # None: the server's default
    max_wait_s: float = 0.0  # may wait this long for capacity instead of being refused

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "Deadline":
        """The deadline parameters among a request's parameters; bad values are InvalidRequest."""
        def number(name: str, low: float, high: float) -> Optional[float]:
            raw = values.get(name)
            if raw is None:
                return None
            try:
                value = float(raw)
            except (TypeError, ValueError):
                value = float("nan")
            if isinstance(raw, bool) or not low <= value <= high:
                raise InvalidRequest(f"parameter '{name}'={raw!r} must be a number within {low:g}..{high:g}")
            return value

        continuation = values.get(names.CONTINUATION, False)
        if isinstance(continuation, str) and continuation.lower() in ("true", "false", "1", "0"):
            continuation = continuation.lower() in ("true", "1")
        if not isinstance(continuation, bool):
            raise InvalidRequest(f"parameter '{names.CONTINUATION}'={continuation!r} must be a boolean")
        lead = number(names.LEAD_MS, 0, names.MAX_LEAD_MS)
        budget = number(names.FIRST_AUDIO_BUDGET_MS, 1, names.MAX_WAIT_LIMIT_MS)
        wait = number(names.MAX_WAIT_MS, 0, names.MAX_WAIT_LIMIT_MS)
        return cls(lead_s=(lead or 0.0) / 1000, continuation=continuation,
                   first_audio_budget_s=None if budget is None else budget / 1000,
                   max_wait_s=(wait or 0.0) / 1000)


NEW, HELD, WAITING, RUNNING, ENDED = "new", "held", "waiting", "running", "ended"


@dataclass(eq=False)
class Ticket:
    """One stream as the scheduler sees it. ``new``: not taken yet; ``held``: its text cannot start it yet (no place
    in line); ``waiting``: in line; ``running``: it has a row; ``ended``: its end event is out."""

    id: int
    submitted: float
    deadline: Deadline = field(default_factory=Deadline)
    characters: int = 0  # its text so far (what its expected length follows)
    frame_cap: int = 2048  # the most tokens it samples
    prompt_tokens: int = 16  # KV tokens its prompt takes (an estimate until it started)
    policy: Optional[ChunkPolicy] = None  # None: the scheduler's
    awaiting_text: bool = False  # its next text has not arrived: it neither starts nor steps
    state: str = NEW
    ready_at: Optional[float] = None  # when it could start (its text allowed it); its budget counts from here
    frames: int = 0
    kv_tokens: int = 0  # KV tokens it holds (prompt and frames)
    pacer: Optional[Pacer] = None
    finish: Optional[str] = None  # why the model ended it ("eos", "max_new_tokens"), once it did
    end_error: Optional[BaseException] = None  # set by a cancel: it ends with this at the next pass
    ending: bool = False
    text_wait_since: Optional[float] = None

    @property
    def expected_frames(self) -> float:
        return expected_frames(self.characters, self.frame_cap)

    @property
    def kv_needed(self) -> int:
        """KV tokens it should hold by its end: its prompt and its expected speech."""
        return int(self.prompt_tokens + self.expected_frames)

    @property
    def budget_from(self) -> float:
        """When its first-audio budget started: when its text let it start (it could not before), else submission."""
        return self.submitted if self.ready_at is None else self.ready_at


@dataclass
class Plan:
    """What one pass does, in order: ``end`` leave (their rows are freed first), ``start`` are prefilled together,
    ``step`` advance one frame (running streams and those just started)."""

    end: list = field(default_factory=list)  # [(ticket, error)]
    start: list = field(default_factory=list)  # [ticket]
    step: list = field(default_factory=list)  # [ticket]


@dataclass
class Outcome:
    """What executing a plan gave: each start's prompt tokens (or why it failed), each stepped stream's frame, the
    streams the model ended, and how long the prefill and the step took."""

    started: dict = field(default_factory=dict)  # ticket id -> KV tokens of its prompt, or the exception
    frames: dict = field(default_factory=dict)  # ticket id -> its new frame
    finished: dict = field(default_factory=dict)  # ticket id -> "eos" or "max_new_tokens"
    stepped: int = 0  # streams in the step
    step_s: float = 0.0
    prefill_s: float = 0.0


@dataclass
class Chunk:
    """Frames of one stream that are due at its listener (``frames``: [16] code tensors, in order)."""

    stream_id: int
    frames: list
    index: int
    last: bool


@dataclass
class End:
    """A stream's end, exactly once: ``error`` None when it ended normally (``reason`` says how)."""

    stream_id: int
    error: Optional[BaseException]
    reason: str
