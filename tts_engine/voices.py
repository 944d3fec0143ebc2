"""The voices directory: ids, metadata, and prompts computed once and cached on disk and in memory."""
from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .errors import InvalidRequest, VoiceNotFound
from .prompts import VoicePrompt, read_wav

log = logging.getLogger(__name__)

VOICE_ID = re.compile(r"^[a-z0-9_-]{1,64}$")
REFERENCE_FILE = "reference.wav"
TRANSCRIPT_FILE = "transcript.txt"
METADATA_FILE = "metadata.json"
PROMPT_CACHE_FILE = "prompt.safetensors"

PromptBuilder = Callable[[np.ndarray, int, Optional[str]], VoicePrompt]


def check_voice_id(voice_id: str) -> str:
    """Return the id if it matches [a-z0-9_-]{1,64}; anything else could escape the voices directory."""
    if not isinstance(voice_id, str) or not VOICE_ID.fullmatch(voice_id):
        raise InvalidRequest(f"invalid voice id {voice_id!r}: use 1-64 characters of a-z, 0-9, '_' and '-'")
    return voice_id


def source_digest(folder: Path, fingerprint: str) -> str:
    """Hash of what a prompt is computed from: reference audio, transcript, and the model fingerprint."""
    digest = hashlib.sha256(fingerprint.encode())
    digest.update((folder / REFERENCE_FILE).read_bytes())
    transcript = folder / TRANSCRIPT_FILE
    digest.update(b"\0" + (transcript.read_bytes().strip() if transcript.is_file() else b"<x-vector-only>"))
    return digest.hexdigest()


@dataclass(frozen=True)
class VoiceInfo:
    id: str
    name: str
    language: str
    description: str
    is_default: bool
    x_vector_only: bool

    def to_json(self) -> dict:
        return {"id": self.id, "name": self.name, "language": self.language, "description": self.description,
                "isDefault": self.is_default}


class VoiceStore:
    """Reads ``voices/<id>/``; prompts are recomputed when the reference, transcript or model changes."""

    def __init__(self, root: str | Path, builder: Optional[PromptBuilder] = None, fingerprint: str = "",
                 default_voice: Optional[str] = None, cache_size: int = 64):
        self.root = Path(root)
        self.builder = builder
        self.fingerprint = fingerprint
        self._default_override = default_voice
        self._cache: "OrderedDict[str, tuple[str, VoicePrompt]]" = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def voice_dir(self, voice_id: str) -> Path:
        return self.root / check_voice_id(voice_id)

    def info(self, voice_id: str, default_id: Optional[str] = None) -> VoiceInfo:
        folder = self.voice_dir(voice_id)
        if not (folder / REFERENCE_FILE).is_file():
            raise VoiceNotFound(f"voice '{voice_id}' not found")
        meta = {}
        if (folder / METADATA_FILE).is_file():
            try:
                meta = json.loads((folder / METADATA_FILE).read_text())
            except (OSError, json.JSONDecodeError) as exc:
                log.warning("voice %s: unreadable %s (%s); using defaults", voice_id, METADATA_FILE, exc)
        return VoiceInfo(id=voice_id, name=str(meta.get("name", voice_id)),
                         language=str(meta.get("language", "Auto")),
                         description=str(meta.get("description", "")),
                         is_default=voice_id == (default_id or self.default_id()),
                         x_vector_only=not (folder / TRANSCRIPT_FILE).is_file())

    def list(self) -> list[VoiceInfo]:
        """Voices that have a reference clip; folders without one (e.g. an empty slot) are skipped."""
        voices = self._list_raw()
        default_id = self.default_id(voices)
        return [self.info(voice_id, default_id) for voice_id, _ in voices]

    def default_id(self, voices: Optional[list[tuple[str, dict]]] = None) -> Optional[str]:
        if self._default_override:
            return self._default_override
        voices = self._list_raw() if voices is None else voices
        for voice_id, meta in voices:
            if meta.get("isDefault"):
                return voice_id
        return voices[0][0] if voices else None

    def _list_raw(self) -> list[tuple[str, dict]]:
        out = []
        if not self.root.is_dir():
            return out
        for folder in sorted(self.root.iterdir()):
            if folder.is_dir() and VOICE_ID.fullmatch(folder.name) and (folder / REFERENCE_FILE).is_file():
                try:
                    meta = json.loads((folder / METADATA_FILE).read_text())
                except (OSError, json.JSONDecodeError):
                    meta = {}
                out.append((folder.name, meta))
        return out

    def source_digest(self, voice_id: str) -> str:
        return source_digest(self.voice_dir(voice_id), self.fingerprint)

    def exists(self, voice_id: str) -> bool:
        """True for a well-formed id whose folder holds a reference clip."""
        return bool(VOICE_ID.fullmatch(voice_id or "")) and (self.root / voice_id / REFERENCE_FILE).is_file()

    def get_prompt(self, voice_id: Optional[str]) -> tuple[str, VoicePrompt]:
        """Resolve a voice id (None → default) to its prompt: memory, then disk cache, then compute."""
        voice_id = voice_id or self.default_id()
        if voice_id is None:
            raise VoiceNotFound(f"no voice given and no default voice in {self.root}")
        folder = self.voice_dir(voice_id)
        if not (folder / REFERENCE_FILE).is_file():
            raise VoiceNotFound(f"voice '{voice_id}' not found")
        digest = self.source_digest(voice_id)
        with self._lock:
            cached = self._cache.get(voice_id)
            if cached and cached[0] == digest:
                self._cache.move_to_end(voice_id)
                return voice_id, cached[1]
        prompt = self._load_cached(folder, digest) or self._compute(voice_id, folder, digest)
        with self._lock:
            self._cache[voice_id] = (digest, prompt)
            self._cache.move_to_end(voice_id)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return voice_id, prompt

    def _load_cached(self, folder: Path, digest: str) -> Optional[VoicePrompt]:
        path = folder / PROMPT_CACHE_FILE
        if not path.is_file():
            return None
        try:
            prompt, meta = VoicePrompt.load(path)
        except Exception as exc:  # a corrupt cache file is recomputed, never fatal
            log.warning("ignoring unreadable prompt cache %s: %s", path, exc)
            return None
        return prompt if meta.get("source_sha256") == digest else None

    def reference(self, voice_id: str) -> tuple[np.ndarray, int, Optional[str]]:
        """A voice's reference clip (mono float32, its sample rate) and transcript (None: x-vector only)."""
        folder = self.voice_dir(voice_id)
        if not (folder / REFERENCE_FILE).is_file():
            raise VoiceNotFound(f"voice '{voice_id}' not found")
        audio, sample_rate = read_wav((folder / REFERENCE_FILE).read_bytes())
        transcript = folder / TRANSCRIPT_FILE
        ref_text = transcript.read_text(encoding="utf-8").strip() if transcript.is_file() else None
        return audio, sample_rate, ref_text or None

    def _compute(self, voice_id: str, folder: Path, digest: str) -> VoicePrompt:
        if self.builder is None:
            raise VoiceNotFound(f"voice '{voice_id}' has no cached prompt and this process cannot compute one")
        audio, sample_rate, ref_text = self.reference(voice_id)
        log.info("computing voice prompt for '%s' (%s mode)", voice_id, "icl" if ref_text else "x-vector-only")
        prompt = self.builder(audio, sample_rate, ref_text)
        try:
            prompt.save(folder / PROMPT_CACHE_FILE, {"source_sha256": digest, "voice": voice_id})
        except OSError as exc:  # a read-only voices mount still works, from memory
            log.warning("cannot write prompt cache for '%s': %s", voice_id, exc)
        return prompt
