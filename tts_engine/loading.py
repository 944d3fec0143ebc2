"""Loading a Qwen3-TTS model directory from a local path, with clear errors and device/dtype choice."""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from tts_contract.languages import LANGUAGES
from tts_contract.models import (
    BASE, KINDS, SIZES, ServedModel, Speaker, check_model_name, default_name,
)

from .errors import ModelDirError

log = logging.getLogger(__name__)

# Files the loader opens; a directory lacking any of them is refused before torch is touched.
REQUIRED_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer_config.json",
    "speech_tokenizer/config.json",
    "speech_tokenizer/model.safetensors",
    "speech_tokenizer/preprocessor_config.json",
)
DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
          "fp32": "float32", "float32": "float32"}


def check_model_dir(model_dir: str | os.PathLike) -> Path:
    """Return the directory as a Path, or raise ModelDirError naming what is missing."""
    path = Path(model_dir).expanduser()
    if not path.is_dir():
        raise ModelDirError(
            f"model directory {path} does not exist. Set QWEN_TTS_MODEL_DIR to a local copy of "
            "a Qwen3-TTS-12Hz checkpoint, e.g. Qwen/Qwen3-TTS-12Hz-0.6B-Base (see README: 'Getting the weights').")
    missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
    if not (path / "tokenizer.json").is_file() and not (path / "vocab.json").is_file():
        missing.append("tokenizer.json or vocab.json")
    if missing:
        raise ModelDirError(f"model directory {path} is incomplete; missing: {', '.join(missing)}")
    return path


def resolve_device(device: str) -> str:
    import torch

    device = (device or "auto").lower()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelDirError(f"device '{device}' requested but CUDA is not available in this process")
    if device != "cpu" and not device.startswith("cuda"):
        raise ModelDirError(f"unsupported device '{device}': use auto, cpu, cuda or cuda:N")
    return device


def resolve_dtype(dtype: Optional[str], device: str):
    import torch

    if not dtype or dtype == "auto":
        dtype = "bf16" if device.startswith("cuda") else "fp32"
    name = DTYPES.get(dtype.lower())
    if name is None:
        raise ModelDirError(f"unsupported dtype '{dtype}': use bf16, fp16 or fp32")
    return getattr(torch, name)


def model_fingerprint(model_dir: Path) -> str:
    """A short id of the weights a voice prompt was computed with (configs and weight file sizes)."""
    digest = hashlib.sha256()
    for name in ("config.json", "speech_tokenizer/config.json"):
        digest.update((model_dir / name).read_bytes())
    for name in ("model.safetensors", "speech_tokenizer/model.safetensors"):
        digest.update(str((model_dir / name).stat().st_size).encode())
    return digest.hexdigest()[:16]


@dataclass
class LoadedModel:
    """The qwen-tts wrapper plus what the engine needs to know about it."""

    tts: "object"  # qwen_tts.Qwen3TTSModel
    model_dir: Path
    device: str
    dtype: "object"
    fingerprint: str
    is_tiny: bool

    @property
    def kind(self) -> str:
        """base, custom_voice or voice_design (tts_contract.models)."""
        return self.tts.model.tts_model_type

    @property
    def size(self) -> str:
        return SIZES.get(self.tts.model.tts_model_size, self.tts.model.tts_model_size)

    def speakers(self) -> tuple:
        """A CustomVoice checkpoint's named speakers (others have none), sorted by name."""
        talker = self.tts.model.config.talker_config
        dialects = talker.spk_is_dialect or {}
        return tuple(Speaker(name, dialects.get(name) or None) for name in sorted(talker.spk_id or {}))

    def describe(self, name: str = "", tts_model: str = "tts", talker_model: str = "talker",
                 default_voice: Optional[str] = None) -> ServedModel:
        """What this checkpoint is, served under ``name`` (default: from its kind and size). ``default_voice``: the
        deployment's default voice; a CustomVoice checkpoint takes it when it names one of its speakers, else its
        first speaker (the deployment's default is usually a cloned voice, for its Base models)."""
        if name:
            try:
                check_model_name(name)  # what a gateway reads back: a name it would refuse hides the model
            except ValueError as exc:
                raise ModelDirError(f"served name: {exc}") from None
        model = ServedModel(name=name or default_name(self.kind, self.tts.model.tts_model_size), kind=self.kind,
                            size=self.size, tts_model=tts_model, talker_model=talker_model, speakers=self.speakers(),
                            languages=LANGUAGES, default_voice=default_voice)
        if self.kind != BASE:  # a CustomVoice model reports the speaker it defaults to, a VoiceDesign model none
            model = dataclasses.replace(model, default_voice=model.default_speaker())
        return model


_load_lock = threading.Lock()


def _prepare(model_dir, device: str, dtype: Optional[str]):
    """Offline mode, a checked directory, and the resolved device and dtype."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    path = check_model_dir(model_dir)
    device = resolve_device(device)
    return path, device, resolve_dtype(dtype, device)


def load_model(model_dir: str | os.PathLike, device: str = "auto", dtype: Optional[str] = None,
               attn_implementation: Optional[str] = None) -> LoadedModel:
    """Load the model from a local directory; nothing is fetched from a hub."""
    path, device, torch_dtype = _prepare(model_dir, device, dtype)
    with _load_lock:  # transformers' Auto* registries are process-global
        from qwen_tts import Qwen3TTSModel

        kwargs = {"dtype": torch_dtype, "device_map": device, "local_files_only": True}
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        tts = Qwen3TTSModel.from_pretrained(str(path), **kwargs)
    tts.model.eval()
    if getattr(tts.model, "tts_model_type", None) not in KINDS:
        raise ModelDirError(f"{path} is a '{tts.model.tts_model_type}' model; this server serves the Qwen3-TTS "
                            f"kinds {', '.join(KINDS)}")
    is_tiny = (path / "TINY_MODEL").is_file()
    unsupported = [name for name in LANGUAGES if name.lower() not in tts.model.get_supported_languages()]
    if unsupported:  # the contract promises these to every client
        raise ModelDirError(f"{path} does not speak {', '.join(unsupported)}")
    log.info("loaded %s %s %s model from %s on %s (%s)", "TINY random-weight" if is_tiny else "Qwen3-TTS",
             SIZES.get(tts.model.tts_model_size, "?"), tts.model.tts_model_type, path, device,
             str(torch_dtype).replace("torch.", ""))
    return LoadedModel(tts=tts, model_dir=path, device=device, dtype=torch_dtype,
                       fingerprint=model_fingerprint(path), is_tiny=is_tiny)


def load_speech_tokenizer(model_dir: str | os.PathLike, device: str = "auto", dtype: Optional[str] = None):
    """Only the speech tokenizer (codec) of a model directory: what the decoder process needs."""
    path, device, torch_dtype = _prepare(model_dir, device, dtype)
    with _load_lock:
        from qwen_tts import Qwen3TTSTokenizer

        tokenizer = Qwen3TTSTokenizer.from_pretrained(str(path / "speech_tokenizer"), dtype=torch_dtype,
                                                      device_map=device)
    tokenizer.model.eval()
    log.info("loaded speech tokenizer from %s on %s", path, device)
    return tokenizer
