"""Dead letters as the command line and the dashboard show them: counts per queue, pages,
one letter; retry and purge by queue."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import Connection
from sqlalchemy import Table
from sqlalchemy import func
from sqlalchemy import inspect
from sqlalchemy import select

from ..exc import Q4MError
from ..worker.consumer import reflect_queue_table
from ..worker.deadletter import DEAD_LETTER_TABLE
from ..worker.deadletter import DeadLetter
from ..worker.deadletter import count_dead
from ..worker.deadletter import dead_letter_table
from ..worker.deadletter import purge_dead
from ..worker.deadletter import retry_dead
from .tables import check_queue_name

__all__ = [
    "check_dead_queue",
    "dead_counts",
    "dead_letter",
    "dead_letters",
    "purge_dead_letters",
    "retry_dead_letters",
]


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
