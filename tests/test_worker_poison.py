"""Poison jobs and runaway loops: a job's own failure is the job's, counted and dead-lettered by
the policy; the loop survives what it should (real servers: MariaDB, and Q4M where it applies).

* A job whose own writes fail when they are flushed after ``execute`` returns (a broken
  constraint; on Q4M the UPDATE of its own row, which the engine refuses with error 1031) used
  to be counted as a lost connection and run again forever, never dead-lettered; in batch mode
  it returned the whole batch each time.
* A Q4M worker whose table disappears (``queue_wait`` returns NULL) used to die.
* ``max_attempts`` on a table without ``attempts``/``run_at`` was silently ignored.

The sync worker and the asyncio worker share these decisions: both are tested.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import pymysql
import pytest
from sqlalchemy import Column
from sqlalchemy import Engine
from sqlalchemy import Integer
from sqlalchemy import MetaData
from sqlalchemy import create_engine
from sqlalchemy import event
from sqlalchemy import func
from sqlalchemy import insert
from sqlalchemy import select
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.orm import Mapped
from sqlalchemy.orm import mapped_column

from sqlalchemy_q4m import Job
from sqlalchemy_q4m import QueueMixin
from sqlalchemy_q4m import RetryMixin
from sqlalchemy_q4m import queue_batch
from sqlalchemy_q4m import queue_session
from sqlalchemy_q4m import queue_table
from sqlalchemy_q4m.exc import UnloadableJob
from sqlalchemy_q4m.types import new_job_id
from sqlalchemy_q4m.worker.asyncio import AsyncConsumer
from sqlalchemy_q4m.worker.asyncio import AsyncJob
from sqlalchemy_q4m.worker.consumer import Consumer
from sqlalchemy_q4m.worker.consumer import Stats
from sqlalchemy_q4m.worker.deadletter import dead_letter_table

DEAD = "tpz_dead_letters"
ASYNC_DRIVERS = ["aiomysql", "asyncmy"]


class Base(DeclarativeBase):
    pass


class PoisonRow(RetryMixin, QueueMixin, Base):
    __tablename__ = "tpz_jobs"
    n: Mapped[int] = mapped_column(Integer)


class Ledger(Base):
    """An InnoDB table with a key the poison job breaks (row 1 is there already)."""

    __tablename__ = "tpz_ledger"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)


def make_tables(engine: Engine) -> None:
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    dead_letter_table(DEAD).drop(engine, checkfirst=True)


def drop_tables(engine: Engine) -> None:
    Base.metadata.drop_all(engine)
    dead_letter_table(DEAD).drop(engine, checkfirst=True)


def put(engine: Engine, *numbers: int) -> None:
    with engine.begin() as conn:
        conn.execute(insert(PoisonRow), [{"id": new_job_id(), "n": n} for n in numbers])


def counted(engine: Engine, table: Any) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar() or 0)


def dead_letters(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(select(dead_letter_table(DEAD))).all())


def run_in_thread(consumer: Consumer, seconds: float) -> bool:
    """``consumer.run(burst=True)``; True when it ended by itself within ``seconds`` (it is
    stopped otherwise)."""
    crashes: list[BaseException] = []

    def work() -> None:
        try:
            consumer.run(burst=True)
        except BaseException as err:  # a crash of the worker thread
            crashes.append(err)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(seconds)
    ended = not thread.is_alive()
    consumer.stop()
    thread.join(30)
    assert not thread.is_alive()
    assert crashes == [], crashes
    return ended


# -- a job's own writes fail at flush (portable) ---------------------------------------------------


@pytest.fixture
def poison_tables(engine: Engine) -> Iterator[Engine]:
    make_tables(engine)
    with engine.begin() as conn:
        conn.execute(insert(Ledger), {"id": 1})
    yield engine
    drop_tables(engine)


def poison_execute(job: Any, row: PoisonRow, runs: collections.Counter[int], how: str) -> None:
    """n == 0 is the poison: it adds a ledger row that breaks the key; the others add theirs."""
    runs[row.n] += 1
    job.session.add(Ledger(id=1 if row.n == 0 else 100 + row.n))
    if row.n == 0 and how == "swallowed":
        with contextlib.suppress(IntegrityError):  # the job's own error handling: the
            job.session.flush()  # session is left unusable


@pytest.mark.integration
@pytest.mark.parametrize("how", ["at_flush", "swallowed"])
@pytest.mark.parametrize("batch_size", [1, 4], ids=["one", "batch"])
def test_a_job_whose_writes_fail_at_flush_is_retried_then_dead_lettered(
    poison_tables: Engine, batch_size: int, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    engine = poison_tables
    runs: collections.Counter[int] = collections.Counter()

    class Poison(Job):
        model = PoisonRow
        dead_letter_table = DEAD
        max_attempts = 2
        retry_base = 0
        reconnect_max = 0.2

        def execute(self, job: PoisonRow) -> None:
            poison_execute(self, job, runs, how)

    put(engine, 0, 1, 2, 3)
    consumer = Consumer([Poison(engine, batch_size=batch_size)], engine)
    with caplog.at_level(logging.INFO):
        assert run_in_thread(consumer, 20), f"still running after 20 s: {dict(runs)}"
    assert runs == {0: 2, 1: 1, 2: 1, 3: 1}  # the poison ran max_attempts times, no more
    counts = consumer.stats.snapshot()
    assert (counts["done"], counts["retried"], counts["dead"], counts["lost"]) == (3, 1, 1, 0)
    (dead,) = dead_letters(engine)
    assert dead.attempts == 2 and "IntegrityError" in dead.error and "1062" in dead.error
    assert counted(engine, PoisonRow) == 0
    with engine.connect() as conn:  # the good jobs' writes stayed, the poison's did not
        assert sorted(conn.execute(select(Ledger.id)).scalars()) == [1, 101, 102, 103]
    assert "reconnecting" not in caplog.text


@pytest.mark.integration
@pytest.mark.parametrize("driver", ASYNC_DRIVERS)
def test_an_async_job_whose_writes_fail_at_flush_is_retried_then_dead_lettered(
    poison_tables: Engine, db_url: URL, driver: str
) -> None:
    engine = poison_tables
    runs: collections.Counter[int] = collections.Counter()

    class AsyncPoison(AsyncJob):
        model = PoisonRow
        dead_letter_table = DEAD
        max_attempts = 2
        retry_base = 0
        reconnect_max = 0.2

        async def execute(self, job: PoisonRow) -> None:
            runs[job.n] += 1
            self.session.add(Ledger(id=1 if job.n == 0 else 100 + job.n))

    put(engine, 0, 1)
    stats = Stats()

    async def main() -> bool:
        aengine = create_async_engine(db_url.set(drivername=f"mysql+{driver}"))
        consumer = AsyncConsumer([AsyncPoison(aengine)], aengine, stats=stats)
        try:
            task = asyncio.create_task(consumer.run(burst=True))
            done, _ = await asyncio.wait({task}, timeout=20)
            if not done:
                consumer.stop()
                await task
            else:
                task.result()
            return bool(done)
        finally:
            await aengine.dispose()

    assert asyncio.run(main()), f"still running after 20 s: {dict(runs)}"
    assert runs == {0: 2, 1: 1}
    counts = stats.snapshot()
    assert (counts["done"], counts["retried"], counts["dead"], counts["lost"]) == (1, 1, 1, 0)
    assert [d.attempts for d in dead_letters(engine)] == [2]
    assert counted(engine, PoisonRow) == 0


# -- max_attempts without retry columns ----------------------------------------------------------

plain_md = MetaData()
plain_jobs = queue_table("tpz_plain", plain_md, Column("n", Integer))


@pytest.fixture
def plain_table(engine: Engine) -> Iterator[Engine]:
    plain_md.drop_all(engine)
    plain_md.create_all(engine)
    with engine.begin() as conn:
        conn.execute(insert(plain_jobs), {"id": new_job_id(), "n": 1})
    yield engine
    plain_md.drop_all(engine)
    dead_letter_table(DEAD).drop(engine, checkfirst=True)


class PlainFailing(Job):
    table_name = "tpz_plain"
    dead_letter_table = DEAD

    def execute(self, job: Any) -> None:
        raise RuntimeError("always")


@pytest.mark.integration
@pytest.mark.parametrize("given", [None, 3], ids=["default", "set"])
def test_max_attempts_on_a_table_without_retry_columns_is_warned_about_at_start_up(
    plain_table: Engine, caplog: pytest.LogCaptureFixture, given: int | None
) -> None:
    class Warned(PlainFailing):  # a class of its own: warned once per process and table
        pass

    options = {} if given is None else {"max_attempts": given}
    with caplog.at_level(logging.INFO):
        job = Warned(plain_table, **options)
        job._get_consumer().connect()  # start-up: before any job is claimed
        warnings = [r for r in caplog.records if "no 'attempts' and 'run_at'" in r.getMessage()]
        assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
        assert f"max_attempts={given or 5} is not used" in warnings[0].getMessage()
        assert "add retry_columns() to the table" in warnings[0].getMessage()
        assert job.run_once(timeout=2)
        job.close()
        again = Warned(plain_table, **options)
        again.run_once(timeout=0.2)
        again.close()

        class ModelJob(Job):
            model = plain_jobs
            dead_letter_table = DEAD
            max_attempts = 4

        ModelJob(plain_table).run_once(timeout=0.2)
    warnings = [r for r in caplog.records if "no 'attempts' and 'run_at'" in r.getMessage()]
    assert len(warnings) == 2 and "Warned" in warnings[0].getMessage()
    assert "ModelJob" in warnings[1].getMessage()
    assert "failed on attempt 1/1" in caplog.text and "1/5" not in caplog.text
    assert [d.attempts for d in dead_letters(plain_table)] == [1]


# -- Q4M ------------------------------------------------------------------------------------------


@pytest.fixture
def q4m(q4m_url: URL) -> Iterator[Engine]:
    engine = create_engine(q4m_url, pool_size=5, max_overflow=5)
    make_tables(engine)
    with engine.begin() as conn:
        engine_name = conn.execute(
            text(
                "SELECT ENGINE FROM information_schema.TABLES "
                "WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'tpz_jobs'"
            )
        ).scalar()
    assert engine_name == "QUEUE"
    yield engine
    drop_tables(engine)
    engine.dispose()


class UpdatesItsRow(Job):
    """On Q4M: changes its own mapped row, so ending it flushes an UPDATE (error 1031)."""

    model = PoisonRow
    dead_letter_table = DEAD
    max_attempts = 2
    retry_base = 0
    reconnect_max = 0.2
    runs: list[int]

    def execute(self, job: PoisonRow) -> None:
        self.runs.append(job.n)
        if job.n == 0:
            self.session  # noqa: B018 - the job is now in the session
            job.n = 99  # an UPDATE at the flush: Q4M refuses it


@pytest.mark.integration
@pytest.mark.native
def test_a_q4m_job_updating_its_own_row_is_retried_then_dead_lettered(q4m: Engine) -> None:
    runs: list[int] = []
    put(q4m, 0, 1)
    job = UpdatesItsRow(q4m)
    job.runs = runs
    consumer = Consumer([job], q4m)
    assert run_in_thread(consumer, 30), f"still running after 30 s: {runs}"
    assert sorted(runs) == [0, 0, 1]
    counts = consumer.stats.snapshot()
    assert (counts["done"], counts["retried"], counts["dead"], counts["lost"]) == (1, 1, 1, 0)
    (dead,) = dead_letters(q4m)
    assert dead.attempts == 2 and "1031" in dead.error
    assert counted(q4m, PoisonRow) == 0


@pytest.mark.integration
@pytest.mark.native
@pytest.mark.parametrize("driver", ASYNC_DRIVERS)
def test_a_q4m_async_job_updating_its_own_row_is_retried_then_dead_lettered(
    q4m: Engine, q4m_url: URL, driver: str
) -> None:
    runs: list[int] = []

    class AsyncUpdatesItsRow(AsyncJob):
        model = PoisonRow
        dead_letter_table = DEAD
        max_attempts = 2
        retry_base = 0
        reconnect_max = 0.2

        async def execute(self, job: PoisonRow) -> None:
            runs.append(job.n)
            self.session.add(job)  # already in it: the job is now the session's
            job.n = 99

    put(q4m, 0)
    stats = Stats()

    async def main() -> bool:
        aengine = create_async_engine(q4m_url.set(drivername=f"mysql+{driver}"))
        consumer = AsyncConsumer([AsyncUpdatesItsRow(aengine)], aengine, stats=stats)
        try:
            task = asyncio.create_task(consumer.run(burst=True))
            done, _ = await asyncio.wait({task}, timeout=30)
            if not done:
                consumer.stop()
                await task
            else:
                task.result()
            return bool(done)
        finally:
            await aengine.dispose()

    assert asyncio.run(main()), f"still running after 30 s: {runs}"
    assert runs == [0, 0]
    counts = stats.snapshot()
    assert (counts["retried"], counts["dead"], counts["lost"]) == (1, 1, 0)
    assert ["1031" in d.error for d in dead_letters(q4m)] == [True]


class Counting(Job):
    model = PoisonRow
    dead_letter_table = DEAD
    reconnect_max = 0.3
    wait_timeout = 0.5

    def execute(self, job: PoisonRow) -> None:
        pass


def wait_until(check: Any, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds}s waiting for {what}")
        time.sleep(0.05)


@pytest.mark.integration
@pytest.mark.native
def test_a_q4m_worker_survives_its_table_disappearing(
    q4m: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    consumer = Consumer([Counting(q4m)], q4m)
    crashes: list[BaseException] = []

    def work() -> None:
        try:
            consumer.run()
        except BaseException as err:
            crashes.append(err)

    thread = threading.Thread(target=work)
    with caplog.at_level(logging.INFO, logger="sqlalchemy_q4m.worker"):
        thread.start()
        try:
            put(q4m, 1)
            wait_until(lambda: consumer.stats.snapshot()["done"] == 1, 15, "the first job")
            PoisonRow.__table__.drop(q4m)
            wait_until(lambda: "returned NULL" in caplog.text, 15, "a logged queue_wait NULL")
            time.sleep(0.5)
            assert thread.is_alive() and crashes == []
            PoisonRow.__table__.create(q4m)
            put(q4m, 2)
            wait_until(lambda: consumer.stats.snapshot()["done"] == 2, 30, "the job after")
        finally:
            consumer.stop()
            thread.join(30)
    assert not thread.is_alive() and crashes == []
    assert "reconnecting in" in caplog.text and "database is back" in caplog.text


@pytest.mark.integration
@pytest.mark.native
@pytest.mark.parametrize("driver", ASYNC_DRIVERS)
def test_a_q4m_async_worker_survives_its_table_disappearing(
    q4m: Engine, q4m_url: URL, driver: str, caplog: pytest.LogCaptureFixture
) -> None:
    class AsyncCounting(AsyncJob):
        model = PoisonRow
        dead_letter_table = DEAD
        reconnect_max = 0.3
        wait_timeout = 0.5

        async def execute(self, job: PoisonRow) -> None:
            pass

    stats = Stats()

    async def until(check: Any, seconds: float, task: asyncio.Task[None]) -> None:
        deadline = time.monotonic() + seconds
        while not check():
            assert not task.done(), "the worker task ended"
            assert time.monotonic() < deadline, "timed out"
            await asyncio.sleep(0.05)

    async def main() -> None:
        aengine = create_async_engine(q4m_url.set(drivername=f"mysql+{driver}"))
        consumer = AsyncConsumer([AsyncCounting(aengine)], aengine, stats=stats)
        task = asyncio.create_task(consumer.run())
        try:
            put(q4m, 1)
            await until(lambda: stats.snapshot()["done"] == 1, 15, task)
            await asyncio.to_thread(PoisonRow.__table__.drop, q4m)
            await until(lambda: "returned NULL" in caplog.text, 15, task)
            await asyncio.sleep(0.5)
            assert not task.done()
            await asyncio.to_thread(PoisonRow.__table__.create, q4m)
            put(q4m, 2)
            await until(lambda: stats.snapshot()["done"] == 2, 30, task)
        finally:
            consumer.stop()
            await asyncio.wait_for(task, 30)
            await aengine.dispose()

    with caplog.at_level(logging.INFO, logger="sqlalchemy_q4m.worker"):
        asyncio.run(main())
    assert "database is back" in caplog.text


# -- a row that cannot be loaded ------------------------------------------------------------------

RAW = "tpz_raw"
BAD_ID = b"\x00bad"  # not 16 bytes: not a job id (sorts first: the head of the queue)


class RawBase(DeclarativeBase):
    pass


class RawRow(RetryMixin, QueueMixin, RawBase):
    """Mapped onto a table made by hand whose ``id`` is VARBINARY(16) (see ``raw_table``)."""

    __tablename__ = RAW
    n: Mapped[int] = mapped_column(Integer)


def raw_table(engine: Engine, native: bool) -> None:
    """``tpz_raw`` with one row whose id is malformed, then two good ones."""
    key = "" if native else ", PRIMARY KEY (id)"
    kind = "QUEUE" if native else "InnoDB"
    with engine.begin() as conn:
        conn.execute(text(f"DROP TABLE IF EXISTS {RAW}"))
        conn.execute(
            text(
                f"CREATE TABLE {RAW} (id VARBINARY(16) NOT NULL, n INT NOT NULL, "
                f"attempts INT NOT NULL DEFAULT 0, run_at BIGINT NOT NULL DEFAULT 0{key}) "
                f"ENGINE={kind}"
            )
        )
        conn.execute(text(f"INSERT INTO {RAW} (id, n) VALUES (:id, 0)"), {"id": BAD_ID})
        for n in (1, 2):
            conn.execute(
                text(f"INSERT INTO {RAW} (id, n) VALUES (:id, :n)"),
                {"id": new_job_id().bytes, "n": n},
            )


def check_buried(engine: Engine, seen: list[int], stats: Stats) -> None:
    assert sorted(seen) == [1, 2]  # the good jobs ran once each
    counts = stats.snapshot()
    assert (counts["done"], counts["dead"], counts["lost"]) == (2, 1, 0)
    (dead,) = dead_letters(engine)
    assert dead.queue == RAW and dead.attempts == 1 and dead.job_id == str(BAD_ID)
    assert "cannot be loaded" in dead.error and '"n": 0' in dead.payload
    with engine.connect() as conn:
        assert conn.execute(text(f"SELECT COUNT(*) FROM {RAW}")).scalar() == 0


@pytest.fixture
def raw_portable(engine: Engine) -> Iterator[Engine]:
    dead_letter_table(DEAD).drop(engine, checkfirst=True)
    raw_table(engine, native=False)
    yield engine
    with engine.begin() as conn:
        conn.execute(text(f"DROP TABLE IF EXISTS {RAW}"))
    dead_letter_table(DEAD).drop(engine, checkfirst=True)


def recording(kind: str, seen: list[int]) -> type[Job]:
    """A job class recording ``n``: on the reflected table, or on ``RawRow``."""

    class Reflected(Job):
        table_name = RAW
        dead_letter_table = DEAD

        def execute(self, job: Any) -> None:
            seen.append(job.n)

    class Declared(Job):
        model = RawRow
        dead_letter_table = DEAD

        def execute(self, job: Any) -> None:
            seen.append(job.n)

    return Reflected if kind == "reflected" else Declared


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["reflected", "model"])
@pytest.mark.parametrize("batch_size", [1, 4], ids=["one", "batch"])
def test_a_row_that_cannot_be_loaded_is_dead_lettered_with_its_raw_values(
    raw_portable: Engine, kind: str, batch_size: int
) -> None:
    seen: list[int] = []
    consumer = Consumer([recording(kind, seen)(raw_portable, batch_size=batch_size)], raw_portable)
    assert run_in_thread(consumer, 20)
    check_buried(raw_portable, seen, consumer.stats)


@pytest.mark.integration
def test_queue_session_and_queue_batch_raise_for_a_row_that_cannot_be_loaded(
    raw_portable: Engine,
) -> None:
    with (
        pytest.raises(UnloadableJob, match="tpz_raw"),
        queue_session(RawRow, bind=raw_portable, timeout=1),
    ):
        pass
    with (
        pytest.raises(UnloadableJob, match="cannot be loaded"),
        queue_batch(RawRow, bind=raw_portable, size=5, timeout=1),
    ):
        pass
    with raw_portable.connect() as conn:  # returned, not lost
        assert conn.execute(text(f"SELECT COUNT(*) FROM {RAW}")).scalar() == 3


@pytest.mark.integration
@pytest.mark.parametrize("driver", ASYNC_DRIVERS)
def test_an_async_worker_dead_letters_a_row_that_cannot_be_loaded(
    raw_portable: Engine, db_url: URL, driver: str
) -> None:
    seen: list[int] = []

    class AsyncRaw(AsyncJob):
        model = RawRow
        dead_letter_table = DEAD

        async def execute(self, job: Any) -> None:
            seen.append(job.n)

    stats = Stats()
    asyncio.run(run_async(db_url, driver, AsyncRaw, stats, 20))
    check_buried(raw_portable, seen, stats)


async def run_async(
    url: URL, driver: str, cls: type[AsyncJob], stats: Stats, seconds: float
) -> None:
    aengine = create_async_engine(url.set(drivername=f"mysql+{driver}"))
    consumer = AsyncConsumer([cls(aengine)], aengine, stats=stats)
    try:
        task = asyncio.create_task(consumer.run(burst=True))
        done, _ = await asyncio.wait({task}, timeout=seconds)
        if not done:
            consumer.stop()
        await task
        assert done, "still running"
    finally:
        await aengine.dispose()


@pytest.fixture
def raw_native(q4m_url: URL) -> Iterator[Engine]:
    engine = create_engine(q4m_url, pool_size=5, max_overflow=5)
    dead_letter_table(DEAD).drop(engine, checkfirst=True)
    raw_table(engine, native=True)
    yield engine
    with engine.begin() as conn:
        conn.execute(text(f"DROP TABLE IF EXISTS {RAW}"))
    dead_letter_table(DEAD).drop(engine, checkfirst=True)
    engine.dispose()


@pytest.mark.integration
@pytest.mark.native
@pytest.mark.parametrize("kind", ["reflected", "model"])
def test_a_q4m_row_that_cannot_be_loaded_is_dead_lettered_with_its_raw_values(
    raw_native: Engine, kind: str
) -> None:
    seen: list[int] = []
    consumer = Consumer([recording(kind, seen)(raw_native)], raw_native)
    assert run_in_thread(consumer, 20)
    check_buried(raw_native, seen, consumer.stats)


@pytest.mark.integration
@pytest.mark.native
@pytest.mark.parametrize("driver", ASYNC_DRIVERS)
def test_a_q4m_async_worker_dead_letters_a_row_that_cannot_be_loaded(
    raw_native: Engine, q4m_url: URL, driver: str
) -> None:
    seen: list[int] = []

    class AsyncRawQ(AsyncJob):
        table_name = RAW
        dead_letter_table = DEAD

        async def execute(self, job: Any) -> None:
            seen.append(job.n)

    stats = Stats()
    asyncio.run(run_async(q4m_url, driver, AsyncRawQ, stats, 20))
    check_buried(raw_native, seen, stats)


# -- a batch lost to a deadlocked completion -------------------------------------------------------


@pytest.mark.integration
def test_a_batch_whose_completion_deadlocks_counts_its_jobs_as_lost_not_done(
    poison_tables: Engine, db_url: URL, caplog: pytest.LogCaptureFixture
) -> None:
    """The server rolls the batch back (1213 on the completion DELETE): every job of it runs
    again.  Its first outcomes were undone, so they are counted as lost, and each job is
    counted done once, when its batch commits (at least once, reported as it happened)."""
    engine = create_engine(db_url, pool_size=2, max_overflow=0)
    failures = [1213]

    @event.listens_for(engine, "before_cursor_execute")
    def deadlock_once(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.startswith("DELETE") and failures:
            failures.pop()
            cursor.connection.rollback()  # a deadlock victim loses its whole transaction
            raise pymysql.err.OperationalError(1213, "Deadlock found (injected)")

    runs: collections.Counter[int] = collections.Counter()

    class Counting(Job):
        model = PoisonRow
        dead_letter_table = DEAD
        batch_size = 3

        def execute(self, job: PoisonRow) -> None:
            runs[job.n] += 1

    put(poison_tables, 1, 2, 3)
    consumer = Consumer([Counting(engine)], engine)
    try:
        with caplog.at_level(logging.INFO):
            assert run_in_thread(consumer, 20)
    finally:
        engine.dispose()
    assert runs == {1: 2, 2: 2, 3: 2}  # the whole batch ran again
    counts = consumer.stats.snapshot()
    assert (counts["done"], counts["lost"]) == (3, 3)
    assert "1213" in caplog.text and "will run again" in caplog.text
    assert counted(poison_tables, PoisonRow) == 0
