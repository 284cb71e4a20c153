"""``POST /v1/embed/image`` and ``POST /v1/embed/text``: L2-normalised vectors for retrieval."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from vlm_export.runtime.serve.http.bodies import IMAGE_BODY, image_body, json_body, string_list
from vlm_export.runtime.serve.http.routes import service_of, settings_of

router = APIRouter(prefix="/v1/embed", tags=["embed"])

TEXT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {"type": "array", "items": {"type": "string"}, "minItems": 1},
                "example": ["a photo of a cat", "a photo of a dog"],
            }
        },
    }
}


@router.post("/image", summary="Embed one JPEG or PNG image", openapi_extra=IMAGE_BODY)
async def embed_image(request: Request) -> dict[str, Any]:
    """``{"embedding": [...], "dim": D}``: the image engine's L2-normalised embedding."""
    settings = settings_of(request)
    image = await image_body(request, settings.limits)
    vector = await run_in_threadpool(service_of(request).embed_image, image)
    return {"embedding": vector, "dim": len(vector)}


@router.post("/text", summary="Embed a list of texts", openapi_extra=TEXT_BODY)
async def embed_text(request: Request) -> dict[str, Any]:
    """``{"embeddings": [[...], ...], "dim": D}``: one L2-normalised vector per text, through the
    bundle's text engine (400 if the bundle has none)."""
    settings = settings_of(request)
    texts = string_list(
        await json_body(request),
        "texts",
        settings.limits.max_text_batch,
        settings.limits.max_class_name_chars,
    )
    vectors = await run_in_threadpool(service_of(request).embed_texts, texts)
    return {"embeddings": vectors, "dim": len(vectors[0]) if vectors else 0}
