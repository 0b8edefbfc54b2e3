"""The unique-key store: the InnoDB table ``q4m_unique_keys`` (one row per held key, naming
its job) and what the backends do to it around a job they own (:func:`claimed`, :func:`ended`,
:func:`ended_many`, :func:`released`, :func:`key_moved`).  Each is a no-op while no keys table
exists.  The producer's side, and how a key is held, is :mod:`sqlalchemy_q4m.producer.unique`.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterable
from typing import Any

from sqlalchemy import Column
from sqlalchemy import Connection
from sqlalchemy import Index
from sqlalchemy import MetaData
from sqlalchemy import PrimaryKeyConstraint
from sqlalchemy import String
from sqlalchemy import Table
from sqlalchemy import delete
from sqlalchemy import func
from sqlalchemy import inspect
from sqlalchemy import select
from sqlalchemy import update
from sqlalchemy.dialects.mysql import DATETIME
from sqlalchemy.exc import ProgrammingError
from sqlalchemy.schema import CreateTable

from .base import error_code
from .driver import dialect_cache

__all__ = [
    "CLAIM_LOCK_WAIT",
    "KEYS",
    "KEYS_TABLE",
    "claimed",
    "count_keys",
    "ended",
    "ended_many",
    "ensure_keys_table",
    "job_id_of",
    "job_lock_name",
    "key_moved",
    "keys_table",
    "refresh",
    "released",
]

KEYS_TABLE = "q4m_unique_keys"
#: Seconds a worker waits for the enqueuer's lock on a job it has just claimed (Q4M).
CLAIM_LOCK_WAIT = 10
#: How long "the keys table does not exist" is believed before looking again.
ABSENT_TTL = 5.0


def keys_table(metadata: MetaData | None = None) -> Table:
    """``q4m_unique_keys``: one row per held key, naming its job (InnoDB)."""
    return Table(
        KEYS_TABLE,
        metadata if metadata is not None else MetaData(),
        Column("queue", String(64), nullable=False),
        Column("unique_key", String(191), nullable=False),
        Column("job_id", String(36), nullable=False),
        Column("created_at", DATETIME(fsp=6), nullable=False),
        PrimaryKeyConstraint("queue", "unique_key"),
        Index("q4m_unique_keys_job", "job_id"),
        mysql_engine="InnoDB",
        mariadb_engine="InnoDB",
        mysql_charset="utf8mb4",
        mariadb_charset="utf8mb4",
    )


KEYS = keys_table()

_known_lock = threading.Lock()


def _known(conn: Connection) -> dict[str, float]:
    """Per engine (kept on its dialect, so it lives as long as the engine): under ``seen``,
    the monotonic time the keys table was seen missing (``inf``: it exists)."""
    return dialect_cache(conn.dialect, "unique_keys_table")


def _exists(conn: Connection) -> bool:
    """Whether the keys table exists (remembered per engine; "missing" for ABSENT_TTL s)."""
    seen = _known(conn).get("seen")
    now = time.monotonic()
    if seen == float("inf"):
        return True
    if seen is not None and now - seen < ABSENT_TTL:
        return False
    exists = bool(inspect(conn).has_table(KEYS_TABLE))
    with _known_lock:
        _known(conn)["seen"] = float("inf") if exists else now
    return exists


NO_SUCH_TABLE = 1146


def _hook(conn: Connection, stmt: Any) -> Any:
    """Run a worker-side statement on the keys table; a table dropped since it was seen makes
    it a no-op (and is looked for again later), never a failed job."""
    try:
        return conn.execute(stmt)
    except ProgrammingError as err:
        if error_code(err) != NO_SUCH_TABLE:
            raise
        with _known_lock:
            _known(conn)["seen"] = time.monotonic()
        return None


def refresh(conn: Connection) -> bool:
    """Look for the keys table now (a worker does when it connects, before any claim, so the
    statements of a job carry no look-up); whether it exists."""
    with _known_lock:
        _known(conn).pop("seen", None)
    return _exists(conn)


def ensure_keys_table(conn: Connection) -> None:
    """Create the keys table when it is missing, on a connection of its own (DDL commits)."""
    if _exists(conn):
        return
    with conn.engine.connect() as ddl:
        ddl.execute(CreateTable(KEYS, if_not_exists=True))
        ddl.commit()
    with _known_lock:
        _known(conn)["seen"] = float("inf")


def job_lock_name(job_id: Any) -> str:
    """The named lock (``GET_LOCK``) a Q4M job holding a key is protected by."""
    return f"q4m_job:{job_id}"


# -- the worker's side ---------------------------------------------------------------------------
# Called by the backends around a job they own.  Each is a no-op while no keys table exists.

_HELD = "q4m_unique_lock"  # conn.info: the job id whose named lock this connection holds


def job_id_of(key: tuple[Any, ...]) -> uuid.UUID | None:
    """A claimed job's id from its key as the driver sends it (16 bytes, or a UUID)."""
    if len(key) != 1:
        return None
    value = key[0]
    if isinstance(value, uuid.UUID):
        return value
    if isinstance(value, bytes | bytearray) and len(value) == 16:
        return uuid.UUID(bytes=bytes(value))
    try:
        return uuid.UUID(str(value))
    except ValueError:
        return None


def claimed(conn: Connection, table: Table, key: tuple[Any, ...]) -> None:
    """Q4M, right after ``queue_wait`` owned a job: take its named lock if it holds a key (one
    statement: the lock is taken only when the key row exists).  Nothing is committed."""
    job_id = job_id_of(key)
    if job_id is None or not _exists(conn):
        return
    name = job_lock_name(job_id)
    result = _hook(
        conn,
        select(func.get_lock(name, CLAIM_LOCK_WAIT)).where(
            KEYS.c.queue == table.name, KEYS.c.job_id == str(job_id)
        ),
    )
    if result is not None and result.scalar() == 1:
        conn.info[_HELD] = name


def ended(conn: Connection, table: Table, key: tuple[Any, ...]) -> None:
    """The job was removed (done or dead-lettered): delete its key in the transaction the
    queue session commits next (portable: with the job's ``DELETE``; Q4M: after
    ``queue_end``), then release the job's named lock (Q4M).  Until that commit the key row's
    InnoDB lock keeps an enqueuer of the same key waiting."""
    job_id = job_id_of(key)
    if job_id is not None and _exists(conn):
        _hook(conn, delete(KEYS).where(KEYS.c.queue == table.name, KEYS.c.job_id == str(job_id)))
    released(conn)


def ended_many(conn: Connection, table: Table, keys: Iterable[tuple[Any, ...]]) -> None:
    """:func:`ended` for the jobs of a portable batch, in its transaction (one ``DELETE``)."""
    ids = [str(i) for key in keys if (i := job_id_of(key)) is not None]
    if ids and _exists(conn):
        _hook(conn, delete(KEYS).where(KEYS.c.queue == table.name, KEYS.c.job_id.in_(ids)))


def released(conn: Connection) -> None:
    """Q4M: release the named lock of the job this connection owned (it was ended, or went
    back to the queue, where it is visible again)."""
    name = conn.info.pop(_HELD, None)
    if name is not None:
        conn.execute(select(func.release_lock(name)))


def key_moved(conn: Connection, table: Table, old: Any, new: Any) -> None:
    """A retry copies the job under a new id: its key follows (in the caller's transaction)."""
    if not _exists(conn):
        return
    _hook(
        conn,
        update(KEYS)
        .where(KEYS.c.queue == table.name, KEYS.c.job_id == str(old))
        .values(job_id=str(new)),
    )


def count_keys(conn: Connection, queue: str) -> int:
    """How many keys ``queue`` holds (0 without a keys table)."""
    if not inspect(conn).has_table(KEYS_TABLE):
        return 0
    return int(
        conn.execute(select(func.count()).select_from(KEYS).where(KEYS.c.queue == queue)).scalar()
        or 0
    )
