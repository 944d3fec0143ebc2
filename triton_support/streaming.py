"""The talker's side of a stream: ids that name it to the codec decoder, cancellation watched off the serving
loop, and the responses that carry its codes (each request ends exactly once with COMPLETE_FINAL)."""
from __future__ import annotations

import itertools
import logging
import secrets
import threading

import numpy as np

from tts_contract import tensors as names
from tts_contract.audio import NUM_CODEBOOKS
from tts_engine.codec.streams import DecodeItem
from tts_engine.errors import Cancelled
from tts_engine.generation.scheduler import StreamJob
from tts_engine.recent import RecentIds

from .tensors import error_response, read_array, response

EMPTY_CODES = np.zeros((0, NUM_CODEBOOKS), dtype=np.int32)
log = logging.getLogger("triton_support")


class StreamIds:
    """Unique stream ids: a random per-process prefix and a counter (unique across instances and restarts)."""

    def __init__(self):
        self._counter = itertools.count(1)
        self._prefix = secrets.randbits(31) << 32
        self._lock = threading.Lock()

    def next(self) -> int:
        with self._lock:
            return self._prefix | next(self._counter)


class CancelWatcher:
    """Which streams were cancelled. ``request.is_cancelled()`` is a call into the Triton parent process, so
    this thread asks it for every active request a few times a second, and the serving loop only reads a set
    (a dead parent then blocks this thread, never the loop). Control requests add ids directly."""

    def __init__(self, interval_s: float = 0.05):
        self.cancelled = RecentIds(4096)  # ids of ended streams are never checked again
        self._requests: dict[int, object] = {}
        self._lock = threading.Lock()
        self._interval = interval_s
        self._stop = threading.Event()
        threading.Thread(target=self._run, name="cancel-watcher", daemon=True).start()

    def watch(self, stream_id: int, request) -> None:
        with self._lock:
            self._requests[stream_id] = request

    def forget(self, stream_id: int) -> None:
        with self._lock:
            self._requests.pop(stream_id, None)

    def is_cancelled(self, stream_id: int) -> bool:
        return stream_id in self.cancelled

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            with self._lock:
                stream_ids = list(self._requests)
            for stream_id in stream_ids:
                # Asked under the lock: once ``forget`` returns, this request is never asked about again, and
                # it must not be once its final response is sent (Triton frees it: asking then crashes it).
                with self._lock:
                    request = self._requests.get(stream_id)
                    try:
                        cancelled = request is not None and request.is_cancelled()
                    except Exception as exc:  # a request Triton no longer knows: stop asking about it
                        log.warning("cannot ask Triton whether stream %x was cancelled: %s", stream_id, exc)
                        cancelled = False
                        self._requests.pop(stream_id, None)
                    if cancelled:
                        self.cancelled.add(stream_id)
                        self._requests.pop(stream_id, None)

    def stop(self) -> None:
        self._stop.set()


def codes_job(pb_utils, request, synthesis, delivery, stream_id: int, watcher: CancelWatcher) -> StreamJob:
    """A scheduler job that streams ``codes`` responses for one talker request, paced for its listener
    (``delivery``: when the listener needs its audio).

    The first response carries the voice's reference codes (ICL) for the decoder to prime with; the last
    carries ``final`` and COMPLETE_FINAL itself. A stream that ends before its first frame still gets one
    (empty) final response; so does a cancelled one; a failed one gets an error."""
    sender = request.get_response_sender()
    final_flag = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
    context = synthesis.prompt.ref_code
    context_codes = EMPTY_CODES if context is None else context.numpy().astype(np.int32)
    id_tensor = np.array([stream_id], dtype=np.uint64)
    ended = []

    def respond(codes: np.ndarray, context_np: np.ndarray, final: bool):
        return response(pb_utils, {names.CODES: codes, names.CONTEXT_CODES: context_np, names.STREAM_ID: id_tensor,
                                   names.FINAL: np.array([final], dtype=bool)})

    def on_chunk(chunk, index, is_last):
        response = respond(chunk.numpy().astype(np.int32), context_codes if index == 0 else EMPTY_CODES, is_last)
        if is_last:  # clients see the end with the last chunk, not in an extra message
            watcher.forget(stream_id)  # before the final response: Triton frees the request with it
            sender.send(response, flags=final_flag)
            ended.append(True)  # (if that send failed, on_end still tries to end the request)
        else:
            sender.send(response)

    def on_end(error, job):
        # The decoder frees a stream on `final`; streams that end by cancellation or error are freed by
        # codec_decoder (its cancel, or its idle timeout).
        watcher.forget(stream_id)
        if ended:
            return
        if error is None or isinstance(error, Cancelled):
            # A cancelled stream ends with an empty final chunk too: the decoder reports a failed stream's
            # error on the chunk that ends it (Triton's ensemble cannot end a request on an earlier one).
            sender.send(respond(EMPTY_CODES, EMPTY_CODES, True), flags=final_flag)
        else:
            sender.send(error_response(pb_utils, error), flags=final_flag)

    watcher.watch(stream_id, request)
    return StreamJob(request=synthesis, on_chunk=on_chunk, on_end=on_end,
                     is_cancelled=lambda: watcher.is_cancelled(stream_id), delivery=delivery, label=f"{stream_id:x}")


def read_decode_item(pb_utils, request) -> DecodeItem:
    """A codec_decoder request's chunk: its codes, the voice's reference codes (first chunk), stream and end."""
    final = read_array(pb_utils, request, names.FINAL, required=False)
    return DecodeItem(int(read_array(pb_utils, request, names.STREAM_ID).reshape(-1)[0]),
                      read_array(pb_utils, request, names.CODES),
                      read_array(pb_utils, request, names.CONTEXT_CODES, required=False),
                      bool(final.reshape(-1)[0]) if final is not None else False)


def cancel_talker_stream(pb_utils, stream_id: int, log: logging.Logger) -> None:
    """Ask the talker to stop generating ``stream_id``: Triton 2.51 does not cancel an ensemble's in-flight
    first step, so codec_decoder does it when the tts request is cancelled or its decoding failed. Called on
    the decoder's worker thread (sent from a thread of its own instead, one full test run left ensemble
    requests in flight at shutdown)."""
    request = pb_utils.InferenceRequest(
        model_name=names.TALKER, requested_output_names=[],
        inputs=[pb_utils.Tensor(names.CANCEL_STREAM_ID, np.array([stream_id], dtype=np.uint64))])
    try:
        for _ in request.exec(decoupled=True):
            pass
    except Exception as exc:  # the talker may be gone; the stream is freed regardless
        log.warning("could not cancel talker stream %x: %s", stream_id, exc)


def send_final(pb_utils, request, response, log: logging.Logger) -> None:
    """End a request with ``response``; a failure to send is logged (the request is gone), never raised."""
    try:
        request.get_response_sender().send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
    except Exception as exc:
        log.warning("could not send a final response: %s", exc)
