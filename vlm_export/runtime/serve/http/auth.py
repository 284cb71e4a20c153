"""Who may call the service: a bearer token, or a session cookie the login form sets.

With a token configured, every request except the public paths (``/healthz``, the page's own
static files and the login form) needs ``Authorization: Bearer TOKEN`` or the session cookie that
``POST /login`` sets after checking the token. The cookie is ``HttpOnly`` and ``SameSite=Strict``
(a browser cannot put a header on an ``<img>`` stream, so the page needs a cookie; Strict keeps
other sites from riding on it). Its value is ``expiry.nonce.signature``, signed with a key drawn
at start, so sessions end when the service restarts and no session list grows. Every comparison
is ``hmac.compare_digest``. A refused request is answered 401 before its body is read.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

from starlette.datastructures import Headers
from starlette.requests import cookie_parser
from starlette.types import ASGIApp, Receive, Scope, Send

from vlm_export.runtime.serve.http.replies import error

COOKIE = "vlm_edge_session"
#: how long a login lasts (the service's restart ends it sooner)
SESSION_S = 12 * 3600
#: paths anyone may fetch: the health check, the page shell (no data in it) and the login form
PUBLIC_PATHS = frozenset(
    {"/healthz", "/", "/static/app.js", "/static/style.css", "/login", "/logout", "/favicon.ico"}
)


class Sessions:
    """Issues and checks signed session cookie values (a random key per service start)."""

    def __init__(self, token: str, lifetime_s: int = SESSION_S) -> None:
        self._token = token.encode("utf-8")
        self._key = secrets.token_bytes(32)
        self.lifetime_s = lifetime_s

    def token_matches(self, given: str | bytes) -> bool:
        """True when ``given`` is the token (constant-time comparison)."""
        if isinstance(given, str):
            given = given.encode("utf-8", "surrogatepass")
        return hmac.compare_digest(given, self._token)

    def _sign(self, payload: str) -> str:
        return hmac.new(self._key, payload.encode("ascii"), hashlib.sha256).hexdigest()

    def issue(self) -> str:
        """A new session cookie value, valid for ``lifetime_s``."""
        payload = f"{int(time.time()) + self.lifetime_s}.{secrets.token_urlsafe(16)}"
        return f"{payload}.{self._sign(payload)}"

    def valid(self, value: str) -> bool:
        """True for a cookie value this service issued that has not expired."""
        payload, _, signature = value.rpartition(".")
        expiry = payload.partition(".")[0]
        if not payload.isascii() or not expiry.isdigit():
            return False
        if not hmac.compare_digest(
            signature.encode("ascii", "replace"), self._sign(payload).encode()
        ):
            return False
        return int(expiry) > time.time()


class Auth:
    """Middleware: 401 JSON for a request without a valid bearer token or session cookie."""

    def __init__(self, app: ASGIApp, sessions: Sessions) -> None:
        self.app = app
        self.sessions = sessions

    def allowed(self, scope: Scope) -> bool:
        """True when the request carries the token or a valid session cookie."""
        headers = Headers(scope=scope)
        scheme, _, credential = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and credential:
            raw = credential.strip().encode("latin-1")  # the header's own bytes
            return self.sessions.token_matches(raw)
        cookie = cookie_parser(headers.get("cookie", "")).get(COOKIE)
        return bool(cookie) and self.sessions.valid(cookie)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan" or scope["path"] in PUBLIC_PATHS or self.allowed(scope):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        reply = error(
            401,
            "missing or wrong credential: send 'Authorization: Bearer TOKEN' or log in on the page",
            {"WWW-Authenticate": "Bearer"},
        )
        await reply(scope, receive, send)
