"""The engine's figures: plain numbers the scheduler updates each pass and a metrics thread reads (no call leaves
the stepping thread to publish them), and the status an engine reports to whoever routes streams to it."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

OUTCOMES = ("eos", "max_new_tokens", "cancelled", "rejected", "error")
HELD_BACK_REASONS = ("capacity", "behind", "memory")


@dataclass
class EngineStats:
    frames: int = 0
    steps: int = 0
    step_rows: int = 0  # sum of batch sizes: / steps = mean batch
    step_seconds: float = 0.0
    active: int = 0
    queued: int = 0
    realtime_batch: int = 0  # streams that can step together and stay ahead of real time
    headroom: int = 0  # new streams that could start now
    step_s: float = 0.0  # the predicted step time at the current batch
    retry_after_s: float = 0.0  # when a row is expected to free (0: one is free now)
    chunks: int = 0
    chunk_frames: int = 0
    underruns: int = 0  # chunks sent after their listener ran dry (this process's view)
    stalled_s: float = 0.0
    skipped_rows: int = 0  # active streams that waited a step because others were closer to their deadlines
    waiting_text: int = 0  # streams (started or not) waiting for more of their text
    text_wait_s: float = 0.0  # seconds started streams sat out waiting for their text, summed over streams
    behind: int = 0  # active streams whose listeners are within half the pacing margin of running dry
    held_back: Counter = field(default_factory=Counter)  # passes a new stream waited, by reason
    leads: list = field(default_factory=list)  # lead at each chunk, drained by the metrics publisher
    outcomes: Counter = field(default_factory=Counter)

    def take_leads(self) -> list:
        """The leads recorded since the last call (for a histogram)."""
        taken, self.leads = self.leads, []
        return taken

    def status(self, rows: int, margin_s: float = 0.0) -> dict:
        """What a router needs to know, as plain JSON-able values (the talker's `status` command answers this)."""
        return {"rows": rows, "margin_ms": round(1000 * margin_s), "active": self.active, "queued": self.queued,
                "realtime_batch": self.realtime_batch, "headroom": self.headroom, "behind": self.behind,
                "step_ms": round(1000 * self.step_s, 2), "retry_after_ms": int(1000 * self.retry_after_s)}
