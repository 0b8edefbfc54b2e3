"""Counts of queues, two kinds: :func:`queue_counts` is exact (``q4m stats``: it reads every
row, fine for a command run now and then); :func:`overview` is cheap enough for a page refreshed
every few seconds on big queues (see :mod:`sqlalchemy_q4m.ops`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field
from typing import Any

from sqlalchemy import Connection
from sqlalchemy import Table
from sqlalchemy import func
from sqlalchemy import select

from ..backends.unique_keys import count_keys
from ..exc import QueueTableError
from ..producer.ticks import list_schedules
from ..schema.ddl import JOB_ID
from ..schema.functions import queue_stats
from ..schema.reflect import reflect_queue_table
from ..schema.retry import RUN_AT
from ..server import detect_backend
from ..worker.deadletter import DEAD_LETTER_TABLE
from ..worker.deadletter import dead_letter_table
from ..worker.registry import DEFAULT_STALE_AFTER
from ..worker.registry import WORKERS_TABLE
from .dead import count_dead
from .dead import dead_counts
from .jobs import job_age
from .tables import queue_table_rows
from .workers import workers

__all__ = ["QueueSummary", "overview", "parse_q4m_stats", "queue_counts"]

# -- exact counts (q4m stats) -----------------------------------------------------------------


def queue_counts(conn: Connection, table: Table, dead_name: str) -> dict[str, Any]:
    """``queued`` (ready now), ``delayed``, ``owned`` (in progress), ``dead`` for one queue;
    on Q4M also the engine's own counters (``queue_stats``).  Exact: reads every row."""
    backend = detect_backend(conn)
    total = int(conn.execute(select(func.count()).select_from(table)).scalar() or 0)
    id_column = table.c[JOB_ID]
    if backend == "portable":  # rows another transaction holds are the owned ones
        free = len(conn.execute(select(id_column).with_for_update(skip_locked=True)).all())
    else:  # Q4M: other connections' owned rows are counted but not returned
        free = len(conn.execute(select(id_column)).all())
    conn.rollback()
    delayed = 0
    run_at = table.columns.get(RUN_AT)
    if run_at is not None:
        stmt = select(func.count()).select_from(table).where(run_at > int(time.time()))
        delayed = int(conn.execute(stmt).scalar() or 0)
    counts: dict[str, Any] = {
        "table": table.name,
        "backend": backend,
        "queued": max(0, free - delayed),
        "delayed": delayed,
        "owned": max(0, total - free),
        "dead": count_dead(conn, dead_letter_table(dead_name), table.name),
        "unique_keys": count_keys(conn, table.name),
        "schedules": sum(1 for s in list_schedules(conn) if s.queue == table.name),
    }
    if backend == "native":
        raw = conn.execute(select(queue_stats(table.name))).scalar()
        counts["q4m"] = parse_q4m_stats(raw)
    conn.rollback()
    return counts


def parse_q4m_stats(raw: str | bytes | None) -> dict[str, Any]:
    """``queue_stats()`` (``key: value`` lines; bytes with some drivers) as a dict, numbers as
    ints; ``{"raw": ...}`` if it cannot be parsed."""
    if raw is None:
        return {}
    if isinstance(raw, bytes | bytearray | memoryview):
        raw = bytes(raw).decode("utf-8", "replace")
    stats: dict[str, Any] = {}
    for line in raw.replace(",", "\n").splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            key, sep, value = line.partition("=")
        if sep and key.strip():
            value = value.strip()
            stats[key.strip()] = int(value) if value.lstrip("-").isdigit() else value
    return stats if stats or not raw.strip() else {"raw": raw.strip()}


# -- cheap counts (the dashboard) -------------------------------------------------------------


@dataclass
class QueueSummary:
    """One queue as the overview shows it (see the module docstring for what is exact)."""

    table: str
    backend: str  # "native" (ENGINE=QUEUE) or "portable"
    total: int
    exact: bool  # total is a count, not an estimate
    delayed: int | None  # None: not counted (the table is too big for a scan)
    in_hand: int
    dead: int
    oldest_age: float | None  # seconds since the oldest job was enqueued
    q4m: dict[str, Any] = field(default_factory=dict)

    @property
    def queued(self) -> int:
        return max(0, self.total - (self.delayed or 0) - self.in_hand)


def overview(
    conn: Connection,
    *,
    dead_name: str = DEAD_LETTER_TABLE,
    workers_name: str = WORKERS_TABLE,
    exact_limit: int = 100_000,
    stale_after: float = DEFAULT_STALE_AFTER,
    only: str | None = None,
    reflect: Callable[[Connection, str], Table] | None = None,
) -> list[QueueSummary]:
    """Every queue of the database (or the one named ``only``) with its counts, cheap on big
    tables (module docstring); ``reflect`` may cache the reflected tables."""
    dead = dead_counts(conn, dead_name)
    in_hand: dict[str, int] = {}
    for worker in workers(conn, workers_name, stale_after=stale_after):
        if not worker.lost:
            for held in worker.in_hand:
                in_hand[held[0]] = in_hand.get(held[0], 0) + 1
    summaries = []
    for name, engine, estimate in queue_table_rows(conn, dead_name):
        if only is not None and name != only:
            continue
        try:
            table = (reflect or reflect_queue_table)(conn, name)
        except QueueTableError:  # changed since information_schema was read: not a queue
            conn.rollback()
            continue
        native = engine == "QUEUE"
        counting = native or estimate <= exact_limit
        if counting:
            total = int(conn.execute(select(func.count()).select_from(table)).scalar() or 0)
        else:
            total = estimate
        delayed: int | None = 0
        run_at = table.columns.get(RUN_AT)
        if run_at is not None:
            if counting and total <= exact_limit:
                stmt = select(func.count()).select_from(table).where(run_at > int(time.time()))
                delayed = int(conn.execute(stmt).scalar() or 0)
            else:
                delayed = None
        if native:  # the head of the queue: the engine returns rows in queue order
            head = conn.execute(select(table.c[JOB_ID]).limit(1)).scalar()
        else:  # UUIDv7 ids sort by creation time: the first entry of the primary key
            head = conn.execute(select(func.min(table.c[JOB_ID]))).scalar()
        stats: dict[str, Any] = {}
        if native:
            stats = parse_q4m_stats(conn.execute(select(queue_stats(name))).scalar())
        conn.rollback()
        summaries.append(
            QueueSummary(
                table=name,
                backend="native" if native else "portable",
                total=total,
                exact=counting,
                delayed=delayed,
                in_hand=in_hand.get(name, 0),
                dead=dead.get(name, 0),
                oldest_age=None if head is None else job_age(head),
                q4m=stats,
            )
        )
    return summaries
