"""Unique jobs: ``enqueue(engine, SyncJob, rows, unique_key=lambda row: f"sync:{row['account']}")``
enqueues a row only while no job with the same key is queued or running in that queue table.

The keys live in the InnoDB table ``q4m_unique_keys`` (primary key ``(queue, unique_key)``),
each row naming the job that holds it.  A key is **held** while its job is in the queue
(waiting or running) and **free** otherwise; a worker deletes the key when the job ends or is
dead-lettered, and a retry moves it to the retry's copy.  A key left behind (a crash after the
job ended) is recognized at the next enqueue because its job is gone, so it never blocks.
The table and the worker's side (what the backends do to a key around a job they own) are
:mod:`sqlalchemy_q4m.backends.unique_keys`; this module is the enqueuer's side.  Consumers of a
queue that never held a key do nothing for keys; the first keyed enqueue into a queue marks it
and waits until every consumer knows (:func:`~sqlalchemy_q4m.backends.unique_keys.mark_queue`,
once per queue and database; a few seconds).

* **portable**: the key and the job commit in one transaction (the enqueuer's); a worker's
  ``DELETE`` of the key commits with the job's removal.  "Is the job still there" is a plain
  read, which sees jobs other workers have locked.  Exact: one job per key.
* **native** (Q4M): a job ``INSERT`` is durable at once, and another connection's ``SELECT``
  does not see a row a worker owns (``COUNT(*) ... WHERE id = ?`` is 0 while it runs; observed
  on the engine).  So the job that holds a key also holds the named lock ``q4m_job:<id>``
  (``GET_LOCK``): the enqueuer takes it before committing the key and keeps it until the job
  is inserted, a worker takes it right after ``queue_wait`` and keeps it until the key is
  deleted after ``queue_end``.  A key is free when its job is neither visible nor locked.  A
  crash of the enqueuer after the key's commit and before the job's ``INSERT`` releases the
  lock (the server ends the dead connection's locks), and the key is free at once: it never
  blocks.  The window: between a worker's ``queue_wait`` and its ``GET_LOCK`` (one round
  trip) the job is invisible and unlocked; an enqueuer that finds a key in that state looks
  again after :data:`RECHECK` seconds before taking it, so a duplicate needs a worker stalled
  that long between two statements.
"""

from __future__ import annotations

import datetime as dt
import random
import time
import uuid
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection
from sqlalchemy import Engine
from sqlalchemy import Table
from sqlalchemy import func
from sqlalchemy import insert
from sqlalchemy import literal
from sqlalchemy import select
from sqlalchemy import update
from sqlalchemy.dialects.mysql import insert as mysql_insert
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from ..backends.base import RETRYABLE
from ..backends.base import error_code
from ..backends.notify import notify_committed
from ..backends.unique_keys import KEYS
from ..backends.unique_keys import job_lock_name
from ..backends.unique_keys import mark_queue
from ..exc import Q4MError
from ..schema.ddl import JOB_ID
from ..schema.functions import subscriptions
from ..schema.retry import RUN_AT
from ..server import detect_backend
from ..types import new_job_id
from .rows import group_rows
from .rows import shape_for

__all__ = [
    "RECHECK",
    "Unique",
    "UniqueKeyError",
    "enqueue_unique",
]

#: Seconds an enqueuer waits before it frees a Q4M key whose job is neither visible nor locked.
RECHECK = 0.2
#: Times an Engine-bound portable enqueue is tried again after a deadlock or lock-wait timeout.
RETRIES = 5

Bind = Engine | Connection | Session


class UniqueKeyError(Q4MError, ValueError):
    """A unique key must be a non-empty string of at most 191 characters."""


@dataclass(frozen=True)
class Unique:
    """What ``enqueue(..., unique_key=...)`` did with one row: ``enqueued`` (a new job,
    ``job_id``) or not (``job_id`` is the job already queued or running with ``key``)."""

    key: str
    job_id: uuid.UUID
    enqueued: bool


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


# -- enqueue -------------------------------------------------------------------------------------


def _check_key(key: Any, number: int) -> str:
    if not isinstance(key, str) or not 0 < len(key) <= 191:
        raise UniqueKeyError(
            f"row {number}: a unique key is a non-empty string of at most 191 characters, "
            f"not {key!r:.60}"
        )
    return key


def enqueue_unique(
    bind: Bind,
    target: Any,
    rows: Iterable[Any],
    unique_key: Callable[[Any], str],
    *,
    delay: float | None = None,
    notify: bool = True,
) -> list[Unique]:
    """Enqueue each row whose ``unique_key(row)`` no queued or running job of ``target``
    holds; one :class:`Unique` per row, in row order.  See the module docstring.

    Binds as in :func:`~sqlalchemy_q4m.enqueue`: an Engine commits (and notifies); on the
    portable backend a Connection or Session joins its transaction (the caller commits).  On
    Q4M each key is settled in a transaction of its own on its own connection."""
    (sub,) = subscriptions([target])
    table = sub.table
    shape = shape_for(target, table)
    if not isinstance(bind, Engine | Connection | Session):
        raise Q4MError(f"enqueue needs an Engine, a Connection or a Session, not {bind!r}")
    if delay is not None and shape.run_at is None:
        raise Q4MError(f"delay needs a {RUN_AT!r} column, which {table.name!r} lacks")
    groups = group_rows(shape, rows, delay is not None)
    items: list[dict[str, Any]] = []
    for group in groups:
        for row in group.rows:
            values = {shape.columns[k].key: v for k, v in row.items()}
            values.update({k: v for k, v in shape.defaults.items() if k not in values})
            if delay is not None and shape.run_at is not None:
                values[shape.columns[shape.run_at].key] = int(time.time() + delay)
            items.append(values)
    keys = [_check_key(unique_key(row), n) for n, row in enumerate(_rows_of(groups), 1)]
    if not items:
        return []
    if isinstance(bind, Session):
        conn = bind.connection(bind_arguments={"clause": insert(table)})
    elif isinstance(bind, Engine):
        conn = None
    else:
        conn = bind
    if conn is None:
        assert isinstance(bind, Engine)
        with bind.connect() as probe:
            backend = detect_backend(probe)
    else:
        backend = detect_backend(conn)
    engine = conn.engine if conn is not None else bind
    assert isinstance(engine, Engine)
    mark_queue(engine, table.name)  # once per queue and engine
    order = sorted(range(len(items)), key=lambda i: keys[i])  # one lock order: no deadlock
    results: dict[int, Unique] = {}
    if backend == "native":
        with engine.connect() as own:
            own.execution_options(isolation_level="READ COMMITTED")
            for i in order:
                results[i] = _native_one(own, table, keys[i], items[i])
    elif conn is None:
        assert isinstance(bind, Engine)
        for attempt in range(RETRIES + 1):  # concurrent inserts of one key can deadlock
            try:
                with bind.connect() as own:
                    own.execution_options(isolation_level="READ COMMITTED")
                    with own.begin():
                        for i in order:
                            results[i] = _portable_one(own, table, keys[i], items[i])
                break
            except OperationalError as err:
                if error_code(err) not in RETRYABLE or attempt == RETRIES:
                    raise
                time.sleep(random.uniform(0, 0.01 * 2**attempt))
    else:
        for i in order:
            results[i] = _portable_one(conn, table, keys[i], items[i])
    out = [results[i] for i in range(len(items))]
    added = sum(1 for u in out if u.enqueued)
    if isinstance(bind, Engine) and notify and delay is None and added:
        notify_committed(bind, target, jobs=added)
    return out


def _rows_of(groups: Iterable[Any]) -> Iterable[Mapping[str, Any]]:
    for group in groups:
        yield from group.rows


def _claim_key(conn: Connection, queue: str, key: str, job_id: uuid.UUID) -> str:
    """Insert the key for ``job_id`` unless it exists; lock it; the job id it names."""
    stmt = mysql_insert(KEYS).values(
        queue=queue, unique_key=key, job_id=str(job_id), created_at=_now()
    )
    conn.execute(stmt.on_duplicate_key_update(unique_key=stmt.inserted.unique_key))
    holder = conn.execute(
        select(KEYS.c.job_id)
        .where(KEYS.c.queue == queue, KEYS.c.unique_key == key)
        .with_for_update()
    ).scalar_one()
    return str(holder)


def _take_over(conn: Connection, queue: str, key: str, job_id: uuid.UUID) -> None:
    conn.execute(
        update(KEYS)
        .where(KEYS.c.queue == queue, KEYS.c.unique_key == key)
        .values(job_id=str(job_id), created_at=_now())
    )


def _visible(conn: Connection, table: Table, job_id: str) -> bool:
    """Whether the job is in ``table`` as this connection sees it (on Q4M: not owned)."""
    column = table.c[JOB_ID]
    found = conn.execute(select(literal(1)).where(column == uuid.UUID(job_id)).limit(1)).first()
    return found is not None


def _portable_one(conn: Connection, table: Table, key: str, values: dict[str, Any]) -> Unique:
    job_id = new_job_id()
    holder = _claim_key(conn, table.name, key, job_id)
    if holder != str(job_id):
        if _visible(conn, table, holder):
            return Unique(key, uuid.UUID(holder), False)
        _take_over(conn, table.name, key, job_id)
    conn.execute(insert(table).values({**values, JOB_ID: job_id}))
    return Unique(key, job_id, True)


def _locked(conn: Connection, job_id: str) -> bool:
    used = conn.execute(select(func.is_used_lock(job_lock_name(job_id)))).scalar()
    return used is not None


def _native_one(conn: Connection, table: Table, key: str, values: dict[str, Any]) -> Unique:
    """One key on Q4M: settle it in an InnoDB transaction holding the job's named lock,
    commit, insert the job, release the lock."""
    job_id = new_job_id()
    lock = job_lock_name(job_id)
    try:
        holder = _claim_key(conn, table.name, key, job_id)
        if holder != str(job_id):
            if _visible(conn, table, holder) or _locked(conn, holder):
                conn.rollback()
                return Unique(key, uuid.UUID(holder), False)
            time.sleep(RECHECK)  # a worker between queue_wait and GET_LOCK shows up now
            if _visible(conn, table, holder) or _locked(conn, holder):
                conn.rollback()
                return Unique(key, uuid.UUID(holder), False)
            _take_over(conn, table.name, key, job_id)
        conn.execute(select(func.get_lock(lock, 0)))
        conn.commit()  # the key names the job; its lock says the job is on its way
        conn.execute(insert(table).values({**values, JOB_ID: job_id}))
    except BaseException:
        if conn.in_transaction():
            conn.rollback()
        raise
    finally:
        conn.execute(select(func.release_lock(lock)))
        if conn.in_transaction():
            conn.rollback()
    return Unique(key, job_id, True)
