#!/usr/bin/env bash
# Check the model directories, render the model repository for this container, then exec tritonserver.
set -euo pipefail
cd /opt/qwen-tts
# Prints the render arguments: none, or `--set ALIGNER_DIR=` when no aligner weights are mounted (the
# deployment then serves no word timestamps).
RENDER_ARGS=$(python3 - <<'PY'
import os, sys
from pathlib import Path
from tts_engine.alignment.aligner import check_aligner_dir
from tts_engine.loading import check_model_dir
from tts_engine.errors import ModelDirError
try:
    check_model_dir(os.environ["QWEN_TTS_MODEL_DIR"])
except ModelDirError as exc:
    sys.exit(f"qwen-tts: {exc.message}\nMount the weights read-only at {os.environ['QWEN_TTS_MODEL_DIR']} "
             "(docker-compose: QWEN_TTS_WEIGHTS_DIR; README: Getting the weights).")
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
# shellcheck disable=SC2086  # RENDER_ARGS is empty or one word
python3 -m tools.render_model_repository --profile "${QWEN_TTS_PROFILE:-gpu}" --out /tmp/model_repository $RENDER_ARGS
exec tritonserver --model-repository=/tmp/model_repository \
  --http-port=8000 --grpc-port=8001 --metrics-port=8002 --allow-metrics=true \
  --exit-timeout-secs=30 --disable-auto-complete-config "$@"
