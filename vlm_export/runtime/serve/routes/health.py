"""``GET /healthz``: 200 while every source delivered a frame recently, else 503 naming them."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from vlm_export.runtime.serve.replies import cut, error
from vlm_export.runtime.serve.routes import service_of, settings_of

router = APIRouter(tags=["health"])


@router.get(
    "/healthz",
    summary="Health: every source delivered a frame within health_max_age_s",
    responses={503: {"description": "some sources are failing; the error names them"}},
)
async def healthz(request: Request) -> JSONResponse:
    """200 ``{"status": "ok"}``, or 503 ``{"error": ..., "failing": [names]}``. No credential."""
    service, max_age = service_of(request), settings_of(request).health_max_age_s
    failing = await run_in_threadpool(service.failing_sources, max_age)
    if failing:
        names = ", ".join(cut(name, 40) for name in failing)
        return error(503, f"no frame within {max_age:g} s from: {names}", failing=failing)
    return JSONResponse({"status": "ok", "sources": len(service.source_names())})
