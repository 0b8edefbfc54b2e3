"""Async job classes and their consumer: the asyncio driver of the worker.

::

    class FetchJob(AsyncJob):               # consumes "fetch_jobs", as a Job class would
        async def execute(self, job):
            async with httpx.AsyncClient() as client:
                (await client.get(job.url)).raise_for_status()

    engine = create_async_engine("mysql+asyncmy://root@127.0.0.1/app", pool_size=50)
    exit_code = asyncio.run(run_async_workers([FetchJob], engine, concurrency=50))

An :class:`AsyncJob` declares tables, options, retries and dead letters exactly as a
:class:`~sqlalchemy_q4m.worker.Job` does; only ``execute`` is ``async def``.  Each task is an
:class:`AsyncConsumer`, the thread worker's :class:`~sqlalchemy_q4m.worker.Consumer` driven
from the event loop: the same connection handling, table resolution and job-life steps
(:mod:`.steps`) run through SQLAlchemy's greenlet bridge, the same sans-IO decisions
(:mod:`.policy`, :mod:`.loop`) drive it, each wait is the next take of an
:class:`~sqlalchemy_q4m.asyncio.AsyncQueueConsumer` made once per prepared connection (an
:class:`~sqlalchemy_q4m.asyncio.AsyncQueueSession` renewed per job; ``asyncio.sleep`` between
portable polls), and ``execute`` is awaited in the task itself.

N consumers as tasks in one event loop, their shutdown, the engine sized for them and the
``q4m worker`` process body for AsyncJob classes are :mod:`.asyncio_runtime`'s (all
importable from :mod:`sqlalchemy_q4m.asyncio_worker`).  A task cancelled while it owns a job
returns it to the queue (``queue_abort()`` / ``ROLLBACK``) before it ends.

Connections: every task pins one connection for as long as it runs (a native ``queue_wait``
waits on it, a portable claim holds its transaction on it), so N tasks need N connections:
``pool_size >= N``.  :func:`.asyncio_runtime.worker_engine` makes an engine sized that way.

``q4m worker module:FetchJob --concurrency 50 [--processes 4]`` runs AsyncJob classes too: the
runtime (:mod:`.runtime`) hands each process to :func:`.asyncio_runtime.run_process`, which runs
``--concurrency`` tasks in one event loop instead of threads, with the same status line,
signals and exit codes; a sync ``--url`` (``mysql+pymysql://``) gets an installed async driver
instead.  Job and AsyncJob classes cannot share one worker command.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from functools import partial
from typing import Any
from typing import ClassVar

from sqlalchemy import Connection
from sqlalchemy import Engine
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.ext.asyncio import AsyncSession

from ..backends.rows import Unloadable
from ..consumer.async_consuming import AsyncQueueConsumer
from ..consumer.asyncio import GreenletQueueSession
from ..consumer.asyncio import run_to_completion
from ..consumer.crossing import cross
from ..exc import Q4MError
from .connection import set_up_consumer
from .consumer import Consumer
from .job import Job
from .jobrun import JobRun
from .loop import LOOP_ERRORS
from .stats import Stats

__all__ = [
    "AsyncConsumer",
    "AsyncJob",
    "is_async_job_class",
]

logger = logging.getLogger("sqlalchemy_q4m.worker")


def _async_bind(bind: Any) -> AsyncEngine | AsyncConnection:
    """The async bind for ``bind``; the sync half of one is wrapped."""
    if isinstance(bind, AsyncEngine | AsyncConnection):
        return bind
    if isinstance(bind, Engine) and bind.dialect.is_async:
        return AsyncEngine(bind)
    if isinstance(bind, Connection) and bind.dialect.is_async:
        return AsyncConnection(AsyncEngine(bind.engine), bind)
    raise Q4MError(
        f"an AsyncJob needs an AsyncEngine or an AsyncConnection (an async driver such as "
        f"mysql+aiomysql or mysql+asyncmy), not {bind!r}"
    )


def _sync_half(bind: AsyncEngine | AsyncConnection) -> Engine | Connection:
    if isinstance(bind, AsyncEngine):
        return bind.sync_engine
    if bind.sync_connection is None:
        raise Q4MError("the AsyncConnection is not started: await engine.connect() first")
    return bind.sync_connection


#: Run one of the thread worker's steps through SQLAlchemy's greenlet bridge, to the end even
#: when the task is cancelled meanwhile (the cancellation goes on after it).
_to_completion = run_to_completion


def is_async_job_class(cls: Any) -> bool:
    """True for an :class:`AsyncJob` subclass (what ``q4m worker`` runs in an event loop)."""
    return isinstance(cls, type) and issubclass(cls, AsyncJob)


class AsyncJob(Job):
    """A :class:`~sqlalchemy_q4m.worker.Job` whose ``execute`` is a coroutine; bound to an
    :class:`AsyncEngine` or :class:`AsyncConnection`.  ``run_once``, ``run`` and ``close``
    are awaited; ``stop`` is not (call it from anywhere in the loop)."""

    is_async: ClassVar[bool] = True

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        execute = cls.__dict__.get("execute")
        if execute is not None and not asyncio.iscoroutinefunction(execute):
            raise Q4MError(f"{cls.__name__}.execute must be 'async def' in an AsyncJob")

    def __init__(self, bind: Any, logger: logging.Logger | None = None, **options: Any) -> None:
        self.async_bind = _async_bind(bind)
        super().__init__(_sync_half(self.async_bind), logger, **options)

    async def execute(self, job: Any) -> None:
        """Do the job.  Return normally: it is done; raise: it is retried or dead-lettered;
        call :meth:`queue_abort` (or raise ``QueueAbort``): it goes back to the queue."""
        raise NotImplementedError(f"{type(self).__name__}.execute(job) is not implemented")

    @property
    def session(self) -> AsyncSession:  # type: ignore[override]
        """The :class:`AsyncSession` the job was claimed in: on the portable backend, writes
        made through it commit atomically with the job's removal (undone on failure)."""
        run = self._run
        if run is None or run.ended or not isinstance(run.owner, GreenletQueueSession):
            raise Q4MError("no job in hand (or it was ended before execute)")
        run.session()  # made on first use, with its savepoint
        assert run.owner.async_session is not None
        return run.owner.async_session

    async def run_once(self, timeout: float | None = None) -> bool:  # type: ignore[override]
        """Wait up to ``timeout`` (default ``wait_timeout``) seconds for one job and handle
        it; True if a job was handled."""
        return await self._async_consumer().run_once(timeout)

    async def run(  # type: ignore[override]
        self, *, burst: bool = False, max_jobs: int | None = None
    ) -> None:
        """Handle jobs until :meth:`stop` (or, with ``burst``, until the queue is empty, or
        after ``max_jobs``); survives a lost database by reconnecting."""
        await self._async_consumer().run(burst=burst, max_jobs=max_jobs)

    async def close(self) -> None:  # type: ignore[override]
        """Release the connection this job object checked out."""
        if self._consumer is not None:
            await self._async_consumer().close()

    def _renewed(self) -> AsyncJob:
        """A fresh job object on the same async bind, with the same logger and options."""
        return type(self)(self.async_bind, self.logger, **self.given_options)

    def _async_consumer(self) -> AsyncConsumer:
        if self._consumer is None:
            self._consumer = AsyncConsumer([self], self.async_bind)
        assert isinstance(self._consumer, AsyncConsumer)
        return self._consumer


class AsyncConsumer(Consumer):
    """One task's pinned connection serving one or more :class:`AsyncJob` objects: the thread
    worker's :class:`~sqlalchemy_q4m.worker.Consumer`, awaited."""

    #: The asyncio queue consumer on the prepared connection (its jobs' queue sessions), made
    #: again whenever the connection or the targets are, as the thread worker's.
    _async_queue_consumer: AsyncQueueConsumer[Any] | None = None

    def __init__(
        self,
        jobs: Sequence[Job],
        bind: AsyncEngine | AsyncConnection,
        *,
        stats: Stats | None = None,
        name: str = "task",
    ) -> None:
        for job in jobs:
            if not isinstance(job, AsyncJob):
                raise Q4MError(f"{type(job).__name__} is not an AsyncJob: run it with threads")
        self.async_bind = _async_bind(bind)
        super().__init__(jobs, _sync_half(self.async_bind), stats=stats, name=name)
        self._aconn: AsyncConnection | None = None

    def _async_connection(self, conn: Connection) -> AsyncConnection:
        bind = self.async_bind
        if isinstance(bind, AsyncConnection) and bind.sync_connection is conn:
            return bind
        if self._aconn is None or self._aconn.sync_connection is not conn:
            engine = bind if isinstance(bind, AsyncEngine) else bind.engine
            self._aconn = AsyncConnection(engine, conn)
        return self._aconn

    async def close(self) -> None:  # type: ignore[override]
        """Give back the connection this consumer checked out (runs to completion)."""
        await _to_completion(Consumer.close, self)

    # -- one job: the thread worker's steps, awaited ------------------------------------------

    async def run_once(self, timeout: float | None = None) -> bool:  # type: ignore[override]
        """Wait for one job of any target and handle it; False when none came in time."""
        conn = self._conn
        if not (self._ready and conn is not None and not conn.closed and not conn.invalidated):
            conn = await cross(self.connect)  # what connect() returns at once else
        if self.batch_size > 1:
            self._one_at_a_time("the asyncio worker has no batch mode")
        consumer = self._async_queue_consumer
        if consumer is None:
            consumer = self._new_async_consumer(conn)
        for seconds, where in self._slices(timeout):
            aqs = consumer.take(timeout=seconds, where=where)
            qs = aqs.sync_session
            prepared = await aqs.wait_then(partial(self._prepare_run, qs))
            if prepared is None:
                continue
            item = qs.job
            try:
                with self._holding():
                    if isinstance(item, Unloadable):
                        self._count(await _to_completion(self._bury_unloadable, qs, item))
                        return True
                    run = prepared()
                    if run is None:  # it sends statements: run to completion
                        run = await _to_completion(self._before_execute, qs, item)
                    job = run.job
                    assert isinstance(job, AsyncJob)
                    with run.executing():
                        await job.execute(run.arg)
                    self._count(await _to_completion(self._after_execute, qs, run))
            finally:
                if qs.owning:  # failed or cancelled on the way: give the job back
                    await _to_completion(self._give_back, qs)
            return True
        return False

    def _new_async_consumer(self, conn: Connection) -> AsyncQueueConsumer[Any]:
        """The asyncio queue consumer of ``conn`` (see :func:`.connection.set_up_consumer`),
        on its ``AsyncConnection``."""
        consumer: AsyncQueueConsumer[Any] = set_up_consumer(
            self, AsyncQueueConsumer, self._async_connection(conn)
        )
        self._async_queue_consumer = consumer
        return consumer

    def _drop_consumer(self) -> None:
        super()._drop_consumer()
        self._async_queue_consumer = None

    def _prepare_run(self, qs: GreenletQueueSession, item: Any) -> JobRun | None:
        """In the claim's crossing of the greenlet bridge: the job object made ready for
        ``execute`` when that sends no statement (no ``end_before_execute``), else None."""
        if isinstance(item, Unloadable):
            return None
        sub = qs.subscription
        assert sub is not None
        if self._by_table[sub.table].job.end_before_execute:
            return None
        return self._before_execute(qs, item)

    # -- the loop: the thread worker's, awaited -------------------------------------------------

    async def run(  # type: ignore[override]
        self, *, burst: bool = False, max_jobs: int | None = None
    ) -> None:
        """Handle jobs until stopped (or cancelled: the job in hand goes back): the thread
        consumer's :class:`~.loop.RunLoop`, its I/O awaited."""
        loop = self._run_loop(burst, max_jobs)
        try:
            while loop.goes_on(self.stopping):
                if loop.recycle_due(self._since_recycle):
                    await self.recycle_async()
                try:
                    got = await self.run_once()
                except LOOP_ERRORS as err:
                    delay = self._after_error(loop, err)
                    if delay is not None:
                        await _to_completion(self._drop_connection)
                        await self._sleep_unless_stopped(delay)
                    continue
                self._after_success(loop, got)
                if loop.drained(got) and not await cross(self._has_waiting):
                    self._log_drained()
                    break
        finally:
            await self.close()

    async def recycle_async(self) -> None:
        """Drop the connection and make fresh job objects (``recycle_after``)."""
        await _to_completion(self.recycle)
        self._aconn = None

    async def _sleep_unless_stopped(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < deadline:
            await asyncio.sleep(min(0.1, deadline - time.monotonic()))
