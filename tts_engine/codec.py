"""Per-stream decoder states for the codec_decoder model: create, prime, look up, free, expire."""
from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .decoder import DecoderState, StreamingDecoder, prime
from .errors import InvalidRequest
from .recent import RecentIds


@dataclass
class _Stream:
    state: DecoderState
    last_used: float


class StreamTable:
    """Decoder state per stream id. Thread-safe; streams idle longer than ``idle_timeout`` are dropped."""

    def __init__(self, decoder: StreamingDecoder, idle_timeout: float = 60.0, primed_cache_size: int = 32):
        self.decoder = decoder
        self.idle_timeout = idle_timeout
        self._streams: dict[int, _Stream] = {}
        self._primed: "OrderedDict[str, DecoderState]" = OrderedDict()
        self._primed_cache_size = primed_cache_size
        self._lock = threading.Lock()
        self.freed = {"final": 0, "cancelled": 0, "idle": 0}
        self._cancelled = RecentIds(1024)  # recently cancelled ids, to act once

    def __len__(self) -> int:
        return len(self._streams)

    def _primed_state(self, context: Optional[np.ndarray]) -> DecoderState:
        """A fresh state, or a copy of the cached state primed with these reference codes."""
        if context is None or len(context) == 0:
            return self.decoder.new_state()
        key = hashlib.sha1(np.ascontiguousarray(context, dtype=np.int32).tobytes()).hexdigest()
        cached = self._primed.get(key)
        if cached is None:
            cached = prime(self.decoder, context)
            self._primed[key] = cached
            while len(self._primed) > self._primed_cache_size:
                self._primed.popitem(last=False)
        self._primed.move_to_end(key)
        return cached.clone()

    def decode(self, stream_id: int, codes: np.ndarray, context: Optional[np.ndarray], final: bool) -> np.ndarray:
        """Decode one chunk of a stream (creating it on first sight) and free it when ``final``."""
        if codes.ndim != 2 or codes.shape[1] != self.decoder.num_quantizers:
            raise InvalidRequest(f"codes must be [frames, {self.decoder.num_quantizers}], got {list(codes.shape)}")
        if codes.size and (codes.min() < 0 or codes.max() >= self.decoder.decoder.config.codebook_size):
            raise InvalidRequest("codes out of the codebook range")
        with self._lock:
            stream = self._streams.get(stream_id)
            if stream is None:
                stream = _Stream(self._primed_state(context), time.monotonic())
                self._streams[stream_id] = stream
            elif context is not None and len(context):
                raise InvalidRequest(f"stream {stream_id:x}: context codes are only allowed on its first chunk")
            try:
                audio = self.decoder.decode(stream.state, codes) if len(codes) else np.zeros(0, np.float32)
            except Exception:
                self._streams.pop(stream_id, None)
                raise
            stream.last_used = time.monotonic()
            if final:
                del self._streams[stream_id]
                self.freed["final"] += 1
        return audio

    def cancel(self, stream_id: int) -> bool:
        """Free a cancelled stream; True the first time this id is cancelled."""
        if not self._cancelled.add(stream_id):
            return False
        with self._lock:
            if self._streams.pop(stream_id, None) is not None:
                self.freed["cancelled"] += 1
            return True

    def expire(self, now: Optional[float] = None) -> int:
        """Drop streams with no chunk for ``idle_timeout`` seconds (cancelled or failed upstream)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            stale = [sid for sid, s in self._streams.items() if now - s.last_used > self.idle_timeout]
            for sid in stale:
                del self._streams[sid]
            self.freed["idle"] += len(stale)
        return len(stale)
