"""JSON replies for every error: ``{"error": "one message"}``, never a traceback.

The exception handlers turn HTTP errors (404, 405, 408, 413, 415...), request validation errors
(422) and user mistakes (``UserError``: 400, or the ``http_status`` its class names) into one
short line. Any other
exception is caught by :class:`~vlm_export.runtime.serve.http.guards.ErrorGuard` (500).
"""

from __future__ import annotations

import http
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from vlm_export.core.errors import UserError
from vlm_export.runtime.terminal import printable

#: the longest error message a client gets (user strings inside are cut shorter, see ``cut``)
MAX_MESSAGE = 400
#: errors after which the connection is closed: the rest of the body is never read
CLOSING = (408, 413)


def cut(text: str, limit: int = 80) -> str:
    """``text`` printable (escapes for control characters and lone surrogates), cut to ``limit``."""
    text = printable(str(text))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def error(status: int, message: str, headers: dict[str, str] | None = None, **extra: Any):
    """The JSON reply ``{"error": message}`` (plus ``extra`` fields) with ``status``."""
    headers = dict(headers or {})
    if status in CLOSING:
        headers["Connection"] = "close"
    body = {"error": cut(message, MAX_MESSAGE), **extra}
    return JSONResponse(body, status_code=status, headers=headers)


def _http_message(request: Request, exc: HTTPException) -> str:
    """The detail an HTTPException carries, or a plain line in place of Starlette's defaults."""
    detail = exc.detail if isinstance(exc.detail, str) else ""
    if exc.status_code == 404 and detail in ("", "Not Found"):
        return f"no such endpoint: {cut(request.url.path)}"
    if exc.status_code == 405 and detail in ("", "Method Not Allowed"):
        return f"{cut(request.method, 20)} is not allowed on {cut(request.url.path)}"
    return detail or http.HTTPStatus(exc.status_code).phrase


def _validation_message(exc: RequestValidationError) -> str:
    """The first validation error as one line: where (``query parameter topk``) and what."""
    errors = exc.errors()
    if not errors:
        return "the request is not valid"
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ())]
    kinds = {
        "query": "query parameter",
        "path": "path parameter",
        "body": "body",
        "header": "header",
    }
    where = kinds.get(loc[0], loc[0]) if loc else "request"
    rest = ".".join(cut(part, 40) for part in loc[1:])
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where} {rest}: {first.get('msg', 'not valid')}{more}".replace(" :", ":")


def user_error_status(exc: UserError) -> int:
    """The status a user mistake names (``http_status``: 404 for an unknown source, 429 when
    busy...), else 400."""
    return int(getattr(exc, "http_status", 400))


def install_error_handlers(app: FastAPI) -> None:
    """Make every HTTP, validation and user error a JSON ``{"error": ...}`` reply."""

    async def on_http(request: Request, exc: HTTPException) -> JSONResponse:
        return error(exc.status_code, _http_message(request, exc), exc.headers)

    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error(422, _validation_message(exc))

    async def on_user_error(request: Request, exc: UserError) -> JSONResponse:
        return error(user_error_status(exc), str(exc), getattr(exc, "http_headers", None))

    app.add_exception_handler(HTTPException, on_http)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(UserError, on_user_error)
