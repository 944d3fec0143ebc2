"""What a listener hears, as arithmetic: the engine paces each stream's chunks by it, the gateway reports each
utterance's figures by it, and the benchmarks simulate their listeners with it. One definition, so a lead, an
underrun or a stall means the same number everywhere.

A listener has no buffer of its own beyond the audio it was sent: playback starts with the first audio (or at a
set moment, when the listener is still playing audio that came before) and runs at real time. Its *lead* is the
audio it has not played yet; audio that arrives after the lead ran out is an *underrun*, and the time the
listener waited is its *stall*: playback restarts from that audio's arrival.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional


@dataclass(eq=False)
class Listener:
    """One listener's playback clock. Times are ``time.monotonic()`` seconds; every method takes ``now`` (the
    present when left out)."""

    play_start: Optional[float] = None  # when playback of this audio starts (set by the first audio, if not before)
    audio_s: float = 0.0  # seconds of audio received
    underruns: int = 0  # how many times the buffer ran dry
    stalled_s: float = 0.0  # total time the buffer was dry before audio came again
    stalls: list = field(default_factory=list)  # (seconds played before the stall, stall seconds), rounded
    last_lead: float = 0.0  # the lead the last audio found (0 after a stall)
    last_stall: float = 0.0  # the stall the last audio ended (0 when the buffer held)
    _paused_from: Optional[float] = None  # the audio after here waited for text not written yet (see ``pause``)...
    _resumed_at: Optional[float] = None  # ...until here

    @classmethod
    def after(cls, lead_s: float, now: Optional[float] = None) -> "Listener":
        """A listener that still plays ``lead_s`` of earlier audio: this audio plays once that is over."""
        now = time.monotonic() if now is None else now
        return cls(play_start=now + lead_s if lead_s > 0 else None)

    def lead(self, now: Optional[float] = None) -> float:
        """Audio not played yet at ``now``, seconds; negative once the buffer ran dry (for that long); 0 before any
        audio (unless playback was set to start later)."""
        if self.play_start is None:
            return 0.0
        return self.play_start + self.audio_s - (time.monotonic() if now is None else now)

    def buffered(self, now: Optional[float] = None) -> float:
        """The lead, never negative: what the listener still has to play."""
        return max(0.0, self.lead(now))

    @property
    def playing_until(self) -> Optional[float]:
        """When the buffer runs dry at the current pace (None before any audio)."""
        return None if self.play_start is None else self.play_start + self.audio_s

    def add(self, seconds: float, now: Optional[float] = None) -> float:
        """``seconds`` of audio arrived at ``now``; returns the stall it ended (0.0 when the buffer held)."""
        now = time.monotonic() if now is None else now
        if self.play_start is None:
            self.play_start = now
        lead = self.play_start + self.audio_s - now
        stall = 0.0
        if lead < 0:  # the buffer ran dry: playback restarts from this audio
            if not self._writer_was_late(now + lead):
                stall = -lead
                self.underruns += 1
                self.stalled_s += stall
                self.stalls.append((round(self.audio_s, 3), round(stall, 3)))
            self.play_start -= lead
            lead = 0.0
        self.last_lead, self.last_stall = lead, stall
        self.audio_s += seconds
        if self._resumed_at is not None and self.play_start + self.audio_s > self._resumed_at:
            self._paused_from = self._resumed_at = None  # the buffer outlasts the wait: it excuses nothing more
        return stall

    def pause(self, now: Optional[float] = None) -> None:
        """The next audio waits for text that is not written yet (an LLM still writing): if the buffer runs dry
        before ``resume``, the gap is the writer's, not the server's, and is not counted."""
        self._paused_from, self._resumed_at = (time.monotonic() if now is None else now), None

    def resume(self, now: Optional[float] = None) -> None:
        """The text came: from here on a dry buffer is a stall again."""
        if self._paused_from is not None and self._resumed_at is None:
            self._resumed_at = time.monotonic() if now is None else now

    def _writer_was_late(self, dry_at: float) -> bool:
        """The buffer ran dry (at ``dry_at``) while the text was still being written."""
        return self._paused_from is not None and dry_at >= self._paused_from and \
            (self._resumed_at is None or dry_at <= self._resumed_at)
