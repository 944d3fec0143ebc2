"""OpenAI's speech API on the gateway: ``POST /v1/audio/speech`` streams the audio as it is generated (chunked,
in the requested format, or as server-sent events) from the served model its `model` names, ``GET /v1/models``
lists the served models and the other names they answer to (aliases, OpenAI's model names). Errors take OpenAI's
shape, so the official SDKs, and the voice-agent frameworks built on them, work unchanged."""
from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import math
import secrets
import time
from typing import AsyncIterator, Optional, Union

from pydantic import BaseModel, ConfigDict, StrictFloat, StrictInt, StrictStr, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse

from tts_contract.audio import FRAMES_PER_SECOND, SAMPLE_RATE
from tts_contract.deadlines import MAX_WAIT_LIMIT_MS
from tts_contract.errors import HTTP_STATUS, PROTOCOL_CODE, ErrorCode
from tts_contract.languages import UnknownLanguage, normalise_language
from tts_contract.listener import Listener
from tts_contract.models import CUSTOM_VOICE, MAX_INSTRUCT_CHARS, VOICE_DESIGN, ServedModel, conditioning_error

from . import metrics
from .auth import ANONYMOUS, Identity
from .formats import CONTENT_TYPES, MAX_SPEED, MIN_SPEED, SpeechEncoder, available_formats
from .engine_stream import SynthesisFailed
from .models import OPENAI_MODEL_NAMES, Catalog, Listed, ModelUnavailable, default_speaker, takes_voice_ids
from .protocol import invalid_unicode
from .speech import Timing, sentence_audio
from .text import SentenceFeed, packed_sentences, split_sentences
from .words import UtteranceWords, utterance_words

log = logging.getLogger("gateway.openai")
MODEL_OWNER = "qwen"
__all__ = ["OPENAI_MODEL_NAMES", "OPENAI_VOICE_NAMES", "speech", "list_models", "get_model"]
# OpenAI's built-in voices: a name here that GATEWAY_OPENAI_VOICE_MAP does not map, and that is no stored voice,
# is spoken by the default voice (a CustomVoice model's default speaker; Pipecat, for one, sends nothing else).
OPENAI_VOICE_NAMES = ("alloy", "ash", "ballad", "cedar", "coral", "echo", "fable", "marin", "nova", "onyx", "sage",
                      "shimmer", "verse")
INSTRUCTIONS_IGNORED_HEADER = "x-instructions-ignored"
# OpenAI's response header naming a request: the SDKs expose it (LiveKit Agents warns on every utterance
# without it), and the gateway's log line of the request carries the same id
REQUEST_ID_HEADER = "x-request-id"
MODEL_HEADER = "x-model"  # the served model that spoke
STREAM_FORMATS = ("audio", "sse")
_STARTED = time.time()
_ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
                413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error",
                504: "server_error"}
_ERROR_CODES = {ErrorCode.MODEL_LOADING: "model_loading", ErrorCode.RATE_LIMITED: "rate_limit_exceeded",
                ErrorCode.TIMEOUT: "timeout", ErrorCode.SYNTHESIS_ERROR: "synthesis_error",
                ErrorCode.VOICE_NOT_FOUND: "voice_not_found", ErrorCode.TTS_UNAVAILABLE: "tts_unavailable"}


class OpenAIError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 retry_after_ms: Optional[int] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.retry_after_ms = retry_after_ms

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": _ERROR_TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {}
        if self.retry_after_ms is not None:  # the SDKs honour retry-after-ms before retry-after
            headers = {"retry-after-ms": str(self.retry_after_ms),
                       "retry-after": str(max(1, math.ceil(self.retry_after_ms / 1000)))}
        return JSONResponse(self.body(), status_code=self.status, headers=headers)

    @classmethod
    def from_synthesis(cls, exc: SynthesisFailed) -> "OpenAIError":
        code = PROTOCOL_CODE[exc.code]
        return cls(HTTP_STATUS[code], exc.message, "voice" if code == ErrorCode.VOICE_NOT_FOUND else None,
                   _ERROR_CODES.get(code, code.value.lower()), exc.retry_after_ms)


CLIENT_GONE = 499  # nginx's "client closed request": logged and counted, never seen by anyone
DISCONNECT_POLL_S = 0.25


def unauthorized_body(reason: str) -> dict:
    """What the auth guard answers on ``/v1/`` routes (as OpenAI does for a bad key)."""
    return OpenAIError(401, f"{reason} (Authorization: Bearer <token>)", code="invalid_api_key").body()


def resolve_model(requested: str, models: Catalog) -> Optional[ServedModel]:
    """The served model a request's `model` names (a served name or an alias); None: the deployment's default,
    not described by its talker yet. 404 ``model_not_found`` listing what is served, or 503 while loading."""
    try:
        return models.resolve(requested)
    except ModelUnavailable as exc:
        if exc.loading:
            raise OpenAIError(503, exc.message, code=_ERROR_CODES[PROTOCOL_CODE[exc.code]]) from None
        raise OpenAIError(404, exc.message, "model", "model_not_found") from None


def resolve_speaker(requested: Optional[str], model: ServedModel, settings) -> Optional[str]:
    """The speaker of the CustomVoice ``model`` a request's `voice` names: one of its speakers (any case), an entry
    of GATEWAY_OPENAI_VOICE_MAP that maps to one, or, for OpenAI's voice names (and entries mapping to a cloned
    voice), its default speaker; anything else is a 404 listing its speakers."""
    if not requested:
        return default_speaker(model)
    speaker = model.speaker(requested)
    if speaker is not None:
        return speaker.name
    if requested in settings.openai_voice_map:
        mapped = model.speaker(settings.openai_voice_map[requested])
        return mapped.name if mapped is not None else default_speaker(model)
    if requested in OPENAI_VOICE_NAMES:
        return default_speaker(model)
    problem = conditioning_error(model, requested, None)
    raise OpenAIError(404, problem.message if problem else f"voice {requested!r} not found", "voice",
                      "voice_not_found")


def placeholder_voice(requested: Optional[str], model: ServedModel, settings) -> None:
    """A VoiceDesign model takes no voice (its voice is described by `instructions`); the SDKs always send one,
    so OpenAI's voice names (and the map's) stand for "none"; any other voice is refused rather than dropped."""
    if not requested or requested in OPENAI_VOICE_NAMES or requested in settings.openai_voice_map:
        return None
    problem = conditioning_error(model, requested, None)
    raise OpenAIError(400, (problem.message if problem else f"model '{model.name}' takes no voice") +
                      f"; send one of OpenAI's voice names ({OPENAI_VOICE_NAMES[0]}, ...) as a placeholder, and "
                      "describe the voice in 'instructions'", "voice", "unsupported_parameter")


def resolve_voice(requested: Optional[str], settings, voices) -> str:
    """The stored voice a request's `voice` names. An entry of GATEWAY_OPENAI_VOICE_MAP comes first (the operator
    chose it: an uploaded voice of the same name does not take it over), then a stored voice of that id, then, for
    OpenAI's own names, the default voice."""
    if not requested:
        voice_id = voices.default_id()
    elif requested in settings.openai_voice_map:
        voice_id = settings.openai_voice_map[requested]
        if not voices.exists(voice_id):
            raise OpenAIError(404, f"voice {requested!r} is mapped to {voice_id!r} by GATEWAY_OPENAI_VOICE_MAP, and "
                                   f"there is no voice {voice_id!r}; voices here: {_voice_ids(voices)}", "voice",
                              "voice_not_found")
        return voice_id
    elif voices.exists(requested):
        return requested
    else:
        voice_id = voices.default_id() if requested in OPENAI_VOICE_NAMES else None
    if voice_id is None or not voices.exists(voice_id):
        raise OpenAIError(404, f"voice {requested!r} not found; voices here: {_voice_ids(voices)}", "voice",
                          "voice_not_found")
    return voice_id


def _voice_ids(voices) -> str:
    return ", ".join(v["id"] for v in voices.list()) or "none"


class _VoiceRef(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: StrictStr


class _SpeechBody(BaseModel):
    """The request body; an optional field sent as null takes its default, as when it is left out."""

    model_config = ConfigDict(extra="ignore")
    model: StrictStr
    input: StrictStr
    voice: Union[StrictStr, _VoiceRef, None] = None
    instructions: Optional[StrictStr] = None
    response_format: Optional[StrictStr] = None  # wav
    speed: Union[StrictInt, StrictFloat, None] = None  # 1.0
    stream_format: Optional[StrictStr] = None  # audio
    language: Optional[StrictStr] = None  # not OpenAI's: the language of `input` (default Auto)
    max_wait_ms: Optional[StrictInt] = None  # not OpenAI's: queue this long for capacity instead of a 429


class SpeechRequest:
    """A validated speech request: each check names the offending parameter, as OpenAI's errors do."""

    def __init__(self, body: object, services):
        settings, voices = services.settings, services.voices
        if not isinstance(body, dict):
            raise OpenAIError(400, "the request body must be a JSON object")
        bad_string = invalid_unicode(body)
        if bad_string is not None:
            raise OpenAIError(400, f"'{bad_string}' is not valid Unicode (a lone surrogate)", bad_string.split(".")[0])
        try:
            parsed = _SpeechBody.model_validate(body)
        except ValidationError as exc:
            first = exc.errors()[0]
            param = str(first["loc"][0]) if first["loc"] else None
            problem = "is required" if first["type"] == "missing" else f"has the wrong type ({first['msg']})"
            raise OpenAIError(400, f"'{param}' {problem}", param) from None
        self.input = parsed.input.strip()
        if not self.input:
            raise OpenAIError(400, "'input' is empty", "input")
        if len(parsed.input) > settings.max_text_chars:
            raise OpenAIError(400, f"'input' has {len(parsed.input)} characters; the limit is "
                                   f"{settings.max_text_chars}", "input", "string_above_max_length")
        formats = available_formats()
        self.response_format = "wav" if parsed.response_format is None else parsed.response_format
        if self.response_format not in formats:
            raise OpenAIError(400, f"response_format {self.response_format!r} is not supported; supported: "
                                   f"{', '.join(formats)}", "response_format")
        speed = 1.0 if parsed.speed is None else parsed.speed
        if not MIN_SPEED <= speed <= MAX_SPEED or not math.isfinite(speed):
            raise OpenAIError(400, f"speed must be between {MIN_SPEED} and {MAX_SPEED}", "speed")
        self.speed = float(speed)
        # OpenAI refuses sse for tts-1 and tts-1-hd; here every model streams either way, so no client written for
        # OpenAI is refused
        if parsed.stream_format not in (None, *STREAM_FORMATS):
            raise OpenAIError(400, f"stream_format must be one of {', '.join(STREAM_FORMATS)}", "stream_format")
        self.sse = parsed.stream_format == "sse"
        try:
            self.language = normalise_language(parsed.language, blank_is_auto=False)
        except UnknownLanguage as exc:
            raise OpenAIError(400, str(exc), "language") from None
        if parsed.max_wait_ms is not None and not 0 <= parsed.max_wait_ms <= MAX_WAIT_LIMIT_MS:
            raise OpenAIError(400, f"max_wait_ms must be between 0 and {MAX_WAIT_LIMIT_MS}", "max_wait_ms")
        self.max_wait_s = min((parsed.max_wait_ms or 0) / 1000, settings.queue_timeout_s)
        self.model = resolve_model(parsed.model, services.catalog)
        self.instruct, self.ignored_instructions_chars = self._instructions(parsed.instructions, settings)
        requested_voice = parsed.voice.id if isinstance(parsed.voice, _VoiceRef) else parsed.voice
        if takes_voice_ids(self.model):
            self.voice = resolve_voice(requested_voice, settings, voices)
        elif self.model.kind == CUSTOM_VOICE:
            self.voice = resolve_speaker(requested_voice, self.model, settings)
        else:
            self.voice = placeholder_voice(requested_voice, self.model, settings)

    @property
    def model_name(self) -> str:
        return self.model.name if self.model is not None else "default"

    def _instructions(self, instructions: Optional[str], settings) -> tuple[Optional[str], int]:
        """(the instruct sent to the model, the characters of instructions ignored). Models that take instructions
        get them; for the others, empty or null instructions ask for nothing, so they are no reason to refuse (the
        frameworks leave the field out unless it is set; a few clients send it empty), and others are refused
        unless GATEWAY_OPENAI_IGNORE_INSTRUCTIONS is set."""
        if not (instructions or "").strip():
            return None, 0
        if len(instructions) > MAX_INSTRUCT_CHARS:
            raise OpenAIError(400, f"'instructions' has {len(instructions)} characters; the limit is "
                                   f"{MAX_INSTRUCT_CHARS}", "instructions", "string_above_max_length")
        if self.model is not None and self.model.takes_instruct:
            return instructions, 0
        if settings.openai_ignore_instructions:
            return None, len(instructions)
        problem = conditioning_error(self.model, None, instructions) if self.model is not None else None
        reason = problem.message if problem is not None else \
            "the model speaks in the voice of its reference clip and takes no style instructions"
        raise OpenAIError(400, f"'instructions' is not supported: {reason} (leave it out, or have the operator set "
                               f"GATEWAY_OPENAI_IGNORE_INSTRUCTIONS=1 to ignore it)", "instructions",
                          "unsupported_parameter")


async def _read_json(request: Request, limit: int) -> object:
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise OpenAIError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise OpenAIError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        raise OpenAIError(400, "the request body is not valid JSON") from None


async def speech(request: Request):
    """``POST /v1/audio/speech``: the first audio is awaited before answering, so a refusal (voice, capacity,
    model loading) gets its HTTP status; from then on the audio streams as it is generated."""
    services = request.app.state.services
    received = time.monotonic()
    identity = request.scope.get("state", {}).get("identity", ANONYMOUS)
    request_id = f"req_{secrets.token_hex(12)}"
    if not services.subjects.try_open(identity):
        metrics.OPENAI_REQUESTS.labels("refused").inc()
        response = OpenAIError(429, f"too many requests at once for this token's subject (limit "
                                    f"{services.subjects.limit})", code="rate_limit_exceeded",
                               retry_after_ms=1000).response()
        response.headers[REQUEST_ID_HEADER] = request_id
        return response
    try:
        response = await _speech(request, services, received, identity, request_id)
    except BaseException:
        services.subjects.close(identity)
        raise
    if isinstance(response, _ClosingStream):  # the subject's place is given back when the stream ends
        response.on_close = lambda: services.subjects.close(identity)
    else:
        services.subjects.close(identity)
    response.headers[REQUEST_ID_HEADER] = request_id
    return response


async def _speech(request: Request, services, received: float, identity: Identity, request_id: str):
    """The speech request: an error response, or the audio as a ``_ClosingStream``."""
    try:
        limit = 4 * services.settings.max_text_chars + 16384  # the longest input in any UTF-8, plus JSON
        params = SpeechRequest(await _read_json(request, limit), services)
        if not services.endpoints.ready:
            code, reason = services.endpoints.unusable_reason()
            raise OpenAIError(503, reason, code=_ERROR_CODES[PROTOCOL_CODE[code]])
        if params.model is not None and params.model.kind == VOICE_DESIGN:  # one voice: one stream when it fits
            pieces = packed_sentences(params.input, services.settings.max_request_chars)
        else:
            pieces = split_sentences(params.input, services.settings.max_sentence_chars)
        feed = SentenceFeed(services.settings.max_sentence_chars, pieces)
        listener = Listener()
        audio = sentence_audio(services.endpoints, services.settings, feed, params.voice, params.language, listener,
                               Timing(max_wait_s=params.max_wait_s), model=params.model.name if params.model else None,
                               instruct=params.instruct)
        first = await _first_chunk(audio, request)
    except OpenAIError as exc:
        metrics.OPENAI_REQUESTS.labels("refused" if exc.status != CLIENT_GONE else "cancelled").inc()
        return exc.response()
    metrics.TIME_TO_FIRST_AUDIO.observe(time.monotonic() - received)
    log.info("speech request %s of subject %s: %d characters, model %s, voice %s%s", request_id, identity.subject,
             len(params.input), params.model_name, params.voice,
             f", instructions of {len(params.instruct)} characters" if params.instruct else "")
    headers = {"cache-control": "no-cache"}
    if params.model is not None:
        headers[MODEL_HEADER] = params.model.name  # which served model spoke (an alias's too)
    if params.ignored_instructions_chars:  # the text itself stays out of the log: it may say anything
        log.info("speech request %s: instructions of %d characters ignored (GATEWAY_OPENAI_IGNORE_INSTRUCTIONS): "
                 "the model %s takes none", request_id, params.ignored_instructions_chars, params.model_name)
        headers[INSTRUCTIONS_IGNORED_HEADER] = "true"
    heard = _Heard(request_id, listener, params.speed,
                   utterance_words(services.endpoints, services.settings, params.language, lambda: params.input),
                   services.settings.heard_timeout_s)
    body = _events(first, audio, params, listener, heard) if params.sse else \
        _encoded(first, audio, params, {"samples": 0}, listener, heard)
    media_type = "text/event-stream" if params.sse else CONTENT_TYPES[params.response_format]
    return _ClosingStream(body, media_type=media_type, headers=headers)


class _ClosingStream(StreamingResponse):
    """Closes its body when the response ends for any reason: Starlette cancels the sending task when the
    client goes away but leaves the generator suspended, and with it the Triton requests, until garbage
    collection gets to it."""

    on_close = None  # called once the response has ended, whatever the reason

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self.body_iterator.aclose()
            finally:
                if self.on_close is not None:
                    self.on_close()


async def _first_chunk(audio: AsyncIterator, request: Request) -> object:
    """The first audio, while watching the client: one that leaves while the request waits for a row or
    its first frame cancels it."""
    first = asyncio.ensure_future(anext(audio))
    try:
        while not (await asyncio.wait({first}, timeout=DISCONNECT_POLL_S))[0]:
            if await request.is_disconnected():
                first.cancel()
                raise OpenAIError(CLIENT_GONE, "the client went away before the first audio")
        return first.result()
    except StopAsyncIteration:  # nothing to say (the model ended at once): an empty body
        return None
    except SynthesisFailed as exc:
        raise OpenAIError.from_synthesis(exc) from None
    except TimeoutError as exc:
        raise OpenAIError(504, str(exc), code="timeout") from None
    except OpenAIError:
        raise
    except Exception:
        log.exception("speech request failed before its first audio")
        raise OpenAIError(500, "internal error in the speech gateway") from None
    finally:
        if not first.done():
            first.cancel()
        if not first.done() or first.cancelled() or first.exception() is not None:  # no stream to answer with
            with contextlib.suppress(BaseException):
                await first
            await audio.aclose()


class _Heard:
    """What the listener of a speech request heard, logged when its client goes away mid-stream (the speak
    protocol's ``heardMs``/``heardText``; this API has no message to carry them)."""

    _logging: set = set()  # the log tasks running (nobody awaits them)

    def __init__(self, request_id: str, listener: Listener, speed: float, words: Optional[UtteranceWords],
                 timeout_s: float):
        self.request_id, self.listener, self.speed, self.words, self.timeout_s = \
            request_id, listener, speed, words, timeout_s

    def add(self, chunk) -> None:
        if self.words is not None:
            self.words.add_audio(chunk)

    def client_gone(self) -> None:
        """Log heardMs (on the generated audio's clock: the listener plays it at ``speed``) and heardText."""
        played_s = self.listener.audio_s - self.listener.buffered()
        heard_ms = int(max(0.0, 1000 * played_s * self.speed))
        task = asyncio.get_running_loop().create_task(self._log(heard_ms))
        self._logging.add(task)
        task.add_done_callback(self._logging.discard)

    async def _log(self, heard_ms: int) -> None:
        text = await self.words.heard_text(heard_ms, self.timeout_s) if self.words is not None else None
        log.info("speech request %s: the client went away after %d ms heard: %r", self.request_id, heard_ms, text)
        self.close()

    def close(self) -> None:
        if self.words is not None:
            self.words.close()


async def _encoded(first, audio: AsyncIterator, params: SpeechRequest, stats: dict,
                   listener: Listener, heard: Optional[_Heard] = None) -> AsyncIterator[bytes]:
    """The response format's bytes as the audio arrives; the Triton requests are cancelled when the client
    goes away (the response stops being sent). Encoding runs off the event loop where ffmpeg does it.

    A failure mid-stream raises: the headers are sent, so the body is cut short and the client sees an
    incomplete response rather than a clean end."""
    encoder = SpeechEncoder(params.response_format, params.speed)
    off_loop = params.response_format not in ("wav", "pcm") or params.speed != 1.0
    outcome = "failed"
    try:
        async with contextlib.aclosing(audio):
            chunk = first
            while chunk is not None:
                stats["samples"] += len(chunk)
                if heard is not None:
                    heard.add(chunk)
                data = await asyncio.to_thread(encoder.encode, chunk) if off_loop else encoder.encode(chunk)
                if data:
                    yield data
                metrics.record_chunk(listener, len(chunk) / SAMPLE_RATE / params.speed, time.monotonic())
                chunk = await anext(audio, None)
        yield await asyncio.to_thread(encoder.finish) if off_loop else encoder.finish()
        outcome = "completed"
    except (asyncio.CancelledError, GeneratorExit):
        outcome = "cancelled"
        if heard is not None:
            heard.client_gone()
            heard = None  # its log task closes it
        raise
    except (SynthesisFailed, TimeoutError) as exc:
        log.warning("speech request failed mid-stream: %s", exc)
        raise
    finally:
        metrics.OPENAI_REQUESTS.labels(outcome).inc()
        metrics.AUDIO_SECONDS.inc(stats["samples"] / SAMPLE_RATE)
        if heard is not None:
            heard.close()


async def _events(first, audio: AsyncIterator, params: SpeechRequest, listener: Listener,
                  heard: Optional[_Heard] = None) -> AsyncIterator[bytes]:
    """``speech.audio.delta`` events (base64 of the format's bytes), then ``speech.audio.done`` with usage
    (input: characters; output: codec frames, 12.5 per second of audio); a failure mid-stream becomes an
    ``error`` event."""
    stats = {"samples": 0}
    try:
        async with contextlib.aclosing(_encoded(first, audio, params, stats, listener, heard)) as stream:
            async for data in stream:
                yield _event({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode("ascii")})
    except SynthesisFailed as exc:
        yield _event({"type": "error", **OpenAIError.from_synthesis(exc).body()})
        return
    except TimeoutError as exc:
        yield _event({"type": "error", **OpenAIError(504, str(exc), code="timeout").body()})
        return
    frames = round(stats["samples"] / SAMPLE_RATE * FRAMES_PER_SECOND)
    yield _event({"type": "speech.audio.done", "usage": {"input_tokens": len(params.input), "output_tokens": frames,
                                                          "total_tokens": len(params.input) + frames}})


def _event(payload: dict) -> bytes:
    return f"event: {payload['type']}\ndata: {json.dumps(payload)}\n\n".encode()


async def list_models(request: Request):
    """The served models (the default first), then each other name a request may use for one (aliases, OpenAI's
    model names)."""
    return JSONResponse({"object": "list",
                         "data": [_model(listed) for listed in request.app.state.services.catalog.listing()]})


async def get_model(request: Request):
    name = request.path_params["model"]
    models: Catalog = request.app.state.services.catalog
    listed = models.find(name)
    if listed is None:
        try:
            model = resolve_model(name, models)
        except OpenAIError as exc:
            return exc.response()
        if model is None:  # the default, not described yet
            return JSONResponse({"id": name, "object": "model", "created": int(_STARTED), "owned_by": MODEL_OWNER})
        listed = Listed(name, model, alias_of=model.name if model.name != name else None)
    return JSONResponse(_model(listed))


def _model(listed: Listed) -> dict:
    """OpenAI's model object, with what this model is: its kind and size, its speakers (CustomVoice), whether it
    takes instructions, and, for an alias, the served model it means."""
    model = listed.model
    body = {"id": listed.id, "object": "model", "created": int(_STARTED), "owned_by": MODEL_OWNER,
            "kind": model.kind, "size": model.size, "speakers": [s.name for s in model.speakers],
            "takesInstruct": model.takes_instruct, "features": model.features()}
    if listed.alias_of is not None:
        body["aliasOf"] = listed.alias_of
    return body
