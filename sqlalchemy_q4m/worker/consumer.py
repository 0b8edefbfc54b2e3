"""The consumer loop under the job class (:mod:`.job`): the synchronous driver.

A :class:`Consumer` owns one pinned connection and serves one or more job classes; their tables
are waited on in the order given (earlier tables win: priority).  Connections are never shared:
each consumer checks out its own and keeps it, reconnecting with backoff when the server goes
away (the job it owned is returned by the server, not lost).  One job at a time, each job's
queue session is the next take of a :class:`~sqlalchemy_q4m.consumer.consuming.QueueConsumer`
made once per prepared connection, so the queue session's set-up is not repeated per job.

With ``batch_size = N`` (N > 1) on the portable backend a consumer claims up to N jobs in one
transaction with :func:`~sqlalchemy_q4m.queue_batch` (earlier tables first, filling the
batch from later ones) and runs ``execute`` for each with the same outcomes as one at a time:
a job that returns is ended, one that aborts is returned, one that raises gets its retry copy
or dead letter written in the batch's transaction, and each job's writes through
``self.session`` sit in a savepoint of their own, so a failed or aborted job's writes are
undone while the batch keeps its row locks.  The batch commits once, after its last job; a
crash or a lost connection before that returns *every* job of the batch (the ended ones run
again: at least once, and the window is the batch).  A stop request (the first SIGTERM)
finishes the job in hand and returns the batch's unstarted jobs.  On the native backend (Q4M
owns one row per connection), with ``end_before_execute`` (at most once needs the removal
committed before the job runs) and in the asyncio worker the consumer takes one job at a time
(logged once).

What the loop decides is :mod:`.loop`'s and what happens to a job once ``execute`` ended is
:mod:`.policy`'s (both without I/O); the steps of a job's life are :mod:`.steps`, shared with
the asyncio driver (:mod:`.asyncio`), which performs the same decisions with its I/O awaited.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING
from typing import Any

from sqlalchemy import Connection
from sqlalchemy import Engine

from ..backends.rows import Unloadable
from ..consumer.batch import QueueBatch
from ..consumer.consuming import QueueConsumer
from ..schema.reflect import reflect_queue_table
from ..schema.reflect import table_name_for
from .connection import set_up_consumer
from .jobrun import BatchSlot
from .jobrun import describe
from .loop import LOOP_ERRORS
from .loop import RunLoop
from .policy import Outcome
from .stats import Stats
from .steps import JobSteps

if TYPE_CHECKING:
    from .job import Job

__all__ = [
    "Consumer",
    "Outcome",
    "Stats",
    "consumers_for",
    "reflect_queue_table",
    "table_name_for",
]

logger = logging.getLogger("sqlalchemy_q4m.worker")


class Consumer(JobSteps):
    """One pinned connection serving one or more job objects; see the module docstring.

    ``jobs`` are served in order (their tables too): earlier tables win.  The first job's
    ``wait_timeout``, ``poll_interval``, ``listen``, ``backend``, ``recycle_after``,
    ``reconnect_max`` and ``batch_size`` apply to the consumer.  Its state and connection
    are :class:`~.connection.ConsumerBase`'s, the steps of one job :class:`~.steps.JobSteps`'
    (shared with the asyncio consumer); here: the wait for a job or a batch, and the loop.
    """

    # -- one job ----------------------------------------------------------------------------
    # The async consumer shares every step here and only awaits them: the waits (_slices)
    # and the queue consumer they take from, the steps before and after execute, and the
    # bookkeeping around a job in hand.

    def run_once(self, timeout: float | None = None) -> bool:
        """Wait for one job of any target and handle it (with ``batch_size`` > 1 on the
        portable backend: one batch); False when none came in time."""
        return self._handle(timeout) > 0

    def _handle(self, timeout: float | None = None, limit: int | None = None) -> int:
        """Wait for one job, or one batch of at most ``limit`` jobs; the number handled."""
        conn = self.connect()
        if self.batch_size > 1:  # (one job at a time, the default, asks nothing more)
            size = self._batch_size()
            if limit is not None:
                size = min(size, limit)
            if size > 1:
                return self._handle_batch(conn, size, timeout)
        consumer = self._queue_consumer  # None after connect() prepared a new connection
        if consumer is None:
            consumer = self._new_consumer(conn)
        for seconds, where in self._slices(timeout):
            qs = consumer.take(timeout=seconds, where=where)
            item = qs.wait()
            if item is None:
                continue
            try:
                with self._holding():
                    if isinstance(item, Unloadable):
                        self._count(self._bury_unloadable(qs, item))
                        return 1
                    run = self._before_execute(qs, item)
                    with run.executing():
                        run.job.execute(run.arg)
                    self._count(self._after_execute(qs, run))
            finally:
                self._give_back(qs)
            return 1
        return 0

    def _new_consumer(self, conn: Connection) -> QueueConsumer[Any]:
        """The queue consumer of ``conn`` (see :func:`.connection.set_up_consumer`)."""
        consumer: QueueConsumer[Any] = set_up_consumer(self, QueueConsumer, conn)
        self._queue_consumer = consumer
        return consumer

    def _batch_size(self) -> int:
        """The jobs to claim at once: ``batch_size`` on the portable backend, else 1 (the
        native backend and ``end_before_execute`` run one job at a time; logged once)."""
        if self.batch_size <= 1:
            return 1
        reason = None
        if self._backend != "portable":
            reason = "the native backend owns one job per connection"
        elif any(job.end_before_execute for job in self.jobs):
            reason = "end_before_execute removes each job before it runs"
        if reason is None:
            return self.batch_size
        self._one_at_a_time(reason)
        return 1

    def _one_at_a_time(self, reason: str) -> None:
        """Log once that ``batch_size`` is not used, and why."""
        if self.batch_size > 1 and not self._batch_noted:
            self._batch_noted = True
            logger.info(
                "[%s] %s: batch_size %d ignored, one job at a time: %s",
                self.name,
                self._label(),
                self.batch_size,
                reason,
            )

    def _handle_batch(self, conn: Connection, size: int, timeout: float | None) -> int:
        """Claim up to ``size`` jobs in one transaction and run each as :meth:`_handle` runs
        one; the batch commits after its last job.  A stop request leaves the unstarted jobs
        to the batch, which returns them; an error returns the whole batch."""
        for targets, options in self._waits(timeout):
            batch: QueueBatch[Any] = QueueBatch(*targets, bind=conn, size=size, **options)
            batch.accept_unloadable = True
            items = batch.wait()
            if not items:
                continue
            logger.debug(
                "[%s] %s: claimed a batch of %d job(s)", self.name, self._label(), len(items)
            )
            handled = 0
            outcomes: list[Outcome] = []  # counted once the batch commits
            try:
                for item in items:
                    if self.stopping:
                        logger.info(
                            "[%s] %s: stopping: %d unstarted job(s) of the batch returned",
                            self.name,
                            self._label(),
                            len(items) - handled,
                        )
                        break
                    slot = BatchSlot(batch, item)
                    with self._holding():
                        if isinstance(item, Unloadable):
                            outcomes.append(self._bury_unloadable(slot, item))
                        else:
                            run = self._before_execute(slot, item)
                            with run.executing():
                                run.job.execute(run.arg)
                            outcomes.append(self._after_execute(slot, run))
                    handled += 1
                batch.close()  # removes the ended jobs, returns the others: one COMMIT
            except BaseException:
                # rolled back: what the batch's handled jobs did is undone and they run again
                # (a deadlocked completion, CompletionFailed, included): counted as lost
                for _ in outcomes:
                    self.stats.add("lost")
                self.lost_job = f"a batch of {len(items)} job(s)"
                try:
                    batch.give_back()
                except Exception:  # the connection is gone: the server returns the batch
                    logger.debug("returning a batch failed", exc_info=True)
                raise
            for outcome in outcomes:
                self._count(outcome)
            return handled
        return 0

    # -- the loop ---------------------------------------------------------------------------
    # What it decides (go on, recycle, back off, stop when drained) is the sans-IO RunLoop;
    # the asyncio consumer drives the same RunLoop with the calls awaited.

    def run(self, *, burst: bool = False, max_jobs: int | None = None) -> None:
        """Handle jobs until stopped; see :meth:`Job.run`."""
        loop = self._run_loop(burst, max_jobs)
        while loop.goes_on(self.stopping):
            if loop.recycle_due(self._since_recycle):
                self.recycle()
            try:
                got = self._handle(limit=loop.limit())
            except LOOP_ERRORS as err:
                delay = self._after_error(loop, err)
                if delay is not None:
                    self._drop_connection()
                    self._stop.wait(delay)
                continue
            self._after_success(loop, got)
            if loop.drained(got) and not self._has_waiting():
                self._log_drained()
                break
        self.close()

    def _run_loop(self, burst: bool, max_jobs: int | None) -> RunLoop:
        return RunLoop(
            max_jobs=max_jobs,
            burst=burst,
            recycle_after=self.recycle_after,
            reconnect_max=self.reconnect_max,
        )

    def _after_success(self, loop: RunLoop, got: int) -> None:
        """Count the turn; log that the database answers again after errors."""
        if loop.succeeded(got):
            logger.warning("[%s] %s: database is back", self.name, self._label())

    def _after_error(self, loop: RunLoop, err: Exception) -> float | None:
        """Log what a turn raised; what :meth:`RunLoop.failed` decided (None: go on at once,
        else the seconds to back off before reconnecting)."""
        delay = loop.failed(err)
        lost, self.lost_job = self.lost_job, None
        if delay is None:
            logger.warning("[%s] %s: %s", self.name, lost or self._label(), err)
            return None
        logger.error(
            "[%s] %s: database error%s: %s; reconnecting in %.1fs",
            self.name,
            self._label(),
            f" with {lost} in hand (the server returns it)" if lost else "",
            describe(err),
            delay,
        )
        return delay

    def _log_drained(self) -> None:
        logger.info("[%s] %s: queue empty, stopping (burst)", self.name, self._label())

    def recycle(self) -> None:
        """Drop the connection and make fresh job objects (``recycle_after``)."""
        logger.info("[%s] recycling after %d jobs", self.name, self._since_recycle)
        self._drop_connection()
        self.jobs = [job._renewed() for job in self.jobs]
        self._targets = None
        self._ready = False
        self._since_recycle = 0


def consumers_for(
    classes: Iterable[type[Job]],
    bind: Engine | Connection,
    *,
    stats: Stats | None = None,
    name: str = "worker",
    **options: Any,
) -> Consumer:
    """One consumer serving instances of ``classes`` (tables in the order given)."""
    return Consumer([cls(bind, **options) for cls in classes], bind, stats=stats, name=name)
