"""The entry points of the consumer layer: :func:`queue_session` returns the blocking driver
(:class:`~sqlalchemy_q4m.consumer.session.QueueSession`) for a sync bind and the asyncio one
(:class:`~sqlalchemy_q4m.consumer.asyncio.AsyncQueueSession`) for an asyncio bind;
:func:`queue_consumer` does the same with the consumers of many jobs
(:class:`~sqlalchemy_q4m.consumer.consuming.QueueConsumer`,
:class:`~sqlalchemy_q4m.consumer.async_consuming.AsyncQueueConsumer`);
:func:`queue_sessionmaker` fixes a bind and defaults.  Kept apart from both drivers so that
neither imports the other."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING
from typing import Any
from typing import Literal
from typing import overload

from .binding import SYNC_BINDS
from .binding import bound_factory
from .consuming import QueueConsumer
from .lifecycle import POLL_INTERVAL
from .lifecycle import Where
from .session import Bind
from .session import QueueSession

if TYPE_CHECKING:
    from .async_consuming import AsyncQueueConsumer
    from .asyncio import AsyncBind
    from .asyncio import AsyncQueueSession

__all__ = ["queue_consumer", "queue_session", "queue_sessionmaker"]


@overload
def queue_session(
    *targets: Any,
    bind: Bind,
    where: Where = None,
    timeout: float | None = 60.0,
    backend: Literal["native", "portable", "auto"] | None = None,
    poll_interval: float = POLL_INTERVAL,
    listen: float | None = None,
) -> QueueSession[Any]: ...


@overload
def queue_session(
    *targets: Any,
    bind: AsyncBind,
    where: Where = None,
    timeout: float | None = 60.0,
    backend: Literal["native", "portable", "auto"] | None = None,
    poll_interval: float = POLL_INTERVAL,
    listen: float | None = None,
) -> AsyncQueueSession[Any]: ...


def queue_session(
    *targets: Any,
    bind: Bind | AsyncBind,
    where: Where = None,
    timeout: float | None = 60.0,
    backend: Literal["native", "portable", "auto"] | None = None,
    poll_interval: float = POLL_INTERVAL,
    listen: float | None = None,
) -> QueueSession[Any] | AsyncQueueSession[Any]:
    """Wait for a job of one of ``targets`` (earlier ones win) on a pinned connection.

    Returns a :class:`QueueSession`; use it in a ``with`` block, which yields the job (a
    mapped instance, or a Row for a Core table) or None when ``timeout`` seconds pass.  With an
    asyncio ``bind`` (``AsyncEngine``, ``AsyncConnection``, ``AsyncSession``) it returns an
    :class:`~sqlalchemy_q4m.asyncio.AsyncQueueSession` for ``async with``.

    ``listen=T``: on MariaDB an idle portable consumer waits up to ``T`` seconds to be woken
    by a producer's :func:`~sqlalchemy_q4m.notify` instead of polling every
    ``poll_interval`` (see :mod:`sqlalchemy_q4m.backends.wakeup`; an async bind awaits that wait).
    """
    if not isinstance(bind, SYNC_BINDS):
        # imported here: a program that never passes an asyncio bind does not load
        # SQLAlchemy's asyncio extension (nor greenlet's machinery) at all
        from .asyncio import async_queue_session

        return async_queue_session(
            *targets,
            bind=bind,
            where=where,
            timeout=timeout,
            backend=backend,
            poll_interval=poll_interval,
            listen=listen,
        )
    return QueueSession(
        *targets,
        bind=bind,
        where=where,
        timeout=timeout,
        backend=backend,
        poll_interval=poll_interval,
        listen=listen,
    )


@overload
def queue_consumer(
    *targets: Any,
    bind: Bind,
    where: Where = None,
    timeout: float | None = 60.0,
    backend: Literal["native", "portable", "auto"] | None = None,
    poll_interval: float = POLL_INTERVAL,
    listen: float | None = None,
) -> QueueConsumer[Any]: ...


@overload
def queue_consumer(
    *targets: Any,
    bind: AsyncBind,
    where: Where = None,
    timeout: float | None = 60.0,
    backend: Literal["native", "portable", "auto"] | None = None,
    poll_interval: float = POLL_INTERVAL,
    listen: float | None = None,
) -> AsyncQueueConsumer[Any]: ...


def queue_consumer(
    *targets: Any,
    bind: Bind | AsyncBind,
    where: Where = None,
    timeout: float | None = 60.0,
    backend: Literal["native", "portable", "auto"] | None = None,
    poll_interval: float = POLL_INTERVAL,
    listen: float | None = None,
) -> QueueConsumer[Any] | AsyncQueueConsumer[Any]:
    """Jobs of ``targets``, one after another, on one connection set up once: a
    :class:`~sqlalchemy_q4m.QueueConsumer` with ``queue_session``'s arguments (see
    :mod:`~sqlalchemy_q4m.consumer.consuming`), whose :meth:`~QueueConsumer.take` gives the
    next job's queue session.  With an asyncio ``bind`` it returns an
    :class:`~sqlalchemy_q4m.asyncio.AsyncQueueConsumer` for ``async with``."""
    options: dict[str, Any] = {
        "where": where,
        "timeout": timeout,
        "backend": backend,
        "poll_interval": poll_interval,
        "listen": listen,
    }
    if not isinstance(bind, SYNC_BINDS):
        from .async_consuming import AsyncQueueConsumer  # as queue_session: asyncio on demand

        return AsyncQueueConsumer(*targets, bind=bind, **options)
    return QueueConsumer(*targets, bind=bind, **options)


def queue_sessionmaker(
    bind: Bind,
    *,
    timeout: float | None = 60.0,
    backend: Literal["native", "portable", "auto"] | None = None,
    poll_interval: float = POLL_INTERVAL,
    listen: float | None = None,
) -> Callable[..., QueueSession[Any]]:
    """A factory with ``bind`` and defaults fixed: ``QueueSession = queue_sessionmaker(engine)``
    then ``with QueueSession(ShellJob, timeout=5) as job: ...``."""
    return bound_factory(
        QueueSession,
        bind,
        timeout=timeout,
        backend=backend,
        poll_interval=poll_interval,
        listen=listen,
    )
