"""Chunk pacing: each stream knows how far its audio is ahead of its listener (``tts_contract.listener``), and its
frames go out as one chunk only when holding them one more step would let the listener's buffer fall under a
margin.

Holding frames costs nothing while the lead is large, and larger chunks decode more cheaply; a stream close to its
deadline sends at once. The first chunk carries the listener over the next step with the margin to spare. Chunk
sizes come from a ladder (1, 2, 4, 8, ... up to the largest chunk), so chunks of different streams often have the
same length and the codec decoder decodes them in one forward (it costs one forward per distinct length).
``FixedChunks`` ignores deadlines (a fixed size per chunk index): tests use it for exact, repeatable chunk
boundaries.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Protocol, Sequence

from tts_contract.audio import FRAME_SECONDS
from tts_contract.listener import Listener


class ChunkPolicy(Protocol):
    def take(self, pacer: "Pacer", now: float, next_step_s: float, deliver_s: float) -> int:
        """How many of the held frames must go now (0: hold them); the stream is not finished."""


@dataclass(frozen=True)
class DeadlinePacing:
    """Send when the listener would otherwise get within ``margin_s`` of running dry: ``first_chunk_frames`` is
    the smallest first chunk, ``max_chunk_frames`` the largest chunk (it bounds a chunk's decode time)."""

    first_chunk_frames: int = 1
    max_chunk_frames: int = 16
    margin_s: float = 0.15
    ladder: tuple = field(init=False, repr=False, compare=False)  # the chunk sizes, ascending

    def __post_init__(self):
        if not 1 <= self.first_chunk_frames <= self.max_chunk_frames <= 512:
            raise ValueError(f"chunk sizes must satisfy 1 <= first ({self.first_chunk_frames}) <= max "
                             f"({self.max_chunk_frames}) <= 512")
        if not 0.0 <= self.margin_s <= 10.0:
            raise ValueError(f"pacing margin {self.margin_s} s must be within 0..10 s")
        # Powers of two below the largest chunk, then the largest (computed once: pacing runs per row per step).
        object.__setattr__(self, "ladder", tuple(sorted({1 << i for i in range(self.max_chunk_frames.bit_length())
                                                         if 1 << i < self.max_chunk_frames} | {self.max_chunk_frames})))

    def take(self, pacer: "Pacer", now: float, next_step_s: float, deliver_s: float) -> int:
        held = len(pacer.pending)
        if held >= self.max_chunk_frames:
            return self.max_chunk_frames
        listener = pacer.listener
        if listener.play_start is None:  # nothing plays yet: the first chunk must last past the next step
            need = self.margin_s + next_step_s + deliver_s
            first = next((n for n in self.ladder if n >= self.first_chunk_frames and n * FRAME_SECONDS >= need),
                         self.max_chunk_frames)
            return first if held >= first else 0
        if listener.lead(now) - next_step_s - deliver_s < self.margin_s:
            return max(n for n in self.ladder if n <= held)
        return 0


@dataclass(frozen=True)
class FixedChunks:
    """Chunk ``i`` has ``sizes[i]`` frames (the last size repeats), whatever the deadline."""

    sizes: tuple[int, ...] = (2, 4, 8, 16)
    margin_s: float = 0.0

    def __post_init__(self):
        if not self.sizes or any(not 1 <= s <= 512 for s in self.sizes):
            raise ValueError(f"chunk sizes {self.sizes}: every size must be within 1..512")

    @property
    def first_chunk_frames(self) -> int:
        return self.sizes[0]

    def take(self, pacer: "Pacer", now: float, next_step_s: float, deliver_s: float) -> int:
        size = self.sizes[min(pacer.chunks, len(self.sizes) - 1)]
        return size if len(pacer.pending) >= size else 0


@dataclass(eq=False)
class Pacer:
    """One stream's pacing: the frames it holds back, the chunks it sent, and its listener."""

    policy: ChunkPolicy
    listener: Listener = field(default_factory=Listener)
    pending: list = field(default_factory=list)
    chunks: int = 0
    first_due: float = 0.0  # when a new stream's first audio is due (its budget)

    @classmethod
    def start(cls, policy: ChunkPolicy, now: float, lead_s: float = 0.0, budget_s: float = 1.0) -> "Pacer":
        """A stream starting at ``now`` whose listener still has ``lead_s`` of audio, or (none) whose first audio
        is due within ``budget_s``."""
        return cls(policy, Listener.after(lead_s, now), first_due=now + budget_s)

    def lead(self, now: float) -> float:
        return self.listener.lead(now)

    def slack(self, now: float) -> float:
        """How long this stream can wait before its listener needs audio: its lead, or for a new stream the time
        left of its first-audio budget."""
        return self.first_due - now if self.listener.play_start is None else self.listener.lead(now)

    def add(self, frame, finished: bool, now: float, next_step_s: float = 0.0, deliver_s: float = 0.0,
            drain: bool = False) -> Optional[list]:
        """Take the step's frame (None when the step made none); returns the frames of a chunk when one is due.
        ``drain``: send whatever is held now (the stream waits for its text: holding frames gains nothing)."""
        if frame is not None:
            self.pending.append(frame)
        if not self.pending:
            return None
        count = len(self.pending) if finished or drain else self.policy.take(self, now, next_step_s, deliver_s)
        if not count:
            return None
        chunk = self.pending[:count]
        del self.pending[:count]
        self.listener.add(count * FRAME_SECONDS, now)
        self.chunks += 1
        return chunk


def most_urgent(pacers: Sequence[Pacer], now: float, count: int) -> list[int]:
    """Indices of the ``count`` pacers whose listeners need audio soonest (stable for ties)."""
    return sorted(range(len(pacers)), key=lambda i: pacers[i].slack(now))[:count]
