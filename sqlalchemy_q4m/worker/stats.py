"""What consumers did, by outcome: the counters behind the status line, the registry and the
metrics."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field

from .policy import OUTCOMES
from .policy import Outcome

__all__ = ["Stats"]

logger = logging.getLogger("sqlalchemy_q4m.worker")


@dataclass
class Stats:
    """What consumers did, by outcome (thread-safe counters)."""

    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    #: Called after each job with (outcome, table, seconds in hand): the worker registry's
    #: and the metrics' hook (see :mod:`sqlalchemy_q4m.worker.observe`).
    hooks: list[Callable[[str, str | None, float | None], None]] = field(
        default_factory=list, repr=False
    )

    def add(self, outcome: Outcome, table: str | None = None, seconds: float | None = None) -> None:
        with self._lock:
            self.counts[outcome] = self.counts.get(outcome, 0) + 1
        for hook in self.hooks:
            try:
                hook(outcome, table, seconds)
            except Exception:  # an observer never stops a worker
                logger.debug("a stats hook failed", exc_info=True)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counts)
