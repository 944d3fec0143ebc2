"""The voices REST API: list, upload (prompt computed by Triton's voice_encoder), delete."""
from __future__ import annotations

import json
import logging
import re
import secrets
import shutil
from pathlib import Path
from typing import Optional

import numpy as np

from tts_engine.errors import EngineError, InvalidAudio, InvalidRequest
from tts_engine.prompts import prompt_metadata, read_wav, restamp
from tts_engine.voices import (
    METADATA_FILE, PROMPT_CACHE_FILE, REFERENCE_FILE, TRANSCRIPT_FILE, VoiceStore, check_voice_id, source_digest,
)

from .protocol import LANGUAGES
from .triton_client import SynthesisFailed, TritonPool

log = logging.getLogger("gateway.voices")
MIN_UPLOAD_SECONDS = 3.0
MAX_UPLOAD_SECONDS = 30.0


class VoiceApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def _slug(name: str) -> str:
    slug = re.sub(r"[^a-z0-9_-]+", "-", name.lower()).strip("-")[:48]
    return f"{slug or 'voice'}-{secrets.token_hex(3)}"


class VoiceLibrary:
    """The gateway's view of the voices directory (shared with Triton's talker)."""

    def __init__(self, root: str | Path, default_voice: str = ""):
        self.store = VoiceStore(root, default_voice=default_voice or None)
        self.root = self.store.root

    def default_id(self) -> Optional[str]:
        return self.store.default_id()

    def exists(self, voice_id: str) -> bool:
        return self.store.exists(voice_id)

    def list(self) -> list[dict]:
        return [info.to_json() for info in self.store.list()]

    async def upload(self, backend: TritonPool, data: bytes, *, transcript: Optional[str], name: Optional[str],
                     voice_id: Optional[str], language: Optional[str], max_bytes: int) -> dict:
        if not data:
            raise VoiceApiError(400, "the 'audio' file is missing or empty")
        if len(data) > max_bytes:
            raise VoiceApiError(400, f"audio file is {len(data)} bytes; the limit is {max_bytes}")
        try:
            voice_id = check_voice_id(voice_id) if voice_id else _slug(name or "voice")
        except InvalidRequest as exc:
            raise VoiceApiError(400, exc.message) from None
        if (self.root / voice_id).exists():
            raise VoiceApiError(409, f"voice {voice_id!r} already exists")
        if language and language.strip().lower() != "auto" and language.strip().capitalize() not in LANGUAGES:
            raise VoiceApiError(400, f"unsupported language {language!r}")
        try:
            audio, sample_rate = read_wav(data)
        except InvalidAudio as exc:
            raise VoiceApiError(400, exc.message) from None
        seconds = audio.size / sample_rate
        if not MIN_UPLOAD_SECONDS <= seconds <= MAX_UPLOAD_SECONDS:
            raise VoiceApiError(400, f"audio is {seconds:.1f} s long; it must be between "
                                f"{MIN_UPLOAD_SECONDS:g} and {MAX_UPLOAD_SECONDS:g} s")
        transcript = (transcript or "").strip() or None
        try:
            blob = await backend.encode_voice(audio, sample_rate, transcript)
        except SynthesisFailed as exc:
            if exc.code in ("INVALID_AUDIO", "INVALID_REQUEST", "INVALID_TEXT"):
                raise VoiceApiError(400, exc.message) from None
            raise VoiceApiError(503, f"voice encoder unavailable: {exc.message}") from None
        return self._write(voice_id, audio, sample_rate, transcript, blob,
                           prompt_metadata(blob).get("model_fingerprint", ""),
                           {"name": (name or voice_id).strip() or voice_id,
                            "language": (language or "Auto").strip().capitalize() if language else "Auto",
                            "description": "", "isDefault": False})

    def _write(self, voice_id: str, audio: np.ndarray, sample_rate: int, transcript: Optional[str],
               prompt: bytes, fingerprint: str, metadata: dict) -> dict:
        """Write the voice into a staging folder, then move it into place in one rename."""
        import soundfile as sf

        self.root.mkdir(parents=True, exist_ok=True)
        staging = self.root / f".upload-{voice_id}-{secrets.token_hex(4)}"
        staging.mkdir()
        try:
            sf.write(staging / REFERENCE_FILE, audio, sample_rate, subtype="PCM_16")
            if transcript:
                (staging / TRANSCRIPT_FILE).write_text(transcript + "\n", encoding="utf-8")
            (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2))
            if fingerprint:  # the same cache key the talker checks, so it never recomputes this prompt
                (staging / PROMPT_CACHE_FILE).write_bytes(restamp(
                    prompt, {"source_sha256": source_digest(staging, fingerprint), "voice": voice_id}))
            try:
                staging.rename(self.root / voice_id)
            except OSError:
                raise VoiceApiError(409, f"voice {voice_id!r} already exists") from None
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        log.info("voice %s uploaded (%s mode)", voice_id, "icl" if transcript else "x-vector-only")
        return self.store.info(voice_id).to_json()

    def delete(self, voice_id: str) -> None:
        try:
            check_voice_id(voice_id)
        except EngineError as exc:
            raise VoiceApiError(400, exc.message) from None
        if not self.exists(voice_id):
            raise VoiceApiError(404, f"voice {voice_id!r} not found")
        if voice_id == self.default_id():
            raise VoiceApiError(400, "the default voice cannot be deleted")
        shutil.rmtree(self.root / voice_id)
        log.info("voice %s deleted", voice_id)
