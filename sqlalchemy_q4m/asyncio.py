"""The asyncio API of the consumer layer: ``async_queue_session``, ``async_queue_sessionmaker``,
``AsyncQueueSession`` and ``AsyncBind``, re-exported from ``consumer/``. The asyncio worker
(``AsyncJob``, ``worker_engine``) is in :mod:`sqlalchemy_q4m.asyncio_worker`."""

from __future__ import annotations

from .consumer.asyncio import *  # noqa: F403
