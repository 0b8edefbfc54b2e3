"""The steps of one job's life with I/O, shared by the synchronous and the asyncio drivers:
get the job object ready for ``execute``, then end, return, retry or bury it as
:func:`~sqlalchemy_q4m.worker.policy.settle` decides.  The asyncio driver runs these same
steps through SQLAlchemy's greenlet bridge; only ``execute`` differs."""

from __future__ import annotations

import logging
import time
import traceback
from typing import Any

from sqlalchemy import insert
from sqlalchemy.exc import DBAPIError

from ..backends.rows import Unloadable
from ..backends.unique_keys import key_moved
from ..exc import ConnectionLost
from ..schema.ddl import JOB_ID
from ..schema.retry import ATTEMPTS
from ..schema.retry import RUN_AT
from ..types import new_job_id
from .connection import ConsumerBase
from .deadletter import bury
from .deadletter import dead_letter_table
from .jobrun import JobLog
from .jobrun import JobRun
from .jobrun import Owner
from .jobrun import describe
from .policy import Aborted
from .policy import Bury
from .policy import Done
from .policy import Outcome
from .policy import Retry
from .policy import attempts_allowed
from .policy import settle

__all__ = ["JobSteps"]

logger = logging.getLogger("sqlalchemy_q4m.worker")


class JobSteps(ConsumerBase):
    """The per-job steps of a consumer (see the module docstring)."""

    @staticmethod
    def _give_back(qs: Owner) -> None:
        """Return a job still owned after a failure (or a cancellation) on the way."""
        if qs.owning:
            try:
                qs.close()
            except Exception:  # the connection is gone: the server returns the job
                logger.debug("returning a job failed", exc_info=True)

    def _before_execute(self, qs: Owner, item: Any) -> JobRun:
        """Get the job object ready for ``execute``: its id, attempts and logger, the job
        ended first (``end_before_execute``), a savepoint for its writes on InnoDB."""
        sub = qs.subscription
        assert sub is not None
        t = self._by_table[sub.table]
        job_id, attempts = t.identify(item)
        job = t.job
        log = JobLog(job.logger, {"q4m_table": t.table.name, "q4m_job_id": job_id})
        self._in_hand, self._in_hand_since = (t.table.name, job_id), time.time()
        ended = bool(job.end_before_execute)
        run = JobRun(t, qs, item, item, attempts, log, ended)
        if t.row_type is not None:
            values = run.values
            run.arg = t.row_type(*(values[n] for n in t.payload_names))
        if ended:
            qs.end()
        job.job_id, job.attempts, job.log = job_id, attempts, log
        job._run = run
        job._abort_requested = False
        return run

    def _after_execute(self, qs: Owner, run: JobRun) -> Outcome:
        """End, return, retry or bury the job as ``execute`` ended (:func:`.policy.settle`
        decides; this performs it)."""
        log, nested, ended = run.log, run.nested, run.ended
        if not ended and self._connection_lost():
            # execute (or the server) lost the pinned connection: the server has returned the
            # job and the transaction is gone, so there is nothing to end, retry or bury here
            error = run.error
            cause = f": {describe(error)}" if error is not None else ""
            raise ConnectionLost(f"connection lost while running the job{cause}") from error
        if run.error is None and not run.aborted and run.used_session and not ended:
            self._keep_writes(qs, run)  # a failure here is the job's own
        policy, can_retry = run.job.policy, run.target.can_retry
        error = run.error
        decision = settle(
            policy,
            run.attempts,
            failed=error is not None,
            aborted=run.aborted,
            ended=ended,
            can_retry=can_retry,
        )
        if isinstance(decision, Aborted):  # the job's writes go back with it
            if nested is not None:
                nested.rollback()
            elif decision.give_back and run.used_session:
                qs.session.rollback()  # Q4M: the job's writes
            if decision.give_back:
                qs.abort()
                log.info("aborted after %.3fs: returned to the queue", run.elapsed)
            else:
                log.warning("queue_abort() after end_before_execute: the job is gone")
            return "aborted"
        if isinstance(decision, Done):
            if decision.end:
                qs.end()
            if log.logger.isEnabledFor(logging.INFO):  # one call, not four, when it is off
                log.info("done in %.3fs", run.elapsed)
            return "done"
        assert error is not None
        if nested is not None:
            if qs.session.get_nested_transaction() is nested:  # also after a failed flush
                nested.rollback()
        elif not ended and run.used_session:
            qs.session.rollback()  # Q4M: the job's writes
        log.error(
            "failed on attempt %d/%d after %.3fs: %s\n%s",
            run.attempts + 1,
            attempts_allowed(policy, ended=ended, can_retry=can_retry),
            run.elapsed,
            describe(error),
            run.details.rstrip(),
        )
        return self._after_failure(qs, run, decision, error)

    def _bury_unloadable(self, qs: Owner, row: Unloadable) -> Outcome:
        """A claimed row that cannot be loaded as a job (a malformed id, a value its column
        type cannot read) can never run: it goes to the dead letters with its values as the
        driver returned them and is removed, instead of failing every claim of the queue's
        head.  As for any burial, on Q4M the dead letter is committed before the end."""
        sub = qs.subscription
        assert sub is not None
        t = self._by_table[sub.table]
        job_id = row.values.get(JOB_ID)
        log = JobLog(t.job.logger, {"q4m_table": t.table.name, "q4m_job_id": job_id})
        try:
            attempts = int(row.values.get(ATTEMPTS) or 0) + 1
        except (TypeError, ValueError):
            attempts = 1
        dead = dead_letter_table(t.job.dead_letter_table)
        conn = qs.connection
        bury(
            conn,
            dead,
            queue=t.table.name,
            values=row.values,
            error=f"cannot be loaded: {describe(row.error)}",
            traceback=row.details,
            attempts=attempts,
        )
        backend = qs.backend
        if backend is not None and backend.name == "native":
            conn.commit()
        qs.end()
        log.error(
            "cannot be loaded (%s): moved to %s with its values as read: %r",
            describe(row.error),
            dead.name,
            row.values,
        )
        return "dead"

    def _keep_writes(self, qs: Owner, run: JobRun) -> None:
        """Flush what ``execute`` wrote through ``self.session`` (on InnoDB: release its
        savepoint) before the job is ended.  An error there is the job's own failure (a
        constraint it broke, an UPDATE Q4M refuses, a session its own error handling left
        unusable): recorded as its error, so it is retried and dead-lettered by the policy
        instead of being taken for a lost connection and run again forever.  A lost
        connection is raised."""
        try:
            if run.nested is not None:
                run.nested.commit()
            else:
                qs.session.flush()  # returns at once when it holds nothing to write
        except Exception as err:
            if self._connection_lost() or (
                isinstance(err, DBAPIError) and err.connection_invalidated
            ):
                raise
            run.error, run.details = err, "".join(traceback.format_exception(err))

    def _after_failure(
        self, qs: Owner, run: JobRun, decision: Retry | Bury, error: BaseException
    ) -> Outcome:
        t, log = run.target, run.log
        if isinstance(decision, Retry):
            copy = dict(run.values)
            copy[JOB_ID] = new_job_id()
            copy[ATTEMPTS] = decision.attempts
            copy[RUN_AT] = decision.run_at
            qs.session.execute(insert(t.table).values(copy))
            key_moved(qs.session.connection(), t.table, run.values.get(JOB_ID), copy[JOB_ID])
            self._end_after_write(qs)
            log.warning(
                "retry %d/%d in %ds as %s",
                decision.attempts + 1,
                t.job.policy.max_attempts,
                decision.delay,
                copy[JOB_ID],
            )
            return "retried"
        dead = dead_letter_table(t.job.dead_letter_table)
        record: dict[str, Any] = {
            "queue": t.table.name,
            "values": run.values,
            "error": describe(error),
            "traceback": run.details,
            "attempts": decision.attempts,
        }
        if run.ended:
            conn = self.connect()
            bury(conn, dead, **record)
            conn.commit()
        else:
            bury(qs.session.connection(), dead, **record)
            self._end_after_write(qs)
        log.error("dead after %d attempt(s): moved to %s", decision.attempts, dead.name)
        return "dead"

    def _connection_lost(self) -> bool:
        """True when the pinned connection was invalidated (a disconnect was seen on it)."""
        conn = self._conn
        return conn is not None and conn.invalidated

    @staticmethod
    def _end_after_write(qs: Owner) -> None:
        """End the job after writes made in its session: on InnoDB in the same transaction;
        on Q4M (no transactions) the writes are committed first, so a crash in between
        runs the job again rather than losing the writes (at least once)."""
        backend = qs.backend
        if backend is not None and backend.name == "native":
            qs.session.commit()
        qs.end()
