"""The HTTP face of ``vlm-edge serve``: ``create_app(service, settings) -> FastAPI``.

One factory receives its collaborators (the running Service and the settings) and keeps them on
``app.state``; one APIRouter per concern lives in ``routes/``. In front of the routes, from the
outside in: the error guard (JSON 500, one log line), HEAD answered as GET without the body,
CORS (only when origins are configured),
the body limits (bytes and time), cross-site writes refused and the credential check (when a
token is set).

FastAPI (on Starlette, served by uvicorn): the OpenAPI document at ``/openapi.json`` is built
from the routes themselves, and one app factory with one router per concern is Frigate's shape.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import anyio
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from vlm_export.runtime.serve.http.auth import PUBLIC_PATHS, Auth, Sessions
from vlm_export.runtime.serve.http.guards import BodyLimit, CrossSiteWrites, ErrorGuard
from vlm_export.runtime.serve.http.head import HeadAsGet
from vlm_export.runtime.serve.http.replies import install_error_handlers
from vlm_export.runtime.serve.http.routes import (
    classes,
    classify,
    embed,
    examples,
    health,
    metrics,
    page,
    sources,
    stream,
)

if TYPE_CHECKING:
    from vlm_export.runtime.serve.config import ServeSettings
    from vlm_export.runtime.serve.service import Service

#: live views served at once (each holds a worker thread while it waits for a frame)
MAX_STREAMS = 16
ROUTERS = (health, sources, stream, classify, embed, classes, examples, metrics, page)


def create_app(service: Service, settings: ServeSettings) -> FastAPI:
    """The FastAPI app serving ``service`` under ``settings`` (token, limits, CORS)."""
    app = FastAPI(
        title="vlm-edge serve",
        summary="Several cameras on one engine: decisions, embeddings, classes, live views",
        version="1",
        docs_url=None,  # the interactive docs load scripts from a CDN: a device may be offline
        redoc_url=None,
    )
    app.state.service = service
    app.state.settings = settings
    app.state.sessions = Sessions(settings.token) if settings.token else None
    app.state.stream_limiter = anyio.CapacityLimiter(MAX_STREAMS)
    app.state.closing = False  # set by the server as it shuts down: live streams end
    for module in ROUTERS:
        app.include_router(module.router)
    install_error_handlers(app)
    # add_middleware puts each one outside the previous: the last added runs first
    if app.state.sessions is not None:
        app.add_middleware(Auth, sessions=app.state.sessions)
    app.add_middleware(CrossSiteWrites, allowed_origins=list(settings.cors_origins))
    app.add_middleware(
        BodyLimit,
        max_bytes=settings.limits.max_upload_bytes,
        timeout_s=settings.limits.upload_timeout_s,
    )
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "HEAD", "POST", "PUT", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
            expose_headers=["X-Frame-Seq", "X-Frame-Class", "X-Frame-Score", "X-Frame-Time"],
        )
    app.add_middleware(HeadAsGet)
    app.add_middleware(ErrorGuard)
    if app.state.sessions is not None:
        document_bearer(app)
    return app


def document_bearer(app: FastAPI) -> None:
    """Say in the OpenAPI document that every operation but the public ones needs the token."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
            schemes["bearer"] = {"type": "http", "scheme": "bearer"}
            for path, operations in schema.get("paths", {}).items():
                if path not in PUBLIC_PATHS:
                    for operation in operations.values():
                        operation["security"] = [{"bearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
