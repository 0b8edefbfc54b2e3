"""The worker with ``batch_size`` > 1: many jobs claimed per transaction (portable backend),
each one still ended, returned, retried or dead-lettered on its own; in-process and as
``q4m worker --batch-size`` subprocesses against the real server."""

from __future__ import annotations

import collections
import json
import logging
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Column
from sqlalchemy import Engine
from sqlalchemy import Integer
from sqlalchemy import MetaData
from sqlalchemy import Table
from sqlalchemy import create_engine
from sqlalchemy import insert
from sqlalchemy import select
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.orm import Mapped
from sqlalchemy.orm import Session
from sqlalchemy.orm import mapped_column
from worker_jobs import read_log
from worker_support import count_rows
from worker_support import q4m_env
from worker_support import run_q4m
from worker_support import start_q4m
from worker_support import stop
from worker_support import wait_for

from sqlalchemy_q4m import Job
from sqlalchemy_q4m import PriorityMixin
from sqlalchemy_q4m import QueueMixin
from sqlalchemy_q4m import RetryMixin
from sqlalchemy_q4m import queue_table
from sqlalchemy_q4m.exc import Q4MError
from sqlalchemy_q4m.schema.retry import retry_columns
from sqlalchemy_q4m.types import new_job_id
from sqlalchemy_q4m.worker import consumer as worker_module
from sqlalchemy_q4m.worker.consumer import Consumer
from sqlalchemy_q4m.worker.deadletter import dead_letter_table

DEAD = "twb_dead_letters"
meta = MetaData()
rows = queue_table("twb_rows", meta, Column("n", Integer, nullable=False), *retry_columns())
high = queue_table("twb_high", meta, Column("n", Integer, nullable=False))
low = queue_table("twb_low", meta, Column("n", Integer, nullable=False))
log_table = Table(
    "twb_log", meta, Column("n", Integer), mysql_engine="InnoDB", mariadb_engine="InnoDB"
)


class Base(DeclarativeBase):
    metadata = meta  # one MetaData: the fixture creates and drops every table at once


class TaskRow(RetryMixin, PriorityMixin, QueueMixin, Base):
    __tablename__ = "twb_tasks"
    n: Mapped[int] = mapped_column(Integer)


@pytest.fixture
def tables(engine: Engine) -> Iterator[None]:
    for step in (meta.drop_all, meta.create_all):
        step(engine)
    yield
    for table in (*meta.sorted_tables, dead_letter_table(DEAD)):
        table.drop(engine, checkfirst=True)


@pytest.fixture
def claims(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The size of every batch the worker claimed (a spy on ``QueueBatch.wait``)."""
    sizes: list[int] = []
    original = worker_module.QueueBatch.wait

    def wait(self: Any) -> list[Any]:
        jobs: list[Any] = original(self)
        if jobs:
            sizes.append(len(jobs))
        return jobs

    monkeypatch.setattr(worker_module.QueueBatch, "wait", wait)
    return sizes


def put(engine: Engine, table: Table, *values: dict[str, Any]) -> None:
    with engine.begin() as conn:
        conn.execute(insert(table), [{"id": new_job_id(), **v} for v in values])


def logged(engine: Engine, source: Table = log_table) -> list[Any]:
    """The rows of ``source`` (default: the ``n`` each job wrote to ``twb_log``, sorted)."""
    with engine.connect() as conn:
        found = list(conn.execute(select(source)).all())
    return sorted(n for (n,) in found) if source is log_table else found


class Writer(Job):
    """Writes its ``n`` to ``twb_log`` through ``self.session``; behaviour set per test."""

    table_name = "twb_rows"
    dead_letter_table = DEAD
    retry_base = 0
    batch_size = 10

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.seen: list[int] = []

    def execute(self, job: Any) -> None:
        self.seen.append(job.n)
        self.session.execute(insert(log_table).values(n=job.n))


# -- options ------------------------------------------------------------------------------------


@pytest.mark.unit
def test_batch_size_is_validated() -> None:
    engine = create_engine("mariadb+pymysql://nobody@127.0.0.1/none")  # never connects
    for bad in (0, -1, 10_001, True, 2.5, "10"):
        with pytest.raises(Q4MError, match="batch_size must be an integer"):
            Writer(engine, batch_size=bad)
    assert Writer(engine).batch_size == 10 and Job.batch_size == 1
    assert Writer(engine, batch_size=3).batch_size == 3


@pytest.mark.unit
def test_native_backend_and_end_before_execute_take_one_job_at_a_time(
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine = create_engine("mariadb+pymysql://nobody@127.0.0.1/none")  # never connects
    native = Consumer([Writer(engine)], engine)
    native._backend = "native"
    with caplog.at_level(logging.INFO, logger="sqlalchemy_q4m.worker"):
        assert native._batch_size() == 1 and native._batch_size() == 1
    assert caplog.text.count("batch_size 10 ignored") == 1  # logged once
    assert "native backend" in caplog.text
    at_most_once = Consumer([Writer(engine, end_before_execute=True)], engine)
    at_most_once._backend = "portable"
    assert at_most_once._batch_size() == 1
    portable = Consumer([Writer(engine)], engine)
    portable._backend = "portable"
    assert portable._batch_size() == 10


# -- in-process consumers -----------------------------------------------------------------------


def rolled_back(text: str) -> int:
    """Jobs in batches the server rolled back at completion (a deadlock between the ``DELETE
    ... IN`` of concurrent batches: every job of such a batch runs again, by design)."""
    return sum(int(n) for n in re.findall(r"batch of (\d+) job\(s\) not completed", text))


@pytest.mark.integration
def test_batched_threads_drain_every_job_exactly_once(
    engine: Engine, tables: None, claims: list[int], caplog: pytest.LogCaptureFixture
) -> None:
    put(engine, rows, *({"n": n} for n in range(400)))
    jobs = [Writer(engine, batch_size=25) for _ in range(4)]
    consumers = [Consumer([job], engine, name=f"w{i}") for i, job in enumerate(jobs)]
    threads = [threading.Thread(target=c.run, kwargs={"burst": True}) for c in consumers]
    with caplog.at_level(logging.WARNING, logger="sqlalchemy_q4m.worker"):
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    assert not any(thread.is_alive() for thread in threads)
    again = rolled_back(caplog.text)
    seen = collections.Counter(n for job in jobs for n in job.seen)
    assert set(seen) == set(range(400)) and sum(seen.values()) == 400 + again
    # exactly once where it counts: each job's write committed once, with its removal
    assert logged(engine) == list(range(400))
    assert count_rows(engine, rows) == 0
    assert sum(claims) == 400 + again and max(claims) == 25 and len(claims) < 400 / 5 + again
    assert sum(c.stats.snapshot()["done"] for c in consumers) == 400 + again


@pytest.mark.integration
def test_earlier_tables_fill_the_batch_first_and_delayed_jobs_wait(
    engine: Engine, tables: None, claims: list[int]
) -> None:
    order: list[int] = []

    class Both(Job):
        table_name = ("twb_high", "twb_low")
        dead_letter_table = DEAD
        batch_size = 50

        def execute(self, job: Any) -> None:
            order.append(job.n)

    put(engine, low, *({"n": n} for n in range(3)))
    put(engine, high, *({"n": n} for n in range(10, 13)))
    job = Both(engine)
    assert job.run_once(timeout=2)
    assert order == [10, 11, 12, 0, 1, 2]  # one batch, the earlier table first
    assert claims == [6]
    job.close()

    class Tasks(Job):
        model = TaskRow
        dead_letter_table = DEAD
        batch_size = 50

        def execute(self, job: Any) -> None:
            tasks.append(job.n)

    tasks: list[int] = []
    later = int(time.time()) + 2
    with Session(engine) as s:
        s.add_all([TaskRow(n=n, priority=p) for n, p in ((1, 0), (2, 5), (3, 1))])
        s.add(TaskRow(n=4, priority=9, run_at=later))
        s.commit()
    task_job = Tasks(engine)
    assert task_job.run_once(timeout=2)
    assert tasks == [2, 3, 1]  # priority order inside the batch; the delayed one not yet
    assert task_job.run_once(timeout=5)
    assert tasks == [2, 3, 1, 4] and time.time() >= later
    task_job.close()


@pytest.mark.integration
def test_failures_inside_a_batch_are_retried_then_dead_lettered(
    engine: Engine, tables: None
) -> None:
    class Failing(Writer):
        max_attempts = 3

        def execute(self, job: Any) -> None:
            super().execute(job)  # the write is undone with the failure (its savepoint)
            if job.n % 2:
                raise RuntimeError(f"odd {job.n}")

    put(engine, rows, *({"n": n} for n in range(6)))
    job = Failing(engine)
    consumer = job._get_consumer()
    job.run(burst=True)
    assert collections.Counter(job.seen) == {0: 1, 2: 1, 4: 1, 1: 3, 3: 3, 5: 3}
    assert logged(engine) == [0, 2, 4]  # only the successful jobs' writes
    counts = consumer.stats.snapshot()
    assert (counts["done"], counts["retried"], counts["dead"]) == (3, 6, 3)
    dead = logged(engine, dead_letter_table(DEAD))
    assert sorted(json.loads(d.payload)["n"] for d in dead) == [1, 3, 5]
    assert {d.attempts for d in dead} == {3} and all("odd" in d.error for d in dead)
    assert count_rows(engine, rows) == 0


@pytest.mark.integration
def test_an_aborted_job_returns_to_the_queue_and_its_writes_are_undone(
    engine: Engine, tables: None, claims: list[int]
) -> None:
    class Aborter(Writer):
        def execute(self, job: Any) -> None:
            super().execute(job)
            if job.n == 1 and self.seen.count(1) == 1:
                self.queue_abort()

    put(engine, rows, *({"n": n} for n in range(3)))
    job = Aborter(engine)
    assert job.run_once(timeout=2)
    assert count_rows(engine, rows) == 1  # the aborted one is back, untouched
    with engine.connect() as conn:
        ((n, attempts),) = conn.execute(select(rows.c.n, rows.c.attempts)).all()
    assert (n, attempts) == (1, 0)
    assert logged(engine) == [0, 2]
    assert job.run_once(timeout=2)
    assert sorted(job.seen) == [0, 1, 1, 2] and logged(engine) == [0, 1, 2]
    assert claims == [3, 1] and count_rows(engine, rows) == 0
    assert job._get_consumer().stats.snapshot()["aborted"] == 1
    job.close()


@pytest.mark.integration
def test_a_stop_finishes_the_job_in_hand_and_returns_the_rest_of_the_batch(
    engine: Engine, tables: None, caplog: pytest.LogCaptureFixture
) -> None:
    class Stopper(Writer):
        def execute(self, job: Any) -> None:
            super().execute(job)
            if len(self.seen) == 3:
                self.stop()  # as the first SIGTERM does: this job still finishes

    put(engine, rows, *({"n": n} for n in range(10)))
    job = Stopper(engine)
    with caplog.at_level(logging.INFO, logger="sqlalchemy_q4m.worker"):
        job.run()
    assert len(job.seen) == 3
    assert count_rows(engine, rows) == 7 and len(logged(engine)) == 3
    assert "7 unstarted job(s) of the batch returned" in caplog.text


@pytest.mark.integration
def test_a_lost_connection_returns_the_whole_batch_and_the_worker_reconnects(
    engine: Engine, tables: None, caplog: pytest.LogCaptureFixture
) -> None:
    class Killer(Writer):
        reconnect_max = 0.2

        def execute(self, job: Any) -> None:
            super().execute(job)
            if len(self.seen) == 3:  # the server kills the worker's connection mid-batch
                cid = self.session.execute(text("SELECT CONNECTION_ID()")).scalar()
                with engine.connect() as admin:
                    admin.execute(text(f"KILL {int(cid or 0)}"))
                self.session.execute(text("SELECT 1"))

    put(engine, rows, *({"n": n} for n in range(5)))
    job = Killer(engine)
    with caplog.at_level(logging.INFO):
        job.run(burst=True)
    runs = collections.Counter(job.seen)
    assert set(runs) == set(range(5))
    assert sum(runs.values()) == 5 + 3  # the three run before the loss ran again
    assert logged(engine) == list(range(5))  # the lost batch's writes were undone
    assert count_rows(engine, rows) == 0 and logged(engine, dead_letter_table(DEAD)) == []
    assert "a batch of 5 job(s)" in caplog.text and "database is back" in caplog.text


# -- q4m worker --batch-size as subprocesses -------------------------------------------------------


def url_of(db_url: URL) -> str:
    return db_url.render_as_string(hide_password=False)


def enqueue(db_url: URL, count: int) -> None:
    lines = "".join(f'{{"n": {n}}}\n' for n in range(1, count + 1))
    result = run_q4m("enqueue", "twb_rows", "--url", url_of(db_url), input=lines)
    assert result.returncode == 0, result.stderr


@pytest.mark.acceptance
def test_two_batched_processes_run_every_job_exactly_once(
    db_url: URL, engine: Engine, tables: None, tmp_path: Path
) -> None:
    enqueue(db_url, 2000)
    log = tmp_path / "jobs.log"
    env = q4m_env(
        WORKER_LOG=str(log), WORKER_TABLE="twb_rows", Q4M_BATCH_SIZE="100", WORKER_WAIT_PIDS="2"
    )
    result = run_q4m(
        *_worker_args(db_url, "--burst", "--processes", "2", "--log-level", "DEBUG"),
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "claimed a batch of 100 job(s)" in result.stderr
    events = read_log(str(log))
    runs = collections.Counter(n for e, n, _ in events if e == "done")
    assert set(runs) == set(range(1, 2001))  # none lost; more than once only if rolled back
    assert sum(runs.values()) == 2000 + rolled_back(result.stderr)
    assert len({pid for _, _, pid in events}) == 2
    assert count_rows(engine, rows) == 0
    assert "batch_size" not in result.stderr  # not degraded: portable backend


def _worker_args(db_url: URL, *extra: str) -> list[str]:
    return ["worker", "worker_jobs:RecordJob", "--url", url_of(db_url), *extra]


def _batched_worker(db_url: URL, log: Path, output: Path, pause: str, *extra: str) -> Any:
    env = q4m_env(WORKER_LOG=str(log), WORKER_TABLE="twb_rows", WORKER_SLEEP=pause)
    return start_q4m(*_worker_args(db_url, "--batch-size", "10", *extra), env=env, output=output)


@pytest.mark.acceptance
def test_every_job_a_sigkilled_batched_worker_held_runs_again_elsewhere(
    db_url: URL, engine: Engine, tables: None, tmp_path: Path
) -> None:
    enqueue(db_url, 15)
    log = tmp_path / "jobs.log"
    victim = _batched_worker(db_url, log, tmp_path / "victim.out", "0.4")
    other = None
    try:
        wait_for(lambda: sum(1 for e, _, _ in read_log(str(log)) if e == "done") >= 2, 60, "jobs")
        victim.send_signal(signal.SIGKILL)
        victim.wait(30)
        held = {n for _, n, _ in read_log(str(log))}  # started, some finished, none committed
        assert 2 <= len(held) <= 3 and count_rows(engine, rows) == 15
        other = _batched_worker(db_url, log, tmp_path / "other.out", "0", "--burst")
        assert other.wait(60) == 0
    finally:
        stop(victim)
        if other is not None:
            stop(other)
    by_other = collections.Counter(
        n for e, n, pid in read_log(str(log)) if e == "done" and pid == other.pid
    )
    assert set(by_other) == set(range(1, 16)) and set(by_other.values()) == {1}
    assert count_rows(engine, rows) == 0


@pytest.mark.acceptance
def test_sigterm_finishes_the_job_in_hand_and_returns_the_rest_of_the_batch(
    db_url: URL, engine: Engine, tables: None, tmp_path: Path
) -> None:
    enqueue(db_url, 15)
    log, output = tmp_path / "jobs.log", tmp_path / "worker.out"
    process = _batched_worker(db_url, log, output, "0.4")
    try:
        wait_for(lambda: sum(1 for e, _, _ in read_log(str(log)) if e == "start") >= 2, 60, "jobs")
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        stop(process)
    events = read_log(str(log))
    started = [n for e, n, _ in events if e == "start"]
    finished = [n for e, n, _ in events if e == "done"]
    assert started == finished and 2 <= len(finished) <= 3  # the job in hand finished
    assert count_rows(engine, rows) == 15 - len(finished)  # finished ones removed, rest back
    assert f"{10 - len(finished)} unstarted job(s) of the batch returned" in output.read_text()
