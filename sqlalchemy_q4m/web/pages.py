"""The dashboard's pages: what each GET route reads (through :mod:`sqlalchemy_q4m.ops`) and
renders."""

from __future__ import annotations

import json
import time

from starlette.requests import Request
from starlette.responses import Response

from .. import ops
from ..exc import Q4MError
from ..exc import QueueTableError
from .board import PAGE_SIZE
from .board import Board
from .templating import chart

__all__ = ["Pages"]


class Pages(Board):
    """The pages (GET): overview, a queue, a job, dead letters, workers, the enqueue form,
    metrics."""

    def overview(self, request: Request) -> Response:
        with self.engine.connect() as conn:
            queues = ops.overview(
                conn,
                dead_name=self.dead_table,
                workers_name=self.workers_table,
                exact_limit=self.exact_limit,
                stale_after=self.stale_after,
                reflect=self.reflect,
            )
            workers = ops.workers(conn, self.workers_table, stale_after=self.stale_after)
            series = ops.throughput(conn, self.throughput_table, minutes=60)
        return self.render(
            request,
            "overview.html",
            queues=queues,
            alive=[w for w in workers if not w.lost],
            lost=[w for w in workers if w.lost],
            chart=chart(series),
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
                        reflect=self.reflect,
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
        from .metrics import dashboard_metrics

        with self.engine.connect() as conn:
            body = dashboard_metrics(
                conn,
                dead_name=self.dead_table,
                workers_name=self.workers_table,
                exact_limit=self.exact_limit,
                stale_after=self.stale_after,
            )
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")
