"""``async with queue_consumer(...)``: the queue consumer on SQLAlchemy's asyncio extension.

::

    engine = create_async_engine("mysql+asyncmy://root@127.0.0.1/test")
    async with queue_consumer(ShellJob, bind=engine, timeout=5) as consumer:
        while running:
            async with consumer.take() as job:   # an AsyncQueueSession, renewed per job
                if job is not None:
                    await run(job.command)       # normal exit -> end; exception -> abort

What :class:`~sqlalchemy_q4m.consumer.consuming.QueueConsumer` is to ``queue_session``, an
:class:`AsyncQueueConsumer` is to the asyncio queue session: the checks, the backend and the
pinned connection's mode are set up once, and each :meth:`~AsyncQueueConsumer.take` renews the
same :class:`~sqlalchemy_q4m.consumer.asyncio.AsyncQueueSession` for the next job.  Its sync
half is the blocking consumer's session driven through SQLAlchemy's greenlet bridge, as the
asyncio queue session drives the blocking one, so both consumers make the same decisions and
send the same statements, and every guarantee of ``async with queue_session(...)`` holds
(cancellation included: a task cancelled while it waits has its connection invalidated, so
the next take pins a new one).

Binds, as for the blocking consumer: an ``AsyncEngine`` (one connection from the first take
until :meth:`~AsyncQueueConsumer.close` hands it back), an ``AsyncConnection`` (used as it is
and left open), an ``AsyncSession`` (only the checks are done once).  One task at a time.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any
from typing import Literal
from typing import TypeVar

from .asyncio import AsyncBind
from .asyncio import AsyncQueueSession
from .asyncio import GreenletQueueSession
from .asyncio import run_to_completion
from .consuming import UNSET
from .consuming import ConsumerCore
from .consuming import ConsumerSession
from .lifecycle import POLL_INTERVAL
from .lifecycle import Where

__all__ = ["AsyncQueueConsumer", "GreenletConsumerSession"]

T = TypeVar("T")


class GreenletConsumerSession(ConsumerSession[Any], GreenletQueueSession):
    """The blocking consumer's session on the sync side of an async bind (what an
    :class:`AsyncQueueConsumer`'s queue session drives), its ORM session an
    ``AsyncSession``'s sync half, as :class:`GreenletQueueSession`'s."""

    def renew(self, timeout: float | None, subs: Any) -> None:
        super().renew(timeout, subs)
        self.async_session = None


class _ConsumerAsyncSession(AsyncQueueSession[T]):
    """The asyncio queue session an :class:`AsyncQueueConsumer` renews for each job."""

    _sync_class = GreenletConsumerSession


class AsyncQueueConsumer(ConsumerCore[T]):
    """Jobs of ``targets``, one after another, on one async connection set up once; see the
    module docstring.  Made by :func:`~sqlalchemy_q4m.queue_consumer` for an asyncio bind;
    ``timeout`` and ``where`` can be changed per :meth:`take`."""

    def __init__(
        self,
        *targets: Any,
        bind: AsyncBind,
        where: Where = None,
        timeout: float | None = 60.0,
        backend: Literal["native", "portable", "auto"] | None = None,
        poll_interval: float = POLL_INTERVAL,
        listen: float | None = None,
    ) -> None:
        self._async: _ConsumerAsyncSession[T] = _ConsumerAsyncSession(
            *targets,
            bind=bind,
            where=where,
            timeout=timeout,
            backend=backend,
            poll_interval=poll_interval,
            listen=listen,
        )
        sync = self._async.sync_session
        assert isinstance(sync, GreenletConsumerSession)
        super().__init__(sync, targets, timeout, where)

    @property
    def bind(self) -> AsyncBind:
        return self._async.bind

    def take(self, *, timeout: Any = UNSET, where: Any = UNSET) -> AsyncQueueSession[T]:
        """The asyncio queue session for the next job: use it in an ``async with`` block,
        which gives the job or None when ``timeout`` (default: the consumer's) passes;
        ``where`` as :meth:`QueueConsumer.take`'s.  Refused while the last one is still
        waiting or owning its job.  (Not a coroutine: nothing is sent until the block.)"""
        qs = self._renew(timeout, where)
        aqs = self._async
        aqs.timeout, aqs.subscriptions = qs.timeout, qs.subscriptions
        return aqs

    async def close(self) -> None:
        """Return a job still owned and hand back the connection held for an ``AsyncEngine``
        bind (an ``AsyncConnection`` stays open); safe to call twice; runs to completion
        even when the task is cancelled meanwhile."""
        await run_to_completion(self._session.shut)

    async def __aenter__(self) -> AsyncQueueConsumer[T]:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
