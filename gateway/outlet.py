"""The sending side of a session's socket (the ``Outlet`` a session sends through)."""
from __future__ import annotations

import asyncio
from typing import Optional

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from . import metrics
from .protocol import Error
from .session import SessionClosed


class SocketOutlet:
    """The sending side of a session's socket: one frame at a time (awaiting each is the backpressure); a socket
    that is gone raises SessionClosed."""

    def __init__(self, websocket: WebSocket):
        self.ws = websocket
        self.closed = False
        self._lock = asyncio.Lock()

    async def send_message(self, message) -> None:
        if isinstance(message, Error):
            metrics.ERRORS.labels(message.code).inc()
        await self._send(text=message.to_json())

    async def send_audio(self, data: bytes) -> None:
        await self._send(data=data)

    async def _send(self, text: Optional[str] = None, data: Optional[bytes] = None) -> None:
        if self.closed:
            raise SessionClosed()
        async with self._lock:
            try:
                if text is not None:
                    await self.ws.send_text(text)
                else:
                    await self.ws.send_bytes(data)
            except (WebSocketDisconnect, RuntimeError, OSError) as exc:
                self.closed = True
                raise SessionClosed() from exc

    async def close(self, code: int, reason: str = "") -> None:
        if not self.closed and self.ws.client_state == WebSocketState.CONNECTED:
            self.closed = True
            try:
                await self.ws.close(code, reason)
            except Exception:  # already gone
                pass
        self.closed = True
