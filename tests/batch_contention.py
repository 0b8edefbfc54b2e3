"""Concurrent ``queue_batch`` consumers on a small, busy table: how many batches lose their
completion to a deadlock, and how many jobs run more than once.

Used by ``tests/test_batch_contention.py`` (short runs) and runnable on its own for the numbers
(``python tests/batch_contention.py [URL] [SECONDS]``, default the local MariaDB, 20 s).
"""

from __future__ import annotations

import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from dataclasses import field
from typing import Any

from sqlalchemy import Column
from sqlalchemy import Engine
from sqlalchemy import Integer
from sqlalchemy import MetaData
from sqlalchemy import Table
from sqlalchemy import create_engine
from sqlalchemy import func
from sqlalchemy import insert
from sqlalchemy import select
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from sqlalchemy_q4m import queue_batch
from sqlalchemy_q4m import queue_table
from sqlalchemy_q4m.backends.base import error_code
from sqlalchemy_q4m.exc import CompletionFailed
from sqlalchemy_q4m.types import new_job_id


@dataclass
class Contention:
    """What the consumers saw."""

    batches: int = 0
    jobs: int = 0
    completion_deadlocks: int = 0  # batches lost to CompletionFailed
    claim_errors: Counter[int | None] = field(default_factory=Counter)
    runs: Counter[Any] = field(default_factory=Counter)  # job id -> times handled
    produced: int = 0
    left: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def ran_twice(self) -> int:
        return sum(1 for n in self.runs.values() if n > 1)

    def summary(self) -> str:
        lost = self.completion_deadlocks / self.batches if self.batches else 0.0
        twice = self.ran_twice / len(self.runs) if self.runs else 0.0
        return (
            f"{self.batches} batches, {self.completion_deadlocks} lost to a completion "
            f"deadlock ({lost:.1%}); {self.jobs} jobs handled, {len(self.runs)} distinct, "
            f"{self.ran_twice} ran more than once ({twice:.1%}); produced {self.produced}, "
            f"left {self.left}; claim errors {dict(self.claim_errors)}"
        )


def contention_table(engine: Engine, name: str) -> Table:
    metadata = MetaData()
    table = queue_table(name, metadata, Column("n", Integer, nullable=False))
    metadata.drop_all(engine)
    metadata.create_all(engine)
    return table


def run_contention(
    engine: Engine,
    table: Table,
    *,
    seconds: float,
    consumers: int = 4,
    size: int = 200,
    backlog: int = 600,
) -> Contention:
    """``consumers`` threads loop over ``queue_batch(size=size)`` while a producer keeps about
    ``backlog`` jobs queued (a small table: below the size where the optimizer prefers the
    primary key for a long ``IN`` list); then the queue is drained."""
    result = Contention()
    stop = threading.Event()
    producing = threading.Event()
    producing.set()

    def produce() -> None:
        n = 0
        with engine.connect() as conn:
            while producing.is_set():
                queued = conn.execute(select(func.count()).select_from(table)).scalar() or 0
                conn.commit()
                want = max(0, backlog - int(queued))
                if want:
                    rows = [{"id": new_job_id(), "n": n + i} for i in range(want)]
                    conn.execute(insert(table), rows)
                    conn.commit()
                    n += want
                    with result.lock:
                        result.produced += want
                time.sleep(0.005)

    def consume() -> None:
        while not stop.is_set():
            seen: list[Any] = []
            try:
                with queue_batch(table, bind=engine, size=size, timeout=0.2) as batch:
                    for row in batch:
                        with batch.handle(row):
                            seen.append(row.id)  # the job "runs"
            except CompletionFailed:  # rolled back: every job of the batch runs again
                with result.lock:
                    result.batches += 1
                    result.completion_deadlocks += 1
                    result.jobs += len(seen)
                    result.runs.update(seen)
                continue
            except OperationalError as err:
                with result.lock:
                    result.claim_errors[error_code(err)] += 1
                continue
            if seen:
                with result.lock:
                    result.batches += 1
                    result.jobs += len(seen)
                    result.runs.update(seen)

    producer = threading.Thread(target=produce, name="producer")
    threads = [threading.Thread(target=consume, name=f"c{i}") for i in range(consumers)]
    producer.start()
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    producing.clear()
    producer.join(30)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            left = int(conn.execute(select(func.count()).select_from(table)).scalar() or 0)
        if left == 0:
            break
        time.sleep(0.1)
    stop.set()
    for thread in threads:
        thread.join(30)
    with engine.connect() as conn:
        result.left = int(conn.execute(select(func.count()).select_from(table)).scalar() or 0)
    return result


def main(argv: list[str]) -> None:  # pragma: no cover - a measurement, run by hand
    url = argv[1] if len(argv) > 1 else "mysql+pymysql://root@127.0.0.1:3306"
    seconds = float(argv[2]) if len(argv) > 2 else 20.0
    name = f"q4m_contention_{uuid.uuid4().hex[:8]}"
    admin = create_engine(url)
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE `{name}`"))
    engine = create_engine(f"{url.rstrip('/')}/{name}", pool_size=8)
    try:
        table = contention_table(engine, "contention_jobs")
        print(run_contention(engine, table, seconds=seconds).summary())
    finally:
        engine.dispose()
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE `{name}`"))
        admin.dispose()


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv)
