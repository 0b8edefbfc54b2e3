"""Exceptions raised by sqlalchemy-q4m.

Every error the library raises on purpose derives from :class:`Q4MError`; each class's
docstring is its default message.  :class:`QueueAbort` is not an error: raise it inside a
``queue_session`` block to hand the job back to the queue without propagating anything.
"""

from __future__ import annotations

__all__ = [
    "AlreadyOwning",
    "BackendError",
    "CompletionFailed",
    "ConnectionLost",
    "JobInUse",
    "NotOwner",
    "OptionError",
    "OwnershipReleased",
    "Q4MError",
    "QueueAbort",
    "QueueTableError",
    "QueueWaitError",
    "RowError",
    "SubscriptionError",
    "UnloadableJob",
    "UnsafeBind",
    "UnsupportedServer",
]


class Q4MError(Exception):
    """A sqlalchemy-q4m error."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (type(self).__doc__ or "").strip())


class QueueTableError(Q4MError, ValueError):
    """This table declaration cannot be held by a queue table."""


class SubscriptionError(Q4MError, ValueError):
    """This subscription cannot be expressed as a Q4M condition."""


class UnsupportedServer(Q4MError):
    """The database server cannot run this queue backend."""


class BackendError(Q4MError, ValueError):
    """Unknown or unusable queue backend."""


class OptionError(Q4MError, ValueError):
    """An option or argument has an unusable value (a number that is NaN, infinite, negative
    or out of range, or a value of the wrong kind)."""


class RowError(Q4MError, ValueError):
    """A job cannot be enqueued: a value does not fit its column, or a column is unknown.

    Raised before anything is sent, so none of the rows was enqueued.  ``row`` is the row's
    1-based number (``enqueue()``'s rows; the command line names its input line instead),
    ``column`` the column's name when one is at fault, ``reason`` the message without its
    ``row N:`` prefix.
    """

    def __init__(
        self, reason: str, *, row: int, column: str | None = None, where: str | None = None
    ) -> None:
        super().__init__(f"{where or f'row {row}'}: {reason}")
        self.reason = reason
        self.row = row
        self.column = column


class QueueWaitError(Q4MError):
    """queue_wait() returned NULL: unknown table, not a QUEUE table, or a bad condition."""


class NotOwner(Q4MError, RuntimeError):
    """This queue session does not own a job (it timed out, or the job was already finished)."""


class AlreadyOwning(Q4MError, RuntimeError):
    """This connection already owns a job (a queue_session or queue_batch on it has not
    finished): one connection owns one job at a time, so a second owner needs its own
    connection."""


class OwnershipReleased(Q4MError, RuntimeError):
    """The transaction holding the owned job was committed, rolled back or closed inside the
    block, which would free the job for another consumer: the block fails and the job goes
    back to the queue."""


class UnsafeBind(Q4MError, ValueError):
    """This bind cannot own a job safely as it is (see the message for how to fix it)."""


class ConnectionLost(Q4MError):
    """The connection to the server was lost; the server returns an owned job to the queue."""


class CompletionFailed(Q4MError):
    """The job could not be marked done; the server returned it to the queue, it will run again."""


class UnloadableJob(Q4MError):
    """A claimed row cannot be loaded as a job (a value its column type cannot read, such as
    a malformed job id); the row was returned to the queue.  Workers dead-letter such rows."""


class QueueAbort(Exception):
    """Raise inside a queue session to return the job to the queue; the session swallows it."""


class JobInUse(Q4MError, RuntimeError):
    """This Job object is running already (in another thread): use one Job object per thread."""
