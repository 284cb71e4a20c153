"""``POST /v1/classify``: the decision ``vlm-edge run`` gives one uploaded image."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from vlm_export.runtime.serve.http.bodies import IMAGE_BODY, image_body
from vlm_export.runtime.serve.http.replies import cut
from vlm_export.runtime.serve.http.routes import service_of, settings_of

router = APIRouter(prefix="/v1", tags=["classify"])


def known_source(request: Request, name: str) -> str:
    """``name`` if the service has such a source; HTTPException 404 otherwise."""
    if name not in service_of(request).source_names():
        raise HTTPException(404, f"unknown source {cut(name)!r}")
    return name


@router.post("/classify", summary="Classify one JPEG or PNG image", openapi_extra=IMAGE_BODY)
async def classify(
    request: Request,
    source: Annotated[
        str | None, Query(description="add this source's adaptation (its reservoir)")
    ] = None,
    adapt: Annotated[bool, Query(description="update the source's state with this image")] = False,
    topk: Annotated[int, Query(ge=1, le=1000, description="how many classes to return")] = 5,
) -> dict[str, Any]:
    """The record ``vlm-edge run`` prints for the image: label, class, score, top-k, timings, UTC
    time. Zero-shot, plus ``source``'s adaptation; the source's state changes only with
    ``adapt=true``."""
    if source is not None:
        known_source(request, source)
    elif adapt:
        raise HTTPException(400, "adapt=true needs a source whose state to adapt: ?source=NAME")
    settings = settings_of(request)
    image = await image_body(request, settings.limits)
    service = service_of(request)
    return await run_in_threadpool(
        lambda: service.classify(image, source=source, adapt=adapt, topk=topk)
    )
