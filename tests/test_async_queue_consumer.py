"""``async with queue_consumer(...)``: the asyncio queue consumer, on MariaDB (portable) and
on the Q4M engine (native), over asyncmy and aiomysql.

The behaviours every queue session has run for its takes in ``tests/test_consumer_drivers.py``
(``async-consumer``), and its statements per job in ``tests/test_statement_counts.py``; here
is what is the consumer's own, as ``tests/test_queue_consumer.py`` has it for the blocking
one: one connection for every job, each bind between jobs, after a loss, after a cancelled
wait and on close, the refusals, and real concurrent consumers (tasks, and processes with one
SIGKILLed) counting lost and doubled jobs.  Each test runs its own event loop and creates and
disposes its async engine inside it.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable
from collections.abc import Callable
from collections.abc import Iterator
from typing import Any
from typing import ClassVar

import pytest
from consumer_kills import check_once
from consumer_kills import drain_one_killed
from native_support import tables_on
from sqlalchemy import Engine
from sqlalchemy import Integer
from sqlalchemy import Text
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
from sqlalchemy_q4m import queue_consumer
from sqlalchemy_q4m import queue_session
from sqlalchemy_q4m import use_backend
from sqlalchemy_q4m.asyncio import AsyncQueueConsumer
from sqlalchemy_q4m.exc import AlreadyOwning
from sqlalchemy_q4m.exc import ConnectionLost
from sqlalchemy_q4m.exc import NotOwner
from sqlalchemy_q4m.exc import Q4MError


class Base(DeclarativeBase):
    pass


class AJob(QueueMixin, Base):
    __tablename__ = "test_async_consumer_jobs"
    payload: Mapped[str] = mapped_column(Text)
    n: Mapped[int] = mapped_column(Integer)  # its place in the enqueue call (conditions)


class ADone(Base):
    """What a job writes through its session (InnoDB on both servers)."""

    __tablename__ = "test_async_consumer_done"
    __table_args__: ClassVar[dict[str, str]] = {"mysql_engine": "InnoDB"}
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    payload: Mapped[str] = mapped_column(Text)
    by: Mapped[int] = mapped_column(Integer)


SERVERS = [
    pytest.param("portable", marks=pytest.mark.integration),
    pytest.param("native", marks=[pytest.mark.native, pytest.mark.integration]),
]


@pytest.fixture(scope="module", params=SERVERS)
def server(request: pytest.FixtureRequest) -> Iterator[tuple[str, URL, Engine]]:
    with tables_on(request, request.param, Base.metadata, "q4m_async_consumer") as (url, eng):
        use_backend(eng, request.param)
        yield request.param, url, eng


@pytest.fixture
def eng(server: tuple[str, URL, Engine]) -> Iterator[Engine]:
    engine = server[2]
    yield engine
    with engine.begin() as conn:
        conn.execute(AJob.__table__.delete())
        conn.execute(ADone.__table__.delete())


@pytest.fixture(params=["asyncmy", "aiomysql"])
def driver(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def async_engine(server: tuple[str, URL, Engine], driver: str, **kw: Any) -> AsyncEngine:
    backend, url, _ = server
    engine = create_async_engine(url.set(drivername=f"mysql+{driver}"), **kw)
    use_backend(engine.sync_engine, backend)  # type: ignore[arg-type]
    return engine


def run(
    server: tuple[str, URL, Engine],
    driver: str,
    scenario: Callable[[AsyncEngine], Awaitable[Any]],
    **kw: Any,
) -> Any:
    """``scenario(engine)`` in an event loop of its own, on an async engine made and disposed
    in it."""

    async def main() -> Any:
        engine = async_engine(server, driver, **kw)
        try:
            return await scenario(engine)
        finally:
            await engine.dispose()

    return asyncio.run(main())


def enqueue(engine: Engine, *payloads: str) -> None:
    with engine.begin() as conn:
        conn.execute(insert(AJob), [{"payload": p, "n": i} for i, p in enumerate(payloads)])


def queued(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return sorted(conn.execute(select(AJob.payload)).scalars())


async def connection_id(qs: Any) -> int:
    conn = await qs.connection()
    return int((await conn.exec_driver_sql("SELECT CONNECTION_ID()")).scalar())


def kill(engine: Engine, thread_id: int) -> None:
    with engine.connect() as admin:
        admin.exec_driver_sql(f"KILL {int(thread_id)}")


def test_one_connection_serves_every_job_and_goes_back_on_close(
    eng: Engine, server: Any, driver: str
) -> None:
    enqueue(eng, *"abcde")

    async def scenario(engine: AsyncEngine) -> tuple[list[str], set[int], int]:
        ids, got = set(), []
        consumer = queue_consumer(AJob, bind=engine, timeout=0)
        assert isinstance(consumer, AsyncQueueConsumer)
        async with consumer:
            while True:
                qs = consumer.take()
                async with qs as job:
                    if job is None:
                        break
                    got.append(job.payload)
                    ids.add(await connection_id(qs))
            out = engine.sync_engine.pool.checkedout()  # type: ignore[attr-defined]
        return got, ids, out

    got, ids, checked_out = run(server, driver, scenario)
    assert sorted(got) == list("abcde") and queued(eng) == []
    assert len(ids) == 1 and checked_out == 1


def test_an_async_connection_bind_stays_the_callers(eng: Engine, server: Any, driver: str) -> None:
    """Nothing of the caller's AsyncConnection is taken between jobs: it runs its own
    statements there, and the consumer's close leaves it open."""
    enqueue(eng, "a", "b")

    async def scenario(engine: AsyncEngine) -> list[str]:
        got: list[str] = []
        async with engine.connect() as conn:
            if server[0] == "portable":
                conn = await conn.execution_options(isolation_level="READ COMMITTED")
            consumer = queue_consumer(AJob, bind=conn, timeout=0)
            for _ in range(2):
                async with consumer.take() as job:
                    assert job is not None
                    got.append(job.payload)
                left = (await conn.execute(select(AJob.payload))).scalars().all()
                assert left == (["b"] if len(got) == 1 else [])
                await conn.rollback()
            await consumer.close()
            assert not conn.closed and (await conn.execute(text("SELECT 1"))).scalar() == 1
        return got

    assert run(server, driver, scenario) == ["a", "b"]


def test_an_exception_returns_the_job_and_the_next_take_gets_it(
    eng: Engine, server: Any, driver: str
) -> None:
    enqueue(eng, "a")

    async def scenario(engine: AsyncEngine) -> None:
        async with queue_consumer(AJob, bind=engine, timeout=0) as consumer:
            with pytest.raises(RuntimeError):
                async with consumer.take() as job:
                    assert job is not None
                    raise RuntimeError("boom")
            async with consumer.take() as job:
                assert job is not None and job.payload == "a"
                raise QueueAbort  # swallowed, returned
            async with consumer.take() as job:
                assert job is not None and job.payload == "a"

    run(server, driver, scenario)
    assert queued(eng) == []


def test_refusals(eng: Engine, server: Any, driver: str) -> None:
    """A take while the last job is waited for or owned, and after close, is refused; a
    finished job's session and connection are not the block's any more; the owner record
    refuses a second queue session on the connection only while a job is owned."""
    enqueue(eng, "a", "b", "c")

    async def scenario(engine: AsyncEngine) -> None:
        async with engine.connect() as conn:
            if server[0] == "portable":
                conn = await conn.execution_options(isolation_level="READ COMMITTED")
            consumer = queue_consumer(AJob, bind=conn, timeout=0)
            qs = consumer.take()
            assert await qs.wait() is not None
            with pytest.raises(Q4MError, match="not finished"):
                consumer.take()
            with pytest.raises(AlreadyOwning):
                await queue_session(AJob, bind=conn, timeout=0).wait()
            await qs.end()
            with pytest.raises(NotOwner):
                qs.session  # noqa: B018
            async with queue_session(AJob, bind=conn, timeout=0) as other:  # free between jobs
                assert other is not None and other.payload == "b"
            await consumer.close()
            await consumer.close()  # twice is fine
            with pytest.raises(Q4MError, match="closed"):
                consumer.take()

    run(server, driver, scenario)
    assert queued(eng) == ["c"]


def test_close_returns_a_job_still_owned(eng: Engine, server: Any, driver: str) -> None:
    enqueue(eng, "a")

    async def scenario(engine: AsyncEngine) -> None:
        consumer = queue_consumer(AJob, bind=engine, timeout=0)
        assert await consumer.take().wait() is not None
        await consumer.close()
        assert queued(eng) == ["a"]

    run(server, driver, scenario)
    assert queued(eng) == ["a"]


def test_where_per_take(eng: Engine, server: Any, driver: str) -> None:
    enqueue(eng, "a", "b", "c")

    async def scenario(engine: AsyncEngine) -> None:
        async with queue_consumer(AJob, bind=engine, timeout=0) as consumer:
            async with consumer.take(where=AJob.n == 2) as job:
                assert job is not None and job.payload == "c"
            async with consumer.take(where=AJob.n == 2) as job:
                assert job is None
            async with consumer.take() as job:
                assert job is not None and job.payload == "a"

    run(server, driver, scenario)
    assert queued(eng) == ["b"]


def test_a_cancelled_wait_loses_nothing_and_the_next_take_works(
    eng: Engine, server: Any, driver: str
) -> None:
    """A task cancelled while it waits (in the server on Q4M, between polls on InnoDB): the
    next take of the same consumer gets the job enqueued meanwhile, once."""

    async def scenario(engine: AsyncEngine) -> str:
        async with queue_consumer(AJob, bind=engine, timeout=30, poll_interval=0.05) as consumer:
            task = asyncio.ensure_future(consumer.take().__aenter__())
            await asyncio.sleep(0.5)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            enqueue(eng, "a")
            async with consumer.take(timeout=10) as job:
                assert job is not None
                return str(job.payload)

    assert run(server, driver, scenario) == "a"
    assert queued(eng) == []


def test_a_connection_killed_between_jobs_is_replaced(
    eng: Engine, server: Any, driver: str
) -> None:
    enqueue(eng, "a", "b")

    async def scenario(engine: AsyncEngine) -> None:
        async with queue_consumer(AJob, bind=engine, timeout=0) as consumer:
            qs = consumer.take()
            async with qs as job:
                assert job is not None and job.payload == "a"
                first = await connection_id(qs)
            kill(eng, first)
            await asyncio.sleep(0.2)
            with pytest.raises(ConnectionLost):
                async with consumer.take():
                    pass
            qs = consumer.take()
            async with qs as job:
                assert job is not None and job.payload == "b"
                assert await connection_id(qs) != first

    run(server, driver, scenario)
    assert queued(eng) == []


def test_a_connection_killed_while_owning_returns_the_job(
    eng: Engine, server: Any, driver: str
) -> None:
    enqueue(eng, "a")

    async def scenario(engine: AsyncEngine) -> None:
        async with queue_consumer(AJob, bind=engine, timeout=0) as consumer:
            qs = consumer.take()
            with pytest.raises(ConnectionLost):
                async with qs as job:
                    assert job is not None
                    kill(eng, await connection_id(qs))
                    await asyncio.sleep(0.2)
            assert queued(eng) == ["a"]  # the server returned it
            async with consumer.take(timeout=5) as job:
                assert job is not None and job.payload == "a"

    run(server, driver, scenario)
    assert queued(eng) == []


def test_an_async_session_bind_commits_the_writes_with_the_end(
    eng: Engine, server: Any, driver: str
) -> None:
    """An AsyncSession bind: each job's write through the block's session lands with its
    end; an aborted job's write does not."""
    enqueue(eng, "a", "b")

    async def scenario(engine: AsyncEngine) -> None:
        async with (
            AsyncSession(engine) as orm,
            queue_consumer(AJob, bind=orm, timeout=0) as consumer,
        ):
            with pytest.raises(RuntimeError):
                async with consumer.take(where=AJob.n == 0) as job:
                    assert job is not None
                    orm.add(ADone(payload="aborted", by=0))
                    raise RuntimeError("boom")
            for _ in range(2):
                qs = consumer.take()
                async with qs as job:
                    assert job is not None
                    qs.session.add(ADone(payload=job.payload, by=1))

    run(server, driver, scenario)
    assert queued(eng) == []
    assert _done(eng) == Counter({"a": 1, "b": 1})


async def _consume(engine: AsyncEngine, by: int, hold: float = 0.0) -> int:
    """One consumer draining the queue; each job writes its payload through its session
    (then holds the job ``hold`` seconds more); the jobs it did."""
    done = 0
    async with queue_consumer(AJob, bind=engine, timeout=1) as consumer:
        while True:
            qs = consumer.take()
            async with qs as job:
                if job is None:
                    return done
                qs.session.add(ADone(payload=job.payload, by=by))
                await asyncio.sleep(hold)
                done += 1


def _done(engine: Engine) -> Counter[str]:
    with engine.connect() as conn:
        return Counter(conn.execute(select(ADone.payload)).scalars())


def test_concurrent_tasks_each_with_a_consumer(eng: Engine, server: Any, driver: str) -> None:
    payloads = [str(i) for i in range(300)]
    enqueue(eng, *payloads)

    async def scenario(engine: AsyncEngine) -> list[int]:
        return list(await asyncio.gather(*(_consume(engine, i) for i in range(4))))

    counts = run(server, driver, scenario, pool_size=4)
    done = _done(eng)
    assert sorted(done) == sorted(payloads), "lost jobs"
    assert max(done.values()) == 1, "doubled jobs"
    assert sum(counts) == 300 and queued(eng) == []


def _process(url: str, backend: str, by: int, hold: float) -> None:
    async def main() -> None:
        engine = create_async_engine(url, poolclass=NullPool)
        use_backend(engine.sync_engine, backend)  # type: ignore[arg-type]
        try:
            await _consume(engine, by, hold)
        finally:
            await engine.dispose()

    asyncio.run(main())


def _done_by(engine: Engine) -> dict[int, int]:
    with engine.connect() as conn:
        return {row.id: row.by for row in conn.execute(select(ADone.id, ADone.by))}


def test_concurrent_processes_one_killed_mid_job(eng: Engine, server: Any) -> None:
    """Three processes (asyncmy) drain the queue, one SIGKILLed while it runs jobs: none is
    lost; on InnoDB none runs twice, on Q4M at most the one whose write had committed before
    its ``queue_end()`` (at least once), as for the blocking consumer."""
    backend, url, _ = server
    payloads = [str(i) for i in range(120)]
    enqueue(eng, *payloads)
    dsn = url.set(drivername="mysql+asyncmy").render_as_string(hide_password=False)
    drain_one_killed(_process, dsn, backend, lambda: _done_by(eng).values())
    check_once(_done(eng), payloads, backend)
    assert queued(eng) == []
