"""Listen/notify for the portable backend: wake an idle consumer when a job is committed.

An idle portable consumer otherwise polls: one claim per ``poll_interval``, so pickup waits
half an interval on average and every idle consumer costs the server 1 / ``poll_interval``
queries a second.  With ``listen=T`` (``queue_session``, ``QueueSession``, ``queue_batch``,
the worker's ``listen`` option) it instead waits inside the server until a producer wakes it, a job
appears, or ``T`` seconds pass (then it claims again: ``T`` bounds the latency when no wake
comes).  Measured on MariaDB 10.11 (``python -m benchmarks --only latency``, the producer's
INSERT, COMMIT and ``notify`` included): pickup p50 ~4.5 ms, p99 ~9 ms, and 2 / ``T`` queries a
second per idle consumer.  MariaDB only (MySQL has no ``KILL QUERY ID``): elsewhere consumers keep
polling and :func:`notify` does nothing.

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
* A producer, *after its COMMIT*, calls :func:`notify`: it finds the waiters by their tag in
  ``information_schema.PROCESSLIST`` and interrupts ``jobs + 1`` of them with
  ``KILL QUERY ID``; the interrupted ``GET_LOCK`` returns NULL and that consumer claims.  A
  wake sent before the commit is lost: the woken consumer finds nothing and waits ``T``.
* Producers skip the scan while no process listens.  Each anchor also holds one of
  :data:`LISTENER_SLOTS` named locks ``q4m_l_<database digest>_<k>`` per database whose
  queues it waits on; after its commit, the wake of an
  Engine-bound ``enqueue()`` (:func:`wake_committed`, also :func:`notify_committed`) asks
  ``SELECT COALESCE(IS_USED_LOCK('q4m_l_<digest>_0'), ...)`` at most every
  :data:`LISTENERS_RECHECK` seconds per engine and sends nothing while none is held.  A
  producer may thus act on an answer up to that old: a process that has just made its anchor
  ends each wait within :data:`LISTENERS_RECHECK` of taking its slot (an anchor without a slot,
  all being taken, always does), so a job committed meanwhile is claimed then, not after
  ``T``.  Explicit :func:`notify` calls always scan.
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

import contextlib
import logging
import os
import random
import re
import threading
import time
import uuid
import weakref
from collections.abc import Iterable
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection
from sqlalchemy import Engine
from sqlalchemy import Select
from sqlalchemy import and_
from sqlalchemy import bindparam
from sqlalchemy import column
from sqlalchemy import event
from sqlalchemy import exists
from sqlalchemy import func
from sqlalchemy import literal_column
from sqlalchemy import or_
from sqlalchemy import select
from sqlalchemy import table
from sqlalchemy import text
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session
from sqlalchemy.sql.base import Executable
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ClauseElement
from sqlalchemy.sql.visitors import InternalTraversal

from ..exc import Q4MError
from ..schema.functions import Subscription
from ..schema.functions import subscriptions
from ..server import backend_for_dialect
from .base import QUERY_INTERRUPTED
from .base import error_code
from .loading import claim_statement
from .loading import dialect_cache

__all__ = [
    "announce",
    "listen_wait",
    "listeners_present",
    "listening_supported",
    "nobody_listens",
    "notify",
    "notify_committed",
    "queue_database",
    "wait_statement",
    "wake_committed",
]

logger = logging.getLogger("sqlalchemy_q4m.notify")

#: ``KILL QUERY ID`` of a query that already ended.
UNKNOWN_QUERY_ID = 1957
#: Not allowed to kill another user's query (no CONNECTION ADMIN / SUPER): wakes do nothing.
NOT_OWNER = (1095, 1979)
#: Seconds between two pings of an idle anchor connection (against ``wait_timeout``).
ANCHOR_PING = 300.0
#: Seconds a producer trusts a "no process listens" answer before it asks the server again;
#: a process that starts listening ends its waits within this long (see :class:`Anchor`), so
#: a producer's stale answer can delay a pickup by this much, never lose a wake-up.
LISTENERS_RECHECK = 0.25
#: Named locks ``q4m_l_<database digest>_<k>``: a listening process holds one per database
#: whose queues it waits on (its anchor does), so a producer learns whether anybody listens
#: there from one ``IS_USED_LOCK`` statement.
LISTENER_SLOTS = 64

_TAG = "/* q4m:wait"
_SLOT = "q4m_l_{}_{}"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_$.-]+$")
_ANCHOR_NAME = re.compile(r"^q4m_anchor_[0-9]+_[0-9a-f]+$")
_PROCESSLIST = table(
    "PROCESSLIST",
    column("QUERY_ID"),
    column("COMMAND"),
    column("INFO"),
    schema="information_schema",
)


def listening_supported(dialect: Dialect) -> bool:
    """True when waits can be woken on this dialect's server: MariaDB (``KILL QUERY ID``),
    not a Q4M server (whose ``queue_wait`` blocks already)."""
    if dialect.name not in ("mysql", "mariadb") or not getattr(dialect, "is_mariadb", False):
        return False
    return backend_for_dialect(dialect) != "native"


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
    naming every queue it waits on (what :func:`notify` looks for)."""
    names = "".join(f" {_queue_name(sub, dialect)}" for sub in subs)
    return f"{_TAG}{names} */"


def _like_pattern(sub: Subscription, dialect: Dialect) -> str:
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
    """The guarded ``GET_LOCK(anchor, seconds)`` wait on ``subs``, tagged for :func:`notify`."""
    if not _ANCHOR_NAME.match(anchor):
        raise Q4MError(f"not an anchor lock name: {anchor!r}")
    wait = select(func.get_lock(bindparam("q4m_anchor", anchor), bindparam("q4m_seconds", seconds)))
    stmt = wait.where(and_(*(_guard(sub) for sub in subs)))
    return WaitStatement(stmt, wait_tag(subs, dialect))


# -- the anchor ----------------------------------------------------------------------------


class Anchor:
    """One connection outside the engine's pool holding the named lock waiters block on.

    It keeps only the driver's connection (nothing that refers back to the engine), so it
    never keeps an engine alive; it is closed on ``engine.dispose()`` and when the engine's
    dialect is collected."""

    def __init__(self, engine: Engine) -> None:
        self.name = f"q4m_anchor_{os.getpid()}_{uuid.uuid4().hex[:16]}"
        self.pid = os.getpid()
        self._conn: Any = None
        # A pool like the engine's (same creator, connect events), so no pool slot is taken;
        # its connection is detached from it and kept alone.
        pool = engine.pool.recreate()
        try:
            fairy = pool.connect()
            fairy.detach()
            self._conn = fairy.dbapi_connection
            take = f"SELECT CONNECTION_ID(), GET_LOCK('{self.name}', 0)"
            self.thread_id = int(self._run(take)[0])
        except BaseException:
            self.close()
            raise
        finally:
            pool.dispose()
        self.pinged = time.monotonic()
        #: database -> (the listener slot held for it or None, when it was announced)
        self.slots: dict[str, tuple[int | None, float]] = {}

    def announce(self, db: str) -> None:
        """Take a free listener slot of ``db`` (a lock held with the anchor's connection), so
        producers there see that this process listens; none when all are taken or the
        connection fails (then waits stay short, see :meth:`bound`).  With the lock held."""
        slot: int | None = None
        try:
            for k in random.sample(range(LISTENER_SLOTS), LISTENER_SLOTS):
                assert self._conn is not None
                cursor = self._conn.cursor()
                try:
                    cursor.execute(f"SELECT GET_LOCK('{_slot_name(db, k)}', 0)")
                    row = cursor.fetchone()
                finally:
                    cursor.close()
                if row is not None and row[0] == 1:
                    slot = k
                    break
            else:
                logger.info(
                    "all %d listener slots of %r are taken: waits end every %g s",
                    LISTENER_SLOTS,
                    db,
                    LISTENERS_RECHECK,
                )
        except Exception:
            logger.debug("anchor %s could not take a listener slot", self.name, exc_info=True)
        self.slots[db] = (slot, time.monotonic())

    def bound(self, seconds: float, dbs: Iterable[str]) -> float:
        """``seconds``, shortened so that a wait ends within :data:`LISTENERS_RECHECK` of this
        process announcing itself in any of ``dbs`` (a producer may still hold an older
        "nobody listens" answer until then); always, without a slot (producers cannot see
        it)."""
        now = time.monotonic()
        for db in dbs:
            slot, announced = self.slots.get(db, (None, now))
            if slot is None:
                seconds = min(seconds, LISTENERS_RECHECK)
            elif announced + LISTENERS_RECHECK > now:
                seconds = min(seconds, max(announced + LISTENERS_RECHECK - now, 0.01))
        return seconds

    def _run(self, sql: str) -> Any:
        # sql holds only our own validated name: no parameters, whatever the paramstyle.
        assert self._conn is not None and _ANCHOR_NAME.search(self.name)
        cursor = self._conn.cursor()
        try:
            cursor.execute(sql)
            row = cursor.fetchone()
        finally:
            cursor.close()
        if row is None or row[-1] != 1:
            raise Q4MError(f"could not take the anchor lock {self.name!r}: {row!r}")
        return row

    def alive(self) -> bool:
        """Ping now and then (a dead anchor is also detected by its waiters: GET_LOCK 1)."""
        if time.monotonic() - self.pinged < ANCHOR_PING:
            return True
        try:
            self._run(f"SELECT IS_USED_LOCK('{self.name}') = CONNECTION_ID()")
        except Exception:
            logger.debug("anchor %s is gone", self.name, exc_info=True)
            return False
        self.pinged = time.monotonic()
        return True

    def close(self) -> None:
        """Close the connection (the server releases the lock); in this process only."""
        conn, self._conn = self._conn, None
        if conn is None or self.pid != os.getpid():
            return  # a parent's connection: never touch its socket
        with contextlib.suppress(Exception):  # already gone (or its event loop is)
            # an asyncio driver's adapted connection is closed without awaiting
            terminate = getattr(conn, "terminate", None)
            if callable(terminate):
                terminate()
            else:
                conn.close()


#: The anchors of one engine (kept on its dialect, see ``dialect_cache``), by process id.
_ANCHORS = "anchors"
_anchors_lock = threading.Lock()


def _after_fork() -> None:
    # A child never touches its parent's anchors (they stay, unused: closing them would end the
    # parent's connections); it makes its own under a fresh lock.
    global _anchors_lock
    _anchors_lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork)


def _base_engine(engine: Engine) -> Engine:
    """The engine ``engine.execution_options()`` copies were made from: its
    ``engine_disposed`` listeners also hear the copies' ``dispose()``."""
    while isinstance(getattr(engine, "_proxied", None), Engine):
        engine = engine._proxied  # type: ignore[attr-defined]
    return engine


def _anchors_of(engine: Engine) -> dict[int, Anchor]:
    """The anchors of ``engine`` by process id; on first use, closed on ``dispose()`` and
    when the dialect (the engine) is collected.  Called with the lock held."""
    dialect = engine.dialect
    anchors: dict[int, Anchor] = dialect_cache(dialect, _ANCHORS)
    if not vars(dialect).get("_q4m_anchor_hooks"):
        vars(dialect)["_q4m_anchor_hooks"] = True
        event.listen(_base_engine(engine), "engine_disposed", _engine_disposed)
        weakref.finalize(dialect, _close_anchors, anchors)
    return anchors


def _close_anchors(anchors: dict[int, Anchor]) -> None:
    """Close this process's anchor in ``anchors`` (another process's is left alone)."""
    anchor = anchors.pop(os.getpid(), None)
    if anchor is not None:
        anchor.close()


def _engine_disposed(engine: Engine) -> None:
    """``engine.dispose()``: its anchor connection is closed (the next waiter makes one)."""
    with _anchors_lock:
        _close_anchors(dialect_cache(engine.dialect, _ANCHORS))


def anchor_for(engine: Engine) -> Anchor:
    """The anchor of ``engine`` in this process (made, or re-made if dead)."""
    pid = os.getpid()
    with _anchors_lock:
        anchors = _anchors_of(engine)
        anchor = anchors.get(pid)
        if anchor is not None and not anchor.alive():
            anchor.close()
            anchor = None
        if anchor is None:
            dbapi = engine.dialect.loaded_dbapi
            try:
                anchor = Anchor(engine)
            except dbapi.Error as err:  # as SQLAlchemy raises it: the worker loop reconnects
                raise DBAPIError.instance(
                    "GET_LOCK(<anchor>, 0)", None, err, dbapi.Error, dialect=engine.dialect
                ) from err
            anchors[pid] = anchor
        return anchor


def announce(anchor: Anchor, dbs: Iterable[str]) -> None:
    """Have ``anchor`` hold a listener slot of each of ``dbs`` (see :meth:`Anchor.announce`)."""
    with _anchors_lock:
        for db in dbs:
            if db not in anchor.slots:
                anchor.announce(db)


def queue_database(sub: Subscription, dialect: Dialect) -> str:
    """The database of ``sub``'s queue table (the default one for a table without a schema)."""
    return sub.table.schema or dialect.default_schema_name or ""


def _slot_name(db: str, k: int) -> str:
    """``q4m_l_<digest of db>_<k>``: listener slot ``k`` of database ``db`` (a lock name)."""
    return _SLOT.format(uuid.uuid5(uuid.NAMESPACE_OID, db).hex[:16], k)


def _anchor_lost(engine: Engine, name: str) -> None:
    """A waiter got the anchor lock ``name``: its connection died.  Replace it (once)."""
    with _anchors_lock:
        anchors = _anchors_of(engine)
        anchor = anchors.get(os.getpid())
        if anchor is not None and anchor.name == name:
            del anchors[os.getpid()]
            anchor.close()
    logger.info("the listen anchor connection was lost; a new one is made")


# -- the consumer side ---------------------------------------------------------------------


def listen_wait(conn: Connection, subs: Sequence[Subscription], seconds: float) -> bool:
    """Wait on ``conn`` (in a transaction the caller began, READ COMMITTED) until a producer's
    :func:`notify`, a free job of ``subs``, or ``seconds`` pass; the caller then claims.

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
        _anchor_lost(engine, anchor.name)
    return False  # woken (NULL) or timed out (0): claim again


# -- the producer side ---------------------------------------------------------------------


def notify(bind: Engine | Connection | Session, *targets: Any, jobs: int = 1) -> int:
    """Wake consumers waiting (``listen``) on the queues of ``targets``; call it AFTER the
    transaction that enqueued ``jobs`` jobs committed (a wake before the commit is lost).

    Wakes ``jobs + 1`` waiters at most (one spare: a woken consumer may lose the race for the
    job to a busy one) and returns how many it woke; 0 without waiters, or on a server other
    than MariaDB.  An Engine or a Session runs it on a connection of its own from the
    engine; a Connection runs it on itself, which must not be in a transaction (its
    uncommitted jobs would be invisible to the woken consumers): commit first.
    """
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise Q4MError(f"jobs must be a positive integer, not {jobs!r}")
    subs = subscriptions(targets)
    if isinstance(bind, Session):
        if bind.in_transaction():
            raise Q4MError("notify() after the commit: the Session is still in a transaction")
        engine = bind.get_bind(mapper=subs[0].target if subs[0].is_orm else None)
        bind = engine if isinstance(engine, Engine) else engine.engine
    if isinstance(bind, Engine):
        with bind.connect() as conn:  # connected: the dialect knows MariaDB from MySQL
            if not listening_supported(conn.dialect):
                return 0
            return _wake(conn, subs, jobs + 1)
    if not isinstance(bind, Connection):
        raise Q4MError(f"bind must be an Engine, a Connection or a Session, not {bind!r}")
    if bind.in_transaction():
        raise Q4MError("notify() after the commit: the Connection is still in a transaction")
    if not listening_supported(bind.dialect):
        return 0
    try:
        return _wake(bind, subs, jobs + 1)
    finally:
        if bind.in_transaction():
            bind.rollback()


def notify_committed(bind: Engine | Connection | Session, *targets: Any, jobs: int = 1) -> int:
    """:func:`notify` for a producer whose jobs are committed already, without its
    ``PROCESSLIST`` scan when no process listens (:func:`wake_committed`); a database error
    while waking is logged, not raised (raising would look like a failed enqueue, and retrying
    it would enqueue the jobs twice); listening consumers then take them within ``listen``."""
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise Q4MError(f"jobs must be a positive integer, not {jobs!r}")
    subs = subscriptions(targets)
    try:
        if isinstance(bind, Connection):
            if bind.in_transaction():
                raise Q4MError(
                    "notify() after the commit: the Connection is still in a transaction"
                )
            return wake_committed(bind, subs, jobs)
        if isinstance(bind, Session):
            if bind.in_transaction():
                raise Q4MError("notify() after the commit: the Session is still in a transaction")
            got = bind.get_bind(mapper=subs[0].target if subs[0].is_orm else None)
            bind = got if isinstance(got, Engine) else got.engine
        if not isinstance(bind, Engine):
            raise Q4MError(f"bind must be an Engine, a Connection or a Session, not {bind!r}")
        if nobody_listens(bind.dialect, subs):
            return 0
        with bind.connect() as conn:
            return wake_committed(conn, subs, jobs)
    except DBAPIError as err:
        logger.warning(
            "notify: %d committed job(s) wait for the consumers' listen timeout: waking "
            "them failed: %s",
            jobs,
            err,
        )
        return 0


def wake_committed(conn: Connection, subs: Sequence[Subscription], jobs: int) -> int:
    """Wake waiters on ``subs`` for ``jobs`` jobs committed on ``conn`` (out of a transaction);
    how many were woken.  Sends nothing when no process listens: whether one does is asked
    of the server (one ``IS_USED_LOCK`` statement, see :class:`Anchor`) at most every
    :data:`LISTENERS_RECHECK` seconds per engine; when one does, it is :func:`notify`'s scan.
    ``conn`` is left out of a transaction (rolled back when anything was sent)."""
    if not listening_supported(conn.dialect) or not listeners_present(conn, subs):
        return 0
    try:
        return _wake(conn, subs, jobs + 1)
    finally:
        if conn.in_transaction():
            conn.rollback()


_LISTENERS = "listeners"


def _presence(db: str) -> Select[Any]:
    """``SELECT COALESCE(IS_USED_LOCK(<slot 0 of db>), ...)``: NULL when no process listens
    on the queues of ``db``."""
    names: list[Any] = [literal_column(f"'{_slot_name(db, k)}'") for k in range(LISTENER_SLOTS)]
    return select(func.coalesce(*(func.is_used_lock(name) for name in names)))


def nobody_listens(dialect: Dialect, subs: Sequence[Subscription]) -> bool:
    """True while the last answers of this engine's server for the databases of ``subs``, at
    most :data:`LISTENERS_RECHECK` seconds old, were "no process listens" (or where nothing
    can listen: a Q4M backend, MySQL)."""
    if not listening_supported(dialect):
        return dialect.name in ("mysql", "mariadb") and dialect.server_version_info is not None
    cache = dialect_cache(dialect, _LISTENERS)
    now = time.monotonic()
    for sub in subs:
        known = cache.get(queue_database(sub, dialect))
        if known is None or known[1] or now - known[0] >= LISTENERS_RECHECK:
            return False
    return True


def listeners_present(conn: Connection, subs: Sequence[Subscription]) -> bool:
    """Whether some process listens on the databases of ``subs`` (holds a listener slot
    there), as asked at most every :data:`LISTENERS_RECHECK` seconds per engine and
    database (the answers are cached on its dialect).  Asking leaves ``conn`` in a
    transaction: the caller ends it."""
    cache = dialect_cache(conn.dialect, _LISTENERS)
    present = False
    for db in {queue_database(sub, conn.dialect) for sub in subs}:
        now = time.monotonic()  # before asking: the answer is at least this old
        known = cache.get(db)
        if known is None or now - known[0] >= LISTENERS_RECHECK:
            if len(cache) >= 256:
                cache.clear()
            known = cache[db] = (now, conn.scalar(_presence(db)) is not None)
        present = present or known[1]
    return present


def _wake(conn: Connection, subs: Sequence[Subscription], wanted: int) -> int:
    info = _PROCESSLIST.c.INFO
    patterns = [info.like(_like_pattern(sub, conn.dialect), escape="!") for sub in subs]
    find = select(_PROCESSLIST.c.QUERY_ID).where(_PROCESSLIST.c.COMMAND == "Query", or_(*patterns))
    ids = [int(qid) for qid in conn.execute(find).scalars()]
    random.shuffle(ids)
    woken = 0
    for qid in ids:
        if woken >= wanted:
            break
        try:
            conn.execute(text(f"KILL QUERY ID {int(qid)}"))
        except OperationalError as err:
            code = error_code(err)
            if code == UNKNOWN_QUERY_ID:  # it ended meanwhile: the next one
                continue
            if code in NOT_OWNER:
                logger.debug("notify: no privilege to wake other users' consumers: %s", err)
                break
            raise
        woken += 1
    return woken
