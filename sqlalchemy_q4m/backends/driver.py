"""The library's per-job statements, sent on the DBAPI cursor when nothing would observe
SQLAlchemy's execution of them.

A consumer repeats the same few statements for every job (the claim or the owner's load, the
completion); :class:`DriverSQL` keeps each compiled once per dialect and runs it on the pinned
connection's DBAPI cursor when :func:`driver_level` says nothing observes statements, else with
:meth:`~sqlalchemy.Connection.exec_driver_sql`.  DBAPI errors are raised as SQLAlchemy's
(:func:`dbapi_error`), a lost connection invalidated, as executing would.  Caches live on the
dialect (:func:`dialect_cache`).  :mod:`~sqlalchemy_q4m.backends.loading` builds jobs on top.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field
from typing import Any
from typing import NoReturn
from typing import TypeVar

from sqlalchemy import Connection
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import StatementError
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler

from ..exc import QueueTableError

__all__ = [
    "AUTOCOMMIT_KEY",
    "DriverSQL",
    "Fetched",
    "dbapi_error",
    "dialect_cache",
    "driver_level",
    "execute_many",
    "on_cursor",
    "on_driver",
    "raise_translated",
]

R = TypeVar("R")
Fetched = tuple[Any, Sequence[Sequence[Any]]]  # a cursor's description and rows


@dataclass(frozen=True)
class DriverSQL:
    """A statement compiled once for one dialect: its SQL and how to pass its parameters."""

    sql: str
    positions: tuple[str, ...] | None  # parameter names in order, for positional paramstyles
    defaults: dict[str, Any]
    #: Sent with no parameters at all when given none (:meth:`params`): nothing to bind, no
    #: ``%`` for the driver to un-double.
    bare: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "bare", not self.defaults and "%" not in self.sql)

    @classmethod
    def compile(
        cls, stmt: ClauseElement, dialect: Dialect, *, literal_binds: bool = False
    ) -> DriverSQL:
        """``stmt`` compiled for ``dialect``; with ``literal_binds`` its values are rendered
        in the SQL (quoted and escaped by the dialect), leaving no parameter to send."""
        kw = {"literal_binds": True} if literal_binds else {}
        compiled = stmt.compile(dialect=dialect, compile_kwargs=kw)
        assert isinstance(compiled, SQLCompiler)
        if compiled.post_compile_params or compiled.literal_execute_params:  # pragma: no cover
            raise QueueTableError(f"cannot precompile {compiled.string!r}")
        positions = tuple(compiled.positiontup or ()) if compiled.positional else None
        return cls(compiled.string, positions, dict(compiled.construct_params() or {}))

    def params(self, values: dict[str, Any]) -> Any:
        if not values and not self.defaults:  # queue_end(), queue_wait(), the owner's SELECT
            if self.bare:
                return None  # the driver has nothing to interpolate
            return {} if self.positions is None else ()  # it turns "%%" into "%"
        merged = {**self.defaults, **values}
        if self.positions is None:
            return merged
        return tuple(merged[name] for name in self.positions)

    def params_many(self, names: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[Any]:
        """One parameter set per row of ``rows``, each giving a value to every one of
        ``names`` (all of the statement's parameters), in the form :meth:`params` gives."""
        positions = self.positions
        if positions is None:
            if len(names) == 1:
                (name,) = names
                return [{name: row[0]} for row in rows]
            return [dict(zip(names, row, strict=True)) for row in rows]
        order = [names.index(name) for name in positions]
        return [tuple([row[i] for i in order]) for row in rows]

    def run(
        self, conn: Connection, values: dict[str, Any], unobserved: bool | None = None
    ) -> Fetched:
        """Execute on ``conn`` in its transaction (begun if none is); the cursor's
        description and rows.  See :func:`driver_level` for how; ``unobserved`` is its
        answer when the caller has it already (a queue session asks once per job)."""
        params = self.params(values)
        if not (driver_level(conn) if unobserved is None else unobserved):
            result = conn.exec_driver_sql(self.sql, params)
            if not result.returns_rows:
                return None, []
            description = result.cursor.description if result.cursor is not None else None
            return description, result.all()
        # what on_cursor() does, written out (it runs for every statement of every job), on
        # the connection's kept cursor
        cursor = _kept_cursor(conn)
        sql = self.sql
        try:
            cursor.execute(sql, params)
            description = cursor.description
            return description, cursor.fetchall() if description else []
        except Exception as err:
            _drop_kept_cursor(conn, cursor)
            raise_translated(conn, err, sql, params, cursor)
        except BaseException:
            _drop_kept_cursor(conn, cursor)
            conn.invalidate()
            raise

    def run_many(self, conn: Connection, params: Sequence[Any]) -> None:
        """Execute once per parameter set in ``params`` (each in the form :meth:`params`
        gives) with one ``executemany``, on ``conn`` in its transaction (begun if none is)."""
        if not driver_level(conn):
            conn.exec_driver_sql(self.sql, list(params))
            return
        self._on_cursor(conn, params, execute_many)

    def _on_cursor(self, conn: Connection, params: Any, call: Callable[[Any, str, Any], R]) -> R:
        """``call(cursor, sql, params)`` on a DBAPI cursor of ``conn`` (in its transaction,
        begun if none is); DBAPI errors raised as SQLAlchemy's, as executing would."""
        return on_cursor(conn, _cursor(conn), self.sql, params, call)


def on_cursor(
    conn: Connection, cursor: Any, sql: str, params: Any, call: Callable[[Any, str, Any], R]
) -> R:
    """``call(cursor, sql, params)``, then close ``cursor`` (a DBAPI cursor of ``conn``): DBAPI
    errors raised as SQLAlchemy's, as executing would; an interrupt mid-statement invalidates
    ``conn`` (the protocol state is unknown)."""
    try:
        return call(cursor, sql, params)
    except Exception as err:
        raise_translated(conn, err, sql, params, cursor)
    except BaseException:
        conn.invalidate()
        raise
    finally:
        cursor.close()


def execute_many(cursor: Any, sql: str, params: Any) -> None:
    cursor.executemany(sql, params)


#: Key in a DBAPI connection's ``info``: the library put it in the driver's autocommit mode
#: (Q4M consumers); see :func:`sqlalchemy_q4m.backends.base.autocommit_for_queue`.
AUTOCOMMIT_KEY = "sqlalchemy_q4m.autocommit"


#: Key in a DBAPI connection's ``info``: the queue session or batch owning a job on it (see
#: :mod:`sqlalchemy_q4m.backends.base`, "one owner per connection").
OWNER_KEY = "sqlalchemy_q4m.owner"


def _begun(conn: Connection) -> Any:
    """``conn``'s pooled connection, in its transaction (begun if none is), or outside any on
    a connection the library runs in autocommit (a Q4M consumer's: nothing to commit).

    The transaction is begun on the :class:`~sqlalchemy.Connection` (``conn.begin()``, what
    executing would autobegin), except for an owner that takes it on the driver
    (``owner.driver_begins``: a portable queue session on a connection nobody else holds, one
    pinned from an Engine or the worker's own, with no transaction listener but the
    library's, see :func:`quiet_transactions`): the driver begins it with the first
    statement, as the raw loop's does, and the owner commits or rolls it back on the driver
    (``owner.driver_transaction``), saving SQLAlchemy's begin and commit with their events.
    Whatever reaches the connection meanwhile makes it SQLAlchemy's again (no statement is
    sent): the queue session's ``connection`` begins SQLAlchemy's transaction before handing
    it out, so a caller's ``commit()`` is seen and stopped as ever, and the job's ORM session
    begins it on first use; the owner then commits or rolls back that one instead."""
    fairy = conn.connection  # what conn.info would look up again
    if not conn.in_transaction():
        info = fairy.info
        if not info.get(AUTOCOMMIT_KEY):
            owner = info.get(OWNER_KEY)
            if owner is not None and getattr(owner, "driver_begins", False):
                owner.driver_transaction = True
            else:
                conn.begin()  # what executing would autobegin: SQLAlchemy's view stays exact
    return fairy


def quiet_transactions(conn: Connection) -> bool:
    """True when nothing but the library observes ``conn``'s transactions: no ``begin``
    listener, and on each of ``commit`` and ``rollback`` at most the one the ownership watch
    registers per engine, so a transaction begun and ended on the driver is seen by nobody
    (:func:`_begun`)."""
    d = conn.dispatch if getattr(conn, "_has_events", True) else conn.engine.dispatch
    return not d.begin and len(d.commit) <= 1 and len(d.rollback) <= 1


def driver_commit(dbapi_conn: Any) -> None:
    dbapi_conn.commit()


def driver_rollback(dbapi_conn: Any) -> None:
    dbapi_conn.rollback()


def _cursor(conn: Connection) -> Any:
    """A new DBAPI cursor of ``conn``, in a transaction as :func:`_begun` says."""
    dbapi_conn = _begun(conn).dbapi_connection
    assert dbapi_conn is not None
    return dbapi_conn.cursor()


#: Key in a DBAPI connection's ``info``: (that DBAPI connection, the cursor the library's
#: per-job statements run on).  One cursor for the connection's life rather than a new one
#: per statement: under SQLAlchemy's asyncio adapters opening and closing a cursor are an
#: await each, twice the statement's own.  ``info`` is cleared when the connection is
#: invalidated, and the cursor is dropped after any error.
CURSOR_KEY = "sqlalchemy_q4m.cursor"


def _kept_cursor(conn: Connection) -> Any:
    """The kept DBAPI cursor of ``conn`` (see :data:`CURSOR_KEY`), in a transaction as
    :func:`_begun` says."""
    fairy = _begun(conn)
    info = fairy.info
    dbapi_conn = fairy.dbapi_connection
    kept = info.get(CURSOR_KEY)
    if kept is not None and kept[0] is dbapi_conn:
        return kept[1]
    assert dbapi_conn is not None
    cursor = dbapi_conn.cursor()
    info[CURSOR_KEY] = (dbapi_conn, cursor)
    return cursor


def _drop_kept_cursor(conn: Connection, cursor: Any) -> None:
    """After an error on it: forget and close ``cursor`` (its state is the error's)."""
    if not conn.closed and not conn.invalidated:
        kept = conn.connection.info.get(CURSOR_KEY)
        if kept is not None and kept[1] is cursor:
            del conn.connection.info[CURSOR_KEY]
    with contextlib.suppress(Exception):
        cursor.close()


def on_driver(conn: Connection, what: str, call: Callable[[Any], R]) -> R:
    """``call(dbapi_connection)`` for ``conn``; DBAPI errors raised as SQLAlchemy's (the
    connection invalidated when it was lost), as executing ``what`` would."""
    dbapi_conn = conn.connection.dbapi_connection
    try:
        return call(dbapi_conn)
    except Exception as err:
        raise_translated(conn, err, what, None, None)
    except BaseException:
        conn.invalidate()  # interrupted mid-command: the protocol state is unknown
        raise


def raise_translated(
    conn: Connection, err: Exception, sql: str, params: Any, cursor: Any
) -> NoReturn:
    """Raise ``err`` as :func:`dbapi_error` translates it (unchanged when it is not the
    DBAPI's): what every ``except`` around a driver call here does."""
    wrapped = dbapi_error(conn, err, sql, params, cursor)
    if wrapped is None:
        raise err
    raise wrapped from err


def dbapi_error(
    conn: Connection, err: Exception, sql: str, params: Any, cursor: Any
) -> StatementError | None:
    """``err`` (raised by the DBAPI on ``cursor``) as SQLAlchemy's ``DBAPIError`` class for
    it, the connection invalidated when it was lost, as executing would; None for an error
    that is not the DBAPI's."""
    dbapi = conn.dialect.loaded_dbapi
    if not isinstance(err, dbapi.Error):
        return None
    dbapi_conn = conn.connection.dbapi_connection
    lost = conn.dialect.is_disconnect(err, dbapi_conn, cursor)
    wrapped = DBAPIError.instance(
        sql,
        params,
        err,
        dbapi.Error,
        connection_invalidated=lost,
        dialect=conn.dialect,
    )
    if lost:
        conn.invalidate(wrapped)
    return wrapped


def driver_level(conn: Connection) -> bool:
    """Whether the per-job statements run on the DBAPI cursor of ``conn`` directly.

    SQLAlchemy's statement execution (execution context, result object, event dispatch)
    costs about as much client CPU per job as the driver itself; the job loop repeats the
    same three statements per job, so they skip it when nothing would observe it: no
    statement-level connection events (``before_execute``, ``after_execute``,
    ``before_cursor_execute``, ``after_cursor_execute``, ``handle_error``), no echo or
    ``sqlalchemy.engine`` logging.  The
    transaction still goes through the :class:`~sqlalchemy.Connection` (begin, commit,
    rollback and their events), except one a queue session begins and ends on the driver
    where nothing could see the difference (see :func:`_begun`); DBAPI errors are raised as
    SQLAlchemy's ``DBAPIError`` classes, and a disconnect invalidates the connection, as
    executing would.
    """
    engine = conn.engine
    if engine.logger.isEnabledFor(logging.INFO):  # echo, or logging configured
        return False
    if conn.dialect.dispatch.handle_error:  # error-translating listeners
        return False
    # SQLAlchemy's own test before dispatching any connection event (runs per statement)
    conn_events = getattr(conn, "_has_events", True)
    if not (conn_events or getattr(engine, "_has_events", True)):
        return True
    # without listeners of its own a connection dispatches its engine's: asked directly
    d = conn.dispatch if conn_events else engine.dispatch
    return not (
        d.before_cursor_execute or d.after_cursor_execute or d.before_execute or d.after_execute
    )


_CACHES = "_q4m_caches"


def dialect_cache(dialect: Dialect, name: str) -> dict[Any, Any]:
    """The cache ``name`` of ``dialect``, which lives as long as the dialect (its engine's).

    It is kept on the dialect object itself: what is cached (compiled SQL, type processors,
    a ``TypeDecorator``'s closing over the dialect) refers back to the dialect, so a
    module-level mapping keyed by it, even a weak one, would keep every engine's dialect alive.
    """
    try:
        cache: dict[Any, Any] = dialect.__dict__[_CACHES][name]
        return cache
    except KeyError:
        pass
    caches: dict[str, dict[Any, Any]] = vars(dialect).setdefault(_CACHES, {})
    return caches.setdefault(name, {})
