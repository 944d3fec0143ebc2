# Front door. `make run` serves the whole stack; `make test` runs every test (what CI runs).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-stamp
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_VERBOSITY := error

.PHONY: setup tiny-model render triton run gateway test test-engine test-triton test-gateway bench bench-gpu graph-check soak faults perf alerts-check clean help

help:
	@echo "make setup      - virtualenv, pinned packages, tiny models (Base, CustomVoice, VoiceDesign) and tiny aligner (idempotent)"
	@echo "make run        - Triton + gateway on CPU with QWEN_TTS_MODELS or QWEN_TTS_MODEL_DIR, else the tiny models"
	@echo "make triton     - Triton alone on the rendered repository (TRITON_*_PORT)"
	@echo "make gateway    - the gateway alone (TRITON_URL, GATEWAY_PORT, ...)"
	@echo "make render     - render model_repository/ into build/model_repository (QWEN_TTS_PROFILE=cpu|gpu)"
	@echo "make test       - all tests (engine + real tritonserver)"
	@echo "make bench      - benchmarks (batching, host overhead, gateway load, open-loop real time, fidelity); numbers in results/"
	@echo "make graph-check - the talker's decode step and the codec decoder's step trace (CUDA: capture) as one graph per bucket and equal the eager step"
	@echo "make bench-gpu  - the engine on a GPU: full-size random weights, bf16, CUDA graphs; results/gpu_bench.json"
	@echo "make soak       - load with faults (Triton killed and restarted, clients dropping); SOAK_SECONDS"
	@echo "make faults     - faults across real separate hosts (network namespaces; root): results/faults.json"
	@echo "make perf       - perf_analyzer sweep over tts and talker (time to first response)"
	@echo "make alerts-check - promtool: the alert rules, their unit tests, and the compose Prometheus config"

$(STAMP): requirements.txt requirements-model.txt requirements-model-nodeps.txt pyproject.toml scripts/setup.sh \
          tts_engine/tiny_model.py tts_engine/alignment/tiny_aligner.py
	./scripts/setup.sh
	@touch $(STAMP)

setup: $(STAMP)

tiny-model: $(STAMP)
	$(PY) -m tts_engine.tiny_model build/tiny-model
	$(PY) -m tts_engine.tiny_model --preset tiny-custom-voice build/tiny-custom-voice
	$(PY) -m tts_engine.tiny_model --preset tiny-voice-design build/tiny-voice-design

render: $(STAMP)
	$(PY) -m tools.render_model_repository --profile $${QWEN_TTS_PROFILE:-cpu} \
	  --set MODEL_DIR=$${QWEN_TTS_MODEL_DIR:-$(CURDIR)/build/tiny-model}

triton: render
	$(PY) -m tools.triton_local

run: $(STAMP)
	$(PY) -m tools.run_stack

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests

test-engine: $(STAMP)
	$(PY) -m pytest -q tests/test_engine.py

test-triton: $(STAMP)
	$(PY) -m pytest -q tests/test_triton.py

test-gateway: $(STAMP)
	$(PY) -m pytest -q tests/test_gateway.py

gateway: $(STAMP)
	$(PY) -m gateway

perf: $(STAMP)
	$(PY) -m tools.perf --url 127.0.0.1:$${TRITON_GRPC_PORT:-8001}

# promtool comes with Debian's prometheus package (scripts/setup.sh installs it); no virtualenv needed.
alerts-check:
	@command -v promtool >/dev/null || { echo "promtool not found: apt-get install prometheus (or run ./scripts/setup.sh)"; exit 1; }
	promtool check rules deploy/prometheus/alerts.yml
	promtool test rules deploy/prometheus/alerts_test.yml
	promtool check config deploy/prometheus/prometheus.yml

graph-check: $(STAMP)
	$(PY) -m tools.graph_check $(GRAPH_CHECK_ARGS)

bench-gpu: $(STAMP)
	$(PY) -m bench.gpu $(BENCH_GPU_ARGS)

soak: $(STAMP)
	$(PY) -m bench.soak --seconds $${SOAK_SECONDS:-90}

# Partitions, delay, loss, killed hosts and DNS changes on a namespace test bed (needs root, iproute2, dnsmasq).
faults: $(STAMP)
	$(PY) -m bench.faults $(FAULTS_ARGS)

bench: $(STAMP)
	$(PY) -m bench.core
	$(PY) -m bench.host_overhead
	$(PY) -m bench.gateway
	$(PY) -m bench.openloop
	$(PY) -m bench.streaming_text
	$(PY) -m bench.fidelity

clean:
	rm -rf build results/*.tmp
