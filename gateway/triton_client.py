"""Streaming gRPC to Triton (tritonclient.grpc.aio): one channel for all sessions, readiness tracking."""
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
    """Triton refused or failed a request; ``code`` is the engine code from the error message."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def _string(name: str, value: str) -> InferInput:
    tensor = InferInput(name, [1], "BYTES")
    tensor.set_data_from_numpy(np.array([value.encode("utf-8")], dtype=np.object_))
    return tensor


class TritonBackend:
    def __init__(self, url: str):
        self.url = url
        self.client = grpcclient.InferenceServerClient(url)
        self.ready = False
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
            raise SynthesisFailed("SYNTHESIS_ERROR", f"Triton stream failed: {exc}") from None
        finally:
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
            raise SynthesisFailed(code, message) from None
        return result.as_numpy("prompt")[0]
