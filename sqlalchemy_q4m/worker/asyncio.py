"""Async job classes and the asyncio worker runtime: N consumers as tasks in one event loop.

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
from the event loop: the same connection handling, table resolution, retry and dead-letter
steps run through SQLAlchemy's greenlet bridge, the wait is an
:class:`~sqlalchemy_q4m.asyncio.AsyncQueueSession` (``asyncio.sleep`` between portable polls),
and ``execute`` is awaited in the task itself.

Shutdown, as for threads: the first SIGINT/SIGTERM (or :meth:`AsyncWorkers.stop`) lets every
task finish the job in hand and take no new one; a second one, or the ``grace`` period running
out, cancels the tasks, and a task cancelled while it owns a job returns it to the queue
(``queue_abort()`` / ``ROLLBACK``) before it ends.

Connections: every task pins one connection for as long as it runs (a native ``queue_wait``
waits on it, a portable claim holds its transaction on it), so N tasks need N connections:
``pool_size >= N``.  :func:`worker_engine` makes an engine sized that way.

``q4m worker module:FetchJob --concurrency 50 [--processes 4]`` runs AsyncJob classes too: the
runtime (:mod:`sqlalchemy_q4m.runtime`) hands each process to :func:`run_process`, which runs
``--concurrency`` tasks in one event loop instead of threads, with the same status line,
signals and exit codes; a sync ``--url`` (``mysql+pymysql://``) gets an installed async driver
instead.  Job and AsyncJob classes cannot share one worker command.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import signal
import time
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any
from typing import ClassVar
from typing import TypeVar

from sqlalchemy import Connection
from sqlalchemy import Engine
from sqlalchemy.engine import URL
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import NoSuchModuleError
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.util import greenlet_spawn

from ..backends.loading import Unloadable
from ..consumer.asyncio import AsyncQueueSession
from ..consumer.asyncio import _GreenletQueueSession
from ..consumer.asyncio import run_to_completion
from ..exc import Q4MError
from .consumer import LOOP_ERRORS
from .consumer import Consumer
from .consumer import Job
from .consumer import Stats
from .runtime import EXIT_ERROR
from .runtime import EXIT_FORCED
from .runtime import EXIT_OK
from .runtime import ProcessRuntime
from .runtime import StatusLine
from .runtime import WorkerConfig
from .runtime import _safe_url
from .signals import on_stop_signals

__all__ = [
    "AsyncConsumer",
    "AsyncJob",
    "AsyncWorkers",
    "async_url",
    "is_async_job_class",
    "preflight_async",
    "run_async_workers",
    "run_process",
    "worker_engine",
]

logger = logging.getLogger("sqlalchemy_q4m.worker")

R = TypeVar("R")

#: Async drivers tried, in order, when ``q4m worker`` is given a sync URL for async classes.
ASYNC_DRIVERS = ("asyncmy", "aiomysql")
#: Seconds cancelled tasks get to return their jobs before the process exits anyway.
FORCE_TIMEOUT = 10.0


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


async def _to_completion(step: Callable[..., R], *args: Any) -> R:
    """Run one of the thread worker's steps through SQLAlchemy's greenlet bridge, to the end
    even when the task is cancelled meanwhile (the cancellation goes on after it)."""
    return await run_to_completion(lambda: greenlet_spawn(step, *args))


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
        if run is None or run.ended or not isinstance(run.owner, _GreenletQueueSession):
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
        conn = await greenlet_spawn(self.connect)
        self._one_at_a_time("the asyncio worker has no batch mode")
        for targets, options in self._waits(timeout):
            aqs: AsyncQueueSession[Any] = AsyncQueueSession(
                *targets, bind=self._async_connection(conn), **options
            )
            aqs._sync.accept_unloadable = True  # dead-lettered, as the thread worker does
            item = await aqs.wait()
            if item is None:
                continue
            qs = aqs._sync
            try:
                with self._holding():
                    if isinstance(item, Unloadable):
                        self._count(await _to_completion(self._bury_unloadable, qs, item))
                        return True
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

    # -- the loop: the thread worker's, awaited -------------------------------------------------

    async def run(  # type: ignore[override]
        self, *, burst: bool = False, max_jobs: int | None = None
    ) -> None:
        """Handle jobs until stopped (or cancelled: the job in hand goes back)."""
        self._failures = handled = 0
        try:
            while self._goes_on(handled, max_jobs):
                if self._recycle_due():
                    await self.recycle_async()
                try:
                    got = await self.run_once()
                except LOOP_ERRORS as err:
                    delay = self._after_error(err)
                    if delay is not None:
                        await _to_completion(self._drop_connection)
                        await self._sleep_unless_stopped(delay)
                    continue
                handled += self._after_success(got)
                if not got and burst and not await greenlet_spawn(self._has_waiting):
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


class AsyncWorkers:
    """N :class:`AsyncConsumer` tasks in this event loop, stopped as the module docstring says.

    ``await workers.run()`` returns the runtime's exit codes: ``EXIT_OK`` when every task
    ended by itself or after a graceful stop, ``EXIT_FORCED`` when tasks had to be cancelled
    (their jobs went back to the queue), ``EXIT_ERROR`` when a task crashed (it is logged
    and the other tasks are stopped gracefully).
    """

    def __init__(
        self,
        classes: Sequence[type[Job]],
        bind: AsyncEngine,
        *,
        concurrency: int = 1,
        grace: float | None = None,
        stats: Stats | None = None,
        name: str = "task",
        **options: Any,
    ) -> None:
        if not classes:
            raise Q4MError("no job class to run")
        async_classes: list[type[AsyncJob]] = []
        for cls in classes:
            if not (isinstance(cls, type) and issubclass(cls, AsyncJob)):
                raise Q4MError(f"{getattr(cls, '__name__', cls)!r} is not an AsyncJob class")
            async_classes.append(cls)
        if not isinstance(concurrency, int) or concurrency < 1:
            raise Q4MError(f"concurrency must be an integer >= 1, not {concurrency!r}")
        if grace is not None and grace < 0:
            raise Q4MError(f"grace must be >= 0 or None, not {grace!r}")
        self.classes = async_classes
        self.bind = bind
        self.grace = grace
        self.stats = stats or Stats()
        self.consumers = [
            AsyncConsumer(
                [cls(bind, **options) for cls in async_classes],
                bind,
                stats=self.stats,
                name=f"{name}-{i + 1}",
            )
            for i in range(concurrency)
        ]
        self.tasks: list[asyncio.Task[None]] = []
        self.signals = 0
        self.forced = False
        self.crashed = False
        self._grace_timer: asyncio.TimerHandle | None = None

    @property
    def in_hand(self) -> list[str]:
        """``"table id"`` of every job a task is working on."""
        return [c.in_hand for c in self.consumers if c.in_hand]

    def stop(self) -> None:
        """Graceful stop: finish the jobs in hand, take no new one; after ``grace`` seconds
        (if set) the stop is forced."""
        for consumer in self.consumers:
            consumer.stop()
        if self.grace and self._grace_timer is None and self.tasks:
            loop = asyncio.get_running_loop()
            self._grace_timer = loop.call_later(self.grace, self.force)

    def force(self) -> None:
        """Forced stop: cancel every task; each returns the job it owns to the queue."""
        for job in self.in_hand:
            logger.warning("returning %s to the queue", job)
        self.forced = True
        for consumer in self.consumers:
            consumer.stop()
        for task in self.tasks:
            task.cancel()

    def on_signal(self, signum: int) -> None:
        """First SIGINT/SIGTERM: graceful stop; second: forced."""
        self.signals += 1
        name = signal.Signals(signum).name
        if self.signals == 1:
            logger.warning(
                "%s: stopping, finishing %d job(s) in hand%s",
                name,
                len(self.in_hand),
                f" (grace {self.grace:g}s; signal again to return them now)"
                if self.grace
                else " (signal again to return them now)",
            )
            self.stop()
        else:
            logger.warning("%s again: forced stop", name)
            self.force()

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        error = task.exception()
        logger.error("%s crashed", task.get_name(), exc_info=error)
        if not self.crashed:
            self.crashed = True
            self.stop()

    async def run(
        self, *, burst: bool = False, max_jobs: int | None = None, install_signals: bool = True
    ) -> int:
        """Run the tasks until they end (``burst``/``max_jobs`` per task) or are stopped."""
        loop = asyncio.get_running_loop()
        self.tasks = [
            asyncio.create_task(c.run(burst=burst, max_jobs=max_jobs), name=c.name)
            for c in self.consumers
        ]
        for task in self.tasks:
            task.add_done_callback(self._task_done)

        def from_signal(signum: int) -> None:
            loop.call_soon_threadsafe(self.on_signal, signum)

        try:
            if install_signals:
                with on_stop_signals(from_signal):
                    await self._gather()
            else:
                await self._gather()
        finally:
            if self._grace_timer is not None:
                self._grace_timer.cancel()
        if self.crashed:
            return EXIT_ERROR
        return EXIT_FORCED if self.forced else EXIT_OK

    async def _gather(self) -> None:
        try:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        except asyncio.CancelledError:  # the runtime itself was cancelled: stop the tasks
            self.force()
            await asyncio.gather(*self.tasks, return_exceptions=True)
            raise


async def run_async_workers(
    classes: Sequence[type[Job]],
    bind: AsyncEngine,
    *,
    concurrency: int = 1,
    grace: float | None = None,
    burst: bool = False,
    max_jobs: int | None = None,
    stats: Stats | None = None,
    install_signals: bool = True,
    **options: Any,
) -> int:
    """Run ``concurrency`` tasks, each serving every class in ``classes``; the exit code."""
    workers = AsyncWorkers(
        classes, bind, concurrency=concurrency, grace=grace, stats=stats, **options
    )
    return await workers.run(burst=burst, max_jobs=max_jobs, install_signals=install_signals)


def worker_engine(url: str | URL, concurrency: int, **kw: Any) -> AsyncEngine:
    """An :class:`AsyncEngine` whose pool holds one connection per task plus two spare (for
    producers in the same process and the first backend detection)."""
    kw.setdefault("pool_size", concurrency)
    kw.setdefault("max_overflow", 2)
    kw.setdefault("pool_pre_ping", True)
    return create_async_engine(url, **kw)


def async_url(url: str | URL) -> URL:
    """``url`` if its driver is async, else the same URL with an installed async driver
    (asyncmy, then aiomysql): one ``Q4M_URL`` serves the sync commands and async workers."""
    try:
        parsed = make_url(url)
        dialect = parsed.get_dialect()
    except (ArgumentError, NoSuchModuleError, ValueError) as err:
        raise Q4MError(f"bad database URL {_safe_url(str(url))}: {err}") from None
    if dialect.is_async:
        return parsed
    if dialect.name not in ("mysql", "mariadb"):
        raise Q4MError(f"sqlalchemy-q4m needs MySQL or MariaDB, not {parsed.drivername!r}")
    for driver in ASYNC_DRIVERS:
        if importlib.util.find_spec(driver) is not None:
            return parsed.set(drivername=f"{dialect.name}+{driver}")
    raise Q4MError(
        "async job classes need an async driver: pip install 'sqlalchemy-q4m[asyncmy]' "
        "(or [aiomysql]), or give a mysql+asyncmy:// URL"
    )


# -- ``q4m worker`` with AsyncJob classes (called by sqlalchemy_q4m.runtime) --------------------


def _only_async(classes: Sequence[type[Job]]) -> list[type[AsyncJob]]:
    async_classes = [cls for cls in classes if issubclass(cls, AsyncJob)]
    if len(async_classes) != len(classes):
        names = ", ".join(cls.__name__ for cls in classes if cls not in async_classes)
        raise Q4MError(
            f"{names}: Job and AsyncJob classes cannot share a worker; run them separately"
        )
    return async_classes


def preflight_async(config: WorkerConfig, classes: Sequence[type[Job]]) -> None:
    """The runtime's preflight for async classes: connect once and resolve every table, so
    bad input fails before any task starts, as a :class:`Q4MError`."""
    async_classes = _only_async(classes)
    url = async_url(config.url)

    async def check() -> None:
        engine = worker_engine(url, 1)
        try:
            jobs = [cls(engine, **dict(config.job_options)) for cls in async_classes]
            consumer = AsyncConsumer(jobs, engine)
            try:
                await greenlet_spawn(consumer.connect)
            finally:
                await consumer.close()
        except DBAPIError as err:
            safe = url.render_as_string(hide_password=True)
            raise Q4MError(f"cannot use the database at {safe}: {err.orig}") from None
        finally:
            await engine.dispose()

    asyncio.run(check())


def run_process(runtime: ProcessRuntime, status: StatusLine | None = None) -> int:
    """The runtime's process body for async classes: ``concurrency`` tasks in one event loop
    instead of threads, with the same status line, counters, signals and exit codes."""
    _only_async(runtime.classes)
    return asyncio.run(_run_process(runtime, status))


async def _run_process(runtime: ProcessRuntime, status: StatusLine | None) -> int:
    config = runtime.config
    url = async_url(config.url)
    engine = worker_engine(url, config.concurrency, pool_recycle=3600)
    try:
        workers = AsyncWorkers(
            runtime.classes,
            engine,
            concurrency=config.concurrency,
            grace=config.grace,
            stats=runtime.stats,
            name=f"{runtime.name}-t",
            **dict(config.job_options),
        )
        runtime.consumers = list(workers.consumers)
        logger.info(
            "%s: %d task(s) on %s, tables %s",
            runtime.name,
            config.concurrency,
            url.render_as_string(hide_password=True),
            ", ".join(workers.consumers[0].tables),
        )
        run = asyncio.create_task(workers.run(burst=config.burst))
        forced_at: float | None = None
        while not run.done():
            await asyncio.wait({run}, timeout=0.2)
            if runtime.parent_pid is not None and os.getppid() != runtime.parent_pid:
                workers.stop()
            if workers.forced and forced_at is None:
                forced_at = time.monotonic()
            elif forced_at is not None and time.monotonic() - forced_at > FORCE_TIMEOUT:
                runtime.force_exit("tasks ignored their cancellation")
            if status is not None:
                status.update(runtime.stats.snapshot(), len(workers.in_hand))
            runtime._publish()
        return run.result()
    finally:
        runtime._publish()
        await engine.dispose()
