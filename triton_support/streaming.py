"""The talker's side of a stream: the responses that carry its codes (each request ends exactly once with
COMPLETE_FINAL), the keys clients name their streams by, and the decoder's side of a chunk."""
from __future__ import annotations

import logging
import threading
from typing import Callable, Optional

import numpy as np

from tts_contract import commands, tensors as names
from tts_contract.audio import NUM_CODEBOOKS
from tts_engine.codec.streams import DecodeItem
from tts_engine.errors import Cancelled, InvalidRequest

from .cancellation import CancellationWatcher
from .tensors import error_response, read_array, response

EMPTY_CODES = np.zeros((0, NUM_CODEBOOKS), dtype=np.int32)
log = logging.getLogger("triton_support")


class CodesSink:
    """Where one talker stream's output goes (the engine's output thread calls it): `codes` responses, the first
    carrying the voice's reference codes (ICL) for the decoder to prime with, the last carrying ``final`` and
    COMPLETE_FINAL itself. A stream that ends before its first frame still gets one (empty) final response; so
    does a cancelled one; a failed one gets an error. ``on_end`` runs first when the stream ends."""

    def __init__(self, pb_utils, request, stream_id: int, context_codes, watcher: CancellationWatcher,
                 on_end: Optional[Callable[[], None]] = None):
        self._pb_utils, self._sender = pb_utils, request.get_response_sender()
        self._stream_id, self._watcher, self._on_end = stream_id, watcher, on_end
        self._context = EMPTY_CODES if context_codes is None else context_codes.numpy().astype(np.int32)
        self._id_tensor = np.array([stream_id], dtype=np.uint64)
        self._final_sent = False
        watcher.watch(stream_id, request)

    def _response(self, codes: np.ndarray, context: np.ndarray, final: bool):
        return response(self._pb_utils, {names.CODES: codes, names.CONTEXT_CODES: context,
                                         names.STREAM_ID: self._id_tensor, names.FINAL: np.array([final], dtype=bool)})

    def chunk(self, codes, index: int, last: bool) -> None:
        reply = self._response(codes.numpy().astype(np.int32), self._context if index == 0 else EMPTY_CODES, last)
        if last:  # clients see the end with the last chunk, not in an extra message
            self._watcher.release(self._stream_id, lambda: self._send_final(reply))
            self._final_sent = True  # (not if that send failed: ``end`` then sends the request its final response)
        else:
            self._sender.send(reply)

    def end(self, error: Optional[BaseException], reason: str) -> None:
        if self._on_end is not None:
            self._on_end()
        if self._final_sent and error is None:
            return
        # The decoder frees a stream on `final`. A cancelled stream ends with an empty final chunk too: the decoder
        # reports a failed stream's error on the chunk that ends it (Triton's ensemble cannot end a request on an
        # earlier one).
        reply = self._response(EMPTY_CODES, EMPTY_CODES, True) if error is None or isinstance(error, Cancelled) \
            else error_response(self._pb_utils, error)
        self._final_sent = True
        self._watcher.release(self._stream_id, lambda: self._send_final(reply, quiet=True))

    def _send_final(self, reply, quiet: bool = False) -> None:
        try:
            self._sender.send(reply, flags=self._pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Exception as exc:
            if not quiet:
                raise
            log.warning("stream %x: could not send its final response: %s", self._stream_id, exc)


class ClientKeys:
    """The keys a client named its streams by (a text's ``text_key``, a stream's ``stream_key``): the stream each
    names, while it runs. ``kind`` names them in errors."""

    def __init__(self, kind: str):
        self.kind = kind
        self._streams: dict[int, int] = {}
        self._lock = threading.Lock()

    def open(self, key: int, stream_id: int) -> None:
        with self._lock:
            if key in self._streams:
                raise InvalidRequest(f"{self.kind} {key} is already in use")
            self._streams[key] = stream_id

    def stream(self, key: int) -> int:
        with self._lock:
            stream_id = self._streams.get(key)
        if stream_id is None:
            raise InvalidRequest(f"no open stream with {self.kind} {key} (never opened, or it has ended)")
        return stream_id

    def forget(self, key: int) -> None:
        with self._lock:
            self._streams.pop(key, None)


def read_decode_item(pb_utils, request) -> DecodeItem:
    """A codec_decoder request's chunk: its codes, the voice's reference codes (first chunk), stream and end."""
    final = read_array(pb_utils, request, names.FINAL, required=False)
    return DecodeItem(int(read_array(pb_utils, request, names.STREAM_ID).reshape(-1)[0]),
                      read_array(pb_utils, request, names.CODES),
                      read_array(pb_utils, request, names.CONTEXT_CODES, required=False),
                      bool(final.reshape(-1)[0]) if final is not None else False)


def cancel_talker_stream(pb_utils, stream_id: int, log: logging.Logger, talkers=(names.TALKER,)) -> None:
    """Send the talkers a `cancel` command for ``stream_id``: Triton 2.51 does not cancel an ensemble's in-flight
    first step (tests/test_triton.py::test_cancelling_tts_stops_generation_and_frees_decoder_state shows the talker going
    on without this), so codec_decoder does it when the tts request is cancelled or its decoding failed. The
    decoder does not know which talker (one per served model) runs the stream: each gets the command, and the ones
    that do not run it ignore it (stream ids are unique across processes). Called on the decoder's worker thread
    (sent from a thread of its own instead, one full test run left ensemble requests in flight at shutdown)."""
    message = np.array([commands.encode(commands.Cancel(stream_id))], dtype=np.object_)
    for talker in talkers:
        request = pb_utils.InferenceRequest(model_name=talker, requested_output_names=[],
                                            inputs=[pb_utils.Tensor(names.COMMAND, message)])
        try:
            for _ in request.exec(decoupled=True):
                pass
        except Exception as exc:  # the talker may be gone; the stream is freed regardless
            log.warning("could not cancel stream %x on %s: %s", stream_id, talker, exc)


def talker_names(params: dict) -> tuple:
    """The talkers named by codec_decoder's ``talkers`` parameter (comma list; absent or empty: `talker`)."""
    return tuple(name.strip() for name in (params.get("talkers") or "").split(",") if name.strip()) or (names.TALKER,)


def send_final(pb_utils, request, response, log: logging.Logger) -> None:
    """End a request with ``response``; a failure to send is logged (the request is gone), never raised."""
    try:
        request.get_response_sender().send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
    except Exception as exc:
        log.warning("could not send a final response: %s", exc)
