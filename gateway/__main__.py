"""Run the gateway: `python -m gateway` (settings from the environment)."""
from __future__ import annotations

import logging
import os
import sys

import uvicorn

from .app import create_app
from .config import Settings


def main() -> int:
    try:
        settings = Settings.from_env()
    except ValueError as exc:
        print(f"gateway: bad configuration: {exc}", file=sys.stderr)
        return 2
    level = os.environ.get("GATEWAY_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, ws="websockets-sansio",
                # frames above the protocol limit still arrive, so that they get a clear INVALID_MESSAGE
                ws_max_size=max(4 * settings.max_message_bytes, 1 << 20),
                log_level=level.lower(), access_log=False, timeout_graceful_shutdown=5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
