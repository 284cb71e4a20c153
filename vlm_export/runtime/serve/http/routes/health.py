"""``GET /healthz``: 200 while the service serves, 503 naming the sources when it does not.

- 503 when a source delivered no frame within ``health_max_age_s``, or when every source is
  retrying (cannot open or read its source) or collapsed (its engine output is the same whatever
  the picture, see ``serve.frames.watch``); ``failing`` names them, ``reasons`` says why for each.
- 200 ``{"status": "degraded", ...}`` while only some sources are retrying or collapsed:
  ``degraded`` names them and ``reasons`` says why.
- 200 ``{"status": "ok", "sources": N}`` otherwise.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from vlm_export.runtime.serve.http.replies import cut, error
from vlm_export.runtime.serve.http.routes import service_of, settings_of

router = APIRouter(tags=["health"])


def _troubles(service: Any) -> dict[str, str]:
    """Sources that are retrying, failed (their state cannot be used) or collapsed, with the
    reason (collapse first)."""
    troubles = {name: f"collapsed: {why}" for name, why in service.watches.reasons().items()}
    for name, worker in service.workers.items():
        if worker.state in ("retrying", "failed") and name not in troubles:
            why = cut(worker.last_error or "the source failed", 200)
            troubles[name] = f"{worker.state}: {why}"
    return troubles


def _listed(reasons: dict[str, str]) -> str:
    return "; ".join(f"{cut(name, 40)} ({why})" for name, why in reasons.items())


@router.get(
    "/healthz",
    summary="Health: every source delivers frames and none is collapsed or retrying",
    responses={503: {"description": "the service does not serve; the error names the sources"}},
)
async def healthz(request: Request) -> JSONResponse:
    """200 ``{"status": "ok" | "degraded", ...}``, or 503 ``{"error": ..., "failing": [names],
    "reasons": {name: why}}``. No credential."""
    service, max_age = service_of(request), settings_of(request).health_max_age_s
    failing = await run_in_threadpool(service.failing_sources, max_age)
    troubles = await run_in_threadpool(_troubles, service)
    names = service.source_names()
    if failing:
        reasons = {name: troubles.get(name, f"no frame within {max_age:g} s") for name in failing}
        shown = ", ".join(cut(name, 40) for name in failing)
        return error(
            503, f"no frame within {max_age:g} s from: {shown}", failing=failing, reasons=reasons
        )
    if troubles and set(troubles) >= set(names):
        return error(
            503,
            f"every source is retrying or collapsed: {_listed(troubles)}",
            failing=list(troubles),
            reasons=troubles,
        )
    if troubles:
        return JSONResponse(
            {
                "status": "degraded",
                "sources": len(names),
                "degraded": list(troubles),
                "reasons": troubles,
            }
        )
    return JSONResponse({"status": "ok", "sources": len(names)})
