"""A stand-in for BatchedTalker (no model): each stream gives ``frames`` zero frames, steps can be slowed or made
to fail, and every step's batch is recorded."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Optional

import torch

from tts_engine.generation.sampling import SamplingParams


@dataclass
class FakeRequest:
    frames: int
    fail_at_frame: Optional[int] = None  # the whole batched step fails when this stream reaches that frame
    start_error: Optional[Exception] = None
    text: str = "fake"
    prompt: object = field(default_factory=lambda: SimpleNamespace(ref_code=None))
    feed: object = None
    instruct: Optional[str] = None

    @property
    def reference_codes(self):
        return self.prompt.ref_code

    @property
    def params(self) -> SamplingParams:
        return SamplingParams(max_new_tokens=self.frames + 1)

    @property
    def text_open(self) -> bool:
        return False


@dataclass(eq=False)
class FakeStream:
    request: FakeRequest
    key: int = 0
    length: int = 1
    frames: int = 0
    finished: bool = False
    finish_reason: Optional[str] = None
    text_open: bool = False

    def text_ready(self) -> bool:
        return True


class FakeTalker:
    """``step_s``: each step takes at least this long (a model of fixed, known cost)."""

    def __init__(self, rows: int, step_s: float = 0.0):
        self.rows, self.step_s = rows, step_s
        self.active: list[FakeStream] = []
        self.streams: list[FakeStream] = []  # every stream ever started, in order
        self.added, self.batches = [], []
        self.on_step = None  # called with the stepped streams after each step (tests)
        self._frames = {}

    def __len__(self):
        return len(self.active)

    def buckets_up_to_rows(self):
        return (1,)

    def ready_to_start(self, request) -> bool:
        return True

    def add_many(self, requests):
        results = []
        for request in requests:
            self.added.append(request)
            if request.start_error:
                results.append(request.start_error)
                continue
            stream = FakeStream(request)
            self.active.append(stream)
            self.streams.append(stream)
            results.append(stream)
        return results

    def add(self, request):
        (result,) = self.add_many([request])
        if isinstance(result, BaseException):
            raise result
        return result

    def free_tokens(self) -> int:
        return 10**9

    def remove(self, stream):
        self.active.remove(stream)

    def step(self, streams=None):
        started = time.perf_counter()
        streams = self.active if streams is None else streams
        self.batches.append(len(streams))
        frames = self._frames.get(len(streams))
        if frames is None:
            frames = self._frames[len(streams)] = torch.zeros((len(streams), 16), dtype=torch.long)
        for stream in streams:
            if stream.request.fail_at_frame == stream.frames:
                raise RuntimeError("boom")
            stream.frames += 1
            stream.length += 1
            if stream.frames == stream.request.frames:
                stream.finished, stream.finish_reason = True, "eos"
        if self.on_step is not None:
            self.on_step(streams)
        left = self.step_s - (time.perf_counter() - started)
        if left > 0:
            time.sleep(left)
        return list(zip(streams, frames))

