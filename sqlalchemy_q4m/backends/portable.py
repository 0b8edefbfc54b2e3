"""The portable backend: InnoDB and ``SELECT ... FOR UPDATE SKIP LOCKED``.

Owning a job = holding its row lock in an open transaction on a pinned connection.  End =
``DELETE`` + ``COMMIT``; abort = ``ROLLBACK``; a connection that dies rolls back, so its job
returns, as on Q4M.  Claims skip rows other owners hold, oldest job id first (ids are
time-ordered), honouring the subscription's condition as a plain WHERE clause.  The queue
session commits or rolls back; this module runs the claim and the ``DELETE``.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from collections.abc import Sequence
from functools import partial
from typing import ClassVar
from typing import TypeVar

from sqlalchemy import Connection
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import OperationalError

from ..exc import UnsafeBind
from ..schema.functions import Subscription
from ..server import BackendName
from .base import LOCK_WAIT_TIMEOUT
from .base import QUERY_INTERRUPTED
from .base import RETRYABLE
from .base import Backend
from .base import Claim
from .base import Holder
from .base import error_code
from .base import raise_if_lost
from .base import translate_errors
from .loading import claim_statement
from .loading import loader_for
from .unique_keys import ended_many
from .unique_keys import key_ended

__all__ = [
    "PortableBackend",
    "begin_read_committed",
    "check_isolation",
    "claim_statement",
    "retry_lock_wait",
]

#: How often a claim or a completion is tried again after a deadlock or lock-wait timeout.
RETRIES = 5

R = TypeVar("R")

#: Isolation levels whose locking reads take gap locks (InnoDB): an idle consumer's claim would
#: lock the gap at the end of the table, and every producer's INSERT would wait for it.
GAP_LOCKING = frozenset({"REPEATABLE READ", "SERIALIZABLE"})
#: Isolation levels a claim may run in as they are (no gap locks).
READ_COMMITTED_LEVELS = frozenset({"READ COMMITTED", "READ UNCOMMITTED"})

_SET_READ_COMMITTED = text("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")


def begin_read_committed(conn: Connection) -> None:
    """Make the transaction about to begin on ``conn`` READ COMMITTED (``SET TRANSACTION``
    applies to the next transaction only, so the caller's connection keeps its own level)."""
    conn.execute(_SET_READ_COMMITTED)


def check_isolation(conn: Connection) -> None:
    """Refuse to claim in the caller's open transaction when its isolation level takes gap
    locks (:class:`UnsafeBind`, saying how to fix it)."""
    level = conn.get_execution_options().get("isolation_level")
    if level is None:
        level = conn.get_isolation_level()
    if str(level).upper() in GAP_LOCKING:
        raise UnsafeBind(
            f"the transaction open on this connection is {level}: a claim in it would take a "
            "gap lock at the end of the queue table and stall every producer's INSERT.  Let "
            "the queue session begin the transaction (commit or roll back first), or open it "
            'in READ COMMITTED: conn.execution_options(isolation_level="READ COMMITTED") '
            "before it begins"
        )


def _pause(attempt: int) -> None:
    time.sleep(random.uniform(0, 0.005 * 2**attempt))


def retry_lock_wait(statement: Callable[[], R]) -> R:
    """Run a completion statement; a lock-wait timeout undoes only the statement (our row
    locks stay), so it is tried again.  A deadlock rolls the whole transaction back: raised."""
    for attempt in range(RETRIES + 1):
        try:
            return statement()
        except OperationalError as err:
            if error_code(err) != LOCK_WAIT_TIMEOUT or attempt == RETRIES:
                raise
            _pause(attempt)
    raise AssertionError("unreachable")  # pragma: no cover


def _remove(conn: Connection, claim: Claim) -> None:
    """The job's ``DELETE`` and its unique key's (if its queue has keys).  Tried again whole
    after a lock-wait timeout: deleting a row this transaction deleted already is a no-op."""
    claim.loader.delete(conn, claim.key, claim.unobserved)
    key_ended(conn, claim.subscription.table, claim.key)


class PortableBackend(Backend):
    name: ClassVar[BackendName] = "portable"
    blocking: ClassVar[bool] = False

    def attempt(self, holder: Holder, subs: Sequence[Subscription], timeout: float) -> Claim | None:
        conn = holder.connection
        unobserved = holder.unobserved
        for sub in subs:
            loader = loader_for(sub, conn.dialect)
            for attempt in range(RETRIES + 1):
                try:
                    found = loader.claim(
                        conn, sub, 1, lambda: holder.session, holder.in_session, unobserved
                    )
                    break
                except OperationalError as err:
                    raise_if_lost(err, "claiming a job")
                    code = error_code(err)
                    if (code not in RETRYABLE and code != QUERY_INTERRUPTED) or attempt == RETRIES:
                        raise
                    if not holder.restart():  # the caller's transaction: theirs to retry
                        raise
                    _pause(attempt)
                except DBAPIError as err:
                    raise_if_lost(err, "claiming a job")
                    raise
            if found:
                job, key = found[0]
                return Claim(sub, job, key, loader, unobserved)
        return None

    def end(self, conn: Connection, claim: Claim) -> None:
        """The ``DELETE``; the queue session commits (and translates a lost connection)."""
        retry_lock_wait(partial(_remove, conn, claim))

    def abort(self, conn: Connection, claim: Claim) -> None:
        """Nothing to send: the queue session's ROLLBACK returns the job."""

    def claim_many(self, holder: Holder, sub: Subscription, limit: int) -> list[Claim]:
        """One ``SELECT ... LIMIT limit FOR UPDATE SKIP LOCKED``: the rows stay locked in the
        holder's transaction."""
        conn = holder.connection
        loader = loader_for(sub, conn.dialect)
        with translate_errors("claiming a batch"):
            found = loader.claim(conn, sub, limit, lambda: holder.session)
        return [Claim(sub, job, key, loader) for job, key in found]

    def end_many(self, conn: Connection, claims: Sequence[Claim]) -> None:
        """One ``executemany`` of ``DELETE ... WHERE id = ?`` per subscription
        (:meth:`~sqlalchemy_q4m.backends.loading.Loader.delete_many`); the caller commits.

        An equality on the whole primary key is always a unique-key lookup of a row this
        transaction has locked already, so it waits for nobody and cannot deadlock.  A
        ``DELETE ... WHERE id IN (...)`` was cheaper in round trips, but on a small table (below
        about 2,000 rows on MariaDB 10.11) the optimizer scans it, locking rows other batches
        own: 4 consumers of 200-job batches on a busy 600-row table lost 35% of their batches
        to deadlocks there (measured with ``tests/batch_contention.py``), and every job of a
        lost batch runs again."""
        by_sub: dict[int, list[Claim]] = {}
        for claim in claims:
            by_sub.setdefault(id(claim.subscription), []).append(claim)
        for group in by_sub.values():
            first = group[0]
            keys = [claim.key for claim in group]
            retry_lock_wait(partial(first.loader.delete_many, conn, keys))
            retry_lock_wait(partial(ended_many, conn, first.subscription.table, keys))

    def abort_many(self, conn: Connection, claims: Sequence[Claim]) -> None:
        """Nothing to send: the caller's ROLLBACK returns the jobs."""

    def check_open_transaction(self, conn: Connection) -> None:
        check_isolation(conn)

    def sets_isolation(self, conn: Connection) -> bool:
        level = conn.get_execution_options().get("isolation_level")
        return level not in READ_COMMITTED_LEVELS

    def begin_claim(self, conn: Connection) -> None:
        begin_read_committed(conn)
