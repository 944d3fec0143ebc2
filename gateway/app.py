"""The gateway app's wiring: services created at start-up, and every route on one port (WebSocket
/api/v1/speak, the voices API, OpenAI's speech API, the web page, health, readiness, metrics)."""
from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles

from . import metrics, openai_api, voice_design, voices
from .auth import Authenticator, SubjectSessions
from .config import Settings
from .connection import speak
from .contracts import Conversations, interrupt_route
from .interrupt_bus import make_bus
from .discovery import Discovery
from .security import Guard
from .endpoints import Endpoints
from .models import Catalog
from .voices import VoiceLibrary

log = logging.getLogger("gateway")
STATIC_DIR = Path(__file__).parent / "static"
# The page talks only to this server (its WebSocket included) and plays audio it made itself.
PAGE_POLICY = ("default-src 'self'; connect-src 'self' ws: wss:; media-src 'self' blob:; img-src 'self' data:; "
               "object-src 'none'; base-uri 'none'; frame-ancestors 'none'")


@dataclass
class Services:
    """What every route shares (``request.app.state.services``)."""

    settings: Settings
    endpoints: Endpoints
    voices: VoiceLibrary
    authenticator: Authenticator
    subjects: SubjectSessions  # sessions open per token subject
    conversations: Conversations  # sessions by contract, and interrupts across replicas
    catalog: Catalog  # the served models, the default one, and the names that mean them
    sessions: int = 0
    connections: set = field(default_factory=set)  # the sessions open now (for draining)
    draining: bool = False  # shutting down: no new sessions


async def web_page(request: Request):
    return FileResponse(STATIC_DIR / "index.html", headers={"content-security-policy": PAGE_POLICY,
                                                            "cache-control": "no-cache"})


async def healthz(request: Request):
    return JSONResponse({"status": "ok"})


async def readyz(request: Request):
    endpoints = request.app.state.services.endpoints
    ready = await endpoints.check_ready()
    # A bus that is down does not make the gateway unready (speech goes on); it says interrupts stay local.
    default = request.app.state.services.catalog.default()
    return JSONResponse({"ready": ready, "triton": endpoints.status(), "capacity": endpoints.report(),
                         "models": endpoints.report_models(), "defaultModel": default.name if default else None,
                         "wordTimestamps": endpoints.aligner,
                         "interruptBus": request.app.state.services.conversations.bus.describe()},
                        status_code=200 if ready else 503)


async def metrics_endpoint(request: Request):
    request.app.state.services.endpoints.publish_metrics()
    body, content_type = metrics.render()
    return Response(body, media_type=content_type)


async def drain(app: Starlette) -> None:
    """Shutdown, after the listening socket closed: every session's utterances end with their end messages
    (the one playing gets GATEWAY_DRAIN_S to finish), then each session closes with 1001 (going away)."""
    services = app.state.services
    services.draining = True
    connections = list(services.connections)
    if connections:
        log.info("draining %d sessions", len(connections))
    await asyncio.gather(*(c.drain(services.settings.drain_s) for c in connections), return_exceptions=True)


def create_app(settings: Settings) -> Starlette:
    authenticator = Authenticator(settings.auth)  # a bad JWKS file stops the start here, with its reason

    @contextlib.asynccontextmanager
    async def lifespan(app):
        endpoints = Endpoints(keepalive_args=settings.keepalive_args())
        discovery = Discovery(endpoints, list(settings.triton_urls), interval_s=settings.discovery_interval_s)
        conversations = Conversations(make_bus(settings))
        app.state.services = Services(settings, endpoints, VoiceLibrary(settings.voices_dir, settings.default_voice),
                                      authenticator, SubjectSessions(settings.max_sessions_per_subject), conversations,
                                      Catalog(endpoints, settings))
        await conversations.start()
        await discovery.refresh()
        await endpoints.check_ready()
        endpoints.start_polling(settings.ready_poll_s)
        discovery.start()
        log.info("gateway up: Triton %s (%s), voices %s", endpoints.url, "ready" if endpoints.ready else "not ready yet",
                 settings.voices_dir)
        try:
            yield
        finally:
            discovery.close()
            await conversations.close()
            await endpoints.close()

    app = Starlette(lifespan=lifespan, routes=[
        WebSocketRoute("/api/v1/speak", speak),
        Route("/api/v1/voices", voices.list_voices, methods=["GET"]),
        Route("/api/v1/voices", voices.upload_voice, methods=["POST"]),
        Route("/api/v1/voices/design", voice_design.design_voice, methods=["POST"]),
        Route("/api/v1/voices/{voice_id}", voices.delete_voice, methods=["DELETE"]),
        Route("/api/v1/contracts/{contract_id}/interrupt", interrupt_route, methods=["POST"]),
        Route("/v1/audio/speech", openai_api.speech, methods=["POST"]),
        Route("/v1/models", openai_api.list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", openai_api.get_model, methods=["GET"]),
        Route("/", web_page),
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics_endpoint),
    ])
    app.add_middleware(Guard, settings=settings, authenticator=authenticator)
    return app
