"""asyncio on the real Q4M engine: ``aiomysql`` and ``asyncmy`` connections, no test double.

``test_asyncio_native.py`` checks the call sequence through :mod:`fake_q4m`, whose
``queue_wait`` does not really await.  Here every wait blocks in the server while the event
loop runs other tasks (a ticker task proves it), a task is cancelled while its ``queue_wait``
blocks, and the queue session, the AsyncSession bind and the AsyncJob worker runtime run on
``ENGINE=QUEUE`` tables.  They need ``Q4M_TEST_URL`` (skipped otherwise) and work in a
database of their own on that server (``q4m_test_<random>``), dropped at the end.

Each test runs its own event loop (``asyncio.run``) and creates and disposes its async
engine inside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
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
from sqlalchemy import Text
from sqlalchemy import create_engine
from sqlalchemy import event
from sqlalchemy import func
from sqlalchemy import insert
from sqlalchemy import select
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.orm import Mapped
from sqlalchemy.orm import Session
from sqlalchemy.orm import mapped_column
from sqlalchemy.pool import NullPool

from sqlalchemy_q4m import QueueAbort
from sqlalchemy_q4m import QueueMixin
from sqlalchemy_q4m import queue_session
from sqlalchemy_q4m import queue_table
from sqlalchemy_q4m.backends.pinned import kept_connections
from sqlalchemy_q4m.consumer.asyncio import async_queue_sessionmaker
from sqlalchemy_q4m.exc import QueueWaitError
from sqlalchemy_q4m.schema.retry import RetryMixin
from sqlalchemy_q4m.worker.asyncio import AsyncJob
from sqlalchemy_q4m.worker.asyncio_runtime import AsyncWorkers
from sqlalchemy_q4m.worker.asyncio_runtime import run_async_workers
from sqlalchemy_q4m.worker.runtime import EXIT_FORCED
from sqlalchemy_q4m.worker.runtime import EXIT_OK

pytestmark = [pytest.mark.native, pytest.mark.integration]

DRIVERS = ["aiomysql", "asyncmy"]
DEAD = "anq_dead"


class Base(DeclarativeBase):
    pass


class AJob(QueueMixin, Base):
    __tablename__ = "anq_jobs"
    command: Mapped[str] = mapped_column(Text)
    priority: Mapped[int] = mapped_column(Integer, default=0)


class RJob(RetryMixin, QueueMixin, Base):
    """A retried job: ``run_at`` and ``attempts`` are integers Q4M conditions can test."""

    __tablename__ = "anq_retry_jobs"
    command: Mapped[str] = mapped_column(Text)


class Note(Base):
    """A plain InnoDB table the blocks write to."""

    __tablename__ = "anq_notes"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    text: Mapped[str] = mapped_column(Text)


core_md = MetaData()
core_jobs = queue_table("anq_core_jobs", core_md, Column("n", Integer, nullable=False))


@pytest.fixture(scope="module")
def q4m_db(q4m_url: URL) -> Iterator[URL]:
    """This module's own database on the Q4M server, with its tables; dropped afterwards."""
    name = f"q4m_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(q4m_url, poolclass=NullPool)
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE `{name}`"))
    url: URL = q4m_url.set(database=name)
    sync = create_engine(url, poolclass=NullPool)
    try:
        Base.metadata.create_all(sync)
        core_md.create_all(sync)
        with sync.connect() as conn:
            engines = dict(
                conn.execute(
                    text(
                        "SELECT TABLE_NAME, ENGINE FROM information_schema.TABLES "
                        "WHERE TABLE_SCHEMA = DATABASE()"
                    )
                ).all()
            )
        assert engines["anq_jobs"].upper() == "QUEUE", engines  # really the native backend
        assert engines["anq_notes"].upper() == "INNODB", engines
        yield url
    finally:
        sync.dispose()
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS `{name}`"))
        admin.dispose()


@pytest.fixture(scope="module")
def sync_engine(q4m_db: URL) -> Iterator[Engine]:
    eng = create_engine(q4m_db, pool_size=4, max_overflow=4)
    yield eng
    eng.dispose()


@pytest.fixture
def db(sync_engine: Engine) -> Iterator[Engine]:
    """The sync engine, with every table emptied before and after the test."""

    def clean() -> None:
        with sync_engine.begin() as conn:
            for table in (AJob.__table__, RJob.__table__, Note.__table__, core_jobs):
                conn.execute(table.delete())
            conn.execute(text(f"DROP TABLE IF EXISTS {DEAD}"))

    clean()
    yield sync_engine
    clean()


@pytest.fixture(params=DRIVERS)
def async_url(request: pytest.FixtureRequest, q4m_db: URL, db: Engine) -> URL:
    url: URL = q4m_db.set(drivername=f"mysql+{request.param}")
    return url


def run(main: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(main())  # type: ignore[arg-type]


@asynccontextmanager
async def async_engine(url: URL, **kw: Any) -> AsyncIterator[AsyncEngine]:
    """An async engine; at the end, every connection its pool holds is checked: none may be
    in Q4M owner mode (``queue_rowid()`` is an error outside it).  Checked then rather than
    in a checkin listener: a listener's query cut short by a task's cancellation would
    itself break the pool's checkin."""
    eng = create_async_engine(url, **kw)
    try:
        yield eng
        pooled = eng.sync_engine.pool.checkedin()  # type: ignore[attr-defined]
        async with contextlib.AsyncExitStack() as stack:
            conns = [await stack.enter_async_context(eng.connect()) for _ in range(pooled)]
            for conn in conns:
                with pytest.raises(OperationalError, match="not in owner mode"):
                    await conn.exec_driver_sql("SELECT queue_rowid()")
                await conn.rollback()
    finally:
        await eng.dispose()


def checked_out(eng: AsyncEngine) -> int:
    """Connections in use: checked out of the pool, minus the idle ones the library keeps
    for the engine's next queue session (``sqlalchemy_q4m.backends.pinned``)."""
    n: int = eng.sync_engine.pool.checkedout()  # type: ignore[attr-defined]
    return n - len(kept_connections(eng.sync_engine))


def enqueue(engine: Engine, *commands: str, model: Any = AJob) -> list[uuid.UUID]:
    with Session(engine, expire_on_commit=False) as s:
        jobs = [model(command=c) for c in commands]
        s.add_all(jobs)
        s.commit()
        return [job.id for job in jobs]


def total(engine: Engine, table: Any = AJob) -> int:
    """Rows in the table, owned ones included (what a non-owner's COUNT(*) says)."""
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


def visible(engine: Engine) -> list[str]:
    """Commands of the jobs nobody owns (a non-owner's SELECT)."""
    with engine.connect() as conn:
        return sorted(conn.execute(select(AJob.command)).scalars())


def waiting_in_server(engine: Engine, database: str) -> list[int]:
    """Ids of the server threads of ``database`` now inside a ``queue_wait``."""
    with engine.connect() as conn:
        return list(
            conn.execute(
                text(
                    "SELECT ID FROM information_schema.PROCESSLIST WHERE DB = :db "
                    "AND COMMAND = 'Query' AND INFO LIKE '%queue_wait(%' "
                    "AND ID <> CONNECTION_ID()"
                ),
                {"db": database},
            ).scalars()
        )


async def until(check: Callable[[], bool], what: str, seconds: float = 30.0) -> None:
    """Poll ``check`` (a quick sync query) until it holds; the event loop runs meanwhile."""
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.02)


class Ticker:
    """A task counting ticks of ``asyncio.sleep(0.01)``: it only advances while the event
    loop is free, so ticks counted during a wait prove the wait does not block the loop."""

    def __init__(self) -> None:
        self.ticks = 0
        self.task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(0.01)
            self.ticks += 1

    def __enter__(self) -> Ticker:
        self.task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.task is not None
        self.task.cancel()


# -- queue_session: end, abort, timeout --------------------------------------------------------


@pytest.mark.parametrize("bind_kind", ["engine", "connection"])
def test_end_removes_the_job(async_url: URL, db: Engine, bind_kind: str) -> None:
    (job_id,) = enqueue(db, "echo hi")

    async def main() -> None:
        async with async_engine(async_url) as eng:
            if bind_kind == "engine":
                await consume(eng)
            else:
                async with eng.connect() as conn:
                    await consume(conn)
                    # the same connection waits again: it left owner mode after the end
                    async with queue_session(AJob, bind=conn, timeout=0) as none:
                        assert none is None
            assert checked_out(eng) == 0

    async def consume(bind: Any) -> None:
        qs = queue_session(AJob, bind=bind, timeout=5)
        async with qs as job:
            assert isinstance(job, AJob) and (job.id, job.command) == (job_id, "echo hi")
            assert qs.backend is not None and qs.backend.name == "native"
            # the owner sees only its row; another connection sees none but counts it
            owned = await qs.session.scalars(select(AJob.id))
            assert owned.all() == [job_id]
            assert visible(db) == [] and total(db) == 1

    run(main)
    assert total(db) == 0


def test_exception_aborts_and_queue_abort_is_swallowed(async_url: URL, db: Engine) -> None:
    (job_id,) = enqueue(db, "boom")

    async def main() -> None:
        async with async_engine(async_url) as eng:
            with pytest.raises(ZeroDivisionError):
                async with queue_session(AJob, bind=eng, timeout=5) as job:
                    assert job is not None and job.id == job_id
                    1 / 0  # noqa: B018
            assert visible(db) == ["boom"]  # returned at once
            reached = False
            async with queue_session(AJob, bind=eng, timeout=5) as job:
                assert job is not None and job.id == job_id
                raise QueueAbort
            reached = True
            assert reached and visible(db) == ["boom"]
            assert checked_out(eng) == 0

    run(main)
    assert total(db) == 1


def test_timeout_returns_none_and_leaves_owner_mode(async_url: URL, db: Engine) -> None:
    async def main() -> None:
        async with async_engine(async_url) as eng, eng.connect() as conn:
            async with queue_session(AJob, bind=conn, timeout=0) as job:  # warm up
                assert job is None
            with Ticker() as ticker:
                started = time.monotonic()
                async with queue_session(AJob, bind=conn, timeout=1) as job:
                    elapsed = time.monotonic() - started
                    assert job is None
                assert 0.9 <= elapsed < 10
                assert ticker.ticks >= 10  # the loop ran while the server waited
            # in owner mode without a row the table would look empty to this connection
            enqueue(db, "seen")
            seen = await conn.execute(select(AJob.command))
            assert seen.scalars().all() == ["seen"]
            await conn.rollback()

    run(main)


def test_timeout_on_the_block_aborts_the_job(async_url: URL, db: Engine) -> None:
    """``asyncio.wait_for`` around the block: the job in hand goes back."""
    (job_id,) = enqueue(db, "too slow")

    async def main() -> None:
        async with async_engine(async_url) as eng:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(slow(eng), 0.5)
            assert checked_out(eng) == 0
            assert visible(db) == ["too slow"]
            async with queue_session(AJob, bind=eng, timeout=5) as job:
                assert job is not None and job.id == job_id

    async def slow(eng: AsyncEngine) -> None:
        async with queue_session(AJob, bind=eng, timeout=5) as job:
            assert job is not None
            await asyncio.sleep(30)

    run(main)
    assert total(db) == 0


def test_where_and_several_tables(async_url: URL, db: Engine) -> None:
    enqueue(db, "low")
    with db.begin() as conn:
        conn.execute(insert(core_jobs), [{"n": 7}])
        conn.execute(insert(AJob), [{"command": "high", "priority": 9}])

    async def main() -> None:
        async with async_engine(async_url) as eng:
            make = async_queue_sessionmaker(eng, timeout=2)
            async with make(AJob, where=AJob.priority >= 5) as job:
                assert job is not None and job.command == "high"
            async with make(AJob, where=AJob.priority >= 5, timeout=0) as job:
                assert job is None
            async with make(core_jobs, AJob) as first:
                assert first is not None and first.n == 7  # a Row; the earlier table wins
            async with make(core_jobs, AJob) as second:
                assert isinstance(second, AJob) and second.command == "low"

    run(main)
    assert total(db) == 0 and total(db, core_jobs) == 0


def test_null_from_queue_wait_is_a_clear_error(async_url: URL, db: Engine) -> None:
    missing = queue_table("anq_missing", MetaData(), Column("n", Integer))

    async def main() -> None:
        async with async_engine(async_url) as eng:
            with pytest.raises(QueueWaitError, match="anq_missing"):
                async with queue_session(missing, bind=eng, timeout=1):
                    raise AssertionError("never reached")
            assert checked_out(eng) == 0

    run(main)


# -- cancellation while queue_wait blocks in the server ----------------------------------------


def queue_stats(engine: Engine, table: str) -> dict[str, int]:
    """Q4M's per-table counters (``queue_stats``)."""
    with engine.connect() as conn:
        raw = conn.execute(text("SELECT queue_stats(:t)"), {"t": table}).scalar_one()
    text_ = raw.decode() if isinstance(raw, bytes) else str(raw)
    return {k.strip(): int(v) for k, v in (line.split(":") for line in text_.splitlines())}


def test_cancelled_in_a_blocking_wait_the_loop_runs_and_the_job_comes_back(
    async_url: URL, db: Engine
) -> None:
    """The task is cancelled while its ``queue_wait`` blocks in the server.  Q4M does not
    end that wait (neither KILL QUERY nor KILL does: it runs to its timeout or a row), so
    the next job goes to the orphaned wait first; its connection was closed, never pooled,
    so the server finds the client gone and returns the row (``restored_by_close``) to the
    next waiter."""
    assert async_url.database is not None
    database = async_url.database

    async def main() -> None:
        async with async_engine(async_url, pool_size=2, max_overflow=0) as eng:
            # connect and detect the backend first, so the task below only waits
            async with queue_session(AJob, bind=eng, timeout=0) as none:
                assert none is None
            restored = queue_stats(db, "anq_jobs")["restored_by_close"]
            with Ticker() as ticker:
                task = asyncio.create_task(wait_long(eng))
                await until(lambda: len(waiting_in_server(db, database)) == 1, "it waits")
                (thread,) = waiting_in_server(db, database)
                before = ticker.ticks
                await until(lambda: ticker.ticks >= before + 20, "the ticker ticks", 60)
                # the ticker advanced while the task's queue_wait was (still) blocking
                assert not task.done() and waiting_in_server(db, database) == [thread]
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                assert checked_out(eng) == 0  # closed, never pooled
                (job_id,) = enqueue(db, "after the cancel")
                async with queue_session(AJob, bind=eng, timeout=10) as job:
                    assert job is not None and job.id == job_id
                assert ticker.ticks > before + 20
            # the orphaned wait (first in line) took the row, found its client gone and
            # ended; the server returned the row
            await until(lambda: thread not in waiting_in_server(db, database), "it ends")
            assert queue_stats(db, "anq_jobs")["restored_by_close"] == restored + 1

    async def wait_long(eng: AsyncEngine) -> None:
        async with queue_session(AJob, bind=eng, timeout=30):
            raise AssertionError("no job was enqueued")

    run(main)
    assert total(db) == 0


def test_a_job_owned_by_a_cancelled_wait_goes_back_to_the_queue(async_url: URL, db: Engine) -> None:
    """The job arrives as the task is cancelled: whichever wins, it is never lost."""

    async def main() -> None:
        async with async_engine(async_url) as eng:
            async with queue_session(AJob, bind=eng, timeout=0) as none:
                assert none is None
            for delay in (0.0, 0.001, 0.005, 0.02):
                got: list[str] = []

                async def consumer(got: list[str] = got) -> None:
                    async with queue_session(AJob, bind=eng, timeout=30) as job:
                        assert job is not None
                        got.append(job.command)
                        await asyncio.sleep(30)  # cancelled here if it won the race

                task = asyncio.create_task(consumer())
                await until(lambda: waiting_in_server(db, str(async_url.database)) != [], "wait")
                enqueue(db, f"raced {delay}")
                await asyncio.sleep(delay)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                assert checked_out(eng) == 0
                async with queue_session(AJob, bind=eng, timeout=10) as job:
                    assert job is not None and job.command == f"raced {delay}"
                assert total(db) == 0

    run(main)


def test_cancelled_at_any_point_every_job_ends_once_or_comes_back(
    async_url: URL, db: Engine
) -> None:
    """Tasks cancelled after random short delays: while connecting, in ``queue_wait``, in the
    owner's load, in the block or in ``queue_end``.  A job whose block ran to its end is
    ended (ending runs to completion); every other one comes back: draining the queue
    afterwards finds each job exactly once, and no connection reaches the pool in owner
    mode (the engine's checkin listener)."""
    rng = random.Random(10)
    ids = set(enqueue(db, *(f"job {i}" for i in range(30))))
    ended: list[uuid.UUID] = []

    async def main() -> None:
        async with async_engine(async_url, pool_size=3, max_overflow=0) as eng:
            for _ in range(30):

                async def consumer() -> None:
                    async with queue_session(AJob, bind=eng, timeout=5) as job:
                        assert job is not None
                        await asyncio.sleep(0)
                        ended.append(job.id)

                task = asyncio.create_task(consumer())
                await asyncio.sleep(rng.uniform(0, 0.015))
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                assert checked_out(eng) == 0
            drained: list[uuid.UUID] = []
            while True:
                async with queue_session(AJob, bind=eng, timeout=2) as job:
                    if job is None:
                        break
                    drained.append(job.id)
            counts = Counter(ended + drained)
            assert set(counts) == ids and max(counts.values()) == 1, counts

    run(main)
    assert total(db) == 0


def test_many_tasks_wait_at_once_without_blocking_the_loop(async_url: URL, db: Engine) -> None:
    """Ten tasks blocked in queue_wait on ten connections; each job enqueued reaches one of
    them, and the ticker runs throughout."""

    async def main() -> None:
        async with async_engine(async_url, pool_size=10, max_overflow=0) as eng:
            got: list[str] = []

            async def consumer() -> None:
                async with queue_session(AJob, bind=eng, timeout=30) as job:
                    assert job is not None
                    got.append(job.command)

            with Ticker() as ticker:
                tasks = [asyncio.create_task(consumer()) for _ in range(10)]
                database = str(async_url.database)
                await until(lambda: len(waiting_in_server(db, database)) == 10, "all wait", 60)
                before = ticker.ticks
                enqueue(db, *(f"job {i}" for i in range(10)))
                await asyncio.wait_for(asyncio.gather(*tasks), 60)
                assert ticker.ticks > before
            assert sorted(got) == sorted(f"job {i}" for i in range(10))
            assert checked_out(eng) == 0

    run(main)
    assert total(db) == 0


# -- AsyncSession binds ------------------------------------------------------------------------


def test_async_session_bind_commits_before_queue_end(async_url: URL, db: Engine) -> None:
    """Q4M has no transactions: the job is owned on its own connection, the session's writes
    are committed first and the job ended after; on failure rolled back and returned."""
    enqueue(db, "a", "b")

    async def main() -> None:
        async with async_engine(async_url) as eng:
            async with AsyncSession(eng) as session:
                qs = queue_session(AJob, bind=session, timeout=5)
                async with qs as job:
                    assert job is not None and job.command == "a"
                    assert qs.session is not session  # its own pinned connection
                    session.add(Note(id=1, text=job.command))
                with pytest.raises(ValueError):
                    async with queue_session(AJob, bind=session, timeout=5) as job:
                        assert job is not None and job.command == "b"
                        session.add(Note(id=2, text="never"))
                        await session.flush()
                        raise ValueError
            assert checked_out(eng) == 0

    run(main)
    with Session(db) as s:
        assert s.scalars(select(Note.text)).all() == ["a"]
    assert visible(db) == ["b"]


def test_the_block_writes_through_the_pinned_async_session(async_url: URL, db: Engine) -> None:
    enqueue(db, "x")

    async def main() -> None:
        async with async_engine(async_url) as eng:
            qs = queue_session(AJob, bind=eng, timeout=5)
            async with qs as job:
                assert job is not None
                qs.session.add(Note(id=5, text="through the queue session"))
            assert checked_out(eng) == 0

    run(main)
    with Session(db) as s:
        assert s.scalars(select(Note.text)).all() == ["through the queue session"]
    assert total(db) == 0


def statement_log(eng: AsyncEngine) -> list[str]:
    """Every statement's first words and every COMMIT on ``eng``, in order."""
    log: list[str] = []

    @event.listens_for(eng.sync_engine, "before_cursor_execute")
    def _statement(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        log.append(" ".join(statement.split()[:2]))

    @event.listens_for(eng.sync_engine, "commit")
    def _commit(conn: Any) -> None:
        log.append("COMMIT")

    return log


def test_writes_in_the_block_commit_before_queue_end(async_url: URL, db: Engine) -> None:
    """Q4M has no transactions: ``queue_end()`` removes the job at once, so the block's
    InnoDB writes on the pinned connection must be committed before it (a crash in between
    then runs the job again, at least once) - never after (the job gone, its writes lost)."""
    enqueue(db, "x")

    class Writer(AsyncJob):
        model = AJob
        wait_timeout = 0.5

        async def execute(self, job: AJob) -> None:
            self.session.add(Note(id=7, text="by the worker"))

    async def main() -> None:
        async with async_engine(async_url) as eng:
            log = statement_log(eng)
            qs = queue_session(AJob, bind=eng, timeout=5)
            async with qs as job:
                assert job is not None
                qs.session.add(Note(id=6, text="by the block"))
            assert log.index("COMMIT", log.index("INSERT INTO")) < log.index("SELECT queue_end()")
            enqueue(db, "y")
            log.clear()
            worker = Writer(eng)
            assert await worker.run_once(timeout=5) is True
            await worker.close()
            assert log.index("COMMIT", log.index("INSERT INTO")) < log.index("SELECT queue_end()")

    run(main)
    with Session(db) as s:
        assert sorted(s.scalars(select(Note.text))) == ["by the block", "by the worker"]
    assert total(db) == 0


# -- the AsyncJob worker runtime ---------------------------------------------------------------


def test_async_job_retries_and_buries_on_q4m(async_url: URL, db: Engine) -> None:
    runs: list[tuple[str, int]] = []

    class Flaky(AsyncJob):
        model = RJob
        max_attempts = 2
        retry_base = 0.0
        retry_jitter = 0.0
        dead_letter_table = DEAD
        wait_timeout = 0.5

        async def execute(self, job: RJob) -> None:
            runs.append((job.command, job.attempts))
            await asyncio.sleep(0)
            if job.command == "broken" or job.attempts == 0:
                raise RuntimeError(job.command)

    enqueue(db, "flaky", "broken", model=RJob)

    async def main() -> None:
        async with async_engine(async_url) as eng:
            worker = Flaky(eng)
            for _ in range(4):
                assert await worker.run_once(timeout=5) is True
            assert await worker.run_once(timeout=0.2) is False
            await worker.close()
            assert checked_out(eng) == 0

    run(main)
    assert sorted(runs) == [("broken", 0), ("broken", 1), ("flaky", 0), ("flaky", 1)]
    assert total(db, RJob) == 0
    with db.connect() as conn:
        dead = conn.execute(text(f"SELECT queue, attempts FROM {DEAD}")).all()
    assert [tuple(r) for r in dead] == [("anq_retry_jobs", 2)]


def test_async_workers_drain_every_job_exactly_once(async_url: URL, db: Engine) -> None:
    total_jobs, tasks = 300, 8
    with db.begin() as conn:
        conn.execute(insert(core_jobs), [{"n": i} for i in range(total_jobs)])
    seen: list[int] = []

    class Collect(AsyncJob):
        model = core_jobs
        wait_timeout = 0.5

        async def execute(self, job: Any) -> None:
            seen.append(job.n)
            await asyncio.sleep(0)

    async def main() -> None:
        async with async_engine(async_url, pool_size=tasks, max_overflow=2) as eng:
            code = await run_async_workers(
                [Collect], eng, concurrency=tasks, burst=True, install_signals=False
            )
            assert code == EXIT_OK
            assert checked_out(eng) == 0

    run(main)
    counts = Counter(seen)
    assert sorted(counts) == list(range(total_jobs)) and max(counts.values()) == 1
    assert total(db, core_jobs) == 0


def test_forced_stop_returns_jobs_in_hand_and_ends_blocked_waits(
    async_url: URL, db: Engine
) -> None:
    """Four tasks: two hold a job each, two block in queue_wait.  A forced stop cancels all
    four: the jobs go back, the waits end, and the loop keeps ticking throughout."""
    enqueue(db, "held 1", "held 2")
    started: list[str] = []

    class Hold(AsyncJob):
        model = AJob
        wait_timeout = 30.0  # the idle tasks block in the server for the whole test

        async def execute(self, job: AJob) -> None:
            started.append(job.command)
            await asyncio.sleep(60)

    async def main() -> None:
        async with async_engine(async_url, pool_size=4, max_overflow=2) as eng:
            workers = AsyncWorkers([Hold], eng, concurrency=4)
            with Ticker() as ticker:
                runner = asyncio.create_task(workers.run(install_signals=False))
                database = str(async_url.database)
                await until(lambda: len(started) == 2, "two jobs are in hand")
                await until(lambda: len(waiting_in_server(db, database)) == 2, "two wait")
                before = ticker.ticks
                await until(lambda: ticker.ticks >= before + 10, "the ticker ticks")
                workers.force()
                code = await asyncio.wait_for(runner, 30)
                assert code == EXIT_FORCED
            assert checked_out(eng) == 0
            # the orphaned waits take the returned jobs, find their clients gone and end;
            # the server gives the jobs back (they may be owned by one for a moment)
            await until(lambda: waiting_in_server(db, database) == [], "the waits end")
            await until(lambda: visible(db) == ["held 1", "held 2"], "both jobs are back")

    run(main)
    assert sorted(started) == ["held 1", "held 2"]
    assert total(db) == 2
