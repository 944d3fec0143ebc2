"""A model instance's configuration: its rendered parameters (env overrides), device, dtype, logging."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from typing import Optional

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


def exit_with_parent(log: logging.Logger, interval_s: float = 1.0) -> None:
    """Make this model process die within seconds of its tritonserver dying; an orphaned stub would otherwise
    linger, holding its memory (GPU memory on a GPU node) and its shared-memory region.

    The watcher is a tiny shell process, not a Python thread: a thread blocked in a call into the dead
    server can hold the GIL and freeze every other thread of this process."""
    server, me = os.getppid(), os.getpid()
    # The watcher ignores the signals a group stop sends (killpg TERM from an operator or a test harness):
    # the stub ignores them too, so a watcher that died of them would leave the stub behind after the server.
    script = ("trap '' TERM INT HUP; "
              f"while kill -0 {server} 2>/dev/null && kill -0 {me} 2>/dev/null; do sleep {interval_s:g}; done; "
              f"if kill -0 {me} 2>/dev/null; then echo 'tritonserver (pid {server}) is gone; killing model process "
              f"{me}' >&2; kill -9 {me}; fi")
    subprocess.Popen(["/bin/sh", "-c", script], stdin=subprocess.DEVNULL, close_fds=True)
    log.debug("watching tritonserver (pid %d) from a separate process", server)
