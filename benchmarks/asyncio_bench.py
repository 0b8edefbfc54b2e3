"""asyncio: ``async_queue_session`` on each documented async bind and the ``AsyncJob`` worker,
over aiomysql and asyncmy, against a raw loop on the same driver issuing the same SQL
(portable: SKIP LOCKED claim, DELETE, COMMIT; native: ``queue_wait``, owner ``SELECT``,
``queue_end()`` with autocommit), alternating, at 1, 2, 4 and 8 tasks in one event loop."""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Awaitable
from collections.abc import Callable
from typing import Any

from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.util import greenlet_spawn

from sqlalchemy_q4m import QueueAbort
from sqlalchemy_q4m.asyncio import async_queue_session
from sqlalchemy_q4m.asyncio_worker import AsyncJob
from sqlalchemy_q4m.exc import CompletionFailed

from .common import RAW_CLAIM
from .common import RAW_DELETE_ONE
from .common import RAW_END
from .common import RAW_OWNED
from .common import RAW_WAIT
from .common import READ_COMMITTED
from .common import BenchJob
from .report import Progress
from .report import Report
from .report import Settings
from .report import alternate
from .report import drain
from .report import label
from .report import rate_row

DRIVERS = ("aiomysql", "asyncmy")
DEADLOCK = 1213

#: The library sides: (side, how the row names it).
SIDES: tuple[tuple[str, str], ...] = (
    ("connection", "`async_queue_session(bind=AsyncConnection)`"),
    ("engine", "`async_queue_session(bind=AsyncEngine)`"),
    ("session", "`async_queue_session(bind=AsyncSession)`"),
    ("worker", "`AsyncJob.run_once`"),
)


class NoOpAsyncJob(AsyncJob):
    """The asyncio worker's job class with a no-op ``execute``."""

    model = BenchJob
    max_attempts = 1  # the table has no retry columns (and a no-op never fails)

    async def execute(self, job: Any) -> None:
        return None


def drivers() -> list[str]:
    return [d for d in DRIVERS if importlib.util.find_spec(d) is not None]


async def _raw_connect(url: URL, driver: str, native: bool) -> Any:
    module: Any = __import__(driver)
    kwargs: dict[str, Any] = {
        "host": url.host or "127.0.0.1",
        "port": url.port or 3306,
        "user": url.username or "root",
        "password": url.password or "",
        "db": url.database,
        "autocommit": native,
    }
    conn = await module.connect(**kwargs)
    if not native:
        async with conn.cursor() as cur:
            await cur.execute(READ_COMMITTED)
        await conn.commit()
    return conn


async def _raw_task(conn: Any, native: bool) -> int:
    done = 0
    async with conn.cursor() as cur:
        while True:
            if native:
                await cur.execute(RAW_WAIT)
                (got,) = await cur.fetchone()
                if not got:
                    await cur.execute(RAW_END)
                    return done
                await cur.execute(RAW_OWNED)
                await cur.fetchone()
                await cur.execute(RAW_END)
                done += 1
                continue
            await cur.execute(RAW_CLAIM, (1,))
            row = await cur.fetchone()
            if row is None:
                await conn.rollback()
                return done
            try:
                await cur.execute(RAW_DELETE_ONE, (row[0],))
            except Exception as err:
                if not err.args or err.args[0] != DEADLOCK:
                    raise
                await conn.rollback()  # the job returns, as with queue_session
                continue
            await conn.commit()
            done += 1


async def _bridge_task(dbapi: Any, native: bool) -> int:
    """The raw loop's statements through SQLAlchemy's asyncio DBAPI adapter (``dbapi``: an
    ``AsyncConnection``'s), crossing its greenlet bridge twice per job as a queue session does
    (the claim on entry; the end on exit): what SQLAlchemy's asyncio layer alone costs, the
    floor of every library row."""
    cur = await greenlet_spawn(dbapi.cursor)

    def claim() -> Any:
        if native:
            cur.execute(RAW_WAIT)
            (got,) = cur.fetchone()
            if not got:
                cur.execute(RAW_END)
                return None
            cur.execute(RAW_OWNED)
            return cur.fetchone()
        cur.execute(RAW_CLAIM, (1,))
        row = cur.fetchone()
        if row is None:
            dbapi.rollback()
        return row

    def end(key: Any) -> bool:
        if native:
            cur.execute(RAW_END)
            return True
        try:
            cur.execute(RAW_DELETE_ONE, (key,))
        except Exception as err:
            if not err.args or err.args[0] != DEADLOCK:
                raise
            dbapi.rollback()  # the job returns, as with the raw loop
            return False
        dbapi.commit()
        return True

    done = 0
    while True:
        row = await greenlet_spawn(claim)
        if row is None:
            return done
        done += await greenlet_spawn(end, row[0])


async def _library_task(bind: Any) -> int:
    done = 0
    while True:
        try:
            async with async_queue_session(BenchJob, bind=bind, timeout=0) as job:
                if job is None:
                    return done
        except CompletionFailed:  # a deadlock victim: the job returns and runs again
            continue
        done += 1


async def _worker_task(job: NoOpAsyncJob) -> int:
    done = 0
    while await job.run_once(timeout=0):
        done += 1
    return done


class AsyncDrain:
    """``tasks`` consumers of one ``side`` (``raw`` or a library side) in one event loop:
    connected in ``__init__``, before the start signal, like the thread consumers.  Two more
    sides are floors for ``benchmarks.cpu`` and ``benchmarks.floors``: ``bridge`` (the raw
    loop's statements through SQLAlchemy's greenlet bridge, :func:`_bridge_task`) and
    ``driver`` (the raw loop on the driver connections under an ``AsyncEngine``'s pool: what
    awaiting the statements directly, without the bridge, would cost)."""

    def __init__(self, url: URL, driver: str, side: str, tasks: int, native: bool) -> None:
        self.loop = asyncio.new_event_loop()
        self.side, self.native = side, native
        self.engine: AsyncEngine | None = None
        self.binds: list[Any] = []
        #: The "bridge" side's adapted DBAPI connections, the "driver" side's driver ones.
        self.dbapis: list[Any] = []
        self.loop.run_until_complete(self._setup(url, driver, tasks))

    async def _setup(self, url: URL, driver: str, tasks: int) -> None:
        if self.side == "raw":
            self.binds = [await _raw_connect(url, driver, self.native) for _ in range(tasks)]
            return
        self.engine = engine = create_async_engine(
            url.set(drivername=f"mysql+{driver}"), pool_size=tasks, max_overflow=2
        )
        conns = [await engine.connect() for _ in range(tasks)]  # the pool holds `tasks`
        if self.side in ("bridge", "driver"):  # the raw loop's mode, set through SQLAlchemy
            level = "AUTOCOMMIT" if self.native else "READ COMMITTED"
            for conn in conns:
                await conn.execution_options(isolation_level=level)
                pooled = await conn.get_raw_connection()
                # the adapter SQLAlchemy's own statements go through, or the driver's own
                # connection under it
                self.dbapis.append(
                    pooled.dbapi_connection if self.side == "bridge" else pooled.driver_connection
                )
            self.binds = conns
            return
        async with async_queue_session(BenchJob, bind=conns[0], timeout=0) as job:
            if job is not None:  # backend detected, statements compiled; the job goes back
                raise QueueAbort
        if self.side == "connection":
            if not self.native:
                for conn in conns:
                    await conn.execution_options(isolation_level="READ COMMITTED")
            self.binds = conns
            return
        for conn in conns:
            await conn.close()
        if self.side == "engine":
            self.binds = [engine] * tasks
        elif self.side == "session":
            self.binds = [AsyncSession(engine) for _ in range(tasks)]
        else:
            self.binds = [NoOpAsyncJob(engine) for _ in range(tasks)]

    def consume(self) -> int:
        task: Callable[[Any], Awaitable[int]]
        targets = self.binds
        if self.side in ("raw", "driver"):  # the raw loop (on the pool's driver connections)

            def task(conn: Any) -> Awaitable[int]:
                return _raw_task(conn, self.native)

            targets = self.dbapis if self.side == "driver" else self.binds
        elif self.side == "bridge":

            def task(dbapi: Any) -> Awaitable[int]:
                return _bridge_task(dbapi, self.native)

            targets = self.dbapis
        else:
            task = _worker_task if self.side == "worker" else _library_task

        async def run() -> int:
            return sum(await asyncio.gather(*(task(target) for target in targets)))

        return self.loop.run_until_complete(run())

    def close(self) -> None:
        self.loop.run_until_complete(self._close())
        self.loop.close()

    async def _close(self) -> None:
        seen: set[int] = set()
        for bind in self.binds:
            if id(bind) in seen or isinstance(bind, AsyncEngine):
                continue
            seen.add(id(bind))
            closing = bind.close()
            if closing is not None:
                await closing
        if self.engine is not None:
            await self.engine.dispose()


def asyncio_consume(url: URL, s: Settings, report: Report, progress: Progress) -> None:
    found = drivers()
    if not found:
        report.extra["asyncio"] = "neither aiomysql nor asyncmy is installed: no asyncio rows"
        return
    for driver in found:
        for n in s.concurrency:
            progress(f"asyncio {driver}, {n} task(s)")
            sides = ["raw", *(side for side, _ in SIDES)]
            rates = alternate(
                s.repeats,  # far from their target so far: fewer repeats keep the run short
                *(
                    lambda n=n, side=side, driver=driver: drain(
                        url, s.consume_jobs, "thread", 1, AsyncDrain, driver, side, n, s.native
                    )
                    for side in sides
                ),
            )
            for (_, name), rate in zip(SIDES, rates[1:], strict=True):
                report.rows.append(
                    rate_row(
                        "asyncio",
                        f"{name}, {driver}, {label('task', n)}",
                        rate,
                        rates[0],
                        note=f"vs the raw {driver} loop",
                    )
                )
