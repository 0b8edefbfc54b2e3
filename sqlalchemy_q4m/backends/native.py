"""The native backend: Q4M's owner mode, exactly as the engine's spec says.

``SELECT queue_wait(...)`` → the owner sees only its row: load it → ``queue_end()`` or
``queue_abort()``.  After a timeout (0) the connection is in owner mode with no row, so it is
left with ``queue_end()`` at once; ``queue_wait`` is never called while owning (that would
silently end the owned row), and a NULL answer becomes :class:`QueueWaitError`.

The three function calls are compiled by SQLAlchemy once per dialect (``queue_wait`` once per
tuple of subscriptions and timeout, its table specs and seconds rendered as literals) and sent
like the portable claim: on the pinned
connection's DBAPI cursor, or with ``exec_driver_sql`` when statement listeners are present
(:class:`~sqlalchemy_q4m.backends.driver.DriverSQL`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any
from typing import ClassVar

from sqlalchemy import Connection
from sqlalchemy import Integer
from sqlalchemy import String
from sqlalchemy import literal
from sqlalchemy import select
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError

from ..exc import Q4MError
from ..exc import QueueWaitError
from ..exc import UnsafeBind
from ..schema.functions import Subscription
from ..schema.functions import queue_abort
from ..schema.functions import queue_end
from ..schema.functions import queue_wait
from ..server import BackendName
from .base import Backend
from .base import Claim
from .base import Holder
from .base import raise_if_lost
from .base import translate_errors
from .driver import DriverSQL
from .driver import dialect_cache
from .loading import loader_for
from .unique_keys import claimed
from .unique_keys import ended
from .unique_keys import released

__all__ = ["NativeBackend"]

#: Longest single ``queue_wait``; longer waits loop (and an unbounded wait is many of these).
MAX_WAIT = 60


def wait_arguments(subs: Sequence[Subscription], timeout: float) -> list[str | int]:
    """``queue_wait`` arguments: one ``'table[:cond]'`` per subscription, then whole seconds."""
    seconds = max(0, min(MAX_WAIT, math.ceil(timeout)))
    return [*(sub.q4m_spec() for sub in subs), seconds]


#: ``queue_wait`` statements kept per dialect, by (id of the subscriptions tuple, seconds):
#: each kept with the tuple it was made for (so that an id is not reused while it is cached).
#: A worker's subscriptions are one tuple for its life (``subscriptions()`` memoizes them), so
#: its ``queue_wait`` is compiled once, not per job.  A tuple not seen yet (a condition written
#: in the ``queue_session`` call builds new subscriptions per call) finds the statement by its
#: arguments, the rendered ``'table:condition'`` specs.  Bounded: conditions come and go.
_WAIT_SQL_SIZE = 256


def wait_sql(dialect: Dialect, subs: Sequence[Subscription], timeout: float) -> DriverSQL:
    """``SELECT queue_wait('t1'[, 't2:cond' ...], seconds)`` for ``subs`` and ``timeout``
    (:func:`wait_arguments`), its arguments rendered as literals by the dialect (quoted and
    escaped as the server reads them: the driver then has nothing to interpolate per job),
    compiled once per dialect, tuple of subscriptions and seconds."""
    seconds = max(0, min(MAX_WAIT, math.ceil(timeout)))
    cache = dialect_cache(dialect, "native_wait")
    key = (id(subs), seconds)
    cached = cache.get(key)
    if cached is not None and cached[0] is subs:
        sql: DriverSQL = cached[1]
        return sql
    arguments = wait_arguments(subs, seconds)
    by_arguments = tuple(arguments)
    same: DriverSQL | None = cache.get(by_arguments)
    if same is not None:  # subscriptions made for one call: not kept by their id
        return same
    args = [literal(a, Integer() if isinstance(a, int) else String()) for a in arguments]
    sql = DriverSQL.compile(select(queue_wait(*args)), dialect, literal_binds=True)
    if len(cache) >= _WAIT_SQL_SIZE:
        cache.clear()
    cache[key] = (subs, sql)
    cache[by_arguments] = sql
    return sql


def _sql(dialect: Dialect, key: str) -> DriverSQL:
    """``SELECT queue_end()`` or ``SELECT queue_abort()``: compiled once per dialect."""
    cache = dialect_cache(dialect, "native")
    sql: DriverSQL | None = cache.get(key)
    if sql is None:
        stmt = select(queue_end() if key == "end" else queue_abort())
        sql = cache[key] = DriverSQL.compile(stmt, dialect)
    return sql


def _call(conn: Connection, sql: DriverSQL, unobserved: bool | None = None) -> Any:
    """Run one of the statements above on ``conn``; its one value."""
    _description, rows = sql.run(conn, {}, unobserved)
    return rows[0][0] if rows else None


class NativeBackend(Backend):
    name: ClassVar[BackendName] = "native"
    blocking: ClassVar[bool] = True

    def attempt(self, holder: Holder, subs: Sequence[Subscription], timeout: float) -> Claim | None:
        conn = holder.connection
        unobserved = holder.unobserved
        dialect = conn.dialect
        try:
            index = _call(conn, wait_sql(dialect, subs, timeout), unobserved)
        except DBAPIError as err:
            raise_if_lost(err, "queue_wait")
            raise
        if index is None:
            self._leave(conn)
            specs = ", ".join(repr(sub.q4m_spec()) for sub in subs)
            raise QueueWaitError(
                f"queue_wait({specs}) returned NULL: a table is missing or not ENGINE=QUEUE, "
                "or a condition uses a non-integer column (see the server's error log)"
            )
        if index == 0:  # timed out, but owner mode was entered: leave it
            self._leave(conn)
            return None
        if not 1 <= index <= len(subs):
            self._leave(conn)
            raise Q4MError(f"queue_wait returned {index!r} for {len(subs)} table(s)")
        sub = subs[index - 1]
        loader = loader_for(sub, dialect)
        what = "loading the owned row"
        try:
            found = loader.load_owned(conn, sub, lambda: holder.session, unobserved)
            if found is None:  # cannot happen on a sane server; never keep owning an unseen row
                what = "queue_abort"
                _call(conn, _sql(dialect, "abort"))
                raise Q4MError(f"queue_wait owned a row of {sub.name!r} that the owner cannot see")
            what = "locking the job's unique key"
            claimed(conn, sub.table, found[1])
        except DBAPIError as err:
            raise_if_lost(err, what)
            raise
        return Claim(sub, found[0], found[1], loader, unobserved)

    def end(self, conn: Connection, claim: Claim) -> None:
        try:
            _call(conn, _sql(conn.dialect, "end"), claim.unobserved)
            ended(conn, claim.subscription.table, claim.key)
        except DBAPIError as err:
            raise_if_lost(err, "queue_end")
            raise

    def abort(self, conn: Connection, claim: Claim) -> None:
        with translate_errors("queue_abort"):
            _call(conn, _sql(conn.dialect, "abort"))
            released(conn)

    def claim_many(self, holder: Holder, sub: Subscription, limit: int) -> list[Claim]:
        """One job at most: a Q4M connection owns one row (``queue_wait`` with no wait)."""
        claim = self.attempt(holder, [sub], 0)
        return [] if claim is None else [claim]

    def end_many(self, conn: Connection, claims: Sequence[Claim]) -> None:
        for claim in claims:
            self.end(conn, claim)

    def abort_many(self, conn: Connection, claims: Sequence[Claim]) -> None:
        for claim in claims:
            self.abort(conn, claim)

    def check_open_transaction(self, conn: Connection) -> None:
        raise UnsafeBind(
            "on Q4M queue_end() cannot be part of the transaction open on this "
            "Connection (Q4M has no transactions): the job would be gone before your "
            "writes commit, and lost if you crash in between.  Commit before the "
            "queue session, or bind an Engine"
        )

    def begin_claim(self, conn: Connection) -> None:
        """Nothing: Q4M has no transactions, so no isolation level to set."""

    @staticmethod
    def _leave(conn: Connection) -> None:
        with translate_errors("queue_end"):
            _call(conn, _sql(conn.dialect, "end"))
