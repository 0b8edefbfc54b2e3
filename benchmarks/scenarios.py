"""The scenarios of issues 6 and 13, each measured against its raw-PyMySQL (or raw async
driver) baseline in the same run, on the backend the server has; one module per scenario."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy.engine import URL

from .asyncio_bench import asyncio_consume
from .batched import batched
from .consume import consume
from .latency import latency
from .latency import memory
from .produce import enqueue
from .report import Progress
from .report import Report
from .report import Row
from .report import Settings

__all__ = ["SCENARIOS", "Progress", "Report", "Row", "Settings"]

Scenario = Callable[[URL, Settings, Report, Progress], None]

#: Every scenario, in the order a run takes them; each runs on both backends.
SCENARIOS: dict[str, Scenario] = {
    "enqueue": enqueue,
    "consume": consume,
    "latency": latency,
    "memory": memory,
    "batched": batched,
    "asyncio": asyncio_consume,
}
