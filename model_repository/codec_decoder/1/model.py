"""Triton adapter for the codec decoder: one stream's chunks -> PCM, with exact per-stream state."""
from __future__ import annotations

import threading

import numpy as np
import triton_python_backend_utils as pb_utils

from tts_engine import backend
from tts_engine.codec import StreamTable
from tts_engine.decoder import StreamingDecoder
from tts_engine.errors import Cancelled
from tts_engine.model import load_speech_tokenizer


class TritonPythonModel:
    def initialize(self, args):
        self.log = backend.setup_logging("codec_decoder")
        params = backend.model_parameters(args)
        tokenizer = load_speech_tokenizer(*backend.model_location(args, params))
        self.table = StreamTable(StreamingDecoder(tokenizer.model),
                                 idle_timeout=float(params.get("stream_idle_timeout_s") or 60),
                                 primed_cache_size=int(params.get("primed_state_cache_size") or 32))
        # Warm up (first-call allocations and kernel choices) so the first real stream is not slow.
        self.table.decoder.decode(self.table.decoder.new_state(), np.zeros((4, 16), dtype=np.int32))
        active = backend.metric_family(pb_utils, "gauge", "qwen_tts_decoder_active_streams",
                                       "Streams whose decoder state is held")
        freed = backend.metric_family(pb_utils, "counter", "qwen_tts_decoder_streams_freed_total",
                                      "Decoder states freed, by reason (final, cancelled, idle timeout)")
        self._families = (active, freed)
        self._active = active.Metric(labels={})
        self._freed = {reason: freed.Metric(labels={"reason": reason}) for reason in self.table.freed}
        self._reported = dict.fromkeys(self.table.freed, 0)
        # Metrics are only touched under this lock, from execute() or the reaper, never both at once.
        self._metrics_lock = threading.Lock()
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap, name="codec-reaper", daemon=True)
        self._reaper.start()
        self.log.info("codec_decoder ready (idle timeout %.0f s)", self.table.idle_timeout)

    def _publish(self):
        with self._metrics_lock:
            self._active.set(len(self.table))
            for reason, metric in self._freed.items():
                delta = self.table.freed[reason] - self._reported[reason]
                if delta:
                    metric.increment(delta)
                    self._reported[reason] += delta

    def _reap(self):
        interval = max(0.2, min(5.0, self.table.idle_timeout / 4))
        while not self._stop.wait(interval):
            if self.table.expire():
                self._publish()

    def _cancel_talker(self, stream_id: int) -> None:
        request = pb_utils.InferenceRequest(
            model_name="talker", requested_output_names=[],
            inputs=[pb_utils.Tensor("cancel_stream_id", np.array([stream_id], dtype=np.uint64))])
        try:
            for _ in request.exec(decoupled=True):
                pass
        except Exception as exc:  # the talker may be gone; the stream is freed here regardless
            self.log.warning("could not cancel talker stream %x: %s", stream_id, exc)

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                codes = backend.read_array(pb_utils, request, "codes")
                context = backend.read_array(pb_utils, request, "context_codes", required=False)
                stream_id = int(backend.read_array(pb_utils, request, "stream_id").reshape(-1)[0])
                if request.is_cancelled():
                    # The tts request was cancelled: free this stream and stop the talker generating it.
                    if self.table.cancel(stream_id):
                        self._cancel_talker(stream_id)
                    responses.append(backend.error_response(pb_utils, Cancelled("stream cancelled")))
                    continue
                final_tensor = backend.read_array(pb_utils, request, "final", required=False)
                final = bool(final_tensor.reshape(-1)[0]) if final_tensor is not None else False
                audio = self.table.decode(stream_id, codes, context, final)
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor("audio", audio.astype(np.float32, copy=False))]))
            except Exception as exc:
                self.log.warning("decode failed: %s", exc)
                responses.append(backend.error_response(pb_utils, exc))
        self._publish()
        return responses

    def finalize(self):
        self._stop.set()
