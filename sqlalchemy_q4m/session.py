"""``queue_session``: pin one connection, wait for a job, yield it, end or abort it.

::

    with queue_session(ShellJob, bind=engine, timeout=5) as job:
        if job is not None:
            run(job.command)        # normal exit -> end; exception -> abort, re-raised;
                                    # QueueAbort -> abort, swallowed

What ``bind`` means:

* an :class:`~sqlalchemy.Engine`: a connection is checked out for this one job and returned
  only once the job is ended or aborted; :attr:`QueueSession.session` is an ORM session on it.
* a :class:`~sqlalchemy.Connection`: used as it is (a worker keeps one per thread); an open
  transaction on it is joined, not committed.
* an ORM :class:`~sqlalchemy.orm.Session`: on the portable backend the claim happens in the
  session's transaction, so the job's removal commits atomically with the block's writes
  (do not commit it inside the block).  On Q4M, which has no transactions, the job is owned on
  a separate pinned connection; at the end the session is committed first and the job ended
  after it (at least once: a crash in between runs the job again); on abort the session is
  rolled back and the job returned.
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
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from .backends import Backend
from .backends import Claim
from .backends import get_backend
from .backends.base import RETRYABLE
from .backends.base import error_code
from .backends.base import translate_errors
from .exc import CompletionFailed
from .exc import NotOwner
from .exc import Q4MError
from .exc import QueueAbort
from .functions import Subscription
from .functions import subscriptions
from .notify import listen_wait
from .notify import listening_supported
from .server import BackendName
from .server import _validate
from .server import check_server
from .server import detect_backend

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
    """Refuse a negative ``timeout``, a non-positive ``poll_interval`` or ``listen`` with a
    Q4MError."""
    if timeout is not None and timeout < 0:
        raise Q4MError(f"timeout must be >= 0 or None, not {timeout!r}")
    if poll_interval <= 0:
        raise Q4MError(f"poll_interval must be > 0, not {poll_interval!r}")
    if listen is not None and not listen > 0:
        raise Q4MError(f"listen must be > 0 or None, not {listen!r}")


class QueueSession(Generic[T]):
    """One job's lifetime on one pinned connection; see the module docstring.

    Use it as a context manager (``__enter__`` returns the job or None), or call
    :meth:`wait`, then :meth:`end` or :meth:`abort`, then :meth:`close`.
    """

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
        self._conn: Connection | None = None  # checked out by us: closed by us
        self._pinned: Connection | None = None  # runs queue_wait/queue_end (ours or the caller's)
        self._orm: Session | None = None  # made on first use, or the caller's
        self._own_orm = False
        self._user_session: Session | None = None  # committed before queue_end (native)
        self._began = False
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
        try:
            if self._user_session is not None:
                self._user_session.commit()
            orm = self._orm
            try:
                with translate_errors("completing a job"):
                    if orm is not None and (orm.new or orm.dirty or orm.deleted):
                        orm.flush()  # the block's own writes first: they commit with them
                    if orm is not None and backend.name == "native":
                        # Q4M has no transactions: queue_end() removes the job at once, so
                        # the block's writes commit first (a crash between runs it again)
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
            if orm is not None and not self._own_orm and claim.job in orm:
                orm.expunge(claim.job)  # the caller's session: the row is gone
            ok = True
        finally:
            self._state = "done"
            self._release(broken=not ok)

    def abort(self) -> None:
        """Give the job back: it returns to the queue for the next consumer."""
        claim, backend = self._owned()
        ok = False
        try:
            if self._user_session is not None:
                self._user_session.rollback()
            backend.abort(self.connection, claim)
            self._finish_transaction(commit=False, returning=True)
            ok = True
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
        self._claim, self.job, self.subscription = claim, claim.job, claim.subscription
        self._state = "owning"
        orm = self._orm
        if orm is not None and claim.subscription.is_orm and claim.job not in orm:
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
            options = {"isolation_level": "READ COMMITTED"}
            self._pinned = self._orm.connection(execution_options=options)
        return True

    def _resolve(self, probe: Engine | Connection) -> BackendName:
        if self._backend_name is not None:
            check_server(probe.dialect, self._backend_name)
            return self._backend_name
        if isinstance(probe, Connection):
            return detect_backend(probe)
        with probe.connect() as conn:
            return detect_backend(conn)

    def _setup(self) -> Backend:
        bind = self.bind
        if isinstance(bind, Session):
            sub = self.subscriptions[0]
            engine_or_conn = bind.get_bind(mapper=sub.target if sub.is_orm else None)
            name = self._resolve(engine_or_conn)
            if name == "portable":
                self.backend = get_backend(name)
                self._orm = bind
                self._began = not bind.in_transaction()
                options = {"isolation_level": "READ COMMITTED"} if self._began else None
                self._pinned = bind.connection(execution_options=options)
            else:
                self._user_session = bind
                self._pin(engine_or_conn, name)
        else:
            self._pin(bind, self._resolve(bind))
        assert self.backend is not None
        return self.backend

    def _pin(self, bind: Engine | Connection, name: BackendName) -> None:
        self.backend = get_backend(name)
        if isinstance(bind, Engine):
            conn = bind.connect()
            self._conn = conn
            if name == "portable":
                conn.execution_options(isolation_level="READ COMMITTED")
        else:
            conn = bind
        self._pinned = conn
        self._began = not conn.in_transaction()

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
        pinned, orm = self._pinned, self._orm
        if broken and pinned is not None and not pinned.invalidated:
            pinned.invalidate()
        try:
            if orm is not None and not self._own_orm and broken:
                orm.rollback()  # the caller's session: its transaction held the claim
            if orm is not None and self._own_orm:
                orm.close()
        except DBAPIError:  # pragma: no cover - the connection is gone already
            pass
        finally:
            if self._conn is not None:
                self._conn.close()
            self._conn = self._pinned = None


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
        from .asyncio import async_queue_session  # only for async binds: no asyncio otherwise

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
