"""The state of one dashboard and what its pages and actions share: rendering a template
(with the CSRF cookie), signed flash messages, redirects, queue tables by a name from a page."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from typing import Any
from urllib.parse import urlencode

from sqlalchemy import Connection
from sqlalchemy import Engine
from sqlalchemy import Table
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.responses import RedirectResponse

from .. import ops
from ..schema.reflect import reflect_queue_table
from .auth import CSRF_COOKIE
from .auth import Auth
from .auth import Guard
from .auth import same
from .templating import environment

__all__ = ["PAGE_SIZE", "Board"]

PAGE_SIZE = 50


class Board:
    """The state behind the routes: the engine, the options, the reflected tables, and
    how a page is rendered, a flash message signed, a redirect made."""

    def __init__(
        self,
        engine: Engine,
        *,
        auth: Auth,
        read_only: bool,
        dead_table: str,
        workers_table: str,
        throughput_table: str,
        refresh: float,
        exact_limit: int,
        stale_after: float,
        title: str,
    ) -> None:
        self.engine = engine
        self.auth = auth
        self.guard = Guard(auth)
        # without credentials nobody could be allowed to change data: read-only
        self.read_only = read_only or not auth.configured
        self.dead_table = dead_table
        self.workers_table = workers_table
        self.throughput_table = throughput_table
        self.refresh = refresh
        self.exact_limit = exact_limit
        self.stale_after = stale_after
        self.title = title
        self.env = environment()
        self._tables: dict[str, tuple[float, Table]] = {}
        self._lock = threading.Lock()

    # -- helpers --

    def table(self, conn: Connection, name: str) -> Table:
        """A queue table by a name from the page: checked against the database's queue
        tables first; reflected tables are kept for a minute."""
        return self.reflect(conn, ops.check_queue_name(conn, name, self.dead_table))

    def reflect(self, conn: Connection, known: str) -> Table:
        with self._lock:
            cached = self._tables.get(known)
        if cached is not None and time.monotonic() - cached[0] < 60:
            return cached[1]
        table = reflect_queue_table(conn, known)
        conn.rollback()
        with self._lock:
            self._tables[known] = (time.monotonic(), table)
        return table

    def base(self, request: Request) -> str:
        return str(request.scope.get("root_path", "")).rstrip("/")

    def render(
        self, request: Request, template: str, status_code: int = 200, **context: Any
    ) -> HTMLResponse:
        csrf = request.cookies.get(CSRF_COOKIE) or secrets.token_urlsafe(32)
        page = self.env.get_template(template).render(
            base=self.base(request),
            title=self.title,
            csrf=csrf,
            read_only=self.read_only,
            logged_in=self.auth.configured and self.guard.authenticated(request),
            login_form=bool(self.auth.token),
            refresh=self.refresh,
            path=request.url.path,
            flash=self.flash_of(request),
            **context,
        )
        response = HTMLResponse(page, status_code=status_code)
        if request.cookies.get(CSRF_COOKIE) != csrf:
            response.set_cookie(
                CSRF_COOKIE,
                csrf,
                httponly=True,
                samesite="strict",
                secure=request.url.scheme == "https",
                path=self.base(request) or "/",
            )
        return response

    def _sign(self, flash: str) -> str:
        return hmac.new(self.guard.secret, flash.encode(), hashlib.sha256).hexdigest()[:32]

    def flash_of(self, request: Request) -> str:
        """The message of the action that redirected here; signed, so that a link made
        elsewhere cannot put its own words on the page."""
        flash = request.query_params.get("flash", "")
        signature = request.query_params.get("sig", "")
        return flash if flash and same(signature, self._sign(flash)) else ""

    def redirect(self, request: Request, path: str, flash: str = "") -> RedirectResponse:
        query = f"?{urlencode({'flash': flash, 'sig': self._sign(flash)})}" if flash else ""
        return RedirectResponse(f"{self.base(request)}{path}{query}", status_code=303)

    def error(self, request: Request, status: int, message: str) -> HTMLResponse:
        return self.render(request, "error.html", status_code=status, message=message)
