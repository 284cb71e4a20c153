"""``GET /v1/sources``: per source rates, stage latencies, counters, reservoir fill, decision."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from vlm_export.runtime.serve.http.routes import service_of, settings_of

router = APIRouter(prefix="/v1", tags=["sources"])


@router.get("/sources", summary="Status of every source")
async def sources(request: Request) -> dict[str, Any]:
    """``{"sources": [...], "fate_overlay": bool, "auth": bool}``: one object per source (name,
    state, fps, latency_ms per stage with p50/p95, frames, dropped, reconnects, errors,
    reservoir_fill, last decision); the page's fate toggle default; whether a token is set."""
    settings = settings_of(request)
    return {
        "sources": await run_in_threadpool(service_of(request).source_status),
        "fate_overlay": settings.fate_overlay,
        "auth": settings.token is not None,
    }
