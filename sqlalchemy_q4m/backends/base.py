"""The interface both backends implement, and the one place database errors are translated."""

from __future__ import annotations

from abc import ABC
from abc import abstractmethod
from collections.abc import Iterator
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from typing import ClassVar

from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from ..exc import ConnectionLost
from ..functions import Subscription
from ..server import BackendName

__all__ = ["Backend", "Claim", "error_code", "translate_errors"]

#: MySQL error numbers a claim retries: deadlock, lock wait timeout.
DEADLOCK = 1213
LOCK_WAIT_TIMEOUT = 1205
RETRYABLE = frozenset({DEADLOCK, LOCK_WAIT_TIMEOUT})


@dataclass
class Claim:
    """A job this connection owns: which subscription it came from and the loaded job."""

    subscription: Subscription
    job: Any


def error_code(err: BaseException) -> int | None:
    """The MySQL error number behind a SQLAlchemy DBAPIError, if any."""
    orig = getattr(err, "orig", None)
    args = getattr(orig, "args", ())
    if args and isinstance(args[0], int):
        return args[0]
    return None


@contextmanager
def translate_errors(what: str) -> Iterator[None]:
    """Turn a lost connection into :class:`ConnectionLost`; other errors pass unchanged."""
    try:
        yield
    except DBAPIError as err:
        if err.connection_invalidated:
            raise ConnectionLost(f"{what}: connection lost ({err.orig})") from err
        raise


class Backend(ABC):
    """One way to own a job.  Instances hold no state: the queue session holds it.

    ``attempt`` tries once to own a job on ``session``'s connection.  A ``blocking`` backend
    waits inside the server for up to ``timeout`` seconds; a non-blocking one returns at once
    and the caller polls.  ``end`` removes the owned job, ``abort`` returns it, and ``release``
    leaves the connection fit to be handed back to a pool after a timeout.
    """

    name: ClassVar[BackendName]
    blocking: ClassVar[bool]

    @abstractmethod
    def attempt(
        self, session: Session, subs: Sequence[Subscription], timeout: float
    ) -> Claim | None: ...

    @abstractmethod
    def end(self, session: Session, claim: Claim) -> None: ...

    @abstractmethod
    def abort(self, session: Session, claim: Claim) -> None: ...

    @staticmethod
    def load(session: Session, sub: Subscription, stmt: Any) -> Any:
        """Run ``stmt`` and return the first job: a mapped instance, or a Core Row."""
        result = session.execute(stmt)
        return result.scalars().first() if sub.is_orm else result.first()
