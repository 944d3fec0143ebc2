"""Triton adapter for the codec decoder: chunks of many streams -> PCM, decoded together, exact per-stream state.

Decoupled: ``execute`` only queues requests; one worker thread takes everything queued, decodes chunks of
equal length from different streams in one batched forward, and answers each request with one response
(COMPLETE_FINAL). Under load, chunks pile up while a batch decodes, so batches grow with the load.
"""
from __future__ import annotations

import queue
import threading

import numpy as np
import triton_python_backend_utils as pb_utils

from tts_engine import backend
from tts_engine.codec import DecodeItem, StreamTable
from tts_engine.decoder import StreamingDecoder
from tts_engine.errors import Cancelled
from tts_engine.model import load_speech_tokenizer
from tts_engine.prompts import reference_codes
from tts_engine.voices import VoiceStore

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonPythonModel:
    def initialize(self, args):
        self.log = backend.setup_logging("codec_decoder")
        params = backend.model_parameters(args)
        tokenizer = load_speech_tokenizer(*backend.model_location(args, params))
        self.table = StreamTable(StreamingDecoder(tokenizer.model),
                                 idle_timeout=float(params.get("stream_idle_timeout_s") or 60),
                                 primed_cache_size=int(params.get("primed_state_cache_size") or 32))
        self.max_batch = int(params.get("max_batch_streams") or 64)
        self._warm_up(tokenizer, params)
        active = backend.metric_family(pb_utils, "gauge", "qwen_tts_decoder_active_streams",
                                       "Streams whose decoder state is held")
        freed = backend.metric_family(pb_utils, "counter", "qwen_tts_decoder_streams_freed_total",
                                      "Decoder states freed, by reason (final, cancelled, idle timeout)")
        primings = backend.metric_family(pb_utils, "counter", "qwen_tts_decoder_primings_total",
                                         "Voices whose reference codes were decoded to prime new streams")
        batches = backend.metric_family(pb_utils, "counter", "qwen_tts_decoder_batches_total",
                                        "Batched decoder forwards")
        chunks = backend.metric_family(pb_utils, "counter", "qwen_tts_decoder_chunks_total",
                                       "Chunks decoded (/ batches = mean batch size)")
        self._families = (active, freed, primings, batches, chunks)
        self._active = active.Metric(labels={})
        self._freed = {reason: freed.Metric(labels={"reason": reason}) for reason in self.table.freed}
        self._batches, self._chunks = batches.Metric(labels={}), chunks.Metric(labels={})
        self._reported = dict.fromkeys(self.table.freed, 0)
        self._primings = primings.Metric(labels={})
        self._counts = {"batches": 0, "chunks": 0}
        self._reported_counts = dict.fromkeys(list(self._counts) + ["primings"], 0)
        self._pending: "queue.Queue" = queue.Queue()
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._work, name="codec-decoder", daemon=True)
        self._worker.start()
        self._publisher = threading.Thread(target=self._publish_loop, name="codec-metrics", daemon=True)
        self._publisher.start()
        self.log.info("codec_decoder ready (batches of up to %d chunks, idle timeout %.0f s)", self.max_batch,
                      self.table.idle_timeout)

    def _warm_up(self, tokenizer, params) -> None:
        """Decode once in every batch shape the first requests will use, and prime the default voice's state
        (its reference codes, computed as the talker computes them), so the first stream is not slower."""
        decoder = self.table.decoder
        for batch in sorted({1, 2, min(4, self.max_batch)}):
            for frames in (2, 4, 16):
                decoder.decode_batch([decoder.new_state() for _ in range(batch)],
                                     [np.zeros((frames, 16), dtype=np.int32)] * batch)
        store = VoiceStore(params.get("voices_dir") or "voices", default_voice=params.get("default_voice") or None)
        voice = store.default_id()
        if voice is None:
            return
        try:
            audio, sample_rate, transcript = store.reference(voice)
            if transcript is not None:  # ICL voices send reference codes; x-vector voices need no priming
                self.table.prime(reference_codes(tokenizer, audio, sample_rate).numpy())
                self.log.info("primed the decoder state of the default voice '%s'", voice)
        except Exception as exc:  # a broken voice must not keep the server from starting
            self.log.error("cannot prime the default voice '%s': %s", voice, exc)

    def execute(self, requests):
        for request in requests:
            self._pending.put(request)
        return None

    # -- the worker -----------------------------------------------------------------------------------------

    def _work(self):
        while not self._stop.is_set():
            try:
                batch = [self._pending.get(timeout=0.2)]
            except queue.Empty:
                continue
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._pending.get_nowait())
                except queue.Empty:
                    break
            try:
                self._decode(batch)
            except Exception as exc:  # a bug must fail this batch's requests, never the worker
                self.log.exception("decode batch failed")
                for request in batch:
                    self._respond(request, backend.error_response(pb_utils, exc))

    def _decode(self, requests):
        items, senders = [], []
        for request in requests:
            try:
                codes = backend.read_array(pb_utils, request, "codes")
                context = backend.read_array(pb_utils, request, "context_codes", required=False)
                stream_id = int(backend.read_array(pb_utils, request, "stream_id").reshape(-1)[0])
                final_tensor = backend.read_array(pb_utils, request, "final", required=False)
            except Exception as exc:
                self._respond(request, backend.error_response(pb_utils, exc))
                continue
            if request.is_cancelled():
                # The tts request was cancelled: free this stream and stop the talker generating it.
                if self.table.cancel(stream_id):
                    self._cancel_talker(stream_id)
                self._respond(request, backend.error_response(pb_utils, Cancelled("stream cancelled")))
                continue
            final = bool(final_tensor.reshape(-1)[0]) if final_tensor is not None else False
            items.append(DecodeItem(stream_id, codes, context, final))
            senders.append(request)
        results = self.table.decode_many(items)
        self._counts["batches"] += len({len(item.codes) for item in items})
        self._counts["chunks"] += len(items)
        for request, result in zip(senders, results):
            if isinstance(result, BaseException):
                self.log.warning("decode failed: %s", result)
                self._respond(request, backend.error_response(pb_utils, result))
            else:
                self._respond(request, pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor("audio", result.astype(np.float32, copy=False))]))

    @staticmethod
    def _respond(request, response) -> None:
        request.get_response_sender().send(response, flags=FINAL)

    def _cancel_talker(self, stream_id: int) -> None:
        request = pb_utils.InferenceRequest(
            model_name="talker", requested_output_names=[],
            inputs=[pb_utils.Tensor("cancel_stream_id", np.array([stream_id], dtype=np.uint64))])
        try:
            for _ in request.exec(decoupled=True):
                pass
        except Exception as exc:  # the talker may be gone; the stream is freed here regardless
            self.log.warning("could not cancel talker stream %x: %s", stream_id, exc)

    # -- metrics and idle streams (one thread, so metrics are never touched concurrently) -------------------

    def _publish_loop(self):
        interval = max(0.2, min(1.0, self.table.idle_timeout / 4))
        while not self._stop.wait(interval):
            self.table.expire()
            self._active.set(len(self.table))
            for reason, metric in self._freed.items():
                delta = self.table.freed[reason] - self._reported[reason]
                if delta:
                    metric.increment(delta)
                    self._reported[reason] += delta
            counts = {**self._counts, "primings": self.table.primings}
            for name, metric in (("batches", self._batches), ("chunks", self._chunks), ("primings", self._primings)):
                delta = counts[name] - self._reported_counts[name]
                if delta:
                    metric.increment(delta)
                    self._reported_counts[name] += delta

    def finalize(self):
        self._stop.set()
        self._worker.join(timeout=5)
