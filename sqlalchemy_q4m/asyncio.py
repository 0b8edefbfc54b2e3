"""The asyncio API: ``async_queue_session``, ``async_queue_sessionmaker`` and the asyncio worker's
``AsyncJob``, re-exported from the consumer and worker layers."""

from __future__ import annotations

from .consumer.asyncio import *  # noqa: F403
