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
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tts_contract.errors import EngineCode
from tts_contract.languages import UnknownLanguage, normalise_language
from tts_contract.models import CUSTOM_VOICE
from tts_contract.limits import (
    MAX_REFERENCE_SECONDS, MAX_TRANSCRIPT_CHARS, MAX_VOICE_DESCRIPTION_CHARS, MAX_VOICE_NAME_CHARS,
    MIN_REFERENCE_SECONDS,
)
from tts_contract.voices import (
    METADATA_FILE, REFERENCE_FILE, TRANSCRIPT_FILE, InvalidVoiceId, UndecodableAudio,
    VoiceDirectory, check_voice_id, read_audio, stamped_prompt,
)

from .endpoints import Endpoints
from .models import default_speaker
from .engine_stream import SynthesisFailed, encode_voice

log = logging.getLogger("gateway.voices")


class VoiceApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def _slug(name: str) -> str:
    slug = re.sub(r"[^a-z0-9_-]+", "-", name.lower()).strip("-")[:48]
    return f"{slug or 'voice'}-{secrets.token_hex(3)}"


class VoiceLibrary:
    """The gateway's side of the voices directory (shared with Triton's talker): list, add, delete."""

    def __init__(self, root: str | Path, default_voice: str = ""):
        self.directory = VoiceDirectory(root, default_voice or None)
        self.root = self.directory.root

    def default_id(self) -> Optional[str]:
        return self.directory.default_id()

    def exists(self, voice_id: str) -> bool:
        return self.directory.exists(voice_id)

    def list(self) -> list[dict]:
        return [info.to_json() for info in self.directory.list()]

    async def upload(self, endpoints: Endpoints, data: bytes, *, transcript: Optional[str], name: Optional[str],
                     voice_id: Optional[str], language: Optional[str], description: Optional[str] = None) -> dict:
        if not data:
            raise VoiceApiError(400, "the 'audio' file is missing or empty")
        for field_name, value, limit in (("transcript", transcript, MAX_TRANSCRIPT_CHARS),
                                         ("name", name, MAX_VOICE_NAME_CHARS),
                                         ("description", description, MAX_VOICE_DESCRIPTION_CHARS)):
            if value is not None and len(value) > limit:
                raise VoiceApiError(400, f"'{field_name}' has {len(value)} characters; the limit is {limit}")
        try:
            voice_id = check_voice_id(voice_id) if voice_id else _slug(name or "voice")
            language = normalise_language(language)
        except (InvalidVoiceId, UnknownLanguage) as exc:
            raise VoiceApiError(400, str(exc)) from None
        if (self.root / voice_id).exists():
            raise VoiceApiError(409, f"voice {voice_id!r} already exists")
        try:
            audio, sample_rate = read_audio(data)
        except UndecodableAudio as exc:
            raise VoiceApiError(400, str(exc)) from None
        return await self.add(endpoints, audio, sample_rate, transcript=transcript, name=name, voice_id=voice_id,
                              language=language, description=description)

    async def add(self, endpoints: Endpoints, audio: np.ndarray, sample_rate: int, *, transcript: Optional[str],
                  name: Optional[str], voice_id: Optional[str], language: str, description: Optional[str] = None,
                  designed: Optional[dict] = None) -> dict:
        """Keep a clip as a voice: its prompt computed by Triton's voice_encoder, then written in one rename.
        ``designed``: how a VoiceDesign model made the clip (kept in its metadata)."""
        voice_id = voice_id or _slug(name or "voice")
        seconds = audio.size / sample_rate
        if not MIN_REFERENCE_SECONDS <= seconds <= MAX_REFERENCE_SECONDS:
            raise VoiceApiError(400, f"audio is {seconds:.1f} s long; it must be between "
                                f"{MIN_REFERENCE_SECONDS:g} and {MAX_REFERENCE_SECONDS:g} s")
        transcript = (transcript or "").strip() or None
        try:
            blob = await encode_voice(endpoints, audio, sample_rate, transcript)
        except SynthesisFailed as exc:
            if exc.code in (EngineCode.INVALID_AUDIO, EngineCode.INVALID_REQUEST, EngineCode.INVALID_TEXT):
                raise VoiceApiError(400, exc.message) from None
            raise VoiceApiError(503, f"voice encoder unavailable: {exc.message}") from None
        metadata = {"name": (name or voice_id).strip() or voice_id, "language": language,
                    "description": (description or "").strip(), "isDefault": False}
        if designed:
            metadata["designed"] = designed
        return self._write(voice_id, audio, sample_rate, transcript, blob, metadata)

    def _write(self, voice_id: str, audio: np.ndarray, sample_rate: int, transcript: Optional[str],
               prompt: bytes, metadata: dict) -> dict:
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
            # stamped with the same cache key the talker checks, so it never recomputes this prompt
            cache_name, cache = stamped_prompt(prompt, staging, voice_id)
            (staging / cache_name).write_bytes(cache)
            try:
                staging.rename(self.root / voice_id)
            except OSError:
                raise VoiceApiError(409, f"voice {voice_id!r} already exists") from None
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        log.info("voice %s uploaded (%s mode)", voice_id, "icl" if transcript else "x-vector-only")
        return self.directory.info(voice_id).to_json()

    def delete(self, voice_id: str) -> None:
        try:
            check_voice_id(voice_id)
        except InvalidVoiceId as exc:
            raise VoiceApiError(400, str(exc)) from None
        if not self.exists(voice_id):
            raise VoiceApiError(404, f"voice {voice_id!r} not found")
        if voice_id == self.default_id():
            raise VoiceApiError(400, "the default voice cannot be deleted")
        shutil.rmtree(self.root / voice_id)
        log.info("voice %s deleted", voice_id)


# -- routes ---------------------------------------------------------------------------------------------------

async def list_voices(request: Request):
    """The cloned voices (for the Base models: ``models`` names them), then each CustomVoice model's named
    speakers (``id``: the speaker's name, ``model``: the served model's name)."""
    services = request.app.state.services
    served = services.catalog.served().values()
    bases = [m.name for m in served if m.clones]
    cloned = [{**entry, "models": bases} for entry in services.voices.list()]
    speakers = [{"id": speaker.name, "name": speaker.name, "kind": "speaker", "model": model.name,
                 "languages": list(model.languages), "dialect": speaker.dialect,
                 "isDefault": speaker.name == default_speaker(model), "takesInstruct": model.takes_instruct}
                for model in served if model.kind == CUSTOM_VOICE for speaker in model.speakers]
    return JSONResponse({"voices": cloned + speakers})


class _BodyTooLarge(Exception):
    pass


# Room for the multipart framing and the text fields around the audio file.
FORM_OVERHEAD_BYTES = 64 * 1024


async def upload_voice(request: Request):
    services = request.app.state.services
    limit = services.settings.max_upload_bytes + FORM_OVERHEAD_BYTES
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        return _too_large(services.settings.max_upload_bytes)  # refused before reading any of it
    received = 0

    async def receive():  # a body without a length is counted as it arrives, and cut at the limit
        nonlocal received
        message = await request.receive()
        received += len(message.get("body", b""))
        if received > limit:
            raise _BodyTooLarge()
        return message

    try:
        async with Request(request.scope, receive).form(max_files=1, max_fields=8, max_part_size=16 * 1024) as form:
            upload = form.get("audio")
            data = await upload.read() if hasattr(upload, "read") else b""
            entry = await services.voices.upload(
                services.endpoints, data, transcript=_text(form.get("transcript")), name=_text(form.get("name")),
                voice_id=_text(form.get("id")), language=_text(form.get("language")),
                description=_text(form.get("description")))
    except _BodyTooLarge:
        return _too_large(services.settings.max_upload_bytes)
    except VoiceApiError as exc:
        return JSONResponse({"error": exc.message}, status_code=exc.status)
    except Exception as exc:  # malformed multipart and friends
        if "multipart" in type(exc).__module__ or "MultiPart" in type(exc).__name__ or "form" in str(exc).lower():
            return JSONResponse({"error": f"bad upload: {exc}"}, status_code=400)
        raise
    return JSONResponse(entry, status_code=201)


def _too_large(limit: int) -> JSONResponse:
    return JSONResponse({"error": f"the upload is larger than {limit} bytes (GATEWAY_MAX_UPLOAD_BYTES)"},
                        status_code=413)


async def delete_voice(request: Request):
    try:
        request.app.state.services.voices.delete(request.path_params["voice_id"])
    except VoiceApiError as exc:
        return JSONResponse({"error": exc.message}, status_code=exc.status)
    return Response(status_code=204)


def _text(value) -> Optional[str]:
    return value if isinstance(value, str) else None
