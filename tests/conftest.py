"""Shared fixtures: the tiny model and tiny aligner (built once per checkout), a loaded copy, and reference voices."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

TINY_MODEL_DIR = Path(os.environ.get("QWEN_TTS_TINY_MODEL_DIR", ROOT / "build" / "tiny-model"))
TINY_ALIGNER_DIR = Path(os.environ.get("QWEN_TTS_TINY_ALIGNER_DIR", ROOT / "build" / "tiny-aligner"))
TINY_CUSTOM_VOICE_DIR = ROOT / "build" / "tiny-custom-voice"
TINY_VOICE_DESIGN_DIR = ROOT / "build" / "tiny-voice-design"
SAMPLE_RATE = 24000


def synthetic_reference(seconds: float = 4.0, sample_rate: int = SAMPLE_RATE, seed: int = 0) -> np.ndarray:
    """A deterministic voiced-sounding test signal (harmonics with vibrato and a little noise)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    f0 = 140 + 15 * np.sin(2 * np.pi * 3 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate
    wave = sum(np.sin(k * phase) / k for k in range(1, 6))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 1.5 * t) ** 2
    return (0.2 * wave * envelope + 0.005 * rng.standard_normal(t.shape)).astype(np.float32)


def _tiny_build(out_dir: Path, preset: str) -> Path:
    """A tiny model of ``preset``, built once per checkout (and again when its recipe changes)."""
    from tts_engine.tiny_model import build_tiny_model, is_current

    if not is_current(out_dir, preset):
        build_tiny_model(out_dir, preset)
    return out_dir


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    return _tiny_build(TINY_MODEL_DIR, "tiny")


@pytest.fixture(scope="session")
def tiny_custom_voice_dir() -> Path:
    """A tiny CustomVoice checkpoint: speakers aria, kai and mei (a Sichuan dialect speaker); takes instruct."""
    return _tiny_build(TINY_CUSTOM_VOICE_DIR, "tiny-custom-voice")


@pytest.fixture(scope="session")
def tiny_voice_design_dir() -> Path:
    """A tiny VoiceDesign checkpoint: the voice is described by instruct."""
    return _tiny_build(TINY_VOICE_DESIGN_DIR, "tiny-voice-design")


@pytest.fixture(scope="session")
def tiny_aligner_dir() -> Path:
    from tts_engine.alignment.tiny_aligner import ensure_tiny_aligner

    return ensure_tiny_aligner(TINY_ALIGNER_DIR)


@pytest.fixture(scope="session")
def loaded(tiny_model_dir):
    from tts_engine.loading import load_model

    return load_model(tiny_model_dir, device="cpu", dtype="fp32")


@pytest.fixture(scope="session")
def custom_voice(tiny_custom_voice_dir):
    """The tiny CustomVoice checkpoint, loaded."""
    from tts_engine.loading import load_model

    return load_model(tiny_custom_voice_dir, device="cpu", dtype="fp32")


@pytest.fixture(scope="session")
def voice_design(tiny_voice_design_dir):
    """The tiny VoiceDesign checkpoint, loaded."""
    from tts_engine.loading import load_model

    return load_model(tiny_voice_design_dir, device="cpu", dtype="fp32")


@pytest.fixture(scope="session")
def engine(loaded):
    """The serving loop (the engine over the batched talker), as the Triton model runs it."""
    from tts_engine.generation.talker import BatchedTalker
    from tts_engine.serving.engine import Engine

    engine = Engine(BatchedTalker(loaded.tts, rows=16, max_tokens=2048), name="test-talker")
    yield engine
    engine.stop()


def generate(loaded, engine, prompt, text: str, language: str = "English", policy=None, **params):
    """One utterance through the serving loop: the chunks and finish reason the talker would stream."""
    from tts_engine.generation.sampling import SamplingParams
    from tts_engine.generation.prompt import SynthesisRequest

    return engine.generate(SynthesisRequest(text, prompt, language, SamplingParams(**params)), policy)


@pytest.fixture(scope="session")
def icl_prompt(loaded):
    from tts_engine.voices.prompts import build_prompt

    return build_prompt(loaded.tts, synthetic_reference(), SAMPLE_RATE, "Hello there, this is my voice.")


@pytest.fixture(scope="session")
def xvector_prompt(loaded):
    from tts_engine.voices.prompts import build_prompt

    return build_prompt(loaded.tts, synthetic_reference(seed=1), SAMPLE_RATE, None)


def render_cpu_repository(model_dir: Path, voices_dir: Path, out: Path, **overrides) -> Path:
    from tools.render_model_repository import render, resolve

    values = resolve("cpu", {"MODEL_DIR": str(model_dir), "VOICES_DIR": str(voices_dir), "MAX_ACTIVE_STREAMS": "16",
                             **overrides}, environ={})
    return render(out, values)


@pytest.fixture(scope="session")
def voices_dir(tmp_path_factory):
    """The shipped default voice plus an x-vector-only voice, in a scratch copy."""
    import soundfile as sf

    root = tmp_path_factory.mktemp("voices")
    shutil.copytree(ROOT / "voices" / "default", root / "default",
                    ignore=shutil.ignore_patterns("prompt*.safetensors*"))
    plain = root / "plain"
    plain.mkdir()
    sf.write(plain / "reference.wav", synthetic_reference(seconds=3.5, seed=2), SAMPLE_RATE)
    (plain / "metadata.json").write_text('{"name": "Plain", "language": "English"}')
    return root


def serve_triton(model_dir: Path, voices_dir: Path, work: Path, **overrides):
    """A real tritonserver serving the rendered CPU repository (``overrides``: template parameters) on free
    ports, for a fixture to yield; stopped after."""
    from tools.triton_local import LocalTriton

    repository = render_cpu_repository(model_dir, voices_dir, work / "model_repository", **overrides)
    server = LocalTriton(repository, log_path=work / "tritonserver.log")
    server.start()
    try:
        server.wait_ready(timeout=180)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def triton(tiny_model_dir, tiny_aligner_dir, voices_dir, tmp_path_factory):
    """A real tritonserver serving the rendered CPU repository, with the tiny aligner, on free ports."""
    yield from serve_triton(tiny_model_dir, voices_dir, tmp_path_factory.mktemp("triton"),
                            ALIGNER_DIR=str(tiny_aligner_dir))


FAMILY = ("base", "custom", "design")  # family_triton's served names; Triton: tts/talker, tts_<name>/talker_<name>


@pytest.fixture(scope="session")
def family_triton(tiny_model_dir, tiny_custom_voice_dir, tiny_voice_design_dir, voices_dir, tmp_path_factory):
    """A real tritonserver serving three models (no aligner): `base` (the tiny Base, the default: Triton
    tts/talker), `custom` (tiny CustomVoice: tts_custom/talker_custom) and `design` (tiny VoiceDesign:
    tts_design/talker_design), sharing codec_decoder and voice_encoder."""
    models = ",".join(f"{name}={path}" for name, path in
                      zip(FAMILY, (tiny_model_dir, tiny_custom_voice_dir, tiny_voice_design_dir)))
    yield from serve_triton(tiny_model_dir, voices_dir, tmp_path_factory.mktemp("family-triton"), MODELS=models)


@pytest.fixture(scope="session")
def one_row_triton(tiny_model_dir, voices_dir, tmp_path_factory):
    """A second real tritonserver whose talker holds one stream: full as soon as one utterance runs (capacity
    tests: the engines decide; the gateway keeps no count of its own)."""
    yield from serve_triton(tiny_model_dir, voices_dir, tmp_path_factory.mktemp("one-row-triton"),
                            MAX_ACTIVE_STREAMS="1")


@pytest.fixture
async def client(triton):
    """A gRPC client of the session's tritonserver."""
    import tritonclient.grpc.aio as grpcclient

    client = grpcclient.InferenceServerClient(triton.grpc_url)
    yield client
    await client.close()


@pytest.fixture
def make_gateway(triton, voices_dir, tmp_path):
    """Start gateways with their own settings (FAST unless overridden); all are stopped after the test."""
    from gateway_helpers import FAST, GatewayProcess

    started = []

    def make(triton_url=None, voices=None, **env):
        process = GatewayProcess(triton_url or triton.grpc_url, voices or voices_dir,
                                 tmp_path / f"gateway-{len(started)}.log", **{**FAST, **env}).start()
        started.append(process)
        return process

    yield make
    for process in started:
        process.stop()


@pytest.fixture
def two_tritons(tiny_model_dir, voices_dir, tmp_path):
    """Two real tritonservers serving the same repository (a test's own: it may kill them)."""
    from tools.triton_local import LocalTriton

    repository = render_cpu_repository(tiny_model_dir, voices_dir, tmp_path / "repo")
    servers = [LocalTriton(repository, log_path=tmp_path / f"triton-{i}.log").start() for i in range(2)]
    try:
        for server in servers:
            server.wait_ready(240)
        yield servers
    finally:
        for server in servers:
            server.stop()
