"""What a listener hears: a playback clock that starts with the first audio and plays at real time, so every
moment its buffer runs dry is an underrun. The gateway tracks each utterance with it (metrics), and the
benchmarks simulate their listeners with it."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

from . import metrics


@dataclass
class PlaybackClock:
    """A zero-buffer listener: playback starts when the first audio arrives and runs at real time; audio that
    arrives after the buffer ran dry restarts it (a stall) from that moment."""

    started: Optional[float] = None  # when the first audio arrived
    audio_s: float = 0.0  # seconds of audio received
    stalled_s: float = 0.0  # total time the buffer was empty between the first and the last audio
    underruns: int = 0  # how many times it ran dry
    stalls: list = field(default_factory=list)  # (seconds of audio played before the stall, stall seconds)
    _dry_at: float = 0.0  # when the buffer runs out, at the current pace
    _paused_from: Optional[float] = None  # the text itself was late from here (see ``pause``)...
    _resumed_at: Optional[float] = None  # ...until here

    def lead(self, now: Optional[float] = None) -> float:
        """Seconds of audio the listener still has buffered at ``now`` (0 before the first audio)."""
        if self.started is None:
            return 0.0
        return max(0.0, self._dry_at - (time.monotonic() if now is None else now))

    def pause(self, now: Optional[float] = None) -> None:
        """The next audio waits for text that is not written yet (an LLM still writing): if the buffer runs dry
        before ``resume``, the gap is the writer's, not ours, and is not counted."""
        self._paused_from, self._resumed_at = (time.monotonic() if now is None else now), None

    def resume(self, now: Optional[float] = None) -> None:
        """The text came: from here on a dry buffer is a stall again."""
        if self._paused_from is not None and self._resumed_at is None:
            self._resumed_at = time.monotonic() if now is None else now

    def add(self, seconds: float, now: Optional[float] = None) -> float:
        """``seconds`` of audio arrived at ``now``; returns the stall it ended (0.0 when the buffer held)."""
        now = time.monotonic() if now is None else now
        stall = 0.0
        if self.started is None:
            self.started, self._dry_at = now, now
        elif now > self._dry_at:
            if not self._writer_was_late():
                stall = now - self._dry_at
                self.underruns += 1
                self.stalled_s += stall
                self.stalls.append((round(self.audio_s, 3), round(stall, 3)))
            self._dry_at = now
        self._dry_at += seconds
        if self._resumed_at is not None and self._dry_at > self._resumed_at:
            self._paused_from = self._resumed_at = None  # the buffer outlasts the wait: it excuses nothing more
        self.audio_s += seconds
        return stall

    def _writer_was_late(self) -> bool:
        """The buffer ran dry while the text was still being written."""
        return self._paused_from is not None and self._dry_at >= self._paused_from and \
            (self._resumed_at is None or self._dry_at <= self._resumed_at)

    @property
    def playing_until(self) -> Optional[float]:
        """When the listener's buffer runs out at the current pace (None before the first audio)."""
        return None if self.started is None else self._dry_at


def hear(listener: PlaybackClock, seconds: float, now: float) -> None:
    """Audio sent to a listener: its lead, chunk size and any stall it ended, into the metrics."""
    if listener.started is not None:
        metrics.LEAD.observe(listener.lead(now))
    metrics.CHUNK_SECONDS.observe(seconds)
    stall = listener.add(seconds, now)
    if stall:
        metrics.UNDERRUNS.inc()
        metrics.STALL_SECONDS.inc(stall)
