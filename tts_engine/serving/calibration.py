"""Measuring the step time at each batch size (and a chunk's decode by its frames) with copies of one request,
so admission and pacing start from this machine's numbers. Runs on the stepping thread, between passes."""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Callable, Optional

from ..generation.prompt import SynthesisRequest
from .costs import CostModel


@dataclass(frozen=True)
class Calibration:
    """What to measure: ``request`` at each batch in ``sizes`` for ``steps`` steps; ``decode_probe()`` returns the
    decode cost by chunk frames."""

    request: SynthesisRequest
    sizes: tuple
    steps: int = 8
    decode_probe: Optional[Callable[[], dict]] = None

    @classmethod
    def of(cls, request: SynthesisRequest, sizes, steps: int = 8, decode_probe=None) -> "Calibration":
        frames = steps + 2  # EOS suppressed throughout: every stream steps every time
        request = replace(request, params=replace(request.params, min_new_tokens=frames, max_new_tokens=frames))
        return cls(request, tuple(sizes), steps, decode_probe)


def measure(talker, calibration: Calibration, costs: CostModel, interrupted: Callable[[], bool] = lambda: False):
    """Measure each size (stopping between sizes once ``interrupted()``), fold the numbers into ``costs`` (the best
    of every idle measurement is the baseline); returns the step curve."""
    if calibration.decode_probe is not None:
        costs.decode.update(calibration.decode_probe())
    measured = {}
    for size in calibration.sizes:
        if interrupted():
            break
        streams = [talker.add(calibration.request) for _ in range(size)]
        timings = []
        try:
            for _ in range(calibration.steps):
                started = time.perf_counter()
                talker.step(streams)
                timings.append(time.perf_counter() - started)
        finally:
            for stream in streams:
                talker.remove(stream)
        measured[size] = min(timings[1:])  # the first step of a new batch shape allocates
    costs.step.update(measured)
    return costs.step.snapshot()
