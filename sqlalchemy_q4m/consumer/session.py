"""``queue_session``: pin one connection, wait for a job, yield it, end or abort it.

::

    with queue_session(ShellJob, bind=engine, timeout=5) as job:
        if job is not None:
            run(job.command)        # normal exit -> end; exception -> abort, re-raised;
                                    # QueueAbort -> abort, swallowed

What ``bind`` means:

* an :class:`~sqlalchemy.Engine`: a consumer connection of the engine, kept ready between
  queue sessions (:mod:`~sqlalchemy_q4m.backends.pinned`: no isolation change or pool reset
  per job), owns the job until it is ended or aborted; :attr:`QueueSession.session` is an ORM
  session on it.
* a :class:`~sqlalchemy.Connection`: used as it is (a worker keeps one per thread); a
  transaction this queue session begins claims in READ COMMITTED (no gap locks; ``SET
  TRANSACTION`` first unless the connection is READ COMMITTED already), an open one is joined,
  not committed (refused when it is REPEATABLE READ, and on Q4M at all).
* an ORM :class:`~sqlalchemy.orm.Session`: on the portable backend the claim happens in the
  session's transaction, so the job's removal commits atomically with the block's writes
  (do not commit it inside the block).  On Q4M, which has no transactions, the job is owned on
  a separate pinned connection; at the end the session is committed first and the job ended
  after it (at least once: a crash in between runs the job again); on abort the session is
  rolled back and the job returned.

On Q4M the job's writes always commit before ``queue_end()``, which is durable at once (a crash
in between runs the job again, never loses it).  The consumer's connection runs in the driver's
autocommit there (:func:`~sqlalchemy_q4m.backends.base.autocommit_for_queue`), so a job that
writes nothing sends no COMMIT, and one that does writes in a transaction of its own (``BEGIN``
... ``COMMIT``).  A connection owns one job at a time
(:class:`~sqlalchemy_q4m.exc.AlreadyOwning`), and ending the transaction that holds a portable
claim inside the block raises :class:`~sqlalchemy_q4m.exc.OwnershipReleased`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from collections.abc import Mapping
from types import TracebackType
from typing import TYPE_CHECKING
from typing import Any
from typing import Generic
from typing import Literal
from typing import TypeVar
from typing import overload

from sqlalchemy import Connection
from sqlalchemy import Engine
from sqlalchemy import event
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from ..backends import Backend
from ..backends import Claim
from ..backends import get_backend
from ..backends import pinned as keeping
from ..backends.base import RETRYABLE
from ..backends.base import autocommit_for_queue
from ..backends.base import check_free
from ..backends.base import error_code
from ..backends.base import give_up_connection
from ..backends.base import take_connection
from ..backends.base import translate_errors
from ..backends.loading import Unloadable
from ..backends.portable import READ_COMMITTED_LEVELS
from ..backends.portable import begin_read_committed
from ..backends.portable import check_isolation
from ..backends.wakeup import listen_wait
from ..backends.wakeup import listening_supported
from ..exc import CompletionFailed
from ..exc import NotOwner
from ..exc import OwnershipReleased
from ..exc import Q4MError
from ..exc import QueueAbort
from ..exc import UnsafeBind
from ..schema.checks import check_seconds
from ..schema.functions import Subscription
from ..schema.functions import subscriptions
from ..server import BackendName
from ..server import _validate
from ..server import backend_for_dialect
from ..server import check_server
from ..server import detect_backend

if TYPE_CHECKING:
    from .asyncio import AsyncBind
    from .asyncio import AsyncQueueSession

__all__ = ["QueueSession", "queue_session", "queue_sessionmaker"]

T = TypeVar("T")
Bind = Engine | Connection | Session
Where = ColumnElement[bool] | Mapping[Any, ColumnElement[bool]] | None

#: Default seconds between two claim attempts on the portable backend while the queue is empty.
#: 50 ms costs an idle consumer 20 queries/s and delays pickup by 25 ms on average (half the
#: interval); any polling schedule at 20 queries/s has a median delay of at least 25 ms.
POLL_INTERVAL = 0.05


def check_wait_options(
    timeout: float | None, poll_interval: float, listen: float | None = None
) -> None:
    """Refuse a negative ``timeout``, a non-positive ``poll_interval`` or ``listen``, and NaN
    or infinity in any, with an :class:`~sqlalchemy_q4m.exc.OptionError`."""
    check_seconds("timeout", timeout, optional=True)
    check_seconds("poll_interval", poll_interval, positive=True)
    check_seconds("listen", listen, positive=True, optional=True)


class QueueSession(Generic[T]):
    """One job's lifetime on one pinned connection; see the module docstring.

    Use it as a context manager (``__enter__`` returns the job or None), or call
    :meth:`wait`, then :meth:`end` or :meth:`abort`, then :meth:`close`.
    """

    #: A row that cannot be loaded raises :class:`UnloadableJob` (and goes back to the
    #: queue); the worker sets this to own it as a :class:`~sqlalchemy_q4m.loading.Unloadable`
    #: and dead-letter it.
    accept_unloadable: bool = False

    def __init__(
        self,
        *targets: Any,
        bind: Bind,
        where: Where = None,
        timeout: float | None = 60.0,
        backend: Literal["native", "portable", "auto"] | None = None,
        poll_interval: float = POLL_INTERVAL,
        listen: float | None = None,
    ) -> None:
        if not isinstance(bind, Engine | Connection | Session):
            raise Q4MError(f"bind must be an Engine, a Connection or a Session, not {bind!r}")
        check_wait_options(timeout, poll_interval, listen)
        self.subscriptions: tuple[Subscription, ...] = subscriptions(targets, where)
        self.bind = bind
        self.timeout = timeout
        self.poll_interval = poll_interval
        #: Seconds an idle portable consumer waits to be woken by ``notify`` (MariaDB) instead
        #: of polling; None: poll.  See :mod:`sqlalchemy_q4m.notify`.
        self.listen = listen
        self._backend_name = None if backend in (None, "auto") else _validate(str(backend))
        self.backend: Backend | None = None
        self.job: T | None = None
        self.subscription: Subscription | None = None
        self._claim: Claim | None = None
        self._conn: Connection | None = None  # checked out by us: closed (or kept) by us
        self._keep: int | None = None  # kept for the engine's next queue session (generation)
        self._pinned: Connection | None = None  # runs queue_wait/queue_end (ours or the caller's)
        self._orm: Session | None = None  # made on first use, or the caller's
        self._own_orm = False
        self._user_session: Session | None = None  # committed before queue_end (native)
        self._began = False
        self._read_committed = False  # SET TRANSACTION before each transaction we begin
        self._owner_info: dict[Any, Any] | None = None  # the pinned connection's info
        self._finishing = False  # our own commit/rollback: not the caller releasing the job
        self._released: str | None = None  # what the caller did to the transaction, if any
        self._guarded: list[Session] = []  # ORM sessions whose commit would free the job
        self._state: Literal["new", "owning", "done"] = "new"

    # -- public API -------------------------------------------------------------------------

    @property
    def owning(self) -> bool:
        """True while this session owns a job."""
        return self._state == "owning"

    @property
    def session(self) -> Session:
        """The ORM session of the job (made on first use; the caller's own with a Session
        bind).  On the portable backend, writes made through it commit atomically with the
        job's removal."""
        orm = self._orm
        if orm is None:
            if self._pinned is None:
                raise NotOwner("the queue session has not started, or is finished")
            orm = self._orm = self._new_orm_session(self._pinned)
            self._own_orm = True
            if self.owning:
                self._guard_session(orm)
            job, sub = self.job, self.subscription
            if job is not None and sub is not None and sub.is_orm and job not in orm:
                orm.add(job)  # built from the row, detached: now persistent in it
        return orm

    @property
    def connection(self) -> Connection:
        """The pinned connection that owns the job."""
        if self._pinned is None:
            raise NotOwner("the queue session has not started, or is finished")
        return self._pinned

    def wait(self) -> T | None:
        """Wait up to ``timeout`` seconds for a job; return it (owned), or None on timeout."""
        if self._state != "new":
            raise Q4MError("a QueueSession waits once; make a new one for the next job")
        backend = self._setup()
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        try:
            while True:
                started = time.monotonic()
                remaining = 60.0 if deadline is None else max(0.0, deadline - started)
                if self._attempt(backend, remaining):
                    return self.job
                if deadline is not None and time.monotonic() >= deadline:
                    break
                if not backend.blocking and self._listening():
                    self._listen(deadline)
                elif not backend.blocking:
                    # One attempt per poll_interval on a fixed schedule, however long the
                    # attempt took: an idle consumer costs exactly 1 / poll_interval queries/s.
                    wake = started + self.poll_interval
                    if deadline is not None:
                        wake = min(wake, deadline)
                    time.sleep(max(0.0, wake - time.monotonic()))
            self._finish_transaction(commit=False)
        except BaseException:
            self._release(broken=True)
            raise
        self._release()
        return None

    def end(self) -> None:
        """Finish the job: it is removed from the queue (``queue_end()`` / DELETE + COMMIT)."""
        claim, backend = self._owned()
        conn = self.connection
        ok = False
        self._finishing = True
        try:
            self._check_not_released()
            if self._user_session is not None:
                self._user_session.commit()
            orm = self._orm
            try:
                with translate_errors("completing a job"):
                    if orm is not None and (orm.new or orm.dirty or orm.deleted):
                        orm.flush()  # the block's own writes first: they commit with them
                    if backend.name == "native":
                        # Q4M: queue_end() is durable at once, outside any transaction, so
                        # the job's writes commit before it (a crash in between runs the job
                        # again: at least once, never lost)
                        self._finish_transaction(commit=True)
                    backend.end(conn, claim)
                    self._finish_transaction(commit=True)
            except OperationalError as err:
                code = error_code(err)
                if code not in RETRYABLE:
                    raise
                self._finish_transaction(commit=False, returning=True)
                raise CompletionFailed(
                    f"job in {claim.subscription.name!r} not completed (MySQL error {code}): "
                    "the transaction was rolled back, so the job is back in the queue and will "
                    "run again"
                ) from err
            in_orm = orm is not None and claim.subscription.is_orm and claim.job in orm
            if in_orm and not self._own_orm:
                assert orm is not None
                orm.expunge(claim.job)  # the caller's session: the row is gone
            ok = True
        finally:
            self._state = "done"
            self._release(broken=not ok)

    def abort(self) -> None:
        """Give the job back: it returns to the queue for the next consumer."""
        claim, backend = self._owned()
        ok = False
        self._finishing = True
        try:
            if self._user_session is not None:
                self._user_session.rollback()
            backend.abort(self.connection, claim)
            self._finish_transaction(commit=False, returning=True)
            ok = self._released is None or self._discard_stopped_transaction()
        finally:
            self._state = "done"
            self._release(broken=not ok)

    def close(self) -> None:
        """Abort a job still owned and release the connection; safe to call twice."""
        if self.owning:
            self.abort()
        else:
            self._release()

    def __enter__(self) -> T | None:
        return self.wait()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if not self.owning:
            self._release()
            return isinstance(exc, QueueAbort)
        if exc is None:
            self.end()
            return False
        try:
            self.abort()
        except Exception as abort_error:
            if isinstance(exc, QueueAbort):
                raise
            exc.add_note(f"sqlalchemy-q4m: returning the job failed too: {abort_error!r}")
        return isinstance(exc, QueueAbort)

    # -- internals ---------------------------------------------------------------------------

    def _owned(self) -> tuple[Claim, Backend]:
        if self._state != "owning" or self._claim is None or self.backend is None:
            raise NotOwner()
        return self._claim, self.backend

    def released(self, what: str) -> None:
        """The caller ``what`` (committed, rolled back) the transaction holding the job, or
        its connection was returned to the pool, inside the block: raise, so the block fails
        instead of running on while another consumer may own the job (on the portable
        backend the commit or rollback is stopped before it reaches the server).  On Q4M a
        commit or rollback does not touch the owned row."""
        if self._state != "owning" or self._finishing:
            return
        portable = self.backend is not None and self.backend.name == "portable"
        if not portable and what != "returned to the pool":
            return
        self._released = what
        table = self.subscription.name if self.subscription is not None else "?"
        raise OwnershipReleased(
            f"the connection owning a job of {table!r} was {what} inside the queue session: "
            "that would free the job for another consumer while this block still runs it; the "
            "job goes back to the queue.  Let the block end (it commits the job's writes with "
            "the job), or raise QueueAbort"
        )

    def _guard_session(self, orm: Session) -> None:
        """Stop a commit of ``orm``'s transaction (not of a savepoint) before it starts while
        the job is owned in it (portable backend)."""
        if self.backend is not None and self.backend.name == "portable":
            event.listen(orm, "before_commit", self._before_commit)
            self._guarded.append(orm)

    def _before_commit(self, orm: Session) -> None:
        if orm.get_nested_transaction() is None:  # the transaction, not a savepoint
            self.released("committed")

    def _discard_stopped_transaction(self) -> bool:
        """After a commit or rollback the library stopped: SQLAlchemy deactivated its
        transaction but the server's is still open (holding the row), so it is rolled back on
        the driver's connection, then SQLAlchemy's state is cleared.  False when the
        connection was closed meanwhile (the pool reset or closed it: the row is free)."""
        conn = self.connection
        if conn.closed or conn.invalidated:
            return False
        conn.connection.dbapi_connection.rollback()  # type: ignore[union-attr]
        if conn.get_transaction() is not None:
            conn.rollback()
        return True

    def _check_not_released(self) -> None:
        if self._released is not None:
            raise OwnershipReleased(
                f"the job's transaction was {self._released} inside the block: the job cannot "
                "be ended; it goes back to the queue"
            )

    def _listening(self) -> bool:
        """Whether idle waits listen (``notify``) rather than poll: ``listen`` is set, the
        server is MariaDB and the transaction is ours (the wait's guard locks rows in it)."""
        conn = self._pinned
        return (
            self.listen is not None
            and self._began
            and conn is not None
            and listening_supported(conn.dialect)
        )

    def _listen(self, deadline: float | None) -> None:
        """One :func:`~sqlalchemy_q4m.notify.listen_wait` of at most ``listen`` seconds."""
        assert self.listen is not None and self._pinned is not None
        seconds = self.listen
        if deadline is not None:
            seconds = min(seconds, deadline - time.monotonic())
        if seconds > 0.001 and listen_wait(self._pinned, self.subscriptions, seconds):
            self.restart()  # the guard may hold a row lock: the claim starts afresh

    def _attempt(self, backend: Backend, timeout: float) -> bool:
        """One ``backend.attempt``; True (and owning) when it got a job."""
        assert self._pinned is not None
        claim = backend.attempt(self, self.subscriptions, timeout)
        if claim is None:
            return False
        unloadable = isinstance(claim.job, Unloadable)
        if unloadable and not self.accept_unloadable:  # returned to the queue by wait()
            raise claim.job.exception() from claim.job.error
        self._claim, self.job, self.subscription = claim, claim.job, claim.subscription
        self._state = "owning"
        orm = self._orm
        if orm is not None:
            self._guard_session(orm)
        if (
            orm is not None
            and claim.subscription.is_orm
            and not unloadable
            and claim.job not in orm
        ):
            orm.add(claim.job)  # the caller's session: the job is loaded in it
        return True

    @property
    def in_session(self) -> bool:
        """True when the jobs load in the caller's own Session (a Session bind)."""
        return self._orm is not None and not self._own_orm

    def restart(self) -> bool:
        """Roll back the transaction this queue session began, before it owns a job (a
        claim lost a deadlock); False when the transaction is the caller's."""
        if not self._began or self.owning:
            return False
        self._finish_transaction(commit=False)
        if self.in_session:  # the caller's Session gave its connection back: take a new one
            assert self._orm is not None
            give_up_connection(self._owner_info, self)
            self._pinned = self._session_connection(self._orm, None)
            self._owner_info = take_connection(self._pinned, self)
        elif self._read_committed:
            assert self._pinned is not None
            with translate_errors("beginning a claim"):
                begin_read_committed(self._pinned)
        return True

    def _resolve(self, probe: Engine | Connection) -> BackendName:
        if self._backend_name is not None:
            check_server(probe.dialect, self._backend_name)
            return self._backend_name
        if isinstance(probe, Connection):
            return detect_backend(probe)
        known = backend_for_dialect(probe.dialect)
        if known is not None:  # detected before: no probe connection
            check_server(probe.dialect, known)
            return known
        with probe.connect() as conn:
            return detect_backend(conn)

    def _setup(self) -> Backend:
        """Pin the connection: refused (before any statement is sent) when it already owns
        a job, and on the portable backend when the caller's open transaction would take gap
        locks; recorded as owned by this queue session."""
        bind = self.bind
        if isinstance(bind, Session):
            sub = self.subscriptions[0]
            engine_or_conn = bind.get_bind(mapper=sub.target if sub.is_orm else None)
            if isinstance(engine_or_conn, Connection):
                check_free(engine_or_conn)
            name = self._resolve(engine_or_conn)
            if name == "portable":
                began = not bind.in_transaction()
                if began:
                    conn = self._session_connection(bind, engine_or_conn)
                else:
                    conn = bind.connection()
                    check_free(conn)
                    check_isolation(conn)
                self.backend = get_backend(name)
                self._orm, self._began, self._pinned = bind, began, conn
            else:
                self._user_session = bind
                self._pin(engine_or_conn, name)
        else:
            if isinstance(bind, Connection):
                check_free(bind)
            self._pin(bind, self._resolve(bind))
        assert self.backend is not None and self._pinned is not None
        self._owner_info = take_connection(self._pinned, self)
        if self._read_committed:
            try:
                with translate_errors("beginning a claim"):
                    begin_read_committed(self._pinned)
            except BaseException:
                self._release(broken=True)
                raise
        return self.backend

    def _session_connection(self, orm: Session, bind: Engine | Connection | None) -> Connection:
        """The caller's Session's connection for a claim in a transaction we begin: one kept
        for its engine (already READ COMMITTED; ``bind`` None: the one we have), else a
        checkout of the Session's own in READ COMMITTED."""
        if self._conn is None and isinstance(bind, Engine) and keeping.keeps(bind):
            self._kept_connection(bind, "portable")
        if self._conn is None:
            return orm.connection(execution_options={"isolation_level": "READ COMMITTED"})
        try:
            return orm.connection(bind_arguments={"bind": self._conn})
        except BaseException:
            conn, self._conn, self._keep = self._conn, None, None
            conn.close()  # back to the pool, not kept: its state is unknown
            raise

    def _kept_connection(self, engine: Engine, name: BackendName) -> Connection:
        """A consumer connection of ``engine`` in ``name``'s mode: one kept from an earlier
        queue session (see :mod:`~sqlalchemy_q4m.backends.pinned`) or a new checkout."""
        conn, generation = keeping.take(engine)
        if conn is None:
            conn = engine.connect()
            try:
                with translate_errors("preparing the consumer's connection"):
                    keep = keeping.prepare(conn, name)
            except BaseException:
                conn.close()
                raise
            if not keep:
                generation = None
        self._conn, self._keep = conn, generation
        return conn

    def _pin(self, bind: Engine | Connection, name: BackendName) -> None:
        if isinstance(bind, Engine):
            conn = self._kept_connection(bind, name)
            began = True
        else:
            conn = bind
            began = not conn.in_transaction()
            if not began and name == "native":
                raise UnsafeBind(
                    "on Q4M queue_end() cannot be part of the transaction open on this "
                    "Connection (Q4M has no transactions): the job would be gone before your "
                    "writes commit, and lost if you crash in between.  Commit before the "
                    "queue session, or bind an Engine"
                )
            if not began:
                check_isolation(conn)
            elif name == "portable":
                level = conn.get_execution_options().get("isolation_level")
                self._read_committed = level not in READ_COMMITTED_LEVELS
            else:
                with translate_errors("preparing the consumer's connection"):
                    autocommit_for_queue(conn)  # once per DBAPI connection: no COMMIT per job
        self.backend = get_backend(name)
        self._pinned = conn
        self._began = began

    def _new_orm_session(self, conn: Connection) -> Session:
        """The ORM session of the job on the pinned connection, made on first use (the
        asyncio queue session makes it the sync half of an ``AsyncSession``)."""
        return Session(**self._orm_options())

    def _orm_options(self) -> dict[str, Any]:
        """It joins the connection's transaction: its own when this queue session began it
        (so its commit and rollback are the transaction's), else the caller's, which it
        never commits."""
        mode = "control_fully" if self._began else "conservative_savepoint"
        return {
            "bind": self._pinned,
            "expire_on_commit": False,
            "autoflush": True,
            "join_transaction_mode": mode,
        }

    def _finish_transaction(self, *, commit: bool, returning: bool = False) -> None:
        """Commit or roll back what this queue session began (nothing the caller began,
        except that ``returning`` a job on the portable backend rolls back the transaction
        holding its row lock, whoever began it)."""
        portable = self.backend is not None and self.backend.name == "portable"
        if not (self._began or (returning and portable)):
            return
        orm = self._orm
        if orm is not None and not self._own_orm:  # the caller's Session held the claim
            if orm.in_transaction():
                if commit:
                    orm.commit()
                else:
                    orm.rollback()
            return
        conn = self._pinned
        if conn is not None and conn.in_transaction():
            if commit:
                conn.commit()
            else:
                conn.rollback()

    def _release(self, *, broken: bool = False) -> None:
        """Hand the connection back.  If we might still own a row (``broken``), the pinned
        connection is invalidated (closed): the server then returns the row, and no pool
        ever holds a connection in owner mode."""
        self._state = "done"
        give_up_connection(self._owner_info, self)
        self._owner_info = None
        for guarded in self._guarded:
            event.remove(guarded, "before_commit", self._before_commit)
        self._guarded.clear()
        pinned, orm = self._pinned, self._orm
        if broken and pinned is not None and not pinned.invalidated and not pinned.closed:
            pinned.invalidate()
        try:
            if orm is not None and not self._own_orm and broken:
                orm.rollback()  # the caller's session: its transaction held the claim
            if orm is not None and self._own_orm:
                orm.close()
        except DBAPIError:  # pragma: no cover - the connection is gone already
            pass
        finally:
            conn, keep = self._conn, self._keep
            self._conn = self._pinned = self._keep = None
            if conn is not None:
                if keep is not None and not broken:
                    keeping.give_back(conn.engine, conn, keep)
                else:
                    conn.close()


@overload
def queue_session(
    *targets: Any,
    bind: Bind,
    where: Where = None,
    timeout: float | None = 60.0,
    backend: Literal["native", "portable", "auto"] | None = None,
    poll_interval: float = POLL_INTERVAL,
    listen: float | None = None,
) -> QueueSession[Any]: ...


@overload
def queue_session(
    *targets: Any,
    bind: AsyncBind,
    where: Where = None,
    timeout: float | None = 60.0,
    backend: Literal["native", "portable", "auto"] | None = None,
    poll_interval: float = POLL_INTERVAL,
    listen: float | None = None,
) -> AsyncQueueSession[Any]: ...


def queue_session(
    *targets: Any,
    bind: Bind | AsyncBind,
    where: Where = None,
    timeout: float | None = 60.0,
    backend: Literal["native", "portable", "auto"] | None = None,
    poll_interval: float = POLL_INTERVAL,
    listen: float | None = None,
) -> QueueSession[Any] | AsyncQueueSession[Any]:
    """Wait for a job of one of ``targets`` (earlier ones win) on a pinned connection.

    Returns a :class:`QueueSession`; use it in a ``with`` block, which yields the job (a
    mapped instance, or a Row for a Core table) or None when ``timeout`` seconds pass.  With an
    asyncio ``bind`` (``AsyncEngine``, ``AsyncConnection``, ``AsyncSession``) it returns an
    :class:`~sqlalchemy_q4m.asyncio.AsyncQueueSession` for ``async with``.

    ``listen=T``: on MariaDB an idle portable consumer waits up to ``T`` seconds to be woken
    by a producer's :func:`~sqlalchemy_q4m.notify.notify` instead of polling every
    ``poll_interval`` (see :mod:`sqlalchemy_q4m.notify`; an async bind awaits that wait).
    """
    if not isinstance(bind, Engine | Connection | Session):
        from .asyncio import async_queue_session

        return async_queue_session(
            *targets,
            bind=bind,
            where=where,
            timeout=timeout,
            backend=backend,
            poll_interval=poll_interval,
            listen=listen,
        )
    return QueueSession(
        *targets,
        bind=bind,
        where=where,
        timeout=timeout,
        backend=backend,
        poll_interval=poll_interval,
        listen=listen,
    )


def queue_sessionmaker(
    bind: Bind,
    *,
    timeout: float | None = 60.0,
    backend: Literal["native", "portable", "auto"] | None = None,
    poll_interval: float = POLL_INTERVAL,
    listen: float | None = None,
) -> Callable[..., QueueSession[Any]]:
    """A factory with ``bind`` and defaults fixed: ``QueueSession = queue_sessionmaker(engine)``
    then ``with QueueSession(ShellJob, timeout=5) as job: ...``."""
    defaults: dict[str, Any] = {
        "timeout": timeout,
        "backend": backend,
        "poll_interval": poll_interval,
        "listen": listen,
    }

    def factory(*targets: Any, **kw: Any) -> QueueSession[Any]:
        options = {**defaults, **kw}
        return QueueSession(*targets, bind=bind, **options)

    return factory
