"""The unique-key store: the InnoDB table ``q4m_unique_keys`` (one row per held key, naming
its job) and what the backends do to it around a job they own (:func:`claimed`, :func:`ended`,
:func:`ended_many`, :func:`released`, :func:`key_moved`).  The producer's side, and how a key
is held, is :mod:`sqlalchemy_q4m.producer.unique`.

A queue that has never held a key pays nothing for them: each is a no-op unless the queue has
a **marker** (a row with the empty key, which no real key is), written by the first keyed
enqueue into the queue (:func:`mark_queue`).  Whether a queue has one is remembered per engine:
"yes" for the engine's life, "no" (or "no keys table") for :data:`ABSENT_TTL` seconds; a
worker looks its queues up when it connects (:func:`refresh`), so a job's statements carry no
look-up.  A "no" believed up to :data:`ABSENT_TTL` after the marker commits would skip a keyed
job's bookkeeping, so the first keyed enqueue waits :data:`FIRST_KEY_WAIT` after the marker
commits: by then every such "no" has expired.  That covers the keys table's creation too: a
consumer that found no table believes "no marker", and no key comes before a marker.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterable
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Column
from sqlalchemy import Connection
from sqlalchemy import Engine
from sqlalchemy import Index
from sqlalchemy import MetaData
from sqlalchemy import PrimaryKeyConstraint
from sqlalchemy import String
from sqlalchemy import Table
from sqlalchemy import delete
from sqlalchemy import func
from sqlalchemy import inspect
from sqlalchemy import select
from sqlalchemy import text
from sqlalchemy import update
from sqlalchemy.dialects.mysql import DATETIME
from sqlalchemy.dialects.mysql import insert as mysql_insert
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import ProgrammingError
from sqlalchemy.schema import CreateTable

from .base import error_code
from .driver import dialect_cache

__all__ = [
    "ABSENT_TTL",
    "CLAIM_LOCK_WAIT",
    "FIRST_KEY_WAIT",
    "KEYS",
    "KEYS_TABLE",
    "MARKER",
    "claimed",
    "count_keys",
    "ended",
    "ended_many",
    "job_id_of",
    "job_lock_name",
    "key_ended",
    "key_moved",
    "keys_table",
    "mark_queue",
    "refresh",
    "released",
    "uses_keys",
]

KEYS_TABLE = "q4m_unique_keys"
#: Seconds a worker waits for the enqueuer's lock on a job it has just claimed (Q4M).
CLAIM_LOCK_WAIT = 10
#: How long "this queue has no marker" (or "no keys table") is believed before looking again.
ABSENT_TTL = 5.0
#: Seconds the first keyed enqueue into a queue waits after committing its marker, before its
#: key and job: longer than :data:`ABSENT_TTL` (a margin for the clocks and the round trip
#: between the marker's timestamp and its commit), so no consumer still believes "no keys".
#: Tests shorten both.
FIRST_KEY_WAIT = ABSENT_TTL + 1.0
#: The ``unique_key`` (and ``job_id``) of a queue's marker row; a real key is never empty.
MARKER = ""


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
_USES = float("inf")  # a memo's value for "the queue has a marker"


def _known(dialect: Dialect) -> dict[str, float]:
    """Per engine (kept on its dialect, so it lives as long as the engine), per queue name:
    the monotonic time its marker (or the keys table) was last seen missing, or ``inf``: the
    queue has a marker."""
    return dialect_cache(dialect, "unique_keys_queues")


def _look_up(conn: Connection, queues: Sequence[str]) -> None:
    """Look for the markers of ``queues`` now (one ``SELECT``) and remember the answers."""
    since = time.monotonic()  # before the read: a "no" expires counting from here
    marked: set[str] = set()
    result = _hook(
        conn,
        select(KEYS.c.queue).where(KEYS.c.unique_key == MARKER, KEYS.c.queue.in_(queues)),
    )
    if result is not None:
        marked = set(result.scalars())
    with _known_lock:
        memo = _known(conn.dialect)
        for queue in queues:
            memo[queue] = _USES if queue in marked else since


def uses_keys(conn: Connection, queue: str) -> bool:
    """Whether ``queue`` has ever held a key (remembered per engine; "no" for ABSENT_TTL s)."""
    seen = _known(conn.dialect).get(queue)
    if seen == _USES:
        return True
    if seen is not None and time.monotonic() - seen < ABSENT_TTL:
        return False
    _look_up(conn, [queue])
    return _known(conn.dialect).get(queue) == _USES


NO_SUCH_TABLE = 1146


def _hook(conn: Connection, stmt: Any) -> Any:
    """Run a worker-side statement on the keys table; a table dropped since it was seen makes
    it a no-op (and every queue is looked for again later), never a failed job."""
    try:
        return conn.execute(stmt)
    except ProgrammingError as err:
        if error_code(err) != NO_SUCH_TABLE:
            raise
        with _known_lock:
            memo = _known(conn.dialect)
            now = time.monotonic()
            for queue in memo:
                memo[queue] = now
        return None


def refresh(conn: Connection, queues: Iterable[str]) -> None:
    """Look for the markers of ``queues`` now (a worker does when it connects, before any
    claim, so the statements of a job carry no look-up)."""
    names = sorted(set(queues))
    if names:
        _look_up(conn, names)


def mark_queue(engine: Engine, queue: str) -> None:
    """Before the first key enqueued into ``queue`` (once per engine): create the keys table
    if missing and the queue's marker, each committed on a connection of its own, then wait
    until :data:`FIRST_KEY_WAIT` has passed since the marker's commit, so that no consumer
    still believes the queue keyless (see the module docstring).  The enqueuer that creates
    the marker waits all of it; one that finds a younger marker, the rest."""
    if _known(engine.dialect).get(queue) == _USES:
        return
    with engine.connect() as own:
        own.execution_options(isolation_level="READ COMMITTED")
        if not inspect(own).has_table(KEYS_TABLE):
            own.execute(CreateTable(KEYS, if_not_exists=True))
            own.commit()
        stmt = (
            mysql_insert(KEYS)
            .prefix_with("IGNORE")
            .values(queue=queue, unique_key=MARKER, job_id=MARKER, created_at=func.utc_timestamp(6))
        )
        created = own.execute(stmt).rowcount == 1
        age = own.execute(
            select(
                func.timestampdiff(text("MICROSECOND"), KEYS.c.created_at, func.utc_timestamp(6))
            ).where(KEYS.c.queue == queue, KEYS.c.unique_key == MARKER)
        ).scalar()
        own.commit()
    wait = FIRST_KEY_WAIT if created or age is None else FIRST_KEY_WAIT - int(age) / 1e6
    if wait > 0:
        time.sleep(wait)
    with _known_lock:
        _known(engine.dialect)[queue] = _USES


def job_lock_name(job_id: Any) -> str:
    """The named lock (``GET_LOCK``) a Q4M job holding a key is protected by."""
    return f"q4m_job:{job_id}"


# -- the worker's side ---------------------------------------------------------------------------
# Called by the backends around a job they own.  Each is a no-op for a queue without a marker.

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
    if not uses_keys(conn, table.name):  # a memo look-up: before building any UUID
        return
    job_id = job_id_of(key)
    if job_id is None:
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
    """Q4M: the job was removed (done or dead-lettered): :func:`key_ended`, then release the
    job's named lock."""
    key_ended(conn, table, key)
    released(conn)


def key_ended(conn: Connection, table: Table, key: tuple[Any, ...]) -> None:
    """The job was removed: delete its key in the transaction the queue session commits next
    (portable: with the job's ``DELETE``; Q4M: after ``queue_end``).  Until that commit the
    key row's InnoDB lock keeps an enqueuer of the same key waiting.  (A portable job holds
    no named lock: :func:`claimed` is Q4M's.)"""
    if uses_keys(conn, table.name) and (job_id := job_id_of(key)) is not None:
        _hook(conn, delete(KEYS).where(KEYS.c.queue == table.name, KEYS.c.job_id == str(job_id)))


def ended_many(conn: Connection, table: Table, keys: Iterable[tuple[Any, ...]]) -> None:
    """:func:`ended` for the jobs of a portable batch, in its transaction (one ``DELETE``)."""
    if not uses_keys(conn, table.name):
        return
    ids = [str(i) for key in keys if (i := job_id_of(key)) is not None]
    if ids:
        _hook(conn, delete(KEYS).where(KEYS.c.queue == table.name, KEYS.c.job_id.in_(ids)))


def released(conn: Connection) -> None:
    """Q4M: release the named lock of the job this connection owned (it was ended, or went
    back to the queue, where it is visible again)."""
    name = conn.info.pop(_HELD, None)
    if name is not None:
        conn.execute(select(func.release_lock(name)))


def key_moved(conn: Connection, table: Table, old: Any, new: Any) -> None:
    """A retry copies the job under a new id: its key follows (in the caller's transaction)."""
    if not uses_keys(conn, table.name):
        return
    _hook(
        conn,
        update(KEYS)
        .where(KEYS.c.queue == table.name, KEYS.c.job_id == str(old))
        .values(job_id=str(new)),
    )


def count_keys(conn: Connection, queue: str) -> int:
    """How many keys ``queue`` holds (0 without a keys table; its marker is no key)."""
    if not inspect(conn).has_table(KEYS_TABLE):
        return 0
    where = (KEYS.c.queue == queue, KEYS.c.unique_key != MARKER)
    return int(conn.execute(select(func.count()).select_from(KEYS).where(*where)).scalar() or 0)
