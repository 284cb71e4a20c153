"""``/v1/examples``: teach the service by example, list what it was taught, forget an example.

``POST`` takes a JPEG/PNG (raw with ``?label=NAME``, or multipart fields ``image`` and ``label``)
or ``{"source": NAME, "seq": N, "label": NAME}`` to label a frame the service already decided;
it answers once the example is in the decisions. ``DELETE /v1/examples/{id}`` unlearns it
exactly. Each answer is JSON; a full learning queue is 429 with ``Retry-After``.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from vlm_export.runtime.serve.http.bodies import (
    IMAGE_TYPES,
    image_with_fields,
    json_body,
    media_type,
)
from vlm_export.runtime.serve.http.replies import cut
from vlm_export.runtime.serve.http.routes import service_of
from vlm_export.runtime.serve.teaching.teacher import Teaching

router = APIRouter(prefix="/v1/examples", tags=["examples"])

MAX_PAGE = 200
EXAMPLE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "source": {"type": "string"},
                        "seq": {"type": "integer", "minimum": 1},
                        "label": {"type": "string", "maxLength": 100},
                    },
                    "required": ["source", "seq", "label"],
                    "additionalProperties": False,
                },
                "example": {"source": "front", "seq": 42, "label": "forklift"},
            },
            **{kind: {"schema": {"type": "string", "format": "binary"}} for kind in IMAGE_TYPES},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "image": {"type": "string", "format": "binary"},
                        "label": {"type": "string"},
                    },
                    "required": ["image", "label"],
                }
            },
        },
    }
}


def teaching_of(request: Request) -> Teaching:
    """The service's teaching, or HTTP 409 when it is off (a fixed --rail-state is fused)."""
    teaching = service_of(request).teaching
    if teaching is None:
        raise HTTPException(
            409, "teaching is off: this service fuses a fixed --rail-state; serve without it"
        )
    return teaching


def frame_label(payload: Any) -> tuple[str, int, Any]:
    """``{"source", "seq", "label"}`` checked for shape (the values are checked by teaching)."""
    if not isinstance(payload, dict):
        raise HTTPException(400, 'send {"source": NAME, "seq": N, "label": NAME}')
    unknown = sorted(set(payload) - {"source", "seq", "label"})
    if unknown:
        raise HTTPException(400, f"unknown field {cut(unknown[0], 40)!r}: use source, seq, label")
    missing = [key for key in ("source", "seq", "label") if key not in payload]
    if missing:
        raise HTTPException(400, f"the object needs {', '.join(missing)}")
    source, seq = payload["source"], payload["seq"]
    if not isinstance(source, str):
        raise HTTPException(400, "source must be a source name (a string)")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        raise HTTPException(400, "seq must be a frame's sequence number (a whole number >= 1)")
    return source, seq, payload["label"]


@router.post("", summary="Teach one example (an image, or a frame a source decided)",
             openapi_extra=EXAMPLE_BODY)  # fmt: skip
async def teach(
    request: Request,
    label: Annotated[str | None, Query(description="the label of a raw image body")] = None,
) -> dict[str, Any]:
    """``{"id", "label", "source", "class_examples", "learned_ms"}`` once the example is in the
    decisions. A label that is no class yet becomes one; ``unknown`` teaches what to reject."""
    teaching = teaching_of(request)
    settings = request.app.state.settings
    kind = media_type(request)
    if kind == "application/json" or kind.endswith("+json"):
        source, seq, given = frame_label(await json_body(request))
        return await run_in_threadpool(teaching.teach_frame, source, seq, given)
    image, fields = await image_with_fields(request, settings.limits, ("label",))
    given = fields.get("label", label)
    if given is None:
        where = "a text field named 'label'" if kind == "multipart/form-data" else "?label=NAME"
        raise HTTPException(400, f"give the label: {where}")
    return await run_in_threadpool(teaching.teach_image, image, given)


@router.get("", summary="The taught examples, newest first")
async def examples(
    request: Request,
    label: Annotated[str | None, Query(max_length=100)] = None,
    source: Annotated[str | None, Query(max_length=100)] = None,
    offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
) -> dict[str, Any]:
    """A page of examples (id, label, source, time, origin, thumbnail URL), the count per label,
    how many are learned and the chosen ``min_score`` (with ``--min-score auto``)."""
    teaching = teaching_of(request)
    return await run_in_threadpool(
        lambda: teaching.examples(label=label, source=source, offset=offset, limit=limit)
    )


@router.get(
    "/{example_id}/thumbnail.jpg",
    summary="An example's thumbnail",
    response_class=Response,
    responses={200: {"content": {"image/jpeg": {}}}},
)
async def thumbnail(request: Request, example_id: str) -> Response:
    """The small JPEG kept with the example."""
    data = await run_in_threadpool(teaching_of(request).thumbnail, example_id)
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=86400"})


@router.delete("/{example_id}", summary="Forget one example (exact unlearning)")
async def forget(request: Request, example_id: str) -> dict[str, Any]:
    """The learner becomes exactly the learner without this example; the fleet forgets it too."""
    return await run_in_threadpool(teaching_of(request).forget, example_id)
