"""`make run`: render the model repository, then run and supervise tritonserver and the gateway.

Serves QWEN_TTS_MODELS (name=dir,...: several models, the first the default) when set, else QWEN_TTS_MODEL_DIR
(one model); with neither, the embedded tiny random-weight models, and says so loudly: a Base model (the default)
plus a CustomVoice and a VoiceDesign one, named as the real checkpoints would be. Word timestamps (the `aligner`
model) come from QWEN_TTS_ALIGNER_DIR when set (empty: none); with the tiny models and no QWEN_TTS_ALIGNER_DIR,
from the tiny random-weight aligner, so that the embedded stack has them too.
When tritonserver dies, what it leaves (model processes, shared memory) is removed and it is restarted (at
once the first time, then with backoff) while the gateway stays up: sessions get MODEL_LOADING meanwhile
and work again once Triton is back. Ctrl-C or SIGTERM drains the gateway (every
utterance ends with its end message), then stops Triton.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from tools.gateway_local import GatewayProcess
from tools.render_model_repository import ROOT, render, resolve, served_models, summary
from tools.triton_local import LocalTriton

TINY_BANNER = """
###############################################################################
#  NO MODEL CONFIGURED: serving the embedded TINY RANDOM-WEIGHT models.       #
#  Audio will be noise, not speech. For real speech set QWEN_TTS_MODEL_DIR    #
#  to a local copy of Qwen3-TTS-12Hz-0.6B-Base (README: Getting the weights), #
#  or QWEN_TTS_MODELS=name=dir,name2=dir2 for several checkpoints.            #
###############################################################################
"""
# Overridable so that a benchmark or a second stack does not interleave its logs with those of `make run`.
LOGS = Path(os.environ.get("QWEN_TTS_LOG_DIR") or ROOT / "build" / "logs")


# The embedded tiny models of `make run` without weights: served name -> (build/ folder, tiny_model preset). Named
# as the real checkpoints would be by default (tts_contract.models.default_name).
TINY_MODELS = {
    "qwen3-tts-0.6b-base": ("tiny-model", "tiny"),
    "qwen3-tts-1.7b-custom-voice": ("tiny-custom-voice", "tiny-custom-voice"),
    "qwen3-tts-1.7b-voice-design": ("tiny-voice-design", "tiny-voice-design"),
}


def tiny_models() -> str:
    """The tiny models as a MODELS value (name=dir,...), each built unless current."""
    from tts_engine.tiny_model import build_tiny_model, is_current

    pairs = []
    for name, (folder, preset) in TINY_MODELS.items():
        model_dir = str(ROOT / "build" / folder)
        if not is_current(model_dir, preset):
            build_tiny_model(model_dir, preset)
        pairs.append(f"{name}={model_dir}")
    return ",".join(pairs)


def _values() -> dict:
    """The rendered parameters; builds the tiny models (and tiny aligner) when no model is configured."""
    model_dir = os.environ.get("QWEN_TTS_MODEL_DIR", "")
    models = os.environ.get("QWEN_TTS_MODELS", "")
    # Real weights: an aligner only when one is named (the GPU profile's default path need not exist here).
    aligner_dir = os.environ.get("QWEN_TTS_ALIGNER_DIR", "")
    overrides = {"MODEL_DIR": model_dir, "ALIGNER_DIR": aligner_dir}
    if not model_dir and not models.strip():
        overrides["MODELS"] = tiny_models()
        if "QWEN_TTS_ALIGNER_DIR" not in os.environ:
            from tts_engine.alignment.tiny_aligner import ensure_tiny_aligner

            overrides["ALIGNER_DIR"] = str(ensure_tiny_aligner(ROOT / "build" / "tiny-aligner"))
        print(TINY_BANNER, file=sys.stderr, flush=True)
    values = resolve(os.environ.get("QWEN_TTS_PROFILE", "cpu"), overrides)
    from tts_engine.alignment.aligner import check_aligner_dir
    from tts_engine.loading import check_model_dir

    for model in served_models(values):
        check_model_dir(model.model_dir)
    if values["ALIGNER_DIR"]:
        check_aligner_dir(values["ALIGNER_DIR"])
    return values


class Restarts:
    """Backoff for a process that keeps dying: at once after its first exit (listeners wait for every second
    of it), then 1, 2, 4 ... 30 s while it keeps dying; reset once it has run for a minute."""

    def __init__(self, name: str):
        self.name, self.exits, self.started = name, 0, time.monotonic()

    def after_exit(self, code, log) -> float:
        if time.monotonic() - self.started > 60:
            self.exits = 0
        delay = 0.0 if self.exits == 0 else min(30.0, 2.0 ** (self.exits - 1))
        self.exits += 1
        print(f"{self.name} exited with code {code}; restarting it " + (f"in {delay:.0f} s" if delay else "now")
              + f" (log: {log})", file=sys.stderr, flush=True)
        return delay

    def started_now(self) -> None:
        self.started = time.monotonic()


def _banner(server: LocalTriton, port: int, values: dict) -> str:
    gateway_log = LOGS / "gateway.log"
    aligner_dir = values["ALIGNER_DIR"]
    aligner = f" Word timestamps from {aligner_dir}." if aligner_dir else " No word timestamps (QWEN_TTS_ALIGNER_DIR)."
    models = "\n".join(summary(values))
    others = served_models(values)[1:]
    other = f"\n  .venv/bin/python -m client.triton_tts \"Hello.\" -o hello.wav --url {server.grpc_url} " \
        f"--model {others[0].tts_model}" if others else ""
    return f"""
Ready.{aligner}
Models (served name, Triton ensemble/talker, kind, directory):
{models}
  gateway  ws://127.0.0.1:{port}/api/v1/speak   http://127.0.0.1:{port}/api/v1/voices
           /healthz /readyz /metrics   (log: {gateway_log})
  Triton   gRPC {server.grpc_url}   HTTP {server.http_url}   metrics {server.metrics_url}
Try it:
  open http://127.0.0.1:{port}/ (the web page)
  .venv/bin/python -m client.speak "Hello there. This is a test." -o hello.wav --url ws://127.0.0.1:{port}/api/v1/speak
  .venv/bin/python -m client.triton_tts "Hello from Triton." -o hello.wav --url {server.grpc_url}{other}
  curl http://127.0.0.1:{port}/api/v1/voices
  curl -N http://127.0.0.1:{port}/v1/audio/speech -H 'Content-Type: application/json' -d '{{"model":"qwen3-tts","input":"Hi.","voice":"default","response_format":"mp3"}}' -o hi.mp3
Stop with Ctrl-C. tritonserver and the gateway are restarted if they die.
"""


def supervise(server: LocalTriton, gateway: GatewayProcess, stop: list) -> None:
    """Keep both processes up until ``stop`` is set."""
    restarts = {"tritonserver": Restarts("tritonserver"), "gateway": Restarts("gateway")}
    due: dict = {}
    while not stop:
        time.sleep(0.1)
        now = time.monotonic()
        for name, process, log in (("tritonserver", server.process, server.log_path),
                                   ("gateway", gateway.process, gateway.log_path)):
            if name not in due and process.poll() is not None:
                due[name] = now + restarts[name].after_exit(process.returncode, log)
                if name == "tritonserver":  # its model processes, then the shared memory a dead server leaves
                    removed = server.reap()
                    if removed:
                        print(f"removed {len(removed)} shared-memory regions it left in /dev/shm "
                              f"({server.shm_prefix}*)", file=sys.stderr, flush=True)
            if due.get(name, float("inf")) <= now:
                del due[name]
                (server.start if name == "tritonserver" else gateway.start)()
                restarts[name].started_now()
                print(f"{name} restarted", file=sys.stderr, flush=True)


def main() -> int:
    try:
        values = _values()
    except Exception as exc:  # RenderError or ModelDirError: one clear line, no traceback
        print(f"make run: {exc}", file=sys.stderr)
        return 2
    server = LocalTriton(render(ROOT / "build" / "model_repository", values),
                         int(os.environ.get("TRITON_HTTP_PORT", 8000)), int(os.environ.get("TRITON_GRPC_PORT", 8001)),
                         int(os.environ.get("TRITON_METRICS_PORT", 8002)), log_path=LOGS / "tritonserver.log")
    port = int(os.environ.get("GATEWAY_PORT", 8080))
    gateway = GatewayProcess(server.grpc_url, values["VOICES_DIR"], LOGS / "gateway.log", port=port,
                             GATEWAY_HOST=os.environ.get("GATEWAY_HOST", "0.0.0.0"),
                             GATEWAY_READY_POLL_S=os.environ.get("GATEWAY_READY_POLL_S", "2"))
    stop: list = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    served = ", ".join(f"{m.name or 'the model'} ({m.tts_model})" for m in served_models(values))
    print(f"starting tritonserver (log: {server.log_path}) serving {served} ...", flush=True)
    try:
        server.start().wait_ready(timeout=float(os.environ.get("TRITON_START_TIMEOUT", 600)))
        gateway.start()
        print(_banner(server, port, values), flush=True)
        supervise(server, gateway, stop)
    except KeyboardInterrupt:
        pass
    except (RuntimeError, TimeoutError) as exc:
        print(f"make run: {exc}", file=sys.stderr)
        return 1
    finally:
        gateway.stop()  # SIGTERM: the gateway drains its sessions first
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
