"""One WebSocket connection: its lifecycle (accept, auth, idle timeout, close), the session's configuration, and
each client message handed to its handler; utterances themselves are the session's (``session.Session``), which
sends through this connection's ``SocketOutlet`` and holds no reference back."""
from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Optional

from starlette.websockets import WebSocket, WebSocketDisconnect

from tts_contract.errors import PROTOCOL_CODE
from tts_contract.models import MAX_INSTRUCT_CHARS, VOICE_DESIGN, ServedModel, conditioning_error

from . import metrics
from .models import ModelUnavailable, default_speaker, takes_voice_ids
from .protocol import (
    CLOSE_GOING_AWAY, CLOSE_NORMAL, CLOSE_POLICY, CLOSE_SERVICE_RESTART, CLOSE_TRY_AGAIN, ENCODINGS, SAMPLE_RATES,
    TEXT_MODES, TRANSPORTS, Append, Cancel, End, Error, ErrorCode, Flush, Interrupt, Played, ProtocolError, Ready, Speak,
    Start, Started, Stop, Stopped, normalise_language, parse_client_message,
)
from .contracts import contract_problem
from .auth import ANONYMOUS, AuthRefused, Identity
from .security import bearer_token
from .outlet import SocketOutlet
from .session import AudioFormat, Session, SessionClosed, Utterance
from .text import SentenceFeed, WrittenText, split_sentences

log = logging.getLogger("gateway.connection")
AUTH_TIMEOUT_S = 10.0  # how long an unauthenticated connection may wait before its `start`


async def speak(websocket: WebSocket) -> None:
    """The /api/v1/speak route: authenticate, then take one of GATEWAY_MAX_SESSIONS sessions, then serve."""
    services = websocket.app.state.services
    await websocket.accept()
    connection = Connection(websocket, services)
    try:
        authenticated, first_message = await connection.authenticate()
        if not authenticated:
            return
        if services.draining:
            return await connection.refuse(ErrorCode.MODEL_LOADING, "the gateway is shutting down; connect again "
                                           "shortly", CLOSE_SERVICE_RESTART, "shutting down")
        if services.sessions >= services.settings.max_sessions:
            return await connection.refuse(ErrorCode.RATE_LIMITED, f"too many sessions (limit "
                                           f"{services.settings.max_sessions})", CLOSE_TRY_AGAIN, "too many sessions")
        identity = connection.identity
        if not services.subjects.try_open(identity):
            log.info("session refused for subject %s: %d sessions open", identity.subject, services.subjects.limit)
            return await connection.refuse(ErrorCode.RATE_LIMITED, f"too many sessions for this token's subject "
                                           f"(limit {services.subjects.limit})", CLOSE_TRY_AGAIN,
                                           "too many sessions for this subject")
        services.sessions += 1
        services.connections.add(connection)
        metrics.ACTIVE_SESSIONS.set(services.sessions)
        log.info("session %s opened from %s, subject %s", connection.id, websocket.client, identity.subject)
        try:
            await connection.run(first_message)
        finally:
            services.sessions -= 1
            services.subjects.close(identity)
            services.connections.discard(connection)
            metrics.ACTIVE_SESSIONS.set(services.sessions)
            log.info("session %s closed (subject %s)", connection.id, identity.subject)
    except SessionClosed:
        pass
    finally:
        await connection.close(CLOSE_NORMAL)


class Connection:
    def __init__(self, websocket: WebSocket, services):
        self.ws = websocket
        self.services = services
        self.settings = services.settings
        self.id = uuid.uuid4().hex[:16]
        # The voice chosen for the session's model (None: that model's default: the default cloned voice for a Base
        # model, the default speaker for a CustomVoice one, none for VoiceDesign)
        self.voice: Optional[str] = None
        self.model_name: Optional[str] = None  # the served model chosen in `start` (None: the default)
        self.instruct: Optional[str] = None  # start.instruct
        self.language = "English"
        self.audio = AudioFormat()
        self.legacy = True  # until a `start` arrives
        self.contract_id: Optional[str] = None
        self.identity: Identity = ANONYMOUS  # who authenticated (a new `start` token may renew it)
        self.max_wait_s = 0.0  # how long this session's utterances may queue for capacity (start.maxWaitMs)
        self.text_mode = "auto"  # start.textMode
        self.word_timestamps = False  # start.wordTimestamps: marks for each utterance (when there is an aligner)
        self.conversation: Optional[tuple[str, str]] = None  # (subject, contractId) this session is part of
        # An interrupt from elsewhere ended the streamed utterance being written: the writer (an LLM) does not know
        # yet, and what it still appends to it is dropped until its `end` (True: the utterance had no requestId).
        self.interrupted_stream: "str | bool | None" = None
        self.outlet = SocketOutlet(websocket)
        self.session = Session(self.outlet, services.endpoints, self.settings, self.id)
        self.open_stream: Optional[Utterance] = None  # the streamed utterance taking `append`s
        self._handlers = {Start: self._on_start, Speak: self._on_speak, Append: self._on_append,
                          Flush: self._on_flush, End: self._on_end, Cancel: self._on_cancel, Stop: self._on_stop,
                          Played: self._on_played, Interrupt: self._on_interrupt}

    @property
    def closed(self) -> bool:
        return self.outlet.closed

    async def send_message(self, message) -> None:
        await self.outlet.send_message(message)

    async def error(self, code: ErrorCode, message: str, request_id: Optional[str] = None) -> None:
        await self.outlet.send_message(Error.of(code, message, request_id))

    async def refuse(self, code: ErrorCode, message: str, close_code: int, reason: str) -> None:
        """The error, then the socket closed with ``close_code``: a session that cannot go on (or begin)."""
        await self.error(code, message)
        await self.close(close_code, reason)

    async def drain(self, grace_s: float) -> None:
        """End this session for a shutdown: its utterances end (see Session.drain), then close 1001."""
        try:
            await self.session.drain(grace_s)
        except SessionClosed:
            pass
        await self.close(CLOSE_GOING_AWAY, "server shutting down")

    async def close(self, code: int, reason: str = "") -> None:
        await self.outlet.close(code, reason)

    # -- lifecycle ---------------------------------------------------------------------------------------

    async def authenticate(self) -> tuple[bool, Optional[str]]:
        """(authenticated, a first message already read). The token comes with the upgrade (header or
        ?token=) or in a `start` message, which must then come first; otherwise UNAUTHORIZED and close 1008."""
        authenticator = self.services.authenticator
        if not authenticator.enabled:
            return True, None
        first_message = None
        token = bearer_token({"authorization": self.ws.headers.get("authorization", "")}) or \
            self.ws.query_params.get("token")
        if token is None:
            first_message = await self._receive(min(self.settings.idle_timeout_s, AUTH_TIMEOUT_S))
            message = self._parse_or_none(first_message) if first_message is not None else None
            token = message.authToken if isinstance(message, Start) else None
        try:
            self.identity = authenticator.verify(token)
        except AuthRefused as refusal:
            reason = str(refusal) if first_message is not None or token is not None else \
                f"no auth token within {AUTH_TIMEOUT_S:g} s"
            log.info("session %s refused: %s", self.id, reason)
            await self.refuse(ErrorCode.UNAUTHORIZED, reason, CLOSE_POLICY, "unauthorized")
            return False, None
        return True, first_message

    def _check_token(self, message) -> None:
        """A `start` that carries a token renews the session's (same subject only); otherwise a `start`, `speak`
        or first `append` after the token expired is refused with UNAUTHORIZED. What is playing plays on, and the
        session stays open so the client can renew with a `start`."""
        authenticator = self.services.authenticator
        if not authenticator.enabled:
            return
        rid = getattr(message, "requestId", None)
        token = message.authToken if isinstance(message, Start) else None
        if token is not None:
            try:
                renewed = authenticator.verify(token)
            except AuthRefused as refusal:
                raise ProtocolError(ErrorCode.UNAUTHORIZED, str(refusal), rid) from None
            if renewed.subject != self.identity.subject:
                raise ProtocolError(ErrorCode.UNAUTHORIZED, "a session's token can only be renewed for the same "
                                    "subject; open a new session for another", rid)
            self.identity = renewed
        elif self.identity.expired(authenticator.settings.leeway_s):
            raise ProtocolError(ErrorCode.UNAUTHORIZED, "token expired; send `start` with a new authToken", rid)

    async def run(self, first_message: Optional[str] = None) -> None:
        try:
            ready = Ready(sessionId=self.id, voiceLoaded=self.services.voices.default_id())
            ready.capabilities["models"] = list(self.services.catalog.served())
            await self.send_message(ready)
            self.session.start()
            if first_message is not None:
                await self._handle(first_message)
            while True:
                raw = await self._receive(self.settings.idle_timeout_s)
                if raw is None:
                    if self.open_stream is not None:  # no text for a whole idle period: as if `end` came
                        self._end_stream()
                        continue
                    if self.session.busy:
                        continue  # busy: not idle
                    log.info("session %s idle for %.0f s; closing", self.id, self.settings.idle_timeout_s)
                    await self.close(CLOSE_NORMAL, "idle timeout")
                    return
                await self._handle(raw)
        except SessionClosed:
            pass
        finally:
            self.outlet.closed = True
            self._join(None)
            await self.session.close()

    async def _receive(self, timeout: float) -> Optional[str]:
        """The next text frame; None on idle timeout. Binary frames are ignored."""
        while True:
            try:
                async with asyncio.timeout(timeout):  # (not wait_for: see speech._Generated.take)
                    message = await self.ws.receive()
            except TimeoutError:
                return None
            except (WebSocketDisconnect, RuntimeError):
                raise SessionClosed() from None
            if message["type"] == "websocket.disconnect":
                raise SessionClosed()
            if message.get("text") is not None:
                return message["text"]

    @staticmethod
    def _parse_or_none(raw: str):
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
            await self._handlers[type(message)](message)
        except ProtocolError as exc:
            await self.error(exc.code, exc.message, exc.request_id)

    # -- messages ----------------------------------------------------------------------------------------

    def _known_voice(self, voice: str) -> bool:
        return self.services.voices.exists(voice)

    async def _on_start(self, message: Start) -> None:
        self._check_token(message)
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
        if message.contractId is not None:
            problem = contract_problem(message.contractId, self.settings.max_contract_id_chars)
            if problem:
                raise ProtocolError(ErrorCode.INVALID_CONFIG, problem)
        text_mode = self._checked_mode(message.textMode)  # (every check before anything changes)
        model = self._start_model(message.model)
        instruct = self._checked_instruct(model, message.instruct, message.voice)
        self.audio = AudioFormat(message.sampleRate, message.encoding, message.audioTransport)
        self.language = language
        self.legacy = False
        self.contract_id = message.contractId or self.contract_id
        self._join(self.contract_id)
        self.word_timestamps = message.wordTimestamps
        self.max_wait_s = self._max_wait_s(message.maxWaitMs)
        self.text_mode = text_mode
        if message.model is not None:
            name = model.name if model is not None else None
            if name != self.model_name:  # another model: its own default voice, unless this start names one
                self.voice = None
            self.model_name = name
        self.instruct = instruct
        if message.voice is not None:
            voice, problem = self._checked_voice(model, message.voice)
            if problem is None:
                self.voice = voice
            else:
                await self.error(ErrorCode.VOICE_NOT_FOUND,
                                 f"{problem}; keeping voice {self._voice_in_use(model)!r}")
        voice = self._voice_in_use(model)
        log.info("session %s started: %s Hz %s %s, model %s, voice %s, language %s, contract %s", self.id,
                 self.audio.sample_rate, self.audio.encoding, self.audio.transport, model.name if model else "-",
                 voice, self.language, self.contract_id)
        await self.send_message(Started(sampleRate=self.audio.sample_rate, encoding=self.audio.encoding,
                                        voice=voice, language=self.language,
                                        textMode=self._text_mode(self.text_mode, voice, model),
                                        wordTimestamps=self.word_timestamps and self.services.endpoints.aligner,
                                        model=model.name if model is not None else None, instruct=self.instruct))

    # -- the model, voice and instruct of a session's utterances ------------------------------------------------

    def _resolve_model(self, name: Optional[str], request_id: Optional[str] = None) -> Optional[ServedModel]:
        """The served model ``name`` means (None: the default); ProtocolError when it is not served (INVALID_CONFIG,
        listing what is) or not ready (MODEL_LOADING)."""
        try:
            return self.services.catalog.resolve(name)
        except ModelUnavailable as exc:
            raise ProtocolError(PROTOCOL_CODE[exc.code] if exc.loading else ErrorCode.INVALID_CONFIG, exc.message,
                                request_id) from None

    def _start_model(self, requested: Optional[str]) -> Optional[ServedModel]:
        """The model a `start` leaves the session with: the one it names (refused when not served), else the
        session's (not checked here: a `start` works before the servers are ready, as it always has)."""
        if requested is not None:
            return self._resolve_model(requested)
        try:
            return self.services.catalog.resolve(self.model_name)
        except ModelUnavailable:
            return None

    @staticmethod
    def _checked_instruct(model: Optional[ServedModel], instruct: Optional[str], voice: Optional[str],
                          request_id: Optional[str] = None) -> Optional[str]:
        """``instruct`` when ``model`` follows it (None when blank), else ProtocolError with the contract's reason
        (tts_contract.models.conditioning_error); a voice on a VoiceDesign model is refused here too."""
        if instruct is not None and len(instruct) > MAX_INSTRUCT_CHARS:
            raise ProtocolError(ErrorCode.INVALID_CONFIG, f"instruct has {len(instruct)} characters; the limit is "
                                f"{MAX_INSTRUCT_CHARS}", request_id)
        if model is not None:
            problem = conditioning_error(model, voice if model.kind == VOICE_DESIGN else None, instruct)
            if problem is not None:
                raise ProtocolError(PROTOCOL_CODE[problem.code], problem.message, request_id)
        return instruct if instruct is not None and instruct.strip() else None

    def _checked_voice(self, model: Optional[ServedModel], voice: str) -> tuple[Optional[str], Optional[str]]:
        """(the voice, None) when ``model`` has ``voice`` (a stored voice for a Base model, one of its speakers for
        a CustomVoice one), else (None, why not)."""
        if takes_voice_ids(model):
            return (voice, None) if self._known_voice(voice) else (None, f"voice {voice!r} not found")
        problem = conditioning_error(model, voice, None)
        if problem is not None:
            return None, problem.message
        speaker = model.speaker(voice)
        return (speaker.name if speaker is not None else None), None

    def _voice_in_use(self, model: Optional[ServedModel]) -> Optional[str]:
        """The session's voice, or the model's default: the default cloned voice (Base), the default speaker
        (CustomVoice), none (VoiceDesign: its voice is described)."""
        if self.voice:
            return self.voice
        if takes_voice_ids(model):
            return self.services.voices.default_id()
        return default_speaker(model)

    def _segment_chars(self, model) -> int:
        """Characters after which a continuous utterance goes on in a new stream: a VoiceDesign model designs a new
        voice for each stream, so its utterance is one stream up to the talker's limit."""
        if model is not None and model.kind == VOICE_DESIGN:
            return self.settings.max_request_chars
        return self.settings.continuous_segment_chars

    async def _on_speak(self, message: Speak) -> None:
        rid = message.requestId
        text = message.text
        if text is None or not text.strip():
            raise ProtocolError(ErrorCode.INVALID_TEXT, "'text' is missing or empty", rid)
        if len(text) > self.settings.max_text_chars:
            raise ProtocolError(ErrorCode.INVALID_TEXT, f"text has {len(text)} characters; the limit is "
                                f"{self.settings.max_text_chars}", rid)
        def feed(mode: str, model):
            if mode == "continuous":  # one stream of the whole text (a long text: one per segment)
                whole = WrittenText(segment_chars=self._segment_chars(model),
                                 hard_chars=self.settings.max_request_chars)
                whole.append(text)
                whole.close()
                return whole
            return SentenceFeed(self.settings.max_sentence_chars,
                                split_sentences(text, self.settings.max_sentence_chars))

        utterance = await self._accept(message, feed, len(text))
        utterance.text = text

    async def _on_append(self, message: Append) -> None:
        """Text for the open streamed utterance; the first append opens one (queued like a speak)."""
        rid = message.requestId
        if not message.text:
            raise ProtocolError(ErrorCode.INVALID_TEXT, "'text' is missing or empty", rid)
        if self.interrupted_stream is not None and self.open_stream is None and \
                (self.interrupted_stream is True or self.interrupted_stream == rid):
            return  # the rest of an interrupted answer: not spoken
        self.interrupted_stream = None
        utterance = self.open_stream
        if utterance is not None and utterance.ended:
            utterance = self.open_stream = None  # cancelled meanwhile
        total = (utterance.characters if utterance else 0) + len(message.text)
        if total > self.settings.max_text_chars:  # checked first: a refused first append opens nothing
            kept = " (it keeps what it has)" if utterance else ""
            raise ProtocolError(ErrorCode.INVALID_TEXT, f"the streamed utterance would have {total} characters; "
                                f"the limit is {self.settings.max_text_chars}{kept}",
                                rid or (utterance.request_id if utterance else None))
        if utterance is None:
            def feed(mode: str, model):
                if mode == "continuous":
                    return WrittenText(self.settings.text_idle_s, self._segment_chars(model),
                                    self.settings.max_request_chars)
                return SentenceFeed(self.settings.max_sentence_chars, idle_s=self.settings.text_idle_s)

            utterance = self.open_stream = await self._accept(message, feed, 0)
            utterance.streamed = True
        utterance.characters += len(message.text)
        utterance.text += message.text
        utterance.feed.append(message.text)

    async def _on_flush(self, message: Flush) -> None:
        if self.open_stream is not None:
            self.open_stream.feed.flush()

    async def _on_end(self, message: End) -> None:
        self._end_stream()

    def _end_stream(self) -> None:
        self.interrupted_stream = None
        if self.open_stream is not None:
            self.open_stream.feed.close()
            self.open_stream = None

    async def _on_cancel(self, message: Cancel) -> None:
        await self.cancel_all()

    async def _on_played(self, message: Played) -> None:
        self.session.report_played(message.requestId, message.ms)

    async def _on_interrupt(self, message: Interrupt) -> None:
        """Interrupt a conversation of this session's subject (its own, when the message names none)."""
        self._check_token(message)
        contract_id = message.contractId if message.contractId is not None else self.contract_id
        if contract_id is None:
            raise ProtocolError(ErrorCode.INVALID_MESSAGE, "interrupt needs a contractId (this session started "
                                "with none)")
        problem = contract_problem(contract_id, self.settings.max_contract_id_chars)
        if problem:
            raise ProtocolError(ErrorCode.INVALID_MESSAGE, problem)
        await self.services.conversations.interrupt(self.identity.subject, contract_id)

    def _join(self, contract_id: Optional[str]) -> None:
        """Be part of the conversation ``contract_id`` of this session's subject (None: of none)."""
        wanted = (self.identity.subject, contract_id) if contract_id is not None else None
        if wanted == self.conversation:
            return
        conversations = self.services.conversations
        if self.conversation is not None:
            conversations.leave(*self.conversation, self)
        if wanted is not None:
            conversations.join(*wanted, self)
        self.conversation = wanted

    async def interrupt(self) -> int:
        """Its conversation was interrupted: what plays and what waits end (``interrupted: true``); returns how
        many utterances ended."""
        if self.open_stream is not None and not self.open_stream.ended:
            self.interrupted_stream = self.open_stream.request_id or True
        self.open_stream = None
        try:
            return await self.session.interrupt()
        except SessionClosed:
            return 0

    async def _on_stop(self, message: Stop) -> None:
        await self.cancel_all()
        await self.send_message(Stopped(reason=message.reason))
        await self.close(CLOSE_NORMAL, "stopped")
        raise SessionClosed()

    async def _accept(self, message, make_feed, characters: int) -> Utterance:
        """Checks shared by speak and a first append (priority, text mode, language, voice, readiness, queue), then
        the utterance is queued with the feed ``make_feed(text mode)`` gives."""
        self._check_token(message)
        rid = message.requestId
        try:
            mode = self._checked_mode(message.textMode) if message.textMode is not None else self.text_mode
        except ProtocolError as exc:
            raise ProtocolError(exc.code, exc.message, rid) from None
        if message.priority not in ("normal", "high"):
            raise ProtocolError(ErrorCode.INVALID_MESSAGE,
                                f"priority must be 'normal' or 'high', not {message.priority!r}", rid)
        language = self.language
        if message.language is not None:
            try:
                language = normalise_language(message.language)
            except ProtocolError as exc:
                raise ProtocolError(exc.code, exc.message, rid) from None
        if not self.services.endpoints.ready:
            code, reason = self.services.endpoints.unusable_reason()
            raise ProtocolError(PROTOCOL_CODE[code], reason, rid)
        model = self._resolve_model(self.model_name, rid)
        voice = self._voice_in_use(model)
        if message.voice is not None and message.voice != voice:
            if model is not None and model.kind == VOICE_DESIGN:
                self._checked_instruct(model, None, message.voice, rid)  # refused: its voice is described
            chosen, problem = self._checked_voice(model, message.voice)
            if problem is None:
                voice = chosen
            else:
                await self.error(ErrorCode.VOICE_NOT_FOUND, f"{problem}; using voice {voice!r}", rid)
        if message.priority == "high":
            await self.cancel_all()
        elif self.session.accepted > self.settings.max_queued_utterances:  # waiting, besides the one playing
            raise ProtocolError(ErrorCode.RATE_LIMITED, f"too many queued utterances "
                                f"(limit {self.settings.max_queued_utterances})", rid)
        max_wait_s = self.max_wait_s if message.maxWaitMs is None else self._max_wait_s(message.maxWaitMs)
        utterance = Utterance(feed=make_feed(self._text_mode(mode, voice, model), model), characters=characters, voice=voice,
                              language=language, audio=AudioFormat() if self.legacy else self.audio, legacy=self.legacy, request_id=rid,
                              max_wait_s=max_wait_s, marks=self.word_timestamps and not self.legacy,
                              model=model.name if model is not None else None, instruct=self.instruct)
        self.session.enqueue(utterance)
        return utterance

    @staticmethod
    def _checked_mode(mode: str) -> str:
        if mode not in TEXT_MODES:
            raise ProtocolError(ErrorCode.INVALID_CONFIG, f"unknown textMode {mode!r}; known: {', '.join(TEXT_MODES)}")
        return mode

    def _text_mode(self, mode: str, voice: Optional[str], model: Optional[ServedModel] = None) -> str:
        """The mode ``auto`` stands for with this voice: continuous where it gives first audio no later than
        sentences do (x-vector voices, named speakers and described voices start with the first word), sentences
        for ICL voices (their stream can start only once the whole text is there)."""
        if mode != "auto":
            return mode
        if not takes_voice_ids(model):
            return "continuous"
        try:
            voice_id = voice or self.services.voices.default_id()
            return "continuous" if voice_id and self.services.voices.directory.info(voice_id).x_vector_only \
                else "sentences"
        except Exception:  # an unreadable voice folder: the mode that needs nothing of it
            return "sentences"

    def _max_wait_s(self, max_wait_ms: int) -> float:
        """A client's wait for capacity, at most GATEWAY_QUEUE_TIMEOUT_S."""
        return min(max_wait_ms / 1000, self.settings.queue_timeout_s)

    async def cancel_all(self) -> None:
        """Cancel what plays and what waits (buffered incremental text included)."""
        self.open_stream = None
        await self.session.cancel_all()
