"""Audio on the way out: streaming resampling (no clicks at chunk boundaries) and wire encodings."""
from __future__ import annotations

import numpy as np

from .protocol import SAMPLE_RATE


class AudioConverter:
    """Float32 24 kHz chunks in, bytes in the session's rate and encoding out, continuous across chunks."""

    def __init__(self, sample_rate: int, encoding: str):
        self.sample_rate = sample_rate
        self.encoding = encoding
        self._resampler = None
        if sample_rate != SAMPLE_RATE:
            import soxr

            # One stream per utterance: the filter state carries over, so chunk joins are seamless.
            self._resampler = soxr.ResampleStream(SAMPLE_RATE, sample_rate, 1, dtype="float32", quality="HQ")

    @property
    def bytes_per_sample(self) -> int:
        return 2 if self.encoding == "pcm16" else 4

    def convert(self, audio: np.ndarray, last: bool = False) -> bytes:
        audio = np.asarray(audio, dtype=np.float32)
        if self._resampler is not None:
            audio = self._resampler.resample_chunk(audio, last=last)
        return self.encode(audio)

    def flush(self) -> bytes:
        """The resampler's tail at the end of an utterance."""
        if self._resampler is None:
            return b""
        return self.convert(np.zeros(0, dtype=np.float32), last=True)

    def encode(self, audio: np.ndarray) -> bytes:
        if self.encoding == "pcm16":
            return (np.clip(audio, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()
        return audio.astype("<f4").tobytes()
