"""What watches a worker process: its row in the worker registry and its Prometheus metrics.

:func:`start_observers` is the one hook the runtime calls around a worker process (threads or
asyncio tasks): it registers the process (:class:`~sqlalchemy_q4m.worker.registry.Heartbeat`)
and, when asked, records metrics (:mod:`sqlalchemy_q4m.worker.metrics`); both follow the
consumers through their :class:`~sqlalchemy_q4m.worker.stats.Stats` hooks and their
``holding`` property.
"""

from __future__ import annotations

import logging
from typing import Any
from typing import Protocol

from sqlalchemy import create_engine
from sqlalchemy.engine import Engine

from .consumer import Consumer
from .consumer import Stats
from .metrics import WorkerMetrics
from .registry import Heartbeat
from .registry import Holding

__all__ = ["Observers", "start_observers"]

logger = logging.getLogger("sqlalchemy_q4m.observe")


class _Runtime(Protocol):
    config: Any
    name: str
    stats: Stats
    consumers: list[Consumer]


def _holdings(runtime: _Runtime) -> list[Holding]:
    held = []
    for consumer in list(runtime.consumers):
        holding = consumer.holding
        if holding is not None:
            held.append(Holding(*holding))
    return held


def _queues(runtime: _Runtime) -> list[str]:
    consumers = list(runtime.consumers)
    return consumers[0].tables if consumers else []


class Observers:
    """The registry heartbeat and the metrics of one worker process; :meth:`stop` at the end."""

    def __init__(self, runtime: _Runtime) -> None:
        self.runtime = runtime
        self.heartbeat: Heartbeat | None = None
        self.metrics: Any = None
        self._engine: Engine | None = None
        config = runtime.config
        interval = float(getattr(config, "heartbeat", 0) or 0)
        if interval > 0:
            # autocommit, no pre-ping: a heartbeat is one UPDATE and nothing else (a failed
            # one invalidates the connection and the next beat reconnects)
            self._engine = create_engine(
                config.url, pool_size=1, pool_recycle=3600, isolation_level="AUTOCOMMIT"
            )
            self.heartbeat = Heartbeat(
                self._engine,
                name=runtime.name,
                kind="asyncio"
                if any(getattr(c, "is_async", False) for c in _classes(runtime))
                else "threads",
                concurrency=config.concurrency,
                processes=config.processes,
                queues=lambda: _queues(runtime),
                in_hand=lambda: _holdings(runtime),
                interval=interval,
            )
            runtime.stats.hooks.append(self.heartbeat.observe)
            self.heartbeat.start()
        if getattr(config, "metrics_port", None) is not None:
            child = getattr(runtime, "parent_pid", None) is not None  # the supervisor serves
            self.metrics = WorkerMetrics.for_process(config, child=child)
            runtime.stats.hooks.append(self.metrics.observe)
            self.metrics.track_in_hand(lambda: _holdings(runtime), lambda: _queues(runtime))

    def stop(self) -> None:
        if self.heartbeat is not None:
            try:
                self.heartbeat.stop()
            except Exception:
                logger.warning("worker registry: stopping failed", exc_info=True)
        if self._engine is not None:
            self._engine.dispose()
        if self.metrics is not None:
            self.metrics.close()


def _classes(runtime: _Runtime) -> list[Any]:
    return list(getattr(runtime, "classes", []))


def start_observers(runtime: _Runtime) -> Observers:
    """Start what the runtime's config asks for (see the module docstring)."""
    return Observers(runtime)
