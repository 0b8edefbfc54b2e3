"""The worker: the ``Job`` API, the consumer loop, its retry/dead-letter policy and the
thread/process runtime with its asyncio twin."""

from __future__ import annotations

from .consumer import Consumer
from .consumer import Job
from .consumer import reflect_queue_table

__all__ = ["Consumer", "Job", "reflect_queue_table"]
