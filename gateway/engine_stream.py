"""One engine stream over gRPC (tritonclient.grpc.aio): a `tts` request streaming audio back, its text still being
written sent as typed `append`/`flush`/`end` commands on the same gRPC stream, and the engine's errors as
``SynthesisFailed`` (with the engine's code and retry hint). Also a voice encode."""
from __future__ import annotations

import asyncio
import logging
import secrets
from typing import AsyncIterator, Callable, Coroutine, Optional

import numpy as np
from tritonclient.grpc import InferInput, InferRequestedOutput

from tts_contract import commands, tensors as names
from tts_contract.deadlines import retry_after_ms
from tts_contract.errors import EngineCode, parse_wire

from .endpoints import Endpoint, Endpoints, command_inputs, is_final

log = logging.getLogger("gateway.engine_stream")
SPEAK_ID = "speak"  # the synthesis request's id on its gRPC stream (commands have their own)
CANCEL_WAIT_S = 2.0  # the longest a cancel command is awaited


class SynthesisFailed(Exception):
    """Triton refused or failed a request; ``code`` is the engine code from the error message.

    ``transport`` is true when the endpoint itself failed (down, unreachable), not the request."""

    def __init__(self, code: EngineCode, message: str, transport: bool = False,
                 retry_after_ms: Optional[int] = None):
        super().__init__(message)
        self.code, self.message, self.transport = EngineCode(code), message, transport
        self.retry_after_ms = retry_after_ms


def engine_error(error) -> SynthesisFailed:
    """A Triton error as the engine's code and message (with its retry hint, for a refusal); text that is not
    the engine's own stays in the log."""
    code, message = parse_wire(str(error))
    if code == EngineCode.SYNTHESIS_ERROR:
        log.warning("Triton error: %s", error)
        message = "synthesis failed inside the speech server"
    return SynthesisFailed(code, message, retry_after_ms=retry_after_ms(message))


# Triton's own words when a model process is hung or dead (its request never reached the model): the server is
# failing, whatever the request.
SERVER_FAILING = ("is not healthy", "Stub process", "Failed to process the request(s) for model instance")


def server_failing(error) -> bool:
    """Whether a Triton error is the server's model process failing (not an answer of the engine's)."""
    text = str(error)
    coded = any(f"[{code.value}]" in text for code in EngineCode)  # an engine's own error names its code
    return not coded and any(words in text for words in SERVER_FAILING)


def _string(name: str, value: str) -> InferInput:
    tensor = InferInput(name, [1], "BYTES")
    tensor.set_data_from_numpy(np.array([value.encode("utf-8")], dtype=np.object_))
    return tensor


def _command(command: commands.Command, talker: str) -> dict:
    """A talker control request on the synthesis request's gRPC stream."""
    return {"model_name": talker, "inputs": command_inputs(command),
            "request_id": f"{command.kind}-{secrets.token_hex(4)}"}


async def stream_audio(endpoint: Endpoint, text: str, voice: Optional[str], language: Optional[str],
                       parameters: dict, spawn: Callable[[Coroutine], None],
                       written=None, *, tts_model: str = names.TTS, talker: str = names.TALKER,
                       instruct: Optional[str] = None) -> AsyncIterator[np.ndarray]:
    """Yield float32 24 kHz chunks as Triton streams them, from the ensemble ``tts_model`` whose talker is
    ``talker`` (the served model's; its commands go there). ``instruct``: a style instruction or a described voice,
    for the models that take one. ``written``: a ``TextSegment`` still being written; the request then opens with
    its text so far (``text_key``) and sends the rest, its flushes and its end as commands on the same gRPC stream.

    Closing the iterator early cancels the gRPC stream, and the engine stream the one way an engine stream ends: a
    `cancel` command naming it by its ``stream_key`` (Triton does not pass a `tts` request's cancellation on to the
    talker, which would otherwise keep the stream in its line, or go on until the decoder stops it), sent in the
    background by ``spawn`` (a barge-in never waits for it)."""
    stream_key = secrets.randbits(63)
    text_key = secrets.randbits(63) if written is not None else None
    if written is not None:
        text = written.text  # what it opens with; the rest follows as appends
    inputs = [_string(names.TEXT, text)]
    if text_key is not None:
        key_tensor = InferInput(names.TEXT_KEY, [1], "UINT64")
        key_tensor.set_data_from_numpy(np.array([text_key], dtype=np.uint64))
        inputs.append(key_tensor)
    if voice:
        inputs.append(_string(names.VOICE, voice))
    if language:
        inputs.append(_string(names.LANGUAGE, language))
    if instruct:
        inputs.append(_string(names.INSTRUCT, instruct))

    async def requests():
        yield {"model_name": tts_model, "inputs": inputs, "parameters": {**parameters, commands.STREAM_KEY: stream_key},
               "request_id": SPEAK_ID, "outputs": [InferRequestedOutput(names.AUDIO)]}
        if written is None:
            return
        async for piece, flush in written.pieces(len(text)):
            if piece:
                yield _command(commands.Append(text_key, piece.encode("utf-8")), talker)
            if flush:
                yield _command(commands.Flush(text_key), talker)
        yield _command(commands.End(text_key), talker)

    responses = endpoint.client.stream_infer(requests())
    finished = False
    try:
        async for result, error in responses:
            if error is not None:
                finished = True
                if server_failing(error):  # the server's own machinery, not this request: move, as for a lost link
                    endpoint.failed(f"the server reported its model process failing ({error})")
                    raise SynthesisFailed(EngineCode.UNAVAILABLE, "the speech server is failing; try again",
                                          transport=True)
                raise engine_error(error)
            if result.get_response().id != SPEAK_ID:  # a command's acknowledgement
                continue
            audio = result.as_numpy(names.AUDIO)
            last = is_final(result)
            if audio is not None and audio.size:
                yield audio
            if last:
                finished = True
                return
        finished = True
    except SynthesisFailed:
        raise
    except Exception as exc:  # connection loss, Triton crash: the details go to the log, not to clients
        finished = True
        endpoint.failed(f"a stream's connection failed ({exc})")
        raise SynthesisFailed(EngineCode.UNAVAILABLE, "the speech server stopped responding; try again",
                              transport=True) from None
    finally:
        if not finished:  # the consumer stopped early (a cancel, a client gone): the engine ends the stream
            responses.cancel()
            spawn(_cancel(endpoint, stream_key, talker))


async def _cancel(endpoint: Endpoint, stream_key: int, talker: str) -> None:
    """Cancel an engine stream by its key, on a gRPC stream of its own (its own is cancelled already: a task
    cancelled while reading a call cancels the call)."""
    try:
        await endpoint.command(commands.Cancel(stream_key=stream_key), timeout_s=CANCEL_WAIT_S, talker=talker)
    except Exception as exc:  # ended meanwhile (an unknown key), or the server is gone: nothing left to stop
        log.debug("cancel of stream key %x at %s: %s", stream_key, endpoint.url, exc)


async def encode_voice(endpoints: Endpoints, audio: np.ndarray, sample_rate: int, ref_text: Optional[str]) -> bytes:
    """Run voice_encoder on a ready endpoint (the least busy first; the next one when an endpoint fails); returns
    the serialised prompt (safetensors bytes). A deployment with no Base model has no voice encoder: that is said
    (MODEL_LOADING, not a transport failure)."""
    last_error: Optional[SynthesisFailed] = None
    usable = [e for e in endpoints.endpoints if e.usable]
    encoding = [e for e in usable if e.voice_encoder]
    if usable and not encoding:
        served = ", ".join(endpoints.models()) or "none described yet"
        raise SynthesisFailed(EngineCode.MODEL_LOADING, "no voice encoder is served here: cloned voices are made "
                              "for Base models, and this deployment serves none ready (its models: "
                              f"{served})")
    for endpoint in sorted(encoding, key=lambda e: e.streams) or list(endpoints.endpoints):
        try:
            with endpoints.calling(endpoint):
                return await _encode_voice(endpoint, audio, sample_rate, ref_text)
        except SynthesisFailed as exc:
            if not exc.transport:
                raise
            last_error = exc
    raise last_error or SynthesisFailed(EngineCode.MODEL_LOADING, "no Triton endpoint is available", transport=True)


async def _encode_voice(endpoint: Endpoint, audio: np.ndarray, sample_rate: int, ref_text: Optional[str]) -> bytes:
    tensor = InferInput(names.AUDIO, [int(audio.size)], "FP32")
    tensor.set_data_from_numpy(np.ascontiguousarray(audio, dtype=np.float32))
    rate = InferInput(names.SAMPLE_RATE, [1], "INT32")
    rate.set_data_from_numpy(np.array([sample_rate], dtype=np.int32))
    inputs = [tensor, rate] + ([_string(names.REF_TEXT, ref_text)] if ref_text else [])
    try:
        result = await asyncio.wait_for(endpoint.client.infer(names.VOICE_ENCODER, inputs), 120)
    except Exception as exc:
        failure = engine_error(exc)
        failure.transport = failure.code == EngineCode.SYNTHESIS_ERROR
        raise failure from None
    return result.as_numpy(names.PROMPT)[0]
