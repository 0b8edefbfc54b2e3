"""Which tables of a database are queues: one ``information_schema`` query, no table opened.
Names from outside (a web page, the command line) are checked here (:func:`check_queue_name`)
before anything is reflected."""

from __future__ import annotations

from sqlalchemy import Connection
from sqlalchemy import text

from ..exc import QueueTableError
from ..schema.ddl import JOB_ID
from ..worker.deadletter import DEAD_LETTER_TABLE
from ..worker.registry import THROUGHPUT_TABLE
from ..worker.registry import WORKERS_TABLE

__all__ = ["check_queue_name", "foreign_queue_tables", "queue_table_names", "queue_table_rows"]

#: Tables of the library that are never queues.
_OWN_TABLES = frozenset({DEAD_LETTER_TABLE, WORKERS_TABLE, THROUGHPUT_TABLE})


def _scan_tables(
    conn: Connection, dead_name: str = DEAD_LETTER_TABLE
) -> tuple[list[tuple[str, str, int]], list[str]]:
    """(name, engine, estimated rows) of the queue tables of the current database:
    ENGINE=QUEUE with an ``id`` column, or a 16-byte binary ``id`` primary key (the portable
    layout); and the names of the ENGINE=QUEUE tables without a job id, which are not ours.
    One information_schema query, no table is opened."""
    rows = conn.execute(
        text(
            "SELECT t.TABLE_NAME, t.ENGINE, t.TABLE_ROWS, c.COLUMN_TYPE, c.COLUMN_KEY "
            "FROM information_schema.TABLES t LEFT JOIN information_schema.COLUMNS c "
            "ON c.TABLE_SCHEMA = t.TABLE_SCHEMA AND c.TABLE_NAME = t.TABLE_NAME "
            "AND c.COLUMN_NAME = :id "
            "WHERE t.TABLE_SCHEMA = DATABASE() AND t.TABLE_TYPE = 'BASE TABLE' "
            "ORDER BY t.TABLE_NAME"
        ),
        {"id": JOB_ID},
    ).all()
    found = []
    foreign = []
    for name, engine, estimate, column_type, key in rows:
        if name == dead_name or name in _OWN_TABLES:
            continue
        queue_engine = str(engine).upper() == "QUEUE"
        if (queue_engine and column_type is not None) or (
            str(column_type).lower() == "binary(16)" and key == "PRI"
        ):
            found.append((str(name), str(engine).upper(), int(estimate or 0)))
        elif queue_engine:
            foreign.append(str(name))
    return found, foreign


def queue_table_rows(
    conn: Connection, dead_name: str = DEAD_LETTER_TABLE
) -> list[tuple[str, str, int]]:
    """The queue tables of :func:`_scan_tables`."""
    return _scan_tables(conn, dead_name)[0]


def foreign_queue_tables(conn: Connection, dead_name: str = DEAD_LETTER_TABLE) -> list[str]:
    """ENGINE=QUEUE tables of the current database without a job id (``id``): Q4M tables
    that sqlalchemy-q4m did not make, which the tools skip and name."""
    return _scan_tables(conn, dead_name)[1]


def queue_table_names(conn: Connection, dead_name: str = DEAD_LETTER_TABLE) -> list[str]:
    """Names of the queue tables of the current database (see :func:`queue_table_rows`)."""
    return [name for name, _, _ in queue_table_rows(conn, dead_name)]


def check_queue_name(conn: Connection, name: str, dead_name: str = DEAD_LETTER_TABLE) -> str:
    """``name`` if it is one of the database's queue tables, else :class:`QueueTableError`:
    names from a web page or a form are looked up here, never pasted into SQL."""
    for known in queue_table_names(conn, dead_name):
        if known == name:
            return known
    raise QueueTableError(f"no queue table {name!r} in this database")
