"""Who may use the dashboard and how a request proves it: :class:`Auth` (a token, HTTP basic
credentials, or the host app's own check), the login cookie, the CSRF token of every form, and
the middleware that guards every page and adds the security headers."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.responses import RedirectResponse
from starlette.responses import Response

from ..exc import Q4MError

__all__ = ["AUTH_COOKIE", "CSRF_COOKIE", "Auth", "Guard", "Protect", "same"]

CSRF_COOKIE = "q4m_csrf"
AUTH_COOKIE = "q4m_auth"


@dataclass(frozen=True)
class Auth:
    """Who may use the dashboard: a ``token``, HTTP ``basic`` credentials (``user:password``),
    or ``check(request) -> bool`` (the host app's own authentication); any one suffices."""

    token: str | None = None
    basic: str | None = None
    check: Callable[[Request], bool] | None = None

    def __post_init__(self) -> None:
        if self.basic is not None and ":" not in self.basic:
            raise Q4MError("basic auth credentials are USER:PASSWORD")
        if self.token is not None and len(self.token) < 8:
            raise Q4MError("a dashboard token has at least 8 characters")

    @property
    def configured(self) -> bool:
        return bool(self.token or self.basic or self.check)


def same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))


class Guard:
    """Authentication and CSRF checks of one dashboard."""

    def __init__(self, auth: Auth) -> None:
        self.auth = auth
        self.secret = secrets.token_bytes(32)  # signs the login cookie of this process

    def session_value(self) -> str:
        assert self.auth.token is not None
        return hmac.new(self.secret, self.auth.token.encode(), hashlib.sha256).hexdigest()

    def authenticated(self, request: Request) -> bool:
        auth = self.auth
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        if auth.basic and scheme.lower() == "basic":
            try:
                given = base64.b64decode(value.strip(), validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                given = ""
            if same(given, auth.basic):
                return True
        if auth.token:
            if scheme.lower() == "bearer" and same(value.strip(), auth.token):
                return True
            cookie = request.cookies.get(AUTH_COOKIE, "")
            if cookie and same(cookie, self.session_value()):
                return True
        return bool(auth.check is not None and auth.check(request))

    @staticmethod
    def csrf_ok(request: Request, form_value: Any) -> bool:
        cookie = request.cookies.get(CSRF_COOKIE, "")
        if not cookie or not isinstance(form_value, str) or not same(cookie, form_value):
            return False
        origin = request.headers.get("origin")
        if origin and origin != "null":
            host = request.headers.get("host", "")
            return urlsplit(origin).netloc == host
        return True


SECURITY_HEADERS = {
    "content-security-policy": "default-src 'self'; img-src 'self' data:; "
    "style-src 'self'; script-src 'self'; frame-ancestors 'none'; form-action 'self'",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "same-origin",
    "cache-control": "no-store",
}


class Protect:
    """ASGI middleware: every page needs the credentials when some are configured; security
    headers on every response."""

    def __init__(self, app: Any, guard: Guard) -> None:
        self.app = app
        self.guard = guard

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        guard = self.guard
        auth = guard.auth

        async def send_with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {k.lower() for k, _ in headers}
                for key, value in SECURITY_HEADERS.items():
                    if key.encode() not in present:
                        headers.append((key.encode(), value.encode()))
                message = {**message, "headers": headers}
            await send(message)

        request = Request(scope, receive)
        path = scope.get("path", "")
        root = str(scope.get("root_path", "")).rstrip("/")
        relative = path[len(root) :] if root and path.startswith(root) else path
        public = relative.startswith("/static/") or relative == "/login"
        if auth.configured and not public and not guard.authenticated(request):
            response: Response
            if auth.basic and not auth.token:
                response = PlainTextResponse(
                    "authentication required",
                    status_code=401,
                    headers={"www-authenticate": 'Basic realm="q4m", charset="UTF-8"'},
                )
            elif auth.token and request.method == "GET" and relative != "/metrics":
                response = RedirectResponse(f"{root}/login", status_code=303)
            else:
                response = PlainTextResponse("authentication required", status_code=401)
            await response(scope, receive, send_with_headers)
            return
        await self.app(scope, receive, send_with_headers)
