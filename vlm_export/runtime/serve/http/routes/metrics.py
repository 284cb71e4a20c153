"""``GET /metrics``: the service's registry in the Prometheus text format."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from vlm_export.runtime.serve.http.routes import service_of

router = APIRouter(tags=["metrics"])


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}}},
)
async def metrics(request: Request) -> Response:
    """Frames, drops, errors and reconnects per source; stage latency histograms; reservoir fill."""
    text = await run_in_threadpool(generate_latest, service_of(request).registry)
    return Response(text, media_type=CONTENT_TYPE_LATEST)
