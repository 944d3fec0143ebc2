"""What work costs on this machine now: a step by its batch, a chunk's decode by its frames, a prefill. Admission
and pacing read these numbers; the loop measures them (calibration while idle, every real step in between).

How many streams step together comes from the step curve: the largest batch whose step keeps every stream ahead
of real time by a factor (``realtime_batch``); the rows (KV memory) stay the upper bound.
"""
from __future__ import annotations

import bisect
import time
from collections import deque
from dataclasses import dataclass, field

from tts_contract.audio import FRAME_SECONDS


class CostCurve:
    """Seconds an operation takes by its size (a step by its batch, a decode by its frames).

    ``update`` sets the baseline (the best of every measurement taken while idle); ``observe`` records real
    runs. A size with enough recent runs (``min_runs``, none older than ``max_age_s``) costs their median;
    every other size costs its baseline scaled by how much slower than the baseline the recent runs are
    (the machine's contention now, applied to the sizes not running). So the curve follows what the machine
    gives now, one cold start or pause does not count, and a size not run for a while follows the others
    (a pessimistic moment cannot keep it unused for good). Predictions are monotone in the size and
    interpolated between known sizes."""

    def __init__(self, window: int = 200, min_runs: int = 5, max_age_s: float = 20.0, refresh_s: float = 0.05):
        self.window, self.min_runs, self.max_age_s = window, min_runs, max_age_s
        # It is read every pass: new runs count within ``refresh_s``, and only the sizes that ran are re-read, all
        # of them (old runs expire) every ``_sweep_s``.
        self.refresh_s, self._sweep_s = refresh_s, min(1.0, max_age_s / 4)
        self._baseline: dict[int, float] = {}
        self._runs: dict[int, deque] = {}
        self._recent: dict[int, float] = {}  # each size's median of its fresh runs, where it has enough
        self._changed: set = set()  # sizes with runs not read yet
        self._sizes: list[int] = []
        self._envelope: list[float] = []
        self.contention = 1.0  # recent runs over the baseline at the same sizes
        self._computed = self._swept = -1e9

    def update(self, measured: dict[int, float]) -> None:
        """Baselines: what each size costs on an idle machine (a measurement taken while something else ran
        is slower, never faster, so the best one is kept)."""
        for size, seconds in measured.items():
            self._baseline[size] = min(seconds, self._baseline.get(size, seconds))
        self._recompute(time.monotonic())

    def observe(self, size: int, seconds: float) -> None:
        self._runs.setdefault(size, deque(maxlen=self.window)).append((time.monotonic(), seconds))
        self._changed.add(size)

    def _recompute(self, now: float) -> None:
        sweep = now - self._swept >= self._sweep_s
        for size in list(self._runs) if sweep else self._changed:
            fresh = sorted(seconds for at, seconds in self._runs[size] if now - at <= self.max_age_s)
            if len(fresh) >= self.min_runs:
                self._recent[size] = fresh[len(fresh) // 2]
            else:
                self._recent.pop(size, None)
        if sweep:
            self._swept = now
        self._changed.clear()
        base_sizes = sorted(self._baseline)
        base_values = [self._baseline[size] for size in base_sizes]
        ratios = sorted(seconds / base for size, seconds in self._recent.items()
                        if (base := _interpolate(base_sizes, base_values, size)) > 0)
        self.contention = min(10.0, max(0.5, ratios[len(ratios) // 2])) if ratios else 1.0
        known = {size: seconds * self.contention for size, seconds in self._baseline.items()}
        known.update(self._recent)
        self._sizes = sorted(known)
        self._envelope, worst = [], 0.0
        for size in self._sizes:  # a larger size never takes less than a smaller one
            worst = max(worst, known[size])
            self._envelope.append(worst)
        self._computed = now

    def __call__(self, size: int) -> float:
        return self.predict(size)

    def predict(self, size: int) -> float:
        """Seconds at this size (0.0 before anything was measured)."""
        now = time.monotonic()
        if now - self._computed >= (self.refresh_s if self._changed else self._sweep_s):
            self._recompute(now)  # new runs count, old ones expire
        return _interpolate(self._sizes, self._envelope, size)

    def snapshot(self) -> dict[int, float]:
        return {size: self.predict(size) for size in self._sizes}


def _interpolate(sizes: list[int], values: list[float], size: int) -> float:
    """``values`` at ``size``: interpolated between known sizes, in proportion beyond the largest (an upper
    bound for batched work), the smallest's value below it; 0.0 when nothing is known."""
    if not sizes or size < 1:
        return 0.0
    at = bisect.bisect_left(sizes, size)
    if at < len(sizes) and sizes[at] == size:
        return values[at]
    if at == 0:
        return values[0]
    if at == len(sizes):
        return values[-1] * size / sizes[-1]
    low, high = sizes[at - 1], sizes[at]
    return values[at - 1] + (values[at] - values[at - 1]) * (size - low) / (high - low)


def realtime_batch(step_times: CostCurve, speed: float, rows: int) -> int:
    """The largest batch (1..rows) whose step leaves each stream ``speed`` times faster than real time (the step
    curve is monotone in the batch: a binary search)."""
    low, high = 1, rows
    while low < high:
        middle = (low + high + 1) // 2
        if step_times(middle) * speed <= FRAME_SECONDS:
            low = middle
        else:
            high = middle - 1
    return low


def place_free_times(remaining_s: list[float], free_now: int, count: int) -> list[float]:
    """When each of the next ``count`` places frees, seconds from now: ``free_now`` are free at once, then
    one more each time a running stream finishes (``remaining_s``: their expected remaining times)."""
    ordered = sorted(max(0.0, r) for r in remaining_s)
    times = [0.0] * min(max(free_now, 0), count)
    times += ordered[:count - len(times)]
    if len(times) < count:  # more waiting than streams to finish: each later place waits one more round
        last = ordered[-1] if ordered else 0.0
        times += [last * (2 + i // max(1, len(ordered))) for i in range(count - len(times))]
    return times


@dataclass
class CostModel:
    """The costs admission and pacing use: ``step`` (seconds by batch), ``decode`` (seconds by chunk frames, on the
    codec decoder), ``prefill_s`` (a moving average of one admission pass's prefill)."""

    step: CostCurve = field(default_factory=CostCurve)
    decode: CostCurve = field(default_factory=CostCurve)  # empty: decoding assumed free until measured
    prefill_s: float = 0.0

    def observe_prefill(self, seconds: float) -> None:
        self.prefill_s = seconds if not self.prefill_s else self.prefill_s + 0.1 * (seconds - self.prefill_s)

    def first_audio_s(self, batch: int, first_chunk_frames: int) -> float:
        """Expected time from admission to a new stream's first chunk at this batch size."""
        return self.prefill_s + (first_chunk_frames + 1) * self.step.predict(batch) + self.decode(first_chunk_frames)
