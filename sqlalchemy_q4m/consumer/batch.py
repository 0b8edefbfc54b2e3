"""``queue_batch``: claim up to N jobs in one transaction, finish each one individually.

The throughput mode of the portable backend.  A one-job-per-transaction consumer pays one
durable commit per job; a batch pays one per batch::

    with queue_batch(ShellJob, bind=engine, size=500, timeout=5) as batch:
        for job in batch:                      # the claimed jobs (none after a timeout)
            with batch.handle(job):            # normal exit -> end; exception -> abort,
                run(job.command)               # re-raised; QueueAbort -> abort, swallowed

Exact semantics on the portable backend (InnoDB + ``SKIP LOCKED``):

* **claim**: one ``SELECT ... ORDER BY id LIMIT size FOR UPDATE SKIP LOCKED`` per subscribed
  table (earlier tables first, until ``size`` jobs are held), in a READ COMMITTED transaction
  on one pinned connection.  It waits up to ``timeout`` for at least one job, polling every
  ``poll_interval`` seconds (or, with ``listen``, waiting to be woken by a producer's
  :func:`~sqlalchemy_q4m.notify.notify`); it never waits to fill the batch.
* **end(job)** marks the job done.  The completed jobs are deleted together right before the
  batch's single COMMIT, one ``DELETE ... WHERE id = ?`` per job sent in one ``executemany``
  per table (a primary-key lookup of a row the batch holds: it never scans, never waits).
  Until that COMMIT the rows stay locked by this connection, so no other consumer can see
  them; the result is the same as deleting each one at once, with fewer round trips.
* **abort(job)** returns the job: its row is simply not deleted.  Its lock is held until the
  batch commits, so it is offered to other consumers when the batch ends, not before.
* a job neither ended nor aborted when the batch ends is returned (only jobs explicitly
  ended are removed).
* leaving the ``with`` block, normally or by an exception, commits the completed jobs and
  returns the rest; an exception then propagates (:class:`~sqlalchemy_q4m.exc.QueueAbort`
  is swallowed).
* **a crash** (the process dies, the connection is lost, the final COMMIT fails, or the
  server picks the batch as a deadlock victim while deleting, raised as
  :class:`~sqlalchemy_q4m.exc.CompletionFailed`) rolls the whole transaction back: *every*
  job of the batch returns to the queue, including the ones already ended.  Delivery is at
  least once, and the window is the batch: a smaller ``size`` repeats less after a crash.
* writes made through :attr:`QueueBatch.session` commit atomically with the batch's
  completions.  An aborted job's own writes are not undone (there is one transaction); when a
  job's writes must be undone with it, use :func:`~sqlalchemy_q4m.queue_session`.

On the native backend (Q4M) a connection owns one row at most, so a batch degrades to one job
at a time: it holds at most one job, and ``end``/``abort`` call ``queue_end()`` /
``queue_abort()`` at once.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from types import TracebackType
from typing import Any
from typing import Generic
from typing import Literal
from typing import TypeVar

from sqlalchemy import Connection
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from ..backends import Backend
from ..backends import Claim
from ..backends import get_backend
from ..backends.base import RETRYABLE
from ..backends.base import error_code
from ..backends.base import give_up_connection
from ..backends.base import is_conflict
from ..backends.base import take_connection
from ..backends.base import translate_errors
from ..backends.loading import Unloadable
from ..backends.wakeup import listen_wait
from ..backends.wakeup import listening_supported
from ..exc import CompletionFailed
from ..exc import NotOwner
from ..exc import Q4MError
from ..exc import QueueAbort
from ..schema.functions import Subscription
from ..schema.functions import subscriptions
from ..server import BackendName
from .binding import backend_choice
from .binding import resolve_backend
from .lifecycle import POLL_INTERVAL
from .lifecycle import Lifecycle
from .lifecycle import Step
from .lifecycle import Where
from .lifecycle import check_wait_options
from .session import QueueSession

__all__ = ["QueueBatch", "queue_batch"]

T = TypeVar("T")

#: Largest batch accepted: bigger batches only lengthen the at-least-once window.
MAX_SIZE = 10_000


class QueueBatch(Generic[T]):
    """Up to ``size`` jobs owned in one transaction on one pinned connection; see the module
    docstring for what end, abort, exceptions and crashes do."""

    #: A row that cannot be loaded raises :class:`~sqlalchemy_q4m.exc.UnloadableJob` (the
    #: batch goes back to the queue); the worker sets this to hold it as an
    #: :class:`~sqlalchemy_q4m.loading.Unloadable` and dead-letter it.
    accept_unloadable: bool = False

    def __init__(
        self,
        *targets: Any,
        bind: Engine | Connection,
        size: int = 100,
        where: Where = None,
        timeout: float | None = 60.0,
        backend: Literal["native", "portable", "auto"] | None = None,
        poll_interval: float = POLL_INTERVAL,
        listen: float | None = None,
    ) -> None:
        if not isinstance(bind, Engine | Connection):
            raise Q4MError(f"queue_batch binds to an Engine or a Connection, not {bind!r}")
        if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_SIZE:
            raise Q4MError(f"size must be an integer from 1 to {MAX_SIZE}, not {size!r}")
        check_wait_options(timeout, poll_interval, listen)
        self.subscriptions: tuple[Subscription, ...] = subscriptions(targets, where)
        self.targets = targets
        self.where = where
        self.bind = bind
        self.size = size
        self.timeout = timeout
        self.poll_interval = poll_interval
        self.listen = listen  # as queue_session's: wait to be woken by notify(), not poll
        self._backend_name = backend_choice(backend)
        self.backend: BackendName | None = None
        self.jobs: list[T] = []
        self._state: Literal["new", "owning", "done"] = "new"
        self._subs: dict[int, Subscription] = {}  # id(job) -> where it was claimed from
        self._claims: dict[int, Claim] = {}  # id(job) -> its claim (portable backend)
        self._pending: set[int] = set()  # id(job) of the jobs neither ended nor aborted
        self._ended: list[Claim] = []
        self._conn: Connection | None = None  # checked out by us: closed by us
        self._pinned: Connection | None = None  # holds the claimed rows' locks
        self._session: Session | None = None  # made on first use
        self._began = False
        self._single: QueueSession[T] | None = None  # the native backend's one-job session
        self._intact = False  # a failed claim held nothing: the caller's connection is kept
        self._owner_info: dict[Any, Any] | None = None  # the pinned connection's info

    # -- public API -------------------------------------------------------------------------

    @property
    def session(self) -> Session:
        """The ORM session the jobs were loaded in; its writes commit with the batch."""
        if self._single is not None:
            return self._single.session
        session = self._session
        if session is None:
            if self._pinned is None:
                raise NotOwner("the batch has not claimed yet, or is finished")
            session = Session(bind=self._pinned, expire_on_commit=False, autoflush=True)
            self._session = session
            for job in self.jobs:  # built from their rows, detached: persistent in it
                if isinstance(job, Unloadable):
                    continue
                if self._subs[id(job)].is_orm and job not in session:
                    session.add(job)
        return session

    @property
    def pending(self) -> list[T]:
        """Jobs of this batch neither ended nor aborted yet."""
        return [job for job in self.jobs if id(job) in self._pending]

    def wait(self) -> list[T]:
        """Claim up to ``size`` jobs, waiting up to ``timeout`` for the first; [] on timeout."""
        if self._state != "new":
            raise Q4MError("a QueueBatch claims once; make a new one for the next batch")
        self._state = "owning"
        try:
            name = self._resolve()
            self.backend = name
            jobs = self._wait_native() if name == "native" else self._wait_portable()
        except BaseException:
            self._release(broken=not self._intact)
            raise
        self.jobs = jobs
        if not jobs:
            self._finish(commit=False)
        return list(jobs)

    def end(self, job: T) -> None:
        """Mark ``job`` done: it is removed when the batch commits (at once on Q4M)."""
        self._take(job)
        if self._single is not None:
            self._single.end()
            return
        self._ended.append(self._claims[id(job)])

    def abort(self, job: T) -> None:
        """Return ``job`` to the queue (offered again once the batch ends; at once on Q4M)."""
        self._take(job)
        if self._single is not None:
            self._single.abort()

    def holds(self, job: T) -> bool:
        """True while ``job`` is a pending job of this batch (neither ended nor aborted)."""
        return self._state == "owning" and id(job) in self._pending

    def subscription_of(self, job: T) -> Subscription:
        """The subscription (table) ``job`` was claimed from."""
        if id(job) not in self._pending:
            raise NotOwner(f"{job!r} is not a pending job of this batch")
        return self._subs[id(job)]

    def give_back(self) -> None:
        """Roll the batch back: every job returns to the queue, the ended ones too (what a
        crash does), and the batch's own writes are undone.  Safe to call twice."""
        if self._state == "owning":
            self._finish(commit=False)
        else:
            self._release()

    def handle(self, job: T) -> _Handling[T]:
        """A context manager that ends ``job`` when its block exits normally and aborts it on
        an exception, which is re-raised (:class:`~sqlalchemy_q4m.exc.QueueAbort` is
        swallowed)."""
        return _Handling(self, job)

    def close(self) -> None:
        """Commit the completed jobs and return the others; safe to call twice."""
        if self._state == "owning":
            self._finish(commit=True)
        else:
            self._release()

    def __iter__(self) -> Iterator[T]:
        return iter(list(self.jobs))

    def __len__(self) -> int:
        return len(self.jobs)

    def __enter__(self) -> QueueBatch[T]:
        self.wait()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if self._state != "owning":
            self._release()
            return isinstance(exc, QueueAbort)
        if exc is None:
            self._finish(commit=True)
            return False
        try:
            self._finish(commit=True)
        except Exception as finish_error:
            exc.add_note(f"sqlalchemy-q4m: committing the batch failed too: {finish_error!r}")
        return isinstance(exc, QueueAbort)

    # -- internals ---------------------------------------------------------------------------

    def _resolve(self) -> BackendName:
        return resolve_backend(self.bind, self._backend_name, remembered=False)

    def _take(self, job: T) -> None:
        if self._state != "owning":
            raise NotOwner("the batch is finished")
        if id(job) not in self._pending:
            raise NotOwner(f"{job!r} is not a pending job of this batch")
        self._pending.discard(id(job))

    def _wait_native(self) -> list[T]:
        single: QueueSession[T] = QueueSession(
            *self.targets,
            bind=self.bind,
            where=self.where,
            timeout=self.timeout,
            backend="native",
            poll_interval=self.poll_interval,
        )
        single.accept_unloadable = self.accept_unloadable
        job = single.wait()
        if job is None:
            return []
        self._single = single
        self._subs[id(job)] = single.subscription or self.subscriptions[0]
        self._pending.add(id(job))
        return [job]

    def _wait_portable(self) -> list[T]:
        """Pin the connection and claim on the lifecycle's schedule (see
        :mod:`~sqlalchemy_q4m.consumer.lifecycle`), as a queue session waits."""
        bind = self.bind
        backend = get_backend("portable")
        if isinstance(bind, Engine):
            conn = bind.connect().execution_options(isolation_level="READ COMMITTED")
            self._conn = conn
        else:
            conn = bind
        self._owner_info = take_connection(conn, self)  # refused if it owns a job already
        self._began = not conn.in_transaction()
        if not self._began:
            backend.check_open_transaction(conn)  # no gap locks: refused in REPEATABLE READ
        sets_isolation = backend.sets_isolation(conn)
        self._pinned = conn
        life = Lifecycle(self.timeout, self.poll_interval)
        listening = self._began and listening_supported(conn.dialect)
        action = life.start(
            time.monotonic(), blocking=False, listen=self.listen if listening else None
        )
        while True:
            step = action.step
            if step is Step.CLAIM:
                if sets_isolation and not conn.in_transaction():
                    with translate_errors("beginning a batch claim"):
                        backend.begin_claim(conn)  # the transaction we begin: no gap locks
                jobs = self._claim(backend, conn)
                if jobs:
                    life.claimed()
                    return jobs
                action = life.missed(time.monotonic())
            elif step is Step.GIVE_UP:
                life.gave_up()
                return []
            else:
                if step is Step.LISTEN:
                    if listen_wait(conn, self.subscriptions, action.seconds):
                        conn.rollback()  # the wait's guard may hold a row lock
                else:
                    time.sleep(action.seconds)
                action = life.paused(time.monotonic())

    def _claim(self, backend: Backend, conn: Connection) -> list[T]:
        jobs: list[T] = []
        for sub in self.subscriptions:
            want = self.size - len(jobs)
            if want <= 0:
                break
            try:
                claims = backend.claim_many(self, sub, want)
            except OperationalError as err:
                if not is_conflict(err) or jobs:
                    raise
                if not self._began:
                    # the caller's transaction: rolling it back would silently undo the
                    # caller's own writes; raised, as queue_session does, for the caller to
                    # retry (nothing of the batch is held, so the connection stays usable)
                    self._intact = True
                    raise
                conn.rollback()  # a deadlock before anything is held: try at the next poll
                return []
            for claim in claims:
                job = claim.job
                if isinstance(job, Unloadable) and not self.accept_unloadable:
                    raise job.exception() from job.error  # the batch returns to the queue
                self._subs[id(job)], self._claims[id(job)] = claim.subscription, claim
                self._pending.add(id(job))
                jobs.append(job)
        return jobs

    # -- what a backend needs of its holder (see backends.base.Holder) ---------------------

    @property
    def connection(self) -> Connection:
        """The pinned connection holding the batch's rows."""
        if self._pinned is None:
            raise NotOwner("the batch has not claimed yet, or is finished")
        return self._pinned

    @property
    def in_session(self) -> bool:
        """False: a batch loads its jobs in a session of its own (made on first use)."""
        return False

    def restart(self) -> bool:
        """False: a batch claims without retrying (see :meth:`_claim`)."""
        return False

    def _finish(self, *, commit: bool) -> None:
        """Delete the completed jobs and commit (or roll back); everything else returns."""
        if self._single is not None:
            try:
                if self._single.owning:
                    self._single.abort()
            finally:
                self._single.close()
                self._state = "done"
            return
        conn = self._pinned
        ok = False
        try:
            if conn is not None:
                if commit:
                    self._complete(conn)
                if self._began or self._conn is not None:
                    if commit:
                        with translate_errors("committing a batch"):
                            conn.commit()
                    elif conn.in_transaction():
                        conn.rollback()
            ok = True
        finally:
            self._state = "done"
            self._pending.clear()
            self._release(broken=not ok)

    def _complete(self, conn: Connection) -> None:
        """The batch's own writes, then the backend removes the ended jobs (see
        :meth:`~sqlalchemy_q4m.backends.portable.PortableBackend.end_many`)."""
        try:
            with translate_errors("completing a batch"):
                session = self._session
                if session is not None and (session.new or session.dirty or session.deleted):
                    session.flush()  # they commit with the removal
                get_backend("portable").end_many(conn, self._ended)
        except OperationalError as err:
            code = error_code(err)
            if code not in RETRYABLE:
                raise
            if conn.in_transaction():
                conn.rollback()
            raise CompletionFailed(
                f"batch of {len(self._ended)} job(s) not completed (MySQL error {code}): the "
                "transaction was rolled back, so every job of the batch will run again"
            ) from err

    def released(self, what: str) -> None:
        """The connection's transaction ended while the batch holds jobs: nothing to stop
        here (a batch's jobs all come back with it; see the module docstring)."""

    def _release(self, *, broken: bool = False) -> None:
        self._state = "done"
        give_up_connection(self._owner_info, self)
        self._owner_info = None
        conn, session = self._conn, self._session
        if broken and self._pinned is not None and not self._pinned.invalidated:
            self._pinned.invalidate()  # the server returns every row the batch held
        try:
            if session is not None:
                session.close()
        except DBAPIError:  # pragma: no cover - the connection is gone already
            pass
        finally:
            if conn is not None:
                conn.close()
            self._conn = self._pinned = None


class _Handling(Generic[T]):
    """What :meth:`QueueBatch.handle` returns (a class, not a generator: it runs per job)."""

    __slots__ = ("batch", "job")

    def __init__(self, batch: QueueBatch[T], job: T) -> None:
        self.batch, self.job = batch, job

    def __enter__(self) -> T:
        return self.job

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if exc is None:
            self.batch.end(self.job)
            return False
        self.batch.abort(self.job)
        return isinstance(exc, QueueAbort)


def queue_batch(
    *targets: Any,
    bind: Engine | Connection,
    size: int = 100,
    where: Where = None,
    timeout: float | None = 60.0,
    backend: Literal["native", "portable", "auto"] | None = None,
    poll_interval: float = POLL_INTERVAL,
    listen: float | None = None,
) -> QueueBatch[Any]:
    """Claim up to ``size`` jobs of ``targets`` in one transaction (one job on Q4M).

    Use it in a ``with`` block, which yields the :class:`QueueBatch`; iterate it for the jobs
    and finish each with :meth:`~QueueBatch.handle`, :meth:`~QueueBatch.end` or
    :meth:`~QueueBatch.abort`.
    """
    return QueueBatch(
        *targets,
        bind=bind,
        size=size,
        where=where,
        timeout=timeout,
        backend=backend,
        poll_interval=poll_interval,
        listen=listen,
    )
