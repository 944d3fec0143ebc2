"""Chunk pacing: each stream knows how far its audio is ahead of its listener, and its frames go out as one
chunk only when holding them one more step would let the listener's buffer fall under a margin.

A listener starts playing at its first audio and plays at real time, so a stream's *lead* is the audio it
has sent minus the time since its first audio (for a continuation, the audio its listener already has from
the sentences before). Holding frames costs nothing while the lead is large, and larger chunks decode more
cheaply; a stream close to its deadline sends every frame at once. The first chunk carries the listener over
the next step with the margin to spare. ``FixedChunks`` ignores deadlines (a fixed size per chunk index):
tests use it for exact, repeatable chunk boundaries.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Protocol, Sequence

import torch

from tts_contract.audio import FRAME_SECONDS


class ChunkPolicy(Protocol):
    def due(self, pacer: "Pacer", now: float, next_step_s: float, deliver_s: float) -> bool:
        """Whether the held frames must go now (the stream is not finished)."""


@dataclass(frozen=True)
class DeadlinePacing:
    """Send when the listener would otherwise get within ``margin_s`` of running dry: ``first_chunk_frames`` is
    the smallest first chunk, ``max_chunk_frames`` the largest chunk (it bounds a chunk's decode time)."""

    first_chunk_frames: int = 1
    max_chunk_frames: int = 16
    margin_s: float = 0.15

    def __post_init__(self):
        if not 1 <= self.first_chunk_frames <= self.max_chunk_frames <= 512:
            raise ValueError(f"chunk sizes must satisfy 1 <= first ({self.first_chunk_frames}) <= max "
                             f"({self.max_chunk_frames}) <= 512")
        if not 0.0 <= self.margin_s <= 10.0:
            raise ValueError(f"pacing margin {self.margin_s} s must be within 0..10 s")

    def due(self, pacer: "Pacer", now: float, next_step_s: float, deliver_s: float) -> bool:
        held = len(pacer.pending)
        if held >= self.max_chunk_frames:
            return True
        if pacer.play_start is None:  # nothing plays yet: the first chunk must last past the next step
            return held >= self.first_chunk_frames and \
                held * FRAME_SECONDS >= self.margin_s + next_step_s + deliver_s
        return pacer.lead(now) - next_step_s - deliver_s < self.margin_s


@dataclass(frozen=True)
class FixedChunks:
    """Chunk ``i`` has ``sizes[i]`` frames (the last size repeats), whatever the deadline."""

    sizes: tuple[int, ...] = (2, 4, 8, 16)

    def __post_init__(self):
        if not self.sizes or any(not 1 <= s <= 512 for s in self.sizes):
            raise ValueError(f"chunk sizes {self.sizes}: every size must be within 1..512")

    def due(self, pacer: "Pacer", now: float, next_step_s: float, deliver_s: float) -> bool:
        return len(pacer.pending) >= self.sizes[min(pacer.chunks, len(self.sizes) - 1)]


@dataclass(eq=False)
class Pacer:
    """One stream's delivery: frames held back, audio sent, and the listener's playback clock (which starts
    with the first chunk, or ``lead_s`` from now for a continuation whose listener still has audio)."""

    policy: ChunkPolicy
    play_start: Optional[float] = None
    sent_s: float = 0.0
    chunks: int = 0
    pending: list = field(default_factory=list)
    underruns: int = 0  # chunks that reached a listener who had run dry (as far as this process can tell)
    stalled_s: float = 0.0
    last_lead: float = 0.0  # the audio the listener still had when the last chunk was sent
    last_stall: float = 0.0  # how long the listener had been dry when the last chunk was sent

    @classmethod
    def start(cls, policy: ChunkPolicy, now: float, lead_s: float = 0.0) -> "Pacer":
        return cls(policy, play_start=now + lead_s if lead_s > 0 else None)

    def lead(self, now: float) -> float:
        """Audio ahead of the listener at ``now`` (negative: the listener ran dry that long ago)."""
        return 0.0 if self.play_start is None else self.play_start + self.sent_s - now

    def slack(self, now: float, margin_s: float = 0.0) -> float:
        """How long this stream can go without a step before its listener gets within the margin (a new stream
        that has sent nothing: none at all)."""
        return -1e9 if self.play_start is None and not self.sent_s else self.lead(now) - margin_s

    def add(self, frame: Optional[torch.Tensor], finished: bool, now: float, next_step_s: float = 0.0,
            deliver_s: float = 0.0) -> Optional[torch.Tensor]:
        """Take the step's frame (None when the step made none); returns a [n, 16] chunk when one is due."""
        if frame is not None:
            self.pending.append(frame)
        if not self.pending or not (finished or self.policy.due(self, now, next_step_s, deliver_s)):
            return None
        chunk = torch.stack(self.pending)
        self.pending = []
        self._sent(len(chunk) * FRAME_SECONDS, now)
        return chunk

    def _sent(self, seconds: float, now: float) -> None:
        if self.play_start is None:
            self.play_start = now
        lead = self.lead(now)
        self.last_stall = max(0.0, -lead)
        if lead < 0:  # the listener ran dry: it plays again from this chunk's arrival
            self.underruns += 1
            self.stalled_s -= lead
            self.play_start -= lead
            lead = 0.0
        self.last_lead = lead
        self.sent_s += seconds
        self.chunks += 1


def most_urgent(pacers: Sequence[Pacer], now: float, count: int) -> list[int]:
    """Indices of the ``count`` pacers whose listeners need audio soonest (stable for ties)."""
    return sorted(range(len(pacers)), key=lambda i: pacers[i].slack(now))[:count]
