"""Producing jobs in bulk: :func:`enqueue`, one ``executemany`` per thousand rows.

SQLAlchemy's ORM bulk insert (``session.execute(insert(Model), rows)``) spends more client
CPU per row on its own bookkeeping than the driver spends sending the row, so a producer
made of it reaches about two thirds of raw ``executemany``.  :func:`enqueue` keeps what a
producer needs from SQLAlchemy (the ``INSERT`` it compiles, each column's Python default and
bind processor, the connection's transaction and its events) and does the rest once per
statement shape instead of once per row: the ``INSERT`` is compiled once per table, column
set and dialect, each row becomes the driver's parameters directly, and the rows go out in
one DBAPI ``executemany`` per chunk (PyMySQL sends it as multi-row ``INSERT``\\ s).  When
something observes statements (events, echo; see :func:`~sqlalchemy_q4m.loading.driver_level`)
the chunk goes through :meth:`~sqlalchemy.Connection.exec_driver_sql` instead, so it is seen.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
import uuid
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field
from operator import itemgetter
from typing import TYPE_CHECKING
from typing import Any
from typing import overload

from sqlalchemy import Column
from sqlalchemy import Connection
from sqlalchemy import Engine
from sqlalchemy import Table
from sqlalchemy import bindparam
from sqlalchemy import insert
from sqlalchemy import inspect
from sqlalchemy import literal_column
from sqlalchemy import select
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Mapper
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import instance_state

from ..backends.driver import DriverSQL
from ..backends.driver import dbapi_error
from ..backends.driver import dialect_cache
from ..backends.driver import driver_level
from ..backends.wakeup import nobody_listens
from ..backends.wakeup import wake_committed
from ..exc import OptionError
from ..exc import Q4MError
from ..exc import RowError
from ..schema.checks import ColumnCheck
from ..schema.checks import check_seconds
from ..schema.checks import column_check
from ..schema.checks import max_bytes
from ..schema.ddl import JOB_ID_INFO_KEY
from ..schema.functions import Subscription
from ..schema.functions import subscriptions
from ..schema.retry import RUN_AT
from ..types import new_job_id

if TYPE_CHECKING:
    from .unique import Unique

__all__ = ["CHUNK_SIZE", "enqueue"]

notify_logger = logging.getLogger("sqlalchemy_q4m.notify")

#: Rows sent per ``executemany`` (PyMySQL further splits them by statement length).
CHUNK_SIZE = 1000

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
    waiting with ``listen`` are woken (:func:`~sqlalchemy_q4m.notify.notify`; MariaDB).
    With a :class:`~sqlalchemy.Connection` or an ORM
    :class:`~sqlalchemy.orm.Session` they are inserted in its transaction (begun if none is)
    and **the caller commits** (or rolls back: then no job was enqueued), then calls
    :func:`~sqlalchemy_q4m.notify.notify` itself if consumers listen.

    Every row is checked before the first ``INSERT`` (on Q4M an inserted row stays, whatever
    the transaction does): each value against its column's type
    (:func:`~sqlalchemy_q4m.checks.column_check`), its size against the server's
    ``max_allowed_packet``; a bad one raises :class:`~sqlalchemy_q4m.exc.RowError` naming the
    row and column, and nothing is enqueued.

    ``unique_key`` (a function row -> str): a row is enqueued only while no job of ``target``
    with the same key is queued or running; returns one :class:`~sqlalchemy_q4m.unique.Unique`
    per row (``enqueued``, ``job_id``) instead of the ids (see :mod:`sqlalchemy_q4m.unique`).
    """
    if unique_key is not None:
        return enqueue_unique(bind, target, rows, unique_key, delay=delay, notify=notify)
    (sub,) = subscriptions([target])
    shape = _shape_for(target, sub.table)
    if delay is not None:
        if shape.run_at is None:
            raise Q4MError(
                f"delay needs a {RUN_AT!r} column (ScheduledMixin or RetryMixin), "
                f"which {sub.table.name!r} lacks"
            )
        delay = check_seconds("delay", delay)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise Q4MError(f"chunk_size must be an integer >= 1, not {chunk_size!r}")
    if not isinstance(bind, Engine | Connection | Session):
        raise Q4MError(f"enqueue needs an Engine, a Connection or a Session, not {bind!r}")
    groups = _groups(shape, rows, delay is not None)
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
        _check_sizes(conn, groups)
        return _send(conn, shape, groups, run_at, chunk_size)
    _check_sizes(bind, groups)
    return _send(bind, shape, groups, run_at, chunk_size)


def _produce(
    engine: Engine,
    sub: Subscription,
    shape: _Shape,
    groups: list[_Group],
    run_at: int | None,
    chunk_size: int,
    wake: bool,
) -> list[uuid.UUID]:
    """An Engine-bound :func:`enqueue`: on ONE connection the rows' ``INSERT``\\ s, then their
    ``COMMIT`` when the server has a transaction open (not after rows of a Q4M table: they
    are durable at once and open none), then (``wake``)
    :func:`~sqlalchemy_q4m.notify.wake_committed`, which sends nothing when no process
    listens; the connection goes back to the pool without the pool's reset-on-return
    ``ROLLBACK``, as nothing is left to roll back.  One job costs what a raw producer's
    ``INSERT`` + ``COMMIT`` (or, on Q4M, its autocommitted ``INSERT``) does."""
    if not (wake and not nobody_listens(engine.dialect, [sub])) and _unobserved(engine, groups):
        produced = _produce_on_pool(engine, shape, groups, run_at, chunk_size)
        if produced is not None:
            return produced
    conn = engine.connect()
    try:
        _check_sizes(conn, groups)
        ids, chunks = _prepare(conn.dialect, shape, groups, run_at, chunk_size)
        dbapi_conn = conn.connection.dbapi_connection
        if not conn.in_transaction() and driver_level(conn) and _open(dbapi_conn) is not None:
            for plan, params in chunks:  # in the server's implicit transaction, if any
                _run_bare(conn, dbapi_conn, plan.sql.sql, params)
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


def _unobserved(engine: Engine, groups: list[_Group]) -> bool:
    """Whether nothing would see a :class:`~sqlalchemy.Connection` at work (no connection
    events, no echo or ``sqlalchemy.engine`` logging, no ``handle_error``) and no row needs
    its size checked: then :func:`_produce_on_pool` may do without one."""
    if getattr(engine, "_has_events", True) or engine.dialect.dispatch.handle_error:
        return False
    if engine.logger.isEnabledFor(logging.INFO):
        return False
    return not any(g.large for g in groups)


def _produce_on_pool(
    engine: Engine,
    shape: _Shape,
    groups: list[_Group],
    run_at: int | None,
    chunk_size: int,
) -> list[uuid.UUID] | None:
    """:func:`_produce` on the pool's connection directly, when nothing observes a
    :class:`~sqlalchemy.Connection` (:func:`_unobserved`): the same statements, a third of
    the client's work per call.  None (nothing sent) for a driver that does not tell
    whether a transaction is open."""
    dialect = engine.dialect
    ids, chunks = _prepare(dialect, shape, groups, run_at, chunk_size)
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
        if _open(dbapi_conn):  # rows of a transactional table: commit them
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


def _run_bare(conn: Connection, dbapi_conn: Any, sql: str, params: list[Any]) -> None:
    """``executemany`` on a cursor of ``conn`` with no SQLAlchemy transaction begun (see
    :func:`_produce`); DBAPI errors raised as SQLAlchemy's, as executing would."""
    cursor = dbapi_conn.cursor()
    try:
        cursor.executemany(sql, params)
    except Exception as err:
        wrapped = dbapi_error(conn, err, sql, params, cursor)
        if wrapped is None:
            raise
        raise wrapped from err
    except BaseException:
        conn.invalidate()  # interrupted mid-statement: the protocol state is unknown
        raise
    finally:
        cursor.close()


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


def _run_at(shape: _Shape, delay: float | None) -> int:
    """now + ``delay`` as whole seconds, when the ``run_at`` column holds it."""
    run_at = int(time.time() + (delay or 0))
    assert shape.run_at is not None
    check = shape.checks.get(shape.run_at)
    if check is not None and isinstance(check.check([run_at]), tuple):
        raise OptionError(f"delay {delay!r} is too long for {RUN_AT!r}: {run_at} out of range")
    return run_at


def enqueue_unique(
    bind: Bind,
    target: Any,
    rows: Iterable[Any],
    unique_key: Callable[[Any], str],
    **options: Any,
) -> list[Unique]:
    """:func:`sqlalchemy_q4m.unique.enqueue_unique` (imported here on first use)."""
    from .unique import enqueue_unique as run

    return run(bind, target, rows, unique_key, **options)


# -- what a target accepts ---------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class _Shape:
    """What rows of one target may hold: row key -> column, and the special columns."""

    table: Table
    mapper: Mapper[Any] | None
    columns: dict[str, Column[Any]]  # by row key (attribute name or column name)
    id_key: str  # the row key of the job id column
    run_at: str | None  # the row key of run_at, when the table has one
    defaults: dict[str, Any]  # column key -> value the mapper implies (polymorphic identity)
    checks: dict[str, ColumnCheck | None]  # by row key: how its values are checked
    sized: frozenset[str]  # row keys whose values may be large (long text, blobs, unknown)
    #: key sets (and whether delayed) that passed :func:`_check_keys`: checked once each
    valid_keys: set[tuple[frozenset[str], bool]] = field(default_factory=set)


_SHAPES: dict[Any, _Shape] = {}


def _shape_for(target: Any, table: Table) -> _Shape:
    shape = _SHAPES.get(target)
    if shape is not None and shape.table is table:
        return shape
    mapper: Mapper[Any] | None = None
    defaults: dict[str, Any] = {}
    if isinstance(target, Table):
        columns: dict[str, Column[Any]] = {c.name: c for c in table.columns}
    else:
        mapper = inspect(target)
        assert mapper is not None
        if mapper.persist_selectable is not table:
            raise Q4MError(f"{mapper.class_.__name__} is mapped to more than its queue table")
        columns = {}
        for prop in mapper.column_attrs:
            column = prop.columns[0]
            if len(prop.columns) == 1 and isinstance(column, Column) and column.table is table:
                columns[prop.key] = column
        identity = mapper.polymorphic_identity
        on = mapper.polymorphic_on
        if identity is not None and isinstance(on, Column) and on.table is table:
            defaults[on.key] = identity
    ids = [k for k, c in columns.items() if c.info.get(JOB_ID_INFO_KEY)]
    if len(ids) != 1:
        raise Q4MError(f"queue table {table.name!r} has no job id column made by the library")
    run_at = next((k for k, c in columns.items() if c.name == RUN_AT), None)
    checks = {k: column_check(c) for k, c in columns.items()}
    sized = frozenset(k for k, c in columns.items() if _may_be_large(c))
    shape = _Shape(table, mapper, columns, ids[0], run_at, defaults, checks, sized)
    if len(_SHAPES) >= 256:
        _SHAPES.clear()
    _SHAPES[target] = shape
    return shape


def _may_be_large(column: Column[Any]) -> bool:
    """Whether one value of ``column`` may approach a server's ``max_allowed_packet``:
    MEDIUMTEXT, LONGBLOB and the like, and types this library does not know."""
    limit = max_bytes(column.type)
    return limit > _LARGE if limit is not None else column_check(column) is None


# -- rows to groups of one key set -----------------------------------------------------------


@dataclass
class _Group:
    """Consecutive rows giving the same keys: one compiled INSERT serves them all."""

    keys: frozenset[str]
    first: int  # 1-based number of its first row, for error messages
    rows: list[Mapping[str, Any]]
    large: dict[int, int] | None = None  # row index -> bytes, for rows of more than _LARGE


def _groups(shape: _Shape, rows: Iterable[Any], delayed: bool) -> list[_Group]:
    """Rows as mappings, validated and cut where their key set changes (row order kept)."""
    groups: list[_Group] = []
    current: list[Mapping[str, Any]] = []
    keys: Any = None
    model = shape.mapper.class_ if shape.mapper is not None else None
    for number, row in enumerate(rows, 1):
        if row.__class__ is not dict and not isinstance(row, Mapping):
            if model is None or not isinstance(row, model):
                what = f"a {model.__name__} or a mapping" if model is not None else "a mapping"
                raise Q4MError(f"row {number}: a job is {what}, not {row!r:.60}")
            row = _instance_values(shape, row)
        if keys is None or row.keys() != keys:
            if groups:
                _check_values(shape, groups[-1])
            keys = frozenset(row.keys())
            if (keys, delayed) not in shape.valid_keys:  # refused sets raise: never kept
                _check_keys(shape, keys, number, delayed)
                if len(shape.valid_keys) < 64:
                    shape.valid_keys.add((keys, delayed))
            current = []
            groups.append(_Group(keys, number, current))
        current.append(row)
    if groups:
        _check_values(shape, groups[-1])
    return groups


def _instance_values(shape: _Shape, obj: Any) -> dict[str, Any]:
    state = instance_state(obj).dict
    return {key: state[key] for key in shape.columns if key in state}


def _check_keys(shape: _Shape, keys: frozenset[str], number: int, delayed: bool) -> None:
    unknown = sorted(k for k in keys if k not in shape.columns)
    if unknown:
        raise RowError(
            f"{shape.table.name!r} has no column {', '.join(map(repr, unknown))}",
            row=number,
            column=unknown[0],
        )
    if shape.id_key in keys:
        raise RowError(
            f"{shape.id_key!r} is the job id, made by the library", row=number, column=shape.id_key
        )
    if delayed and shape.run_at in keys:
        raise RowError(f"give {shape.run_at!r} or delay, not both", row=number, column=RUN_AT)
    given = {shape.columns[k] for k in keys}
    table = shape.table
    for column in table.columns:
        if column in given or column.default is not None or column.server_default is not None:
            continue
        if column.nullable or column.info.get(JOB_ID_INFO_KEY) or column.key in shape.defaults:
            continue
        if column is table.autoincrement_column or (delayed and column.name == RUN_AT):
            continue
        raise RowError(
            f"no value for {column.name!r}, which is NOT NULL without a default",
            row=number,
            column=column.name,
        )


def _check_values(shape: _Shape, group: _Group) -> None:
    """Every value of ``group`` against its column (first bad row wins); values a column
    takes in another form (``"42"`` for an integer) are replaced in copies of their rows."""
    rows = group.rows
    bad: tuple[int, str, str] | None = None
    changes: list[tuple[str, dict[int, Any]]] = []
    for key in group.keys:
        values = list(map(itemgetter(key), rows))
        check = shape.checks[key]
        if check is not None:
            result = check.check(values)
            if isinstance(result, tuple):
                if bad is None or result[0] < bad[0]:
                    bad = (result[0], result[1], shape.columns[key].name)
                continue
            if result:
                changes.append((key, result))
        if key in shape.sized:
            _note_large(group, values)
    if bad is not None:
        index, reason, name = bad
        raise RowError(reason, row=group.first + index, column=name)
    copies: dict[int, dict[str, Any]] = {}
    for key, changed in changes:
        for index, value in changed.items():
            copy = copies.get(index)
            if copy is None:
                copy = copies[index] = dict(rows[index])
                rows[index] = copy
            copy[key] = value


#: Rows whose text and bytes exceed this many bytes are measured against the server's
#: ``max_allowed_packet`` (at least 1 MiB on MariaDB and MySQL; 16 MiB or 64 MiB by default).
_LARGE = 512 * 1024


def _note_large(group: _Group, values: list[Any]) -> None:
    for index, value in enumerate(values):
        if value.__class__ in (str, bytes, bytearray) and len(value) > _LARGE // 4:
            size = len(value.encode("utf-8", "replace")) if isinstance(value, str) else len(value)
            if group.large is None:
                group.large = {}
            group.large[index] = group.large.get(index, 0) + size


def _check_sizes(conn: Connection, groups: list[_Group]) -> None:
    """A row the server would refuse as too large (it drops the connection: "server has gone
    away") is a :class:`RowError` naming ``max_allowed_packet``, before anything is sent."""
    large = [(g.first + i, size) for g in groups if g.large for i, size in g.large.items()]
    large = [(number, size) for number, size in large if size > _LARGE]
    if not large:
        return
    limit = _max_allowed_packet(conn)
    for number, size in sorted(large):
        if size + _STATEMENT_SLACK > limit:
            raise RowError(
                f"about {size} bytes, more than the server's max_allowed_packet "
                f"({limit} bytes): send less per job, or raise max_allowed_packet",
                row=number,
            )


#: Bytes of a one-row INSERT besides its values (the statement text, quoting, escapes).
_STATEMENT_SLACK = 4096


def _max_allowed_packet(conn: Connection) -> int:
    value = conn.info.get("q4m_max_allowed_packet")
    if value is None:
        value = conn.info["q4m_max_allowed_packet"] = int(
            conn.scalar(select(literal_column("@@max_allowed_packet"))) or 0
        )
    return int(value)


# -- one compiled INSERT per table, column set and dialect -----------------------------------


class _RowContext:
    """What a context-taking column default sees: the row's parameters so far (column
    keys, values before bind processing), as SQLAlchemy's execution context offers them."""

    __slots__ = ("current_column", "current_parameters")

    def __init__(self) -> None:
        self.current_parameters: dict[str, Any] = {}
        self.current_column: Column[Any] | None = None

    def get_current_parameters(self, isolate_multiinsert_groups: bool = True) -> dict[str, Any]:
        return self.current_parameters


Processor = Callable[[Any], Any]
_Call = tuple[str, Column[Any], Callable[[Any], Any], Processor | None]


@dataclass(frozen=True)
class _Plan:
    """The INSERT for one key set, and how a row becomes its parameters."""

    sql: DriverSQL
    renames: dict[str, str] | None  # row key -> column key, when some differ
    constants: dict[str, Any]  # column key -> default, bind-processed
    raw_constants: dict[str, Any]  # the same, as the Python values
    calls: tuple[_Call, ...]  # columns whose default is a callable
    processors: tuple[tuple[str, Processor], ...]  # given columns with a bind processor
    id_key: str  # column key of the job id
    id_bind: Processor | None
    run_at: tuple[str, Processor | None] | None  # column key of run_at, when delayed
    plain: bool  # the rows give every other column, as the driver takes them


def _plan_for(shape: _Shape, group: _Group, delayed: bool, dialect: Dialect) -> _Plan:
    per_dialect: dict[Any, _Plan] = dialect_cache(dialect, "plans")
    cache_key = (shape, group.keys, delayed)
    plan = per_dialect.get(cache_key)
    if plan is None:
        if len(per_dialect) >= 1024:
            per_dialect.clear()
        plan = per_dialect[cache_key] = _build_plan(shape, group, delayed, dialect)
    return plan


#: Drivers whose ``pyformat`` also takes ``%s`` with a tuple: a tuple per row is cheaper to
#: build and cheaper for the driver to escape than a dict.
_FORMAT_TOO = frozenset({"pymysql", "mysqldb"})
_PARAM_TOKEN = re.compile(r"%%|%\((\w+)\)s")


def _positional(sql: DriverSQL, dialect: Dialect) -> DriverSQL:
    """``sql`` with ``%s`` placeholders and their order, when the driver takes them."""
    if sql.positions is not None or dialect.driver not in _FORMAT_TOO:
        return sql
    if dialect.paramstyle != "pyformat":  # pragma: no cover - those drivers' default
        return sql
    names: list[str] = []

    def placeholder(match: re.Match[str]) -> str:
        if match.group(1) is None:
            return match.group(0)  # a literal percent sign, escaped the same in both styles
        names.append(match.group(1))
        return "%s"

    text = _PARAM_TOKEN.sub(placeholder, sql.sql)
    return DriverSQL(text, tuple(names), sql.defaults)


def _bind_processor(column: Column[Any], dialect: Dialect) -> Processor | None:
    processor: Processor | None = column.type.dialect_impl(dialect).bind_processor(dialect)
    return processor


def _build_plan(shape: _Shape, group: _Group, delayed: bool, dialect: Dialect) -> _Plan:
    table = shape.table
    given = {shape.columns[k] for k in group.keys}
    id_column = shape.columns[shape.id_key]
    run_at = shape.columns[shape.run_at] if delayed and shape.run_at is not None else None
    inserted = given | {id_column} | ({run_at} if run_at is not None else set())
    implied = {
        c: v
        for c in table.columns
        if (v := shape.defaults.get(c.key)) is not None and c not in given
    }
    values: dict[Any, Any] = {c: bindparam(c.key, None) for c in (*inserted, *implied)}
    sql = _positional(DriverSQL.compile(insert(table).values(values), dialect), dialect)
    names = set(sql.positions if sql.positions is not None else sql.defaults)
    raw_constants: dict[str, Any] = {}
    constants: dict[str, Any] = {}
    calls: list[_Call] = []
    for column in table.columns:
        if column.key not in names or column in inserted:
            continue
        processor = _bind_processor(column, dialect)
        default: Any = column.default
        if column in implied:
            value = implied[column]
        elif default is not None and default.is_callable:
            calls.append((column.key, column, default.arg, processor))
            continue
        elif default is not None and default.is_scalar:
            value = default.arg
        else:  # pragma: no cover - SQLAlchemy added a parameter we have no value for
            raise Q4MError(f"cannot enqueue into {table.name!r}: {column.name!r} has no value")
        raw_constants[column.key] = value
        constants[column.key] = value if processor is None else processor(value)
    renames = {k: shape.columns[k].key for k in group.keys if k != shape.columns[k].key}
    processors = tuple((c.key, p) for c in given if (p := _bind_processor(c, dialect)) is not None)
    return _Plan(
        sql=sql,
        renames=renames or None,
        constants=constants,
        raw_constants=raw_constants,
        calls=tuple(calls),
        processors=processors,
        id_key=id_column.key,
        id_bind=_bind_processor(id_column, dialect),
        run_at=None if run_at is None else (run_at.key, _bind_processor(run_at, dialect)),
        plain=not (renames or constants or calls or processors or run_at is not None),
    )


# -- rows to parameters, and out ---------------------------------------------------------------


def _send(
    conn: Connection,
    shape: _Shape,
    groups: list[_Group],
    run_at: int | None,
    chunk_size: int,
) -> list[uuid.UUID]:
    ids, chunks = _prepare(conn.dialect, shape, groups, run_at, chunk_size)
    for plan, params in chunks:
        plan.sql.run_many(conn, params)
    return ids


def _prepare(
    dialect: Dialect,
    shape: _Shape,
    groups: list[_Group],
    run_at: int | None,
    chunk_size: int,
) -> tuple[list[uuid.UUID], list[tuple[_Plan, list[Any]]]]:
    """The new job ids and each chunk's plan and parameters: every row's parameters are
    made before anything is sent (a failing default sends nothing)."""
    ids: list[uuid.UUID] = []
    chunks: list[tuple[_Plan, list[Any]]] = []
    for group in groups:
        plan = _plan_for(shape, group, run_at is not None, dialect)
        rows = group.rows
        for start in range(0, len(rows), chunk_size):
            chunk = rows[start : start + chunk_size]
            chunks.append((plan, _params(plan, chunk, run_at, ids, group.first + start)))
    return ids, chunks


def _params(
    plan: _Plan,
    rows: list[Mapping[str, Any]],
    run_at: int | None,
    ids: list[uuid.UUID],
    first: int = 1,
) -> list[Any]:
    """The driver's parameters for ``rows`` (the first is row number ``first``), in the
    statement's paramstyle; the new job ids are appended to ``ids``.  A value a bind
    processor or a column default refuses is a :class:`RowError`."""
    positions = plan.sql.positions
    if plan.plain and positions is not None and run_at is None:
        return _plain_params(plan, positions, rows, ids)
    constants, raw_constants = plan.constants, plan.raw_constants
    if plan.run_at is not None:
        key, processor = plan.run_at
        constants = {**constants, key: run_at if processor is None else processor(run_at)}
        raw_constants = {**raw_constants, key: run_at}
    renames = plan.renames
    calls = plan.calls
    processors = plan.processors
    id_key = plan.id_key
    id_bind = plan.id_bind
    context = _RowContext() if calls else None
    new_id = new_job_id
    add_id = ids.append
    pick = None if positions is None else _picker(positions)
    out: list[Any] = []
    key = ""
    try:
        for row in rows:
            if renames is not None:
                row = {renames.get(k, k): v for k, v in row.items()}
            params = {**constants, **row}
            for key, processor in processors:
                params[key] = processor(params[key])
            if context is not None:
                raw = context.current_parameters = {**raw_constants, **row}
                for key, column, call, processor in calls:
                    context.current_column = column
                    value = raw[key] = call(context)
                    params[key] = value if processor is None else processor(value)
            job_id = new_id()
            add_id(job_id)
            params[id_key] = job_id if id_bind is None else id_bind(job_id)
            out.append(params if pick is None else pick(params))
    except Exception as err:
        raise RowError(
            f"{key!r}: {type(err).__name__}: {err}", row=first + len(out), column=key or None
        ) from err
    return out


def _plain_params(
    plan: _Plan, positions: tuple[str, ...], rows: list[Mapping[str, Any]], ids: list[uuid.UUID]
) -> list[Any]:
    """:func:`_params` when each row gives every column but the id, as is: the common case,
    and the one that costs least (no dict per row)."""
    id_at = positions.index(plan.id_key)
    rest = _picker(positions[:id_at] + positions[id_at + 1 :])
    id_bind = plan.id_bind or (lambda value: value)
    new_id = new_job_id
    add_id = ids.append
    out: list[tuple[Any, ...]] = []
    add = out.append
    if id_at == 0:
        for row in rows:
            job_id = new_id()
            add_id(job_id)
            add((id_bind(job_id), *rest(row)))
    else:
        for row in rows:
            job_id = new_id()
            add_id(job_id)
            values = rest(row)
            add((*values[:id_at], id_bind(job_id), *values[id_at:]))
    return out


def _picker(names: tuple[str, ...]) -> Callable[[Mapping[str, Any]], tuple[Any, ...]]:
    """``params`` -> the tuple of its values at ``names``, in order."""
    if len(names) == 1:
        (name,) = names
        return lambda params: (params[name],)
    return itemgetter(*names)
