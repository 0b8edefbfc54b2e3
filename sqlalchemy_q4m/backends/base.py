"""The interface both backends implement, and the one place database errors are translated."""

from __future__ import annotations

from abc import ABC
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from typing import ClassVar
from typing import Protocol

from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from ..exc import ConnectionLost
from ..functions import Subscription
from ..loading import Loader
from ..server import BackendName

__all__ = ["Backend", "Claim", "error_code", "translate_errors"]

#: MySQL error numbers a claim retries: deadlock, lock wait timeout.
DEADLOCK = 1213
LOCK_WAIT_TIMEOUT = 1205
RETRYABLE = frozenset({DEADLOCK, LOCK_WAIT_TIMEOUT})
#: A statement interrupted by ``KILL QUERY``: a listen wake-up (``notify``) that landed on the
#: claim right after the wait; the claim retries it.
QUERY_INTERRUPTED = 1317


@dataclass
class Claim:
    """A job this connection owns: which subscription it came from, the loaded job, its key
    as the driver sends it, and the :class:`~sqlalchemy_q4m.loading.Loader` that made it."""

    subscription: Subscription
    job: Any
    key: tuple[Any, ...]
    loader: Loader


def error_code(err: BaseException) -> int | None:
    """The MySQL error number behind a SQLAlchemy DBAPIError, if any."""
    orig = getattr(err, "orig", None)
    args = getattr(orig, "args", ())
    if args and isinstance(args[0], int):
        return args[0]
    return None


class _Translate:
    """What :func:`translate_errors` returns (a class: it wraps every statement of a job)."""

    __slots__ = ("what",)

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if isinstance(exc, DBAPIError) and exc.connection_invalidated:
            raise ConnectionLost(f"{self.what}: connection lost ({exc.orig})") from exc


def translate_errors(what: str) -> _Translate:
    """A context manager turning a lost connection into :class:`ConnectionLost`; other
    errors pass unchanged."""
    return _Translate(what)


class Holder(Protocol):
    """What a backend needs from the queue session it claims for."""

    @property
    def connection(self) -> Connection:
        """The pinned connection that will own the job."""

    @property
    def session(self) -> Session:
        """The ORM session the job belongs to (made on first use)."""

    @property
    def in_session(self) -> bool:
        """True when ``session`` is the caller's own: it loads every job (identity map)."""

    def restart(self) -> bool:
        """Roll back the transaction if this queue session began it and holds no job yet
        (after a deadlock); False when it is the caller's, which must not be touched."""


class Backend(ABC):
    """One way to own a job.  Instances hold no state: the queue session holds it.

    ``attempt`` tries once to own a job for ``holder`` (a queue session: its pinned
    connection, its ORM session made on demand).  A ``blocking`` backend
    waits inside the server for up to ``timeout`` seconds; a non-blocking one returns at once
    and the caller polls.  ``end`` removes the owned job and ``abort`` returns it; the queue
    session commits or rolls back the transaction around them.
    """

    name: ClassVar[BackendName]
    blocking: ClassVar[bool]

    @abstractmethod
    def attempt(
        self, holder: Holder, subs: Sequence[Subscription], timeout: float
    ) -> Claim | None: ...

    @abstractmethod
    def end(self, conn: Connection, claim: Claim) -> None: ...

    @abstractmethod
    def abort(self, conn: Connection, claim: Claim) -> None: ...
