"""Triton endpoints: one gRPC channel per server (shared by every session), its readiness, the capacity its talker
reports (the `status` command), and the set that discovery keeps current (pods join once ready; pods that leave
drain). The gateway only chooses among them by that reported headroom: the engines decide what runs."""
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

from tts_contract import commands, tensors as names

from . import metrics

log = logging.getLogger("gateway.endpoints")
REQUIRED_MODELS = (names.TTS, names.VOICE_ENCODER)
DEMAND_WINDOW_S = 30.0  # refused requests count as demand this long (their clients come back)
# gRPC's default reconnect backoff grows to minutes (7.7 s was measured after a Triton restart); a restarted
# Triton should be seen within half a second.
CHANNEL_ARGS = [("grpc.max_send_message_length", 2**31 - 1), ("grpc.max_receive_message_length", 2**31 - 1),
                ("grpc.initial_reconnect_backoff_ms", 200), ("grpc.min_reconnect_backoff_ms", 200),
                ("grpc.max_reconnect_backoff_ms", 500)]


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
    """One Triton server: its channel, readiness, the talker's last reported status, and this gateway's streams
    there."""

    def __init__(self, url: str):
        self.url = url
        self.client = grpcclient.InferenceServerClient(url, channel_args=CHANNEL_ARGS)
        self.ready = False
        self.draining = False  # gone from discovery: no new streams; removed once its last one ends
        self.closed = False
        self.streams = 0  # streams this gateway has open here now
        self.started_since_status = 0  # streams this gateway opened here since the talker last reported
        self.calls = 0  # voice encodes and stream cancels running here (a draining endpoint waits for them too)
        self.status: dict = {}  # the talker's last answer to `status` (rows, real-time batch, headroom, ...)
        self.aligner = False  # it serves the word aligner (optional: a deployment may have none)
        self._poller: Optional[asyncio.Task] = None

    @property
    def usable(self) -> bool:
        """Ready and still in discovery: it may take new streams (its engine decides whether it can)."""
        return self.ready and not self.draining

    @property
    def headroom(self) -> int:
        """New streams its engine could start, as it last reported, less those this gateway sent it since."""
        return self.status.get("headroom", 0) - self.started_since_status

    @property
    def realtime_batch(self) -> int:
        """Streams its engine measured it can step together ahead of real time (0 until it reported)."""
        return self.status.get("realtime_batch", 0)

    async def check_ready(self) -> bool:
        try:
            ready = await asyncio.wait_for(self.client.is_server_ready(), 2.0) and all(
                [await asyncio.wait_for(self.client.is_model_ready(m), 2.0) for m in REQUIRED_MODELS])
        except Exception:  # any gRPC failure means "not ready"
            ready = False
        if ready:
            await self._refresh_status()
            try:
                self.aligner = await asyncio.wait_for(self.client.is_model_ready(names.ALIGNER), 2.0)
            except Exception:
                self.aligner = False
        if ready != self.ready:
            log.warning("Triton at %s is %s%s", self.url, "ready" if ready else "NOT ready",
                        f" ({self.status.get('rows', '?')} rows)" if ready else "")
        self.ready = ready
        return ready

    async def command(self, command: commands.Command, outputs: tuple = (), timeout_s: float = 2.0):
        """Send the talker one control command on a gRPC stream of its own; returns its final response (raises
        the talker's error, or TimeoutError)."""
        async def requests():
            yield {"model_name": names.TALKER, "inputs": command_inputs(command),
                   "outputs": [InferRequestedOutput(name) for name in outputs]}

        async with asyncio.timeout(timeout_s):
            async for result, error in self.client.stream_infer(requests()):
                if error is not None:
                    raise error
                if is_final(result):
                    return result
        raise TimeoutError("the talker closed the stream without answering")

    async def _refresh_status(self) -> None:
        """Ask the talker for its capacity now (the `status` command); kept as ``status``."""
        try:
            result = await self.command(commands.Status(), outputs=(names.STATUS,))
            self.status = {**json.loads(result.as_numpy(names.STATUS)[0]), "at": time.monotonic()}
            self.started_since_status = 0
        except Exception as exc:  # a busy talker: readiness does not depend on it
            log.debug("no status from the talker at %s: %s", self.url, exc)
            return
        if self.closed:  # removed from the set meanwhile: its series are gone and stay gone
            return
        metrics.ENDPOINT_HEADROOM.labels(self.url).set(self.status.get("headroom", 0))
        metrics.ENDPOINT_REALTIME.labels(self.url).set(self.realtime_batch)

    def start_polling(self, interval: float, on_change=None) -> None:
        """Check readiness (and the talker's status) every ``interval`` seconds, four times a second while not
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
    """The Triton endpoints this gateway uses: discovery sets them, routing picks among the usable ones by the
    headroom their engines report, and each stream is counted while open (a draining endpoint is removed once its
    last stream and voice encode end). Also the autoscaling signal: demand over real-time capacity."""

    def __init__(self, urls: tuple = ()):
        self.endpoints = [Endpoint(url) for url in urls]
        self._next = 0
        self._poll_interval: Optional[float] = None  # set once polling starts; endpoints that join poll too
        self._closing: set = set()  # channels of removed endpoints being closed
        self._background: set = set()  # short calls running in the background (stream cancels)
        self._mean_stream_s = 2.0  # a running mean of how long a stream stays open
        self._refusals: deque = deque()  # when streams were refused within DEMAND_WINDOW_S

    @property
    def url(self) -> str:
        return ",".join(e.url for e in self.endpoints)

    @property
    def ready(self) -> bool:
        return any(e.usable for e in self.endpoints)

    def status(self) -> dict[str, bool]:
        return {e.url: e.ready for e in self.endpoints}

    @property
    def aligner(self) -> bool:
        """Whether a usable endpoint serves the word aligner (word marks and what a listener heard need it)."""
        return any(e.usable and e.aligner for e in self.endpoints)

    def aligner_endpoint(self) -> Optional[Endpoint]:
        """A usable endpoint serving the aligner, the one with the fewest of this gateway's streams; None if none."""
        serving = [e for e in self.endpoints if e.usable and e.aligner]
        return min(serving, key=lambda e: e.streams + e.calls, default=None)

    def report(self) -> dict[str, dict]:
        """Each endpoint's capacity as its talker last reported it, and this gateway's streams there."""
        return {e.url: {"ready": e.ready, "draining": e.draining, "streams": e.streams, "aligner": e.aligner,
                        **{k: v for k, v in e.status.items() if k in ("rows", "realtime_batch", "headroom", "behind",
                                                                     "active", "queued", "step_ms")}}
                for e in self.endpoints}

    def choose(self, exclude=()) -> Optional[Endpoint]:
        """A usable endpoint for a new stream: the most headroom its engine reported (less the streams sent there
        since), round-robin among equals; None when no endpoint is usable. One with no headroom is still chosen
        when all are full: its engine then answers (a refusal with when to retry, or a place in its line for a
        client that can wait)."""
        if not self.endpoints:
            return None
        self._next = (self._next + 1) % len(self.endpoints)
        rotated = self.endpoints[self._next:] + self.endpoints[:self._next]
        usable = [e for e in rotated if e.usable and e not in exclude]
        return max(usable, key=lambda e: e.headroom, default=None)

    def stream_opened(self, endpoint: Endpoint) -> None:
        endpoint.streams += 1
        endpoint.started_since_status += 1

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
                endpoint = Endpoint(url)
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
        capacity = sum(e.realtime_batch or e.status.get("rows", 0) for e in self.endpoints if e.usable)
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
