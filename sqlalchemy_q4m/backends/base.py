"""The interface both backends implement, and the one place database errors are translated."""

from __future__ import annotations

import threading
from abc import ABC
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from typing import ClassVar
from typing import Protocol

from sqlalchemy import Connection
from sqlalchemy import Engine
from sqlalchemy import event
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from ..exc import AlreadyOwning
from ..exc import ConnectionLost
from ..schema.functions import Subscription
from ..server import BackendName
from .driver import AUTOCOMMIT_KEY
from .driver import OWNER_KEY
from .driver import driver_level
from .driver import on_driver
from .loading import Loader

__all__ = [
    "AUTOCOMMIT_KEY",
    "Backend",
    "Claim",
    "Owner",
    "autocommit_for_queue",
    "check_free",
    "check_info_free",
    "error_code",
    "give_up_connection",
    "is_conflict",
    "raise_if_lost",
    "record_owner",
    "take_connection",
    "translate_errors",
]

#: MySQL error numbers a claim retries: deadlock, lock wait timeout.
DEADLOCK = 1213
LOCK_WAIT_TIMEOUT = 1205
RETRYABLE = frozenset({DEADLOCK, LOCK_WAIT_TIMEOUT})
#: A statement interrupted by ``KILL QUERY``: a listen wake-up (``notify``) that landed on the
#: claim right after the wait; the claim retries it.
QUERY_INTERRUPTED = 1317


@dataclass
class Claim:
    """A job this connection owns: which subscription it came from, the loaded job, its key
    as the driver sends it, and the :class:`~sqlalchemy_q4m.backends.loading.Loader` that
    made it."""

    subscription: Subscription
    job: Any
    key: tuple[Any, ...]
    loader: Loader
    #: :func:`~sqlalchemy_q4m.backends.driver.driver_level` for the job's connection, as its
    #: holder asked it once (None: asked per statement).
    unobserved: bool | None = None


def error_code(err: BaseException) -> int | None:
    """The MySQL error number behind a SQLAlchemy DBAPIError, if any."""
    orig = getattr(err, "orig", None)
    args = getattr(orig, "args", ())
    if args and isinstance(args[0], int):
        return args[0]
    return None


class _Translate:
    """What :func:`translate_errors` returns."""

    __slots__ = ("what",)

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None:
            raise_if_lost(exc, self.what)


def translate_errors(what: str) -> _Translate:
    """A context manager turning a lost connection into :class:`ConnectionLost`; other
    errors pass unchanged (see :func:`raise_if_lost`)."""
    return _Translate(what)


def raise_if_lost(err: BaseException, what: str) -> None:
    """Raise :class:`ConnectionLost` for ``err`` when it lost (invalidated) the connection,
    while doing ``what``; return otherwise.  The per-job statements use it as
    ``except DBAPIError as err: raise_if_lost(err, what); raise``, which costs nothing until
    an error (a ``translate_errors`` block costs two Python calls per statement)."""
    if isinstance(err, DBAPIError) and err.connection_invalidated:
        raise ConnectionLost(f"{what}: connection lost ({err.orig})") from err


# -- one owner per connection ------------------------------------------------------------------
# A connection owns at most one job (Q4M: one row per connection; InnoDB: a second claim in the
# same transaction would take the first one's row again, since SKIP LOCKED does not skip the
# transaction's own locks).  The owner is recorded in the DBAPI connection's ``info`` (shared by
# every Connection and Session on it), and the engine's ``commit``/``rollback`` events and the
# pool's ``reset`` event tell the owner when its caller ends the transaction or hands the
# connection back while it owns a job.


class Owner(Protocol):
    """What owns a job on a connection (a queue session, a batch)."""

    def released(self, what: str) -> None:
        """The connection's transaction was ``what`` ("committed", "rolled back") or the
        connection "returned to the pool" while this owns a job: raise to stop it."""


def check_free(conn: Connection, owner: object = None) -> None:
    """Raise :class:`AlreadyOwning` when ``conn`` owns a job for another owner than
    ``owner`` (no statement is sent)."""
    check_info_free(conn.info, owner)


def check_info_free(info: dict[Any, Any], owner: object = None) -> None:
    """:func:`check_free` given the connection's ``info``."""
    current = info.get(OWNER_KEY)
    if current is not None and current is not owner:
        raise AlreadyOwning(
            f"this connection already owns a job for {current!r}: one connection owns one job "
            "at a time (a second claim would take the same row again on InnoDB, and end the "
            "first job on Q4M); finish that job first, or give this owner its own connection "
            "(bind=engine)"
        )


def take_connection(conn: Connection, owner: Owner) -> dict[Any, Any]:
    """Record ``owner`` as the owner of ``conn`` (refused as :func:`check_free` refuses) and
    watch its engine; returns the ``info`` dict, for :func:`give_up_connection`."""
    return record_owner(conn.info, owner, conn.engine)


def record_owner(info: dict[Any, Any], owner: Owner, engine: Engine) -> dict[Any, Any]:
    """:func:`take_connection` given the connection's ``info`` and its ``engine`` (a queue
    session has them at hand: one look-up of ``Connection.info`` costs four calls)."""
    current = info.get(OWNER_KEY)
    if current is not None and current is not owner:
        check_info_free(info, owner)  # raises
    info[OWNER_KEY] = owner
    if _WATCHED not in engine.__dict__:
        _watch(engine)
    return info


def give_up_connection(info: dict[Any, Any] | None, owner: object) -> None:
    """Forget ``owner`` as the owner recorded in ``info`` (safe on a dead connection)."""
    if info is not None and info.get(OWNER_KEY) is owner:
        del info[OWNER_KEY]


_watch_lock = threading.Lock()

#: Attributes an engine (each ``execution_options()`` copy is one) is marked with once its
#: listeners are registered: a look-up in its ``__dict__`` costs the job no call (a
#: ``WeakSet`` membership test made a weak reference per job).
_WATCHED = "_q4m_watched"
_AUTOCOMMIT_WATCHED = "_q4m_autocommit_watched"


def _watch(engine: Engine) -> None:
    """Listen (once per engine) for transactions ended and connections returned while owning."""
    if _WATCHED in engine.__dict__:
        return
    with _watch_lock:
        if _WATCHED in engine.__dict__:
            return
        event.listen(engine, "commit", _on_commit)
        event.listen(engine, "rollback", _on_rollback)
        event.listen(engine, "reset", _on_reset)
        engine.__dict__[_WATCHED] = True


def _watch_autocommit(engine: Engine) -> None:
    """Listen (once per engine) for transactions begun on, and connections returned from, the
    library's autocommit (:func:`autocommit_for_queue`).  Only engines with a Q4M consumer
    pay for these two events: a portable consumer's ``begin`` dispatches no listener of ours."""
    _watch(engine)
    if _AUTOCOMMIT_WATCHED in engine.__dict__:
        return
    with _watch_lock:
        if _AUTOCOMMIT_WATCHED in engine.__dict__:
            return
        event.listen(engine, "begin", _on_begin)
        event.listen(engine, "checkin", _on_checkin)
        engine.__dict__[_AUTOCOMMIT_WATCHED] = True


def _owner_of(conn: Connection) -> Owner | None:
    if conn.closed or conn.invalidated:  # info would reconnect (or refuse to)
        return None
    owner: Owner | None = conn.info.get(OWNER_KEY)
    return owner


def _on_commit(conn: Connection) -> None:
    owner = _owner_of(conn)
    if owner is not None:
        owner.released("committed")


def _on_rollback(conn: Connection) -> None:
    owner = _owner_of(conn)
    if owner is not None:
        owner.released("rolled back")


def _on_reset(dbapi_conn: Any, record: Any, state: Any) -> None:
    """A connection goes back to the pool while it still owns a job: the owner is told (and
    raises, so the pool closes the connection and the server returns the job)."""
    owner: Owner | None = record.info.pop(OWNER_KEY, None) if record is not None else None
    if owner is not None:
        owner.released("returned to the pool")


# -- Q4M consumers in autocommit ----------------------------------------------------------------
# Q4M has no transactions: queue_wait(), the owner's SELECT and queue_end() need no COMMIT, but
# without autocommit each job's statements would open a server transaction that only a COMMIT or
# ROLLBACK ends (SQLAlchemy's view of the connection must match it, so one would be sent per
# job for nothing).  So a native consumer's DBAPI connection is switched to the
# driver's autocommit once (one statement), and stays so while the library uses it.  Nothing
# changes for SQLAlchemy: a transaction it begins on such a connection (the job's writes, the
# caller's own work on its Connection) starts with an explicit BEGIN, so it is a real
# transaction, committed or rolled back as before.  The connection leaves autocommit when it
# goes back to the pool.


def autocommit_for_queue(conn: Connection) -> bool:
    """Put ``conn``'s DBAPI connection in autocommit (once) for a Q4M consumer; True when it
    is.  False (nothing done) inside a transaction, on a connection SQLAlchemy itself runs
    in AUTOCOMMIT, with a driver without ``autocommit()``, and when statement listeners or
    logging are on: the library's statements then go through ``exec_driver_sql``, whose
    autobegin would need a BEGIN and a COMMIT each, so a transaction per job is cheaper."""
    info = conn.info
    if info.get(AUTOCOMMIT_KEY):
        return True
    if conn.in_transaction() or conn.get_execution_options().get("isolation_level") == (
        "AUTOCOMMIT"
    ):
        return False
    if not driver_level(conn):
        return False
    dbapi_conn = conn.connection.dbapi_connection
    if not callable(getattr(dbapi_conn, "autocommit", None)):
        return False
    _watch_autocommit(conn.engine)  # before the mark: every later BEGIN is sent
    on_driver(conn, "SET autocommit = 1", lambda c: c.autocommit(True))
    info[AUTOCOMMIT_KEY] = True
    return True


def _on_begin(conn: Connection) -> None:
    """SQLAlchemy begins a transaction on a connection in the library's autocommit: BEGIN."""
    if conn.invalidated or conn.closed or not conn.info.get(AUTOCOMMIT_KEY):
        return

    def begin(dbapi_conn: Any) -> None:
        cursor = dbapi_conn.cursor()
        try:
            cursor.execute("BEGIN")
        finally:
            cursor.close()

    on_driver(conn, "BEGIN", begin)


def _on_checkin(dbapi_conn: Any, record: Any) -> None:
    """Back in the pool: the connection leaves the library's autocommit (the caller's code
    gets the driver's default again); if that fails, it is closed."""
    if dbapi_conn is None or record is None or not record.info.pop(AUTOCOMMIT_KEY, False):
        return
    try:
        dbapi_conn.autocommit(False)
    except Exception:
        record.invalidate()


class Holder(Protocol):
    """What a backend needs from the queue session it claims for."""

    @property
    def connection(self) -> Connection:
        """The pinned connection that will own the job."""

    @property
    def session(self) -> Session:
        """The ORM session the job belongs to (made on first use)."""

    @property
    def in_session(self) -> bool:
        """True when ``session`` is the caller's own: it loads every job (identity map)."""

    @property
    def unobserved(self) -> bool | None:
        """:func:`~sqlalchemy_q4m.backends.driver.driver_level` for ``connection``, asked
        once per job; None: ask per statement."""

    def restart(self) -> bool:
        """Roll back the transaction if this queue session began it and holds no job yet
        (after a deadlock); False when it is the caller's, which must not be touched."""


def is_conflict(err: BaseException) -> bool:
    """True for an error a claim may be retried after, once its transaction is rolled back:
    a deadlock, a lock-wait timeout, or a statement interrupted by a listen wake-up."""
    code = error_code(err)
    return code in RETRYABLE or code == QUERY_INTERRUPTED


class Backend(ABC):
    """One way to own a job.  Instances hold no state: the queue session or batch holds it.

    ``attempt`` tries once to own a job for ``holder`` (a queue session: its pinned
    connection, its ORM session made on demand).  A ``blocking`` backend
    waits inside the server for up to ``timeout`` seconds; a non-blocking one returns at once
    and the caller polls.  ``end`` removes the owned job and ``abort`` returns it; the queue
    session commits or rolls back the transaction around them.  A batch uses the ``_many``
    forms: ``claim_many`` (no retry: the batch decides), ``end_many``, ``abort_many``.

    The transaction a claim runs in: ``check_open_transaction`` refuses a caller's open one
    that cannot hold a claim, ``sets_isolation`` says whether each transaction the library
    begins on a connection needs ``begin_claim`` first (``SET TRANSACTION``).
    """

    name: ClassVar[BackendName]
    blocking: ClassVar[bool]

    @abstractmethod
    def attempt(
        self, holder: Holder, subs: Sequence[Subscription], timeout: float
    ) -> Claim | None: ...

    @abstractmethod
    def end(self, conn: Connection, claim: Claim) -> None: ...

    @abstractmethod
    def abort(self, conn: Connection, claim: Claim) -> None: ...

    @abstractmethod
    def claim_many(self, holder: Holder, sub: Subscription, limit: int) -> list[Claim]:
        """Own up to ``limit`` jobs of ``sub`` at once, without waiting; errors raised as
        they come (see :func:`is_conflict`)."""

    @abstractmethod
    def end_many(self, conn: Connection, claims: Sequence[Claim]) -> None:
        """Remove the owned jobs of ``claims``; the caller commits."""

    @abstractmethod
    def abort_many(self, conn: Connection, claims: Sequence[Claim]) -> None:
        """Return the owned jobs of ``claims``; the caller rolls back."""

    @abstractmethod
    def check_open_transaction(self, conn: Connection) -> None:
        """Raise :class:`~sqlalchemy_q4m.exc.UnsafeBind` when the transaction open on
        ``conn`` (the caller's) cannot hold a claim."""

    def sets_isolation(self, conn: Connection) -> bool:
        """Whether each transaction begun on ``conn`` for a claim needs :meth:`begin_claim`
        first."""
        return False

    @abstractmethod
    def begin_claim(self, conn: Connection) -> None:
        """Prepare the transaction about to begin on ``conn`` for a claim."""
