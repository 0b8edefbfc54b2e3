"""Producing jobs in bulk: :func:`enqueue`, one ``executemany`` per thousand rows.

SQLAlchemy's ORM bulk insert (``session.execute(insert(Model), rows)``) spends more client
CPU per row on its own bookkeeping than the driver spends sending the row, so a producer
made of it reaches about two thirds of raw ``executemany``.  :func:`enqueue` keeps what a
producer needs from SQLAlchemy (the ``INSERT`` it compiles, each column's Python default and
bind processor, the connection's transaction and its events) and does the rest once per
statement shape instead of once per row: the ``INSERT`` is compiled once per table, column
set and dialect, each row becomes the driver's parameters directly, and the rows go out in
one DBAPI ``executemany`` per chunk (PyMySQL sends it as multi-row ``INSERT``\\ s).  When
something observes statements (events, echo; see
:func:`~sqlalchemy_q4m.backends.driver.driver_level`) the chunk goes through
:meth:`~sqlalchemy.Connection.exec_driver_sql` instead, so it is seen.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from collections.abc import Iterable
from typing import Any
from typing import overload

from sqlalchemy import Connection
from sqlalchemy import Engine
from sqlalchemy import insert
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from ..backends.driver import driver_level
from ..backends.driver import execute_many
from ..backends.driver import on_cursor
from ..backends.listeners import nobody_listens
from ..backends.notify import wake_committed
from ..exc import OptionError
from ..exc import Q4MError
from ..schema.checks import check_seconds
from ..schema.functions import Subscription
from ..schema.functions import subscriptions
from ..schema.retry import RUN_AT
from .rows import Group
from .rows import Shape
from .rows import check_sizes
from .rows import group_rows
from .rows import shape_for
from .statements import prepare
from .statements import send
from .unique import Unique
from .unique import enqueue_unique

__all__ = ["CHUNK_SIZE", "enqueue"]

notify_logger = logging.getLogger("sqlalchemy_q4m.notify")

#: Rows sent per ``executemany``.  Every row's parameters are made before anything is sent,
#: so this bounds no memory; PyMySQL further splits a chunk into multi-row ``INSERT``\ s of
#: up to about 1 MB each.  Large enough not to cut those shorter: on Q4M each ``INSERT`` is a
#: durable write of its own (20,000 rows in chunks of 1,000 ran at 0.84-0.90 of one raw
#: ``executemany``, in chunks of 10,000 at 0.89-0.92).
CHUNK_SIZE = 10_000

Bind = Engine | Connection | Session


@overload
def enqueue(
    bind: Bind,
    target: Any,
    rows: Iterable[Any],
    *,
    delay: float | None = None,
    chunk_size: int = CHUNK_SIZE,
    notify: bool = True,
    unique_key: None = None,
) -> list[uuid.UUID]: ...


@overload
def enqueue(
    bind: Bind,
    target: Any,
    rows: Iterable[Any],
    *,
    delay: float | None = None,
    chunk_size: int = CHUNK_SIZE,
    notify: bool = True,
    unique_key: Callable[[Any], str],
) -> list[Unique]: ...


def enqueue(
    bind: Bind,
    target: Any,
    rows: Iterable[Any],
    *,
    delay: float | None = None,
    chunk_size: int = CHUNK_SIZE,
    notify: bool = True,
    unique_key: Callable[[Any], str] | None = None,
) -> list[uuid.UUID] | list[Unique]:
    """Insert ``rows`` into the queue ``target`` as new jobs; their ids, in row order.

    ``target`` is a queue model (:class:`~sqlalchemy_q4m.QueueMixin`) or queue Table.  A
    row is a mapping keyed by mapped attribute name (models) or column name (Tables), or an
    instance of the model (its column attributes that are set are taken; the instance
    itself is left as it was).  The library makes each job's id (a time-ordered UUIDv7);
    missing columns take their Python-side default, else the server's.  ``delay`` (seconds)
    sets ``run_at`` to now + delay on every row (the table needs a ``run_at`` column:
    :class:`~sqlalchemy_q4m.ScheduledMixin`).

    With an :class:`~sqlalchemy.Engine` the rows are inserted in a transaction of their own,
    committed before this returns; then, with ``notify`` (and no ``delay``), consumers
    waiting with ``listen`` are woken (:func:`~sqlalchemy_q4m.notify`; MariaDB).
    With a :class:`~sqlalchemy.Connection` or an ORM
    :class:`~sqlalchemy.orm.Session` they are inserted in its transaction (begun if none is)
    and **the caller commits** (or rolls back: then no job was enqueued), then calls
    :func:`~sqlalchemy_q4m.notify` itself if consumers listen.

    Every row is checked before the first ``INSERT`` (on Q4M an inserted row stays, whatever
    the transaction does): each value against its column's type
    (:func:`~sqlalchemy_q4m.schema.checks.column_check`), its size against the server's
    ``max_allowed_packet``; a bad one raises :class:`~sqlalchemy_q4m.exc.RowError` naming the
    row and column, and nothing is enqueued.

    ``unique_key`` (a function row -> str): a row is enqueued only while no job of ``target``
    with the same key is queued or running; returns one :class:`~sqlalchemy_q4m.Unique`
    per row (``enqueued``, ``job_id``) instead of the ids (see
    :mod:`sqlalchemy_q4m.producer.unique`).
    """
    if unique_key is not None:
        return enqueue_unique(bind, target, rows, unique_key, delay=delay, notify=notify)
    (sub,) = subscriptions([target])
    shape = shape_for(target, sub.table)
    if delay is not None:
        if shape.run_at is None:
            raise Q4MError(
                f"delay needs a {RUN_AT!r} column (ScheduledMixin or RetryMixin), "
                f"which {sub.table.name!r} lacks"
            )
        delay = check_seconds("delay", delay)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise Q4MError(f"chunk_size must be an integer >= 1, not {chunk_size!r}")
    if not isinstance(bind, (Engine, Connection, Session)):  # a tuple: cheaper than a union
        raise Q4MError(f"enqueue needs an Engine, a Connection or a Session, not {bind!r}")
    groups = group_rows(shape, rows, delay is not None)
    if not groups:
        return []
    run_at = None if delay is None else _run_at(shape, delay)
    if isinstance(bind, Engine):
        return _produce(bind, sub, shape, groups, run_at, chunk_size, notify and delay is None)
    if isinstance(bind, Session):
        if shape.mapper is not None:
            conn = bind.connection(bind_arguments={"mapper": shape.mapper})
        else:
            conn = bind.connection(bind_arguments={"clause": insert(shape.table)})
        check_sizes(conn, groups)
        return send(conn, shape, groups, run_at, chunk_size)
    check_sizes(bind, groups)
    return send(bind, shape, groups, run_at, chunk_size)


def _produce(
    engine: Engine,
    sub: Subscription,
    shape: Shape,
    groups: list[Group],
    run_at: int | None,
    chunk_size: int,
    wake: bool,
) -> list[uuid.UUID]:
    """An Engine-bound :func:`enqueue`: on ONE connection the rows' ``INSERT``\\ s, then their
    ``COMMIT`` when the server has a transaction open (not after rows of a Q4M table: they
    are durable at once and open none), then (``wake``)
    :func:`~sqlalchemy_q4m.backends.notify.wake_committed`, which sends nothing when no process
    listens; the connection goes back to the pool without the pool's reset-on-return
    ``ROLLBACK``, as nothing is left to roll back.  One job costs what a raw producer's
    ``INSERT`` + ``COMMIT`` (or, on Q4M, its autocommitted ``INSERT``) does."""
    if not (wake and not nobody_listens(engine.dialect, [sub])) and _unobserved(engine, groups):
        produced = _produce_on_pool(engine, shape, groups, run_at, chunk_size)
        if produced is not None:
            return produced
    conn = engine.connect()
    try:
        check_sizes(conn, groups)
        ids, chunks = prepare(conn.dialect, shape, groups, run_at, chunk_size)
        dbapi_conn = conn.connection.dbapi_connection
        bare = dbapi_conn is not None and _open(dbapi_conn) is not None
        if bare and not conn.in_transaction() and driver_level(conn):
            assert dbapi_conn is not None
            for plan, params in chunks:  # in the server's implicit transaction, if any
                on_cursor(conn, dbapi_conn.cursor(), plan.sql.sql, params, execute_many)
            if _open(dbapi_conn):  # rows of a transactional table: commit them
                conn.begin()  # sends nothing: SQLAlchemy's view (and its events) stay exact
                conn.commit()
        else:  # in a transaction (begun by the size check, or now)
            for plan, params in chunks:
                plan.sql.run_many(conn, params)
            conn.commit()
        if wake:  # after the commit: a wake before it is lost
            try:
                wake_committed(conn, [sub], len(ids))
            except DBAPIError as err:
                notify_logger.warning(
                    "notify: %d committed job(s) wait for the consumers' listen timeout: "
                    "waking them failed: %s",
                    len(ids),
                    err,
                )
    except BaseException:
        conn.close()
        raise
    _close_committed(conn)
    return ids


def _unobserved(engine: Engine, groups: list[Group]) -> bool:
    """Whether nothing would see a :class:`~sqlalchemy.Connection` at work (no connection
    events, no echo or ``sqlalchemy.engine`` logging, no ``handle_error``) and no row needs
    its size checked: then :func:`_produce_on_pool` may do without one."""
    if getattr(engine, "_has_events", True) or engine.dialect.dispatch.handle_error:
        return False
    if engine.logger.isEnabledFor(logging.INFO):
        return False
    if len(groups) == 1:
        return groups[0].large is None
    return not any(g.large for g in groups)


def _produce_on_pool(
    engine: Engine,
    shape: Shape,
    groups: list[Group],
    run_at: int | None,
    chunk_size: int,
) -> list[uuid.UUID] | None:
    """:func:`_produce` on the pool's connection directly, when nothing observes a
    :class:`~sqlalchemy.Connection` (:func:`_unobserved`): the same statements, a third of
    the client's work per call.  None (nothing sent) for a driver that does not tell
    whether a transaction is open."""
    dialect = engine.dialect
    ids, chunks = prepare(dialect, shape, groups, run_at, chunk_size)
    fairy = engine.raw_connection()
    dbapi_conn: Any = fairy.dbapi_connection
    if _open(dbapi_conn) is None:
        fairy.close()
        return None
    sql: str | None = None
    params: Any = None
    cursor: Any = None
    try:
        cursor = dbapi_conn.cursor()
        for plan, params in chunks:  # in the server's implicit transaction, if any
            sql = plan.sql.sql
            if len(params) == 1:
                cursor.execute(sql, params[0])  # the driver's cheaper call for one row
            else:
                cursor.executemany(sql, params)
        sql, params = "COMMIT", None
        if dbapi_conn.server_status & _IN_TRANS:  # rows of a transactional table: commit
            dbapi_conn.commit()
    except Exception as err:
        dbapi = dialect.loaded_dbapi
        if not isinstance(err, dbapi.Error):
            fairy.close()  # the pool rolls back
            raise
        lost = dialect.is_disconnect(err, dbapi_conn, cursor)
        wrapped = DBAPIError.instance(
            sql, params, err, dbapi.Error, connection_invalidated=lost, dialect=dialect
        )
        if lost:
            fairy.invalidate(err)
        fairy.close()
        raise wrapped from err
    except BaseException:
        fairy.invalidate()  # interrupted mid-statement: the protocol state is unknown
        fairy.close()
        raise
    finally:
        if cursor is not None:
            with contextlib.suppress(Exception):
                cursor.close()
    _checkin_clean(fairy)
    return ids


def _checkin_clean(fairy: Any) -> None:
    """Return the pool's connection ``fairy``, out of a transaction, without the pool's
    reset-on-return ``ROLLBACK`` (see :func:`_close_committed`)."""
    close_special = getattr(fairy, "_close_special", None)
    if callable(close_special):
        close_special(transaction_reset=True)
    else:  # pragma: no cover - another SQLAlchemy's pool
        fairy.close()


#: PyMySQL's ``server_status`` bit: the server has a transaction open on the connection.
_IN_TRANS = 1


def _open(dbapi_conn: Any) -> bool | None:
    """Whether the server said (in its last reply) that a transaction is open on
    ``dbapi_conn``; None for a driver that does not tell (then the rows are committed)."""
    status = getattr(dbapi_conn, "server_status", None)
    if isinstance(status, bool) or not isinstance(status, int):
        return None
    return bool(status & _IN_TRANS)


def _close_committed(conn: Connection) -> None:
    """Close ``conn``, out of a transaction since its last ``COMMIT`` or ``ROLLBACK``,
    without the pool's reset-on-return ``ROLLBACK`` (there is nothing to roll back): what
    :meth:`~sqlalchemy.Connection.close` does itself after it rolled a transaction back.
    SQLAlchemy has no public spelling of it; without the pool method, a plain close."""
    fairy = conn.connection if not conn.closed and not conn.invalidated else None
    close_special = getattr(fairy, "_close_special", None)
    if conn.in_transaction() or not callable(close_special):
        conn.close()
        return
    counter = getattr(fairy, "_counter", None)
    if not isinstance(counter, int) or counter != 1:
        conn.close()
        return
    fairy._counter = 2  # type: ignore[union-attr]  # conn.close() leaves the checkin to us
    try:
        conn.close()
    finally:
        close_special(transaction_reset=True)


def _run_at(shape: Shape, delay: float | None) -> int:
    """now + ``delay`` as whole seconds, when the ``run_at`` column holds it."""
    run_at = int(time.time() + (delay or 0))
    assert shape.run_at is not None
    check = shape.checks.get(shape.run_at)
    if check is not None and isinstance(check.check([run_at]), tuple):
        raise OptionError(f"delay {delay!r} is too long for {RUN_AT!r}: {run_at} out of range")
    return run_at
