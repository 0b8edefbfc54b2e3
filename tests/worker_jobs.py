"""Job classes the worker acceptance tests run in subprocesses (``worker_jobs:RecordJob``).

Each run appends one line ``<event> <n> <pid>`` to the file named by ``WORKER_LOG`` with a
single ``O_APPEND`` write, so lines from many processes never interleave.  Tables come from
``WORKER_TABLE`` so that every test module uses its own.
"""

from __future__ import annotations

import os
import time
from typing import Any

from sqlalchemy_q4m import Job


def record(event: str, n: Any) -> None:
    fd = os.open(os.environ["WORKER_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{event} {n} {os.getpid()}\n".encode())
    finally:
        os.close(fd)


def read_log(path: str) -> list[tuple[str, int, int]]:
    """The log lines as ``(event, n, pid)``."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [(e, int(n), int(p)) for e, n, p in (line.split() for line in f if line.strip())]


_all_peers_seen = False


def await_peers() -> None:
    """With ``WORKER_WAIT_PIDS=N``: block until N processes have written to the log (60 s at
    most, once per process), so that no process drains the queue before the others have even
    started -- as one did on a loaded machine, where spawning a process takes seconds."""
    global _all_peers_seen
    want = int(os.environ.get("WORKER_WAIT_PIDS", "0"))
    if want <= 1 or _all_peers_seen:
        return
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if len({pid for _, _, pid in read_log(os.environ["WORKER_LOG"])}) >= want:
            break
        time.sleep(0.05)
    _all_peers_seen = True


class RecordJob(Job):
    """Records ``start``, sleeps ``WORKER_SLEEP`` seconds, records ``done``, then waits for
    ``WORKER_WAIT_PIDS`` processes (see :func:`await_peers`)."""

    table_name = os.environ.get("WORKER_TABLE", "record_jobs")
    max_attempts = int(os.environ.get("WORKER_MAX_ATTEMPTS", "5"))
    retry_base = float(os.environ.get("WORKER_RETRY_BASE", "0"))

    def execute(self, job: Any) -> None:
        n = job[0]
        pause = float(os.environ.get("WORKER_SLEEP", "0"))
        if pause:
            record("start", n)
            time.sleep(pause)
        record("done", n)
        await_peers()


class FlakyJob(RecordJob):
    """Fails while fewer than ``WORKER_FAILURES`` runs failed before (``-1``: always)."""

    def execute(self, job: Any) -> None:
        failures = int(os.environ.get("WORKER_FAILURES", "2"))
        record("run", job[0])
        if failures < 0 or self.attempts < failures:
            raise RuntimeError(f"flaky job {job[0]} failing on attempt {self.attempts + 1}")
        record("done", job[0])


class NotAJob:
    """Not a Job subclass: the CLI must refuse it."""
