"""The dashboard's ``/metrics``, read from the database: depth, delayed, in hand and dead
per queue, the oldest job's age, workers alive and lost; the same cheap queries as its
overview page.  (The workers' own metrics are :mod:`sqlalchemy_q4m.worker.metrics`.)"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from sqlalchemy import Connection

from .. import ops
from ..worker.deadletter import DEAD_LETTER_TABLE
from ..worker.metrics import prometheus
from ..worker.registry import DEFAULT_STALE_AFTER
from ..worker.registry import WORKERS_TABLE

__all__ = ["dashboard_metrics"]


def dashboard_metrics(
    conn: Connection,
    *,
    dead_name: str = DEAD_LETTER_TABLE,
    workers_name: str = WORKERS_TABLE,
    exact_limit: int = 100_000,
    stale_after: float = DEFAULT_STALE_AFTER,
) -> bytes:
    """The exposition text of the dashboard's ``/metrics``, read from the database."""
    client = prometheus()
    from prometheus_client.core import GaugeMetricFamily

    queues = ops.overview(
        conn,
        dead_name=dead_name,
        workers_name=workers_name,
        exact_limit=exact_limit,
        stale_after=stale_after,
    )
    workers = ops.workers(conn, workers_name, stale_after=stale_after)

    class _Collector:
        def collect(self) -> Iterator[Any]:
            jobs = GaugeMetricFamily(
                "q4m_queue_jobs",
                "Jobs in a queue by state (total is an estimate when q4m_queue_exact is 0; "
                "delayed is absent when it was not counted)",
                labels=["queue", "state"],
            )
            exact = GaugeMetricFamily(
                "q4m_queue_exact", "1 when the counts are exact", labels=["queue"]
            )
            oldest = GaugeMetricFamily(
                "q4m_queue_oldest_job_age_seconds",
                "Age of the oldest job waiting in a queue",
                labels=["queue"],
            )
            dead = GaugeMetricFamily("q4m_dead_letters", "Dead letters", labels=["queue"])
            for q in queues:
                jobs.add_metric([q.table, "total"], q.total)
                jobs.add_metric([q.table, "queued"], q.queued)
                jobs.add_metric([q.table, "in_hand"], q.in_hand)
                if q.delayed is not None:
                    jobs.add_metric([q.table, "delayed"], q.delayed)
                exact.add_metric([q.table], 1 if q.exact else 0)
                if q.oldest_age is not None:
                    oldest.add_metric([q.table], q.oldest_age)
                dead.add_metric([q.table], q.dead)
            alive = GaugeMetricFamily(
                "q4m_workers", "Registered worker processes by state", labels=["state"]
            )
            alive.add_metric(["alive"], sum(1 for w in workers if not w.lost))
            alive.add_metric(["lost"], sum(1 for w in workers if w.lost))
            yield from (jobs, exact, oldest, dead, alive)

    registry = client.CollectorRegistry()
    registry.register(_Collector())
    body: bytes = client.generate_latest(registry)
    return body
