"""Every stream's decoder state in one preallocated tensor, one row per stream, so that a batched decode gathers
its rows, computes, and writes them back in place: a static step a CUDA graph can replay, instead of stacking and
splitting per-stream tensors around each forward."""
from __future__ import annotations

import threading
import weakref
from typing import Optional

import torch

SCRATCH_ROW = 0  # padding rows of a bucket read and write here; never given to a stream


class DecoderSlots:
    """Rows of ``width`` state values (convolution tails, attention keys and values, laid out by the decoder) plus
    each row's frame count. Rows are handed out and taken back; the table doubles when full (captured graphs over
    the old buffers must then be dropped: ``generation`` counts the reallocations)."""

    def __init__(self, width: int, dtype, device, capacity: int = 16):
        self.width, self.dtype, self.device = width, dtype, device
        self.capacity = 0
        self.values = self.frames = None
        self.generation = 0
        self._free: list[int] = []
        self._lock = threading.Lock()
        self._grow(max(2, capacity))

    @torch.inference_mode()
    def _grow(self, capacity: int) -> None:
        values = torch.zeros(capacity, self.width, dtype=self.dtype, device=self.device)
        frames = torch.zeros(capacity, dtype=torch.long, device=self.device)
        if self.capacity:
            values[: self.capacity] = self.values
            frames[: self.capacity] = self.frames
        self._free = list(range(capacity - 1, max(self.capacity, SCRATCH_ROW + 1) - 1, -1)) + self._free
        self.values, self.frames, self.capacity = values, frames, capacity
        self.generation += 1

    @torch.inference_mode()
    def acquire(self) -> int:
        """A zeroed row (a stream that has decoded nothing)."""
        with self._lock:
            if not self._free:
                self._grow(2 * self.capacity)
            row = self._free.pop()
        self.values[row].zero_()
        self.frames[row] = 0
        return row

    def release(self, row: int) -> None:
        with self._lock:
            self._free.append(row)

    @property
    def in_use(self) -> int:
        return self.capacity - 1 - len(self._free)

    @torch.inference_mode()
    def copy(self, source: int, target: int) -> None:
        self.values[target] = self.values[source]
        self.frames[target] = self.frames[source]


class DecoderState:
    """One stream's decoder state: a row of the slots, given back when the state is released or collected."""

    def __init__(self, slots: DecoderSlots, row: Optional[int] = None):
        self.slots = slots
        self.row = slots.acquire() if row is None else row
        self._release = weakref.finalize(self, slots.release, self.row)

    @property
    def frames(self) -> int:
        """Frames decoded so far (a host read: for bookkeeping and tests, never inside a step)."""
        return int(self.slots.frames[self.row])

    def clone(self) -> "DecoderState":
        twin = DecoderState(self.slots)
        self.slots.copy(self.row, twin.row)
        return twin

    def release(self) -> None:
        self._release()
