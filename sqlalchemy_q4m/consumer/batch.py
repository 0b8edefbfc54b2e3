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
  :func:`~sqlalchemy_q4m.notify`); it never waits to fill the batch.
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

This module keeps the batch's bookkeeping (which jobs are pending, ended, aborted); the
portable transaction is :class:`~sqlalchemy_q4m.consumer.holding.BatchHold`, which talks to
the :class:`~sqlalchemy_q4m.backends.base.Backend` only, and on Q4M the one job is a
:class:`~sqlalchemy_q4m.consumer.session.QueueSession`.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import TracebackType
from typing import Any
from typing import Generic
from typing import Literal
from typing import TypeVar

from sqlalchemy import Connection
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from ..backends import Claim
from ..exc import NotOwner
from ..exc import Q4MError
from ..exc import QueueAbort
from ..schema.functions import Subscription
from ..schema.functions import subscriptions
from ..server import BackendName
from .binding import backend_choice
from .binding import resolve_backend
from .holding import BatchHold
from .lifecycle import POLL_INTERVAL
from .lifecycle import Lifecycle
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
    #: :class:`~sqlalchemy_q4m.backends.rows.Unloadable` and dead-letter it.
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
        self._hold: BatchHold | None = None  # the portable backend's transaction
        self._single: QueueSession[T] | None = None  # the native backend's one-job session

    # -- public API -------------------------------------------------------------------------

    @property
    def session(self) -> Session:
        """The ORM session the jobs were loaded in; its writes commit with the batch."""
        if self._single is not None:
            return self._single.session
        if self._hold is None:
            raise NotOwner("the batch has not claimed yet, or is finished")
        return self._hold.session

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
            self._release(broken=self._hold is not None and not self._hold.intact)
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
        life = Lifecycle(self.timeout, self.poll_interval)
        hold = BatchHold(
            self.bind, self.subscriptions, self.size, life, self.listen, self.accept_unloadable
        )
        self._hold = hold
        jobs: list[T] = []
        for claim in hold.wait():
            job = claim.job
            self._subs[id(job)], self._claims[id(job)] = claim.subscription, claim
            self._pending.add(id(job))
            jobs.append(job)
        return jobs

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
        try:
            if self._hold is not None:
                self._hold.finish(self._ended, commit=commit)
        finally:
            self._state = "done"
            self._pending.clear()
            self._release()

    def _release(self, *, broken: bool = False) -> None:
        self._state = "done"
        if self._hold is not None:
            self._hold.release(broken=broken)


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
