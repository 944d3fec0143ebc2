"""Per-stream decoder states for the codec_decoder model: create, prime, look up, free, expire."""
from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from ..errors import InvalidRequest
from ..recent import RecentIds
from .decoder import DecoderState, StreamingDecoder, prime


@dataclass
class _Stream:
    state: DecoderState
    last_used: float


@dataclass
class DecodeItem:
    """One chunk to decode: the stream it belongs to, its codes [n, 16], the reference codes that prime a
    new stream (ICL voices, first chunk only), and whether it is the stream's last chunk."""

    stream_id: int
    codes: np.ndarray
    context: Optional[np.ndarray] = None
    final: bool = False


class StreamTable:
    """Decoder state per stream id. Thread-safe; streams idle longer than ``idle_timeout`` are dropped."""

    def __init__(self, decoder: StreamingDecoder, idle_timeout: float = 60.0, primed_cache_size: int = 32):
        self.decoder = decoder
        self.idle_timeout = idle_timeout
        self._streams: dict[int, _Stream] = {}
        self._primed: "OrderedDict[str, DecoderState]" = OrderedDict()
        self._primed_cache_size = primed_cache_size
        self._lock = threading.Lock()
        self.freed = {"final": 0, "cancelled": 0, "failed": 0, "idle": 0}
        self.primings = 0  # decodes of reference codes (each voice once, while it stays cached)
        self.batches = self.chunks = self.frames = 0  # batched forwards, the chunks and frames they decoded
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
            self.primings += 1
            self._primed[key] = cached
            while len(self._primed) > self._primed_cache_size:
                self._primed.popitem(last=False)[1].release()
        self._primed.move_to_end(key)
        return cached.clone()

    def prime(self, context: np.ndarray) -> None:
        """Decode a voice's reference codes now and keep the state, so its first stream starts at once."""
        with self._lock:
            self._primed_state(np.asarray(context, dtype=np.int32))

    def decode(self, stream_id: int, codes: np.ndarray, context: Optional[np.ndarray], final: bool) -> np.ndarray:
        """Decode one chunk of a stream (creating it on first sight) and free it when ``final``."""
        result = self.decode_many([DecodeItem(stream_id, codes, context, final)])[0]
        if isinstance(result, BaseException):
            raise result
        return result

    def decode_many(self, items: list["DecodeItem"], on_result: Optional[Callable[[int, object], None]] = None) -> list:
        """Decode chunks of many streams, batching the chunks that have the same frame count into one forward,
        the shortest first: a short chunk is what a stream close to its deadline sends.

        Returns, per item, its audio or the exception that item failed with, and hands each result to
        ``on_result(index, result)`` as soon as its forward is done. Two chunks of one stream are decoded in
        order (the second in a later round); once a stream failed, its later chunks fail with it (they are
        never decoded from a fresh state)."""
        results: list = [None] * len(items)
        pending = list(range(len(items)))
        failed: dict[int, BaseException] = {}
        while pending:
            round_, later, seen = [], [], set()
            for index in pending:
                (later if items[index].stream_id in seen else round_).append(index)
                seen.add(items[index].stream_id)
            groups: dict[int, list[tuple[int, DecoderState]]] = {}
            for index in round_:
                stream_id = items[index].stream_id
                try:
                    if stream_id in failed:
                        raise failed[stream_id]
                    state = self._state_for(items[index])
                except Exception as exc:
                    results[index] = exc
                    with self._lock:
                        self._free(stream_id, "failed")
                    if on_result is not None:
                        on_result(index, exc)
                    continue
                groups.setdefault(len(items[index].codes), []).append((index, state))
            for frames in sorted(groups):
                self._decode_group(items, groups[frames], results)
                if on_result is not None:
                    for index, _ in groups[frames]:
                        on_result(index, results[index])
            failed.update((items[i].stream_id, results[i]) for i in round_ if isinstance(results[i], BaseException))
            pending = later
        return results

    def _free(self, stream_id: int, reason: str) -> None:
        """Drop a stream's state, counting why (the caller holds the lock)."""
        stream = self._streams.pop(stream_id, None)
        if stream is not None:
            stream.state.release()
            self.freed[reason] += 1

    def _check_codes(self, name: str, codes: np.ndarray) -> None:
        if codes.ndim != 2 or codes.shape[1] != self.decoder.num_quantizers:
            raise InvalidRequest(f"{name} must be [frames, {self.decoder.num_quantizers}], got {list(codes.shape)}")
        if codes.size and (codes.min() < 0 or codes.max() >= self.decoder.decoder.config.codebook_size):
            raise InvalidRequest(f"{name} out of the codebook range")

    def _state_for(self, item: "DecodeItem") -> DecoderState:
        codes, context = item.codes, item.context
        self._check_codes("codes", codes)
        if context is not None and len(context):
            self._check_codes("context codes", context)  # before priming: a bad index breaks a GPU for good
        with self._lock:
            stream = self._streams.get(item.stream_id)
            if stream is None:
                stream = _Stream(self._primed_state(context), time.monotonic())
                self._streams[item.stream_id] = stream
            elif context is not None and len(context):
                raise InvalidRequest(f"stream {item.stream_id:x}: context codes are only allowed on its first chunk")
            stream.last_used = time.monotonic()
            return stream.state

    def _decode_group(self, items: list["DecodeItem"], members: list, results: list) -> None:
        """One batched forward for chunks of equal length; frees the streams that end here."""
        self.batches += 1
        self.chunks += len(members)
        self.frames += len(members) * len(items[members[0][0]].codes)
        try:
            audio = self.decoder.decode_batch([state for _, state in members],
                                              [items[index].codes for index, _ in members])
        except Exception as exc:  # the whole forward failed: each of its streams is dropped
            audio = [exc] * len(members)
        with self._lock:
            for (index, _), result in zip(members, audio):
                results[index] = result
                item = items[index]
                if isinstance(result, BaseException):
                    self._free(item.stream_id, "failed")
                elif item.final:
                    self._free(item.stream_id, "final")

    def cancel(self, stream_id: int) -> bool:
        """Free a cancelled stream's state (every time: a chunk decoded before the cancel was known may have made
        one); True the first time this id is cancelled."""
        first = self._cancelled.add(stream_id)
        with self._lock:
            self._free(stream_id, "cancelled")
        return first

    def split_cancelled(self, items: list["DecodeItem"], cancelled: list[bool]) -> tuple[list[int], list[int]]:
        """Which of a batch's chunks to decode: a stream is cancelled for the whole batch once any of its chunks
        says so (``cancelled``, per item) or it was cancelled before. A chunk whose request was made before the
        client cancelled never says so, and decoding it would make a new state for a stream that is gone (it stayed
        held until the idle timeout). Cancelled streams are freed here. Returns (indices to decode, the stream ids
        cancelled for the first time)."""
        gone = {item.stream_id for item, flag in zip(items, cancelled) if flag or item.stream_id in self._cancelled}
        first = [stream_id for stream_id in gone if self.cancel(stream_id)]
        return [i for i, item in enumerate(items) if item.stream_id not in gone], first

    def expire(self, now: Optional[float] = None) -> int:
        """Drop streams with no chunk for ``idle_timeout`` seconds (cancelled or failed upstream)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            stale = [sid for sid, s in self._streams.items() if now - s.last_used > self.idle_timeout]
            for sid in stale:
                self._streams.pop(sid).state.release()
            self.freed["idle"] += len(stale)
        return len(stale)
