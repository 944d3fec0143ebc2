"""`make run`: render the model repository, run tritonserver and the gateway until Ctrl-C.

Uses QWEN_TTS_MODEL_DIR when set; otherwise the embedded tiny random-weight model, and says so loudly.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from tools.render_model_repository import ROOT, render, resolve
from tools.triton_local import LocalTriton

TINY_BANNER = """
###############################################################################
#  NO MODEL CONFIGURED: serving the embedded TINY RANDOM-WEIGHT model.        #
#  Audio will be noise, not speech. For real speech set QWEN_TTS_MODEL_DIR    #
#  to a local copy of Qwen3-TTS-12Hz-0.6B-Base (README: Getting the weights). #
###############################################################################
"""


def main() -> int:
    model_dir = os.environ.get("QWEN_TTS_MODEL_DIR", "")
    if not model_dir:
        from tts_engine.tiny_model import build_tiny_model, is_current

        model_dir = str(ROOT / "build" / "tiny-model")
        if not is_current(model_dir):
            build_tiny_model(model_dir)
        print(TINY_BANNER, file=sys.stderr, flush=True)
    profile = os.environ.get("QWEN_TTS_PROFILE", "cpu")
    try:
        values = resolve(profile, {"MODEL_DIR": model_dir})
        from tts_engine.loading import check_model_dir

        check_model_dir(values["MODEL_DIR"])
    except Exception as exc:  # RenderError or ModelDirError: one clear line, no traceback
        print(f"make run: {exc}", file=sys.stderr)
        return 2
    repository = render(ROOT / "build" / "model_repository", values)
    server = LocalTriton(repository, int(os.environ.get("TRITON_HTTP_PORT", 8000)),
                         int(os.environ.get("TRITON_GRPC_PORT", 8001)),
                         int(os.environ.get("TRITON_METRICS_PORT", 8002)),
                         log_path=ROOT / "build" / "logs" / "tritonserver.log")
    print(f"starting tritonserver (log: {server.log_path}) ...", flush=True)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    gateway_port = int(os.environ.get("GATEWAY_PORT", 8080))
    gateway = None
    server.start()
    try:
        server.wait_ready(timeout=float(os.environ.get("TRITON_START_TIMEOUT", 600)))
        gateway_log = open(ROOT / "build" / "logs" / "gateway.log", "ab")
        gateway = subprocess.Popen(
            [sys.executable, "-m", "gateway"], cwd=ROOT, stdout=gateway_log, stderr=subprocess.STDOUT,
            env={**os.environ, "TRITON_URL": server.grpc_url, "GATEWAY_PORT": str(gateway_port),
                 "QWEN_TTS_VOICES_DIR": values["VOICES_DIR"]})
        print(f"""
Ready.
  gateway  ws://127.0.0.1:{gateway_port}/api/v1/speak   http://127.0.0.1:{gateway_port}/api/v1/voices
           /healthz /readyz /metrics   (log: build/logs/gateway.log)
  Triton   gRPC {server.grpc_url}   HTTP {server.http_url}   metrics {server.metrics_url}
Try it:
  .venv/bin/python -m client.speak "Hello there. This is a test." -o hello.wav --url ws://127.0.0.1:{gateway_port}/api/v1/speak
  .venv/bin/python -m client.triton_tts "Hello from Triton." -o hello.wav --url {server.grpc_url}
  curl http://127.0.0.1:{gateway_port}/api/v1/voices
Stop with Ctrl-C.
""", flush=True)
        while not stop and server.process.poll() is None and gateway.poll() is None:
            time.sleep(0.5)
        if server.process.poll() is not None:
            print(f"tritonserver exited with code {server.process.returncode}; see {server.log_path}",
                  file=sys.stderr)
            return 1
        if gateway.poll() is not None:
            print(f"gateway exited with code {gateway.returncode}; see build/logs/gateway.log", file=sys.stderr)
            return 1
    except KeyboardInterrupt:
        pass
    except (RuntimeError, TimeoutError) as exc:
        print(f"make run: {exc}", file=sys.stderr)
        return 1
    finally:
        if gateway is not None and gateway.poll() is None:
            gateway.terminate()
            try:
                gateway.wait(10)
            except subprocess.TimeoutExpired:
                gateway.kill()
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
