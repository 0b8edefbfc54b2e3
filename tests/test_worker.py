"""The job class and its consumer loop in-process, against the real server (portable backend)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Column
from sqlalchemy import Engine
from sqlalchemy import Integer
from sqlalchemy import MetaData
from sqlalchemy import Table
from sqlalchemy import Text
from sqlalchemy import func
from sqlalchemy import insert
from sqlalchemy import select
from sqlalchemy import text
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.orm import Mapped
from sqlalchemy.orm import Session
from sqlalchemy.orm import mapped_column

from sqlalchemy_q4m import Job
from sqlalchemy_q4m import PriorityMixin
from sqlalchemy_q4m import QueueAbort
from sqlalchemy_q4m import QueueMixin
from sqlalchemy_q4m import RetryMixin
from sqlalchemy_q4m import queue_table
from sqlalchemy_q4m.exc import Q4MError
from sqlalchemy_q4m.exc import QueueTableError
from sqlalchemy_q4m.schema.retry import retry_columns
from sqlalchemy_q4m.types import new_job_id
from sqlalchemy_q4m.worker.consumer import Consumer
from sqlalchemy_q4m.worker.deadletter import dead_letter_table

pytestmark = pytest.mark.integration

DEAD = "tw_dead_letters"
meta = MetaData()
rows = queue_table("tw_rows", meta, Column("command", Text), Column("n", Integer), *retry_columns())
plain = queue_table("tw_plain", meta, Column("n", Integer))
high = queue_table("tw_high", meta, Column("n", Integer))
low = queue_table("tw_low", meta, Column("n", Integer))
log_table = Table(
    "tw_log", meta, Column("n", Integer), mysql_engine="InnoDB", mariadb_engine="InnoDB"
)


class Base(DeclarativeBase):
    pass


class TaskRow(RetryMixin, PriorityMixin, QueueMixin, Base):
    __tablename__ = "tw_tasks"
    n: Mapped[int] = mapped_column(Integer)


@pytest.fixture
def tables(engine: Engine) -> Iterator[None]:
    meta.drop_all(engine)
    Base.metadata.drop_all(engine)
    meta.create_all(engine)
    Base.metadata.create_all(engine)
    yield
    meta.drop_all(engine)
    Base.metadata.drop_all(engine)
    dead_letter_table(DEAD).drop(engine, checkfirst=True)


def put(engine: Engine, table: Table, *values: dict[str, Any]) -> None:
    with engine.begin() as conn:
        conn.execute(insert(table), [{"id": new_job_id(), **v} for v in values])


def count(engine: Engine, table: Table) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar() or 0)


def all_rows(engine: Engine, table: Table) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(select(table)).all())


def dead_rows(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(select(dead_letter_table(DEAD))).all())


class Recorder(Job):
    """Records what execute received; behaviour set per test."""

    table_name = "tw_rows"
    dead_letter_table = DEAD
    retry_base = 0

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.seen: list[Any] = []

    def execute(self, job: Any) -> None:
        self.seen.append(job)


def test_a_row_job_gets_a_tuple_of_the_payload_columns(engine: Engine, tables: None) -> None:
    put(engine, rows, {"command": "echo hello", "n": 7})
    job = Recorder(engine)
    assert job.run_once(timeout=2) is True
    (got,) = job.seen
    assert got[0] == "echo hello" and got.command == "echo hello" and got[1] == 7
    assert tuple(got) == ("echo hello", 7, 0, 0)
    assert count(engine, rows) == 0
    started = time.monotonic()
    assert job.run_once(timeout=0.3) is False
    assert 0.25 <= time.monotonic() - started < 2
    job.close()


def test_the_default_table_name_comes_from_the_class_name(engine: Engine, tables: None) -> None:
    class TwPlain(Job):
        dead_letter_table = DEAD

        def execute(self, job: Any) -> None:
            got.append(job.n)

    got: list[int] = []
    put(engine, plain, {"n": 1})
    job = TwPlain(engine)
    assert job.table_names() == ["tw_plains"]
    with pytest.raises(QueueTableError, match="tw_plains"):
        job.run_once(timeout=0.1)
    other = TwPlain(engine, table_name="tw_plain")
    assert other.run_once(timeout=2) and got == [1]
    job.close()
    other.close()


def test_a_model_job_gets_the_instance_and_its_session_commits_with_the_end(
    engine: Engine, tables: None
) -> None:
    class TaskJob(Job):
        model = TaskRow
        dead_letter_table = DEAD
        retry_base = 0

        def execute(self, job: Any) -> None:
            assert isinstance(job, TaskRow)
            self.session.execute(insert(log_table).values(n=job.n))
            if job.n == 2:
                raise RuntimeError("fails after writing")

    with Session(engine) as s:
        s.add_all([TaskRow(n=1), TaskRow(n=2)])
        s.commit()
    job = TaskJob(engine, max_attempts=2)
    assert job.run_once(timeout=2) and job.run_once(timeout=2) and job.run_once(timeout=2)
    with engine.connect() as conn:  # the failing job's write was undone, twice
        assert conn.execute(select(log_table.c.n)).scalars().all() == [1]
    assert count(engine, TaskRow.__table__) == 0  # type: ignore[arg-type]
    (dead,) = dead_rows(engine)
    assert dead.queue == "tw_tasks" and dead.attempts == 2
    job.close()


def test_queue_abort_returns_the_job_untouched(engine: Engine, tables: None) -> None:
    class Aborter(Recorder):
        def execute(self, job: Any) -> None:
            super().execute(job)
            if len(self.seen) == 1:
                self.queue_abort()
            elif len(self.seen) == 2:
                raise QueueAbort()

    put(engine, rows, {"command": "x", "n": 1})
    (before,) = all_rows(engine, rows)
    job = Aborter(engine)
    assert job.run_once(timeout=2) and job.run_once(timeout=2)
    (after,) = all_rows(engine, rows)
    assert after == before  # same id, attempts not counted
    assert job.run_once(timeout=2)
    assert count(engine, rows) == 0 and len(job.seen) == 3
    assert job._consumer is not None and job._consumer.stats.snapshot()["aborted"] == 2
    job.close()


def test_a_failing_job_is_retried_then_dead_lettered(
    engine: Engine, tables: None, caplog: pytest.LogCaptureFixture
) -> None:
    class Failing(Recorder):
        def execute(self, job: Any) -> None:
            super().execute(job)
            raise ValueError(f"bad input {job.n}")

    put(engine, rows, {"command": "x", "n": 5})
    (original,) = all_rows(engine, rows)
    job = Failing(engine, max_attempts=3)
    with caplog.at_level(logging.INFO):
        assert job.run_once(timeout=2)
        (copy,) = all_rows(engine, rows)
        assert copy.attempts == 1 and copy.id != original.id
        assert copy.command == "x" and copy.n == 5
        assert abs(copy.run_at - time.time()) < 3
        assert job.run_once(timeout=2) and job.run_once(timeout=2)
    assert count(engine, rows) == 0
    (dead,) = dead_rows(engine)
    assert dead.queue == "tw_rows" and dead.attempts == 3
    assert dead.error == "ValueError: bad input 5"
    assert "Traceback" in dead.traceback and "bad input 5" in dead.traceback
    assert '"command": "x"' in dead.payload and '"n": 5' in dead.payload
    assert [j.attempts for j in job.seen] == [0, 1, 2]
    failures = [r for r in caplog.records if "failed on attempt" in r.getMessage()]
    assert len(failures) == 3
    assert all(r.getMessage().startswith("tw_rows ") for r in failures)  # table and id
    assert "dead after 3 attempt(s)" in caplog.text
    job.close()


def test_backoff_delays_the_retry(engine: Engine, tables: None) -> None:
    class Failing(Recorder):
        def execute(self, job: Any) -> None:
            raise RuntimeError("later")

    put(engine, rows, {"command": "x", "n": 1})
    job = Failing(engine, retry_base=30, retry_jitter=0)
    before = int(time.time())
    assert job.run_once(timeout=2)
    (copy,) = all_rows(engine, rows)
    assert before + 30 <= copy.run_at <= int(time.time()) + 30
    assert job.run_once(timeout=0.3) is False  # not due yet
    job.close()


def test_a_table_without_retry_columns_dead_letters_at_once(engine: Engine, tables: None) -> None:
    class PlainJob(Job):
        table_name = "tw_plain"
        dead_letter_table = DEAD

        def execute(self, job: Any) -> None:
            raise RuntimeError("no retry columns")

    put(engine, plain, {"n": 1})
    job = PlainJob(engine)
    assert job.run_once(timeout=2)
    assert count(engine, plain) == 0 and dead_rows(engine)[0].attempts == 1
    job.close()


def test_delayed_jobs_wait_for_their_time(engine: Engine, tables: None) -> None:
    now = int(time.time())
    put(engine, rows, {"command": "later", "n": 1, "run_at": now + 3600})
    put(engine, rows, {"command": "now", "n": 2, "run_at": now - 1})
    put(engine, rows, {"command": "soon", "n": 3, "run_at": now + 2})
    job = Recorder(engine)
    assert job.run_once(timeout=1) and job.seen[-1].command == "now"
    assert job.run_once(timeout=0.2) is False
    assert job.run_once(timeout=4) and job.seen[-1].command == "soon"
    assert count(engine, rows) == 1
    job.close()


def test_earlier_tables_win(engine: Engine, tables: None) -> None:
    class Both(Recorder):
        table_name = ("tw_high", "tw_low")

    put(engine, low, {"n": 1}, {"n": 2})
    put(engine, high, {"n": 10})
    job = Both(engine)
    while job.run_once(timeout=0.2):
        pass
    assert [r.n for r in job.seen] == [10, 1, 2]
    job.close()


def test_a_priority_column_orders_claims_on_the_portable_backend(
    engine: Engine, tables: None
) -> None:
    class TaskJob(Job):
        model = TaskRow
        dead_letter_table = DEAD

        def execute(self, job: Any) -> None:
            order.append(job.n)

    order: list[int] = []
    with Session(engine) as s:
        s.add_all([TaskRow(n=n, priority=p) for n, p in ((1, 0), (2, 5), (3, 1), (4, 5))])
        s.commit()
    job = TaskJob(engine)
    while job.run_once(timeout=0.2):
        pass
    assert order == [2, 4, 3, 1]
    job.close()
    with Session(engine) as s:  # a reflected table's "priority" column counts too
        s.add_all([TaskRow(n=n, priority=p) for n, p in ((5, 1), (6, 9))])
        s.commit()
    reflected = Recorder(engine, table_name="tw_tasks")
    while reflected.run_once(timeout=0.2):
        pass
    assert [r.n for r in reflected.seen] == [6, 5]
    reflected.close()


def test_end_before_execute_is_at_most_once(engine: Engine, tables: None) -> None:
    class Failing(Recorder):
        end_before_execute = True

        def execute(self, job: Any) -> None:
            assert count(engine, rows) == 0  # already gone while it runs
            raise RuntimeError("lost for good")

    put(engine, rows, {"command": "x", "n": 1})
    job = Failing(engine)
    assert job.run_once(timeout=2)
    assert count(engine, rows) == 0
    assert dead_rows(engine)[0].attempts == 1  # no retry: the job was already ended
    job.close()


def test_recycle_after_makes_fresh_job_objects(engine: Engine, tables: None) -> None:
    instances: dict[int, Any] = {}  # id -> the object, kept alive so no id() is reused

    class Counting(Recorder):
        def execute(self, job: Any) -> None:
            instances[id(self)] = self

    put(engine, rows, *({"command": "x", "n": n} for n in range(5)))
    job = Counting(engine, recycle_after=2)
    consumer = Consumer([job], engine)
    consumer.run(burst=True)
    assert count(engine, rows) == 0
    assert consumer.stats.snapshot()["done"] == 5
    assert len(instances) == 3  # 2 + 2 + 1


def _connection_id(consumer: Consumer) -> int:
    conn = consumer._conn
    assert conn is not None
    return int(conn.execute(text("SELECT CONNECTION_ID()")).scalar() or 0)


def test_a_lost_connection_is_reopened_and_the_job_in_hand_runs_again(
    engine: Engine, tables: None, caplog: pytest.LogCaptureFixture
) -> None:
    started = threading.Event()
    release = threading.Event()
    runs: list[int] = []

    class Slow(Recorder):
        def execute(self, job: Any) -> None:
            runs.append(job.n)
            if len(runs) == 1:
                started.set()
                release.wait(10)

    put(engine, rows, {"command": "x", "n": 1})
    job = Slow(engine, reconnect_max=0.5)
    consumer = Consumer([job], engine)
    consumer.connect()
    victim = _connection_id(consumer)
    consumer._conn.rollback()  # type: ignore[union-attr]
    thread = threading.Thread(target=consumer.run)
    with caplog.at_level(logging.INFO):
        thread.start()
        assert started.wait(10)
        with engine.connect() as admin:
            admin.execute(text(f"KILL CONNECTION {victim}"))
        release.set()
        deadline = time.monotonic() + 15
        while consumer.stats.snapshot()["done"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        consumer.stop()
        thread.join(10)
    assert not thread.is_alive()
    assert runs == [1, 1]  # returned by the server when its connection died, then run again
    assert consumer.stats.snapshot()["lost"] == 1
    assert count(engine, rows) == 0
    assert "reconnecting in" in caplog.text and "database is back" in caplog.text


def test_where_conditions_on_reflected_and_declared_tables(engine: Engine, tables: None) -> None:
    class Big(Recorder):
        where = lambda table: table.c.n >= 5  # noqa: E731 - a reflected table's condition

    put(engine, rows, *({"command": "x", "n": n} for n in (1, 7, 3, 9)))
    job = Big(engine)
    while job.run_once(timeout=0.2):
        pass
    assert sorted(r.n for r in job.seen) == [7, 9]
    by_name = Recorder(engine, table_name=("tw_high", "tw_rows"), where={"tw_rows": rows.c.n < 3})
    put(engine, high, {"n": 100})
    with pytest.raises(Q4MError, match="belongs to"):  # rows.c is not the reflected table
        by_name.run_once(timeout=0.2)
    reflected = Recorder(
        engine, table_name=("tw_high", "tw_rows"), where={"tw_rows": lambda t: t.c.n < 3}
    )
    while reflected.run_once(timeout=0.2):
        pass
    assert [r.n for r in reflected.seen] == [100, 1]
    assert count(engine, rows) == 1  # n = 3 stays
    for j in (job, by_name, reflected):
        j.close()


def test_a_job_can_run_on_a_connection_the_caller_owns(engine: Engine, tables: None) -> None:
    put(engine, rows, {"command": "x", "n": 1}, {"command": "y", "n": 2})
    with engine.connect() as conn:
        job = Recorder(conn)
        assert job.run_once(timeout=2) and job.run_once(timeout=2)
        job.close()
        assert not conn.closed  # the caller's connection stays the caller's
        assert conn.execute(select(func.count()).select_from(rows)).scalar() == 0
    assert [r.n for r in job.seen] == [1, 2]


def test_run_until_max_jobs_or_stop(engine: Engine, tables: None) -> None:
    put(engine, rows, *({"command": "x", "n": n} for n in range(3)))
    job = Recorder(engine)
    job.run(max_jobs=2)
    assert len(job.seen) == 2 and count(engine, rows) == 1
    runner = threading.Thread(target=job.run)
    runner.start()
    wait_until = time.monotonic() + 10
    while len(job.seen) < 3 and time.monotonic() < wait_until:
        time.sleep(0.02)
    job.stop()  # from another thread: the loop ends within one wait
    runner.join(5)
    assert not runner.is_alive() and len(job.seen) == 3


@pytest.mark.parametrize("swallow", [False, True], ids=["raises", "swallows"])
def test_a_connection_killed_inside_execute_returns_the_job_and_the_worker_goes_on(
    engine: Engine, tables: None, caplog: pytest.LogCaptureFixture, swallow: bool
) -> None:
    runs: list[Any] = []
    crashes: list[BaseException] = []

    class KillsItsConnection(Recorder):
        reconnect_max = 0.2

        def execute(self, job: Any) -> None:
            runs.append(self.job_id)
            if len(runs) > 1:
                return
            # the server KILLs the worker's own connection while execute uses it
            cid = self.session.execute(text("SELECT CONNECTION_ID()")).scalar()
            with engine.connect() as admin:
                admin.execute(text(f"KILL {int(cid or 0)}"))
            try:
                self.session.execute(text("SELECT 1"))
            except Exception:
                if not swallow:
                    raise

    put(engine, rows, {"command": "x", "n": 1})
    consumer = Consumer([KillsItsConnection(engine)], engine)

    def work() -> None:
        try:
            consumer.run(burst=True)
        except BaseException as err:  # a crash of the worker thread
            crashes.append(err)

    thread = threading.Thread(target=work)
    with caplog.at_level(logging.INFO):
        thread.start()
        thread.join(30)
    assert not thread.is_alive() and crashes == []
    assert len(runs) == 2 and runs[0] == runs[1]  # the same job (no retry copy), run again
    counts = consumer.stats.snapshot()
    assert (counts["lost"], counts["done"], counts["retried"], counts["dead"]) == (1, 1, 0, 0)
    assert count(engine, rows) == 0 and dead_rows(engine) == []
    assert "reconnecting in" in caplog.text and "database is back" in caplog.text
