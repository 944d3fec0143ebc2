"""Request tensors in, responses out, for the adapters (the Triton utils module is passed in, never imported)."""
from __future__ import annotations

import json
import logging
from typing import Any, Optional

import numpy as np

from tts_contract.errors import EngineCode, to_wire
from tts_engine.errors import EngineError, InvalidRequest

log = logging.getLogger("triton_support")


def read_string(pb_utils, request, name: str, required: bool = False) -> Optional[str]:
    """A BYTES [1] input as text; None when absent (optional inputs)."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        if required:
            raise InvalidRequest(f"input '{name}' is required")
        return None
    values = tensor.as_numpy().reshape(-1)
    if values.size != 1:
        raise InvalidRequest(f"input '{name}' must hold exactly one string, got {values.size}")
    value = values[0]
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidRequest(f"input '{name}' is not valid UTF-8") from None
    return str(value)


def read_bytes(pb_utils, request, name: str) -> Optional[bytes]:
    """A BYTES [1] input as raw bytes (text split anywhere, even inside a character); None when absent."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    values = tensor.as_numpy().reshape(-1)
    if values.size != 1:
        raise InvalidRequest(f"input '{name}' must hold exactly one string, got {values.size}")
    value = values[0]
    return value if isinstance(value, bytes) else str(value).encode()


def read_array(pb_utils, request, name: str, required: bool = True) -> Optional[np.ndarray]:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        if required:
            raise InvalidRequest(f"input '{name}' is required")
        return None
    return tensor.as_numpy()


def request_parameters(request) -> dict[str, Any]:
    """Triton request parameters (a JSON string in the Python backend) as a dict."""
    raw = request.parameters()
    try:
        values = json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        raise InvalidRequest("request parameters are not valid JSON") from None
    return values if isinstance(values, dict) else {}


def response(pb_utils, outputs: dict[str, np.ndarray]):
    """An InferenceResponse carrying these named output tensors."""
    return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(name, value) for name, value in outputs.items()])


def error_response(pb_utils, error: BaseException):
    """An InferenceResponse carrying ``[CODE] message``; anything but an engine error is an internal error
    whose details stay in the server log."""
    if isinstance(error, EngineError):
        message = error.wire()
    else:
        log.error("internal error: %s: %s", type(error).__name__, error)
        message = to_wire(EngineCode.SYNTHESIS_ERROR, "internal error in the speech server")
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message))
