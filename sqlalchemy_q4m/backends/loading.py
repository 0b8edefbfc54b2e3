"""Claimed rows to jobs, with as little client CPU per job as the driver allows.

A consumer repeats the same few statements for every job: the claim (or, on Q4M, the owner's
load) and the completion ``DELETE``.  Profiled, most of a job's client CPU went to SQLAlchemy
rather than to the driver: an ORM ``Session`` per job, the ORM select and its loading
machinery, the execution context and result object of each statement.  A :class:`Loader`
keeps, per queue target and dialect, the SQL SQLAlchemy compiled for those statements once,
runs it on the pinned connection's DBAPI cursor when nothing observes statements (else with
:meth:`Connection.exec_driver_sql`; see :func:`driver_level`) and builds the mapped instance
from the driver's row as a query would: each column's result processor, then its identity key, as
:func:`~sqlalchemy.orm.make_transient_to_detached` does (a detached instance, no history).  No
``Session`` is needed to own a job; one is made only when the caller asks for it.

Mappings this cannot reproduce go through the ORM as before: inheritance or polymorphic
loading, deferred, expression or relationship attributes, ``load``/``refresh`` listeners
(``@reconstructor``).  Core tables yield SQLAlchemy Rows (``Connection.execute``), and a
claim with a condition is executed from its statement (the condition's values change).

How the statements reach the driver (:class:`~sqlalchemy_q4m.backends.driver.DriverSQL`,
:func:`~sqlalchemy_q4m.backends.driver.driver_level`) is :mod:`~sqlalchemy_q4m.backends.driver`;
the result processing of the driver's rows is :mod:`~sqlalchemy_q4m.backends.rows`.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
from typing import Any
from typing import TypeVar

from sqlalchemy import Column
from sqlalchemy import Connection
from sqlalchemy import Table
from sqlalchemy import and_
from sqlalchemy import bindparam
from sqlalchemy import delete
from sqlalchemy import inspect
from sqlalchemy import select
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import CompileError
from sqlalchemy.exc import StatementError
from sqlalchemy.orm import ColumnProperty
from sqlalchemy.orm import Mapper
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import instance_state
from sqlalchemy.sql.elements import ColumnElement

from ..exc import QueueTableError
from ..schema.ddl import claim_order
from ..schema.functions import Subscription
from .driver import DriverSQL
from .driver import dialect_cache
from .rows import Key
from .rows import RowConverter
from .rows import Unloadable
from .rows import core_rows
from .rows import row_metadata

__all__ = [
    "Loader",
    "claim_statement",
    "loader_for",
    "plain_mapping",
]

_LIMIT = "q4m_limit"
_KEY = "q4m_key_{}"
#: Most claim statements a loader keeps (one per batch size in use).
_STATEMENTS = 16

R = TypeVar("R")
Job = Any


def claim_statement(sub: Subscription, limit: int = 1, columns: Sequence[Any] | None = None) -> Any:
    """``SELECT ... WHERE cond ORDER BY id LIMIT n FOR UPDATE SKIP LOCKED`` for ``sub`` (its
    target, or ``columns``); a column marked ``info["q4m_priority"]`` (``PriorityMixin``)
    orders first, highest first."""
    stmt = select(*columns) if columns is not None else select(sub.target)
    if sub.where is not None:
        stmt = stmt.where(sub.where)
    return stmt.order_by(*_order(sub.table)).limit(limit).with_for_update(skip_locked=True)


def _order(table: Table) -> list[ColumnElement[Any]]:
    # the order the portable layout's claim index (ddl.CLAIM_INDEX) is kept in
    return [c.desc() if desc else c for c, desc in claim_order(table)]


def plain_mapping(mapper: Mapper[Any], table: Table) -> bool:
    """True when an instance of ``mapper`` is fully described by one row of ``table``: every
    attribute a plain column of it, nothing the ORM's loader would add (see the module
    docstring)."""
    if mapper.inherits is not None or mapper.polymorphic_on is not None:
        return False
    if mapper.local_table is not table or mapper.with_polymorphic:
        return False
    manager = mapper.class_manager
    if manager.dispatch.load or manager.dispatch.refresh:
        return False
    for prop in mapper.iterate_properties:
        if not isinstance(prop, ColumnProperty) or prop.deferred or len(prop.columns) != 1:
            return False
        column = prop.columns[0]
        if not isinstance(column, Column) or column.table is not table:
            return False
    return all(mapper.get_property_by_column(c) for c in table.primary_key.columns)


class Loader:
    """The claim, load and completion of one queue target on one dialect; see the module
    docstring.  Made by :func:`loader_for`, shared by every consumer of that engine."""

    def __init__(self, target: Any, table: Table, dialect: Dialect) -> None:
        self.table, self.dialect = table, dialect
        self.key_columns = list(table.primary_key.columns)
        mapper: Mapper[Any] | None = None if isinstance(target, Table) else inspect(target)
        self.mapper = mapper
        #: Instances built from driver rows (else: the ORM loads them in a session).
        self.direct = mapper is not None and plain_mapping(mapper, table)
        columns: list[Any]
        if mapper is not None and self.direct:
            props = list(mapper.column_attrs)
            columns = [p.columns[0] for p in props]
            self.attrs: list[str] = [p.key for p in props]
            self._new = mapper.class_manager.new_instance
            self._identity_key = mapper.identity_key_from_primary_key
        else:
            columns, self.attrs = list(table.columns), []
        self.columns = columns
        self._key_at = [columns.index(c) for c in self.key_columns if c in columns]
        self._key_names = [_KEY.format(i) for i in range(len(self.key_columns))]  # DELETE's
        impls = [c.type.dialect_impl(dialect) for c in self.key_columns]
        self._key_binds = [impl.bind_processor(dialect) for impl in impls]
        #: The driver's rows of ``columns`` as a query would read them.
        self.rows = RowConverter(table, columns, self._key_at, dialect)
        self._claim_sql: DriverSQL | None = None
        self._owned_sql: DriverSQL | None = None
        self._delete_sql: DriverSQL | None = None
        #: Claim statements without a condition, by (limit, unconverted); see _statement.
        self._statements: dict[tuple[int, bool], Any] = {}
        #: The owner's ``SELECT`` of every column (Q4M).
        self._owned = select(*columns)
        #: Core rows built from driver rows (None: a Core table whose Rows cannot be).
        self._row_meta = row_metadata(columns) if mapper is None else None
        #: Jobs built from driver rows: instances (``direct``) or a Core table's Rows.
        self.from_driver = self.direct or self._row_meta is not None

    # -- building jobs ---------------------------------------------------------------------

    def instance(self, values: Sequence[Any]) -> Job:
        """A mapped instance holding ``values`` (already processed), detached, clean."""
        obj = self._new()
        state = instance_state(obj)
        state.dict.update(zip(self.attrs, values, strict=True))
        # What make_transient_to_detached() does, minus what cannot apply here (every
        # attribute is loaded and none was set through an event, so no history to reset).
        at = self._key_at
        pk = (values[at[0]],) if len(at) == 1 else tuple([values[i] for i in at])
        state.key = self._identity_key(pk)
        return obj

    def raw_key(self, values: Sequence[Any]) -> Key:
        """The key as the driver sends it, from processed values (``uuid.UUID`` -> bytes)."""
        return tuple(
            v if bind is None else bind(v) for bind, v in zip(self._key_binds, values, strict=True)
        )

    def _jobs(
        self, rows: Sequence[Sequence[Any] | Unloadable], raw: Sequence[Sequence[Any]] | None
    ) -> list[tuple[Job, Key]]:
        at = self._key_at
        out: list[tuple[Job, Key]] = []
        for i, row in enumerate(rows):
            if isinstance(row, Unloadable):
                out.append((row, row.key))
                continue
            if raw is None:
                key = self.raw_key([row[j] for j in at])
            elif len(at) == 1:
                key = (raw[i][at[0]],)
            else:
                key = tuple([raw[i][j] for j in at])
            out.append((self.instance(row) if self.direct else row, key))
        return out

    def _orm_jobs(self, jobs: Sequence[Any]) -> list[tuple[Job, Key]]:
        return [(job, self.raw_key(instance_state(job).identity or ())) for job in jobs]

    # -- the statements --------------------------------------------------------------------

    def claim(
        self,
        conn: Connection,
        sub: Subscription,
        limit: int,
        orm: Callable[[], Session],
        in_session: bool = False,
        unobserved: bool | None = None,
    ) -> list[tuple[Job, Key]]:
        """Lock up to ``limit`` unowned jobs of ``sub`` (portable backend); ``orm`` gives the
        session the ORM loads them in when they cannot be built directly, or when
        ``in_session`` (the caller's own Session) and building them directly would not load
        them as the ORM does (:func:`orm_bypassable`; the caller adds the built job to it,
        or the instance it holds for that identity: :func:`in_identity_map`)."""
        if not self.key_columns:
            raise QueueTableError(
                f"queue table {sub.name!r} has no job id: the portable backend needs a key to "
                "own and delete one job; declare it with QueueMixin or queue_table()"
            )
        session = orm() if in_session and self.direct else None
        if self.from_driver and (session is None or orm_bypassable(session)):
            sql, params = self._claim_sql, {_LIMIT: limit}
            if sub.where is not None:
                sql, params = conditional_claim(self, sub, limit), {}
            elif sql is None:
                stmt = claim_statement(sub, 1, self.columns).limit(bindparam(_LIMIT, 1))
                sql = self._claim_sql = DriverSQL.compile(stmt, self.dialect)
            if sql is not None:
                raw = self.rows.fetched(sql.run(conn, params, unobserved))
                jobs = self._jobs(self._driver_jobs(raw), raw)
                return jobs if session is None else in_identity_map(session, jobs)
        raw_claim = self._statement(sub, limit, raw=True)  # the same rows, unconverted
        if self.mapper is not None and (in_session or not self.direct):
            claim = self._statement(sub, limit, raw=False)
            load = lambda: self._orm_jobs(orm().execute(claim).scalars().all())  # noqa: E731
            return self._or_unloadable(conn, raw_claim, load)
        return self._or_unloadable(
            conn, raw_claim, lambda: self._jobs(conn.execute(raw_claim).all(), None)
        )

    def _statement(self, sub: Subscription, limit: int, *, raw: bool) -> Any:
        """:func:`claim_statement` for ``sub`` (of its columns when ``raw``), built once per
        limit for a subscription without a condition (the same statement every claim)."""
        stmt = None if sub.where is not None else self._statements.get((limit, raw))
        if stmt is None:
            stmt = claim_statement(sub, limit, self.columns if raw else None)
            if sub.where is None:
                if len(self._statements) >= _STATEMENTS:
                    self._statements.clear()
                self._statements[(limit, raw)] = stmt
        return stmt

    def load_owned(
        self,
        conn: Connection,
        sub: Subscription,
        orm: Callable[[], Session],
        unobserved: bool | None = None,
    ) -> tuple[Job, Key] | None:
        """The one row a Q4M owner sees (``SELECT ... FROM t`` in owner mode)."""
        owned = self._owned
        if self.mapper is not None and not self.direct:
            found = self._or_unloadable(
                conn,
                owned,
                lambda: self._orm_jobs(orm().execute(select(sub.target)).scalars().all()[:1]),
            )
        elif self.from_driver:
            # on the driver's cursor: on a Q4M consumer's connection (autocommit) this sends
            # no BEGIN and needs no COMMIT, unlike Connection.execute
            sql = self._owned_sql
            if sql is None:
                sql = self._owned_sql = DriverSQL.compile(owned, self.dialect)
            raw = self.rows.fetched(sql.run(conn, {}, unobserved))[:1]
            found = self._jobs(self._driver_jobs(raw), raw)
        else:
            found = self._or_unloadable(
                conn, owned, lambda: self._jobs(conn.execute(owned).all()[:1], None)
            )
        return found[0] if found else None

    def delete(self, conn: Connection, key: Key, unobserved: bool | None = None) -> None:
        """``DELETE FROM t WHERE id = ?`` for one owned job, in the caller's transaction."""
        sql = self._delete_sql or self._compile_delete()
        sql.run(conn, dict(zip(self._key_names, key, strict=False)), unobserved)

    def delete_many(self, conn: Connection, keys: Sequence[Key]) -> None:
        """The same ``DELETE`` for each of ``keys`` (jobs of a portable batch), sent with one
        ``executemany`` in the caller's transaction: one primary-key lookup per row, each of
        a row the transaction has locked already (see
        :meth:`~sqlalchemy_q4m.backends.portable.PortableBackend.end_many`)."""
        sql = self._delete_sql or self._compile_delete()
        sql.run_many(conn, sql.params_many(self._key_names, keys))

    def _compile_delete(self) -> DriverSQL:
        """``DELETE FROM t WHERE id = ?`` (every key column), compiled once; keys are sent as
        the driver sent them (no bind processing: a malformed id being buried is deleted)."""
        names = self._key_names
        if not names:
            raise QueueTableError(f"queue table {self.table.name!r} has no job id to delete by")
        where = and_(
            *(c == bindparam(n, None) for c, n in zip(self.key_columns, names, strict=True))
        )
        sql = self._delete_sql = DriverSQL.compile(delete(self.table).where(where), self.dialect)
        return sql

    # -- result processing -----------------------------------------------------------------

    def _driver_jobs(self, raw: Sequence[Sequence[Any]]) -> list[Sequence[Any] | Unloadable]:
        """Driver rows converted (:meth:`RowConverter.convert`), as a Core table's Rows for
        one."""
        converted = self.rows.convert(raw)
        meta = self._row_meta
        return converted if meta is None else core_rows(meta, converted)

    def _or_unloadable(
        self, conn: Connection, raw_stmt: Any, load: Callable[[], list[tuple[Job, Key]]]
    ) -> list[tuple[Job, Key]]:
        """``load()`` (SQLAlchemy converts the rows); if converting fails, the rows are read
        again unconverted with ``raw_stmt`` (the same rows: this transaction has locked them,
        or, on Q4M, this connection owns its row) and the ones that cannot be converted are
        returned as :class:`Unloadable` (the others stay locked until the transaction ends,
        then return to the queue)."""
        try:
            return load()
        except StatementError:
            raise
        except Exception as err:
            result = conn.execute(raw_stmt)
            try:
                cursor = result.cursor
                raw = self.rows.fetched((cursor.description, cursor.fetchall()))
            finally:
                result.close()
            bad = [r for r in self.rows.convert(raw) if isinstance(r, Unloadable)]
            if not bad:
                raise
            bad[0].error.__context__ = err
            return [(r, r.key) for r in bad]


#: Claim statements of subscriptions with a condition, compiled with their values rendered
#: as literals, per dialect, by (id of the subscription, limit): each kept with its
#: subscription (so that an id is not reused while it is cached).  None: a value has no
#: literal form, so SQLAlchemy executes the claim.  A worker's condition changes once a
#: second at most (``run_at <= now``): compiled that often, not per job.  A subscription not
#: seen yet (a condition written in the ``queue_session`` call is a new one per call) finds
#: the statement by its target and rendered condition (:func:`render_condition`'s text, which
#: stands for the condition exactly).
_CONDITIONAL_CLAIMS = "conditional_claims"


def conditional_claim(loader: Loader, sub: Subscription, limit: int) -> DriverSQL | None:
    """``claim_statement(sub, limit)`` of ``loader``'s columns, ``sub`` having a condition,
    compiled once per subscription and limit (see :data:`_CONDITIONAL_CLAIMS`)."""
    cache = dialect_cache(loader.dialect, _CONDITIONAL_CLAIMS)
    key = (id(sub), limit)
    cached = cache.get(key)
    if cached is not None and cached[0] is sub:
        sql: DriverSQL | None = cached[1]
        return sql
    by_condition = (sub.target, sub.condition, limit)
    if by_condition in cache:  # a subscription made for one call: not kept by its id
        same: DriverSQL | None = cache[by_condition]
        return same
    stmt = claim_statement(sub, limit, loader.columns)
    try:
        sql = DriverSQL.compile(stmt, loader.dialect, literal_binds=True)
    except (CompileError, QueueTableError):  # a value with no literal form
        sql = None
    if len(cache) >= _STATEMENTS * 16:
        cache.clear()
    cache[key] = (sub, sql)
    cache[by_condition] = sql
    return sql


def orm_bypassable(session: Session) -> bool:
    """Whether a job built from the driver's row, then added to ``session``, is what the
    ORM's own load in it would give: no autoflush due (nothing pending), no
    ``do_orm_execute`` or ``loaded_as_persistent`` listener to see the load."""
    dispatch = session.dispatch
    if dispatch.do_orm_execute or dispatch.loaded_as_persistent:
        return False
    return not (session.autoflush and (session.new or session.deleted or session.dirty))


def in_identity_map(session: Session, jobs: list[tuple[Job, Key]]) -> list[tuple[Job, Key]]:
    """``jobs`` built from driver rows, each replaced by the instance ``session`` holds for
    its identity already, if any (the ORM's load would return that one: ``Session.get``)."""
    identity_map = session.identity_map
    out = jobs
    for i, (job, key) in enumerate(jobs):
        if isinstance(job, Unloadable):
            continue
        state = instance_state(job)
        if state.key is not None and state.key in identity_map:
            out = list(out) if out is jobs else out
            held = session.get(state.class_, state.key[1])
            out[i] = (job if held is None else held, key)
    return out


def loader_for(sub: Subscription, dialect: Dialect) -> Loader:
    """The :class:`Loader` of ``sub``'s target on ``dialect`` (one per engine and target)."""
    per_dialect = dialect_cache(dialect, "loaders")
    loader = per_dialect.get(sub.target)
    if loader is None or loader.table is not sub.table:
        loader = per_dialect[sub.target] = Loader(sub.target, sub.table, dialect)
    return loader
