"""Dead letters seen from the operations side: list, count, retry (put back into their
queue) and purge them.  The table's definition and :func:`bury` are the worker's
(:mod:`sqlalchemy_q4m.worker.deadletter`)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection
from sqlalchemy import Table
from sqlalchemy import delete
from sqlalchemy import func
from sqlalchemy import insert
from sqlalchemy import inspect
from sqlalchemy import select
from sqlalchemy.types import LargeBinary
from sqlalchemy.types import _Binary

from ..exc import Q4MError
from ..schema.ddl import JOB_ID
from ..schema.retry import ATTEMPTS
from ..schema.retry import RUN_AT
from ..types import new_job_id
from ..worker.deadletter import decode_payload

__all__ = ["DeadLetter", "count_dead", "list_dead", "purge_dead", "retry_dead"]


@dataclass(frozen=True)
class DeadLetter:
    """One row of the dead-letter table."""

    id: int
    queue: str
    job_id: str
    payload: str
    error: str
    traceback: str
    attempts: int
    enqueued_at: dt.datetime | None
    failed_at: dt.datetime


def _exists(conn: Connection, dead: Table) -> bool:
    return bool(inspect(conn).has_table(dead.name, schema=dead.schema))


def list_dead(
    conn: Connection, dead: Table, queue: str | None = None, *, limit: int = 100
) -> list[DeadLetter]:
    """The oldest ``limit`` dead letters, of one queue or of all."""
    if not _exists(conn, dead):
        return []
    stmt = select(dead).order_by(dead.c.id).limit(limit)
    if queue is not None:
        stmt = stmt.where(dead.c.queue == queue)
    return [DeadLetter(**row._asdict()) for row in conn.execute(stmt)]


def count_dead(conn: Connection, dead: Table, queue: str) -> int:
    """How many dead letters ``queue`` has (0 when the table does not exist yet)."""
    if not _exists(conn, dead):
        return 0
    return int(
        conn.execute(select(func.count()).select_from(dead).where(dead.c.queue == queue)).scalar()
        or 0
    )


def _selected(dead: Table, queue: str, ids: Sequence[int] | None) -> Any:
    condition = dead.c.queue == queue
    if ids:
        condition = condition & dead.c.id.in_(list(ids))
    return condition


def retry_dead(
    conn: Connection, dead: Table, queue: Table, ids: Sequence[int] | None = None
) -> int:
    """Put dead letters of ``queue`` back into it (fresh id, attempts and run_at reset), then
    delete them; one transaction on InnoDB, queue row first on Q4M.  Returns how many."""
    if not _exists(conn, dead):
        return 0
    rows = conn.execute(
        select(dead.c.id, dead.c.payload)
        .where(_selected(dead, queue.name, ids))
        .order_by(dead.c.id)
        .with_for_update()
    ).all()
    names = {c.name for c in queue.columns}
    binary = {c.name for c in queue.columns if isinstance(c.type, _Binary | LargeBinary)}
    moved = 0
    for dead_id, payload in rows:
        values = decode_payload(payload)
        unknown = set(values) - names
        if unknown:
            raise Q4MError(
                f"dead letter {dead_id} has columns {sorted(unknown)} that {queue.name!r} "
                "does not have"
            )
        for key in binary & set(values):
            if isinstance(values[key], str):
                values[key] = values[key].encode()
        values[JOB_ID] = new_job_id()
        if ATTEMPTS in names:
            values[ATTEMPTS] = 0
        if RUN_AT in names:
            values[RUN_AT] = 0
        conn.execute(insert(queue).values(values))
        conn.execute(delete(dead).where(dead.c.id == dead_id))
        moved += 1
    conn.commit()
    return moved


def purge_dead(conn: Connection, dead: Table, queue: str, ids: Sequence[int] | None = None) -> int:
    """Delete dead letters of ``queue`` (all, or those ``ids``); returns how many."""
    if not _exists(conn, dead):
        return 0
    result = conn.execute(delete(dead).where(_selected(dead, queue, ids)))
    conn.commit()
    return int(result.rowcount)
