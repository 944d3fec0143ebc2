"""Helpers for tests that talk to a real tritonserver over gRPC (tritonclient.grpc.aio)."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from tritonclient.grpc import InferInput, InferRequestedOutput

from tools.triton_local import scrape_metrics  # noqa: F401 - the tests' metrics reader


def string_input(name: str, value) -> InferInput:
    """A BYTES [1] input from text, or from raw bytes (text split anywhere)."""
    tensor = InferInput(name, [1], "BYTES")
    tensor.set_data_from_numpy(np.array([value if isinstance(value, bytes) else value.encode("utf-8")],
                                        dtype=np.object_))
    return tensor


def command_inputs(command) -> list[InferInput]:
    """A talker control request's inputs for a ``tts_contract.commands`` command (an append's text beside it)."""
    from tts_contract import commands

    inputs = [string_input("command", commands.encode(command))]
    if isinstance(command, commands.Append):
        inputs.append(string_input("text", command.text))
    return inputs


def scalar_input(name: str, value, wire_dtype: str) -> InferInput:
    """A [1] input of UINT64 or BOOL."""
    tensor = InferInput(name, [1], wire_dtype)
    tensor.set_data_from_numpy(np.array([value], dtype={"UINT64": np.uint64, "BOOL": bool}[wire_dtype]))
    return tensor


@dataclass
class StreamResult:
    responses: list = field(default_factory=list)  # (seconds since start, InferResult)
    error: Optional[str] = None

    def arrays(self, name: str) -> list[np.ndarray]:
        return [result.as_numpy(name) for _, result in self.responses]

    def audio(self) -> np.ndarray:
        parts = self.arrays("audio")
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)


async def stream(client, model: str, text: Optional[str] = None, voice: Optional[str] = None,
                 language: Optional[str] = None, parameters: Optional[dict] = None, outputs=("audio",),
                 stop_after: Optional[int] = None, timeout: float = 60.0, extra_inputs=()) -> StreamResult:
    """Send one request on a bidirectional stream and collect its responses until the final one."""
    inputs = [string_input(n, v) for n, v in (("text", text), ("voice", voice), ("language", language))
              if v is not None] + list(extra_inputs)

    async def requests():
        yield {"model_name": model, "inputs": inputs, "parameters": parameters or {},
               "outputs": [InferRequestedOutput(name) for name in outputs]}

    result = StreamResult()
    start = time.monotonic()
    responses = client.stream_infer(requests())

    async def consume():
        async for response, error in responses:
            if error is not None:
                result.error = str(error)
                return
            params = response.get_response().parameters
            final = params["triton_final_response"].bool_param if "triton_final_response" in params else False
            if response.get_response().outputs:
                result.responses.append((time.monotonic() - start, response))
            if final:
                return
            if stop_after is not None and len(result.responses) >= stop_after:
                responses.cancel()
                return

    await asyncio.wait_for(consume(), timeout)
    return result


async def wait_until(predicate, timeout: float = 10.0, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(interval)
    return predicate()
