"""Requests that are not HTTP get the JSON 400 of every other error, with the common headers.

uvicorn answers a request its HTTP parser refuses (a negative Content-Length, no Host header, a
TLS hello on the plain port) itself, before the app sees it, with a plain-text 400. The service
runs uvicorn with its own HTTP protocol class (uvicorn's ``http`` setting takes one): uvicorn's
own (``auto``: httptools when installed, else h11) with that one answer replaced by
``{"error": "the request is not valid HTTP"}``, ``nosniff`` and ``no-referrer``, and the
connection closed as uvicorn closes it. A uvicorn whose protocol lacks that answer
(``send_400_response``) runs as it comes, plain-text 400 included.

The same class bounds the time a request's head (request line and headers) may take: uvicorn
times out only idle keep-alive connections, so a client that sends half a head and stalls, or
one header line a second, held a connection for as long as it liked, before any credential is
checked. A head not complete within ``head_timeout_s`` of its first byte (or of the connection)
gets a JSON 408 and the connection is closed.
"""

from __future__ import annotations

import json
from typing import Any

from vlm_export.runtime.serve.http.guards import COMMON_HEADERS

MESSAGE = "the request is not valid HTTP"
LATE_MESSAGE = "the request's headers did not arrive in time"


def json_reply(status: str, message: str) -> bytes:
    """A whole HTTP/1.1 reply, head and JSON body ``{"error": message}``, that closes the
    connection, as written on it."""
    body = json.dumps({"error": message}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
        *COMMON_HEADERS,
    ]
    head = f"HTTP/1.1 {status}\r\n".encode() + b"".join(k + b": " + v + b"\r\n" for k, v in headers)
    return head + b"\r\n" + body


def bad_request_reply() -> bytes:
    """The whole HTTP/1.1 400 reply, head and JSON body, as written on the connection."""
    return json_reply("400 Bad Request", MESSAGE)


def http_protocol(head_timeout_s: float) -> Any:
    """What uvicorn's ``http`` setting gets: the guarded protocol class, or ``"auto"``."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    if not callable(getattr(AutoHTTPProtocol, "send_400_response", None)):
        return "auto"
    reply = bad_request_reply()
    late = json_reply("408 Request Timeout", LATE_MESSAGE)

    class GuardedHttp(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
        """uvicorn's HTTP protocol, its answer to an unparsable request in JSON, the time a
        request's head may take bounded."""

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._head_timer: Any = None
            self._time_head()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._time_head()

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_head_timer()
            super().connection_lost(exc)

        def send_400_response(self, msg: str) -> None:
            self._stop_head_timer()
            self.transport.write(reply)
            self.transport.close()

        def _reading_head(self) -> bool:
            cycle = getattr(self, "cycle", None)
            return cycle is None or cycle.response_complete

        def _time_head(self) -> None:
            """A head being read has a deadline (kept across its chunks); none otherwise."""
            if not self._reading_head():
                self._stop_head_timer()
            elif self._head_timer is None and not self.transport.is_closing():
                self._head_timer = self.loop.call_later(head_timeout_s, self._head_late)

        def _stop_head_timer(self) -> None:
            if getattr(self, "_head_timer", None) is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_late(self) -> None:
            self._head_timer = None
            if self._reading_head() and not self.transport.is_closing():
                self.transport.write(late)
                self.transport.close()

    return GuardedHttp
