"""One object per WebSocket: its configuration, utterance queue, playback task and cleanup."""
from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Optional

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from . import metrics
from .audio import AudioConverter
from .protocol import (
    CLOSE_NORMAL, CLOSE_POLICY, ENCODINGS, FROM_ENGINE, SAMPLE_RATE, SAMPLE_RATES, TRANSPORTS, AudioChunk,
    AudioEnd, Cancel, Complete, Error, ErrorCode, ProtocolError, Ready, Speak, Start, Started, Stop, Stopped,
    normalise_language, parse_client_message,
)
from .text import split_sentences
from .triton_client import SynthesisFailed

log = logging.getLogger("gateway.session")
AUTH_TIMEOUT_S = 10.0  # how long an unauthenticated connection may wait before its `start`
_ADMITTED = object()  # put in a sentence's audio queue when its request gets a synthesis slot


@dataclass(frozen=True)
class AudioFormat:
    sample_rate: int = SAMPLE_RATE
    encoding: str = "pcm16"
    transport: str = "binary"


@dataclass
class Utterance:
    sentences: list[str]
    characters: int
    voice: Optional[str]
    language: str
    audio: AudioFormat
    legacy: bool
    request_id: Optional[str]
    received_at: float = field(default_factory=time.monotonic)


class _Closed(Exception):
    """The session is over (stop, auth failure, or the client went away)."""


class Session:
    def __init__(self, websocket: WebSocket, services):
        self.ws = websocket
        self.services = services
        self.settings = services.settings
        self.id = uuid.uuid4().hex[:16]
        self.voice: Optional[str] = services.voices.default_id()
        self.language = "English"
        self.audio = AudioFormat()
        self.legacy = True  # until a `start` arrives
        self.contract_id: Optional[str] = None
        self.queue: "asyncio.Queue[Utterance]" = asyncio.Queue()
        self.playing: Optional[asyncio.Task] = None
        self._send_lock = asyncio.Lock()
        self._closed = False

    # -- sending -----------------------------------------------------------------------------------------

    async def send_message(self, message) -> None:
        if isinstance(message, Error):
            metrics.ERRORS.labels(message.code).inc()
        await self._send(text=message.to_json())

    async def _send(self, text: Optional[str] = None, data: Optional[bytes] = None) -> None:
        if self._closed:
            raise _Closed()
        async with self._send_lock:  # one frame at a time; awaiting it is the backpressure
            try:
                if text is not None:
                    await self.ws.send_text(text)
                else:
                    await self.ws.send_bytes(data)
            except (WebSocketDisconnect, RuntimeError, OSError) as exc:
                self._closed = True
                raise _Closed() from exc

    async def error(self, code: ErrorCode, message: str, request_id: Optional[str] = None) -> None:
        await self.send_message(Error.of(code, message, request_id))

    async def close(self, code: int, reason: str = "") -> None:
        if not self._closed and self.ws.client_state == WebSocketState.CONNECTED:
            self._closed = True
            try:
                await self.ws.close(code, reason)
            except Exception:  # already gone
                pass
        self._closed = True

    # -- lifecycle ---------------------------------------------------------------------------------------

    def _token_ok(self, token: Optional[str]) -> bool:
        if not token:
            return False
        matches = [hmac.compare_digest(token.encode(), t.encode()) for t in self.settings.auth_tokens]
        return any(matches)  # every token compared: no early exit on a match

    def _connect_token(self) -> Optional[str]:
        header = self.ws.headers.get("authorization", "")
        if header.lower().startswith("bearer "):
            return header[7:].strip()
        return self.ws.query_params.get("token")

    async def run(self) -> None:
        worker = None
        try:
            first_message = None
            if self.settings.auth_tokens:
                token = self._connect_token()
                if token is None:  # the token may come in `start`, which must then be the first message
                    first_message = await self._receive(min(self.settings.idle_timeout_s, AUTH_TIMEOUT_S))
                    if first_message is None:
                        return
                    message = self._parse_or_none(first_message)
                    token = message.authToken if isinstance(message, Start) else None
                if not self._token_ok(token):
                    await self.error(ErrorCode.UNAUTHORIZED, "missing or invalid auth token")
                    await self.close(CLOSE_POLICY, "unauthorized")
                    return
            await self.send_message(Ready(sessionId=self.id, voiceLoaded=self.voice))
            worker = asyncio.create_task(self._worker())
            if first_message is not None:
                await self._handle(first_message)
            while True:
                raw = await self._receive(self.settings.idle_timeout_s)
                if raw is None:
                    if self.playing is not None or not self.queue.empty():
                        continue  # busy: not idle
                    log.info("session %s idle for %.0f s; closing", self.id, self.settings.idle_timeout_s)
                    await self.close(CLOSE_NORMAL, "idle timeout")
                    return
                await self._handle(raw)
        except _Closed:
            pass
        finally:
            self._closed = True
            self._drop_queue()
            if self.playing is not None:
                self.playing.cancel()
            if worker is not None:
                worker.cancel()
                await asyncio.gather(worker, return_exceptions=True)

    async def _receive(self, timeout: float) -> Optional[str]:
        """The next text frame; None on idle timeout. Binary frames are ignored."""
        while True:
            try:
                message = await asyncio.wait_for(self.ws.receive(), timeout)
            except asyncio.TimeoutError:
                return None
            except (WebSocketDisconnect, RuntimeError):
                raise _Closed() from None
            if message["type"] == "websocket.disconnect":
                raise _Closed()
            if message.get("text") is not None:
                return message["text"]

    def _parse_or_none(self, raw: str):
        try:
            return parse_client_message(raw)
        except ProtocolError:
            return None

    async def _handle(self, raw: str) -> None:
        try:
            if len(raw.encode("utf-8")) > self.settings.max_message_bytes:
                raise ProtocolError(ErrorCode.INVALID_MESSAGE,
                                    f"message is larger than {self.settings.max_message_bytes} bytes")
            message = parse_client_message(raw)
            if isinstance(message, Start):
                await self._on_start(message)
            elif isinstance(message, Speak):
                await self._on_speak(message)
            elif isinstance(message, Cancel):
                await self._cancel_all()
            elif isinstance(message, Stop):
                await self._cancel_all()
                await self.send_message(Stopped(reason=message.reason))
                await self.close(CLOSE_NORMAL, "stopped")
                raise _Closed()
        except ProtocolError as exc:
            await self.error(exc.code, exc.message, exc.request_id)

    # -- messages ----------------------------------------------------------------------------------------

    def _known_voice(self, voice: str) -> bool:
        return self.services.voices.exists(voice)

    async def _on_start(self, message: Start) -> None:
        if message.sampleRate not in SAMPLE_RATES:
            raise ProtocolError(ErrorCode.INVALID_CONFIG, f"unsupported sampleRate {message.sampleRate}; "
                                f"supported: {', '.join(map(str, SAMPLE_RATES))}")
        if message.encoding not in ENCODINGS:
            raise ProtocolError(ErrorCode.INVALID_CONFIG,
                                f"unsupported encoding {message.encoding!r}; supported: {', '.join(ENCODINGS)}")
        if message.audioTransport not in TRANSPORTS:
            raise ProtocolError(ErrorCode.INVALID_CONFIG, f"unsupported audioTransport "
                                f"{message.audioTransport!r}; supported: {', '.join(TRANSPORTS)}")
        language = normalise_language(message.language)
        self.audio = AudioFormat(message.sampleRate, message.encoding, message.audioTransport)
        self.language = language
        self.legacy = False
        self.contract_id = message.contractId or self.contract_id
        if message.voice is not None:
            if self._known_voice(message.voice):
                self.voice = message.voice
            else:
                await self.error(ErrorCode.VOICE_NOT_FOUND,
                                 f"voice {message.voice!r} not found; keeping voice {self.voice!r}")
        log.info("session %s started: %s Hz %s %s, voice %s, language %s, contract %s", self.id,
                 self.audio.sample_rate, self.audio.encoding, self.audio.transport, self.voice, self.language,
                 self.contract_id)
        await self.send_message(Started(sampleRate=self.audio.sample_rate, encoding=self.audio.encoding,
                                        voice=self.voice, language=self.language))

    async def _on_speak(self, message: Speak) -> None:
        rid = message.requestId
        text = message.text
        if text is None or not text.strip():
            raise ProtocolError(ErrorCode.INVALID_TEXT, "'text' is missing or empty", rid)
        if len(text) > self.settings.max_text_chars:
            raise ProtocolError(ErrorCode.INVALID_TEXT, f"text has {len(text)} characters; the limit is "
                                f"{self.settings.max_text_chars}", rid)
        if message.priority not in ("normal", "high"):
            raise ProtocolError(ErrorCode.INVALID_MESSAGE,
                                f"priority must be 'normal' or 'high', not {message.priority!r}", rid)
        language = self.language
        if message.language is not None:
            try:
                language = normalise_language(message.language)
            except ProtocolError as exc:
                raise ProtocolError(exc.code, exc.message, rid) from None
        voice = self.voice
        if message.voice is not None and message.voice != voice:
            if self._known_voice(message.voice):
                voice = message.voice
            else:
                await self.error(ErrorCode.VOICE_NOT_FOUND,
                                 f"voice {message.voice!r} not found; using voice {voice!r}", rid)
        if not self.services.backend.ready:
            raise ProtocolError(ErrorCode.MODEL_LOADING, "the speech model is not ready yet; try again shortly",
                                rid)
        if message.priority == "high":
            await self._cancel_all()
        elif self.queue.qsize() >= self.settings.max_queued_utterances:
            raise ProtocolError(ErrorCode.RATE_LIMITED, f"too many queued utterances "
                                f"(limit {self.settings.max_queued_utterances})", rid)
        audio = AudioFormat() if self.legacy else self.audio
        sentences = split_sentences(text, self.settings.max_sentence_chars)
        self.queue.put_nowait(Utterance(sentences=sentences, characters=len(text), voice=voice,
                                        language=language, audio=audio, legacy=self.legacy, request_id=rid))

    def _drop_queue(self) -> None:
        while not self.queue.empty():
            self.queue.get_nowait()

    async def _cancel_all(self) -> None:
        """Drop queued utterances and cancel the one playing; returns once its end message is sent."""
        self._drop_queue()
        playing = self.playing
        if playing is not None and not playing.done():
            playing.cancel()
            await asyncio.gather(playing, return_exceptions=True)

    # -- playback ----------------------------------------------------------------------------------------

    async def _worker(self) -> None:
        while True:
            utterance = await self.queue.get()
            self.playing = asyncio.create_task(self._play(utterance))
            try:
                await asyncio.shield(self.playing)
            except asyncio.CancelledError:
                if self._closed:
                    raise
            except _Closed:
                return
            except Exception:  # a bug must cost one utterance, never the session
                log.exception("session %s: utterance failed unexpectedly", self.id)
                with contextlib.suppress(_Closed):
                    await self.error(ErrorCode.SYNTHESIS_ERROR, "internal error", utterance.request_id)
            finally:
                if self.playing is not None and self.playing.done():
                    self.playing = None
            if self._closed:
                return

    async def _sentence_audio(self, utterance: Utterance):
        """Audio of all sentences in order; the next sentence is requested while the current one plays."""
        backend = self.services.backend
        timeout = self.settings.synthesis_timeout_s
        # Before its slot is granted a sentence waits at most the queue timeout (then RATE_LIMITED, from the
        # pool); from then on, no audio within the synthesis timeout is a TIMEOUT.
        admission_timeout = self.settings.queue_timeout_s + 5.0

        async def produce(sentence: str, out: asyncio.Queue):
            parameters = {"max_new_tokens": self.settings.max_new_tokens(sentence),
                          **self.settings.synthesis_parameters}
            try:
                async for chunk in backend.synthesize(sentence, utterance.voice, utterance.language, parameters,
                                                      admitted=lambda: out.put_nowait(_ADMITTED)):
                    out.put_nowait(chunk)
                out.put_nowait(None)
            except BaseException as exc:  # handed to the consumer, which re-raises it
                out.put_nowait(exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise

        producers: list[asyncio.Task] = []
        queues: list[asyncio.Queue] = []

        def start(index: int) -> None:
            if index < len(utterance.sentences) and index == len(producers):
                queue: asyncio.Queue = asyncio.Queue()
                queues.append(queue)
                producers.append(asyncio.create_task(produce(utterance.sentences[index], queue)))

        try:
            for index in range(len(utterance.sentences)):
                start(index)
                start(index + 1)  # look ahead one sentence: no gap between sentences
                wait = admission_timeout
                while True:
                    try:
                        item = await asyncio.wait_for(queues[index].get(), wait)
                    except asyncio.TimeoutError:
                        raise TimeoutError(f"no audio for {wait:g} s") from None
                    wait = timeout
                    if item is _ADMITTED:
                        continue
                    if item is None:
                        break
                    if isinstance(item, BaseException):
                        raise item
                    yield item
        finally:
            for task in producers:
                task.cancel()
            await asyncio.gather(*producers, return_exceptions=True)

    async def _play(self, utterance: Utterance) -> None:
        converter = AudioConverter(utterance.audio.sample_rate, utterance.audio.encoding)
        rate = utterance.audio.sample_rate
        base64_transport = utterance.audio.transport == "base64" and not utterance.legacy
        samples = 0
        sequence = 0
        first_audio: Optional[float] = None
        cancelled, outcome = False, "completed"

        async def send_audio(data: bytes, final: bool = False) -> None:
            nonlocal samples, sequence, first_audio
            if not data and not (final and base64_transport):
                return
            if base64_transport:
                await self.send_message(AudioChunk(data=base64.b64encode(data).decode("ascii"),
                                                   sequenceNumber=sequence, isFinal=final,
                                                   timestampMs=int(samples * 1000 / rate)))
            else:
                await self._send(data=data)
            sequence += 1
            if data and first_audio is None:
                first_audio = time.monotonic()
            samples += len(data) // converter.bytes_per_sample

        try:
            # aclosing: however playback ends, the sentence requests still in flight are cancelled now.
            async with contextlib.aclosing(self._sentence_audio(utterance)) as stream:
                async for chunk in stream:
                    await send_audio(converter.convert(chunk))
            await send_audio(converter.flush(), final=True)
        except asyncio.CancelledError:
            cancelled, outcome = True, "cancelled"
            if self._closed:
                raise
        except SynthesisFailed as exc:
            cancelled, outcome = True, "failed"
            code = FROM_ENGINE.get(exc.code, ErrorCode.SYNTHESIS_ERROR)
            log.warning("session %s: synthesis failed (%s): %s", self.id, exc.code, exc.message)
            await self.send_message(Error.of(code, exc.message, utterance.request_id, exc.retry_after_ms))
        except TimeoutError as exc:
            cancelled, outcome = True, "failed"
            await self.error(ErrorCode.TIMEOUT, str(exc), utterance.request_id)
        finally:
            metrics.UTTERANCES.labels(outcome).inc()
        finished = time.monotonic()
        seconds = samples / rate
        metrics.AUDIO_SECONDS.inc(seconds)
        if first_audio is not None:
            metrics.TIME_TO_FIRST_AUDIO.observe(first_audio - utterance.received_at)
        if seconds > 0 and outcome == "completed":
            metrics.REAL_TIME_FACTOR.observe((finished - utterance.received_at) / seconds)
        if utterance.legacy:
            await self.send_message(AudioEnd(cancelled=cancelled))
        else:
            await self.send_message(Complete(
                durationMs=int((finished - utterance.received_at) * 1000), charactersProcessed=utterance.characters,
                audioLengthMs=int(round(seconds * 1000)),
                firstAudioMs=None if first_audio is None else int((first_audio - utterance.received_at) * 1000),
                cancelled=cancelled, requestId=utterance.request_id))
