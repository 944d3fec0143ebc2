"""Where an utterance's streams go. The gateway routes; the engines decide: each stream goes to the usable endpoint
serving the utterance's model whose engine for that model reported the most headroom, to that model's `tts` ensemble
(its commands to that model's talker); an utterance's later streams stay on the endpoint of its first (while it is
usable), and whatever an engine answers stands: its refusal (code and retry hint) is the client's answer.

Two things move a stream before it has produced any audio: its endpoint failing (down, unreachable), and, for a
new utterance, its engine refusing it for load while another endpoint may have room; when every endpoint refuses,
the refusal with the soonest retry is the answer. A continuation is never refused for load (its engine queues it
by its listener's deadline), so it moves only when its endpoint fails.

Waiting for capacity happens in one place, the engine's line: a client that can wait (``maxWaitMs``) sends its
wait as the request's ``max_wait_ms`` and the engine holds it in line, earliest deadline first, for up to that
long. The gateway keeps no queue and no estimate of its own.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncIterator, Callable, Optional

import numpy as np

from tts_contract.deadlines import FIRST_AUDIO_BUDGET_MS
from tts_contract.errors import EngineCode

from . import metrics
from .endpoints import Endpoint, Endpoints
from .engine_stream import SynthesisFailed, stream_audio

log = logging.getLogger("gateway.routing")
PROGRESS_CHECK_S = 0.1  # how often a stream's progress deadline is checked
FIRST_AUDIO_GRACE_S = 0.25  # a stream's first audio may be this late past its budget before it moves


class Route:
    """One utterance's way to the engines serving its model (see the module). ``model``: a served model's name
    (None: the deployment's default, Triton's `tts`)."""

    def __init__(self, endpoints: Endpoints, model: Optional[str] = None, progress_grace_s: float = 0.0):
        self.endpoints = endpoints
        self.model = model
        # How long past its listener's lead a stream may go without audio before its endpoint counts as failed
        # (GATEWAY_PROGRESS_DEADLINE_MS; 0: no such deadline, only the connection's own failure counts).
        self.progress_grace_s = progress_grace_s
        self.endpoint: Optional[Endpoint] = None  # where its last stream ran

    async def stream(self, text: str, voice: Optional[str], language: Optional[str], parameters: dict,
                     continuation: bool = False, first_audio_by: Optional[float] = None,
                     written=None, instruct: Optional[str] = None,
                     lead: Optional[Callable[[], Optional[float]]] = None) -> AsyncIterator[np.ndarray]:
        """Yield one stream's float32 24 kHz chunks. ``first_audio_by`` (monotonic time) becomes the request's
        first-audio budget when it is sent; ``written``: text still being written (see ``stream_audio``);
        ``instruct``: for the models that take one; ``lead()``: seconds of audio its listener still has (None:
        none is expected now, the text is being waited for). A stream with no audio past its first-audio budget,
        or past its listener's lead, plus the progress grace, has a failing endpoint: it moves before any audio
        and ends UNAVAILABLE after. Closing the iterator cancels the request."""
        tried: set = set()
        refusal: Optional[SynthesisFailed] = None
        budget_s = None if first_audio_by is None else first_audio_by - time.monotonic()
        while True:
            endpoint = self._next(tried)
            if endpoint is None:
                if refusal is not None:
                    self.endpoints.refused()
                    raise refusal
                code, reason = self.endpoints.unusable_reason()
                if self.model is not None and code == EngineCode.MODEL_LOADING:
                    reason = f"no Triton endpoint serving the model '{self.model}' is ready; try again shortly"
                raise SynthesisFailed(code, reason, transport=True)
            if first_audio_by is not None:
                parameters[FIRST_AUDIO_BUDGET_MS] = max(1, int(1000 * (first_audio_by - time.monotonic())))
            produced, opened = False, time.monotonic()
            tts_model, talker = endpoint.triton_models(self.model)
            self.endpoints.stream_opened(endpoint)
            endpoint.sent(talker)
            metrics.MODEL_STREAMS.labels(self._label(endpoint)).inc()
            self.endpoint = endpoint
            audio = stream_audio(endpoint, text, voice, language, parameters,
                                 lambda call, at=endpoint: self.endpoints.spawn(at, call), written,
                                 tts_model=tts_model, talker=talker, instruct=instruct)
            try:
                progress = _Progress(self.progress_grace_s, None if produced else first_audio_by, lead)
                while True:
                    chunk = await progress.next(audio, endpoint)
                    if chunk is None:
                        return
                    produced = True
                    progress.first_audio_by = None
                    yield chunk
            except SynthesisFailed as exc:
                refused = exc.code == EngineCode.OVERLOADED and not continuation
                if produced or not (exc.transport or refused):
                    raise
                if refused and (refusal is None or (exc.retry_after_ms or 0) < (refusal.retry_after_ms or 0)):
                    refusal = exc  # its engine cannot start it in time: another one may
                if exc.transport:
                    log.warning("Triton at %s failed before any audio; trying the next endpoint", endpoint.url)
                    if budget_s is not None:  # the listener has heard nothing: the next one gets the whole budget
                        first_audio_by = time.monotonic() + budget_s
            finally:
                await audio.aclose()
                self.endpoints.stream_closed(endpoint, time.monotonic() - opened)
            tried.add(endpoint)

    def _next(self, tried: set) -> Optional[Endpoint]:
        """The utterance's endpoint while it is usable (and serves its model), else the endpoint serving its model
        with the most reported headroom."""
        if self.endpoint is not None and self.endpoint.usable and self.endpoint not in tried and \
                self.endpoint.serves(self.model):
            return self.endpoint
        return self.endpoints.choose(exclude=tried, model=self.model)

    def _label(self, endpoint: Endpoint) -> str:
        """The model's name for the per-model metrics (the default model's as its talker describes it)."""
        if self.model is not None:
            return self.model
        default = endpoint.default_model()
        return default.name if default is not None else "default"


class _Progress:
    """The progress deadline of one stream: its next chunk is due by its first-audio budget (before any audio) or
    its listener's lead, plus a grace; while no audio is expected (its text is awaited) nothing is due. Checked
    every PROGRESS_CHECK_S, so that a wait for text that begins meanwhile re-arms it."""

    def __init__(self, grace_s: float, first_audio_by: Optional[float], lead):
        self.grace_s, self.first_audio_by, self.lead = grace_s, first_audio_by, lead

    def due(self) -> Optional[float]:
        if self.first_audio_by is not None:  # (the engine itself refuses what it cannot start in time: a little
            return self.first_audio_by + min(self.grace_s, FIRST_AUDIO_GRACE_S)  # slack, then it moves)
        lead = self.lead() if self.lead is not None else None
        return None if lead is None else time.monotonic() + lead + self.grace_s

    async def next(self, audio, endpoint: Endpoint) -> Optional[np.ndarray]:
        """The stream's next chunk (None at its end); SynthesisFailed(UNAVAILABLE, transport) when it is overdue."""
        if self.grace_s <= 0:
            return await anext(audio, None)
        waiting = asyncio.ensure_future(anext(audio, None))
        due = self.due()
        try:
            while True:
                done, _ = await asyncio.wait({waiting}, timeout=PROGRESS_CHECK_S)
                if done:
                    return waiting.result()
                now = time.monotonic()
                if self.lead is not None and self.first_audio_by is None and self.lead() is None:
                    due = None  # its text is awaited: the gap is the writer's
                elif due is None:
                    due = self.due()
                elif now > due:
                    endpoint.failed("a stream made no progress in time")
                    raise SynthesisFailed(EngineCode.UNAVAILABLE, "the speech server stopped making progress; "
                                          "try again", transport=True)
        finally:
            if not waiting.done():
                waiting.cancel()
                await asyncio.gather(waiting, return_exceptions=True)
