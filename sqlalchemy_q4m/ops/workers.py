"""The worker registry and the throughput table as the command line and the dashboard show
them: workers (alive or lost), pruning the lost, jobs done and failed per minute."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass

from sqlalchemy import Connection
from sqlalchemy import delete
from sqlalchemy import func
from sqlalchemy import inspect
from sqlalchemy import select
from sqlalchemy import text

from ..worker.registry import COUNTERS
from ..worker.registry import DEFAULT_STALE_AFTER
from ..worker.registry import THROUGHPUT_TABLE
from ..worker.registry import WORKERS_TABLE
from ..worker.registry import throughput_table
from ..worker.registry import worker_registry_table

__all__ = ["WorkerInfo", "prune_lost_workers", "throughput", "workers"]


@dataclass
class WorkerInfo:
    """One row of the worker registry; ``lost`` when its heartbeat is stale."""

    id: str
    host: str
    pid: int
    name: str
    kind: str
    concurrency: int
    processes: int
    queues: list[str]
    started_at: dt.datetime
    heartbeat_at: dt.datetime
    heartbeat_age: float
    counts: dict[str, int]
    in_hand: list[tuple[str, str, float]]  # (table, job id, since: Unix time)
    lost: bool


def workers(
    conn: Connection,
    workers_name: str = WORKERS_TABLE,
    *,
    stale_after: float = DEFAULT_STALE_AFTER,
) -> list[WorkerInfo]:
    """The registered workers, alive first; those silent for ``stale_after`` s are lost."""
    table = worker_registry_table(workers_name)
    if not inspect(conn).has_table(table.name):
        return []
    age = func.timestampdiff(text("SECOND"), table.c.heartbeat_at, func.utc_timestamp())
    rows = conn.execute(select(table, age.label("age")).order_by(table.c.started_at)).all()
    conn.rollback()
    found = []
    for row in rows:
        m = row._mapping
        try:
            held = [(str(t), str(i), float(s)) for t, i, s in json.loads(m["in_hand"] or "[]")]
            queues = [str(q) for q in json.loads(m["queues"] or "[]")]
        except (ValueError, TypeError):
            held, queues = [], []
        found.append(
            WorkerInfo(
                id=m["id"],
                host=m["host"],
                pid=int(m["pid"]),
                name=m["name"],
                kind=m["kind"],
                concurrency=int(m["concurrency"]),
                processes=int(m["processes"]),
                queues=queues,
                started_at=m["started_at"],
                heartbeat_at=m["heartbeat_at"],
                heartbeat_age=float(m["age"] or 0),
                counts={c: int(m[c]) for c in COUNTERS},
                in_hand=held,
                lost=float(m["age"] or 0) > stale_after,
            )
        )
    found.sort(key=lambda w: w.lost)
    return found


def prune_lost_workers(
    conn: Connection, workers_name: str = WORKERS_TABLE, *, older_than: float = 3600.0
) -> int:
    """Delete the rows of workers silent for more than ``older_than`` seconds."""
    table = worker_registry_table(workers_name)
    if not inspect(conn).has_table(table.name):
        return 0
    age = func.timestampdiff(text("SECOND"), table.c.heartbeat_at, func.utc_timestamp())
    result = conn.execute(delete(table).where(age > int(older_than)))
    conn.commit()
    return int(result.rowcount)


def throughput(
    conn: Connection,
    throughput_name: str = THROUGHPUT_TABLE,
    *,
    minutes: int = 60,
    queue: str | None = None,
) -> list[tuple[dt.datetime, int, int]]:
    """(minute, done, failed) for each of the last ``minutes`` minutes (zeros filled in)."""
    table = throughput_table(throughput_name)
    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None, second=0, microsecond=0)
    start = now - dt.timedelta(minutes=minutes - 1)
    found: dict[dt.datetime, tuple[int, int]] = {}
    if inspect(conn).has_table(table.name):
        stmt = (
            select(table.c.minute, func.sum(table.c.done), func.sum(table.c.failed))
            .where(table.c.minute >= start)
            .group_by(table.c.minute)
        )
        if queue is not None:
            stmt = stmt.where(table.c.queue == queue)
        found = {m: (int(d or 0), int(f or 0)) for m, d, f in conn.execute(stmt)}
        conn.rollback()
    series = []
    for i in range(minutes):
        minute = start + dt.timedelta(minutes=i)
        done, failed = found.get(minute, (0, 0))
        series.append((minute, done, failed))
    return series
