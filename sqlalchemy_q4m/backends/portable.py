"""The portable backend: InnoDB and ``SELECT ... FOR UPDATE SKIP LOCKED``.

Owning a job = holding its row lock in an open transaction on a pinned connection.  End =
``DELETE`` + ``COMMIT``; abort = ``ROLLBACK``; a connection that dies rolls back, so its job
returns, as on Q4M.  Claims skip rows other owners hold, oldest job id first (ids are
time-ordered), honouring the subscription's condition as a plain WHERE clause.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from typing import Any
from typing import ClassVar

from sqlalchemy import Connection
from sqlalchemy import Delete
from sqlalchemy import Select
from sqlalchemy import Table
from sqlalchemy import bindparam
from sqlalchemy import delete
from sqlalchemy import inspect
from sqlalchemy import select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from ..exc import CompletionFailed
from ..exc import QueueTableError
from ..functions import Subscription
from ..server import BackendName
from .base import LOCK_WAIT_TIMEOUT
from .base import RETRYABLE
from .base import Backend
from .base import Claim
from .base import error_code
from .base import translate_errors as _translate

__all__ = ["PortableBackend", "claim_statement", "execute_completion"]

#: How often a claim or a completion is tried again after a deadlock or lock-wait timeout.
RETRIES = 5


#: Claim (unconditional, one job) and completion statements, built once per target / table:
#: building them per job cost more CPU than SQLAlchemy's compiled cache saves.
_CLAIMS: dict[Any, Select[Any]] = {}
_DELETES: dict[Table, Delete] = {}
_JOB_KEY = "q4m_job_key"


def claim_statement(sub: Subscription, limit: int = 1) -> Select[Any]:
    """``SELECT ... WHERE cond ORDER BY id LIMIT n FOR UPDATE SKIP LOCKED`` for ``sub``; a
    column marked ``info["q4m_priority"]`` (``PriorityMixin``) orders first, highest first."""
    if sub.where is None and limit == 1:
        cached = _CLAIMS.get(sub.target)
        if cached is None:
            cached = _CLAIMS[sub.target] = _build_claim(sub, 1)
        return cached
    return _build_claim(sub, limit)


def _build_claim(sub: Subscription, limit: int) -> Select[Any]:
    stmt = select(sub.target)
    if sub.where is not None:
        stmt = stmt.where(sub.where)
    first = [c.desc() for c in sub.table.columns if c.info.get("q4m_priority")]
    return (
        stmt.order_by(*first, *sub.table.primary_key.columns)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )


def _pause(attempt: int) -> None:
    time.sleep(random.uniform(0, 0.005 * 2**attempt))


def execute_completion(conn: Connection, stmt: Delete, params: dict[str, Any]) -> None:
    """Run a completion ``DELETE``; a lock-wait timeout undoes only the statement (our row
    locks stay), so it is tried again.  A deadlock rolls the whole transaction back: raised."""
    for attempt in range(RETRIES + 1):
        try:
            conn.execute(stmt, params)
            return
        except OperationalError as err:
            if error_code(err) != LOCK_WAIT_TIMEOUT or attempt == RETRIES:
                raise
            _pause(attempt)


class PortableBackend(Backend):
    name: ClassVar[BackendName] = "portable"
    blocking: ClassVar[bool] = False

    def attempt(
        self, session: Session, subs: Sequence[Subscription], timeout: float
    ) -> Claim | None:
        for sub in subs:
            job = self._claim_one(session, sub)
            if job is not None:
                return Claim(sub, job)
        return None

    def _claim_one(self, session: Session, sub: Subscription) -> Any:
        if not sub.table.primary_key.columns:
            raise QueueTableError(
                f"queue table {sub.name!r} has no job id: the portable backend needs a key to "
                "own and delete one job; declare it with QueueMixin or queue_table()"
            )
        stmt = claim_statement(sub)
        for attempt in range(RETRIES + 1):
            began = not session.in_transaction()
            try:
                with _translate("claiming a job"):
                    return self.load(session, sub, stmt)
            except OperationalError as err:
                if error_code(err) not in RETRYABLE or not began or attempt == RETRIES:
                    raise
                session.rollback()
                _pause(attempt)
        return None  # pragma: no cover - the loop returns or raises

    def end(self, session: Session, claim: Claim) -> None:
        sub = claim.subscription
        try:
            with _translate("completing a job"):
                if session.new or session.deleted or session.dirty:
                    session.flush()  # the block's own writes first: they commit with them
                self._delete(session, claim)
                session.commit()
        except OperationalError as err:
            code = error_code(err)
            if code not in RETRYABLE:
                raise
            session.rollback()
            raise CompletionFailed(
                f"job in {sub.name!r} not completed (MySQL error {code}): the transaction "
                "was rolled back, so the job is back in the queue and will run again"
            ) from err
        if sub.is_orm and claim.job in session:
            session.expunge(claim.job)

    @staticmethod
    def _delete(session: Session, claim: Claim) -> None:
        """``DELETE ... WHERE id = :id``; a lock-wait timeout undoes only this statement (the
        row lock stays ours), so it is tried again."""
        table = claim.subscription.table
        key: Sequence[Any]
        values: Sequence[Any]
        if claim.subscription.is_orm:
            state = inspect(claim.job)
            key, values = state.mapper.primary_key, state.identity or ()
        else:
            key = list(table.primary_key.columns)
            values = [claim.job._mapping[c] for c in key]
        params: dict[str, Any] = {}
        if len(key) == 1 and key[0].table is table:
            stmt = _DELETES.get(table)
            if stmt is None:
                stmt = _DELETES[table] = delete(table).where(key[0] == bindparam(_JOB_KEY))
            params = {_JOB_KEY: next(iter(values))}
        else:
            stmt = delete(table).where(*(c == v for c, v in zip(key, values, strict=True)))
        # On the session's connection, in its transaction: the ORM execute path (events,
        # autoflush, compile-state plugins) costs more CPU than the DELETE's round trip.
        execute_completion(session.connection(), stmt, params)

    def abort(self, session: Session, claim: Claim) -> None:
        with _translate("returning a job"):
            session.rollback()
