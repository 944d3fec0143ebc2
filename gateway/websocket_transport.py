"""uvicorn's sans-I/O WebSocket protocol with a lingering close: after the server fails a connection (a frame over
the frame limit: 1009, text that is not UTF-8: 1007) it sends its close frame, half-closes, and reads and drops
what the client is still sending before closing the socket. uvicorn closes at once, and a client still sending
then gets a TCP reset that can destroy the close frame before it is read (seen as 1006, no close frame)."""
from __future__ import annotations

import logging

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

log = logging.getLogger("gateway.websocket")

LINGER_S = 2.0  # the longest a failed connection is read (and dropped) before its socket closes


class LingeringCloseProtocol(WebSocketsSansIOProtocol):
    lingering = False

    def data_received(self, data: bytes) -> None:
        if self.lingering:  # the rest of a refused frame: read so the socket closes cleanly, then dropped
            return
        super().data_received(data)

    def handle_parser_exception(self) -> None:
        close = self.conn.close_sent
        self.queue.put_nowait({"type": "websocket.disconnect", "code": close.code, "reason": close.reason})
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.close_sent = True
        self.lingering = True
        if self.read_paused:
            self.read_paused = False
            self.transport.resume_reading()
        if self.transport.can_write_eof():
            self.transport.write_eof()  # the client sees the close frame, then EOF, and closes its side
        # uvicorn closes the transport when the app returns unless a close timer runs; connection_lost and
        # shutdown cancel it
        self.close_timer = self.loop.call_later(LINGER_S, self.transport.close)

    def send_receive_event_to_app(self) -> None:
        """A text message that is not UTF-8 closes its connection with 1007 and one WARNING line (uvicorn logs a
        full traceback at ERROR for each: a client's bad bytes are not the server's error)."""
        if self.curr_msg_data_type == "text" and not self.close_sent:
            try:
                b"".join(self.frames).decode()
            except UnicodeDecodeError as exc:
                self.frames = []
                log.warning("closing the WebSocket of %s with 1007: a text message is not UTF-8 (%s at byte %d)",
                            _peer(self), exc.reason, exc.start)
                self.conn.send_close(1007)
                self.handle_parser_exception()
                return
        super().send_receive_event_to_app()

    def handle_ping(self) -> None:
        if self.lingering:  # a ping read with the refused frame: nothing may be written after the EOF
            return
        super().handle_ping()

    def eof_received(self) -> None:
        if self.lingering:
            self.transport.close()
            return None
        return super().eof_received()


def _peer(protocol) -> str:
    client = getattr(protocol, "client", None)
    return f"{client[0]}:{client[1]}" if client else "a client"
