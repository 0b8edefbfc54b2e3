"""``queue_consumer``: many jobs, one after another, on one connection set up once.

::

    with queue_consumer(ShellJob, bind=engine, timeout=5) as consumer:
        while running:
            with consumer.take() as job:     # a queue session, as queue_session() returns
                if job is not None:
                    run(job.command)         # normal exit -> end; exception -> abort

A :func:`~sqlalchemy_q4m.queue_session` per job sets everything up again for each job: it checks
its arguments, picks the backend, pins the connection (with an Engine bind, takes a kept
consumer connection and gives it back) and puts it in the consumer's mode.  That is most of the
client's work per job beside the statements themselves.  A :class:`QueueConsumer` does it once:
each :meth:`~QueueConsumer.take` hands out the same queue session, renewed for the next job, on
the same pinned connection.  Every guarantee is the queue session's: the block's exit ends or
aborts the job, the connection records its owner while a job is waited for or owned (so a
second queue session on it is refused), a caller ending the transaction that holds a portable
claim is stopped, and the same statements are sent.

What each bind means is what it means for ``queue_session``:

* an :class:`~sqlalchemy.Engine`: one consumer connection of the engine (in the consumer's mode,
  as :mod:`~sqlalchemy_q4m.backends.pinned` keeps them) is held from the first take until
  :meth:`~QueueConsumer.close`, which hands it back; so close the consumer (``with``).
* a :class:`~sqlalchemy.Connection`: used as it is, as by ``queue_session``; the consumer takes
  nothing from it between jobs (the caller may run its own statements there), and closing the
  consumer leaves it open.
* an ORM :class:`~sqlalchemy.orm.Session`: each take pins as ``queue_session`` does (the
  session's connection can change at each commit), so only the checks are done once.

A job that breaks the connection (a lost server, an error while ending) invalidates it, as
``queue_session`` does, so the server returns the job; the next take then pins a new connection
of an Engine bind, or uses the Connection bind afresh (which reconnects).

The queue session :meth:`~QueueConsumer.take` returns is valid for one job: it is renewed by the
next take, so keep no reference to it (or to its ``session``) past its block.  A consumer is for
one thread or task at a time, like the connection it holds.

The asyncio twin (:mod:`~sqlalchemy_q4m.consumer.async_consuming`, what ``queue_consumer`` returns
for an asyncio bind) drives the same :class:`ConsumerSession` through SQLAlchemy's greenlet
bridge; :class:`ConsumerCore` is what both share.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any
from typing import Generic
from typing import Literal
from typing import TypeVar

from sqlalchemy import Connection
from sqlalchemy.orm import Session

from ..backends import Backend
from ..backends.base import give_up_connection
from ..exc import NotOwner
from ..exc import Q4MError
from ..schema.functions import subscriptions
from .lifecycle import POLL_INTERVAL
from .lifecycle import Lifecycle
from .lifecycle import State
from .lifecycle import Where
from .lifecycle import check_wait_options
from .session import Bind
from .session import QueueSession

__all__ = ["ConsumerCore", "ConsumerSession", "QueueConsumer"]

T = TypeVar("T")

#: "Not given" for :meth:`QueueConsumer.take`'s options (None is a valid ``timeout``/``where``).
UNSET: Any = object()


#: The states outside a job's wait and ownership, in which the kept connection is not the
#: block's (a tuple: compared by identity, no enum hashing).
_OUTSIDE = (
    State.IDLE,
    State.ENDED,
    State.ABORTED,
    State.TIMED_OUT,
    State.CLOSED,
    State.BROKEN,
)


class ConsumerSession(QueueSession[T]):
    """The queue session of a :class:`QueueConsumer`: renewed for each job, its connection kept
    pinned between jobs (an Engine or Connection bind) instead of pinned and released per job.
    """

    #: The pin outlives the job: the next job's setup only records the owner and prepares the
    #: transaction.  False with a Session bind, after a broken job and once closed.
    _held = False
    _info: dict[Any, Any] | None = None  # the pinned connection's info, looked up once
    _closed = False

    @property
    def connection(self) -> Connection:
        """The pinned connection, while the job is waited for or owned (it stays pinned for
        the consumer's next job, but is not the block's after it)."""
        if self._pinned is None or self.life.state in _OUTSIDE:
            raise NotOwner("the queue session has not started, or is finished")
        return super().connection

    @property
    def session(self) -> Session:
        """The job's ORM session, as :attr:`QueueSession.session`, while the job is waited
        for or owned."""
        if self.life.state in _OUTSIDE:
            raise NotOwner("the queue session has not started, or is finished")
        return super().session

    def renew(self, timeout: float | None, subs: Any) -> None:
        """Ready for the next job, waiting up to ``timeout`` on ``subs``."""
        if timeout is not self.timeout:
            check_wait_options(timeout, self.poll_interval, self.listen)
            self.timeout = timeout
        self.subscriptions = subs
        self.life = Lifecycle(timeout, self.poll_interval)
        self.job = self._claim = self.subscription = None
        self._finishing = self._own_orm = False
        self._released = None
        self._orm = self._user_session = None

    def _release(self, *, broken: bool = False) -> None:
        """After a clean job that made no ORM session (the usual one), releasing a kept pin
        is only the lifecycle's finish and giving up the owner record: the rest of the
        release (guards, the ORM session, handing back the connection) has nothing to do, and
        is skipped (three calls per job).  Otherwise the full release."""
        if broken or not self._held or self._orm is not None or self._guarded:
            super()._release(broken=broken)
            return
        self.life.finish()
        give_up_connection(self._owner_info, self)
        self._owner_info = None

    def _setup(self) -> Backend:
        pinned, info = self._pinned, self._info
        if not self._held or pinned is None or info is None or pinned.closed or pinned.invalidated:
            if pinned is not None:  # invalidated or closed meanwhile: let it go
                self._held = False
                self._unpin(broken=True)
            backend = super()._setup()
            held = self._pinned
            self._held = held is not None and not isinstance(self.bind, Session)
            self._info = self._owner_info
            return backend
        kept = self.backend
        assert kept is not None
        if self._conn is None:  # the caller's Connection: as queue_session finds it now
            self._began = self._join(pinned, kept)
        return self._ready(info)

    def _unpin(self, broken: bool) -> None:
        if self._held and not broken:
            return  # kept for the next job
        self._held = False
        self._info = None
        super()._unpin(broken)

    def shut(self) -> None:
        """Return a job still owned, then let go of the connection (the consumer closes)."""
        self._held = False
        self._closed = True
        if self.owning:
            self.abort()
        elif self._pinned is not None:
            self._release()


class ConsumerCore(Generic[T]):
    """What the blocking :class:`QueueConsumer` and the asyncio one
    (:class:`~sqlalchemy_q4m.consumer.async_consuming.AsyncQueueConsumer`) share: the consumer's
    options, and each take's checks and renewal of the one :class:`ConsumerSession`."""

    def __init__(
        self,
        session: ConsumerSession[T],
        targets: tuple[Any, ...],
        timeout: float | None,
        where: Where,
    ) -> None:
        self._session = session
        self.targets = targets
        self.timeout = timeout
        self.where = where
        self._subscribed = where  # the ``where`` of the session's subscriptions

    @property
    def accept_unloadable(self) -> bool:
        """As :attr:`QueueSession.accept_unloadable` (the worker sets it)."""
        return self._session.accept_unloadable

    @accept_unloadable.setter
    def accept_unloadable(self, value: bool) -> None:
        self._session.accept_unloadable = value

    @property
    def private_connection(self) -> bool:
        """As :attr:`~sqlalchemy_q4m.consumer.binding.Pin.private_connection`: the worker sets
        it for its own connection (its jobs reach it only through the queue session)."""
        return self._session.private_connection

    @private_connection.setter
    def private_connection(self, value: bool) -> None:
        self._session.private_connection = value

    def _renew(self, timeout: Any, where: Any) -> ConsumerSession[T]:
        """The session renewed for the next job, after the checks of a take (see
        :meth:`QueueConsumer.take`)."""
        qs = self._session
        if qs._closed:
            raise Q4MError("the queue consumer is closed")
        state = qs.life.state
        if state is State.WAITING or state is State.OWNING:
            raise Q4MError(
                "the queue consumer's last job is not finished: leave its block (or end or "
                "abort it) before taking the next"
            )
        if timeout is UNSET:
            timeout = self.timeout
        if where is UNSET:
            where = self.where
        subs = qs.subscriptions
        if where is not self._subscribed:  # the session's subscriptions are another's
            subs = subscriptions(self.targets, where)
            self._subscribed = where
        qs.renew(timeout, subs)
        return qs


class QueueConsumer(ConsumerCore[T]):
    """Jobs of ``targets``, one after another, on one connection set up once; see the module
    docstring.  Made by :func:`~sqlalchemy_q4m.queue_consumer`; the options are
    ``queue_session``'s and ``timeout`` and ``where`` can be changed per :meth:`take`."""

    def __init__(
        self,
        *targets: Any,
        bind: Bind,
        where: Where = None,
        timeout: float | None = 60.0,
        backend: Literal["native", "portable", "auto"] | None = None,
        poll_interval: float = POLL_INTERVAL,
        listen: float | None = None,
    ) -> None:
        session: ConsumerSession[T] = ConsumerSession(
            *targets,
            bind=bind,
            where=where,
            timeout=timeout,
            backend=backend,
            poll_interval=poll_interval,
            listen=listen,
        )
        super().__init__(session, targets, timeout, where)

    @property
    def bind(self) -> Bind:
        return self._session.bind

    def take(self, *, timeout: Any = UNSET, where: Any = UNSET) -> QueueSession[T]:
        """The queue session for the next job: use it in a ``with`` block, which yields the
        job or None when ``timeout`` (default: the consumer's) passes.  ``where``: this
        take's condition instead of the consumer's (rebuilding the same condition per take
        costs nothing: subscriptions are memoized per expression).  Refused while the last
        one is still waiting or owning its job."""
        return self._renew(timeout, where)

    def close(self) -> None:
        """Return a job still owned and hand back the connection held for an Engine bind
        (a Connection bind stays open); safe to call twice."""
        self._session.shut()

    def __enter__(self) -> QueueConsumer[T]:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
