"""The dashboard's routes, authentication and CSRF protection (see the package docstring).

* Reading: open when no credentials are configured (then every action is refused: the
  dashboard is read-only); with credentials, every page needs them too.
* Credentials: a token (``Authorization: Bearer``, or the login form, which sets a signed
  cookie), HTTP basic ``user:password``, or ``auth=`` a callable that the host app uses to say
  whether a request is allowed (its own session, its own users).
* Every POST also needs the CSRF token of the page it came from (a random cookie, HttpOnly and
  SameSite=Strict, repeated in a hidden field) and, when the browser sends one, an ``Origin``
  of this very site.
* Every value from the database is escaped by Jinja2's autoescaping; a page names a queue
  only by a name that is looked up in the database's list of queue tables.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import hmac
import json
import logging
import math
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote
from urllib.parse import urlencode
from urllib.parse import urlsplit

import jinja2
from sqlalchemy import Connection
from sqlalchemy import Engine
from sqlalchemy import Table
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.responses import PlainTextResponse
from starlette.responses import RedirectResponse
from starlette.responses import Response
from starlette.routing import Mount
from starlette.routing import Route
from starlette.staticfiles import StaticFiles

from .. import ops
from ..exc import Q4MError
from ..exc import QueueTableError
from ..worker.consumer import reflect_queue_table
from ..worker.deadletter import DEAD_LETTER_TABLE
from ..worker.registry import DEFAULT_STALE_AFTER
from ..worker.registry import THROUGHPUT_TABLE
from ..worker.registry import WORKERS_TABLE

__all__ = ["Auth", "dashboard", "serve"]

logger = logging.getLogger("sqlalchemy_q4m.web")

HERE = Path(__file__).parent
CSRF_COOKIE = "q4m_csrf"
AUTH_COOKIE = "q4m_auth"
PAGE_SIZE = 50


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


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))


class _Guard:
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
            if _same(given, auth.basic):
                return True
        if auth.token:
            if scheme.lower() == "bearer" and _same(value.strip(), auth.token):
                return True
            cookie = request.cookies.get(AUTH_COOKIE, "")
            if cookie and _same(cookie, self.session_value()):
                return True
        return bool(auth.check is not None and auth.check(request))

    @staticmethod
    def csrf_ok(request: Request, form_value: Any) -> bool:
        cookie = request.cookies.get(CSRF_COOKIE, "")
        if not cookie or not isinstance(form_value, str) or not _same(cookie, form_value):
            return False
        origin = request.headers.get("origin")
        if origin and origin != "null":
            host = request.headers.get("host", "")
            return urlsplit(origin).netloc == host
        return True


# -- formatting helpers for the templates -----------------------------------------------------


def _age(seconds: float | None) -> str:
    if seconds is None or math.isnan(seconds):
        return "\u2013"
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m {seconds % 60:.0f}s"
    if seconds < 86400:
        return f"{seconds / 3600:.0f}h {seconds % 3600 / 60:.0f}m"
    return f"{seconds / 86400:.0f}d {seconds % 86400 / 3600:.0f}h"


def _since(unix: float) -> str:
    return _age(time.time() - unix)


def _number(value: int | None) -> str:
    return "\u2013" if value is None else f"{value:,}"


def _pretty(payload: str) -> str:
    """A JSON text indented for reading (left as it is when it is not JSON)."""
    try:
        return json.dumps(json.loads(payload), indent=2, ensure_ascii=False, sort_keys=True)
    except (ValueError, TypeError):
        return payload


def _chart(series: list[tuple[dt.datetime, int, int]]) -> dict[str, Any]:
    """Bars for an inline SVG: one per minute, done above failed (numbers only)."""
    peak = max([d + f for _, d, f in series] + [1])
    width, height = 600, 120
    step = width / max(1, len(series))
    bars = []
    for i, (minute, done, failed) in enumerate(series):
        h_done = height * done / peak
        h_failed = height * failed / peak
        bars.append(
            {
                "x": round(i * step, 2),
                "w": round(max(1.0, step - 1), 2),
                "done_y": round(height - h_done, 2),
                "done_h": round(h_done, 2),
                "failed_y": round(height - h_done - h_failed, 2),
                "failed_h": round(h_failed, 2),
                "title": f"{minute:%H:%M} UTC: {done} done, {failed} failed",
            }
        )
    total_done = sum(d for _, d, _ in series)
    total_failed = sum(f for _, _, f in series)
    return {
        "bars": bars,
        "width": width,
        "height": height,
        "peak": peak,
        "done": total_done,
        "failed": total_failed,
        "rate": total_done / max(1, len(series)) / 60,
    }


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(HERE / "templates")),
        autoescape=True,  # every value is user data: payloads, errors, table names
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["age"] = _age
    env.filters["since"] = _since
    env.filters["number"] = _number
    env.filters["pretty"] = _pretty
    return env


# -- the app ----------------------------------------------------------------------------------


class Dashboard:
    """The state behind the routes: the engine, the options, the reflected tables."""

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
        self.guard = _Guard(auth)
        # without credentials nobody could be allowed to change data: read-only
        self.read_only = read_only or not auth.configured
        self.dead_table = dead_table
        self.workers_table = workers_table
        self.throughput_table = throughput_table
        self.refresh = refresh
        self.exact_limit = exact_limit
        self.stale_after = stale_after
        self.title = title
        self.env = _environment()
        self._tables: dict[str, tuple[float, Table]] = {}
        self._lock = threading.Lock()

    # -- helpers --

    def table(self, conn: Connection, name: str) -> Table:
        """A queue table by a name from the page: checked against the database's queue
        tables first; reflected tables are kept for a minute."""
        return self._reflect(conn, ops.check_queue_name(conn, name, self.dead_table))

    def _reflect(self, conn: Connection, known: str) -> Table:
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
        return flash if flash and _same(signature, self._sign(flash)) else ""

    def redirect(self, request: Request, path: str, flash: str = "") -> RedirectResponse:
        query = f"?{urlencode({'flash': flash, 'sig': self._sign(flash)})}" if flash else ""
        return RedirectResponse(f"{self.base(request)}{path}{query}", status_code=303)

    def error(self, request: Request, status: int, message: str) -> HTMLResponse:
        return self.render(request, "error.html", status_code=status, message=message)

    # -- pages --

    def overview(self, request: Request) -> Response:
        with self.engine.connect() as conn:
            queues = ops.overview(
                conn,
                dead_name=self.dead_table,
                workers_name=self.workers_table,
                exact_limit=self.exact_limit,
                stale_after=self.stale_after,
                reflect=self._reflect,
            )
            workers = ops.workers(conn, self.workers_table, stale_after=self.stale_after)
            series = ops.throughput(conn, self.throughput_table, minutes=60)
        return self.render(
            request,
            "overview.html",
            queues=queues,
            alive=[w for w in workers if not w.lost],
            lost=[w for w in workers if w.lost],
            chart=_chart(series),
        )

    def queue(self, request: Request) -> Response:
        name = request.path_params["name"]
        state = request.query_params.get("state", "all")
        if state not in ops.JOB_STATES:
            return self.error(request, 400, f"unknown state {state!r}")
        try:
            offset = max(0, int(request.query_params.get("offset", "0")))
        except ValueError:
            return self.error(request, 400, "offset is a number")
        with self.engine.connect() as conn:
            try:
                table = self.table(conn, name)
            except QueueTableError as err:
                return self.error(request, 404, str(err))
            workers = ops.workers(conn, self.workers_table, stale_after=self.stale_after)
            held = [
                (w, t, i, s) for w in workers if not w.lost for t, i, s in w.in_hand if t == name
            ]
            page = ops.list_jobs(
                conn,
                table,
                state=state,
                limit=PAGE_SIZE,
                offset=offset,
                held=[i for _, _, i, _ in held],
            )
            summary = next(
                (
                    q
                    for q in ops.overview(
                        conn,
                        dead_name=self.dead_table,
                        workers_name=self.workers_table,
                        exact_limit=self.exact_limit,
                        stale_after=self.stale_after,
                        only=name,
                        reflect=self._reflect,
                    )
                ),
                None,
            )
        return self.render(
            request,
            "queue.html",
            name=name,
            page=page,
            states=ops.JOB_STATES,
            held=held,
            summary=summary,
            ages={row["id"]: ops.job_age(row["id"]) for row in page.rows},
        )

    def job(self, request: Request) -> Response:
        name, job_id = request.path_params["name"], request.path_params["job_id"]
        with self.engine.connect() as conn:
            try:
                table = self.table(conn, name)
                job = ops.get_job(conn, table, job_id)
            except QueueTableError as err:
                return self.error(request, 404, str(err))
            except Q4MError as err:
                return self.error(request, 400, str(err))
        if job is None:
            return self.error(
                request, 404, f"job {job_id} is not waiting in {name} (done, or in a worker's hand)"
            )
        payload = {k: v for k, v in job.items() if not k.startswith("_")}
        return self.render(
            request,
            "job.html",
            name=name,
            job=payload,
            age=job["_age"],
            attempts=job["_attempts"],
            run_at=job["_run_at"],
            now_unix=time.time(),
            payload=json.dumps(payload, indent=2, default=str, ensure_ascii=False),
        )

    def dead(self, request: Request) -> Response:
        queue = request.query_params.get("queue") or None
        try:
            offset = max(0, int(request.query_params.get("offset", "0")))
        except ValueError:
            return self.error(request, 400, "offset is a number")
        with self.engine.connect() as conn:
            counts = ops.dead_counts(conn, self.dead_table)
            letters = ops.dead_letters(
                conn, self.dead_table, queue, limit=PAGE_SIZE + 1, offset=offset
            )
        return self.render(
            request,
            "dead.html",
            queue=queue,
            counts=counts,
            letters=letters[:PAGE_SIZE],
            more=len(letters) > PAGE_SIZE,
            offset=offset,
            page_size=PAGE_SIZE,
        )

    def dead_letter(self, request: Request) -> Response:
        try:
            letter_id = int(request.path_params["letter_id"])
        except ValueError:
            return self.error(request, 404, "no such dead letter")
        with self.engine.connect() as conn:
            letter = ops.dead_letter(conn, letter_id, self.dead_table)
        if letter is None:
            return self.error(request, 404, f"no dead letter #{letter_id}")
        return self.render(request, "dead_letter.html", letter=letter)

    def workers(self, request: Request) -> Response:
        with self.engine.connect() as conn:
            workers = ops.workers(conn, self.workers_table, stale_after=self.stale_after)
        return self.render(request, "workers.html", workers=workers, now=time.time())

    def enqueue_form(self, request: Request) -> Response:
        with self.engine.connect() as conn:
            names = ops.queue_table_names(conn, self.dead_table)
        return self.render(
            request,
            "enqueue.html",
            names=names,
            selected=request.query_params.get("queue", ""),
            text="",
            delay="",
            message="",
        )

    def metrics(self, request: Request) -> Response:
        from ..worker.metrics import dashboard_metrics

        with self.engine.connect() as conn:
            body = dashboard_metrics(
                conn,
                dead_name=self.dead_table,
                workers_name=self.workers_table,
                exact_limit=self.exact_limit,
                stale_after=self.stale_after,
            )
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    # -- actions --

    async def _action_form(self, request: Request) -> dict[str, Any] | Response:
        """The form of a POST that changes data, once authentication and CSRF are checked."""
        if self.read_only:
            return self.error(request, 403, "the dashboard is read-only")
        if not self.guard.authenticated(request):
            return self.error(request, 403, "log in to change data")
        form = await request.form()
        values: dict[str, Any] = {k: form.getlist(k) for k in form}
        if not self.guard.csrf_ok(request, form.get("csrf")):
            return self.error(request, 403, "bad or missing CSRF token: reload the page")
        return values

    async def dead_action(self, request: Request) -> Response:
        action = request.path_params["action"]
        if action not in ("retry", "purge"):
            return self.error(request, 404, "no such action")
        form = await self._action_form(request)
        if isinstance(form, Response):
            return form
        queue = (form.get("queue") or [""])[0]
        try:
            ids = [int(i) for i in form.get("id", [])]
        except ValueError:
            return self.error(request, 400, "dead letter ids are numbers")
        everything = (form.get("all") or [""])[0] == "1"
        if not ids and not everything:
            return self.error(request, 400, "choose dead letters, or all of them")

        def work() -> int:
            with self.engine.connect() as conn:
                name = ops.check_queue_name(conn, queue, self.dead_table)
                if action == "retry":
                    return ops.retry_dead_letters(conn, name, ids or None, self.dead_table)
                return ops.purge_dead_letters(conn, name, ids or None, self.dead_table)

        try:
            count = await run_in_threadpool(work)
        except Q4MError as err:
            return self.error(request, 400, str(err))
        verb = "requeued" if action == "retry" else "purged"
        logger.info("dashboard: %s %d dead letter(s) of %s", verb, count, queue)
        return self.redirect(request, "/dead", f"{verb} {count} dead letter(s) of {queue}")

    async def enqueue(self, request: Request) -> Response:
        form = await self._action_form(request)
        if isinstance(form, Response):
            return form
        queue = (form.get("queue") or [""])[0]
        body = (form.get("jobs") or [""])[0]
        delay_text = (form.get("delay") or [""])[0].strip()

        def again(message: str, names: list[str]) -> Response:
            return self.render(
                request,
                "enqueue.html",
                status_code=400,
                names=names,
                selected=queue,
                text=body,
                delay=delay_text,
                message=message,
            )

        def work() -> tuple[int, str | None, list[str]]:
            with self.engine.connect() as conn:
                names = ops.queue_table_names(conn, self.dead_table)
                try:
                    table = self.table(conn, queue)
                    rows = _json_jobs(body)
                    delay = float(delay_text) if delay_text else None
                    if delay is not None and not (0 <= delay < 10**9):
                        raise Q4MError("delay: seconds, >= 0")
                    conn.rollback()  # the look-ups' transaction: enqueue_rows commits its own
                    count = ops.enqueue_rows(conn, table, rows, delay=delay)
                except ValueError as err:
                    conn.rollback()
                    return 0, str(err), names
                except Q4MError as err:
                    conn.rollback()
                    return 0, str(err), names
                return count, None, names

        count, problem, names = await run_in_threadpool(work)
        if problem is not None:
            return again(problem, names)
        where = f"/queues/{quote(queue, safe='')}"
        return self.redirect(request, where, f"enqueued {count} job(s) into {queue}")

    async def login(self, request: Request) -> Response:
        if request.method == "GET":
            return self.render(request, "login.html", message="")
        form = await request.form()
        if not self.guard.csrf_ok(request, form.get("csrf")):
            return self.error(request, 403, "bad or missing CSRF token: reload the page")
        token = form.get("token")
        if not self.auth.token or not isinstance(token, str) or not _same(token, self.auth.token):
            return self.render(request, "login.html", status_code=403, message="wrong token")
        response = self.redirect(request, "/")
        response.set_cookie(
            AUTH_COOKIE,
            self.guard.session_value(),
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            path=self.base(request) or "/",
        )
        return response

    async def logout(self, request: Request) -> Response:
        form = await request.form()
        if not self.guard.csrf_ok(request, form.get("csrf")):
            return self.error(request, 403, "bad or missing CSRF token: reload the page")
        response = self.redirect(request, "/")
        response.delete_cookie(AUTH_COOKIE, path=self.base(request) or "/")
        return response


def _json_jobs(body: str) -> list[dict[str, Any]]:
    """One JSON object, or a list of them; ValueError otherwise."""
    try:
        data = json.loads(body)
    except json.JSONDecodeError as err:
        raise ValueError(f"invalid JSON: {err.msg} (line {err.lineno})") from None
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    rows = data if isinstance(data, list) else [data]
    if not rows or not all(isinstance(row, dict) for row in rows):
        raise ValueError("a job is a JSON object; give one, or a list of them")
    return rows


_SECURITY_HEADERS = {
    "content-security-policy": "default-src 'self'; img-src 'self' data:; "
    "style-src 'self'; script-src 'self'; frame-ancestors 'none'; form-action 'self'",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "same-origin",
    "cache-control": "no-store",
}


class _Protect:
    """ASGI middleware: every page needs the credentials when some are configured; security
    headers on every response."""

    def __init__(self, app: Any, board: Dashboard) -> None:
        self.app = app
        self.board = board

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        board = self.board

        async def send_with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {k.lower() for k, _ in headers}
                for key, value in _SECURITY_HEADERS.items():
                    if key.encode() not in present:
                        headers.append((key.encode(), value.encode()))
                message = {**message, "headers": headers}
            await send(message)

        request = Request(scope, receive)
        path = scope.get("path", "")
        root = str(scope.get("root_path", "")).rstrip("/")
        relative = path[len(root) :] if root and path.startswith(root) else path
        public = relative.startswith("/static/") or relative == "/login"
        if board.auth.configured and not public and not board.guard.authenticated(request):
            response: Response
            if board.auth.basic and not board.auth.token:
                response = PlainTextResponse(
                    "authentication required",
                    status_code=401,
                    headers={"www-authenticate": 'Basic realm="q4m", charset="UTF-8"'},
                )
            elif board.auth.token and request.method == "GET" and relative != "/metrics":
                response = RedirectResponse(f"{root}/login", status_code=303)
            else:
                response = PlainTextResponse("authentication required", status_code=401)
            await response(scope, receive, send_with_headers)
            return
        await self.app(scope, receive, send_with_headers)


def dashboard(
    bind: Engine | str,
    *,
    auth: Auth | Callable[[Request], bool] | None = None,
    token: str | None = None,
    basic_auth: str | None = None,
    read_only: bool = False,
    dead_table: str = DEAD_LETTER_TABLE,
    workers_table: str = WORKERS_TABLE,
    throughput_table: str = THROUGHPUT_TABLE,
    refresh: float = 5.0,
    exact_limit: int = 100_000,
    stale_after: float = DEFAULT_STALE_AFTER,
    title: str = "q4m",
) -> Any:
    """The dashboard as an ASGI app, for ``app.mount("/queues", dashboard(engine, ...))``.

    ``auth`` is an :class:`Auth` or the host app's check ``(request) -> bool``; ``token`` and
    ``basic_auth`` are shortcuts.  Without any credentials the dashboard is read-only.
    """
    if isinstance(bind, str):
        from ..worker.runtime import make_engine

        bind = make_engine(bind, 4)
    if auth is None or isinstance(auth, Auth):
        base = auth or Auth()
        checked = Auth(
            token=token if token is not None else base.token,
            basic=basic_auth if basic_auth is not None else base.basic,
            check=base.check,
        )
    else:
        checked = Auth(token=token, basic=basic_auth, check=auth)
    board = Dashboard(
        bind,
        auth=checked,
        read_only=read_only,
        dead_table=dead_table,
        workers_table=workers_table,
        throughput_table=throughput_table,
        refresh=refresh,
        exact_limit=exact_limit,
        stale_after=stale_after,
        title=title,
    )
    routes = [
        Route("/", board.overview, name="overview"),
        Route("/queues/{name}", board.queue, name="queue"),
        Route("/queues/{name}/jobs/{job_id}", board.job, name="job"),
        Route("/dead", board.dead, name="dead"),
        Route("/dead/{letter_id:int}", board.dead_letter, name="dead_letter"),
        Route("/dead/{action}", board.dead_action, methods=["POST"], name="dead_action"),
        Route("/workers", board.workers, name="workers"),
        Route("/enqueue", board.enqueue_form, name="enqueue_form"),
        Route("/enqueue", board.enqueue, methods=["POST"], name="enqueue"),
        Route("/login", board.login, methods=["GET", "POST"], name="login"),
        Route("/logout", board.logout, methods=["POST"], name="logout"),
        Route("/metrics", board.metrics, name="metrics"),
        Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    app = Starlette(routes=routes)
    app.state.dashboard = board
    return _Protect(app, board)


LOOPBACK = ("127.0.0.1", "::1", "localhost")


def serve(
    url: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    token: str | None = None,
    basic_auth: str | None = None,
    read_only: bool = False,
    dead_table: str = DEAD_LETTER_TABLE,
    refresh: float = 5.0,
) -> int:
    """``q4m web``: the dashboard under Uvicorn.  Refuses an address other than loopback
    without credentials."""
    import uvicorn

    if host not in LOOPBACK and not (token or basic_auth):
        raise Q4MError(
            f"refusing to listen on {host} without --token or --basic-auth "
            "(Q4M_WEB_TOKEN, Q4M_WEB_BASIC_AUTH): anyone could read the queues"
        )
    app = dashboard(
        url,
        token=token or None,
        basic_auth=basic_auth or None,
        read_only=read_only,
        dead_table=dead_table,
        refresh=refresh,
    )
    print(f"q4m web: http://{host}:{port}/ (Ctrl-C to stop)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
    return 0
