#!/usr/bin/env bash
# `make bench-gpu` on a bare GPU machine that has torch but not this project's packages: install the carried
# wheels (scripts/gpu_wheels.sh) into a private folder, then run the GPU benchmark. Results in results/ (or $OUT).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error PYTHONUNBUFFERED=1
python3 -m bench.gpu --output "${OUT:-results}/gpu_bench.json" "$@"
