"""Streaming gRPC to Triton (tritonclient.grpc.aio): one channel per endpoint shared by all sessions,
readiness tracking, and routing across several Triton endpoints."""
from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import json
import logging
import secrets
import time
from collections import deque
from typing import AsyncIterator, Optional

import numpy as np
import tritonclient.grpc.aio as grpcclient
from tritonclient.grpc import InferInput, InferRequestedOutput

from tts_contract import tensors as names
from tts_contract.delivery import FIRST_AUDIO_BUDGET_MS, retry_after_ms
from tts_contract.errors import EngineCode, parse_wire
from tts_contract.limits import DEFAULT_ACTIVE_STREAMS

from . import metrics

log = logging.getLogger("gateway.triton")
REQUIRED_MODELS = (names.TTS, names.VOICE_ENCODER)
DEMAND_WINDOW_S = 30.0  # refused requests count as demand this long (their clients come back)
# gRPC's default reconnect backoff grows to minutes (7.7 s was measured after a Triton restart); a restarted
# Triton should be seen within half a second.
CHANNEL_ARGS = [("grpc.max_send_message_length", 2**31 - 1), ("grpc.max_receive_message_length", 2**31 - 1),
                ("grpc.initial_reconnect_backoff_ms", 200), ("grpc.min_reconnect_backoff_ms", 200),
                ("grpc.max_reconnect_backoff_ms", 500)]


class SynthesisFailed(Exception):
    """Triton refused or failed a request; ``code`` is the engine code from the error message.

    ``transport`` is true when the endpoint itself failed (down, unreachable), not the request."""

    def __init__(self, code: EngineCode, message: str, transport: bool = False,
                 retry_after_ms: Optional[int] = None):
        super().__init__(message)
        self.code, self.message, self.transport = EngineCode(code), message, transport
        self.retry_after_ms = retry_after_ms


def _engine_error(error) -> SynthesisFailed:
    """A Triton error as the engine's code and message (with its retry hint, for a refusal); text that is not
    the engine's own stays in the log."""
    code, message = parse_wire(str(error))
    if code == EngineCode.SYNTHESIS_ERROR:
        log.warning("Triton error: %s", error)
        message = "synthesis failed inside the speech server"
    return SynthesisFailed(code, message, retry_after_ms=retry_after_ms(message))


def _string(name: str, value: str) -> InferInput:
    tensor = InferInput(name, [1], "BYTES")
    tensor.set_data_from_numpy(np.array([value.encode("utf-8")], dtype=np.object_))
    return tensor


SPEAK_ID = "speak"  # the synthesis request's id on its gRPC stream (appends have their own)


def _scalar(name: str, value, wire_dtype: str) -> InferInput:
    tensor = InferInput(name, [1], wire_dtype)
    tensor.set_data_from_numpy(np.array([value], dtype={"UINT64": np.uint64, "BOOL": bool}[wire_dtype]))
    return tensor


def _append_request(key: int, piece: str, flush: bool = False, end: bool = False) -> dict:
    """A talker control request continuing the open text ``key``."""
    inputs = [_string(names.TEXT, piece), _scalar(names.APPEND_TO, key, "UINT64")]
    if flush:
        inputs.append(_scalar(names.TEXT_FLUSH, True, "BOOL"))
    if end:
        inputs.append(_scalar(names.TEXT_END, True, "BOOL"))
    return {"model_name": names.TALKER, "inputs": inputs, "request_id": f"append-{secrets.token_hex(4)}"}


class TritonEndpoint:
    """One Triton server: its gRPC channel, readiness, talker capacity, and the streams open on it."""

    def __init__(self, url: str):
        self.url = url
        self.client = grpcclient.InferenceServerClient(url, channel_args=CHANNEL_ARGS)
        self.ready = False
        self.in_flight = 0  # streams open on this endpoint now (counted by TritonPool)
        self.capacity = DEFAULT_ACTIVE_STREAMS  # the talker's max_active_streams, read when it is ready
        self.status: dict = {}  # the talker's last answer to a status query (real-time capacity, headroom)
        self.started: dict[int, float] = {}  # when each seat on this endpoint took its slot
        self.seats: dict[int, "Seat"] = {}  # the utterances holding them
        self.draining = False  # gone from discovery: no new streams; removed once its last one ends
        self.encoding = 0  # voice encodes running here (a draining endpoint waits for them too)
        self.closed = False
        self._poller: Optional[asyncio.Task] = None

    @property
    def usable(self) -> bool:
        """Ready and still in discovery: it may take new streams (subject to its capacity)."""
        return self.ready and not self.draining

    async def check_ready(self) -> bool:
        try:
            ready = await asyncio.wait_for(self.client.is_server_ready(), 2.0) and all(
                [await asyncio.wait_for(self.client.is_model_ready(m), 2.0) for m in REQUIRED_MODELS])
        except Exception:  # any gRPC failure means "not ready"
            ready = False
        if ready and not self.ready:
            self.capacity = await self._talker_capacity()
        if ready:
            await self._refresh_status()
        if ready != self.ready:
            log.warning("Triton at %s is %s%s", self.url, "ready" if ready else "NOT ready",
                        f" ({self.capacity} streams at once)" if ready else "")
        self.ready = ready
        return ready

    async def _talker_capacity(self) -> int:
        """How many streams the talker advances at once (its max_active_streams parameter)."""
        try:
            config = await asyncio.wait_for(self.client.get_model_config(names.TALKER, as_json=True), 2.0)
            return int(config["config"]["parameters"]["max_active_streams"]["string_value"])
        except Exception as exc:  # an older repository, or no access to the talker: a safe default
            log.warning("cannot read the talker's capacity at %s (%s); assuming %d", self.url, exc,
                        DEFAULT_ACTIVE_STREAMS)
            return DEFAULT_ACTIVE_STREAMS

    async def _refresh_status(self) -> None:
        """Ask the talker for its capacity now (a status control request); kept as ``status``."""
        flag = InferInput(names.STATUS_QUERY, [1], "BOOL")
        flag.set_data_from_numpy(np.array([True]))

        async def requests():
            yield {"model_name": names.TALKER, "inputs": [flag], "outputs": [InferRequestedOutput(names.STATUS)]}

        try:
            async with asyncio.timeout(2.0):
                async for result, error in self.client.stream_infer(requests()):
                    if error is not None:
                        raise error
                    status = result.as_numpy(names.STATUS)
                    if status is not None:
                        self.status = {**json.loads(status[0]), "at": time.monotonic()}
                    params = result.get_response().parameters
                    if "triton_final_response" in params and params["triton_final_response"].bool_param:
                        break
        except Exception as exc:  # an older talker, or a busy one: readiness does not depend on it
            log.debug("no status from the talker at %s: %s", self.url, exc)
            return
        if self.closed:  # removed from the pool meanwhile: its series are gone and stay gone
            return
        metrics.ENDPOINT_HEADROOM.labels(self.url).set(self.status.get("headroom", 0))
        metrics.ENDPOINT_REALTIME.labels(self.url).set(self.status.get("realtime_batch", 0))

    def start_polling(self, interval: float, on_change=None) -> None:
        """Check readiness every ``interval`` seconds, and four times a second while not ready."""
        async def poll():
            while True:
                was = self.ready
                await self.check_ready()
                if on_change is not None and self.ready != was:
                    on_change()
                await asyncio.sleep(interval if self.ready else min(interval, 0.25))

        self._poller = asyncio.create_task(poll())

    def stop_polling(self) -> None:
        self.closed = True
        if self._poller:
            self._poller.cancel()

    async def close(self) -> None:
        self.stop_polling()
        await self.client.close()

    async def synthesize(self, text: str, voice: Optional[str], language: Optional[str],
                         parameters: Optional[dict] = None, written=None) -> AsyncIterator[np.ndarray]:
        """Yield float32 24 kHz chunks as Triton streams them. Closing the iterator cancels the request.
        ``written``: a ``TextSegment`` still being written; the request then opens with its text so far
        (``text_key``) and sends the rest, its flushes and its end as ``append_to`` requests on the same stream."""
        key = secrets.randbits(63) if written is not None else None
        if written is not None:
            text = written.text  # what it opens with; the rest follows as appends
        inputs = [_string(names.TEXT, text)]
        if key is not None:
            inputs.append(_scalar(names.TEXT_KEY, key, "UINT64"))
        if voice:
            inputs.append(_string(names.VOICE, voice))
        if language:
            inputs.append(_string(names.LANGUAGE, language))

        async def requests():
            yield {"model_name": names.TTS, "inputs": inputs, "parameters": parameters or {}, "request_id": SPEAK_ID,
                   "outputs": [InferRequestedOutput(names.AUDIO)]}
            if written is None:
                return
            async for piece, flush in written.pieces(len(text)):
                yield _append_request(key, piece, flush=flush)
            yield _append_request(key, "", end=True)

        responses = self.client.stream_infer(requests())
        finished = False
        try:
            async for result, error in responses:
                if error is not None:
                    finished = True
                    raise _engine_error(error)
                if result.get_response().id != SPEAK_ID:  # an append's acknowledgement
                    continue
                audio = result.as_numpy(names.AUDIO)
                params = result.get_response().parameters
                last = "triton_final_response" in params and params["triton_final_response"].bool_param
                if audio is not None and audio.size:
                    yield audio
                if last:
                    finished = True
                    return
            finished = True
        except SynthesisFailed:
            raise
        except Exception as exc:  # connection loss, Triton crash: the details go to the log, not to clients
            finished = True
            self.ready = False
            log.warning("stream to Triton at %s failed: %s", self.url, exc)
            raise SynthesisFailed(EngineCode.SYNTHESIS_ERROR, "the speech server stopped responding; try again",
                                  transport=True) from None
        finally:
            if not finished:
                responses.cancel()  # the consumer stopped early: cancel the Triton request itself

    async def encode_voice(self, audio: np.ndarray, sample_rate: int, ref_text: Optional[str]) -> bytes:
        """Run voice_encoder; returns the serialised prompt (safetensors bytes)."""
        tensor = InferInput(names.AUDIO, [int(audio.size)], "FP32")
        tensor.set_data_from_numpy(np.ascontiguousarray(audio, dtype=np.float32))
        rate = InferInput(names.SAMPLE_RATE, [1], "INT32")
        rate.set_data_from_numpy(np.array([sample_rate], dtype=np.int32))
        inputs = [tensor, rate] + ([_string(names.REF_TEXT, ref_text)] if ref_text else [])
        try:
            result = await asyncio.wait_for(self.client.infer(names.VOICE_ENCODER, inputs), 120)
        except Exception as exc:
            failure = _engine_error(exc)
            failure.transport = failure.code == EngineCode.SYNTHESIS_ERROR
            raise failure from None
        return result.as_numpy(names.PROMPT)[0]


class TritonPool:
    """Several Triton endpoints behind one interface, with admission by deadline.

    An utterance takes a slot (a ``Seat``) on a ready endpoint with free capacity (the talker's
    max_active_streams: its KV memory), the least loaded for its real-time capacity first, and keeps it until its
    last sentence is generated, so its later sentences never wait for capacity. The talker itself decides
    whether a stream can start in time and refuses at once when it cannot (then the next endpoint is tried).
    When every slot is taken, or a playing utterance there is about to run dry, a new utterance is refused at
    once with RATE_LIMITED and an estimate of when a slot frees, unless its client said it can wait
    (``max_wait_s``). Waiting requests are served earliest deadline first; a seat moving to
    another endpoint after a failure (a playing utterance: its deadline is its listener's buffer) is never
    refused."""

    def __init__(self, urls: list[str], queue_timeout_s: float = 10.0, streams_per_endpoint: int = 0,
                 first_audio_budget_s: float = 1.0, lead_floor_s: float = 0.075):
        self.endpoints = [TritonEndpoint(url) for url in urls]  # more join and leave through set_endpoints
        self.queue_timeout_s = queue_timeout_s  # the longest any request may wait for a slot
        self.streams_per_endpoint = streams_per_endpoint  # 0: each endpoint's own talker capacity
        self.first_audio_budget_s = first_audio_budget_s
        self.lead_floor_s = lead_floor_s  # (until a talker says its margin) less audio ahead is falling behind
        self._line: list = []  # waiting requests: a heap of (deadline, sequence, future)
        self._sequence = itertools.count()
        self._next = 0
        self._mean_request_s = 2.0  # a running mean of how long an utterance holds its slot
        self._refused: deque = deque()  # when recent requests were refused (they come back about together)
        self._refusals: deque = deque()  # refusals within DEMAND_WINDOW_S (part of the demand autoscaling sees)
        self._poll_interval: Optional[float] = None  # set once polling starts; endpoints that join poll too
        self._closing: set = set()  # channels of removed endpoints being closed

    @property
    def url(self) -> str:
        return ",".join(b.url for b in self.endpoints)

    @property
    def ready(self) -> bool:
        return any(b.usable for b in self.endpoints)

    @property
    def waiting(self) -> int:
        return len(self._line)

    def status(self) -> dict[str, bool]:
        return {b.url: b.ready for b in self.endpoints}

    def headroom(self) -> dict[str, dict]:
        """Each endpoint's capacity as its talker last reported it, and the streams this gateway has there."""
        return {b.url: {"ready": b.ready, "draining": b.draining, "slots": self.capacity(b), "in_flight": b.in_flight,
                        **{k: v for k, v in b.status.items() if k in ("realtime_batch", "headroom", "step_ms")}}
                for b in self.endpoints}

    def _forget_old_refusals(self) -> None:
        now = time.monotonic()
        while self._refusals and now - self._refusals[0] > DEMAND_WINDOW_S:
            self._refusals.popleft()

    def demand(self) -> tuple[float, int]:
        """(streams this gateway serves or is asked for: in flight, waiting, and those refused within the last
        DEMAND_WINDOW_S would have kept busy (Little's law: refusals per second × the mean hold, so a client
        retrying often is not counted once per retry); the real-time capacity of its ready endpoints: what each
        talker measured it can step together ahead of real time, at most its slots)."""
        self._forget_old_refusals()
        refused = len(self._refusals) * min(1.0, self._mean_request_s / DEMAND_WINDOW_S)
        wanted = sum(b.in_flight for b in self.endpoints) + self.waiting + refused
        capacity = sum(self.realtime_capacity(b) for b in self.endpoints if b.usable)
        return wanted, capacity

    def publish_metrics(self) -> None:
        """Readiness per endpoint, endpoints by state, and the autoscaling signal (demand over capacity)."""
        states = {"ready": 0, "not_ready": 0, "draining": 0}
        for b in self.endpoints:
            metrics.TRITON_READY.labels(b.url).set(1 if b.usable else 0)
            states["draining" if b.draining else "ready" if b.ready else "not_ready"] += 1
        for state, count in states.items():
            metrics.ENDPOINTS.labels(state).set(count)
        wanted, capacity = self.demand()
        metrics.DEMAND.set(wanted)
        metrics.UTILIZATION.set(wanted / max(capacity, 1) if wanted else 0.0)

    # -- endpoints joining and leaving (discovery) ----------------------------------------------------------

    def set_endpoints(self, urls: list[str]) -> None:
        """Make the pool's endpoints ``urls``: new ones join (used once ready), missing ones drain (no new streams;
        removed when their last stream ends), and a draining one that comes back is used again."""
        wanted = list(dict.fromkeys(urls))
        known = {b.url: b for b in self.endpoints}
        for url in wanted:
            endpoint = known.get(url)
            if endpoint is None:
                endpoint = TritonEndpoint(url)
                self.endpoints.append(endpoint)
                if self._poll_interval is not None:
                    endpoint.start_polling(self._poll_interval, on_change=self._wake)
                log.warning("Triton endpoint %s joined (%d known)", url, len(self.endpoints))
            elif endpoint.draining:
                endpoint.draining = False
                log.warning("Triton endpoint %s is back: no longer draining", url)
        for endpoint in list(self.endpoints):
            if endpoint.url not in wanted and not endpoint.draining:
                endpoint.draining = True
                log.warning("Triton endpoint %s left discovery: draining its %d streams", endpoint.url,
                            endpoint.in_flight)
                self._forget_if_idle(endpoint)
        self._wake()

    def _forget_if_idle(self, endpoint: TritonEndpoint) -> None:
        if endpoint.draining and endpoint.in_flight == 0 and endpoint.encoding == 0 and endpoint in self.endpoints:
            self.endpoints.remove(endpoint)
            endpoint.stop_polling()  # before its series go: a status answer in flight must not bring them back
            for gauge in (metrics.TRITON_READY, metrics.ENDPOINT_HEADROOM, metrics.ENDPOINT_REALTIME,
                          metrics.ENDPOINT_BEHIND):
                with contextlib.suppress(KeyError):
                    gauge.remove(endpoint.url)
            closing = asyncio.get_running_loop().create_task(endpoint.close())
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)
            log.warning("Triton endpoint %s drained and removed", endpoint.url)

    async def check_ready(self) -> bool:
        await asyncio.gather(*(b.check_ready() for b in self.endpoints))
        self._wake()
        return self.ready

    def start_polling(self, interval: float) -> None:
        self._poll_interval = interval
        for endpoint in self.endpoints:
            endpoint.start_polling(interval, on_change=self._wake)

    async def close(self) -> None:
        await asyncio.gather(*(b.close() for b in self.endpoints), return_exceptions=True)

    # -- admission ----------------------------------------------------------------------------------------

    def capacity(self, endpoint: TritonEndpoint) -> int:
        return self.streams_per_endpoint or endpoint.capacity

    def realtime_capacity(self, endpoint: TritonEndpoint) -> int:
        """Streams the endpoint's talker measured it can step together ahead of real time, at most its slots."""
        return min(self.capacity(endpoint), endpoint.status.get("realtime_batch") or self.capacity(endpoint))

    def _free_endpoint(self, exclude=()) -> Optional[TritonEndpoint]:
        """A ready endpoint with a free slot: the least loaded for its real-time capacity first (this gateway's
        streams there, known now, over what its talker measured it can carry; a pod that just joined has none),
        round-robin among equals."""
        if not self.endpoints:
            return None
        self._next = (self._next + 1) % len(self.endpoints)
        rotated = self.endpoints[self._next:] + self.endpoints[:self._next]
        free = [b for b in rotated if b.usable and b not in exclude and b.in_flight < self.capacity(b)
                and not self.behind(b)]
        return min(free, key=lambda b: b.in_flight / max(1, self.realtime_capacity(b)), default=None)

    def behind(self, endpoint: TritonEndpoint) -> int:
        """Utterances on this endpoint being generated whose listeners are about to run dry: the whole path
        (talker, decoder, this gateway) gives less than it should, so no new utterance starts there for now."""
        now = time.monotonic()
        floor = endpoint.status.get("margin_ms", 2000 * self.lead_floor_s) / 2000  # half the talker's margin
        count = sum(1 for seat in endpoint.seats.values() if seat.generating and seat.listener is not None
                    and seat.listener.started is not None and seat.listener.lead(now) < floor)
        metrics.ENDPOINT_BEHIND.labels(endpoint.url).set(count)
        return count

    def _take(self, endpoint: TritonEndpoint, token: int) -> TritonEndpoint:
        endpoint.in_flight += 1
        endpoint.started[token] = time.monotonic()
        return endpoint

    def _wake(self) -> None:
        while self._line:
            endpoint = self._free_endpoint()
            if endpoint is None:
                break
            _, token, waiter = heapq.heappop(self._line)
            if not waiter.done():
                waiter.set_result(self._take(endpoint, token))
        metrics.QUEUED_REQUESTS.set(self.waiting)

    def _retry_after_ms(self, exclude=()) -> int:
        """When a request refused now should try again: when the slot it would get frees. Each open seat should
        end a mean hold after it was taken (or soon, if it is past that); the requests waiting and those refused
        within the last mean hold (they will be back about then) go first, so each refusal names a later slot."""
        now = time.monotonic()
        hold = self._mean_request_s
        ends = sorted(max(hold - (now - started), hold / 4) for b in self.endpoints if b.usable and b not in exclude
                      for started in b.started.values())
        while self._refused and now - self._refused[0] > hold:
            self._refused.popleft()
        place = self.waiting + len(self._refused)
        self._refused.append(now)
        self._refusals.append(now)
        self._forget_old_refusals()
        if not ends:
            return 100
        rounds, index = divmod(place, len(ends))  # past every open seat: each takes another hold
        return int(min(30_000, max(100, 1000 * (ends[index] + rounds * hold))))

    async def _acquire(self, exclude=(), continuing: bool = False, lead_s: float = 0.0,
                       max_wait_s: float = 0.0) -> tuple[TritonEndpoint, int]:
        """A slot on a ready endpoint, and the token that releases it (see the class)."""
        if not any(b.usable and b not in exclude for b in self.endpoints):
            raise SynthesisFailed(EngineCode.MODEL_LOADING, "no Triton endpoint is ready", transport=True)
        token = next(self._sequence)
        endpoint = None if self._line else self._free_endpoint(exclude)
        if endpoint is not None:
            return self._take(endpoint, token), token
        if continuing:
            patience, deadline = None, lead_s
        else:  # a listener wants audio now or an honest "busy": only a client that said it can wait waits
            patience = min(self.queue_timeout_s, max_wait_s)
            if patience <= 0:
                raise SynthesisFailed(EngineCode.OVERLOADED, "the speech servers are at their real-time capacity",
                                      retry_after_ms=self._retry_after_ms(exclude))
            deadline = patience
        waiter = asyncio.get_running_loop().create_future()
        heapq.heappush(self._line, (time.monotonic() + deadline, token, waiter))
        metrics.QUEUED_REQUESTS.set(self.waiting)
        started = time.monotonic()
        try:  # asyncio.timeout, not wait_for: 3.11's wait_for returns a just-granted slot to a cancelled waiter
            async with asyncio.timeout(patience):
                endpoint = await waiter
        except TimeoutError:
            raise SynthesisFailed(EngineCode.OVERLOADED, f"no synthesis slot freed within {patience:g} s",
                                  retry_after_ms=self._retry_after_ms(exclude)) from None
        finally:
            if not waiter.done():
                waiter.cancel()
            elif endpoint is None and not waiter.cancelled():  # granted just as we gave up: hand it on
                self._release(waiter.result(), token)
            self._line = [entry for entry in self._line if entry[2] is not waiter]
            heapq.heapify(self._line)
            metrics.QUEUED_REQUESTS.set(self.waiting)
            metrics.QUEUE_WAIT.observe(time.monotonic() - started)
        return endpoint, token

    def _release(self, endpoint: TritonEndpoint, token: int) -> None:
        endpoint.in_flight -= 1
        endpoint.started.pop(token, None)
        endpoint.seats.pop(token, None)
        self._forget_if_idle(endpoint)
        self._wake()

    # -- requests -----------------------------------------------------------------------------------------

    async def seat(self, max_wait_s: float = 0.0) -> "Seat":
        """A slot for a new utterance, held until its last sentence is generated (see the class)."""
        endpoint, token = await self._acquire(max_wait_s=max_wait_s)
        return Seat(self, endpoint, token)

    async def encode_voice(self, audio: np.ndarray, sample_rate: int, ref_text: Optional[str]) -> bytes:
        last_error: Optional[SynthesisFailed] = None
        usable = [b for b in self.endpoints if b.usable]
        for endpoint in sorted(usable, key=lambda b: b.in_flight) or list(self.endpoints):
            endpoint.encoding += 1  # keeps a leaving endpoint's channel open until the encode ends
            try:
                return await endpoint.encode_voice(audio, sample_rate, ref_text)
            except SynthesisFailed as exc:
                if not exc.transport:
                    raise
                last_error = exc
            finally:
                endpoint.encoding -= 1
                self._forget_if_idle(endpoint)
        raise last_error or SynthesisFailed(EngineCode.MODEL_LOADING, "no Triton endpoint is available", transport=True)


class Seat:
    """One utterance's slot on an endpoint, from its first sentence to its last: the sentences after the first
    never wait for capacity. A sentence whose endpoint fails (or, for the first one, whose talker refuses it)
    before any audio moves the seat to another ready endpoint."""

    def __init__(self, pool: TritonPool, endpoint: TritonEndpoint, token: int):
        self.pool, self.endpoint, self.token = pool, endpoint, token
        self.taken = time.monotonic()
        self.released = False
        self.listener = None  # the utterance's PlaybackClock (what its listener has), set by its caller
        self.generating = False  # a sentence of it is being generated now
        endpoint.seats[token] = self

    async def synthesize(self, text: str, voice: Optional[str], language: Optional[str], parameters: dict,
                         continuing: bool = False, lead_s: float = 0.0,
                         first_audio_by: Optional[float] = None, written=None) -> AsyncIterator[np.ndarray]:
        """Yield float32 24 kHz chunks of one sentence. ``first_audio_by`` (monotonic time) becomes the request's
        first-audio budget when it is sent; ``continuing``/``lead_s``: a later sentence, whose listener still
        has ``lead_s`` of audio; ``written``: text still being written (see ``TritonEndpoint.synthesize``).
        Closing the iterator cancels the request."""
        tried: set = set()
        refusal: Optional[SynthesisFailed] = None
        while True:
            if first_audio_by is not None:
                parameters[FIRST_AUDIO_BUDGET_MS] = max(1, int(1000 * (first_audio_by - time.monotonic())))
            produced = False
            stream = self.endpoint.synthesize(text, voice, language, parameters, written)
            try:
                async for chunk in stream:
                    produced = True
                    yield chunk
                return
            except SynthesisFailed as exc:
                refused = exc.code == EngineCode.OVERLOADED and not continuing
                if produced or not (exc.transport or refused):
                    raise
                if refused and (refusal is None or (exc.retry_after_ms or 0) < (refusal.retry_after_ms or 0)):
                    refusal = exc  # the talker cannot start it in time: another endpoint may
                if exc.transport:
                    log.warning("Triton at %s failed before any audio; trying the next endpoint", self.endpoint.url)
            finally:
                await stream.aclose()
            tried.add(self.endpoint)
            await self._move(tried, continuing, lead_s, refusal)

    async def _move(self, tried: set, continuing: bool, lead_s: float, refusal: Optional[SynthesisFailed]) -> None:
        """Give up this endpoint's slot for one on another endpoint (the talkers' own refusal if none has one)."""
        self.release()
        try:
            self.endpoint, self.token = await self.pool._acquire(tried, continuing, lead_s)
            self.endpoint.seats[self.token] = self
        except SynthesisFailed:
            if refusal is not None:
                raise refusal from None
            raise
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            pool = self.pool
            pool._mean_request_s += 0.1 * (time.monotonic() - self.taken - pool._mean_request_s)
            pool._release(self.endpoint, self.token)
