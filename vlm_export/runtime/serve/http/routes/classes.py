"""``GET /v1/classes`` and ``PUT /v1/classes``: the live label space, changed without a restart."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from vlm_export.runtime.serve.http.bodies import json_body, string_list
from vlm_export.runtime.serve.http.replies import cut
from vlm_export.runtime.serve.http.routes import service_of, settings_of
from vlm_export.runtime.text.templates import template_set_names

router = APIRouter(prefix="/v1", tags=["classes"])

NAMES = {"type": "array", "items": {"type": "string"}, "minItems": 1}
CLASSES_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "oneOf": [
                        NAMES,
                        {
                            "type": "object",
                            "properties": {
                                "classes": NAMES,
                                "templates": {
                                    "type": "string",
                                    "nullable": True,
                                    "description": "a built-in template set (never a file)",
                                },
                            },
                            "required": ["classes"],
                            "additionalProperties": False,
                        },
                    ]
                },
                "example": {"classes": ["cat", "dog", "red fox"], "templates": None},
            }
        },
    }
}


def parse_classes(
    payload: Any, max_classes: int, max_chars: int, current: str | None
) -> tuple[list[str], str | None]:
    """A PUT body (a list of names, or ``{"classes": [...], "templates": NAME}``) checked.
    ``NAME`` must be a built-in template set (the command line's file form is refused here) or
    ``current``, the bundle's own templates, which stands for them (as null does)."""
    templates = None
    if isinstance(payload, dict):
        unknown = sorted(set(payload) - {"classes", "templates"})
        if unknown:
            raise HTTPException(400, f"unknown field {unknown[0][:40]!r}: use classes, templates")
        if "classes" not in payload:
            raise HTTPException(400, "the object needs a 'classes' list")
        templates = payload.get("templates")
        if templates == current:
            templates = None
        if templates is not None:
            if not isinstance(templates, str):
                raise HTTPException(400, "templates must be a template set name or null")
            if templates not in template_set_names():  # never a file: no client paths
                raise HTTPException(
                    400,
                    f"templates {cut(templates)!r} is not a built-in template set: "
                    f"use one of {', '.join(template_set_names())}",
                )
        payload = payload["classes"]
    return string_list(payload, "classes", max_classes, max_chars), templates


@router.get("/classes", summary="The live class names")
async def get_classes(request: Request) -> dict[str, Any]:
    """``{"classes": [...], "templates": NAME or null}``."""
    return await run_in_threadpool(service_of(request).classes)


@router.put("/classes", summary="Replace the live class names", openapi_extra=CLASSES_BODY)
async def put_classes(request: Request) -> dict[str, Any]:
    """Replace the label space as ``vlm-edge classes`` does (atomic on disk; reservoirs follow
    the labels); the next frames use the new classes. Returns the new classes and
    ``dropped_entries``."""
    settings = settings_of(request)
    service = service_of(request)
    current = (await run_in_threadpool(service.classes))["templates"]
    limits = settings.limits
    names, templates = parse_classes(
        await json_body(request), limits.max_classes, limits.max_class_name_chars, current
    )
    return await run_in_threadpool(lambda: service.set_classes(names, templates))
