"""One suite of worker behaviours, run against both drivers: the synchronous
:class:`~sqlalchemy_q4m.worker.consumer.Consumer` (a :class:`Job`) and the asyncio
:class:`~sqlalchemy_q4m.worker.asyncio.AsyncConsumer` (an :class:`AsyncJob`).  Both perform
what the same sans-IO cores decide (:mod:`sqlalchemy_q4m.worker.policy`,
:mod:`sqlalchemy_q4m.worker.loop`), so each behaviour is written once and must hold for both.

Each job's body is a plain function ``behave(ctx, row)``; the async driver runs it inside
SQLAlchemy's greenlet bridge, so ``ctx.sql`` (a statement in the job's session) works in both.
``test_native_worker_behaviours.py`` runs the same scenarios on the Q4M engine.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlalchemy import create_engine
from sqlalchemy import event
from sqlalchemy import func
from sqlalchemy import select
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool
from sqlalchemy.util import greenlet_spawn
from worker_support import number_table

from sqlalchemy_q4m import QueueAbort
from sqlalchemy_q4m.worker.asyncio import AsyncConsumer
from sqlalchemy_q4m.worker.asyncio import AsyncJob
from sqlalchemy_q4m.worker.consumer import Consumer
from sqlalchemy_q4m.worker.deadletter import dead_letter_table
from sqlalchemy_q4m.worker.job import Job
from sqlalchemy_q4m.worker.stats import Stats

pytestmark = pytest.mark.integration

TABLE = "wb_jobs"
DEAD = "wb_dead"
ASYNC_DRIVER = "asyncmy"


@dataclass
class Ctx:
    """What a job's body sees: its job object, a statement in its session, and the consumer."""

    job: Job
    sql: Callable[[str], Any]
    holder: Holder


@dataclass
class Holder:
    consumer: Any = None
    seen: list[Any] = field(default_factory=list)  # what the bodies recorded


Behave = Callable[[Ctx, Any], None]


class SyncDriver:
    name = "sync"

    def job_class(self, behave: Behave, holder: Holder, **attrs: Any) -> type[Job]:
        def execute(self: Job, row: Any) -> None:
            behave(Ctx(self, lambda s: self.session.execute(text(s)).scalar(), holder), row)

        body = {"table_name": TABLE, "dead_letter_table": DEAD, "execute": execute, **attrs}
        return type("SyncBehaviourJob", (Job,), body)

    def run(
        self, url: URL, cls: type[Job], holder: Holder, *, burst: bool = True, **options: Any
    ) -> dict[str, int]:
        engine = create_engine(url, poolclass=NullPool)
        try:
            consumer = Consumer([cls(engine, **options)], engine, stats=Stats())
            holder.consumer = consumer
            consumer.run(burst=burst)
            return consumer.stats.snapshot()
        finally:
            engine.dispose()


class AsyncDriver:
    name = "asyncio"

    def job_class(self, behave: Behave, holder: Holder, **attrs: Any) -> type[Job]:
        async def execute(self: AsyncJob, row: Any) -> None:
            def sql(statement: str) -> Any:
                return self.session.sync_session.execute(text(statement)).scalar()

            await greenlet_spawn(behave, Ctx(self, sql, holder), row)

        body = {"table_name": TABLE, "dead_letter_table": DEAD, "execute": execute, **attrs}
        return type("AsyncBehaviourJob", (AsyncJob,), body)

    def run(
        self, url: URL, cls: type[Job], holder: Holder, *, burst: bool = True, **options: Any
    ) -> dict[str, int]:
        async def main() -> dict[str, int]:
            engine = create_async_engine(
                url.set(drivername=f"mysql+{ASYNC_DRIVER}"), poolclass=NullPool
            )
            try:
                consumer = AsyncConsumer([cls(engine, **options)], engine, stats=Stats())
                holder.consumer = consumer
                await consumer.run(burst=burst)
                return consumer.stats.snapshot()
            finally:
                await engine.dispose()

        return asyncio.run(main())


@pytest.fixture(params=[SyncDriver(), AsyncDriver()], ids=lambda d: d.name)
def driver(request: pytest.FixtureRequest) -> Any:
    return request.param


@pytest.fixture
def queue(engine: Engine) -> Any:
    """A fresh queue table (n, attempts, run_at) and no dead letters."""
    table = number_table(engine, TABLE)
    with engine.begin() as conn:
        conn.execute(text(f"DROP TABLE IF EXISTS {DEAD}"))
    return table


def put(engine: Engine, table: Any, *numbers: int) -> None:
    with engine.begin() as conn:
        for n in numbers:  # one statement each: the jobs are claimed in this order
            conn.execute(table.insert().values(n=n))


def left(engine: Engine, table: Any) -> list[int]:
    with engine.connect() as conn:
        return sorted(conn.execute(select(table.c.n)).scalars())


def dead(engine: Engine) -> list[tuple[str, int]]:
    with engine.connect() as conn:
        if not conn.dialect.has_table(conn, DEAD):
            return []
        letters = dead_letter_table(DEAD)
        return [tuple(r) for r in conn.execute(select(letters.c.queue, letters.c.attempts))]


def counts(stats: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in stats.items() if v}


def test_a_failure_is_retried_then_done(
    driver: Any, engine: Engine, db_url: URL, queue: Any
) -> None:
    holder = Holder()

    def behave(ctx: Ctx, row: Any) -> None:
        holder.seen.append(ctx.job.attempts)
        if ctx.job.attempts == 0:
            raise RuntimeError("first run fails")

    put(engine, queue, 1)
    cls = driver.job_class(behave, holder, retry_base=0.0, max_attempts=3)
    stats = driver.run(db_url, cls, holder)
    assert counts(stats) == {"retried": 1, "done": 1}
    assert holder.seen == [0, 1]
    assert left(engine, queue) == [] and dead(engine) == []


def test_a_job_is_dead_lettered_after_max_attempts(
    driver: Any, engine: Engine, db_url: URL, queue: Any
) -> None:
    holder = Holder()

    def behave(ctx: Ctx, row: Any) -> None:
        raise ValueError(f"always fails ({row.n})")

    put(engine, queue, 7)
    cls = driver.job_class(behave, holder, retry_base=0.0, max_attempts=3)
    stats = driver.run(db_url, cls, holder)
    assert counts(stats) == {"retried": 2, "dead": 1}
    assert left(engine, queue) == [] and dead(engine) == [(TABLE, 3)]


@pytest.mark.parametrize("how", ["queue_abort", "raise"])
def test_an_aborted_job_goes_back_untouched(
    driver: Any, engine: Engine, db_url: URL, queue: Any, how: str
) -> None:
    holder = Holder()

    def behave(ctx: Ctx, row: Any) -> None:
        holder.seen.append((row.n, ctx.job.attempts))
        if len(holder.seen) == 1:
            if how == "raise":
                raise QueueAbort()
            ctx.job.queue_abort()

    put(engine, queue, 3)
    stats = driver.run(db_url, driver.job_class(behave, holder), holder)
    assert counts(stats) == {"aborted": 1, "done": 1}
    assert holder.seen == [(3, 0), (3, 0)]  # the same job, not counted as a failure
    assert left(engine, queue) == [] and dead(engine) == []


def test_a_lost_connection_returns_the_job_and_the_loop_goes_on(
    driver: Any, engine: Engine, db_url: URL, queue: Any
) -> None:
    holder = Holder()

    def behave(ctx: Ctx, row: Any) -> None:
        holder.seen.append(row.n)
        if len(holder.seen) > 1:
            return
        cid = int(ctx.sql("SELECT CONNECTION_ID()") or 0)
        with engine.connect() as admin:  # the server kills the worker's own connection
            admin.execute(text(f"KILL {cid}"))
        ctx.sql("SELECT 1")

    put(engine, queue, 5)
    stats = driver.run(db_url, driver.job_class(behave, holder, reconnect_max=0.2), holder)
    assert counts(stats) == {"lost": 1, "done": 1}
    assert holder.seen == [5, 5]  # the same job, run again: no retry copy, no dead letter
    assert left(engine, queue) == [] and dead(engine) == []


def test_recycle_after_makes_fresh_job_objects(
    driver: Any, engine: Engine, db_url: URL, queue: Any
) -> None:
    holder = Holder()

    def behave(ctx: Ctx, row: Any) -> None:
        holder.seen.append(ctx.job)  # the object itself: an id() may be reused once it is freed

    put(engine, queue, 1, 2, 3, 4, 5)
    stats = driver.run(db_url, driver.job_class(behave, holder, recycle_after=2), holder)
    assert counts(stats) == {"done": 5}
    objects: list[Any] = []
    for job in holder.seen:
        if not any(job is o for o in objects):
            objects.append(job)
    assert len(objects) == 3  # 2 + 2 + 1 jobs
    assert [sum(1 for j in holder.seen if j is o) for o in objects] == [2, 2, 1]


def test_end_before_execute_is_at_most_once(
    driver: Any, engine: Engine, db_url: URL, queue: Any
) -> None:
    holder = Holder()

    def behave(ctx: Ctx, row: Any) -> None:
        holder.seen.append(row.n)
        if row.n == 2:
            raise RuntimeError("fails once, never retried")

    put(engine, queue, 1, 2)
    cls = driver.job_class(behave, holder, end_before_execute=True, max_attempts=5)
    stats = driver.run(db_url, cls, holder)
    assert counts(stats) == {"done": 1, "dead": 1}
    assert holder.seen == [1, 2]
    assert left(engine, queue) == [] and dead(engine) == [(TABLE, 1)]


def test_a_stop_finishes_the_job_in_hand_and_takes_no_new_one(
    driver: Any, engine: Engine, db_url: URL, queue: Any
) -> None:
    holder = Holder()

    def behave(ctx: Ctx, row: Any) -> None:
        holder.seen.append(row.n)
        holder.consumer.stop()  # as the first SIGTERM does, while a job is in hand

    put(engine, queue, 1, 2, 3)
    stats = driver.run(db_url, driver.job_class(behave, holder), holder, burst=False)
    assert counts(stats) == {"done": 1}
    assert holder.seen == [1]
    assert left(engine, queue) == [2, 3]


POLL = 0.1
SLOW_CLAIM = 0.05


def test_an_idle_portable_consumer_polls_on_a_fixed_schedule(
    driver: Any, engine: Engine, db_url: URL, queue: Any
) -> None:
    """One claim per ``poll_interval``, however long a claim takes: an idle consumer costs
    1 / poll_interval queries a second with either driver."""
    claims: list[float] = []

    def slow_claims(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "SKIP LOCKED" in statement and TABLE in statement:
            claims.append(time.monotonic())
            time.sleep(SLOW_CLAIM)

    idle = 1.0
    cls = driver.job_class(lambda ctx, row: None, Holder(), backend="portable")
    # One wait of ``idle`` seconds on an empty queue, every claim slowed down.
    if driver.name == "sync":
        eng = create_engine(db_url, poolclass=NullPool)
        event.listen(eng, "before_cursor_execute", slow_claims)
        try:
            job = cls(eng, poll_interval=POLL)
            assert job.run_once(timeout=idle) is False
            job.close()
        finally:
            eng.dispose()
    else:

        async def main() -> None:
            eng = create_async_engine(
                db_url.set(drivername=f"mysql+{ASYNC_DRIVER}"), poolclass=NullPool
            )
            event.listen(eng.sync_engine, "before_cursor_execute", slow_claims)
            try:
                job = cls(eng, poll_interval=POLL)
                assert await job.run_once(timeout=idle) is False
                await job.close()
            finally:
                await eng.dispose()

        asyncio.run(main())
    # fixed schedule: idle / POLL claims (give or take one); sleeping a full poll_interval
    # after each slow claim would make idle / (POLL + SLOW_CLAIM), about 6.7
    assert len(claims) >= idle / POLL - 1, claims


def test_counts_are_the_same_for_both_drivers(engine: Engine, queue: Any, db_url: URL) -> None:
    """The same mixed queue gives the same outcomes through either driver."""
    results = []
    for drv in (SyncDriver(), AsyncDriver()):
        holder = Holder()

        def behave(ctx: Ctx, row: Any, holder: Holder = holder) -> None:
            if row.n % 3 == 0:
                raise RuntimeError("fails")
            if row.n % 3 == 1 and ctx.job.attempts == 0 and row.n not in holder.seen:
                holder.seen.append(row.n)
                ctx.job.queue_abort()

        put(engine, queue, *range(1, 10))
        cls = drv.job_class(behave, holder, retry_base=0.0, max_attempts=2)
        results.append(counts(drv.run(db_url, cls, holder)))
        with engine.connect() as conn:
            assert conn.execute(select(func.count()).select_from(queue)).scalar() == 0
    assert results[0] == results[1] == {"done": 6, "aborted": 3, "retried": 3, "dead": 3}
