"""A caller releasing the job inside the block: ending the transaction that holds a
portable claim, or handing the connection back to the pool, raises
:class:`~sqlalchemy_q4m.exc.OwnershipReleased` instead of freeing the job for another consumer
while the block still runs it.

:class:`OwnershipWatch` is the part of the queue session that the connection's owner record
(:func:`~sqlalchemy_q4m.backends.base.take_connection`) and its ORM sessions' ``before_commit``
tell; see :mod:`~sqlalchemy_q4m.consumer.session`.
"""

from __future__ import annotations

import weakref
from abc import abstractmethod

from sqlalchemy import event
from sqlalchemy.orm import Session

from ..backends.base import give_up_connection
from ..backends.base import take_connection
from ..exc import OwnershipReleased
from ..schema.functions import Subscription
from .binding import Pin

__all__ = ["OwnershipWatch"]

#: ORM sessions with the library's ``before_commit`` listener (added once per session: adding
#: and removing one per job cost more than the rest of the guard), and the queue session
#: guarding each now (one at most: a session's connection owns one job).
_hooked: weakref.WeakSet[Session] = weakref.WeakSet()
_guards: weakref.WeakKeyDictionary[Session, OwnershipWatch] = weakref.WeakKeyDictionary()


def _before_commit(orm: Session) -> None:
    guard = _guards.get(orm)
    if guard is not None:
        guard.before_commit(orm)


class OwnershipWatch(Pin):
    """The pinned connection, watched while it owns a job; the base of the queue session."""

    #: The subscription the owned job came from (set by the queue session).
    subscription: Subscription | None = None

    # class-level defaults, as :class:`Pin`'s
    _finishing = False  # our own commit/rollback: not the caller releasing the job
    _released: str | None = None  # what the caller did to the transaction, if any
    _guarded: tuple[Session, ...] = ()  # ORM sessions whose commit would free the job

    @property
    @abstractmethod
    def owning(self) -> bool:
        """True while a job is owned."""

    def released(self, what: str) -> None:
        """The caller ``what`` (committed, rolled back) the transaction holding the job, or
        its connection was returned to the pool, inside the block: raise, so the block fails
        instead of running on while another consumer may own the job (on the portable
        backend the commit or rollback is stopped before it reaches the server).  On Q4M a
        commit or rollback does not touch the owned row."""
        if self._finishing or not self.owning:  # our own commit first: one test per job
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
            if orm not in _hooked:
                event.listen(orm, "before_commit", _before_commit)
                _hooked.add(orm)
            _guards[orm] = self
            self._guarded += (orm,)

    def before_commit(self, orm: Session) -> None:
        """``orm`` (guarded by this) is about to commit."""
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
            self._begin_claim()
        return True

    def _release(self, *, broken: bool = False) -> None:
        """Hand the connection back (see :meth:`Pin._release`), unwatched."""
        for guarded in self._guarded:
            if _guards.get(guarded) is self:
                del _guards[guarded]
        self._guarded = ()
        super()._release(broken=broken)
