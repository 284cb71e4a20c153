"""Requests that are not HTTP get the JSON 400 of every other error, with the common headers.

uvicorn answers a request its HTTP parser refuses (a negative Content-Length, no Host header, a
TLS hello on the plain port) itself, before the app sees it, with a plain-text 400. The service
runs uvicorn with its own HTTP protocol class (uvicorn's ``http`` setting takes one): uvicorn's
own (``auto``: httptools when installed, else h11) with that one answer replaced by
``{"error": "the request is not valid HTTP"}``, ``nosniff`` and ``no-referrer``, and the
connection closed as uvicorn closes it. A uvicorn whose protocol lacks that answer
(``send_400_response``) runs as it comes, plain-text 400 included.
"""

from __future__ import annotations

import json
from typing import Any

from vlm_export.runtime.serve.http.guards import COMMON_HEADERS

MESSAGE = "the request is not valid HTTP"


def bad_request_reply() -> bytes:
    """The whole HTTP/1.1 400 reply, head and JSON body, as written on the connection."""
    body = json.dumps({"error": MESSAGE}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
        *COMMON_HEADERS,
    ]
    head = b"HTTP/1.1 400 Bad Request\r\n" + b"".join(k + b": " + v + b"\r\n" for k, v in headers)
    return head + b"\r\n" + body


def http_protocol() -> Any:
    """What uvicorn's ``http`` setting gets: the JSON-400 protocol class, or ``"auto"``."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    if not callable(getattr(AutoHTTPProtocol, "send_400_response", None)):
        return "auto"
    reply = bad_request_reply()

    class JsonBadRequest(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
        """uvicorn's HTTP protocol, its answer to an unparsable request in JSON."""

        def send_400_response(self, msg: str) -> None:
            self.transport.write(reply)
            self.transport.close()

    return JsonBadRequest
