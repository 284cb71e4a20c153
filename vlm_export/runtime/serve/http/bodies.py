"""Request bodies read and checked before the service sees them: images, JSON, string lists.

Images: a JPEG or PNG as the raw body (``Content-Type: image/jpeg`` or ``image/png``) or as the
multipart field ``image``. The header's size is checked per side and in area before a pixel is
decoded (a small PNG can decode to gigabytes); decoding runs off the event loop. The body itself
was already bounded in bytes and time by :class:`~vlm_export.runtime.serve.http.guards.BodyLimit`.
"""

from __future__ import annotations

import io
import json
from typing import TYPE_CHECKING, Any

from fastapi import Request
from PIL import Image, UnidentifiedImageError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from vlm_export.runtime.io.preprocess import open_uncapped
from vlm_export.runtime.serve.http.replies import cut

if TYPE_CHECKING:
    from vlm_export.runtime.serve.config import Limits

IMAGE_TYPES = ("image/jpeg", "image/png")
#: the request body an image endpoint documents in the OpenAPI document
IMAGE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            **{kind: {"schema": {"type": "string", "format": "binary"}} for kind in IMAGE_TYPES},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"image": {"type": "string", "format": "binary"}},
                    "required": ["image"],
                }
            },
        },
    }
}


def media_type(request: Request) -> str:
    """The request's Content-Type without parameters, lower case."""
    return request.headers.get("content-type", "").partition(";")[0].strip().lower()


def decode_image(data: bytes, max_pixels: int, max_side: int) -> Image.Image:
    """Decode a JPEG or PNG after checking its header's size; HTTPException 400/413 otherwise."""
    if not data:
        raise HTTPException(400, "the image is empty: send the bytes of a JPEG or PNG")
    try:  # the header only: the sizes are checked here, before anything is decoded
        image = open_uncapped(io.BytesIO(data), formats=("JPEG", "PNG"))
    except UnidentifiedImageError:
        raise HTTPException(400, "the body is not a JPEG or PNG image") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise HTTPException(400, f"the image cannot be read: {cut(str(exc), 120)}") from None
    width, height = image.size
    if max_pixels and width * height > max_pixels:
        raise HTTPException(
            413,
            f"the image is {width}x{height} = {width * height / 1e6:.1f} megapixels, "
            f"above the limit of {max_pixels / 1e6:g}",
        )
    if max_side and max(width, height) > max_side:
        raise HTTPException(413, f"the image is {width}x{height}, above {max_side} pixels a side")
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise HTTPException(400, f"the image cannot be decoded: {cut(str(exc), 120)}") from None
    return image


async def image_body(request: Request, limits: Limits) -> Image.Image:
    """The request's image (raw JPEG/PNG body or multipart field ``image``), decoded and checked."""
    image, _ = await image_with_fields(request, limits)
    return image


async def image_with_fields(
    request: Request, limits: Limits, fields: tuple[str, ...] = ()
) -> tuple[Image.Image, dict[str, str]]:
    """The request's image, decoded and checked, and the multipart text ``fields`` given with it
    (a raw image body has none)."""
    kind = media_type(request)
    given: dict[str, str] = {}
    if kind in IMAGE_TYPES:
        data = await request.body()
    elif kind == "multipart/form-data":
        async with request.form(max_files=1, max_fields=8) as form:
            field = form.get("image")
            if not isinstance(field, UploadFile):
                raise HTTPException(400, "the multipart body needs a file field named 'image'")
            data = await field.read()
            given = {name: form[name] for name in fields if isinstance(form.get(name), str)}
    else:
        raise HTTPException(
            415,
            "send a JPEG or PNG as the body (Content-Type: image/jpeg or image/png) or as the "
            "multipart/form-data field 'image'",
        )
    image = await run_in_threadpool(
        decode_image, data, limits.max_upload_pixels, limits.max_upload_side
    )
    return image, given


async def json_body(request: Request) -> Any:
    """The request body parsed as JSON (UTF-8); HTTPException 400/415 with one line otherwise."""
    kind = media_type(request)
    if kind and kind != "application/json" and not kind.endswith("+json"):
        raise HTTPException(415, "send the body as JSON (Content-Type: application/json)")
    data = await request.body()
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise HTTPException(400, "the body is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise HTTPException(400, f"the body is not valid JSON: {exc.msg} at {exc.pos}") from None
    except RecursionError:
        raise HTTPException(400, "the body's JSON is nested too deeply") from None


def string_list(value: Any, what: str, max_items: int, max_chars: int) -> list[str]:
    """``value`` checked as a non-empty list of at most ``max_items`` non-empty strings of at most
    ``max_chars`` characters each, valid Unicode (no lone surrogates); HTTPException 400/413."""
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise HTTPException(400, f"{what} must be a JSON list of strings")
    if not value:
        raise HTTPException(400, f"{what}: the list is empty")
    if len(value) > max_items:
        raise HTTPException(413, f"{what}: {len(value)} items, above the limit of {max_items}")
    for index, item in enumerate(value):
        if not item.strip():
            raise HTTPException(400, f"{what}[{index}] is empty")
        if len(item) > max_chars:
            raise HTTPException(
                413, f"{what}[{index}] has {len(item)} characters, above the limit of {max_chars}"
            )
        try:
            item.encode("utf-8")
        except UnicodeEncodeError:
            raise HTTPException(
                400, f"{what}[{index}] is not valid Unicode (a lone surrogate): {cut(item)}"
            ) from None
    return value
