#!/usr/bin/env bash
# Check the model directories, render the model repository for this container, then exec tritonserver.
set -euo pipefail
cd /opt/qwen-tts
# Prints the render arguments: `--set MODELS=...` when QWEN_TTS_MODELS names several models (those after the
# first whose weights are not mounted are left out, with a note), `--set ALIGNER_DIR=` when no aligner weights are
# mounted (the deployment then serves no word timestamps). Container paths: no spaces.
RENDER_ARGS=$(python3 - <<'PY'
import os, sys
from pathlib import Path
from tools.render_model_repository import RenderError, mounted_models, parse_models
from tts_engine.alignment.aligner import check_aligner_dir
from tts_engine.loading import check_model_dir
from tts_engine.errors import ModelDirError
models = os.environ.get("QWEN_TTS_MODELS", "").strip()
try:
    if models:
        models, notes = mounted_models(models)
        for note in notes:
            print(f"qwen-tts: {note}", file=sys.stderr)
        print(f"--set MODELS={models}")
    dirs = [model_dir for _, model_dir in parse_models(models)] if models else [os.environ["QWEN_TTS_MODEL_DIR"]]
except RenderError as exc:
    sys.exit(f"qwen-tts: QWEN_TTS_MODELS: {exc}")
for model_dir in dirs:
    try:
        check_model_dir(model_dir)
    except ModelDirError as exc:
        sys.exit(f"qwen-tts: {exc.message}\nMount the weights read-only at {model_dir} "
                 "(docker-compose: QWEN_TTS_WEIGHTS_DIR, QWEN_TTS_CUSTOM_VOICE_WEIGHTS_DIR; README: Getting the "
                 "weights).")
aligner = os.environ.get("QWEN_TTS_ALIGNER_DIR", "")
if aligner and not (Path(aligner) / "config.json").is_file():
    print(f"qwen-tts: no aligner weights at {aligner}: serving no word timestamps (mount "
          "Qwen3-ForcedAligner-0.6B there: docker-compose QWEN_TTS_ALIGNER_WEIGHTS_DIR)", file=sys.stderr)
    print("--set ALIGNER_DIR=")
elif aligner:
    try:
        check_aligner_dir(aligner)
    except ModelDirError as exc:
        sys.exit(f"qwen-tts: {exc.message}")
PY
)
# shellcheck disable=SC2086  # RENDER_ARGS: words without spaces
python3 -m tools.render_model_repository --profile "${QWEN_TTS_PROFILE:-gpu}" --out /tmp/model_repository $RENDER_ARGS
# gRPC keepalive as the gateway pings (tts_contract/keepalive.py: accept its pings, ping it back)
KEEPALIVE_ARGS=$(python3 -c 'from tts_contract.keepalive import triton_flags; print(" ".join(triton_flags()))')
# shellcheck disable=SC2086  # KEEPALIVE_ARGS: words without spaces
exec tritonserver --model-repository=/tmp/model_repository \
  --http-port=8000 --grpc-port=8001 --metrics-port=8002 --allow-metrics=true \
  --exit-timeout-secs=30 --disable-auto-complete-config $KEEPALIVE_ARGS "$@"
