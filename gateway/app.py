"""The gateway app: WebSocket /api/v1/speak, the voices API, health, readiness and metrics on one port."""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from . import metrics
from .config import Settings
from .protocol import CLOSE_TRY_AGAIN, Error, ErrorCode
from .connection import Connection
from .triton_client import TritonPool
from .voices import VoiceApiError, VoiceLibrary

log = logging.getLogger("gateway")


@dataclass
class Services:
    settings: Settings
    triton: TritonPool
    voices: VoiceLibrary
    sessions: int = 0


def create_app(settings: Settings) -> Starlette:
    services: dict = {}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        triton = TritonPool(list(settings.triton_urls), queue_timeout_s=settings.queue_timeout_s,
                             streams_per_endpoint=settings.streams_per_triton)
        services["s"] = Services(settings, triton, VoiceLibrary(settings.voices_dir, settings.default_voice))
        await triton.check_ready()
        triton.start_polling(settings.ready_poll_s)
        log.info("gateway up: Triton %s (%s), voices %s", triton.url,
                 "ready" if triton.ready else "not ready yet", settings.voices_dir)
        try:
            yield
        finally:
            await triton.close()

    async def speak(websocket: WebSocket):
        s: Services = services["s"]
        await websocket.accept()
        if s.sessions >= s.settings.max_sessions:
            message = Error.of(ErrorCode.RATE_LIMITED, f"too many sessions (limit {s.settings.max_sessions})")
            metrics.ERRORS.labels(message.code).inc()
            await websocket.send_text(message.to_json())
            await websocket.close(CLOSE_TRY_AGAIN, "too many sessions")
            return
        s.sessions += 1
        metrics.ACTIVE_SESSIONS.set(s.sessions)
        connection = Connection(websocket, s)
        log.info("session %s opened from %s", connection.id, websocket.client)
        try:
            await connection.run()
        finally:
            s.sessions -= 1
            metrics.ACTIVE_SESSIONS.set(s.sessions)
            await connection.close(1000)
            log.info("session %s closed", connection.id)

    async def list_voices(request: Request):
        return JSONResponse({"voices": services["s"].voices.list()})

    async def upload_voice(request: Request):
        s: Services = services["s"]
        try:
            async with request.form(max_files=1, max_fields=8, max_part_size=s.settings.max_upload_bytes + 1) as form:
                upload = form.get("audio")
                data = await upload.read() if hasattr(upload, "read") else b""
                entry = await s.voices.upload(
                    s.triton, data, transcript=_text(form.get("transcript")), name=_text(form.get("name")),
                    voice_id=_text(form.get("id")), language=_text(form.get("language")),
                    max_bytes=s.settings.max_upload_bytes)
        except VoiceApiError as exc:
            return JSONResponse({"error": exc.message}, status_code=exc.status)
        except Exception as exc:  # malformed multipart and friends
            if "multipart" in type(exc).__module__ or "MultiPart" in type(exc).__name__ or "form" in str(exc).lower():
                return JSONResponse({"error": f"bad upload: {exc}"}, status_code=400)
            raise
        return JSONResponse(entry, status_code=201)

    async def delete_voice(request: Request):
        try:
            services["s"].voices.delete(request.path_params["voice_id"])
        except VoiceApiError as exc:
            return JSONResponse({"error": exc.message}, status_code=exc.status)
        return Response(status_code=204)

    async def healthz(request: Request):
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request):
        triton = services["s"].triton
        ready = await triton.check_ready()
        return JSONResponse({"ready": ready, "triton": triton.status()}, status_code=200 if ready else 503)

    async def metrics_endpoint(request: Request):
        for url, ready in services["s"].triton.status().items():
            metrics.TRITON_READY.labels(url).set(1 if ready else 0)
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    return Starlette(lifespan=lifespan, routes=[
        WebSocketRoute("/api/v1/speak", speak),
        Route("/api/v1/voices", list_voices, methods=["GET"]),
        Route("/api/v1/voices", upload_voice, methods=["POST"]),
        Route("/api/v1/voices/{voice_id}", delete_voice, methods=["DELETE"]),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics_endpoint),
    ])


def _text(value) -> str | None:
    return value if isinstance(value, str) else None
