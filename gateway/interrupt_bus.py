"""How an interrupt reaches the other gateway replicas: Redis pub/sub (GATEWAY_REDIS_URL), or nothing beyond this
replica (a single gateway: the in-process default). The replica that takes an interrupt always delivers it to its
own sessions itself, so a bus that is down costs the other replicas only, never local speech."""
from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Awaitable, Callable, Optional

from . import metrics

log = logging.getLogger("gateway.interrupt_bus")
Handler = Callable[[dict], Awaitable[None]]
PUBLISH_TIMEOUT_S = 0.5  # an interrupt never waits longer on the bus than this
RETRY_S = (0.25, 0.5, 1.0, 2.0)  # reconnect backoff (a restarted Redis is used again within 2 s)
PING_S = 1.0  # the subscription pings Redis this often...
SILENT_S = 3.0  # ...and reconnects when nothing answered for this long (a Redis that went silent, not closed)
MESSAGE_VERSION = 1


class LocalBus:
    """No other replicas: every interrupt is delivered by the replica that takes it."""

    kind = "local"
    connected = True

    async def start(self, handler: Handler) -> None:
        metrics.INTERRUPT_BUS_UP.set(1)

    async def publish(self, message: dict) -> bool:
        return True  # every session is on this replica

    def describe(self) -> dict:
        return {"kind": self.kind, "connected": True, "reaches": "this replica (the only one)"}

    async def close(self) -> None:
        pass


class RedisBus:
    """Redis pub/sub on one channel; messages are JSON with the contract and the subject in them. A subscriber task
    keeps the subscription (reconnecting with backoff); ``connected`` says whether interrupts reach the other
    replicas now."""

    kind = "redis"

    def __init__(self, url: str, channel: str):
        import redis.asyncio as redis  # only a gateway configured with Redis needs the package

        self.url, self.channel = url, channel
        self._redis = redis.from_url(url, socket_connect_timeout=1.0, socket_timeout=None,
                                     health_check_interval=5, retry_on_timeout=False)
        self._publisher = redis.from_url(url, socket_connect_timeout=PUBLISH_TIMEOUT_S,
                                         socket_timeout=PUBLISH_TIMEOUT_S)
        self.connected = False
        self._task: Optional[asyncio.Task] = None
        self._since: Optional[float] = None  # when the bus went down
        self._handling: set = set()  # deliveries running (each message in its own task: none waits for another)

    async def start(self, handler: Handler) -> None:
        self._set_connected(False)
        self._task = asyncio.create_task(self._subscribe(handler))

    def _set_connected(self, connected: bool) -> None:
        if connected != self.connected or self._since is None:
            if connected:
                log.warning("interrupt bus %s: subscribed to %s; interrupts reach every replica", self._shown(),
                            self.channel)
            elif self._since is not None:
                log.warning("interrupt bus %s is DOWN: interrupts reach this replica's sessions only", self._shown())
            self._since = time.monotonic()
        self.connected = connected
        metrics.INTERRUPT_BUS_UP.set(1 if connected else 0)

    def _shown(self) -> str:
        """The URL without a password."""
        scheme, _, rest = self.url.partition("://")
        return f"{scheme}://{rest.rpartition('@')[2]}"

    async def _subscribe(self, handler: Handler) -> None:
        attempt = 0
        while True:
            pubsub = self._redis.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                heard_at = pinged_at = time.monotonic()
                while True:
                    message = await pubsub.get_message(timeout=PING_S)
                    now = time.monotonic()
                    if message is not None:
                        heard_at = now
                        if message.get("type") == "subscribe":  # Redis confirmed the subscription
                            self._set_connected(True)
                            attempt = 0
                        self._spawn(message, handler)
                    if now - heard_at > SILENT_S:
                        raise ConnectionError(f"no answer from Redis for {SILENT_S:g} s")
                    if now - pinged_at >= PING_S:  # answered by a "pong" message (counted as heard above)
                        await asyncio.wait_for(pubsub.ping(), PING_S)
                        pinged_at = now
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.connected or attempt == 0:
                    log.warning("interrupt bus %s: %s", self._shown(), exc)
                self._set_connected(False)
            finally:
                try:
                    await asyncio.wait_for(pubsub.aclose(), 1.0)
                except Exception:
                    pass
            await asyncio.sleep(RETRY_S[min(attempt, len(RETRY_S) - 1)])
            attempt += 1

    def _spawn(self, message: dict, handler: Handler) -> None:
        if message.get("type") != "message":  # (subscription confirmations and the answers to pings)
            return
        task = asyncio.get_running_loop().create_task(self._handle(message, handler))
        self._handling.add(task)
        task.add_done_callback(self._handling.discard)

    async def _handle(self, message: dict, handler: Handler) -> None:
        try:
            data = json.loads(message["data"])
            if not isinstance(data, dict) or data.get("v") != MESSAGE_VERSION:
                raise ValueError(f"unknown message version {data.get('v') if isinstance(data, dict) else data!r}")
        except (ValueError, TypeError, KeyError) as exc:
            log.warning("interrupt bus: ignored a malformed message: %s", exc)
            return
        try:
            await handler(data)
        except Exception:  # one bad delivery must not end the subscription
            log.exception("interrupt bus: delivering an interrupt failed")

    async def publish(self, message: dict) -> bool:
        """Whether the message went out to the other replicas (False: the bus is down; they will not hear it)."""
        if not self.connected:
            return False
        try:
            await asyncio.wait_for(self._publisher.publish(self.channel, json.dumps({"v": MESSAGE_VERSION,
                                                                                   **message})),
                                   PUBLISH_TIMEOUT_S)
            return True
        except Exception as exc:
            log.warning("interrupt bus %s: publishing failed (%s); this replica's sessions only", self._shown(), exc)
            return False

    def describe(self) -> dict:
        return {"kind": self.kind, "connected": self.connected, "channel": self.channel,
                "reaches": "every replica" if self.connected else "this replica only (the bus is down)"}

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for client in (self._redis, self._publisher):
            try:
                await asyncio.wait_for(client.aclose(), 1.0)
            except Exception:
                pass


def make_bus(settings) -> "LocalBus | RedisBus":
    return RedisBus(settings.redis_url, settings.interrupt_channel) if settings.redis_url else LocalBus()
