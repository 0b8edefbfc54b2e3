"""One job in hand, from its claim to its outcome: :class:`JobRun` (what ``execute`` gets and
how it ended), the thing owning it (:class:`Owner`: a queue session, or a :class:`BatchSlot`
of a claimed batch) and the job's logger."""

from __future__ import annotations

import functools
import logging
import time
import traceback
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING
from typing import Any
from typing import Protocol

from sqlalchemy import Connection
from sqlalchemy.orm import Session
from sqlalchemy.orm import SessionTransaction

from ..backends import get_backend
from ..backends.base import Backend
from ..consumer.batch import QueueBatch
from ..exc import QueueAbort
from ..schema.functions import Subscription
from .deadletter import payload_of
from .targets import Target

if TYPE_CHECKING:
    from .job import Job

__all__ = ["BatchSlot", "JobLog", "JobRun", "Owner", "describe"]


class JobLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """Prefixes every line with the job's table and id: ``shell_jobs 0193...: done``."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        extra = self.extra or {}
        return f"{extra.get('q4m_table')} {extra.get('q4m_job_id')}: {msg}", kwargs


def describe(error: BaseException) -> str:
    """``Type: message`` on one line."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


@dataclass
class JobRun:
    """One job in hand from its claim to its outcome: what ``execute`` gets, and how it ended
    (recorded by ``with run.executing(): ...``, which swallows the job's own exception)."""

    target: Target
    owner: Owner
    item: Any
    arg: Any
    attempts: int
    log: logging.LoggerAdapter  # type: ignore[type-arg]
    ended: bool  # end_before_execute: the job is gone already
    nested: SessionTransaction | None = None  # the savepoint of the job's writes (InnoDB)
    used_session: bool = False  # execute asked for self.session
    aborted: bool = False
    error: BaseException | None = None
    details: str = ""  # the error's traceback
    started: float = 0.0
    elapsed: float = 0.0

    @property
    def job(self) -> Job:
        return self.target.job

    @functools.cached_property
    def values(self) -> dict[str, Any]:
        """The job's column values by name (for a retry copy or a dead letter)."""
        return payload_of(self.item, self.target.table)

    def session(self) -> Session:
        """The ORM session ``execute`` writes through, made on first use.  Its writes are
        undone on failure or abort: on InnoDB by a savepoint begun here (the claim's row lock
        must outlive it); on Q4M, where owning is not transactional, by rolling back the
        session's transaction."""
        if not self.used_session:
            self.values  # noqa: B018 - read now: a rollback of the session expires the job
        session = self.owner.session
        if not self.used_session:
            self.used_session = True
            backend = self.owner.backend
            if backend is not None and backend.name == "portable":
                self.nested = session.begin_nested()
        return session

    def executing(self) -> JobRun:
        """Start the clock; the ``with`` block around ``execute`` records how it ends."""
        log = self.log
        if log.logger.isEnabledFor(logging.DEBUG):  # one call, not four, when it is off
            log.debug("started (attempt %d)", self.attempts + 1)
        self.started = time.monotonic()
        return self

    def __enter__(self) -> JobRun:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        job = self.job
        if exc is None:
            self.aborted = job._abort_requested
        elif isinstance(exc, QueueAbort):
            self.aborted = True
        elif isinstance(exc, Exception):
            self.error, self.details = exc, "".join(traceback.format_exception(exc))
        job._run = None
        job._abort_requested = False
        self.elapsed = time.monotonic() - self.started
        return isinstance(exc, Exception) or exc is None  # a cancellation goes on


class Owner(Protocol):
    """What the job steps use of the thing owning the job: a :class:`QueueSession`, or a
    :class:`BatchSlot` (one job of a claimed batch)."""

    backend: Backend | None

    @property
    def subscription(self) -> Subscription | None: ...

    @property
    def session(self) -> Session: ...

    @property
    def owning(self) -> bool: ...

    @property
    def connection(self) -> Connection: ...

    def end(self) -> None: ...

    def abort(self) -> None: ...

    def close(self) -> None: ...


#: The backend of every batch slot (a batch of more than one job is portable).
_PORTABLE = get_backend("portable")


class BatchSlot:
    """One job of a :class:`QueueBatch`, seen as the job steps see a queue session: ``end``
    marks it done (removed when the batch commits), ``abort`` returns it with the batch."""

    __slots__ = ("backend", "batch", "item", "subscription")

    def __init__(self, batch: QueueBatch[Any], item: Any) -> None:
        self.batch, self.item = batch, item
        self.subscription: Subscription | None = batch.subscription_of(item)
        self.backend: Backend | None = _PORTABLE

    @property
    def session(self) -> Session:
        return self.batch.session

    @property
    def owning(self) -> bool:
        return self.batch.holds(self.item)

    @property
    def connection(self) -> Connection:
        return self.batch.session.connection()

    def end(self) -> None:
        self.batch.end(self.item)

    def abort(self) -> None:
        self.batch.abort(self.item)

    def close(self) -> None:
        if self.owning:
            self.abort()
