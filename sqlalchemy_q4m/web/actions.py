"""The dashboard's actions: the POST routes that change data, or log in and out."""

from __future__ import annotations

import json
import logging
from typing import Any
from urllib.parse import quote

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from .. import ops
from ..exc import Q4MError
from .auth import AUTH_COOKIE
from .auth import same
from .board import Board

__all__ = ["Actions"]

logger = logging.getLogger("sqlalchemy_q4m.web")


class Actions(Board):
    """The actions (POST): retry or purge dead letters, enqueue jobs, log in and out; each
    needs the credentials and the CSRF token of the page it came from."""

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
        if not self.auth.token or not isinstance(token, str) or not same(token, self.auth.token):
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
