"""The transaction of a portable batch: many claimed rows held on one pinned connection.

:class:`BatchHold` is what :class:`~sqlalchemy_q4m.consumer.batch.QueueBatch` runs on the
portable backend: it pins the connection, claims through the
:class:`~sqlalchemy_q4m.backends.base.Backend` on the
:class:`~sqlalchemy_q4m.consumer.lifecycle.Lifecycle`'s schedule (as a queue session waits),
and at the end has the backend remove the ended jobs before one COMMIT, or rolls everything
back.  It is the backend's holder (connection, ORM session) and the connection's recorded
owner.  On Q4M a batch is one queue session instead (a connection owns one row).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from ..backends import Claim
from ..backends import get_backend
from ..backends.base import RETRYABLE
from ..backends.base import error_code
from ..backends.base import give_up_connection
from ..backends.base import is_conflict
from ..backends.base import take_connection
from ..backends.base import translate_errors
from ..backends.rows import Unloadable
from ..backends.wakeup import listen_wait
from ..backends.wakeup import listening_supported
from ..exc import CompletionFailed
from ..exc import NotOwner
from ..schema.functions import Subscription
from .lifecycle import Lifecycle
from .lifecycle import Step

__all__ = ["BatchHold"]


class BatchHold:
    """Up to ``size`` rows of ``subs`` claimed in one transaction; see the module docstring."""

    #: Statement listeners are looked for per statement (a batch sends few).
    unobserved: bool | None = None

    def __init__(
        self,
        bind: Engine | Connection,
        subs: tuple[Subscription, ...],
        size: int,
        life: Lifecycle,
        listen: float | None,
        accept_unloadable: bool,
    ) -> None:
        self.bind = bind
        self.subscriptions = subs
        self.size = size
        self.life = life
        self.listen = listen
        self.accept_unloadable = accept_unloadable
        self.backend = get_backend("portable")
        self.claims: list[Claim] = []
        self.intact = False  # a failed claim held nothing: the caller's connection is kept
        self._conn: Connection | None = None  # checked out by us: closed by us
        self._pinned: Connection | None = None  # holds the claimed rows' locks
        self._session: Session | None = None  # made on first use
        self._began = False
        self._owner_info: dict[Any, Any] | None = None  # the pinned connection's info

    # -- what the backend needs of its holder (backends.base.Holder) ---------------------------

    @property
    def connection(self) -> Connection:
        """The pinned connection holding the batch's rows."""
        if self._pinned is None:
            raise NotOwner("the batch has not claimed yet, or is finished")
        return self._pinned

    @property
    def session(self) -> Session:
        """The ORM session the jobs were loaded in (made on first use); its writes commit
        with the batch."""
        session = self._session
        if session is None:
            session = Session(bind=self.connection, expire_on_commit=False, autoflush=True)
            self._session = session
            for claim in self.claims:  # built from their rows, detached: persistent in it
                job = claim.job
                if isinstance(job, Unloadable):
                    continue
                if claim.subscription.is_orm and job not in session:
                    session.add(job)
        return session

    @property
    def in_session(self) -> bool:
        """False: a batch loads its jobs in a session of its own."""
        return False

    def restart(self) -> bool:
        """False: a batch claim is not retried by the backend (see :meth:`_claim`)."""
        return False

    def released(self, what: str) -> None:
        """The connection's transaction ended while the batch holds jobs: nothing to stop
        here (a batch's jobs all come back with it; see the batch module's docstring)."""

    # -- the claim ------------------------------------------------------------------------------

    def wait(self) -> list[Claim]:
        """Pin the connection, then claim as the lifecycle schedules it; [] on timeout."""
        bind, backend = self.bind, self.backend
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
        life = self.life
        listen = self.listen if self._began and listening_supported(conn.dialect) else None
        action = life.start(time.monotonic(), blocking=False, listen=listen)
        while True:
            step = action.step
            if step is Step.CLAIM:
                if sets_isolation and not conn.in_transaction():
                    with translate_errors("beginning a batch claim"):
                        backend.begin_claim(conn)  # the transaction we begin: no gap locks
                claims = self._claim(conn)
                if claims:
                    life.claimed()
                    self.claims = claims
                    return claims
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

    def _claim(self, conn: Connection) -> list[Claim]:
        """One claim per subscription, earlier ones first, until ``size`` rows are held."""
        claims: list[Claim] = []
        for sub in self.subscriptions:
            want = self.size - len(claims)
            if want <= 0:
                break
            try:
                found = self.backend.claim_many(self, sub, want)
            except OperationalError as err:
                if not is_conflict(err) or claims:
                    raise
                if not self._began:
                    # the caller's transaction: rolling it back would silently undo the
                    # caller's own writes; raised, as queue_session does, for the caller to
                    # retry (nothing of the batch is held, so the connection stays usable)
                    self.intact = True
                    raise
                conn.rollback()  # a deadlock before anything is held: try at the next poll
                return []
            for claim in found:
                job = claim.job
                if isinstance(job, Unloadable) and not self.accept_unloadable:
                    raise job.exception() from job.error  # the batch returns to the queue
                claims.append(claim)
        return claims

    # -- the end --------------------------------------------------------------------------------

    def finish(self, ended: Sequence[Claim], *, commit: bool) -> None:
        """Remove the ``ended`` jobs and commit (``commit``), or roll everything back; the
        other jobs return to the queue either way.  The connection is released."""
        conn = self._pinned
        ok = False
        try:
            if conn is not None:
                if commit:
                    self._complete(conn, ended)
                else:
                    self.backend.abort_many(conn, self.claims)
                if self._began or self._conn is not None:
                    if commit:
                        with translate_errors("committing a batch"):
                            conn.commit()
                    elif conn.in_transaction():
                        conn.rollback()
            ok = True
        finally:
            self.release(broken=not ok)

    def _complete(self, conn: Connection, ended: Sequence[Claim]) -> None:
        """The batch's own writes, then the backend removes the ended jobs (one
        ``executemany`` of ``DELETE ... WHERE id = ?`` per table on the portable backend)."""
        try:
            with translate_errors("completing a batch"):
                session = self._session
                if session is not None:
                    session.flush()  # they commit with the removal (returns at once if clean)
                self.backend.end_many(conn, ended)
        except OperationalError as err:
            code = error_code(err)
            if code not in RETRYABLE:
                raise
            if conn.in_transaction():
                conn.rollback()
            raise CompletionFailed(
                f"batch of {len(ended)} job(s) not completed (MySQL error {code}): the "
                "transaction was rolled back, so every job of the batch will run again"
            ) from err

    def release(self, *, broken: bool = False) -> None:
        """Hand the connection back; ``broken``: invalidated first, so the server returns
        every row the batch held."""
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
