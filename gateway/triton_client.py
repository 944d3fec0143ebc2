"""Streaming gRPC to Triton (tritonclient.grpc.aio): one channel per endpoint shared by all sessions,
readiness tracking, and routing across several Triton endpoints."""
from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator, Optional

import numpy as np
import tritonclient.grpc.aio as grpcclient
from tritonclient.grpc import InferInput, InferRequestedOutput

from tts_engine.errors import parse_wire

log = logging.getLogger("gateway.triton")
REQUIRED_MODELS = ("tts", "voice_encoder")


class SynthesisFailed(Exception):
    """Triton refused or failed a request; ``code`` is the engine code from the error message.

    ``transport`` is true when the endpoint itself failed (down, unreachable), not the request."""

    def __init__(self, code: str, message: str, transport: bool = False):
        super().__init__(message)
        self.code, self.message, self.transport = code, message, transport


def _string(name: str, value: str) -> InferInput:
    tensor = InferInput(name, [1], "BYTES")
    tensor.set_data_from_numpy(np.array([value.encode("utf-8")], dtype=np.object_))
    return tensor


class TritonBackend:
    """One Triton endpoint."""

    def __init__(self, url: str):
        self.url = url
        self.client = grpcclient.InferenceServerClient(url)
        self.ready = False
        self.in_flight = 0  # streams open on this endpoint now
        self._poller: Optional[asyncio.Task] = None

    async def check_ready(self) -> bool:
        try:
            ready = await asyncio.wait_for(self.client.is_server_ready(), 2.0) and all(
                [await asyncio.wait_for(self.client.is_model_ready(m), 2.0) for m in REQUIRED_MODELS])
        except Exception:  # any gRPC failure means "not ready"
            ready = False
        if ready != self.ready:
            log.warning("Triton at %s is %s", self.url, "ready" if ready else "NOT ready")
        self.ready = ready
        return ready

    def start_polling(self, interval: float) -> None:
        async def poll():
            while True:
                await self.check_ready()
                await asyncio.sleep(interval)

        self._poller = asyncio.create_task(poll())

    async def close(self) -> None:
        if self._poller:
            self._poller.cancel()
        await self.client.close()

    async def synthesize(self, text: str, voice: Optional[str], language: Optional[str],
                         parameters: Optional[dict] = None) -> AsyncIterator[np.ndarray]:
        """Yield float32 24 kHz chunks as Triton streams them. Closing the iterator cancels the request."""
        inputs = [_string("text", text)]
        if voice:
            inputs.append(_string("voice", voice))
        if language:
            inputs.append(_string("language", language))

        async def requests():
            yield {"model_name": "tts", "inputs": inputs, "parameters": parameters or {},
                   "outputs": [InferRequestedOutput("audio")]}

        responses = self.client.stream_infer(requests())
        finished = False
        self.in_flight += 1
        try:
            async for result, error in responses:
                if error is not None:
                    finished = True
                    code, message = parse_wire(str(error))
                    raise SynthesisFailed(code, message)
                audio = result.as_numpy("audio")
                params = result.get_response().parameters
                last = "triton_final_response" in params and params["triton_final_response"].bool_param
                if audio is not None and audio.size:
                    yield audio
                if last:
                    finished = True
                    return
            finished = True
        except SynthesisFailed:
            raise
        except Exception as exc:  # connection loss, Triton crash
            finished = True
            self.ready = False
            raise SynthesisFailed("SYNTHESIS_ERROR", f"Triton at {self.url} failed: {exc}", transport=True) from None
        finally:
            self.in_flight -= 1
            if not finished:
                responses.cancel()  # the consumer stopped early: cancel the Triton request itself

    async def encode_voice(self, audio: np.ndarray, sample_rate: int, ref_text: Optional[str]) -> bytes:
        """Run voice_encoder; returns the serialised prompt (safetensors bytes)."""
        tensor = InferInput("audio", [int(audio.size)], "FP32")
        tensor.set_data_from_numpy(np.ascontiguousarray(audio, dtype=np.float32))
        rate = InferInput("sample_rate", [1], "INT32")
        rate.set_data_from_numpy(np.array([sample_rate], dtype=np.int32))
        inputs = [tensor, rate] + ([_string("ref_text", ref_text)] if ref_text else [])
        try:
            result = await asyncio.wait_for(self.client.infer("voice_encoder", inputs), 120)
        except Exception as exc:
            code, message = parse_wire(str(exc))
            raise SynthesisFailed(code, message, transport=code == "SYNTHESIS_ERROR") from None
        return result.as_numpy("prompt")[0]


class TritonPool:
    """Several Triton endpoints behind one interface: new requests go to a ready endpoint with the fewest
    open streams; a request that fails because its endpoint is down, before any audio, moves to another."""

    def __init__(self, urls: list[str]):
        if not urls:
            raise ValueError("no Triton endpoint configured")
        self.backends = [TritonBackend(url) for url in urls]
        self._next = 0

    @property
    def url(self) -> str:
        return ",".join(b.url for b in self.backends)

    @property
    def ready(self) -> bool:
        return any(b.ready for b in self.backends)

    def status(self) -> dict[str, bool]:
        return {b.url: b.ready for b in self.backends}

    async def check_ready(self) -> bool:
        await asyncio.gather(*(b.check_ready() for b in self.backends))
        return self.ready

    def start_polling(self, interval: float) -> None:
        for backend in self.backends:
            backend.start_polling(interval)

    async def close(self) -> None:
        await asyncio.gather(*(b.close() for b in self.backends), return_exceptions=True)

    def _order(self) -> list[TritonBackend]:
        """Ready endpoints by fewest open streams (round-robin among equals), then the others."""
        self._next = (self._next + 1) % len(self.backends)
        rotated = self.backends[self._next:] + self.backends[:self._next]
        ready = sorted((b for b in rotated if b.ready), key=lambda b: b.in_flight)
        return ready + [b for b in rotated if not b.ready]

    async def synthesize(self, text: str, voice: Optional[str], language: Optional[str],
                         parameters: Optional[dict] = None) -> AsyncIterator[np.ndarray]:
        last_error: Optional[SynthesisFailed] = None
        for backend in self._order():
            produced = False
            stream = backend.synthesize(text, voice, language, parameters)
            try:
                async for chunk in stream:
                    produced = True
                    yield chunk
                return
            except SynthesisFailed as exc:
                if produced or not exc.transport:
                    raise
                log.warning("Triton at %s failed before any audio; trying the next endpoint", backend.url)
                last_error = exc
            finally:
                await stream.aclose()
        raise last_error or SynthesisFailed("MODEL_LOADING", "no Triton endpoint is available", transport=True)

    async def encode_voice(self, audio: np.ndarray, sample_rate: int, ref_text: Optional[str]) -> bytes:
        last_error: Optional[SynthesisFailed] = None
        for backend in self._order():
            try:
                return await backend.encode_voice(audio, sample_rate, ref_text)
            except SynthesisFailed as exc:
                if not exc.transport:
                    raise
                last_error = exc
        raise last_error or SynthesisFailed("MODEL_LOADING", "no Triton endpoint is available", transport=True)
