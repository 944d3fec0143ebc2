"""Run the gateway: `python -m gateway` (settings from the environment)."""
from __future__ import annotations

import logging
import os
import sys

import uvicorn

from .app import create_app, drain
from .auth import RedactTokens
from .config import Settings
from .websocket_transport import LingeringCloseProtocol


def main() -> int:
    level = os.environ.get("GATEWAY_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = Settings.from_env()
        app = create_app(settings)  # reads the JWKS file, if any
    except ValueError as exc:
        print(f"gateway: bad configuration: {exc}", file=sys.stderr)
        return 2
    config = uvicorn.Config(app, host=settings.host, port=settings.port, ws=LingeringCloseProtocol,
                            # frames above the protocol limit still arrive, so that they get a clear
                            # INVALID_MESSAGE; beyond this frame limit the connection closes with 1009
                            ws_max_size=max(4 * settings.max_message_bytes, 1 << 20), log_level=level.lower(),
                            access_log=False, timeout_graceful_shutdown=settings.drain_s + 5)
    for name in ("uvicorn.error", "uvicorn.access"):  # after uvicorn configured its logging
        logging.getLogger(name).addFilter(RedactTokens())
    DrainingServer(config, drain=lambda: drain(app)).run()
    return 0


class DrainingServer(uvicorn.Server):
    """On SIGTERM: stop accepting, end every session's utterances with their end messages and close each
    session with 1001 (``drain``), then uvicorn's own shutdown."""

    def __init__(self, config: uvicorn.Config, drain):
        super().__init__(config)
        self._drain = drain

    async def shutdown(self, sockets=None) -> None:
        for server in self.servers:
            server.close()
        await self._drain()
        await super().shutdown(sockets)


if __name__ == "__main__":
    sys.exit(main())
