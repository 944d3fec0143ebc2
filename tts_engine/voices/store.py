"""The voices directory: ids, metadata, and prompts computed once and cached on disk and in memory."""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from tts_contract.voices import (
    REFERENCE_FILE, TRANSCRIPT_FILE, InvalidVoiceId, VoiceDirectory, VoiceMissing, check_voice_id,
    prompt_cache_file, source_digest,
)

from ..errors import InvalidRequest, VoiceNotFound
from .prompts import VoicePrompt, check_transcript, read_wav

log = logging.getLogger(__name__)

PromptBuilder = Callable[[np.ndarray, int, Optional[str]], VoicePrompt]


def checked_voice_id(voice_id: str) -> str:
    """The id, or InvalidRequest when it is not [a-z0-9_-]{1,64}."""
    try:
        return check_voice_id(voice_id)
    except InvalidVoiceId as exc:
        raise InvalidRequest(str(exc)) from None


class VoiceStore(VoiceDirectory):
    """The voices directory plus prompts: computed once, cached on disk and in memory, recomputed when the
    reference, transcript or model changes."""

    def __init__(self, root: str | Path, builder: Optional[PromptBuilder] = None, fingerprint: str = "",
                 default_voice: Optional[str] = None, cache_size: int = 64):
        super().__init__(root, default_voice)
        self.builder = builder
        self.fingerprint = fingerprint
        self._cache: "OrderedDict[str, tuple[str, VoicePrompt]]" = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def folder(self, voice_id: str) -> Path:
        checked_voice_id(voice_id)
        try:
            return super().folder(voice_id)
        except VoiceMissing as exc:
            raise VoiceNotFound(str(exc)) from None

    def get_prompt(self, voice_id: Optional[str]) -> tuple[str, VoicePrompt]:
        """Resolve a voice id (None → default) to its prompt: memory, then disk cache, then compute."""
        voice_id = voice_id or self.default_id()
        if voice_id is None:
            raise VoiceNotFound(f"no voice given and no default voice in {self.root}")
        folder = self.folder(voice_id)
        digest = source_digest(folder, self.fingerprint)
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
        path = folder / prompt_cache_file(self.fingerprint)
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
        folder = self.folder(voice_id)
        audio, sample_rate = read_wav((folder / REFERENCE_FILE).read_bytes())
        transcript = folder / TRANSCRIPT_FILE
        return audio, sample_rate, check_transcript(transcript.read_text(encoding="utf-8") if transcript.is_file()
                                                    else None)

    def _compute(self, voice_id: str, folder: Path, digest: str) -> VoicePrompt:
        if self.builder is None:
            raise VoiceNotFound(f"voice '{voice_id}' has no cached prompt and this process cannot compute one")
        audio, sample_rate, ref_text = self.reference(voice_id)
        log.info("computing voice prompt for '%s' (%s mode)", voice_id, "icl" if ref_text else "x-vector-only")
        prompt = self.builder(audio, sample_rate, ref_text)
        try:
            prompt.save(folder / prompt_cache_file(self.fingerprint), {"source_sha256": digest, "voice": voice_id})
        except OSError as exc:  # a read-only voices mount still works, from memory
            log.warning("cannot write prompt cache for '%s': %s", voice_id, exc)
        return prompt
