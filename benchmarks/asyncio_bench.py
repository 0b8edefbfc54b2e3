"""asyncio: ``async_queue_session`` on each documented async bind, ``queue_consumer`` on an
``AsyncEngine`` and the ``AsyncJob`` worker,
over aiomysql and asyncmy, against a raw loop on the same driver issuing the same SQL
(portable: SKIP LOCKED claim, DELETE, COMMIT; native: ``queue_wait``, owner ``SELECT``,
``queue_end()`` with autocommit), alternating, at 1, 2, 4 and 8 tasks in one event loop."""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Awaitable
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.util import await_only
from sqlalchemy.util import greenlet_spawn

from sqlalchemy_q4m import QueueAbort
from sqlalchemy_q4m import queue_consumer
from sqlalchemy_q4m.asyncio import async_queue_session
from sqlalchemy_q4m.asyncio_worker import AsyncJob
from sqlalchemy_q4m.consumer.crossing import cross
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
    ("consumer", "`queue_consumer(bind=AsyncEngine)`, `take()` per job"),
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


def _raw_steps(
    native: bool,
    query: Callable[[str, Any], Sequence[Any]],
    rollback: Callable[[], Any],
    commit: Callable[[], Any],
) -> tuple[Callable[[], Any], Callable[[Any], bool]]:
    """The raw loop's claim (the job's row, or None when the queue is empty) and end (False:
    a deadlock victim, rolled back) as two sync functions, their I/O done by ``query(sql,
    params)`` (the rows), ``rollback()`` and ``commit()``: the halves a queue session runs on
    entry and on exit, for the floors that cross SQLAlchemy's greenlet bridge."""

    def claim() -> Any:
        if native:
            ((got,),) = query(RAW_WAIT, None)
            if not got:
                query(RAW_END, None)
                return None
            return query(RAW_OWNED, None)[0]
        rows = query(RAW_CLAIM, (1,))
        if not rows:
            rollback()
            return None
        return rows[0]

    def end(key: Any) -> bool:
        if native:
            query(RAW_END, None)
            return True
        try:
            query(RAW_DELETE_ONE, (key,))
        except Exception as err:
            if not err.args or err.args[0] != DEADLOCK:
                raise
            rollback()  # the job returns, as with the raw loop
            return False
        commit()
        return True

    return claim, end


async def _crossing_task(
    cross: Callable[..., Awaitable[Any]], claim: Callable[[], Any], end: Callable[[Any], bool]
) -> int:
    """Drain with ``claim`` and ``end``, each run through ``cross`` (one crossing of a greenlet
    bridge per half of a job, as a queue session crosses it)."""
    done = 0
    while True:
        row = await cross(claim)
        if row is None:
            return done
        done += await cross(end, row[0])


async def _bridge_task(dbapi: Any, native: bool) -> int:
    """The raw loop's statements through SQLAlchemy's asyncio DBAPI adapter (``dbapi``: an
    ``AsyncConnection``'s), crossing its greenlet bridge twice per job as a queue session does
    (the claim on entry; the end on exit): what SQLAlchemy's asyncio layer alone costs, the
    floor of every library row."""
    cur = await greenlet_spawn(dbapi.cursor)

    def query(sql: str, params: Any) -> Sequence[Any]:
        cur.execute(sql, params)
        rows: Sequence[Any] = cur.fetchall()
        return rows

    claim, end = _raw_steps(native, query, dbapi.rollback, dbapi.commit)
    return await _crossing_task(greenlet_spawn, claim, end)


async def _execute(cur: Any, sql: str, params: Any) -> Sequence[Any]:
    """One statement on a driver's own cursor: its rows (none for a statement without)."""
    await cur.execute(sql, params)
    return await cur.fetchall() if cur.description else ()


async def _unadapted_task(
    conn: Any, native: bool, crossing: Callable[..., Awaitable[Any]] = greenlet_spawn
) -> int:
    """The bridge without SQLAlchemy's DBAPI adapter: two crossings per job (``crossing``:
    ``greenlet_spawn``, a new greenlet each), each statement awaited (``await_only``) on the
    driver's own connection ``conn``."""
    cur = conn.cursor()
    if asyncio.iscoroutine(cur):  # asyncmy's cursor() is a plain call, aiomysql's a coroutine
        cur = await cur

    def query(sql: str, params: Any) -> Sequence[Any]:
        result: Sequence[Any] = await_only(_execute(cur, sql, params))
        return result

    claim, end = _raw_steps(
        native, query, lambda: await_only(conn.rollback()), lambda: await_only(conn.commit())
    )
    return await _crossing_task(crossing, claim, end)


async def _reused_task(conn: Any, native: bool) -> int:
    """As :func:`_unadapted_task`, crossing with the library's
    :func:`~sqlalchemy_q4m.consumer.crossing.cross` (the greenlet kept for the next crossing,
    as the asyncio queue session crosses): what is left of the bridge is its switches."""
    return await _unadapted_task(conn, native, cross)


#: The floor sides of :class:`AsyncDrain`, from the whole bridge down to none of it: the raw
#: loop's statements through SQLAlchemy's greenlet bridge and DBAPI adapter, without the
#: adapter, in a kept greenlet (the library's cross), and awaited directly on the driver's
#: connections.
FLOORS: dict[str, Callable[[Any, bool], Awaitable[int]]] = {
    "bridge": _bridge_task,
    "unadapted": _unadapted_task,
    "reused": _reused_task,
    "driver": _raw_task,
}


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


async def _consumer_task(engine: AsyncEngine) -> int:
    done = 0
    async with queue_consumer(BenchJob, bind=engine, timeout=0) as consumer:
        while True:
            try:
                async with consumer.take() as job:
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


#: The library sides' tasks other than a queue session per job's.
LIBRARY_TASKS: dict[str, Callable[[Any], Awaitable[int]]] = {
    "consumer": _consumer_task,
    "worker": _worker_task,
}


class AsyncDrain:
    """``tasks`` consumers of one ``side`` (``raw`` or a library side) in one event loop:
    connected in ``__init__``, before the start signal, like the thread consumers.  The other
    sides (:data:`FLOORS`) are floors for ``benchmarks.cpu`` and ``benchmarks.floors``: the raw
    loop's statements through SQLAlchemy's greenlet bridge, then with each part of the bridge
    taken away, down to the raw loop on the driver connections under an ``AsyncEngine``'s
    pool (what awaiting the statements directly, without the bridge, would cost)."""

    def __init__(self, url: URL, driver: str, side: str, tasks: int, native: bool) -> None:
        self.loop = asyncio.new_event_loop()
        self.side, self.native = side, native
        self.engine: AsyncEngine | None = None
        self.binds: list[Any] = []
        #: The "bridge" side's adapted DBAPI connections, the other floors' driver ones.
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
        if self.side in FLOORS:  # the raw loop's mode, set through SQLAlchemy
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
        if self.side in ("engine", "consumer"):
            self.binds = [engine] * tasks
        elif self.side == "session":
            self.binds = [AsyncSession(engine) for _ in range(tasks)]
        else:
            self.binds = [NoOpAsyncJob(engine) for _ in range(tasks)]

    def consume(self) -> int:
        task: Callable[[Any], Awaitable[int]]
        targets = self.binds
        if self.side == "raw" or self.side in FLOORS:  # the raw loop, or one of its floors
            loop_task = FLOORS.get(self.side, _raw_task)

            def task(conn: Any) -> Awaitable[int]:
                return loop_task(conn, self.native)

            if self.side != "raw":
                targets = self.dbapis
        else:
            task = LIBRARY_TASKS.get(self.side, _library_task)

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
