"""``async with queue_session(...)`` on SQLAlchemy's asyncio extension, both async drivers.

Each test runs its own event loop (``asyncio.run``) and creates and disposes its async engine
inside it, so no connection outlives its loop.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from collections.abc import Awaitable
from collections.abc import Callable
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
from sqlalchemy import func
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

from sqlalchemy_q4m import QueueAbort
from sqlalchemy_q4m import QueueMixin
from sqlalchemy_q4m import queue_session
from sqlalchemy_q4m import queue_table
from sqlalchemy_q4m.backends.pinned import kept_connections
from sqlalchemy_q4m.consumer.asyncio import AsyncQueueSession
from sqlalchemy_q4m.consumer.asyncio import async_queue_sessionmaker
from sqlalchemy_q4m.exc import NotOwner
from sqlalchemy_q4m.exc import Q4MError

DRIVERS = ["aiomysql", "asyncmy"]


class Base(DeclarativeBase):
    pass


class AioJob(QueueMixin, Base):
    __tablename__ = "test_asyncio_session_jobs"
    payload: Mapped[str] = mapped_column(Text)
    n: Mapped[int] = mapped_column(Integer, default=0)


class AioLog(Base):
    """An ordinary InnoDB table the blocks write to (atomicity with the job's removal)."""

    __tablename__ = "test_asyncio_session_log"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    note: Mapped[str] = mapped_column(String(100))


core_md = MetaData()
core_jobs = queue_table("test_asyncio_session_core", core_md, Column("payload", Text))


@pytest.fixture(scope="module")
def tables(engine: Engine) -> Iterator[None]:
    Base.metadata.create_all(engine)
    core_md.create_all(engine)
    yield
    Base.metadata.drop_all(engine)
    core_md.drop_all(engine)


@pytest.fixture(params=DRIVERS)
def async_url(request: pytest.FixtureRequest, db_url: URL, tables: None) -> URL:
    url: URL = db_url.set(drivername=f"mysql+{request.param}")
    return url


@pytest.fixture(autouse=True)
def _empty_tables(request: pytest.FixtureRequest) -> Iterator[None]:
    if "tables" not in request.fixturenames:  # unit tests: no server to reach for
        yield
        return
    engine: Engine = request.getfixturevalue("engine")
    yield
    with engine.begin() as conn:
        for table in (AioJob.__table__, AioLog.__table__, core_jobs):
            conn.execute(table.delete())


def run(main: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(main())  # type: ignore[arg-type]


@asynccontextmanager
async def async_engine(url: URL, **kw: Any) -> AsyncIterator[AsyncEngine]:
    eng = create_async_engine(url, **kw)
    try:
        yield eng
    finally:
        await eng.dispose()


def enqueue(engine: Engine, *payloads: str) -> list[uuid.UUID]:
    rows = [{"payload": p} for p in payloads]
    with engine.begin() as conn:
        result = conn.execute(insert(AioJob).returning(AioJob.id), rows)
        return [row[0] for row in result]


def queued(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.execute(select(AioJob.payload).order_by(AioJob.id)).scalars())


async def in_the_server(engine: Engine, table: str, seconds: float = 30.0) -> None:
    """Wait until another connection of this database runs a statement on ``table`` (one
    that the test's row lock then keeps waiting).  A fixed sleep only assumed the task had
    sent it; under load it may not have, and the test would cancel something else."""
    deadline = time.monotonic() + seconds
    query = text(
        "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE ID <> CONNECTION_ID() "
        "AND DB = DATABASE() AND COMMAND = 'Query' AND INFO LIKE :pattern"
    )
    while True:
        with engine.connect() as conn:
            if conn.execute(query, {"pattern": f"%{table}%"}).scalar():
                return
        assert time.monotonic() < deadline, f"no statement on {table} reached the server"
        await asyncio.sleep(0.02)  # the event loop runs the task meanwhile


def checked_out(eng: AsyncEngine) -> int:
    """Connections in use: checked out of the pool, minus the idle ones the library keeps
    for the engine's next queue session (``sqlalchemy_q4m.backends.pinned``)."""
    n: int = eng.sync_engine.pool.checkedout()  # type: ignore[attr-defined]
    return n - len(kept_connections(eng.sync_engine))


# -- unit ------------------------------------------------------------------------------------


@pytest.mark.unit
def test_queue_session_returns_the_async_session_for_an_async_bind() -> None:
    async def main() -> None:
        async with async_engine(URL.create("mysql+aiomysql", host="127.0.0.1")) as eng:
            qs = queue_session(AioJob, bind=eng, timeout=1)
            assert isinstance(qs, AsyncQueueSession)
            assert not qs.owning and qs.job is None
            with pytest.raises(NotOwner):
                qs.session  # noqa: B018 - the property raises before the wait
            factory = async_queue_sessionmaker(eng, timeout=3)
            made = factory(AioJob)
            assert isinstance(made, AsyncQueueSession) and made.timeout == 3

    run(main)


@pytest.mark.unit
def test_bad_binds_are_refused() -> None:
    async def main() -> None:
        async with async_engine(URL.create("mysql+aiomysql", host="127.0.0.1")) as eng:
            with pytest.raises(Q4MError, match="not started"):
                AsyncQueueSession(AioJob, bind=eng.connect())
            with pytest.raises(Q4MError, match="AsyncEngine"):
                AsyncQueueSession(AioJob, bind="mysql://x")  # type: ignore[arg-type]
            with pytest.raises(Q4MError, match="AsyncEngine"):
                async_queue_sessionmaker(eng.sync_engine)  # type: ignore[arg-type]
            with pytest.raises(Q4MError, match="timeout"):
                queue_session(AioJob, bind=eng, timeout=-1)

    run(main)


@pytest.mark.unit
def test_the_sync_api_does_not_import_the_asyncio_extension() -> None:
    code = (
        "import sys, sqlalchemy_q4m; "
        "loaded = [m for m in ('sqlalchemy_q4m.consumer.asyncio', 'sqlalchemy.ext.asyncio') "
        "if m in sys.modules]; print(loaded); sys.exit(1 if loaded else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


# -- integration -----------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("bind_kind", ["engine", "connection", "session"])
def test_normal_exit_ends_the_job(async_url: URL, engine: Engine, bind_kind: str) -> None:
    (job_id,) = enqueue(engine, "hello")

    async def main() -> None:
        async with async_engine(async_url) as eng:
            if bind_kind == "engine":
                await consume(eng)
            elif bind_kind == "connection":
                async with eng.connect() as conn:
                    await consume(conn)
            else:
                async with AsyncSession(eng) as session:
                    await consume(session)
            assert checked_out(eng) == 0

    async def consume(bind: Any) -> None:
        async with queue_session(AioJob, bind=bind, timeout=5) as job:
            assert isinstance(job, AioJob)
            assert (job.id, job.payload) == (job_id, "hello")

    run(main)
    assert queued(engine) == []


@pytest.mark.integration
def test_timeout_returns_none_in_about_timeout(async_url: URL) -> None:
    async def main() -> None:
        async with async_engine(async_url) as eng:
            # connect and detect the backend first: only the wait itself is timed
            async with queue_session(AioJob, bind=eng, timeout=0) as job:
                assert job is None
            start = time.monotonic()
            async with queue_session(AioJob, bind=eng, timeout=0.4) as job:
                elapsed = time.monotonic() - start
                assert job is None
            assert 0.4 <= elapsed < 2.0
            assert checked_out(eng) == 0

    run(main)


@pytest.mark.integration
def test_exception_aborts_and_reraises(async_url: URL, engine: Engine) -> None:
    (job_id,) = enqueue(engine, "boom")

    async def main() -> None:
        async with async_engine(async_url) as eng:
            with pytest.raises(ZeroDivisionError):
                async with queue_session(AioJob, bind=eng, timeout=5) as job:
                    assert job is not None and job.id == job_id
                    1 / 0  # noqa: B018
            assert checked_out(eng) == 0
            async with queue_session(AioJob, bind=eng, timeout=5) as again:
                assert again is not None and again.id == job_id  # it came back

    run(main)
    assert queued(engine) == []


@pytest.mark.integration
def test_queue_abort_returns_the_job_and_is_swallowed(async_url: URL, engine: Engine) -> None:
    (job_id,) = enqueue(engine, "later")

    async def main() -> None:
        async with async_engine(async_url) as eng:
            reached = False
            async with queue_session(AioJob, bind=eng, timeout=5) as job:
                assert job is not None and job.id == job_id
                raise QueueAbort
            reached = True  # the QueueAbort did not propagate
            assert reached
            assert checked_out(eng) == 0

    run(main)
    assert queued(engine) == ["later"]


@pytest.mark.integration
def test_explicit_wait_end_and_abort(async_url: URL, engine: Engine) -> None:
    enqueue(engine, "a", "b")

    async def main() -> None:
        async with async_engine(async_url) as eng:
            make = async_queue_sessionmaker(eng, timeout=5)
            first = make(AioJob)
            job = await first.wait()
            assert job is not None and first.owning and first.job is job
            assert first.backend is not None and first.backend.name == "portable"
            conn = await first.connection()
            assert conn.sync_connection is not None
            await first.abort()
            assert not first.owning
            with pytest.raises(NotOwner):
                await first.end()
            with pytest.raises(Q4MError, match="waits once"):
                await first.wait()
            await first.close()  # twice is fine

            second = make(AioJob)
            assert (await second.wait()) is not None
            await second.end()
            assert checked_out(eng) == 0

    run(main)
    assert len(queued(engine)) == 1


@pytest.mark.integration
def test_core_table_yields_rows_on_a_connection(async_url: URL, engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(insert(core_jobs), [{"payload": "row"}])

    async def main() -> None:
        async with async_engine(async_url) as eng, eng.connect() as conn:
            async with queue_session(core_jobs, bind=conn, timeout=5) as row:
                assert row is not None and row.payload == "row"
            async with queue_session(core_jobs, bind=conn, timeout=0) as none:
                assert none is None

    run(main)
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(core_jobs)).scalar() == 0


@pytest.mark.integration
def test_session_writes_commit_with_the_job(async_url: URL, engine: Engine) -> None:
    enqueue(engine, "ok", "fails")

    async def main() -> None:
        async with async_engine(async_url) as eng:
            async with (
                AsyncSession(eng) as session,
                queue_session(AioJob, bind=session, timeout=5) as job,
            ):
                assert job is not None and job.payload == "ok"
                session.add(AioLog(note="did ok"))
            async with AsyncSession(eng) as session:
                with pytest.raises(RuntimeError):
                    async with queue_session(AioJob, bind=session, timeout=5) as job:
                        assert job is not None and job.payload == "fails"
                        session.add(AioLog(note="did fails"))
                        await session.flush()
                        raise RuntimeError("after the write")
            assert checked_out(eng) == 0

    run(main)
    assert queued(engine) == ["fails"]
    with engine.connect() as conn:
        assert list(conn.execute(select(AioLog.note)).scalars()) == ["did ok"]


@pytest.mark.integration
def test_the_block_can_use_the_pinned_session(async_url: URL, engine: Engine) -> None:
    enqueue(engine, "x")

    async def main() -> None:
        async with async_engine(async_url) as eng:
            qs = queue_session(AioJob, bind=eng, timeout=5)
            async with qs as job:
                assert job is not None
                qs.session.add(AioLog(note="through the queue session"))
            assert checked_out(eng) == 0

    run(main)
    assert queued(engine) == []
    with engine.connect() as conn:
        assert list(conn.execute(select(AioLog.note)).scalars()) == ["through the queue session"]


@pytest.mark.integration
def test_cancelled_inside_the_block_returns_the_job(async_url: URL, engine: Engine) -> None:
    (job_id,) = enqueue(engine, "slow")

    async def main() -> None:
        async with async_engine(async_url) as eng:
            started = asyncio.Event()

            async def consumer() -> None:
                async with queue_session(AioJob, bind=eng, timeout=5) as job:
                    assert job is not None
                    started.set()
                    await asyncio.sleep(60)

            task = asyncio.create_task(consumer())
            await asyncio.wait_for(started.wait(), 10)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert checked_out(eng) == 0
            async with queue_session(AioJob, bind=eng, timeout=5) as job:
                assert job is not None and job.id == job_id  # returned, not lost

    run(main)
    assert queued(engine) == []


@pytest.mark.integration
def test_cancelled_while_waiting_releases_the_connection(async_url: URL, engine: Engine) -> None:
    async def main() -> None:
        async with async_engine(async_url, pool_size=2, max_overflow=0) as eng:
            for delay in (0.0, 0.01, 0.2):  # at the first claim, mid-poll, while sleeping
                task = asyncio.create_task(wait_forever(eng))
                await asyncio.sleep(delay)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                assert checked_out(eng) == 0
            # the pool still works, and nothing was lost or owned meanwhile
            enqueue(engine, "after")
            async with queue_session(AioJob, bind=eng, timeout=5) as job:
                assert job is not None and job.payload == "after"

    async def wait_forever(eng: AsyncEngine) -> None:
        async with queue_session(AioJob, bind=eng, timeout=None, poll_interval=0.05):
            raise AssertionError("no job should arrive")

    run(main)
    assert queued(engine) == []


@pytest.mark.integration
def test_a_timeout_around_the_block_returns_the_job(async_url: URL, engine: Engine) -> None:
    enqueue(engine, "too slow")

    async def main() -> None:
        async with async_engine(async_url) as eng:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(slow(eng), 0.5)
            assert checked_out(eng) == 0

    async def slow(eng: AsyncEngine) -> None:
        async with queue_session(AioJob, bind=eng, timeout=5) as job:
            assert job is not None
            await asyncio.sleep(30)

    run(main)
    assert queued(engine) == ["too slow"]


@pytest.mark.integration
@pytest.mark.parametrize("driver", DRIVERS)
def test_50_tasks_drain_5000_jobs_exactly_once(
    driver: str, db_url: URL, engine: Engine, tables: None
) -> None:
    total, tasks = 5000, 50
    ids = set(enqueue(engine, *(f"job {i}" for i in range(total))))
    assert len(ids) == total
    seen: list[uuid.UUID] = []

    async def main() -> None:
        url = db_url.set(drivername=f"mysql+{driver}")
        async with async_engine(url, pool_size=tasks, max_overflow=0) as eng:
            await asyncio.gather(*(consumer(eng, i) for i in range(tasks)))
            assert checked_out(eng) == 0

    async def consumer(eng: AsyncEngine, i: int) -> None:
        # half the tasks pin one connection for all their jobs, as a worker does; half check
        # one out of the pool per job
        if i % 2:
            async with eng.connect() as conn:
                await drain(conn)
        else:
            await drain(eng)

    async def drain(bind: Any) -> None:
        make = async_queue_sessionmaker(bind, timeout=0.5, poll_interval=0.02)
        while True:
            async with make(AioJob) as job:
                if job is None:
                    return
                seen.append(job.id)
                await asyncio.sleep(0)

    start = time.monotonic()
    run(main)
    counts = Counter(seen)
    assert len(seen) == total, f"{len(seen)} executions for {total} jobs"
    assert set(counts) == ids and max(counts.values()) == 1
    assert queued(engine) == []
    print(f"{driver}: {total} jobs in {time.monotonic() - start:.1f}s")


@pytest.mark.integration
def test_cancelled_in_a_blocked_statement_never_pools_the_connection(
    async_url: URL, engine: Engine
) -> None:
    (job_id,) = enqueue(engine, "blocked")
    with engine.begin() as conn:
        conn.execute(insert(AioLog), [{"id": 1, "note": "locked"}])

    async def main() -> None:
        async with async_engine(async_url) as eng:
            invalidated: list[bool] = []

            async def consumer() -> None:
                qs = queue_session(AioJob, bind=eng, timeout=5)
                async with qs as job:
                    assert job is not None
                    conn = await qs.connection()
                    waiting.set()
                    try:  # blocks on the row lock the test holds
                        await qs.session.execute(select(AioLog).with_for_update())
                    finally:
                        invalidated.append(conn.invalidated)

            waiting = asyncio.Event()
            with engine.connect() as holder:
                holder.execute(select(AioLog).with_for_update())  # hold the row lock
                task = asyncio.create_task(consumer())
                await asyncio.wait_for(waiting.wait(), 10)
                await in_the_server(engine, AioLog.__tablename__)  # SELECT ... FOR UPDATE waits
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                assert invalidated == [True]  # cut mid-statement: closed, not pooled
                assert checked_out(eng) == 0
                holder.rollback()
            # the server ends the orphaned statement and rolls back: the job is back
            for _ in range(100):
                async with queue_session(AioJob, bind=eng, timeout=0.1) as again:
                    if again is not None:
                        assert again.id == job_id
                        return
            raise AssertionError("the job did not come back")

    run(main)
    assert queued(engine) == []


@pytest.mark.integration
def test_end_runs_to_completion_when_cancelled(async_url: URL, engine: Engine) -> None:
    enqueue(engine, "finishing")
    with engine.begin() as conn:
        conn.execute(insert(AioLog), [{"id": 1, "note": "before"}])

    async def main() -> None:
        async with async_engine(async_url) as eng, AsyncSession(eng) as session:
            ending = asyncio.Event()

            async def consumer() -> None:
                async with queue_session(AioJob, bind=session, timeout=5) as job:
                    assert job is not None
                    row = await session.get(AioLog, 1)
                    assert row is not None
                    row.note = "after"  # flushed by end(): blocks on the test's lock
                    ending.set()

            with engine.connect() as holder:
                holder.execute(select(AioLog).with_for_update())
                task = asyncio.create_task(consumer())
                await asyncio.wait_for(ending.wait(), 10)
                await in_the_server(engine, AioLog.__tablename__)  # end()'s flush waits
                task.cancel()  # while end() waits for the lock
                await asyncio.sleep(0.2)
                assert not task.done()  # end() is not cut short
                holder.rollback()
            with pytest.raises(asyncio.CancelledError):
                await task  # the cancellation is delivered once end() is done

    run(main)
    assert queued(engine) == []  # ended, with the write
    with engine.connect() as conn:
        assert list(conn.execute(select(AioLog.note)).scalars()) == ["after"]


@pytest.mark.unit
def test_run_to_completion_finishes_the_step_and_delivers_its_outcome() -> None:
    from sqlalchemy.util import await_

    from sqlalchemy_q4m.consumer.asyncio import run_to_completion

    done: list[int] = []

    def step(n: int, fail: bool = False) -> int:
        await_(asyncio.sleep(0.05))
        done.append(n)
        if fail:
            raise ValueError(n)
        return n

    async def main() -> None:
        assert await run_to_completion(step, 1) == 1
        with pytest.raises(ValueError):
            await run_to_completion(step, 2, True)
        task = asyncio.ensure_future(run_to_completion(step, 3))
        await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.sleep(0.01)
        task.cancel()  # twice: still not cut short
        with pytest.raises(asyncio.CancelledError):
            await task
        assert done[-1] == 3  # the step ran to its end before the cancellation went on
        task = asyncio.ensure_future(run_to_completion(step, 4, True))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(ValueError):  # the step's own error wins, as with a shield
            await task
        assert done == [1, 2, 3, 4]

    run(main)


@pytest.mark.integration
def test_wait_then_prepares_the_job_in_the_claims_crossing(async_url: URL, engine: Engine) -> None:
    enqueue(engine, "a", "b")

    async def main() -> None:
        async with async_engine(async_url) as eng:
            make = async_queue_sessionmaker(eng, timeout=5)
            first = make(AioJob)
            got = await first.wait_then(lambda job: job.payload)
            assert got is not None and got() == "a" and first.owning
            await first.end()

            def fails(job: AioJob) -> None:
                raise LookupError(job.payload)

            second = make(AioJob)
            raised = await second.wait_then(fails)
            assert raised is not None and second.owning  # owned: the caller gives it back
            with pytest.raises(LookupError, match="b"):
                raised()
            await second.abort()
            assert checked_out(eng) == 0

    run(main)
    assert queued(engine) == ["b"]
