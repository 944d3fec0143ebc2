#!/usr/bin/env bash
# Check the model directory, render the model repository for this container, then exec tritonserver.
set -euo pipefail
cd /opt/qwen-tts
python3 - <<'PY'
import os, sys
from tts_engine.loading import check_model_dir
from tts_engine.errors import ModelDirError
try:
    check_model_dir(os.environ["QWEN_TTS_MODEL_DIR"])
except ModelDirError as exc:
    sys.exit(f"qwen-tts: {exc.message}\nMount the weights read-only at {os.environ['QWEN_TTS_MODEL_DIR']} "
             "(docker-compose: QWEN_TTS_WEIGHTS_DIR; README: Getting the weights).")
PY
python3 -m tools.render_model_repository --profile "${QWEN_TTS_PROFILE:-gpu}" --out /tmp/model_repository
exec tritonserver --model-repository=/tmp/model_repository \
  --http-port=8000 --grpc-port=8001 --metrics-port=8002 --allow-metrics=true \
  --exit-timeout-secs=30 --disable-auto-complete-config "$@"
