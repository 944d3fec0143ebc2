"""The served models: what each checkpoint of the Qwen3-TTS family is, what a request to it may name, and the
Triton models that serve it. One talker (and one `tts` ensemble) is rendered per configured checkpoint; all share
the codec decoder and the voice encoder.

A talker describes itself in its `status` answer (``"model"``: ``ServedModel.to_json()``), so a gateway learns
which pod serves which model from the pods themselves. The rules a request must follow (``conditioning_error``)
are written once, here: the gateway refuses early with them, the talker refuses with them for certain.

| kind           | a request's `voice`                         | `instruct`                                        |
|----------------|---------------------------------------------|---------------------------------------------------|
| `base`         | a cloned voice's id (none: the default)     | refused: a Base model follows its reference clip  |
| `custom_voice` | one of its named speakers (none: default)   | style ("very happy"); refused at 0.6B (qwen-tts    |
|                | (case-insensitive)                          | drops it at that size)                            |
| `voice_design` | refused: the voice is described by instruct | the voice's description (may be empty)            |
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

from .errors import EngineCode

BASE, CUSTOM_VOICE, VOICE_DESIGN = "base", "custom_voice", "voice_design"
KINDS = (BASE, CUSTOM_VOICE, VOICE_DESIGN)
SIZES = {"0b6": "0.6B", "1b7": "1.7B"}  # qwen-tts's tts_model_size -> how people write it
MODEL_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
MAX_INSTRUCT_CHARS = 1000
DEFAULT_TTS, DEFAULT_TALKER = "tts", "talker"  # the Triton names of a deployment's first (default) model


class ModelNameError(ValueError):
    pass


def check_model_name(name: str) -> str:
    if not isinstance(name, str) or not MODEL_NAME.fullmatch(name):
        raise ModelNameError(f"invalid model name {name!r}: use 1-64 characters of a-z, 0-9, '.', '_' and '-', "
                             "starting with a letter or digit")
    return name


def triton_names(name: str, default: bool) -> tuple[str, str]:
    """The Triton models (ensemble, talker) that serve the model ``name``: the default model keeps the plain
    names `tts` and `talker` (one-model deployments, perf_analyzer runs and dashboards stay as they were), every
    other one is `tts_<name>` and `talker_<name>`."""
    if default:
        return DEFAULT_TTS, DEFAULT_TALKER
    check_model_name(name)
    return f"{DEFAULT_TTS}_{name}", f"{DEFAULT_TALKER}_{name}"


def is_talker(triton_model: str) -> bool:
    """Whether a Triton model name is one of the rendered talkers."""
    return triton_model == DEFAULT_TALKER or triton_model.startswith(DEFAULT_TALKER + "_")


def default_name(kind: str, size: str) -> str:
    """The name a checkpoint is served under when the operator gives none, e.g. ``qwen3-tts-0.6b-base``."""
    return f"qwen3-tts-{SIZES.get(size, size).lower()}-{kind.replace('_', '-')}"


@dataclass(frozen=True)
class Speaker:
    """A CustomVoice checkpoint's named speaker; ``dialect``: the Chinese dialect it speaks for Chinese and Auto."""

    name: str
    dialect: Optional[str] = None

    def to_json(self) -> dict:
        return {"name": self.name, "dialect": self.dialect}


@dataclass(frozen=True)
class ServedModel:
    """One served checkpoint: its name, kind and size, its named speakers, the languages it speaks and the Triton
    models that serve it."""

    name: str
    kind: str
    size: str  # "0.6B" or "1.7B"
    tts_model: str = DEFAULT_TTS
    talker_model: str = DEFAULT_TALKER
    speakers: tuple = field(default_factory=tuple)  # Speaker, sorted by name
    languages: tuple = field(default_factory=tuple)
    default_voice: Optional[str] = None  # base: the default voice id; custom_voice: the default speaker

    @property
    def clones(self) -> bool:
        """Whether it speaks in cloned voices (a reference clip)."""
        return self.kind == BASE

    @property
    def takes_instruct(self) -> bool:
        return self.kind == VOICE_DESIGN or (self.kind == CUSTOM_VOICE and self.size != SIZES["0b6"])

    def speaker(self, name: str) -> Optional[Speaker]:
        """The named speaker, case-insensitively; None when it has no such speaker."""
        wanted = name.strip().lower()
        return next((s for s in self.speakers if s.name.lower() == wanted), None)

    def default_speaker(self) -> Optional[str]:
        """The speaker a request to a CustomVoice model naming none gets: ``default_voice`` when it names one of its
        speakers (a deployment's default is usually a cloned voice, for its Base models), else its first speaker."""
        if self.kind != CUSTOM_VOICE or not self.speakers:
            return None
        return (self.speaker(self.default_voice or "") or self.speakers[0]).name

    def features(self) -> list[str]:
        """What requests to it may use, for listings."""
        return {BASE: ["voice_clone"], CUSTOM_VOICE: ["named_speakers"], VOICE_DESIGN: ["voice_design"]}[self.kind] \
            + (["instruct"] if self.takes_instruct else [])

    def to_json(self) -> dict:
        return {"name": self.name, "kind": self.kind, "size": self.size, "ttsModel": self.tts_model,
                "talkerModel": self.talker_model, "speakers": [s.to_json() for s in self.speakers],
                "languages": list(self.languages), "defaultVoice": self.default_voice,
                "takesInstruct": self.takes_instruct, "features": self.features()}

    @classmethod
    def from_json(cls, body: dict) -> "ServedModel":
        kind = body.get("kind")
        if kind not in KINDS:
            raise ValueError(f"unknown model kind {kind!r}")
        return cls(name=check_model_name(body["name"]), kind=kind, size=str(body.get("size", "")),
                   tts_model=str(body.get("ttsModel", DEFAULT_TTS)),
                   talker_model=str(body.get("talkerModel", DEFAULT_TALKER)),
                   speakers=tuple(Speaker(str(s["name"]), s.get("dialect") or None) for s in body.get("speakers", ())),
                   languages=tuple(str(x) for x in body.get("languages", ())),
                   default_voice=body.get("defaultVoice") or None)


@dataclass(frozen=True)
class ConditioningError:
    """Why a request cannot go to a model: the engine code it is refused with, and what to do instead."""

    code: EngineCode
    message: str


def conditioning_error(model: ServedModel, voice: Optional[str], instruct: Optional[str]) \
        -> Optional[ConditioningError]:
    """Why a request naming ``voice`` and ``instruct`` cannot go to ``model`` (None: it can). Never silently
    drops either: what a model cannot follow is refused."""
    voice = (voice or "").strip() or None
    if instruct is not None and len(instruct) > MAX_INSTRUCT_CHARS:
        return ConditioningError(EngineCode.INVALID_CONFIG,
                                 f"instruct has {len(instruct)} characters; the limit is {MAX_INSTRUCT_CHARS}")
    instruct = (instruct or "").strip() or None
    if instruct is not None and not model.takes_instruct:
        if model.kind == BASE:
            return ConditioningError(EngineCode.INVALID_CONFIG, (
                f"model '{model.name}' is a Base model: it speaks in the voice of its reference clip and takes no "
                "instruct; use a CustomVoice (1.7B) or VoiceDesign model for instructions"))
        return ConditioningError(EngineCode.INVALID_CONFIG, (
            f"model '{model.name}' is a {model.size} CustomVoice model, which does not follow instructions (only "
            "the 1.7B CustomVoice does)"))
    if model.kind == CUSTOM_VOICE and voice is not None and model.speaker(voice) is None:
        return ConditioningError(EngineCode.VOICE_NOT_FOUND, (
            f"model '{model.name}' has no speaker '{voice}'; its speakers: "
            f"{', '.join(s.name for s in model.speakers)}"))
    if model.kind == VOICE_DESIGN and voice is not None:
        return ConditioningError(EngineCode.INVALID_CONFIG, (
            f"model '{model.name}' is a VoiceDesign model: it designs its voice from instruct and takes no voice "
            f"(got '{voice}'); to speak in a designed voice again, design it once (POST /api/v1/voices/design) and "
            "use it on a Base model"))
    return None
