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

import logging
import time
from typing import AsyncIterator, Optional

import numpy as np

from tts_contract.deadlines import FIRST_AUDIO_BUDGET_MS
from tts_contract.errors import EngineCode

from . import metrics
from .endpoints import Endpoint, Endpoints
from .engine_stream import SynthesisFailed, stream_audio

log = logging.getLogger("gateway.routing")


class Route:
    """One utterance's way to the engines serving its model (see the module). ``model``: a served model's name
    (None: the deployment's default, Triton's `tts`)."""

    def __init__(self, endpoints: Endpoints, model: Optional[str] = None):
        self.endpoints = endpoints
        self.model = model
        self.endpoint: Optional[Endpoint] = None  # where its last stream ran

    async def stream(self, text: str, voice: Optional[str], language: Optional[str], parameters: dict,
                     continuation: bool = False, first_audio_by: Optional[float] = None,
                     written=None, instruct: Optional[str] = None) -> AsyncIterator[np.ndarray]:
        """Yield one stream's float32 24 kHz chunks. ``first_audio_by`` (monotonic time) becomes the request's
        first-audio budget when it is sent; ``written``: text still being written (see ``stream_audio``);
        ``instruct``: for the models that take one. Closing the iterator cancels the request."""
        tried: set = set()
        refusal: Optional[SynthesisFailed] = None
        while True:
            endpoint = self._next(tried)
            if endpoint is None:
                if refusal is not None:
                    self.endpoints.refused()
                    raise refusal
                raise SynthesisFailed(EngineCode.MODEL_LOADING, "no Triton endpoint is ready" if self.model is None
                                      else f"no Triton endpoint serving the model '{self.model}' is ready",
                                      transport=True)
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
                async for chunk in audio:
                    produced = True
                    yield chunk
                return
            except SynthesisFailed as exc:
                refused = exc.code == EngineCode.OVERLOADED and not continuation
                if produced or not (exc.transport or refused):
                    raise
                if refused and (refusal is None or (exc.retry_after_ms or 0) < (refusal.retry_after_ms or 0)):
                    refusal = exc  # its engine cannot start it in time: another one may
                if exc.transport:
                    log.warning("Triton at %s failed before any audio; trying the next endpoint", endpoint.url)
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
