"""Word times from the Triton model `aligner` (Qwen3-ForcedAligner): audio and the text spoken in it in, each word's
start and end (80 ms steps) and where it sits in the text out. Used by an utterance's word marks and by what its
listener heard."""
from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Optional

import numpy as np
from tritonclient.grpc import InferInput

from tts_contract import tensors as names
from tts_contract.audio import SAMPLE_RATE

from .endpoints import Endpoints

ALIGN_TIMEOUT_S = 10.0  # one forward pass; a long wait means the endpoint is in trouble


class AlignerUnavailable(Exception):
    """No ready endpoint serves the aligner, or it failed."""


@dataclass(frozen=True)
class Word:
    """One aligned word: its text as the aligner splits it, its times (ms) and its characters in the text."""

    text: str
    start_ms: int
    end_ms: int
    char_start: int
    char_end: int

    def shifted(self, ms: int, chars: int) -> "Word":
        """The same word with times and characters counted from ``ms`` and ``chars`` earlier."""
        return Word(self.text, self.start_ms + ms, self.end_ms + ms, self.char_start + chars, self.char_end + chars)

    def to_wire(self) -> dict:
        return {"text": self.text, "startMs": self.start_ms, "endMs": self.end_ms, "charStart": self.char_start,
                "charEnd": self.char_end}


def _tensor(name: str, value: np.ndarray, dtype: str) -> InferInput:
    tensor = InferInput(name, list(value.shape), dtype)
    tensor.set_data_from_numpy(value)
    return tensor


async def align(endpoints: Endpoints, audio: np.ndarray, text: str, language: Optional[str],
                timeout_s: float = ALIGN_TIMEOUT_S) -> list[Word]:
    """The words of ``text`` in ``audio`` (float32, 24 kHz), times from its first sample. Raises
    AlignerUnavailable."""
    endpoint = endpoints.aligner_endpoint()
    if endpoint is None:
        raise AlignerUnavailable("no ready Triton endpoint serves the aligner")
    # The model batches across streams: each request is a batch of one (audio rows may differ in length).
    inputs = [_tensor(names.AUDIO, np.ascontiguousarray(audio, dtype=np.float32).reshape(1, -1), "FP32"),
              _tensor(names.SAMPLE_RATE, np.array([[SAMPLE_RATE]], dtype=np.int32), "INT32"),
              _tensor(names.TEXT, np.array([[text.encode("utf-8")]], dtype=np.object_), "BYTES"),
              _tensor(names.LANGUAGE, np.array([[(language or "Auto").encode("utf-8")]], dtype=np.object_), "BYTES")]
    endpoint.calls += 1  # keeps a leaving endpoint's channel open until the call ends
    try:
        async with asyncio.timeout(timeout_s):
            result = await endpoint.client.infer(names.ALIGNER, inputs)
    except Exception as exc:
        raise AlignerUnavailable(f"the aligner at {endpoint.url} failed: {exc}") from None
    finally:
        endpoint.calls -= 1
        endpoints.forget_if_idle(endpoint)
    raw = result.as_numpy(names.WORDS).reshape(-1)[0]
    return [Word(w["text"], int(w["startMs"]), int(w["endMs"]), int(w["charStart"]), int(w["charEnd"]))
            for w in json.loads(raw)]
