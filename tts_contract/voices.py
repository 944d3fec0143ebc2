"""The voices directory, shared by the gateway (which adds and deletes voices) and the talker (which reads
them): ``voices/<id>/{reference.wav, transcript.txt, metadata.json, prompt-<model fingerprint>.safetensors}``.
A voice's prompt depends on the Base checkpoint that computed it (a 1.7B speaker embedding is twice as wide), so
each checkpoint caches its own."""
from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .limits import MAX_VOICE_DESCRIPTION_CHARS, MAX_VOICE_NAME_CHARS

VOICE_ID = re.compile(r"^[a-z0-9_-]{1,64}$")
REFERENCE_FILE = "reference.wav"
TRANSCRIPT_FILE = "transcript.txt"  # absent: the voice is x-vector only
METADATA_FILE = "metadata.json"  # name, language, description, isDefault
PROMPT_CACHE_PREFIX = "prompt"  # prompt-<fingerprint>.safetensors: a computed prompt, valid while its digest matches
PROMPT_FORMAT = "qwen3-tts-voice-prompt/1"  # the prompt file's "format" metadata


class InvalidVoiceId(ValueError):
    pass


class UndecodableAudio(ValueError):
    pass


def check_voice_id(voice_id) -> str:
    """The id if it matches [a-z0-9_-]{1,64}; anything else could escape the voices directory."""
    if not isinstance(voice_id, str) or not VOICE_ID.fullmatch(voice_id):
        raise InvalidVoiceId(f"invalid voice id {voice_id!r}: use 1-64 characters of a-z, 0-9, '_' and '-'")
    return voice_id


def prompt_cache_file(fingerprint: str) -> str:
    """The file name of the prompt cached for the checkpoint with this fingerprint."""
    if not re.fullmatch(r"[0-9A-Za-z_-]{0,64}", fingerprint or ""):  # it names a file
        raise ValueError(f"invalid model fingerprint {fingerprint!r}")
    return f"{PROMPT_CACHE_PREFIX}-{fingerprint or 'unknown'}.safetensors"


def source_digest(folder: Path, fingerprint: str) -> str:
    """Hash of what a prompt is computed from: reference audio, transcript, and the model fingerprint."""
    digest = hashlib.sha256(fingerprint.encode())
    digest.update((folder / REFERENCE_FILE).read_bytes())
    transcript = folder / TRANSCRIPT_FILE
    digest.update(b"\0" + (transcript.read_bytes().strip() if transcript.is_file() else b"<x-vector-only>"))
    return digest.hexdigest()


def prompt_metadata(data: bytes) -> dict:
    """The metadata of a serialised prompt (a safetensors file), without loading its tensors."""
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + header_len])
    return header.get("__metadata__", {}) or {}


def stamped_prompt(data: bytes, folder: Path, voice_id: str) -> tuple[str, bytes]:
    """The prompt re-stamped with the cache key of ``folder``'s source files, ready to save as its cache: (the
    cache file's name, its bytes)."""
    from safetensors.numpy import load, save

    meta = prompt_metadata(data)
    if meta.get("format") != PROMPT_FORMAT:
        raise ValueError(f"not a voice prompt (format {meta.get('format')!r})")
    fingerprint = meta.get("model_fingerprint", "")
    meta.update({"source_sha256": source_digest(folder, fingerprint), "voice": voice_id})
    return prompt_cache_file(fingerprint), save(load(data), metadata=meta)


def read_audio(data: bytes):
    """Decode an audio file (WAV, FLAC, OGG...) to (mono float32 samples, sample rate)."""
    import soundfile as sf

    try:
        audio, sample_rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile raises several types for undecodable input
        raise UndecodableAudio(f"audio is not decodable: {exc}") from None
    return audio.mean(axis=1).astype("float32"), int(sample_rate)


class VoiceMissing(LookupError):
    pass


@dataclass(frozen=True)
class VoiceInfo:
    id: str
    name: str
    language: str
    description: str
    is_default: bool
    x_vector_only: bool
    designed: Optional[dict] = None  # how a VoiceDesign model made its clip: model, description, text, seed

    def to_json(self) -> dict:
        body = {"id": self.id, "name": self.name, "kind": "cloned", "language": self.language,
                "description": self.description, "isDefault": self.is_default}
        if self.designed:
            body["designed"] = self.designed
        return body


class VoiceDirectory:
    """Reads ``voices/<id>/``: which voices exist, their metadata, and which one is the default."""

    def __init__(self, root, default_voice: Optional[str] = None):
        self.root = Path(root)
        self._default_override = default_voice or None

    def folder(self, voice_id: str) -> Path:
        """The folder of an existing voice (one with a reference clip)."""
        folder = self.root / check_voice_id(voice_id)
        if not (folder / REFERENCE_FILE).is_file():
            raise VoiceMissing(f"voice '{voice_id}' not found")
        return folder

    def exists(self, voice_id: str) -> bool:
        """True for a well-formed id whose folder holds a reference clip."""
        return bool(VOICE_ID.fullmatch(voice_id or "")) and (self.root / voice_id / REFERENCE_FILE).is_file()

    def info(self, voice_id: str, default_id: Optional[str] = None) -> VoiceInfo:
        folder = self.folder(voice_id)
        meta = _metadata(folder)
        # metadata.json may be edited by hand: what the API shows stays within the upload limits
        return VoiceInfo(id=voice_id, name=str(meta.get("name", voice_id))[:MAX_VOICE_NAME_CHARS],
                         language=str(meta.get("language", "Auto"))[:32],
                         description=str(meta.get("description", ""))[:MAX_VOICE_DESCRIPTION_CHARS],
                         is_default=voice_id == (default_id or self.default_id()),
                         x_vector_only=not (folder / TRANSCRIPT_FILE).is_file(),
                         designed=_designed(meta.get("designed")))

    def list(self) -> list:
        """Voices that have a reference clip; folders without one (e.g. an empty slot) are skipped."""
        voices = self._scan()
        default_id = self.default_id(voices)
        return [self.info(voice_id, default_id) for voice_id, _ in voices]

    def default_id(self, voices: Optional[list] = None) -> Optional[str]:
        """The configured default, else the voice whose metadata says isDefault, else the first one."""
        if self._default_override:
            return self._default_override
        voices = self._scan() if voices is None else voices
        for voice_id, meta in voices:
            if meta.get("isDefault"):
                return voice_id
        return voices[0][0] if voices else None

    def _scan(self) -> list:
        if not self.root.is_dir():
            return []
        return [(folder.name, _metadata(folder)) for folder in sorted(self.root.iterdir())
                if folder.is_dir() and VOICE_ID.fullmatch(folder.name) and (folder / REFERENCE_FILE).is_file()]


def _designed(value) -> Optional[dict]:
    """The ``designed`` metadata as the API shows it (hand-edited files stay within the upload limits)."""
    if not isinstance(value, dict):
        return None
    return {"model": str(value.get("model", ""))[:64],
            "description": str(value.get("description", ""))[:MAX_VOICE_DESCRIPTION_CHARS],
            "text": str(value.get("text", ""))[:1000], "seed": value.get("seed") if isinstance(value.get("seed"), int)
            else None}


def _metadata(folder: Path) -> dict:
    try:
        meta = json.loads((folder / METADATA_FILE).read_text())
    except (OSError, json.JSONDecodeError):  # absent or unreadable: defaults
        return {}
    return meta if isinstance(meta, dict) else {}
