"""One suite of queue-session behaviours, run against both drivers of the job-life state
machine (:mod:`sqlalchemy_q4m.consumer.lifecycle`): the blocking :class:`QueueSession`
(``pymysql``) and the asyncio :class:`AsyncQueueSession` (``asyncmy``), each on MariaDB (the
portable backend) and on the Q4M engine (native, marker ``native``); and against the queue
sessions a :class:`QueueConsumer` takes one after another (``consumer``: one consumer per set
of options for the whole scenario, so each queue session after the first is a renewed one),
and those an asyncio :class:`AsyncQueueConsumer` takes (``async-consumer``, ``asyncmy``).

Each scenario is written once, as a coroutine: the sync driver is wrapped in ``async`` methods
that call it directly.  Only how a block is interrupted differs by nature: the sync driver
sees a ``KeyboardInterrupt``, the asyncio one a cancelled task.
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import threading
import time
from collections.abc import AsyncIterator
from collections.abc import Awaitable
from collections.abc import Callable
from collections.abc import Iterator
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any
from typing import TypeVar

import pytest
from native_support import tables_on
from sqlalchemy import Engine
from sqlalchemy import Text
from sqlalchemy import event
from sqlalchemy import insert
from sqlalchemy import select
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.orm import Mapped
from sqlalchemy.orm import mapped_column

from sqlalchemy_q4m import QueueAbort
from sqlalchemy_q4m import QueueConsumer
from sqlalchemy_q4m import QueueMixin
from sqlalchemy_q4m import QueueSession
from sqlalchemy_q4m import queue_consumer
from sqlalchemy_q4m import queue_session
from sqlalchemy_q4m.asyncio import AsyncQueueConsumer
from sqlalchemy_q4m.exc import NotOwner
from sqlalchemy_q4m.exc import Q4MError

T = TypeVar("T")


class Base(DeclarativeBase):
    pass


class DJob(QueueMixin, Base):
    __tablename__ = "test_consumer_drivers_jobs"
    payload: Mapped[str] = mapped_column(Text)


SERVERS = [
    pytest.param("portable", marks=pytest.mark.integration),
    pytest.param("native", marks=[pytest.mark.native, pytest.mark.integration]),
]


@pytest.fixture(scope="module", params=SERVERS)
def server(request: pytest.FixtureRequest) -> Iterator[tuple[str, URL, Engine]]:
    """The backend's name, its database URL and a sync engine on it, with the table."""
    with tables_on(request, request.param, Base.metadata, "q4m_drivers") as (url, eng):
        yield request.param, url, eng


class SyncAdapter:
    """A :class:`QueueSession` behind the asyncio session's methods (called directly)."""

    def __init__(self, qs: QueueSession[Any]) -> None:
        self.qs = qs

    @property
    def owning(self) -> bool:
        return self.qs.owning

    async def wait(self) -> Any:
        return self.qs.wait()

    async def end(self) -> None:
        self.qs.end()

    async def abort(self) -> None:
        self.qs.abort()

    async def close(self) -> None:
        self.qs.close()

    async def __aenter__(self) -> Any:
        return self.qs.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        return self.qs.__exit__(exc_type, exc, tb)


class Driver:
    """Runs a scenario against one driver: ``session(...)`` makes a queue session with the
    asyncio API; ``events`` is the sync engine its statements go through."""

    def __init__(self, kind: str, backend: str, url: URL, sync_engine: Engine) -> None:
        self.kind, self.backend, self.url, self.sync_engine = kind, backend, url, sync_engine
        self.events: Engine = sync_engine
        self._async: AsyncEngine | None = None
        self._consumers: dict[Any, QueueConsumer[Any] | AsyncQueueConsumer[Any]] = {}

    def session(self, *targets: Any, **kw: Any) -> Any:
        if self.kind == "consumer":
            return SyncAdapter(self._take(targets, **kw))
        if self.kind == "async-consumer":
            return self._take(targets, **kw)
        if self._async is None:
            return SyncAdapter(queue_session(*targets, bind=self.sync_engine, **kw))
        return queue_session(*targets, bind=self._async, **kw)

    def _take(self, targets: tuple[Any, ...], timeout: float = 60.0, **kw: Any) -> Any:
        """The next take of the scenario's queue consumer with these options (one per set of
        options, kept for the scenario: each queue session is a renewed take)."""
        key = (targets, tuple(sorted(kw.items())))
        consumer = self._consumers.get(key)
        if consumer is None:
            bind = self.sync_engine if self._async is None else self._async
            consumer = self._consumers[key] = queue_consumer(*targets, bind=bind, **kw)
        return consumer.take(timeout=timeout)

    def run(self, scenario: Callable[[], Awaitable[T]]) -> T:
        async def main() -> T:
            if self.kind == "consumer":
                try:
                    return await scenario()
                finally:
                    for consumer in self._consumers.values():
                        assert isinstance(consumer, QueueConsumer)
                        consumer.close()
                    self._consumers.clear()
            if self.kind == "sync":
                return await scenario()
            eng = create_async_engine(self.url.set(drivername="mysql+asyncmy"), pool_size=5)
            self._async, self.events = eng, eng.sync_engine
            try:
                return await scenario()
            finally:
                for aconsumer in self._consumers.values():
                    assert isinstance(aconsumer, AsyncQueueConsumer)
                    await aconsumer.close()
                self._consumers.clear()
                self._async, self.events = None, self.sync_engine
                await eng.dispose()

        return asyncio.run(main())


@pytest.fixture(params=["sync", "async", "consumer", "async-consumer"])
def driver(request: pytest.FixtureRequest, server: tuple[str, URL, Engine]) -> Iterator[Driver]:
    backend, url, eng = server
    yield Driver(request.param, backend, url, eng)
    with eng.begin() as conn:
        conn.execute(DJob.__table__.delete())


def enqueue(eng: Engine, *payloads: str) -> None:
    with eng.begin() as conn:
        conn.execute(insert(DJob), [{"payload": p} for p in payloads])


def queued(eng: Engine) -> list[str]:
    with eng.connect() as conn:
        return list(conn.execute(select(DJob.payload).order_by(DJob.id)).scalars())


@asynccontextmanager
async def statements(eng: Engine, needle: str, delay: float = 0.0) -> AsyncIterator[list[float]]:
    """The start times of the statements containing ``needle`` (each delayed ``delay``)."""
    starts: list[float] = []

    def before(conn: Any, cursor: Any, stmt: str, params: Any, context: Any, many: bool) -> None:
        if needle in stmt:
            starts.append(time.monotonic())
            time.sleep(delay)

    event.listen(eng, "before_cursor_execute", before)
    try:
        yield starts
    finally:
        event.remove(eng, "before_cursor_execute", before)


def test_normal_exit_ends_the_job(driver: Driver) -> None:
    enqueue(driver.sync_engine, "a")

    async def scenario() -> None:
        async with driver.session(DJob, timeout=5) as job:
            assert job is not None and job.payload == "a"

    driver.run(scenario)
    assert queued(driver.sync_engine) == []


def test_an_exception_aborts_and_is_reraised(driver: Driver) -> None:
    enqueue(driver.sync_engine, "a")

    async def scenario() -> None:
        with pytest.raises(RuntimeError, match="boom"):
            async with driver.session(DJob, timeout=5) as job:
                assert job is not None
                raise RuntimeError("boom")

    driver.run(scenario)
    assert queued(driver.sync_engine) == ["a"]


def test_queue_abort_returns_the_job_and_is_swallowed(driver: Driver) -> None:
    enqueue(driver.sync_engine, "a")

    async def scenario() -> None:
        async with driver.session(DJob, timeout=5) as job:
            assert job is not None
            raise QueueAbort()

    driver.run(scenario)
    assert queued(driver.sync_engine) == ["a"]


def test_a_timeout_returns_none_in_about_the_timeout(driver: Driver) -> None:
    async def scenario() -> float:
        started = time.monotonic()
        async with driver.session(DJob, timeout=1) as job:
            assert job is None
        return time.monotonic() - started

    elapsed = driver.run(scenario)
    assert 0.9 <= elapsed < 4.0


def test_a_job_arriving_during_the_wait_is_taken(driver: Driver) -> None:
    timer = threading.Timer(0.3, enqueue, (driver.sync_engine, "late"))

    async def scenario() -> None:
        timer.start()
        async with driver.session(DJob, timeout=5, poll_interval=0.02) as job:
            assert job is not None and job.payload == "late"

    try:
        driver.run(scenario)
    finally:
        timer.join()
    assert queued(driver.sync_engine) == []


def test_explicit_wait_end_and_abort(driver: Driver) -> None:
    enqueue(driver.sync_engine, "a", "b")

    async def scenario() -> None:
        first = driver.session(DJob, timeout=5)
        job = await first.wait()
        assert job is not None and job.payload == "a" and first.owning
        await first.end()
        assert not first.owning
        with pytest.raises(NotOwner):
            await first.end()
        with pytest.raises(Q4MError, match="waits once"):
            await first.wait()
        await first.close()  # safe after the end
        second = driver.session(DJob, timeout=5)
        job = await second.wait()
        assert job is not None and job.payload == "b"
        await second.abort()
        await second.close()

    driver.run(scenario)
    assert queued(driver.sync_engine) == ["b"]


def test_close_gives_back_a_job_still_owned(driver: Driver) -> None:
    enqueue(driver.sync_engine, "a")

    async def scenario() -> None:
        qs = driver.session(DJob, timeout=5)
        assert await qs.wait() is not None
        await qs.close()
        assert not qs.owning
        await qs.close()  # twice is fine

    driver.run(scenario)
    assert queued(driver.sync_engine) == ["a"]


def test_the_poll_schedule_is_fixed(driver: Driver) -> None:
    """On the portable backend a claim starts every poll_interval, however long it takes: with
    claims slowed to 0.06 s and a 0.1 s interval they start 0.1 s apart, not 0.16 s (a full
    interval after each claim, what the asyncio driver did before both ran one lifecycle).
    On Q4M nothing polls: one ``queue_wait`` blocks in the server for the whole timeout."""
    native = driver.backend == "native"
    needle = "queue_wait" if native else "SKIP LOCKED"

    async def scenario() -> list[float]:
        async with (
            statements(driver.events, needle, delay=0.06) as starts,
            driver.session(DJob, timeout=1.2, poll_interval=0.1) as job,
        ):
            assert job is None
        return starts

    starts = driver.run(scenario)
    if native:
        assert len(starts) == 1, starts
        return
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert len(starts) >= 8, starts
    assert statistics.median(gaps) < 0.135, gaps


def test_an_interrupt_inside_the_block_returns_the_job(driver: Driver) -> None:
    """KeyboardInterrupt (sync) or a cancelled task (asyncio) inside the block: the job goes
    back to the queue and the interruption goes on."""
    enqueue(driver.sync_engine, "a")

    async def sync_scenario() -> None:
        with pytest.raises(KeyboardInterrupt):
            async with driver.session(DJob, timeout=5) as job:
                assert job is not None
                raise KeyboardInterrupt

    async def async_scenario() -> None:
        entered = asyncio.Event()

        async def block() -> None:
            async with driver.session(DJob, timeout=5) as job:
                assert job is not None
                entered.set()
                await asyncio.sleep(30)

        task = asyncio.ensure_future(block())
        await asyncio.wait_for(entered.wait(), 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    driver.run(async_scenario if driver.kind.startswith("async") else sync_scenario)
    assert queued(driver.sync_engine) == ["a"]


def test_the_statements_of_an_idle_wait(driver: Driver) -> None:
    """Both drivers send the same statements: an idle portable wait of 0.5 s at 0.1 s sends
    about six claims and nothing else but the transaction's isolation; on Q4M one
    ``queue_wait``, then ``queue_end()`` to leave owner mode."""
    native = driver.backend == "native"
    needle = "queue_wait" if native else "SKIP LOCKED"

    async def scenario() -> tuple[list[float], list[float]]:
        async with (
            statements(driver.events, needle) as claims,
            statements(driver.events, "") as everything,
            driver.session(DJob, timeout=0.5, poll_interval=0.1) as job,
        ):
            assert job is None
        return claims, everything

    claims, everything = driver.run(scenario)
    if native:
        assert len(claims) == 1 and len(everything) <= 3, everything
        return
    assert 4 <= len(claims) <= 7, claims
    assert len(everything) <= len(claims) + 2, everything
