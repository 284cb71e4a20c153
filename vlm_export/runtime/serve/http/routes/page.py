"""The web page (``/`` and its two static files) and the login form's ``POST /login``.

The page's files come from the package (``runtime/serve/http/static``), named in a fixed table: no
client string ever becomes a file path. The page shell holds no data, so it loads without a
credential and shows the login form when the API answers 401.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
from fastapi import APIRouter, Request, Response
from starlette.exceptions import HTTPException
from starlette.responses import FileResponse

from vlm_export.runtime.serve.http.auth import COOKIE
from vlm_export.runtime.serve.http.bodies import json_body, media_type

router = APIRouter(tags=["page"])

STATIC = Path(__file__).resolve().parent.parent / "static"
FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}
#: the pause before a wrong token's 401 at the login form
FAILED_LOGIN_PAUSE_S = 0.5
LOGIN_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {"token": {"type": "string"}},
                    "required": ["token"],
                }
            }
        },
    }
}


def _file(name: str) -> FileResponse:
    return FileResponse(STATIC / name, media_type=FILES[name], headers=PAGE_HEADERS)


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    """The live page."""
    return _file("index.html")


@router.get("/static/{name}", include_in_schema=False)
async def static(name: str) -> FileResponse:
    """One of the page's own files, by its name in a fixed table."""
    if name not in FILES or name == "index.html":
        raise HTTPException(404, "no such file")
    return _file(name)


@router.post(
    "/login",
    summary="Log in with the token: sets the session cookie",
    status_code=204,
    openapi_extra=LOGIN_BODY,
)
async def login(request: Request) -> Response:
    """Check ``{"token": ...}`` (or the form field ``token``); 204 with an HttpOnly,
    SameSite=Strict session cookie, or 401 with nothing set. Without a configured token the
    service is open and this only answers 204."""
    sessions = request.app.state.sessions
    if sessions is None:
        return Response(status_code=204)
    if media_type(request) == "application/x-www-form-urlencoded":
        async with request.form(max_files=0, max_fields=4) as form:
            given: Any = form.get("token")
    else:
        payload = await json_body(request)
        given = payload.get("token") if isinstance(payload, dict) else None
    if not isinstance(given, str) or not sessions.token_matches(given):
        await anyio.sleep(FAILED_LOGIN_PAUSE_S)  # slows guessing through the form
        raise HTTPException(401, "wrong token", {"WWW-Authenticate": "Bearer"})
    response = Response(status_code=204)
    response.set_cookie(
        COOKIE,
        sessions.issue(),
        max_age=sessions.lifetime_s,
        path="/",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return response


@router.post("/logout", summary="Forget the session cookie", status_code=204)
async def logout() -> Response:
    """204, clearing the session cookie."""
    response = Response(status_code=204)
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
    return response
