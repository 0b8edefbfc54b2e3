"""The run loop's decisions, without I/O: when to go on, recycle, back off or stop, and how a
wait is cut into slices.  The synchronous consumer (:mod:`.consumer`) and the asyncio one
(:mod:`.asyncio`) drive the same :class:`RunLoop`; they only perform what it decides (wait,
reconnect, recycle, sleep), so both behave the same by construction.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from sqlalchemy.exc import DBAPIError

from ..exc import CompletionFailed
from ..exc import ConnectionLost
from ..exc import QueueWaitError
from .policy import reconnect_delay

__all__ = ["DUE_SLICE", "LOOP_ERRORS", "RunLoop", "StopSignals", "wait_slices"]

#: What the run loop survives: a lost connection or server (it reconnects with backoff; the
#: server returns the job in hand), a completion the server undid (the job runs again), or a
#: ``queue_wait`` that returned NULL (a table dropped or replaced under a Q4M worker: it backs
#: off and waits again, as the portable worker does after its claim's error).
LOOP_ERRORS = (ConnectionLost, DBAPIError, CompletionFailed, QueueWaitError)

#: Longest single wait while a subscription tests ``run_at <= now`` (rebuilt at each wait).
DUE_SLICE = 1.0


def wait_slices(
    timeout: float, *, timed: bool, clock: Callable[[], float] = time.monotonic
) -> Iterator[float]:
    """The timeout of each wait until ``timeout`` seconds pass.  ``run_at <= now`` is fixed
    in each wait, so with ``run_at`` columns (``timed``) the waits are cut into slices of at
    most :data:`DUE_SLICE` seconds and the condition is rebuilt between them.  At least one
    wait, even with ``timeout`` 0."""
    deadline = clock() + timeout
    while True:
        remaining = max(0.0, deadline - clock())
        yield min(remaining, DUE_SLICE) if timed else remaining
        if clock() >= deadline:
            return


@dataclass
class RunLoop:
    """One ``run()``: how many jobs it handled, the database errors in a row, and what comes
    next.  The driver asks :meth:`goes_on` before each turn, reports each turn with
    :meth:`succeeded` or :meth:`failed`, and performs what they return."""

    max_jobs: int | None = None
    burst: bool = False
    recycle_after: int | None = None
    reconnect_max: float = 30.0
    handled: int = 0
    failures: int = 0
    rand: Callable[[float, float], float] = random.uniform

    def goes_on(self, stopping: bool) -> bool:
        """Take another job: not stopped and ``max_jobs`` not reached."""
        return not stopping and (self.max_jobs is None or self.handled < self.max_jobs)

    def limit(self) -> int | None:
        """The most jobs the next turn may claim (``max_jobs`` left), None: no limit."""
        return None if self.max_jobs is None else self.max_jobs - self.handled

    def recycle_due(self, since_recycle: int) -> bool:
        """Drop the connection and renew the job objects before the next job."""
        return self.recycle_after is not None and since_recycle >= self.recycle_after

    def succeeded(self, got: int) -> bool:
        """A turn that reached the database and handled ``got`` jobs.  True when it answered
        again after errors (the driver logs that it is back)."""
        back = self.failures > 0
        self.failures = 0
        self.handled += int(got)
        return back

    def failed(self, err: BaseException) -> float | None:
        """A turn that raised one of :data:`LOOP_ERRORS`.  None: go on at once (the server
        undid a completion, the job runs again); else the seconds to wait, after dropping the
        connection, before the loop reconnects (backoff with jitter)."""
        if isinstance(err, CompletionFailed):
            return None
        self.failures += 1
        return reconnect_delay(self.failures, self.reconnect_max, self.rand)

    def drained(self, got: int) -> bool:
        """Whether to look if the queue is empty (and stop, in ``burst`` mode)."""
        return not got and self.burst


@dataclass
class StopSignals:
    """SIGINT/SIGTERM as the runtimes read them: the first asks for a graceful stop (finish
    the jobs in hand, take no new one), any later one for a forced stop."""

    received: int = 0

    def signal(self) -> Literal["stop", "force"]:
        self.received += 1
        return "stop" if self.received == 1 else "force"
