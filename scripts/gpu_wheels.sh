#!/usr/bin/env bash
# Wheels a bare GPU machine needs for `python -m bench.gpu` beside its own torch (2.11, transformers 5.x):
# qwen-tts 0.1.1 pins transformers 4.57.3. Run where pip can reach PyPI; the wheels land in .whl/ (ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
PY_VERSION=${PY_VERSION:-3.12}
mkdir -p .whl
download() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl "$@"
}
download transformers==4.57.3 "tokenizers>=0.22,<0.23" "huggingface_hub>=0.34,<1.0" accelerate==1.12.0
download qwen-tts==0.1.1 librosa==0.11.0 audioread soxr pooch decorator soundfile sox
ls -1 .whl
