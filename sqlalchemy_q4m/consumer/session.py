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

The job's life (wait, own, end or abort) is decided by
:class:`~sqlalchemy_q4m.consumer.lifecycle.Lifecycle`, which the asyncio queue session drives
too; :class:`QueueSession` performs its steps with blocking I/O.  The connection side (binds,
pinning, transactions, release) is :class:`~sqlalchemy_q4m.consumer.binding.Pin`, and the
watch on a caller releasing the job inside the block is
:class:`~sqlalchemy_q4m.consumer.ownership.OwnershipWatch`: the queue session's three bases.
"""

from __future__ import annotations

import time
from types import TracebackType
from typing import Any
from typing import Generic
from typing import Literal
from typing import TypeVar

from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from ..backends import Backend
from ..backends import Claim
from ..backends.base import RETRYABLE
from ..backends.base import error_code
from ..backends.base import raise_if_lost
from ..backends.rows import Unloadable
from ..backends.wakeup import listen_wait
from ..backends.wakeup import listening_supported
from ..exc import CompletionFailed
from ..exc import NotOwner
from ..exc import QueueAbort
from ..schema.functions import subscriptions
from .binding import Bind
from .binding import check_bind
from .lifecycle import POLL_INTERVAL
from .lifecycle import Action
from .lifecycle import Exit
from .lifecycle import Lifecycle
from .lifecycle import State
from .lifecycle import Step
from .lifecycle import Where
from .lifecycle import check_wait_options
from .ownership import OwnershipWatch

__all__ = [
    "POLL_INTERVAL",
    "Bind",
    "QueueSession",
    "Where",
    "check_wait_options",
]

T = TypeVar("T")


#: The ``Session`` events an empty ``commit()`` (autobegin, then commit) dispatches.
_EMPTY_COMMIT_EVENTS = (
    "after_transaction_create",
    "before_commit",
    "after_commit",
    "after_transaction_end",
)


def idle_session(session: Session) -> bool:
    """True when committing ``session`` would do nothing anyone sees: no transaction begun
    (so nothing pending, no connection) and no listener for the events an empty commit
    dispatches.  (Q4M, a Session bind: the job's end then skips the Session's commit.)"""
    if session.in_transaction():
        return False
    dispatch = session.dispatch
    return not any(getattr(dispatch, name) for name in _EMPTY_COMMIT_EVENTS)


def _expunge_job(orm: Session, claim: Claim) -> None:
    """Take the ended job out of ``orm`` (the caller's session), if it is in it."""
    if claim.subscription.is_orm and claim.job in orm:
        orm.expunge(claim.job)


class QueueSession(OwnershipWatch, Generic[T]):
    """One job's lifetime on one pinned connection; see the module docstring.

    Use it as a context manager (``__enter__`` returns the job or None), or call
    :meth:`wait`, then :meth:`end` or :meth:`abort`, then :meth:`close`.

    Long because it is the one place that performs every step of a job's life on a real
    connection (wait, end, abort, exit) together with the ORM session's part in each; the
    decisions are :class:`~sqlalchemy_q4m.consumer.lifecycle.Lifecycle`'s, the connection's
    pinning and guarding live in its bases (``Pin``, ``OwnershipWatch``).
    """

    #: A row that cannot be loaded raises :class:`UnloadableJob` (and goes back to the
    #: queue); the worker sets this to own it as a
    #: :class:`~sqlalchemy_q4m.backends.rows.Unloadable` and dead-letter it.
    accept_unloadable: bool = False

    # class-level defaults, as :class:`~sqlalchemy_q4m.consumer.binding.Pin`'s
    job: T | None = None
    _claim: Claim | None = None

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
        check_bind(bind)
        check_wait_options(timeout, poll_interval, listen)
        super().__init__(bind, backend, subscriptions(targets, where))
        self.timeout = timeout
        self.poll_interval = poll_interval
        #: Seconds an idle portable consumer waits to be woken by ``notify`` (MariaDB) instead
        #: of polling; None: poll.  See :mod:`sqlalchemy_q4m.backends.wakeup`.
        self.listen = listen
        #: The job's life: what to do next, decided without I/O (shared with asyncio).
        self.life = Lifecycle(timeout, poll_interval)

    # -- public API -------------------------------------------------------------------------

    @property
    def owning(self) -> bool:
        """True while this session owns a job."""
        return self.life.owning

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

    def wait(self) -> T | None:
        """Wait up to ``timeout`` seconds for a job; return it (owned), or None on timeout.

        The blocking driver of :class:`~sqlalchemy_q4m.consumer.lifecycle.Lifecycle`: it
        performs each step the lifecycle asks for, and nothing else."""
        self.life.check_idle()
        backend = self._setup()
        try:
            action = self._start(backend)
            while True:
                step = action.step
                if step is Step.CLAIM:
                    action = self._attempt(backend, action.seconds)
                elif step is Step.OWN:
                    return self.job
                elif step is Step.GIVE_UP:
                    break
                else:
                    if step is Step.LISTEN:
                        self._listen(action.seconds)
                    else:
                        time.sleep(action.seconds)
                    action = self.life.paused(time.monotonic())
        except BaseException:
            self._release(broken=True)
            raise
        self._give_up()
        return None

    def end(self) -> None:
        """Finish the job: it is removed from the queue (``queue_end()`` / DELETE + COMMIT)."""
        claim, backend = self._owned()
        conn = self._pinned  # not ``connection``: a transaction begun on the driver stays so
        assert conn is not None
        ok = False
        self._finishing = True
        try:
            if self._released is not None:
                self._check_not_released()  # raises
            user = self._user_session
            if user is not None and not idle_session(user):
                user.commit()
            orm = self._orm
            try:
                if orm is not None:
                    # the block's own writes first: they commit with them (a clean session's
                    # flush returns at once, cheaper than asking it for new/dirty/deleted)
                    orm.flush()
                if backend.name == "native":
                    # Q4M: queue_end() is durable at once, outside any transaction, so the
                    # job's writes commit before it (a crash in between runs the job again:
                    # at least once, never lost)
                    self._finish_transaction(commit=True)
                backend.end(conn, claim)
                if orm is not None and not self._own_orm:
                    # the caller's session: the row is gone.  Before its commit, which then
                    # has nothing of the job's to expire (its values stay loaded)
                    _expunge_job(orm, claim)
                self._finish_transaction(commit=True)
            except OperationalError as err:
                raise_if_lost(err, "completing a job")
                code = error_code(err)
                if code not in RETRYABLE:
                    raise
                self._finish_transaction(commit=False, returning=True)
                raise CompletionFailed(
                    f"job in {claim.subscription.name!r} not completed (MySQL error {code}): "
                    "the transaction was rolled back, so the job is back in the queue and will "
                    "run again"
                ) from err
            except DBAPIError as err:
                raise_if_lost(err, "completing a job")
                raise
            ok = True
        finally:
            if ok:
                self.life.ended()
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
            if ok:
                self.life.aborted()
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
        what, swallow = self.life.exit(exc)
        if what is Exit.RELEASE:
            self._release()
        elif what is Exit.END:
            self.end()
        else:
            assert exc is not None
            try:
                self.abort()
            except Exception as abort_error:
                if isinstance(exc, QueueAbort):
                    raise
                exc.add_note(f"sqlalchemy-q4m: returning the job failed too: {abort_error!r}")
        return swallow

    # -- the steps a driver performs (the asyncio queue session too, in a greenlet) ------------

    def _start(self, backend: Backend) -> Action:
        """The lifecycle's first step, once the connection is pinned."""
        listen = self.listen if self._listening() else None
        return self.life.start(time.monotonic(), blocking=backend.blocking, listen=listen)

    def _attempt(self, backend: Backend, timeout: float) -> Action:
        """One ``backend.attempt`` (blocking at most ``timeout`` seconds); the next step."""
        assert self._pinned is not None
        claim = backend.attempt(self, self.subscriptions, timeout)
        if claim is None:
            return self.life.missed(time.monotonic())
        unloadable = isinstance(claim.job, Unloadable)
        if unloadable and not self.accept_unloadable:  # returned to the queue by wait()
            raise claim.job.exception() from claim.job.error
        self._claim, self.job, self.subscription = claim, claim.job, claim.subscription
        action = self.life.claimed()
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
        return action

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

    def _listen(self, seconds: float) -> None:
        """One :func:`~sqlalchemy_q4m.backends.wakeup.listen_wait` of ``seconds``."""
        assert self._pinned is not None
        if listen_wait(self._pinned, self.subscriptions, seconds):
            self.restart()  # the guard may hold a row lock: the claim starts afresh

    def _give_up(self) -> None:
        """Nothing came in time: close what the wait began, release the connection."""
        try:
            self._finish_transaction(commit=False)
        except BaseException:
            self._release(broken=True)
            raise
        self.life.gave_up()
        self._release()

    # -- internals ---------------------------------------------------------------------------

    def _owned(self) -> tuple[Claim, Backend]:
        claim, backend = self._claim, self.backend
        if self.life.state is not State.OWNING or claim is None or backend is None:
            raise NotOwner()
        return claim, backend

    def _release(self, *, broken: bool = False) -> None:
        """Hand the connection back (see :meth:`Pin._release`): the job's life is over."""
        if broken:
            self.life.broke()
        else:
            self.life.finish()
        super()._release(broken=broken)
