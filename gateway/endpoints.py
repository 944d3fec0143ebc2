"""Triton endpoints: one gRPC channel per server (shared by every session), its readiness, the models it serves (one
talker and one `tts` ensemble per served checkpoint, found in its model repository index; each talker names its
model in its answer to the `status` command), the capacity each talker reports, and the set that discovery keeps
current (pods join once ready; pods that leave drain). The gateway only chooses among them, for the model a request
names, by that reported headroom: the engines decide what runs."""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from typing import Coroutine, Optional

import numpy as np
import tritonclient.grpc.aio as grpcclient
from tritonclient.grpc import InferInput, InferRequestedOutput

from tts_contract import commands, keepalive, tensors as names
from tts_contract.errors import EngineCode
from tts_contract.models import DEFAULT_TALKER, DEFAULT_TTS, ServedModel, is_talker

from . import metrics

log = logging.getLogger("gateway.endpoints")
DEMAND_WINDOW_S = 30.0  # refused requests count as demand this long (their clients come back)
# gRPC's default reconnect backoff grows to minutes (7.7 s was measured after a Triton restart); a restarted
# Triton should be seen within half a second.
CHANNEL_ARGS = [("grpc.max_send_message_length", 2**31 - 1), ("grpc.max_receive_message_length", 2**31 - 1),
                ("grpc.initial_reconnect_backoff_ms", 200), ("grpc.min_reconnect_backoff_ms", 200),
                ("grpc.max_reconnect_backoff_ms", 500)]
CHECK_TIMEOUT_S = 2.0
STATUS_FIELDS = ("rows", "realtime_batch", "headroom", "behind", "active", "queued", "step_ms")  # what /readyz shows


def is_tts(triton_model: str) -> bool:
    """Whether a Triton model name is one of the rendered `tts` ensembles."""
    return triton_model == DEFAULT_TTS or triton_model.startswith(DEFAULT_TTS + "_")


def is_final(result) -> bool:
    """Whether a streamed response is its request's last (Triton's ``triton_final_response`` parameter)."""
    params = result.get_response().parameters
    return "triton_final_response" in params and params["triton_final_response"].bool_param


def command_inputs(command: commands.Command) -> list[InferInput]:
    """A talker control request's inputs: the typed command (and an append's text, as raw bytes)."""
    message = InferInput(names.COMMAND, [1], "BYTES")
    message.set_data_from_numpy(np.array([commands.encode(command)], dtype=np.object_))
    inputs = [message]
    if isinstance(command, commands.Append):
        text = InferInput(names.TEXT, [1], "BYTES")
        text.set_data_from_numpy(np.array([command.text], dtype=np.object_))
        inputs.append(text)
    return inputs


class Endpoint:
    """One Triton server: its channel, readiness, the models it serves, each talker's last reported status, and
    this gateway's streams there."""

    def __init__(self, url: str, keepalive_args: Optional[list] = None):
        self.url = url
        self.client = grpcclient.InferenceServerClient(
            url, channel_args=CHANNEL_ARGS + (keepalive.channel_args() if keepalive_args is None else keepalive_args))
        self.ready = False
        self.reachable = False  # its server answered the last check (not ready but reachable: its models load)
        self.draining = False  # gone from discovery: no new streams; removed once its last one ends
        self.closed = False
        self.streams = 0  # streams this gateway has open here now
        self.calls = 0  # voice encodes and stream cancels running here (a draining endpoint waits for them too)
        self.loaded: frozenset = frozenset()  # the Triton models READY here at the last check
        self.talkers: dict[str, dict] = {}  # each ready talker's last answer to `status` (rows, headroom, ...)
        self.models: dict[str, ServedModel] = {}  # the served models its talkers described, by served name
        self._sent: dict[str, int] = {}  # streams this gateway sent each talker since it last reported
        self.aligner = False  # it serves the word aligner (optional: a deployment may have none)
        self.voice_encoder = False  # it serves the voice encoder (a deployment with no Base model has none)
        self._poller: Optional[asyncio.Task] = None

    @property
    def usable(self) -> bool:
        """Ready and still in discovery: it may take new streams (its engine decides whether it can)."""
        return self.ready and not self.draining

    # -- its models ---------------------------------------------------------------------------------------------

    def triton_models(self, model: Optional[str] = None) -> Optional[tuple[str, str]]:
        """The Triton models (ensemble, talker) serving the served model ``model`` here, when both are ready; None
        when it does not serve it (now). ``model`` None: the deployment's default (`tts` and `talker`)."""
        if model is None:
            pair = (DEFAULT_TTS, DEFAULT_TALKER)
        else:
            served = self.models.get(model)
            if served is None:
                return None
            pair = (served.tts_model, served.talker_model)
        return pair if pair[0] in self.loaded and pair[1] in self.loaded else None

    def serves(self, model: Optional[str] = None) -> bool:
        return self.triton_models(model) is not None

    def served_models(self) -> list[ServedModel]:
        """The models it serves now (described by their talkers, ensemble and talker ready)."""
        return [m for m in self.models.values() if self.serves(m.name)]

    def default_model(self) -> Optional[ServedModel]:
        """The model served as `tts`/`talker` here (the deployment's default), if its talker described it."""
        return next((m for m in self.models.values() if m.talker_model == DEFAULT_TALKER), None)

    # -- its capacity -------------------------------------------------------------------------------------------

    @property
    def status(self) -> dict:
        """The default talker's last status (the only talker of a one-model deployment), else the first one's."""
        return self.talkers.get(DEFAULT_TALKER) or next(iter(self.talkers.values()), {})

    def headroom_for(self, model: Optional[str] = None) -> int:
        """New streams the engine serving ``model`` could start, as it last reported, less those this gateway sent
        it since."""
        pair = self.triton_models(model)
        talker = pair[1] if pair else DEFAULT_TALKER
        return self.talkers.get(talker, {}).get("headroom", 0) - self._sent.get(talker, 0)

    @property
    def headroom(self) -> int:
        """The default model's headroom (see ``headroom_for``)."""
        return self.headroom_for(None)

    @property
    def realtime_batch(self) -> int:
        """Streams its engines measured they can step together ahead of real time, all talkers together (0 until
        they reported)."""
        return sum(status.get("realtime_batch", 0) for status in self.talkers.values())

    @property
    def capacity(self) -> int:
        """Its real-time capacity (the rows of a talker that has not measured it yet)."""
        return sum(status.get("realtime_batch", 0) or status.get("rows", 0) for status in self.talkers.values())

    def sent(self, talker: str) -> None:
        """A stream was sent to ``talker``: its headroom is one less until it reports again."""
        self._sent[talker] = self._sent.get(talker, 0) + 1

    def describe(self) -> dict:
        """Its state and capacity for /readyz: the default talker's figures at the top (as for one model), each
        served model's under ``models``."""
        return {"ready": self.ready, "draining": self.draining, "streams": self.streams, "aligner": self.aligner,
                "voiceEncoder": self.voice_encoder,
                **{k: v for k, v in self.status.items() if k in STATUS_FIELDS},
                "models": {m.name: {"kind": m.kind, "size": m.size, "ready": self.serves(m.name),
                                    "tritonModels": [m.tts_model, m.talker_model],
                                    **{k: v for k, v in self.talkers.get(m.talker_model, {}).items()
                                       if k in STATUS_FIELDS}}
                           for m in sorted(self.models.values(), key=lambda m: m.name)}}

    def failed(self, reason: str) -> None:
        """A stream found it failing (its connection lost, or no progress in time): no new streams go here until
        its next check finds it ready (its poller checks four times a second meanwhile)."""
        if self.ready:
            log.warning("Triton at %s failed: %s; not used until it answers again", self.url, reason)
        self.ready = self.reachable = False

    # -- checks -------------------------------------------------------------------------------------------------

    async def check_ready(self) -> bool:
        """Ready: the server, at least one `tts` ensemble, and the voice encoder where the repository has one. Each
        ready talker is asked for its status (its capacity, and which model it serves)."""
        index, answered = None, False
        try:
            ready = await asyncio.wait_for(self.client.is_server_ready(), CHECK_TIMEOUT_S)
            answered = True
            if ready:
                index = await asyncio.wait_for(self.client.get_model_repository_index(), CHECK_TIMEOUT_S)
        except Exception:  # any gRPC failure means "not ready"
            ready = False
        self.reachable = answered  # no answer at all: unreachable (down, partitioned), not loading
        listed = {m.name for m in index.models} if index is not None else set()
        self.loaded = frozenset(m.name for m in index.models if m.state == "READY") if index is not None \
            else frozenset()
        ready = ready and any(is_tts(m) for m in self.loaded) and \
            (names.VOICE_ENCODER not in listed or names.VOICE_ENCODER in self.loaded)
        self.aligner = ready and names.ALIGNER in self.loaded
        self.voice_encoder = ready and names.VOICE_ENCODER in self.loaded
        if ready:
            talkers = sorted(m for m in self.loaded if is_talker(m))
            for gone in set(self.talkers) - set(talkers):
                self.talkers.pop(gone, None)
            # a model whose talker left the repository is forgotten; one whose talker is loading stays known
            self.models = {n: m for n, m in self.models.items() if m.talker_model in listed}
            await asyncio.gather(*(self._refresh_status(talker) for talker in talkers))
            self._publish_capacity()
        if ready != self.ready:
            log.warning("Triton at %s is %s%s", self.url, "ready" if ready else "NOT ready",
                        f" ({self.status.get('rows', '?')} rows; models: "
                        f"{', '.join(m.name for m in self.served_models()) or '?'})" if ready else "")
        self.ready = ready
        return ready

    async def command(self, command: commands.Command, outputs: tuple = (), timeout_s: float = 2.0,
                      talker: str = names.TALKER):
        """Send ``talker`` one control command on a gRPC stream of its own; returns its final response (raises
        the talker's error, or TimeoutError)."""
        async def requests():
            yield {"model_name": talker, "inputs": command_inputs(command),
                   "outputs": [InferRequestedOutput(name) for name in outputs]}

        async with asyncio.timeout(timeout_s):
            async for result, error in self.client.stream_infer(requests()):
                if error is not None:
                    raise error
                if is_final(result):
                    return result
        raise TimeoutError("the talker closed the stream without answering")

    async def _refresh_status(self, talker: str) -> None:
        """Ask a talker for its capacity now and which model it serves (the `status` command)."""
        try:
            result = await self.command(commands.Status(), outputs=(names.STATUS,), talker=talker)
            status = json.loads(result.as_numpy(names.STATUS)[0])
        except Exception as exc:  # a busy talker: readiness does not depend on it
            log.debug("no status from the talker %s at %s: %s", talker, self.url, exc)
            return
        if self.closed:  # removed from the set meanwhile: its series are gone and stay gone
            return
        described = status.pop("model", None)
        if isinstance(described, dict):
            try:
                model = ServedModel.from_json(described)
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("the talker %s at %s describes its model unreadably: %s", talker, self.url, exc)
            else:
                if model.talker_model == talker:
                    # a talker restarted with another checkpoint (or name) replaces what it served before
                    for name in [n for n, m in self.models.items() if m.talker_model == talker and n != model.name]:
                        del self.models[name]
                    self.models[model.name] = model
        self.talkers[talker] = {**status, "at": time.monotonic()}
        self._sent[talker] = 0

    def _publish_capacity(self) -> None:
        if self.closed:
            return
        metrics.ENDPOINT_HEADROOM.labels(self.url).set(sum(s.get("headroom", 0) for s in self.talkers.values()))
        metrics.ENDPOINT_REALTIME.labels(self.url).set(self.realtime_batch)

    def start_polling(self, interval: float, on_change=None) -> None:
        """Check readiness (and the talkers' status) every ``interval`` seconds, four times a second while not
        ready."""
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


class Endpoints:
    """The Triton endpoints this gateway uses: discovery sets them, routing picks among the usable ones serving a
    request's model by the headroom their engines report, and each stream is counted while open (a draining endpoint
    is removed once its last stream and voice encode end). Also the autoscaling signal: demand over real-time
    capacity."""

    def __init__(self, urls: tuple = (), keepalive_args: Optional[list] = None):
        self.keepalive_args = keepalive_args  # gRPC keepalive of every channel (None: tts_contract.keepalive's)
        self.endpoints = [Endpoint(url, keepalive_args) for url in urls]
        self._next = 0
        self._poll_interval: Optional[float] = None  # set once polling starts; endpoints that join poll too
        self._closing: set = set()  # channels of removed endpoints being closed
        self._background: set = set()  # short calls running in the background (stream cancels)
        self._mean_stream_s = 2.0  # a running mean of how long a stream stays open
        self._refusals: deque = deque()  # when streams were refused within DEMAND_WINDOW_S
        self._model_series: set = set()  # the models whose per-model series are published

    @property
    def url(self) -> str:
        return ",".join(e.url for e in self.endpoints)

    @property
    def ready(self) -> bool:
        return any(e.usable for e in self.endpoints)

    def unusable_reason(self) -> tuple[EngineCode, str]:
        """Why no endpoint takes new streams: a server that answers but whose models are not ready yet is loading
        (MODEL_LOADING); when none answers (down, partitioned) the speech servers are unavailable (TTS_UNAVAILABLE:
        nothing is loading, waiting for it would be waiting for nothing)."""
        if any(e.reachable for e in self.endpoints if not e.draining):
            return EngineCode.MODEL_LOADING, "the speech model is not ready yet; try again shortly"
        return EngineCode.UNAVAILABLE, "no speech server can be reached now; try again shortly"

    def status(self) -> dict[str, bool]:
        return {e.url: e.ready for e in self.endpoints}

    @property
    def aligner(self) -> bool:
        """Whether a usable endpoint serves the word aligner (word marks and what a listener heard need it)."""
        return any(e.usable and e.aligner for e in self.endpoints)

    @property
    def voice_encoder(self) -> bool:
        """Whether a usable endpoint serves the voice encoder (cloned voices are added through it)."""
        return any(e.usable and e.voice_encoder for e in self.endpoints)

    # -- models -------------------------------------------------------------------------------------------------

    def models(self) -> dict[str, ServedModel]:
        """The models the usable endpoints serve now, by served name (the deployment's default first, then by
        name)."""
        found: dict[str, ServedModel] = {}
        for endpoint in self.endpoints:
            if endpoint.usable:
                for model in endpoint.served_models():
                    found.setdefault(model.name, model)
        default = self.default_model()
        return dict(sorted(found.items(), key=lambda item: (default is None or item[0] != default.name, item[0])))

    def known_models(self) -> dict[str, ServedModel]:
        """Every model any endpoint known now has described, served at the moment or not (a pod restarting)."""
        found: dict[str, ServedModel] = {}
        for endpoint in self.endpoints:
            for model in endpoint.models.values():
                found.setdefault(model.name, model)
        return found

    def default_model(self) -> Optional[ServedModel]:
        """The model the usable endpoints serve as `tts` (the deployment's default), as its talker described it."""
        for endpoint in self.endpoints:
            if endpoint.usable and endpoint.serves(None):
                model = endpoint.default_model()
                if model is not None:
                    return model
        return None

    def serving(self, model: Optional[str] = None) -> list[Endpoint]:
        """The usable endpoints serving ``model`` now (None: the deployment's default, `tts`)."""
        return [e for e in self.endpoints if e.usable and e.serves(model)]

    def aligner_endpoint(self) -> Optional[Endpoint]:
        """A usable endpoint serving the aligner, the one with the fewest of this gateway's streams; None if none."""
        serving = [e for e in self.endpoints if e.usable and e.aligner]
        return min(serving, key=lambda e: e.streams + e.calls, default=None)

    def report(self) -> dict[str, dict]:
        """Each endpoint's capacity as its talkers last reported it (per model), and this gateway's streams there."""
        return {e.url: e.describe() for e in self.endpoints}

    def report_models(self) -> dict[str, dict]:
        """Each model known: its kind and size, the usable endpoints serving it and their headroom for it."""
        report = {}
        for name, model in self.known_models().items():
            serving = self.serving(name)
            report[name] = {"kind": model.kind, "size": model.size, "ready": bool(serving),
                            "endpoints": len(serving), "headroom": sum(max(0, e.headroom_for(name)) for e in serving)}
        return report

    def choose(self, exclude=(), model: Optional[str] = None) -> Optional[Endpoint]:
        """A usable endpoint serving ``model`` (None: the deployment's default) for a new stream: the most headroom
        its engine for that model reported (less the streams sent there since), round-robin among equals; None when
        no endpoint serving it is usable. One with no headroom is still chosen when all are full: its engine then
        answers (a refusal with when to retry, or a place in its line for a client that can wait)."""
        if not self.endpoints:
            return None
        self._next = (self._next + 1) % len(self.endpoints)
        rotated = self.endpoints[self._next:] + self.endpoints[:self._next]
        usable = [e for e in rotated if e.usable and e not in exclude and e.serves(model)]
        return max(usable, key=lambda e: e.headroom_for(model), default=None)

    def stream_opened(self, endpoint: Endpoint) -> None:
        endpoint.streams += 1

    def stream_closed(self, endpoint: Endpoint, held_s: float) -> None:
        endpoint.streams -= 1
        self._mean_stream_s += 0.1 * (held_s - self._mean_stream_s)
        self.forget_if_idle(endpoint)

    def spawn(self, endpoint: Endpoint, call: Coroutine) -> None:
        """Run a short call to this endpoint (a stream's cancel) in the background: nobody waits for it, and a
        draining endpoint stays until it ends."""
        endpoint.calls += 1
        task = asyncio.get_running_loop().create_task(call)
        self._background.add(task)

        def done(task: asyncio.Task) -> None:
            self._background.discard(task)
            self._call_ended(endpoint)

        task.add_done_callback(done)

    @contextlib.contextmanager
    def calling(self, endpoint: Endpoint):
        """A call to ``endpoint`` that is not a stream (a voice encode, an alignment): a draining endpoint keeps its
        channel open until the call ends."""
        endpoint.calls += 1
        try:
            yield endpoint
        finally:
            self._call_ended(endpoint)

    def _call_ended(self, endpoint: Endpoint) -> None:
        endpoint.calls -= 1
        self.forget_if_idle(endpoint)

    def refused(self) -> None:
        """A stream every engine refused (part of the demand autoscaling sees)."""
        self._refusals.append(time.monotonic())
        self._forget_old_refusals()

    # -- endpoints joining and leaving (discovery) --------------------------------------------------------------

    def set_endpoints(self, urls: list[str]) -> None:
        """Make the endpoints ``urls``: new ones join (used once ready), missing ones drain (no new streams;
        removed when their last stream ends), and a draining one that comes back is used again."""
        wanted = list(dict.fromkeys(urls))
        known = {e.url: e for e in self.endpoints}
        for url in wanted:
            endpoint = known.get(url)
            if endpoint is None:
                endpoint = Endpoint(url, self.keepalive_args)
                self.endpoints.append(endpoint)
                if self._poll_interval is not None:
                    endpoint.start_polling(self._poll_interval)
                log.warning("Triton endpoint %s joined (%d known)", url, len(self.endpoints))
            elif endpoint.draining:
                endpoint.draining = False
                log.warning("Triton endpoint %s is back: no longer draining", url)
        for endpoint in list(self.endpoints):
            if endpoint.url not in wanted and not endpoint.draining:
                endpoint.draining = True
                log.warning("Triton endpoint %s left discovery: draining its %d streams", endpoint.url,
                            endpoint.streams)
                self.forget_if_idle(endpoint)

    def forget_if_idle(self, endpoint: Endpoint) -> None:
        if endpoint.draining and endpoint.streams == 0 and endpoint.calls == 0 and endpoint in self.endpoints:
            self.endpoints.remove(endpoint)
            endpoint.stop_polling()  # before its series go: a status answer in flight must not bring them back
            for gauge in (metrics.TRITON_READY, metrics.ENDPOINT_HEADROOM, metrics.ENDPOINT_REALTIME):
                with contextlib.suppress(KeyError):
                    gauge.remove(endpoint.url)
            closing = asyncio.get_running_loop().create_task(endpoint.close())
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)
            log.warning("Triton endpoint %s drained and removed", endpoint.url)

    async def check_ready(self) -> bool:
        await asyncio.gather(*(e.check_ready() for e in self.endpoints))
        return self.ready

    def start_polling(self, interval: float) -> None:
        self._poll_interval = interval
        for endpoint in self.endpoints:
            endpoint.start_polling(interval)

    async def close(self) -> None:
        await asyncio.gather(*(e.close() for e in self.endpoints), return_exceptions=True)

    # -- the autoscaling signal ---------------------------------------------------------------------------------

    def _forget_old_refusals(self) -> None:
        now = time.monotonic()
        while self._refusals and now - self._refusals[0] > DEMAND_WINDOW_S:
            self._refusals.popleft()

    def demand(self) -> tuple[float, int]:
        """(streams this gateway serves or is asked for: open, and those refused within the last DEMAND_WINDOW_S
        would have kept busy (Little's law: refusals per second x the mean stream time, so a client retrying often
        is not counted once per retry); the real-time capacity of its ready endpoints: what each engine measured
        it can step together ahead of real time)."""
        self._forget_old_refusals()
        refused = len(self._refusals) * min(1.0, self._mean_stream_s / DEMAND_WINDOW_S)
        wanted = sum(e.streams for e in self.endpoints) + refused
        capacity = sum(e.capacity for e in self.endpoints if e.usable)
        return wanted, capacity

    def publish_metrics(self) -> None:
        """Readiness per endpoint, endpoints by state, and the autoscaling signal (demand over capacity)."""
        states = {"ready": 0, "not_ready": 0, "draining": 0}
        for e in self.endpoints:
            metrics.TRITON_READY.labels(e.url).set(1 if e.usable else 0)
            states["draining" if e.draining else "ready" if e.ready else "not_ready"] += 1
        for state, count in states.items():
            metrics.ENDPOINTS.labels(state).set(count)
        wanted, capacity = self.demand()
        metrics.DEMAND.set(wanted)
        metrics.UTILIZATION.set(wanted / max(capacity, 1) if wanted else 0.0)
        models = self.report_models()
        for name, figures in models.items():
            metrics.MODEL_ENDPOINTS.labels(name).set(figures["endpoints"])
            metrics.MODEL_HEADROOM.labels(name).set(figures["headroom"])
        for gone in self._model_series - set(models):  # a model no endpoint serves any more
            for gauge in (metrics.MODEL_ENDPOINTS, metrics.MODEL_HEADROOM):
                with contextlib.suppress(KeyError):
                    gauge.remove(gone)
        self._model_series = set(models)
