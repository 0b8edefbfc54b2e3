"""Listen/notify for the portable backend: wake an idle consumer when a job is committed.

An idle portable consumer otherwise polls: one claim per ``poll_interval``, so pickup waits
half an interval on average and every idle consumer costs the server 1 / ``poll_interval``
queries a second.  With ``listen=T`` (``queue_session``, ``QueueSession``, ``queue_batch``,
the worker's ``listen`` option) it instead waits inside the server until a producer wakes it, a job
appears, or ``T`` seconds pass (then it claims again: ``T`` bounds the latency when no wake
comes).  Measured on MariaDB 10.11 (``python -m benchmarks --only latency``, the producer's
INSERT, COMMIT and ``notify`` included): pickup p50 ~4.5 ms, p99 ~9 ms, and 2 / ``T`` queries a
second per idle consumer.  MariaDB only (MySQL has no ``KILL QUERY ID``): elsewhere consumers keep
polling and :func:`~sqlalchemy_q4m.notify` does nothing.

The protocol.  The consumer, after an empty claim, on its claim connection (READ COMMITTED, in
the transaction the queue session began) runs::

    /* q4m:wait db.jobs */ SET STATEMENT long_query_time=86400 FOR
    SELECT GET_LOCK('<anchor>', T) FROM DUAL WHERE NOT (EXISTS (
        SELECT 1 FROM jobs ORDER BY jobs.id LIMIT 1 FOR UPDATE SKIP LOCKED))

* ``<anchor>`` is a named lock one extra connection per process (the anchor, outside the
  engine's pool) holds for ever, so ``GET_LOCK`` blocks for ``T`` seconds.  ``GET_LOCK``, not
  ``SLEEP``: a ``KILL`` of a ``SLEEP`` stalls ~2 s under concurrent kills, of a ``GET_LOCK`` not.
* The guard is the claim's own locking read (one ``NOT EXISTS`` per subscription): a job
  committed between the empty claim and the wait is seen and the wait never starts (an empty
  result), so no wake-up is lost to that race.  The guard locked that job: the consumer rolls
  back and claims again.
* A producer, *after its COMMIT*, calls :func:`~sqlalchemy_q4m.notify`: it finds the waiters by
  their tag in ``information_schema.PROCESSLIST`` and interrupts ``jobs + 1`` of them with
  ``KILL QUERY ID``; the interrupted ``GET_LOCK`` returns NULL and that consumer claims.  A wake
  sent before the commit is lost: the woken consumer finds nothing and waits ``T``.
* Producers skip the scan while no process listens.  Each anchor also holds one of
  :data:`~sqlalchemy_q4m.backends.listeners.LISTENER_SLOTS` named locks
  ``q4m_l_<database digest>_<k>`` per database whose queues it waits on; after its commit, the
  wake of an Engine-bound ``enqueue()`` (:func:`~sqlalchemy_q4m.backends.notify.wake_committed`,
  also :func:`~sqlalchemy_q4m.backends.notify.notify_committed`) asks
  ``SELECT COALESCE(IS_USED_LOCK('q4m_l_<digest>_0'), ...)`` at most every
  :data:`~sqlalchemy_q4m.backends.listeners.LISTENERS_RECHECK` seconds per engine and sends
  nothing while none is held.  A producer may thus act on an answer up to that old: a process
  that has just made its anchor ends each wait within
  :data:`~sqlalchemy_q4m.backends.listeners.LISTENERS_RECHECK` of taking its slot (an anchor
  without a slot, all being taken, always does), so a job committed meanwhile is claimed then,
  not after ``T``.  Explicit :func:`~sqlalchemy_q4m.notify` calls always scan.
* ``GET_LOCK`` returning 1 means the anchor connection died and the waiter got its lock: it
  releases it and a new anchor is made.  A kill landing just before the wait starts (error
  1317) or on the claim right after it is retried like a deadlock.

Failure modes: a producer connected as another database user sees no waiters without the
``PROCESS`` privilege and cannot kill them without ``CONNECTION ADMIN`` (or ``SUPER``): wakes
then do nothing and pickup falls back to ``T``.  The anchor is one connection per engine and
process (fork-safe: a child makes its own), closed by ``engine.dispose()``; the wait does not
go to the slow query log.
A queue session joined to a transaction the caller began (the guard would lock rows in it)
keeps polling every ``poll_interval``.  The asyncio queue session awaits the wait like any
query (an async driver's anchor belongs to the event loop that made it; once that loop has
closed it, the next waiter gets its lock and a new anchor is made, as for any dead anchor).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection
from sqlalchemy import Select
from sqlalchemy import and_
from sqlalchemy import bindparam
from sqlalchemy import exists
from sqlalchemy import func
from sqlalchemy import literal_column
from sqlalchemy import select
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.base import Executable
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ClauseElement
from sqlalchemy.sql.visitors import InternalTraversal

from ..exc import Q4MError
from ..schema.functions import Subscription
from .base import QUERY_INTERRUPTED
from .base import error_code
from .listeners import ANCHOR_NAME
from .listeners import anchor_for
from .listeners import anchor_lost
from .listeners import announce
from .listeners import listening_supported
from .listeners import queue_database
from .loading import claim_statement

__all__ = [
    "WaitStatement",
    "like_pattern",
    "listen_wait",
    "listening_supported",
    "wait_statement",
    "wait_tag",
]

_TAG = "/* q4m:wait"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_$.-]+$")


# -- the tag -------------------------------------------------------------------------------


def _queue_name(sub: Subscription, dialect: Dialect) -> str:
    """``db.table`` of ``sub`` as it appears in the tag (the default database for a table
    without a schema; a name unsafe in a comment or a LIKE pattern is replaced by a digest)."""
    db = sub.table.schema or dialect.default_schema_name or ""
    name = f"{db}.{sub.table.name}"
    if _SAFE_NAME.match(name):
        return name
    return "x" + uuid.uuid5(uuid.NAMESPACE_OID, name).hex


def wait_tag(subs: Sequence[Subscription], dialect: Dialect) -> str:
    """``/* q4m:wait db.t1 db.t2 */``: the comment a waiting consumer's statement starts with,
    naming every queue it waits on (what :func:`~sqlalchemy_q4m.notify` looks for)."""
    names = "".join(f" {_queue_name(sub, dialect)}" for sub in subs)
    return f"{_TAG}{names} */"


def like_pattern(sub: Subscription, dialect: Dialect) -> str:
    """The LIKE pattern (escape ``!``) matching the tag of a wait on ``sub``'s queue."""

    def escape(s: str) -> str:
        return s.replace("!", "!!").replace("%", "!%").replace("_", "!_")

    return f"{escape(_TAG)}% {escape(_queue_name(sub, dialect))} %"


# -- the consumer's statement --------------------------------------------------------------


class WaitStatement(Executable, ClauseElement):
    """``<tag> SET STATEMENT long_query_time=86400 FOR <select>``: the tagged wait, kept out
    of the slow query log; see the module docstring."""

    __visit_name__ = "q4m_wait_statement"
    inherit_cache = True
    _traverse_internals = [  # noqa: RUF012 - SQLAlchemy's cache-key declaration
        ("select", InternalTraversal.dp_clauseelement),
        ("tag", InternalTraversal.dp_string),
    ]

    def __init__(self, select: Select[Any], tag: str) -> None:
        self.select = select
        self.tag = tag

    @property
    def _all_selected_columns(self) -> Any:  # a cached statement's result columns
        return self.select._all_selected_columns


@compiles(WaitStatement, "mysql", "mariadb")
def _compile_wait(element: WaitStatement, compiler: SQLCompiler, **kw: Any) -> str:
    body = compiler.process(element.select, **kw)
    return f"{element.tag} SET STATEMENT long_query_time=86400 FOR {body}"


def _guard(sub: Subscription) -> Any:
    """``NOT EXISTS (SELECT 1 ... FOR UPDATE SKIP LOCKED)``: no job of ``sub`` is free."""
    probe = claim_statement(sub, 1, [literal_column("1")]).select_from(sub.table)
    return ~exists(probe)


def wait_statement(
    subs: Sequence[Subscription], anchor: str, seconds: float, dialect: Dialect
) -> WaitStatement:
    """The guarded ``GET_LOCK(anchor, seconds)`` wait on ``subs``, tagged for
    :func:`~sqlalchemy_q4m.notify`."""
    if not ANCHOR_NAME.match(anchor):
        raise Q4MError(f"not an anchor lock name: {anchor!r}")
    wait = select(func.get_lock(bindparam("q4m_anchor", anchor), bindparam("q4m_seconds", seconds)))
    stmt = wait.where(and_(*(_guard(sub) for sub in subs)))
    return WaitStatement(stmt, wait_tag(subs, dialect))


# -- the consumer side ---------------------------------------------------------------------


def listen_wait(conn: Connection, subs: Sequence[Subscription], seconds: float) -> bool:
    """Wait on ``conn`` (in a transaction the caller began, READ COMMITTED) until a producer's
    :func:`~sqlalchemy_q4m.notify`, a free job of ``subs``, or ``seconds`` pass; the caller
    then claims.

    Returns True when the caller must roll back before claiming: the guard locked a free job
    it saw, or the wait was interrupted before it started (it may have locked one).
    """
    engine = conn.engine
    anchor = anchor_for(engine)
    dbs = {queue_database(sub, conn.dialect) for sub in subs}
    if not dbs <= anchor.slots.keys():
        announce(anchor, dbs)
    stmt = wait_statement(subs, anchor.name, anchor.bound(seconds, dbs), conn.dialect)
    try:
        row = conn.execute(stmt).first()
    except OperationalError as err:
        if error_code(err) != QUERY_INTERRUPTED:
            raise
        return True  # woken before GET_LOCK started
    if row is None:
        return True  # the guard saw (and locked) a free job
    if row[0] == 1:  # the anchor died and we hold its lock now
        conn.execute(select(func.release_lock(bindparam("q4m_anchor", anchor.name))))
        anchor_lost(engine, anchor.name)
    return False  # woken (NULL) or timed out (0): claim again
