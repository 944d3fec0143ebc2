"""Word times from the Triton model `aligner` (Qwen3-ForcedAligner): audio and the text spoken in it in, each word's
start and end (80 ms steps) and where it sits in the text out. Used by an utterance's word marks and by what its
listener heard."""
from __future__ import annotations

import asyncio
from typing import Optional

import numpy as np
from tritonclient.grpc import InferInput

from tts_contract import tensors as names
from tts_contract.audio import SAMPLE_RATE
from tts_contract.words import Word, decode_words

from .endpoints import Endpoints

ALIGN_TIMEOUT_S = 10.0  # one forward pass; a long wait means the endpoint is in trouble


class AlignerUnavailable(Exception):
    """No ready endpoint serves the aligner, or it failed."""


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
    try:
        with endpoints.calling(endpoint):
            async with asyncio.timeout(timeout_s):
                result = await endpoint.client.infer(names.ALIGNER, inputs)
        return decode_words(result.as_numpy(names.WORDS).reshape(-1)[0])
    except Exception as exc:
        raise AlignerUnavailable(f"the aligner at {endpoint.url} failed: {exc!r}") from None
