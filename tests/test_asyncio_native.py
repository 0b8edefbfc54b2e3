"""The native (Q4M) call sequence through the asyncio queue session, without a server.

SQLAlchemy's ``mysql+aiomysql`` dialect is given :mod:`fake_q4m` as its DBAPI (``module=``):
the async engine then drives the fake, which answers as q4m.md's "Observed answers" say, from
inside SQLAlchemy's greenlet bridge.  The fake does not really await, so only waits that
return at once (a row is there, or timeout 0) are used: waits that block in the server while
the event loop runs, and tasks cancelled mid-``queue_wait``, are tested on the real engine
with both async drivers in ``test_asyncio_native_q4m.py``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from fake_q4m import FakeConnection
from fake_q4m import FakeQ4M
from fake_q4m import OperationalError
from sqlalchemy import Integer
from sqlalchemy import Text
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.orm import Mapped
from sqlalchemy.orm import mapped_column

from sqlalchemy_q4m import QueueAbort
from sqlalchemy_q4m import QueueMixin
from sqlalchemy_q4m import queue_session
from sqlalchemy_q4m.exc import ConnectionLost
from sqlalchemy_q4m.schema.retry import RetryMixin
from sqlalchemy_q4m.types import new_job_id
from sqlalchemy_q4m.worker.asyncio import AsyncJob

pytestmark = pytest.mark.unit

QUEUE_KINDS = ("wait", "select", "end", "abort")
TABLE = "fqa_shell_jobs"
NOTES = "fqa_notes"


class Base(DeclarativeBase):
    pass


class ShellJob(QueueMixin, Base):
    __tablename__ = TABLE
    command: Mapped[str] = mapped_column(Text)
    priority: Mapped[int] = mapped_column(Integer, default=0)


class AsyncFakeQ4M(FakeQ4M):
    """The fake, with the ``terminate()`` SQLAlchemy's async dialects close a connection by
    when they invalidate it."""

    def connect(self, *args: Any, **kwargs: Any) -> FakeConnection:
        conn = super().connect(*args, **kwargs)
        conn.terminate = conn.close  # type: ignore[attr-defined]
        return conn


def put(fake: FakeQ4M, command: str) -> None:
    fake.put(TABLE, id=new_job_id().bytes, command=command, priority=0)


class Note(Base):
    """A plain table the block writes to (to check the order of commit and queue_end)."""

    __tablename__ = NOTES
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    text: Mapped[str] = mapped_column(Text)


class Harness:
    def __init__(self) -> None:
        self.fake = AsyncFakeQ4M()
        self.checkins: list[str] = []

    def waiter_trace(self) -> list[str]:
        """The queue statements of the last connection that called queue_wait."""
        conn = self.fake.waiters()[-1]
        return self.fake.trace(conn, QUEUE_KINDS)

    def assert_clean(self) -> None:
        assert self.fake.violations == []
        assert self.checkins == []
        assert not any(c.owner_mode for c in self.fake.connections.values() if not c.closed)


@asynccontextmanager
async def fake_engine(h: Harness) -> AsyncIterator[AsyncEngine]:
    eng = create_async_engine("mysql+aiomysql://fake@localhost/test", module=h.fake)

    @event.listens_for(eng.sync_engine, "checkin")
    def _checkin(dbapi_conn: FakeConnection | None, record: Any) -> None:
        if dbapi_conn is not None and dbapi_conn.owner_mode:
            h.checkins.append(f"connection {dbapi_conn.id} checked in in owner mode")

    try:
        async with eng.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        yield eng
    finally:
        await eng.dispose()


def run_with_fake(main: Any) -> Harness:
    h = Harness()

    async def go() -> None:
        async with fake_engine(h) as eng:
            await main(h, eng)

    asyncio.run(go())
    return h


def test_end_sequence() -> None:
    async def main(h: Harness, eng: AsyncEngine) -> None:
        put(h.fake, "echo hi")
        async with queue_session(ShellJob, bind=eng, timeout=5) as job:
            assert job is not None and job.command == "echo hi"
        assert h.waiter_trace() == [f"queue_wait('{TABLE}', 5)", f"SELECT {TABLE}", "queue_end()"]
        assert h.fake.rows(TABLE) == []

    run_with_fake(main).assert_clean()


def test_exception_and_queue_abort_return_the_job() -> None:
    async def main(h: Harness, eng: AsyncEngine) -> None:
        put(h.fake, "boom")
        with pytest.raises(RuntimeError):
            async with queue_session(ShellJob, bind=eng, timeout=5) as job:
                assert job is not None
                raise RuntimeError(job.command)
        assert h.waiter_trace()[-1] == "queue_abort()"
        async with queue_session(ShellJob, bind=eng, timeout=5) as job:
            assert job is not None
            raise QueueAbort
        assert h.waiter_trace()[-2:] == [f"SELECT {TABLE}", "queue_abort()"]
        assert h.fake.owner_of(TABLE) == [None]

    run_with_fake(main).assert_clean()


def test_timeout_leaves_owner_mode_at_once() -> None:
    async def main(h: Harness, eng: AsyncEngine) -> None:
        async with queue_session(ShellJob, bind=eng, timeout=0) as job:
            assert job is None
        assert h.waiter_trace() == [f"queue_wait('{TABLE}', 0)", "queue_end()"]

    run_with_fake(main).assert_clean()


def test_cancelled_inside_the_block_aborts() -> None:
    async def main(h: Harness, eng: AsyncEngine) -> None:
        put(h.fake, "slow")
        owning = asyncio.Event()

        async def consumer() -> None:
            async with queue_session(ShellJob, bind=eng, where=ShellJob.priority >= 0) as job:
                assert job is not None
                owning.set()
                await asyncio.sleep(60)

        task = asyncio.create_task(consumer())
        await owning.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert h.waiter_trace() == [
            f"queue_wait('{TABLE}:(`priority` >= 0)', 60)",
            f"SELECT {TABLE}",
            "queue_abort()",
        ]
        assert [r["command"] for r in h.fake.rows(TABLE)] == ["slow"]
        assert h.fake.owner_of(TABLE) == [None]

    run_with_fake(main).assert_clean()


def test_lost_connection_at_end_is_never_pooled() -> None:
    async def main(h: Harness, eng: AsyncEngine) -> None:
        put(h.fake, "x")
        h.fake.fail_next("end", OperationalError(2013, "Lost connection to server"))
        with pytest.raises(ConnectionLost):
            async with queue_session(ShellJob, bind=eng, timeout=5) as job:
                assert job is not None
        assert eng.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
        assert h.fake.owner_of(TABLE) == [None]  # the dead connection returned it

    run_with_fake(main).assert_clean()


def test_session_bind_commits_before_queue_end() -> None:
    async def main(h: Harness, eng: AsyncEngine) -> None:
        put(h.fake, "a")
        async with AsyncSession(eng) as session:
            qs = queue_session(ShellJob, bind=session, timeout=5)
            async with qs as job:
                assert job is not None
                assert qs.session is not session  # Q4M: the job is owned on its own connection
                session.add(Note(id=1, text=job.command))
            log = [(e.conn, e.text) for e in h.fake.log]
            pinned = h.fake.waiters()[-1]
            insert_at = next(i for i, (_, t) in enumerate(log) if t == f"INSERT {NOTES}")
            user = log[insert_at][0]
            assert user != pinned
            assert log.index((user, "COMMIT"), insert_at) < log.index((pinned, "queue_end()"))
        assert [r["text"] for r in h.fake.rows(NOTES)] == ["a"]

    run_with_fake(main).assert_clean()


class RetryShellJob(RetryMixin, QueueMixin, Base):
    __tablename__ = "fqa_retry_jobs"
    command: Mapped[str] = mapped_column(Text)


def test_async_worker_retries_and_buries_on_q4m() -> None:
    runs: list[tuple[str, int]] = []

    class Flaky(AsyncJob):
        model = RetryShellJob
        max_attempts = 2
        retry_base = 0.0
        wait_timeout = 0.001  # the fake's queue_wait really blocks: keep empty waits short

        async def execute(self, job: RetryShellJob) -> None:
            runs.append((job.command, job.attempts))
            if job.command == "broken" or job.attempts == 0:
                raise RuntimeError(job.command)

    async def main(h: Harness, eng: AsyncEngine) -> None:
        for command in ("flaky", "broken"):
            h.fake.put(
                "fqa_retry_jobs", id=new_job_id().bytes, command=command, attempts=0, run_at=0
            )
        worker = Flaky(eng)
        for _ in range(4):
            assert await worker.run_once() is True
        assert await worker.run_once() is False
        await worker.close()
        trace = h.fake.trace(kinds=("wait",))
        assert all("fqa_retry_jobs:(`run_at` <= " in t for t in trace)  # due jobs only
        assert h.fake.rows("fqa_retry_jobs") == []

    h = run_with_fake(main)
    assert sorted(runs) == [("broken", 0), ("broken", 1), ("flaky", 0), ("flaky", 1)]
    assert [r["queue"] for r in h.fake.rows("q4m_dead_letters")] == ["fqa_retry_jobs"]
    h.assert_clean()
