"""The worker: the ``Job`` API, the consumer loop, its retry/dead-letter policy and the
thread/process runtime with its asyncio twin."""

from __future__ import annotations

from ..schema.reflect import reflect_queue_table
from .consumer import Consumer
from .job import Job

__all__ = ["Consumer", "Job", "reflect_queue_table"]
