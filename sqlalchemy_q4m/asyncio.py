"""The asyncio API of the consumer layer: ``async_queue_session``, ``async_queue_sessionmaker``,
``AsyncQueueSession``, ``AsyncQueueConsumer`` and ``AsyncBind``, re-exported from
``consumer/`` (``queue_session`` and ``queue_consumer`` return the asyncio ones for an asyncio
bind). The asyncio worker (``AsyncJob``, ``worker_engine``) is in
:mod:`sqlalchemy_q4m.asyncio_worker`."""

from __future__ import annotations

from .consumer.async_consuming import AsyncQueueConsumer
from .consumer.asyncio import AsyncBind
from .consumer.asyncio import AsyncQueueSession
from .consumer.asyncio import async_queue_session
from .consumer.asyncio import async_queue_sessionmaker

__all__ = [
    "AsyncBind",
    "AsyncQueueConsumer",
    "AsyncQueueSession",
    "async_queue_session",
    "async_queue_sessionmaker",
]
