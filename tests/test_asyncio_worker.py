"""Async job classes and the asyncio worker runtime against the real server.

Each test runs its own event loop and disposes its async engine inside it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from collections.abc import Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from sqlalchemy import Column
from sqlalchemy import Engine
from sqlalchemy import Integer
from sqlalchemy import MetaData
from sqlalchemy import String
from sqlalchemy import Text
from sqlalchemy import create_engine
from sqlalchemy import insert
from sqlalchemy import select
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.orm import Mapped
from sqlalchemy.orm import mapped_column
from sqlalchemy.pool import NullPool

from sqlalchemy_q4m import QueueAbort
from sqlalchemy_q4m import QueueMixin
from sqlalchemy_q4m import queue_table
from sqlalchemy_q4m.exc import Q4MError
from sqlalchemy_q4m.schema.retry import RetryMixin
from sqlalchemy_q4m.worker.asyncio import AsyncJob
from sqlalchemy_q4m.worker.asyncio import is_async_job_class
from sqlalchemy_q4m.worker.asyncio_runtime import AsyncWorkers
from sqlalchemy_q4m.worker.asyncio_runtime import run_async_workers
from sqlalchemy_q4m.worker.asyncio_runtime import worker_engine
from sqlalchemy_q4m.worker.consumer import Stats
from sqlalchemy_q4m.worker.job import Job
from sqlalchemy_q4m.worker.runtime import EXIT_ERROR
from sqlalchemy_q4m.worker.runtime import EXIT_FORCED
from sqlalchemy_q4m.worker.runtime import EXIT_OK

DRIVERS = ["aiomysql", "asyncmy"]
DEAD = "test_asyncio_worker_dead"


class Base(DeclarativeBase):
    pass


class WJob(RetryMixin, QueueMixin, Base):
    __tablename__ = "test_asyncio_worker_jobs"
    payload: Mapped[str] = mapped_column(Text)
    fail_times: Mapped[int] = mapped_column(Integer, default=0)


class WLog(Base):
    __tablename__ = "test_asyncio_worker_log"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    note: Mapped[str] = mapped_column(String(100))


core_md = MetaData()
rows_table = queue_table("test_asyncio_worker_rows", core_md, Column("command", Text))


@pytest.fixture(scope="module")
def tables(engine: Engine) -> Iterator[None]:
    Base.metadata.create_all(engine)
    core_md.create_all(engine)
    yield
    Base.metadata.drop_all(engine)
    core_md.drop_all(engine)
    with engine.begin() as conn:
        conn.execute(text(f"DROP TABLE IF EXISTS {DEAD}"))


@pytest.fixture(autouse=True)
def _clean(request: pytest.FixtureRequest) -> Iterator[None]:
    if "tables" not in request.fixturenames:  # unit tests: no server to reach for
        yield
        return
    engine: Engine = request.getfixturevalue("engine")
    yield
    with engine.begin() as conn:
        for table in (WJob.__table__, WLog.__table__, rows_table):
            conn.execute(table.delete())
        conn.execute(text(f"DROP TABLE IF EXISTS {DEAD}"))


@pytest.fixture(params=DRIVERS)
def async_url(request: pytest.FixtureRequest, db_url: URL, tables: None) -> URL:
    url: URL = db_url.set(drivername=f"mysql+{request.param}")
    return url


@pytest.fixture
def asyncmy_url(db_url: URL, tables: None) -> URL:
    url: URL = db_url.set(drivername="mysql+asyncmy")
    return url


@asynccontextmanager
async def async_engine(url: URL, **kw: Any) -> AsyncIterator[AsyncEngine]:
    eng = create_async_engine(url, **kw)
    try:
        yield eng
    finally:
        await eng.dispose()


def enqueue(engine: Engine, *payloads: str, fail_times: int = 0) -> list[uuid.UUID]:
    with engine.begin() as conn:
        result = conn.execute(
            insert(WJob).returning(WJob.id),
            [{"payload": p, "fail_times": fail_times} for p in payloads],
        )
        return [row[0] for row in result]


def queued(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return sorted(conn.execute(select(WJob.payload)).scalars())


def dead_letters(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(text(f"SELECT queue, attempts, error FROM {DEAD}")))


# -- unit ------------------------------------------------------------------------------------


@pytest.mark.unit
def test_execute_must_be_a_coroutine_function() -> None:
    with pytest.raises(Q4MError, match="async def"):

        class Bad(AsyncJob):
            model = WJob

            def execute(self, job: Any) -> None:  # type: ignore[override]
                pass


@pytest.mark.unit
def test_async_jobs_need_an_async_bind() -> None:
    class Fine(AsyncJob):
        model = WJob

        async def execute(self, job: Any) -> None:
            pass

    assert is_async_job_class(Fine) and not is_async_job_class(Job)
    sync = create_engine("mysql+pymysql://root@127.0.0.1/x", poolclass=NullPool)
    with pytest.raises(Q4MError, match="async driver"):
        Fine(sync)

    async def main() -> None:
        eng = create_async_engine("mysql+asyncmy://root@127.0.0.1/x")
        try:
            assert Fine(eng).async_bind is eng
            with pytest.raises(Q4MError, match="not an AsyncJob"):
                AsyncWorkers([Job], eng)
            with pytest.raises(Q4MError, match="concurrency"):
                AsyncWorkers([Fine], eng, concurrency=0)
            with pytest.raises(Q4MError, match="no job class"):
                AsyncWorkers([], eng)
        finally:
            await eng.dispose()

    asyncio.run(main())


# -- integration -----------------------------------------------------------------------------


@pytest.mark.integration
def test_tasks_drain_the_queue_each_job_once(async_url: URL, engine: Engine) -> None:
    ids = set(enqueue(engine, *(f"p{i}" for i in range(400))))
    seen: list[uuid.UUID] = []

    class Collect(AsyncJob):
        model = WJob
        dead_letter_table = DEAD

        async def execute(self, job: WJob) -> None:
            assert isinstance(self.session, AsyncSession)
            seen.append(job.id)
            await asyncio.sleep(0)

    stats = Stats()

    async def main() -> int:
        eng = worker_engine(async_url, 20)
        try:
            return await run_async_workers(
                [Collect], eng, concurrency=20, burst=True, stats=stats, install_signals=False
            )
        finally:
            await eng.dispose()

    assert asyncio.run(main()) == EXIT_OK
    assert Counter(seen) == Counter(ids)
    assert stats.snapshot()["done"] == len(ids)
    assert queued(engine) == []


@pytest.mark.integration
def test_failures_are_retried_then_dead_lettered(async_url: URL, engine: Engine) -> None:
    enqueue(engine, "flaky", fail_times=2)
    enqueue(engine, "broken", fail_times=99)
    runs: Counter[str] = Counter()

    class Flaky(AsyncJob):
        model = WJob
        max_attempts = 3
        retry_base = 0.0
        dead_letter_table = DEAD

        async def execute(self, job: WJob) -> None:
            runs[job.payload] += 1
            assert job.attempts == runs[job.payload] - 1  # the copy counts the failures
            if job.attempts < job.fail_times:
                raise RuntimeError(f"{job.payload} failed")

    stats = Stats()

    async def main() -> int:
        async with async_engine(async_url) as eng:
            return await run_async_workers(
                [Flaky], eng, concurrency=2, burst=True, stats=stats, install_signals=False
            )

    assert asyncio.run(main()) == EXIT_OK
    assert runs == {"flaky": 3, "broken": 3}
    assert queued(engine) == []
    assert [(q, a) for q, a, _ in dead_letters(engine)] == [(WJob.__tablename__, 3)]
    assert "broken failed" in dead_letters(engine)[0].error
    counts = stats.snapshot()
    assert (counts["done"], counts["retried"], counts["dead"]) == (1, 4, 1)


@pytest.mark.integration
def test_run_once_abort_and_session_writes(asyncmy_url: URL, engine: Engine) -> None:
    enqueue(engine, "abort me")

    class Writer(AsyncJob):
        model = WJob
        dead_letter_table = DEAD
        mode = "abort"

        async def execute(self, job: WJob) -> None:
            self.session.add(WLog(note=f"{self.mode} {job.payload}"))
            await self.session.flush()
            if self.mode == "abort":
                self.queue_abort()
            elif self.mode == "raise":
                raise QueueAbort

    async def main() -> None:
        async with async_engine(asyncmy_url) as eng:
            job = Writer(eng)
            try:
                assert await job.run_once(timeout=5) is True  # queue_abort(): back, undone
                job.mode = "raise"
                assert await job.run_once(timeout=5) is True  # QueueAbort: same
                job.mode = "done"
                assert await job.run_once(timeout=5) is True
                assert await job.run_once(timeout=0.2) is False
            finally:
                await job.close()
            assert eng.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]

    asyncio.run(main())
    assert queued(engine) == []
    with engine.connect() as conn:
        assert list(conn.execute(select(WLog.note)).scalars()) == ["done abort me"]


@pytest.mark.integration
def test_rows_without_a_model_are_tuples(asyncmy_url: URL, engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(insert(rows_table), [{"command": "echo hi"}])
    got: list[Any] = []

    class TestAsyncioWorkerRow(AsyncJob):  # -> table "test_asyncio_worker_rows"
        dead_letter_table = DEAD

        async def execute(self, job: Any) -> None:
            got.append(tuple(job))

    async def main() -> None:
        async with async_engine(asyncmy_url) as eng:
            worker = TestAsyncioWorkerRow(eng)
            await worker.run(burst=True)

    asyncio.run(main())
    assert got == [("echo hi",)]


@pytest.mark.integration
def test_graceful_stop_finishes_jobs_in_hand(asyncmy_url: URL, engine: Engine) -> None:
    enqueue(engine, *(f"s{i}" for i in range(10)))
    started: list[str] = []
    finished: list[str] = []
    # Each job runs until the test has asked for the stop: with a fixed duration instead, a
    # task that started late (under load) let an early one finish and take a fourth job.
    stopped = asyncio.Event()

    class Slow(AsyncJob):
        model = WJob
        dead_letter_table = DEAD

        async def execute(self, job: WJob) -> None:
            started.append(job.payload)
            await stopped.wait()
            finished.append(job.payload)

    async def main() -> int:
        async with async_engine(asyncmy_url) as eng:
            workers = AsyncWorkers([Slow], eng, concurrency=3)
            run = asyncio.create_task(workers.run(install_signals=False))
            while len(started) < 3:
                await asyncio.sleep(0.01)
            workers.stop()
            stopped.set()
            return await asyncio.wait_for(run, 30)

    assert asyncio.run(main()) == EXIT_OK
    assert len(started) == 3 and sorted(finished) == sorted(started)
    assert len(queued(engine)) == 7


@pytest.mark.integration
def test_second_signal_returns_the_jobs_in_hand(asyncmy_url: URL, engine: Engine) -> None:
    enqueue(engine, *(f"h{i}" for i in range(5)))
    started: list[str] = []
    finished: list[str] = []

    class Hang(AsyncJob):
        model = WJob
        dead_letter_table = DEAD

        async def execute(self, job: WJob) -> None:
            started.append(job.payload)
            await asyncio.sleep(60)
            finished.append(job.payload)

    async def main() -> int:
        async with async_engine(asyncmy_url) as eng:
            workers = AsyncWorkers([Hang], eng, concurrency=2)
            run = asyncio.create_task(workers.run())
            while len(started) < 2:
                await asyncio.sleep(0.01)
            os.kill(os.getpid(), signal.SIGTERM)  # graceful: the hanging jobs go on
            deadline = asyncio.get_running_loop().time() + 10
            while workers.signals < 1:  # handled in the loop, whenever it gets there
                assert asyncio.get_running_loop().time() < deadline, "SIGTERM not handled"
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)
            assert not run.done() and workers.signals == 1
            os.kill(os.getpid(), signal.SIGTERM)  # forced: cancelled, jobs returned
            code = await asyncio.wait_for(run, 10)
            assert eng.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
            return code

    previous = signal.getsignal(signal.SIGTERM)
    assert asyncio.run(main()) == EXIT_FORCED
    assert signal.getsignal(signal.SIGTERM) is previous  # handlers restored
    assert len(started) == 2 and finished == []
    assert len(queued(engine)) == 5  # nothing lost


@pytest.mark.integration
def test_grace_period_forces_the_stop(asyncmy_url: URL, engine: Engine) -> None:
    enqueue(engine, "stuck")
    started = asyncio.Event()

    class Stuck(AsyncJob):
        model = WJob
        dead_letter_table = DEAD

        async def execute(self, job: WJob) -> None:
            started.set()
            await asyncio.sleep(60)

    async def main() -> int:
        async with async_engine(asyncmy_url) as eng:
            workers = AsyncWorkers([Stuck], eng, concurrency=1, grace=0.3)
            run = asyncio.create_task(workers.run(install_signals=False))
            await asyncio.wait_for(started.wait(), 10)
            workers.stop()
            return await asyncio.wait_for(run, 10)

    assert asyncio.run(main()) == EXIT_FORCED
    assert queued(engine) == ["stuck"]


@pytest.mark.integration
def test_a_crashing_task_stops_the_others_with_exit_error(
    asyncmy_url: URL, engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    class NoSuchTable(AsyncJob):
        table_name = "test_asyncio_worker_missing"

        async def execute(self, job: Any) -> None:
            raise AssertionError("never runs")

    class Fine(AsyncJob):
        model = WJob
        dead_letter_table = DEAD

        async def execute(self, job: WJob) -> None:
            pass

    async def main() -> int:
        async with async_engine(asyncmy_url) as eng:
            workers = AsyncWorkers([Fine], eng, concurrency=2)
            # one task of a healthy pair gets a table that does not exist
            workers.consumers[1].jobs = [NoSuchTable(eng)]
            return await asyncio.wait_for(workers.run(install_signals=False), 10)

    assert asyncio.run(main()) == EXIT_ERROR
    assert "task-2 crashed" in caplog.text and "does not exist" in caplog.text


@pytest.mark.integration
@pytest.mark.parametrize("swallow", [False, True], ids=["raises", "swallows"])
def test_a_killed_connection_is_replaced_and_the_job_runs_again(
    async_url: URL, engine: Engine, swallow: bool
) -> None:
    (job_id,) = enqueue(engine, "survivor")
    runs: list[uuid.UUID] = []

    class KillsItsConnection(AsyncJob):
        model = WJob
        dead_letter_table = DEAD
        reconnect_max = 0.2

        async def execute(self, job: WJob) -> None:
            runs.append(job.id)
            if len(runs) == 1:  # the server goes away under the first run
                cid = (await self.session.execute(text("SELECT CONNECTION_ID()"))).scalar()
                await asyncio.to_thread(kill, int(cid or 0))
                try:
                    await self.session.execute(text("SELECT 1"))
                except Exception:
                    if not swallow:  # swallowed, the job is still lost with its connection
                        raise

    def kill(cid: int) -> None:
        with engine.connect() as conn:
            conn.execute(text(f"KILL {cid}"))

    stats = Stats()

    async def main() -> int:
        async with async_engine(async_url) as eng:
            return await run_async_workers(
                [KillsItsConnection], eng, burst=True, stats=stats, install_signals=False
            )

    assert asyncio.run(main()) == EXIT_OK
    assert runs == [job_id, job_id]  # returned by the server, run again, not lost
    counts = stats.snapshot()
    assert (counts["lost"], counts["done"], counts["dead"]) == (1, 1, 0)
    assert queued(engine) == []


@pytest.mark.integration
def test_one_queue_consumer_serves_every_job_until_the_connection_changes(
    async_url: URL, engine: Engine
) -> None:
    """The jobs of one connection are takes of one asyncio queue consumer (set up once, on
    the same connection: the same ``CONNECTION_ID()``); a recycle (a new connection) makes a
    new one, and the jobs go on."""
    enqueue(engine, *"abcd")
    seen: list[tuple[Any, int]] = []

    class Noting(AsyncJob):
        model = WJob
        dead_letter_table = DEAD

        async def execute(self, job: WJob) -> None:
            cid = (await self.session.execute(text("SELECT CONNECTION_ID()"))).scalar()
            seen.append((consumer._async_queue_consumer, int(cid or 0)))

    async def main() -> None:
        nonlocal consumer
        async with async_engine(async_url) as eng:
            job = Noting(eng)
            consumer = job._async_consumer()
            try:
                for _ in range(2):
                    assert await job.run_once(timeout=5)
                await consumer.recycle_async()
                consumer = job._async_consumer()
                for _ in range(2):
                    assert await job.run_once(timeout=5)
            finally:
                await job.close()

    consumer: Any = None
    asyncio.run(main())
    assert len(seen) == 4 and queued(engine) == []
    (first, c1), (second, c2), (third, c3), (fourth, c4) = seen
    assert first is second and c1 == c2 and first is not None
    assert third is fourth and c3 == c4
    assert third is not first and c3 != c1


@pytest.mark.integration
def test_recycle_and_end_before_execute(
    asyncmy_url: URL, engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    enqueue(engine, *(f"r{i}" for i in range(5)))
    objects: dict[int, Any] = {}  # id -> the object, kept alive so no id() is reused
    runs: list[str] = []

    class Recycled(AsyncJob):
        model = WJob
        dead_letter_table = DEAD
        recycle_after = 2
        end_before_execute = True  # at most once: a failure is buried, never retried

        async def execute(self, job: WJob) -> None:
            objects[id(self)] = self
            runs.append(job.payload)
            if job.payload == "r0":
                raise RuntimeError("r0 fails once and for all")

    caplog.set_level(logging.INFO, "sqlalchemy_q4m.worker")

    async def main() -> None:
        async with async_engine(asyncmy_url) as eng:
            await Recycled(eng).run(burst=True)

    asyncio.run(main())
    assert sorted(runs) == [f"r{i}" for i in range(5)]  # r0 ran once only
    assert len(objects) == 3  # fresh job objects after 2 and 4 jobs
    assert caplog.text.count("recycling after 2 jobs") == 2
    assert [(q, a) for q, a, _ in dead_letters(engine)] == [(WJob.__tablename__, 1)]
    assert queued(engine) == []
