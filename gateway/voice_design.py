"""Design, then keep: a VoiceDesign model speaks a sample sentence in a voice described in words, and the clip is
kept as a cloned voice (clip, transcript, metadata naming its description), so the designed voice stays the same
voice on any Base model, utterance after utterance (a VoiceDesign model would design a new voice each time)."""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from typing import Optional

import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse

from tts_contract.audio import SAMPLE_RATE
from tts_contract.errors import EngineCode
from tts_contract.languages import UnknownLanguage, normalise_language
from tts_contract.limits import (
    MAX_REFERENCE_SECONDS, MAX_VOICE_DESCRIPTION_CHARS, MAX_VOICE_NAME_CHARS, MIN_REFERENCE_SECONDS,
)
from tts_contract.models import VOICE_DESIGN

from .engine_stream import SynthesisFailed
from .routing import Route
from .voices import VoiceApiError

log = logging.getLogger("gateway.voice_design")
MAX_SAMPLE_CHARS = 400  # a sample sentence: a 3-30 s clip
FRAMES_PER_SECOND = 12.5
# The sample's frame cap: about 1.6 frames a character (twice real speech's rate) plus a second, within the longest
# reference clip; a real model ends at its own EOS long before.
CAP_FRAMES_PER_CHAR, CAP_EXTRA_FRAMES = 1.6, 13
MAX_BODY_BYTES = 16 * 1024


def _field(body: dict, name: str, limit: int, required: bool = True) -> Optional[str]:
    value = body.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise VoiceApiError(400, f"'{name}' is required")
        return None
    if not isinstance(value, str):
        raise VoiceApiError(400, f"'{name}' must be a string")
    if len(value) > limit:
        raise VoiceApiError(400, f"'{name}' has {len(value)} characters; the limit is {limit}")
    return value.strip()


def _design_model(catalog, requested: Optional[str]):
    """The VoiceDesign model to design with: the one named, else the first served."""
    served = catalog.served()
    if requested is not None:
        model = served.get(requested)
        if model is None:
            raise VoiceApiError(400, f"model '{requested[:64]}' is not served here; served: {', '.join(served) or 'none'}")
        if model.kind != VOICE_DESIGN:
            raise VoiceApiError(400, f"model '{requested}' is a {model.kind} model; designing a voice needs a "
                                     "VoiceDesign model")
        return model
    model = next((m for m in served.values() if m.kind == VOICE_DESIGN), None)
    if model is None:
        raise VoiceApiError(503, "no VoiceDesign model is served here (QWEN_TTS_MODELS can add "
                                 "Qwen3-TTS-12Hz-1.7B-VoiceDesign); served: " + (", ".join(served) or "none"))
    return model


async def design(services, body: dict) -> dict:
    """Speak ``body['text']`` in the voice ``body['description']`` describes, with a VoiceDesign model, and keep the
    clip as a cloned voice; returns its listing entry."""
    description = _field(body, "description", MAX_VOICE_DESCRIPTION_CHARS)  # kept as its description
    text = _field(body, "text", MAX_SAMPLE_CHARS)
    name = _field(body, "name", MAX_VOICE_NAME_CHARS, required=False) or "designed voice"
    language = body.get("language")
    if language is not None and not isinstance(language, str):
        raise VoiceApiError(400, "'language' must be a string")
    try:
        language = normalise_language(language)
    except UnknownLanguage as exc:
        raise VoiceApiError(400, str(exc)) from None
    seed = body.get("seed")
    if seed is None:
        seed = secrets.randbits(31)  # kept in the metadata: the same description, text and seed design it again
    elif isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise VoiceApiError(400, "'seed' must be a non-negative integer")
    model = _design_model(services.catalog, _field(body, "model", 64, required=False))
    frames = min(int(MAX_REFERENCE_SECONDS * FRAMES_PER_SECOND) - 1,
                 int(CAP_FRAMES_PER_CHAR * len(text)) + CAP_EXTRA_FRAMES)
    parameters = {**services.settings.synthesis_parameters, "seed": seed, "max_new_tokens": frames}
    chunks = []
    try:
        # the clip's whole time: its first audio, then at most the longest clip (the engine paces it to a listener)
        async with asyncio.timeout(services.settings.synthesis_timeout_s + MAX_REFERENCE_SECONDS), \
                contextlib.aclosing(Route(services.endpoints, model.name).stream(
                    text, None, language, parameters, instruct=description)) as audio:
            async for chunk in audio:
                chunks.append(chunk)
    except TimeoutError:
        raise VoiceApiError(503, "the VoiceDesign model did not finish the sample in time; try again") from None
    except SynthesisFailed as exc:
        if exc.code in (EngineCode.INVALID_TEXT, EngineCode.INVALID_CONFIG, EngineCode.INVALID_REQUEST):
            raise VoiceApiError(400, exc.message) from None
        raise VoiceApiError(503, f"the VoiceDesign model could not speak the sample: {exc.message}") from None
    clip = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
    seconds = clip.size / SAMPLE_RATE
    if seconds < MIN_REFERENCE_SECONDS:
        raise VoiceApiError(400, f"the sample came out {seconds:.1f} s long; a voice needs at least "
                                 f"{MIN_REFERENCE_SECONDS:g} s: give a longer sample sentence")
    entry = await services.voices.add(
        services.endpoints, clip, SAMPLE_RATE, transcript=text, name=name, voice_id=None, language=language,
        description=description,
        designed={"model": model.name, "description": description, "text": text, "seed": seed})
    log.info("voice %s designed with %s (%.1f s clip, seed %d)", entry["id"], model.name, seconds, seed)
    return entry


async def design_voice(request: Request):
    """POST /api/v1/voices/design: {description, text, language?, name?, model?, seed?} -> 201 and the new voice."""
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        return JSONResponse({"error": f"the body is larger than {MAX_BODY_BYTES} bytes"}, status_code=413)
    try:
        parsed = json.loads(body or b"null")
    except ValueError as exc:
        return JSONResponse({"error": f"the body is not JSON: {exc}"}, status_code=400)
    try:
        if not isinstance(parsed, dict):
            raise VoiceApiError(400, "the body must be a JSON object: {description, text, language, name}")
        entry = await design(request.app.state.services, parsed)
    except VoiceApiError as exc:
        return JSONResponse({"error": exc.message}, status_code=exc.status)
    return JSONResponse(entry, status_code=201)
