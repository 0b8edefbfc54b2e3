"""The asyncio worker (``AsyncJob``, ``worker_engine``), importable under its documented path."""

from __future__ import annotations

from .worker.asyncio import *  # noqa: F403
from .worker.asyncio_runtime import *  # noqa: F403
