"""ASGI middlewares that stand in front of every route: errors, headers, cross-site writes,
request-body limits.

``ErrorGuard`` is the outermost: an exception no handler took becomes a JSON 500 and one log line
(never a traceback, to the client or the log), and every reply gets ``nosniff`` and
``no-referrer``. ``BodyLimit`` bounds every request body in bytes (a declared Content-Length above
the limit is refused before a byte is read; a chunked body is counted as it arrives and cut at the
limit) and in time (the whole body must arrive within a deadline, so a client that sends headers
and then stalls holds a connection for seconds, not forever). ``CrossSiteWrites`` refuses a
request that changes something (any method but GET, HEAD, OPTIONS) sent by a browser from another
site: HTML forms can POST across sites without CORS, and a service on loopback without a token
must not adapt a reservoir because a web page in the same browser asked it to.
"""

from __future__ import annotations

import asyncio
import logging
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vlm_export.runtime.serve.http.replies import cut, error

log = logging.getLogger(__name__)

#: how often a request body's wait looks whether the server is shutting down
STOP_POLL_S = 0.25
#: headers on every reply: no MIME sniffing, no referrer leaving the page
COMMON_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer")]


class ErrorGuard:
    """Outermost middleware: unhandled exceptions -> JSON 500 + one log line; common headers."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_with_headers(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message["headers"] = [*message.get("headers", []), *COMMON_HEADERS]
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except ClientDisconnect:
            return
        except asyncio.CancelledError:
            if not _closing(scope):
                raise
            # the server stops and its grace for open requests ran out: one line, no traceback
            where = f"{scope.get('method', '?')} {cut(scope.get('path', ''))}"
            log.warning("%s was still running when the service stopped: cancelled", where)
            if not started:
                await error(503, "the service stopped before this request was answered")(
                    scope, receive, send_with_headers
                )
        except Exception as exc:  # noqa: BLE001 - the one place every other exception ends
            where = f"{scope.get('method', '?')} {cut(scope.get('path', ''))}"
            log.error("%s failed: %s: %s", where, type(exc).__name__, cut(str(exc), 200))
            if not started:
                reply = error(500, "internal error (the server log has one line about it)")
                await reply(scope, receive, send_with_headers)


def _closing(scope: Scope) -> bool:
    """True once the server is shutting down (the app's ``state.closing``)."""
    app = scope.get("app")
    return bool(getattr(getattr(app, "state", None), "closing", False))


class BodyLimit:
    """Bound every request body: ``max_bytes`` in size, ``timeout_s`` from the request's start;
    close the connection after an answer given before the body was read. A body still arriving
    when the server shuts down is answered 503 at once (its client must not hold the stop)."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    def too_large(self) -> HTTPException:
        """The 413 for a body above the limit."""
        limit = byte_size(self.max_bytes)
        return HTTPException(413, f"the request body is larger than the limit of {limit}")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                await error(400, "the Content-Length header is not a number")(scope, receive, send)
                return
            if int(declared) > self.max_bytes:
                await error(413, self.too_large().detail)(scope, receive, send)
                return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        received, complete = 0, False

        async def bounded_receive() -> Message:
            nonlocal received, complete
            if complete:  # the body is in: later receives wait for a disconnect, unbounded
                return await receive()
            while True:  # in slices, so that a shutdown is noticed
                left = deadline - loop.time()
                try:
                    message = await asyncio.wait_for(receive(), min(max(left, 0.0), STOP_POLL_S))
                    break
                except asyncio.TimeoutError:
                    if _closing(scope):
                        raise HTTPException(503, "the service is stopping") from None
                    if left <= STOP_POLL_S:
                        raise HTTPException(
                            408, f"the request body did not arrive within {self.timeout_s:g} s"
                        ) from None
            if message["type"] != "http.request":
                complete = True
                return message
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise self.too_large()
            complete = not message.get("more_body", False)
            return message

        expects_body = (declared is not None and declared.strip() != "0") or "chunked" in (
            Headers(scope=scope).get("transfer-encoding", "").lower()
        )

        async def closing_send(message: Message) -> None:
            # an answer given before the whole body arrived ends the connection: the client
            # cannot keep it open by never sending the rest
            if message["type"] == "http.response.start" and expects_body and not complete:
                message["headers"] = [*message.get("headers", []), (b"connection", b"close")]
            await send(message)

        await self.app(scope, bounded_receive, closing_send)


class CrossSiteWrites:
    """403 for a write whose ``Origin`` is another site (unless it is a configured CORS origin)."""

    SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

    def __init__(self, app: ASGIApp, allowed_origins: list[str]) -> None:
        self.app = app
        self.allowed = frozenset(origin.rstrip("/") for origin in allowed_origins)

    def cross_site(self, scope: Scope) -> bool:
        """True for a browser's write from another origin than the one it is sent to."""
        if scope["method"] in self.SAFE_METHODS:
            return False
        headers = Headers(scope=scope)
        origin = headers.get("origin")
        if origin is None:  # not from a browser page (curl, scripts) or a same-origin GET
            return headers.get("sec-fetch-site", "same-origin") == "cross-site"
        if origin.rstrip("/") in self.allowed:
            return False
        return origin == "null" or urlsplit(origin).netloc != headers.get("host", "")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.cross_site(scope):
            reply = error(403, "a write from another site's page is refused (its Origin header)")
            await reply(scope, receive, send)
            return
        await self.app(scope, receive, send)


def byte_size(count: int) -> str:
    """``count`` bytes as people say it: 10 MiB, 300 KiB, 1.5 MiB, 512 B."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= scale:
            return f"{count / scale:.4g} {unit}"
    return f"{count} B"
