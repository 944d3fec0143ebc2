"""Helpers shared by the Triton Python-backend adapters; the Triton utils module is passed in, never imported."""
from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any, Optional

import numpy as np

# Environment variables that override model parameters (same names as the render tool's).
PARAMETER_ENV = {
    "model_dir": "QWEN_TTS_MODEL_DIR",
    "voices_dir": "QWEN_TTS_VOICES_DIR",
    "default_voice": "QWEN_TTS_DEFAULT_VOICE",
    "device": "QWEN_TTS_DEVICE",
    "dtype": "QWEN_TTS_DTYPE",
}


def model_parameters(args: dict) -> dict[str, str]:
    """The model config's string parameters; an empty value falls back to the matching env var."""
    config = json.loads(args["model_config"])
    params = {key: value.get("string_value", "") for key, value in config.get("parameters", {}).items()}
    for key, env in PARAMETER_ENV.items():
        if not params.get(key) and os.environ.get(env):
            params[key] = os.environ[env]
    return params


def device_for_instance(args: dict, requested: str) -> str:
    """A GPU instance uses the GPU Triton assigned it; 'auto'/'cuda' on a CPU instance stays as asked."""
    if args.get("model_instance_kind") == "GPU" and requested in ("", "auto", "cuda"):
        return f"cuda:{args.get('model_instance_device_id', '0')}"
    return requested or "auto"


def model_location(args: dict, params: dict) -> tuple[str, str, Optional[str]]:
    """(model_dir, device, dtype) for this instance, as the loaders take them."""
    return params["model_dir"], device_for_instance(args, params.get("device", "")), params.get("dtype") or None


def metric_family(pb_utils, kind: str, name: str, description: str):
    """A Prometheus family on Triton's metrics endpoint; ``kind`` is "counter" or "gauge"."""
    kinds = {"counter": pb_utils.MetricFamily.COUNTER, "gauge": pb_utils.MetricFamily.GAUGE}
    return pb_utils.MetricFamily(name=name, description=description, kind=kinds[kind])


def setup_logging(model_name: str) -> logging.Logger:
    """Engine logs go to stderr, which Triton's Python stub forwards to the server log."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"%(asctime)s {model_name} %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.WARNING)  # third-party libraries: warnings and up
    level = os.environ.get("QWEN_TTS_LOG_LEVEL", "INFO").upper()
    for name in ("tts_engine", model_name):
        logging.getLogger(name).setLevel(level)
    return logging.getLogger(model_name)


def read_string(pb_utils, request, name: str, required: bool = False) -> Optional[str]:
    """A BYTES [1] input as text; None when absent (optional inputs)."""
    from .errors import InvalidRequest

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


def read_array(pb_utils, request, name: str, required: bool = True) -> Optional[np.ndarray]:
    from .errors import InvalidRequest

    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        if required:
            raise InvalidRequest(f"input '{name}' is required")
        return None
    return tensor.as_numpy()


def request_parameters(request) -> dict[str, Any]:
    """Triton request parameters (a JSON string in the Python backend) as a dict."""
    from .errors import InvalidRequest

    raw = request.parameters()
    try:
        values = json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        raise InvalidRequest("request parameters are not valid JSON") from None
    return values if isinstance(values, dict) else {}


def error_response(pb_utils, error: BaseException):
    """An InferenceResponse carrying ``[CODE] message`` for engine errors, a generic one otherwise."""
    from .errors import EngineError

    message = error.wire() if isinstance(error, EngineError) else f"[SYNTHESIS_ERROR] {type(error).__name__}: {error}"
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message))
