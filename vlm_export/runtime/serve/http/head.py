"""HEAD answered as GET without the body (RFC 9110 9.3.2): uptime checkers and `curl -I` ask so.

FastAPI routes take only the methods they declare, so ``HEAD /healthz`` was 405. This middleware
hands a HEAD request to the app as a GET and completes the reply at its head: the body, or the
frames of a live stream, are never sent. Once the reply is complete uvicorn tells the app the
client has gone, so a stream stops producing frames (tests/test_serve_http.py counts them).
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class HeadAsGet:
    """HEAD -> the GET route's status and headers, with an empty body."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return
        answered = False

        async def head_only(message: Message) -> None:
            nonlocal answered
            if answered or message["type"] != "http.response.start":
                return  # the body, or more of a stream: not for a HEAD request
            answered = True
            await send(message)
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        await self.app({**scope, "method": "GET"}, receive, head_only)
