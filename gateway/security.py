"""Who may use the gateway: a bearer token (opaque or a JWT, see auth.py) on every route but health, readiness,
metrics and the web page's static files (when auth is configured), and browsers' cross-origin requests and
WebSocket upgrades only from GATEWAY_ALLOWED_ORIGINS (default: the gateway's own origin)."""
from __future__ import annotations

import json
import logging
from typing import Optional
from urllib.parse import urlsplit

from .auth import AuthRefused, Authenticator
from .openai_api import unauthorized_body

log = logging.getLogger("gateway.security")
OPEN_PATHS = ("/healthz", "/readyz", "/metrics")  # no token needed
OPEN_PREFIXES = ("/static/",)  # the web page's files
CORS_HEADERS = [(b"access-control-allow-methods", b"GET, POST, DELETE, OPTIONS"),
                (b"access-control-allow-headers", b"authorization, content-type"),
                (b"access-control-max-age", b"600"), (b"vary", b"Origin")]


def bearer_token(headers: dict) -> Optional[str]:
    header = headers.get("authorization", "")
    return header[7:].strip() if header.lower().startswith("bearer ") else None


def is_open(path: str) -> bool:
    return path in OPEN_PATHS or path == "/" or path.startswith(OPEN_PREFIXES)


class Guard:
    """ASGI middleware enforcing origins (HTTP and WebSocket) and tokens (HTTP, where the verified identity goes
    into the request's state; the speak route also accepts the token in its `start` message, so the connection
    checks WebSocket tokens itself)."""

    def __init__(self, app, settings, authenticator: Authenticator):
        self.app, self.settings, self.authenticator = app, settings, authenticator
        self.allow_any = "*" in settings.allowed_origins

    def origin_allowed(self, origin: str, headers: dict, scope) -> bool:
        if self.allow_any or origin in self.settings.allowed_origins:
            return True
        # Same origin: the page's host is the one the browser asked for. The scheme is not compared (TLS often
        # ends at a proxy), and a proxy may rewrite Host (then X-Forwarded-Host has it); a page can set neither.
        asked = {headers.get("host", ""), headers.get("x-forwarded-host", "").split(",")[0].strip()}
        netloc = urlsplit(origin).netloc
        return bool(netloc) and netloc.lower() in {host.lower() for host in asked if host}

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        origin = headers.get("origin")
        if origin is not None and not self.origin_allowed(origin, headers, scope):
            log.warning("refused a %s request to %s from origin %r", scope["type"], scope["path"], origin)
            if scope["type"] == "websocket":
                return await send({"type": "websocket.close", "code": 1008})  # before accept: HTTP 403
            return await _json(send, 403, {"error": f"requests from origin {origin!r} are not allowed; see "
                                                    "GATEWAY_ALLOWED_ORIGINS"})
        if scope["type"] == "websocket":
            return await self.app(scope, receive, send)
        cors = [(b"access-control-allow-origin", origin.encode("latin-1"))] + CORS_HEADERS if origin else []
        if scope["method"] == "OPTIONS" and origin:  # a browser's preflight for an allowed origin
            return await _respond(send, 204, cors, b"")
        if self.authenticator.enabled and not is_open(scope["path"]):
            token = bearer_token(headers)
            try:
                identity = self.authenticator.verify(token)
            except AuthRefused as refusal:
                log.info("refused %s %s: %s", scope["method"], scope["path"], refusal)
                reason = f"missing or invalid bearer token: {refusal}"
                body = unauthorized_body(reason) if scope["path"].startswith("/v1/") else {"error": reason}
                # RFC 6750: a missing token gets the bare challenge, a bad one says why
                described = "".join(c for c in str(refusal) if c.isprintable() and c not in '"\\')
                challenge = b"Bearer" if not token else \
                    f'Bearer error="invalid_token", error_description="{described}"'.encode("latin-1", "replace")
                return await _json(send, 401, body, [(b"www-authenticate", challenge)] + cors)
            scope.setdefault("state", {})["identity"] = identity

        async def send_with_cors(message):
            if message["type"] == "http.response.start" and cors:
                message = {**message, "headers": list(message.get("headers", [])) + cors}
            await send(message)

        await self.app(scope, receive, send_with_cors)


async def _json(send, status: int, body: dict, headers: Optional[list] = None) -> None:
    await _respond(send, status, [(b"content-type", b"application/json")] + (headers or []),
                   json.dumps(body).encode())


async def _respond(send, status: int, headers: list, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": headers + [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
