"""The dashboard's app: its routes, and how it is served (see the package docstring).

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

from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Mount
from starlette.routing import Route
from starlette.staticfiles import StaticFiles

from ..exc import Q4MError
from ..worker.deadletter import DEAD_LETTER_TABLE
from ..worker.registry import DEFAULT_STALE_AFTER
from ..worker.registry import THROUGHPUT_TABLE
from ..worker.registry import WORKERS_TABLE
from .actions import Actions
from .auth import Auth
from .auth import Protect
from .pages import Pages
from .templating import HERE

__all__ = ["Auth", "dashboard", "serve"]


class Dashboard(Pages, Actions):
    """One dashboard: its state (:class:`~sqlalchemy_q4m.web.board.Board`), its pages and its
    actions, which the routes of :func:`dashboard` call."""


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
    return Protect(app, board.guard)


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
