"""Who listens: each process's anchor connection (the named lock waiters block on) and the
listener slots it holds per database, and a producer's cached answer to "does any process listen
there" (:func:`nobody_listens`, :func:`listeners_present`).  The protocol is told in
:mod:`sqlalchemy_q4m.backends.wakeup`."""

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
from sqlalchemy import event
from sqlalchemy import func
from sqlalchemy import literal_column
from sqlalchemy import select
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError

from ..exc import Q4MError
from ..schema.functions import Subscription
from ..server import backend_for_dialect
from .driver import dialect_cache

__all__ = [
    "ANCHOR_NAME",
    "LISTENERS_RECHECK",
    "LISTENER_SLOTS",
    "Anchor",
    "anchor_for",
    "anchor_lost",
    "announce",
    "listeners_present",
    "listening_supported",
    "nobody_listens",
    "queue_database",
]

logger = logging.getLogger("sqlalchemy_q4m.notify")

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

_SLOT = "q4m_l_{}_{}"
ANCHOR_NAME = re.compile(r"^q4m_anchor_[0-9]+_[0-9a-f]+$")


def listening_supported(dialect: Dialect) -> bool:
    """True when waits can be woken on this dialect's server: MariaDB (``KILL QUERY ID``),
    not a Q4M server (whose ``queue_wait`` blocks already)."""
    if dialect.name not in ("mysql", "mariadb") or not getattr(dialect, "is_mariadb", False):
        return False
    return backend_for_dialect(dialect) != "native"


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
        assert self._conn is not None and ANCHOR_NAME.search(self.name)
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


def anchor_lost(engine: Engine, name: str) -> None:
    """A waiter got the anchor lock ``name``: its connection died.  Replace it (once)."""
    with _anchors_lock:
        anchors = _anchors_of(engine)
        anchor = anchors.get(os.getpid())
        if anchor is not None and anchor.name == name:
            del anchors[os.getpid()]
            anchor.close()
    logger.info("the listen anchor connection was lost; a new one is made")


_LISTENERS = "listeners"


def _presence(db: str) -> Select[Any]:
    """``SELECT COALESCE(IS_USED_LOCK(<slot 0 of db>), ...)``: NULL when no process listens
    on the queues of ``db``.  Made once per database (building its 64 calls cost a producer
    more than the rest of its look-up) and shared: a statement is never changed in place."""
    query = _PRESENCE.get(db)
    if query is None:
        names: list[Any] = [literal_column(f"'{_slot_name(db, k)}'") for k in range(LISTENER_SLOTS)]
        query = select(func.coalesce(*(func.is_used_lock(name) for name in names)))
        if len(_PRESENCE) >= 256:
            _PRESENCE.clear()
        _PRESENCE[db] = query
    return query


#: :func:`_presence` by database name (it refers to no engine or dialect).
_PRESENCE: dict[str, Select[Any]] = {}


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
