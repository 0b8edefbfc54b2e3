"""What the blocking and the asyncio queue consumers' process tests share: three consumer
processes drain a queue, the first SIGKILLed while it runs jobs, then lost and doubled jobs
are counted (``tests/test_queue_consumer.py``, ``tests/test_async_queue_consumer.py``)."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from collections import Counter
from collections.abc import Callable
from collections.abc import Iterable

#: The ``by`` of the consumer process that is killed.
KILLED = 99


def drain_one_killed(
    process: Callable[[str, str, int, float], None],
    dsn: str,
    backend: str,
    done_by: Callable[[], Iterable[int]],
) -> None:
    """``process(dsn, backend, by, hold)`` started as a slow consumer (``by`` = KILLED, 0.05 s
    per job), SIGKILLed once ``done_by()`` (the ``by`` of every job written) counts three of
    its jobs; then two more drain the queue and must exit cleanly."""
    ctx = multiprocessing.get_context("spawn")
    slow = ctx.Process(target=process, args=(dsn, backend, KILLED, 0.05))
    slow.start()
    deadline = time.monotonic() + 60
    while sum(1 for by in done_by() if by == KILLED) < 3:
        assert time.monotonic() < deadline and slow.is_alive()
        time.sleep(0.05)
    os.kill(slow.pid or 0, signal.SIGKILL)
    slow.join(10)
    others = [ctx.Process(target=process, args=(dsn, backend, i, 0.0)) for i in range(2)]
    for p in others:
        p.start()
    for p in others:
        p.join(120)
    assert [p.exitcode for p in others] == [0, 0]


def check_once(done: Counter[str], payloads: list[str], backend: str) -> None:
    """Every job ran (none lost); on InnoDB each once (its write commits with its removal),
    on Q4M at most one twice (its write commits just before ``queue_end()``: a kill between
    the two runs that job again, at least once)."""
    assert sorted(done) == sorted(payloads), "lost jobs"
    doubled = [p for p, n in done.items() if n > 1]
    if backend == "portable":
        assert doubled == [], "doubled jobs"
    else:
        assert len(doubled) <= 1 and max(done.values()) <= 2, doubled
