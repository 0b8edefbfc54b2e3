"""Dead letters as the command line and the dashboard show them: list, count, retry (put
back into their queue) and purge them, per queue and as pages.  The table's definition and
:func:`bury` are the worker's (:mod:`sqlalchemy_q4m.worker.deadletter`)."""

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
from ..schema.reflect import reflect_queue_table
from ..schema.retry import ATTEMPTS
from ..schema.retry import RUN_AT
from ..types import new_job_id
from ..worker.deadletter import DEAD_LETTER_TABLE
from ..worker.deadletter import dead_letter_table
from ..worker.deadletter import decode_payload
from .tables import check_queue_name

__all__ = [
    "DeadLetter",
    "check_dead_queue",
    "count_dead",
    "dead_counts",
    "dead_letter",
    "dead_letters",
    "list_dead",
    "purge_dead",
    "purge_dead_letters",
    "retry_dead",
    "retry_dead_letters",
]


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


def _dead_exists(conn: Connection, dead: Table) -> bool:
    return bool(inspect(conn).has_table(dead.name))


def check_dead_queue(conn: Connection, dead: Table, queue: str, *, purging: bool = False) -> None:
    """A :class:`~sqlalchemy_q4m.exc.Q4MError` unless the queue table ``queue`` exists; when
    ``purging``, dead letters of a queue that is gone may still be purged."""
    if not inspect(conn).has_table(queue) and (not purging or not count_dead(conn, dead, queue)):
        raise Q4MError(f"queue table {queue!r} does not exist")


def dead_counts(conn: Connection, dead_name: str = DEAD_LETTER_TABLE) -> dict[str, int]:
    """Dead letters per queue (one GROUP BY over the dead-letter table)."""
    dead = dead_letter_table(dead_name)
    if not _dead_exists(conn, dead):
        return {}
    rows = conn.execute(select(dead.c.queue, func.count()).group_by(dead.c.queue)).all()
    conn.rollback()
    return {str(queue): int(count) for queue, count in rows}


def dead_letters(
    conn: Connection,
    dead_name: str = DEAD_LETTER_TABLE,
    queue: str | None = None,
    *,
    limit: int = 50,
    offset: int = 0,
) -> list[DeadLetter]:
    """A page of dead letters, oldest first, of one queue or of all."""
    dead = dead_letter_table(dead_name)
    if not _dead_exists(conn, dead):
        return []
    stmt = select(dead).order_by(dead.c.id).limit(max(1, min(limit, 500))).offset(max(0, offset))
    if queue is not None:
        stmt = stmt.where(dead.c.queue == queue)
    letters = [DeadLetter(**row._asdict()) for row in conn.execute(stmt)]
    conn.rollback()
    return letters


def dead_letter(
    conn: Connection, letter_id: int, dead_name: str = DEAD_LETTER_TABLE
) -> DeadLetter | None:
    """One dead letter by its id."""
    dead = dead_letter_table(dead_name)
    if not _dead_exists(conn, dead):
        return None
    row = conn.execute(select(dead).where(dead.c.id == int(letter_id))).first()
    conn.rollback()
    return None if row is None else DeadLetter(**row._asdict())


def retry_dead_letters(
    conn: Connection,
    queue: str,
    ids: Sequence[int] | None = None,
    dead_name: str = DEAD_LETTER_TABLE,
) -> int:
    """Put dead letters of ``queue`` (all, or ``ids``) back into it; returns how many."""
    name = check_queue_name(conn, queue, dead_name)
    table = reflect_queue_table(conn, name)
    return retry_dead(conn, dead_letter_table(dead_name), table, ids)


def purge_dead_letters(
    conn: Connection,
    queue: str,
    ids: Sequence[int] | None = None,
    dead_name: str = DEAD_LETTER_TABLE,
) -> int:
    """Delete dead letters of ``queue`` (all, or ``ids``); returns how many."""
    return purge_dead(conn, dead_letter_table(dead_name), queue, ids)
