#!/usr/bin/env bash
# Set up the project on a fresh machine: virtualenv, pinned packages, the tiny models and aligner. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}   # the CPU build here; on a GPU host pass a CUDA build

if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
# pip on these machines warns about a missing extra index for every package; keep real errors only.
quiet() {
  local log rc=0
  log=$(mktemp)
  "$@" >"$log" 2>&1 || rc=$?
  grep -v -E "is ignored: it is neither a file nor a directory|editable_wheel.py|Editable installation|^ *!!|^ *\*{8,}|Please be careful with folders|name as your package as they|with strategy, WheelFile|^ *$" "$log" || true
  rm -f "$log"
  return "$rc"
}
quiet $PIP install -q --disable-pip-version-check --upgrade pip
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "== installing $TORCH_SPEC"
  quiet $PIP install -q --disable-pip-version-check "$TORCH_SPEC"
fi
echo "== installing requirements"
quiet $PIP install -q --disable-pip-version-check -r requirements.txt
# qwen-asr without its own pins and demo extras (requirements-model-nodeps.txt says why)
quiet $PIP install -q --disable-pip-version-check --no-deps -r requirements-model-nodeps.txt
quiet $PIP install -q --disable-pip-version-check --no-deps -e .
"$VENV/bin/python" -m tools.fix_torchaudio
"$VENV/bin/python" -c "import numpy; assert numpy.__version__ < '2', 'numpy must be < 2 for the Triton stub'"
if ! command -v chromium >/dev/null 2>&1; then
  # The web page's test drives Debian's chromium (Playwright's own browser download is not reachable).
  echo "== installing chromium"
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo -n"
  export DEBIAN_FRONTEND=noninteractive
  { $SUDO apt-get install -y -q chromium || { $SUDO apt-get update -q && $SUDO apt-get install -y -q chromium; }; } \
    >/dev/null 2>&1 || echo "warning: could not install chromium (apt-get install chromium); the web page test will fail"
fi
if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
  # tests/test_monitoring.py checks the alert rules with promtool and evaluates them in a real Prometheus.
  echo "== installing prometheus (for promtool)"
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo -n"
  export DEBIAN_FRONTEND=noninteractive
  { $SUDO apt-get install -y -q --no-install-recommends prometheus \
      || { $SUDO apt-get update -q && $SUDO apt-get install -y -q --no-install-recommends prometheus; }; } \
    >/dev/null 2>&1 || echo "warning: could not install prometheus (apt-get install prometheus); the monitoring tests will skip"
fi
if ! command -v redis-server >/dev/null 2>&1; then
  # The interrupt bus between gateway replicas; the turn-taking tests start a real one (tools/redis_local.py).
  echo "== installing redis-server"
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo -n"
  export DEBIAN_FRONTEND=noninteractive
  { $SUDO apt-get install -y -q --no-install-recommends redis-server \
      || { $SUDO apt-get update -q && $SUDO apt-get install -y -q --no-install-recommends redis-server; }; } \
    >/dev/null 2>&1 || echo "warning: could not install redis-server (apt-get install redis-server); the cross-replica interrupt tests will fail"
fi
if ! command -v dnsmasq >/dev/null 2>&1; then
  # The multi-host test bed (tests/test_hosts.py, bench/faults.py) answers its dns:// discovery name with dnsmasq.
  echo "== installing dnsmasq-base"
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo -n"
  export DEBIAN_FRONTEND=noninteractive
  { $SUDO apt-get install -y -q --no-install-recommends dnsmasq-base \
      || { $SUDO apt-get update -q && $SUDO apt-get install -y -q --no-install-recommends dnsmasq-base; }; } \
    >/dev/null 2>&1 || echo "warning: could not install dnsmasq-base (apt-get install dnsmasq-base); the multi-host tests will skip"
fi
echo "== building the tiny model"
HF_HUB_OFFLINE=1 "$VENV/bin/python" -m tts_engine.tiny_model build/tiny-model 2>&1 | grep -v -i -E "sox|path variables|^\s*$|flash-attn|\*\*\*\*"
echo "== building the tiny CustomVoice and VoiceDesign models (make run serves them beside the tiny Base model)"
for preset in tiny-custom-voice tiny-voice-design; do
  HF_HUB_OFFLINE=1 "$VENV/bin/python" -m tts_engine.tiny_model --preset "$preset" "build/$preset" 2>&1 | grep -v -i -E "sox|path variables|^\s*$|flash-attn|\*\*\*\*"
done
echo "== building the tiny aligner"
HF_HUB_OFFLINE=1 "$VENV/bin/python" -m tts_engine.alignment.tiny_aligner build/tiny-aligner 2>&1 | grep -v -i -E "sox|path variables|^\s*$|flash-attn|\*\*\*\*"
echo "== setup done"
