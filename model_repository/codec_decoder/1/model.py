"""Triton adapter for the codec decoder: chunks of many streams -> PCM, decoded together, exact per-stream state.

Decoupled: ``execute`` only queues requests; one worker takes everything queued, decodes chunks of equal
length from different streams in one batched forward, and answers each request with one final response.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from triton_support import params as config
from triton_support.metrics import MetricsPublisher
from triton_support.queueing import BatchingWorker
from triton_support.streaming import cancel_talker_stream, read_decode_item, send_final, talker_names
from triton_support.tensors import error_response, response
from tts_contract import tensors as names
from tts_engine.codec.decoder import StreamingDecoder
from tts_engine.codec.streams import DecodeItem, StreamTable
from tts_engine.graphs import batch_buckets
from tts_engine.loading import load_speech_tokenizer
from tts_engine.recent import RecentIds
from tts_engine.voices.prompts import reference_codes
from tts_engine.voices.store import VoiceStore

EMPTY_AUDIO = np.zeros(0, dtype=np.float32)
FAMILIES = {
    "qwen_tts_decoder_active_streams": ("gauge", "Streams whose decoder state is held", None, len),
    "qwen_tts_decoder_streams_freed_total": ("counter", "Decoder states freed, by reason", "reason",
                                             lambda table: dict(table.freed)),
    "qwen_tts_decoder_primings_total": ("counter", "Voices whose reference codes were decoded to prime streams",
                                        None, lambda table: table.primings),
    "qwen_tts_decoder_batches_total": ("counter", "Batched decoder forwards", None, lambda table: table.batches),
    "qwen_tts_decoder_chunks_total": ("counter", "Chunks decoded (/ batches = mean batch size)", None,
                                      lambda table: table.chunks),
    "qwen_tts_decoder_frames_total": ("counter", "Frames decoded (/ chunks = mean chunk)", None,
                                      lambda table: table.frames),
}


class TritonPythonModel:
    def initialize(self, args):
        self.log = config.setup_logging("codec_decoder")
        config.exit_with_parent(self.log)
        params = config.model_parameters(args)
        # The warm-up below runs on this thread, while the other models load: with torch's default (every
        # core) it fought them for the CPU and took 4-5 s instead of about 1 s on 2 cores. The worker thread
        # sets the same count for itself.
        threads = int(params["torch_threads"])
        self.talkers = talker_names(params)  # where a cancelled tts request's `cancel` command goes
        torch.set_num_threads(threads)
        tokenizer = load_speech_tokenizer(*config.model_location(args, params))
        max_batch, primed = int(params["max_batch_streams"]), int(params["primed_state_cache_size"])
        decoder = StreamingDecoder(tokenizer.model, capacity=2 * max_batch + primed + 1)
        if params["cuda_graphs"] == "on" and str(decoder.device).startswith("cuda"):
            decoder.buckets = batch_buckets(max_batch)
            decoder.capture_graphs()
        self.table = StreamTable(decoder, idle_timeout=float(params["stream_idle_timeout_s"]),
                                 primed_cache_size=primed)
        self.failed = RecentIds(1024)  # streams whose decoding failed -> the error their last chunk reports
        self.worker = BatchingWorker(self._decode, self._fail, max_batch=max_batch,
                                     name="codec-decoder",
                                     on_start=lambda: torch.set_num_threads(threads))
        self._warm_up(tokenizer, params)
        self.metrics = MetricsPublisher(pb_utils, FAMILIES, lambda: self.table, interval_s=1.0,
                                        before_publish=self.table.expire)
        self.log.info("codec_decoder ready (batches of up to %d chunks, idle timeout %.0f s, talkers %s)",
                      self.worker.max_batch, self.table.idle_timeout, ",".join(self.talkers))

    def _warm_up(self, tokenizer, params) -> None:
        """Decode once in the batch shapes the first requests use, and prime the default voice's state (its
        reference codes, computed as the talker computes them), so the first stream is not slower."""
        self.table.decoder.warm_up(self.worker.max_batch)
        store = VoiceStore(params["voices_dir"] or "voices", default_voice=params["default_voice"] or None)
        voice = store.default_id()
        try:
            audio, sample_rate, transcript = store.reference(voice) if voice else (None, 0, None)
            if transcript is not None:  # ICL voices send reference codes; x-vector voices need no priming
                self.table.prime(reference_codes(tokenizer, audio, sample_rate).numpy())
                self.log.info("primed the decoder state of the default voice '%s'", voice)
        except Exception as exc:  # a broken voice must not keep the server from starting
            self.log.error("cannot prime the default voice '%s': %s", voice, exc)

    def execute(self, requests):
        for request in requests:
            self.worker.put(request)
        return None

    def _decode(self, requests) -> None:
        pairs = []
        for request in requests:
            try:
                pairs.append((request, read_decode_item(pb_utils, request)))
            except Exception as exc:  # unreadable tensors: no stream to follow, the request just ends
                self._respond(request, error_response(pb_utils, exc))
        # Chunks of cancelled tts requests get empty audio (see _fail_stream: the client is gone, the request must
        # still end). Triton 2.51 never tells the talker that a tts request was cancelled (its in-flight step
        # request never reports it: tests/test_triton.py::test_cancelling_tts_stops_generation_and_frees_decoder_state shows
        # the talker going on to its frame cap without this), so the decoder sends it the `cancel` command.
        decode, cancelled = self.table.split_cancelled([item for _, item in pairs],
                                                       [self._cancelled(request) for request, _ in pairs])
        for stream_id in cancelled:
            cancel_talker_stream(pb_utils, stream_id, self.log, self.talkers)
        items, senders = [], []
        chosen = set(decode)
        for index, (request, item) in enumerate(pairs):
            try:
                if item.stream_id in self.failed:
                    self._fail_stream(request, item)
                elif index not in chosen:
                    self._respond(request, self._audio_response(EMPTY_AUDIO))
                else:
                    items.append(item)
                    senders.append(request)
            except Exception as exc:
                self._fail_stream(request, item, exc)
        answered = set()

        def answer(index, result):  # as soon as its forward is done: short (urgent) chunks come first
            answered.add(index)
            request, item = senders[index], items[index]
            if isinstance(result, BaseException):
                self.log.warning("decode of stream %x failed: %s", item.stream_id, result)
                self._fail_stream(request, item, result)
            else:
                self._respond(request, self._audio_response(result))

        try:
            self.table.decode_many(items, on_result=answer)
        except Exception as exc:  # a bug: each stream still ends on its last chunk, never left in flight
            for index in range(len(items)):
                if index not in answered:
                    answer(index, exc)

    def _fail_stream(self, request, item: DecodeItem, error: Optional[BaseException] = None) -> None:
        """Report a failed stream on its last chunk. Triton 2.51's ensemble never completes a request whose
        step fails while its first step still streams (it stays in flight for good and blocks a graceful
        shutdown), so the talker is stopped first and the error waits for the chunk that ends the stream."""
        if item.final:  # the error that failed the stream first, if it failed before
            self._respond(request, error_response(pb_utils, self.failed.pop(item.stream_id) or error))
            return
        if item.stream_id not in self.failed:
            self.failed.add(item.stream_id, error)
            cancel_talker_stream(pb_utils, item.stream_id, self.log, self.talkers)
        self._respond(request, self._audio_response(EMPTY_AUDIO))

    def _cancelled(self, request) -> bool:
        """Whether Triton says this request was cancelled; one it can no longer answer about is gone too."""
        try:
            return request.is_cancelled()
        except Exception as exc:
            self.log.warning("cannot ask Triton whether a chunk's request was cancelled: %s", exc)
            return True

    def _fail(self, requests, error) -> None:
        for request in requests:
            self._respond(request, error_response(pb_utils, error))

    @staticmethod
    def _audio_response(audio: np.ndarray):
        return response(pb_utils, {names.AUDIO: audio.astype(np.float32, copy=False)})

    def _respond(self, request, response) -> None:
        send_final(pb_utils, request, response, self.log)

    def finalize(self):
        self.metrics.stop()
        self.worker.stop()
