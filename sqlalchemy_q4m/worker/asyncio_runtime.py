"""The asyncio worker runtime: N :class:`~.asyncio.AsyncConsumer` tasks in one event loop
(:class:`AsyncWorkers`), the engine sized for them (:func:`worker_engine`), and the body of a
``q4m worker`` process for AsyncJob classes (:func:`preflight_async`, :func:`run_process`),
which the thread runtime (:mod:`sqlalchemy_q4m.worker.runtime`) hands them to.

Shutdown, as for threads: the first SIGINT/SIGTERM (or :meth:`AsyncWorkers.stop`) lets every
task finish the job in hand and take no new one; a second one, or the ``grace`` period running
out, cancels the tasks, and a task cancelled while it owns a job returns it to the queue
before it ends.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import signal
import time
from collections.abc import Sequence
from typing import Any
from typing import Protocol

from sqlalchemy.engine import URL
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import NoSuchModuleError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.util import greenlet_spawn

from ..exc import Q4MError
from .asyncio import AsyncConsumer
from .asyncio import AsyncJob
from .config import EXIT_ERROR
from .config import EXIT_FORCED
from .config import EXIT_OK
from .config import StatusLine
from .config import WorkerConfig
from .config import safe_url
from .job import Job
from .loop import StopSignals
from .signals import on_stop_signals
from .stats import Stats

__all__ = [
    "AsyncWorkers",
    "ProcessHost",
    "async_url",
    "preflight_async",
    "run_async_workers",
    "run_process",
    "worker_engine",
]

logger = logging.getLogger("sqlalchemy_q4m.worker")

#: Async drivers tried, in order, when ``q4m worker`` is given a sync URL for async classes.
ASYNC_DRIVERS = ("asyncmy", "aiomysql")
#: Seconds cancelled tasks get to return their jobs before the process exits anyway.
FORCE_TIMEOUT = 10.0


class ProcessHost(Protocol):
    """What :func:`run_process` uses of the runtime that hands it a process (the thread
    runtime's :class:`~sqlalchemy_q4m.worker.runtime.ProcessRuntime`)."""

    config: WorkerConfig
    classes: list[type[Job]]
    stats: Stats
    name: str
    parent_pid: int | None
    consumers: Any

    def force_exit(self, reason: str) -> None: ...

    def publish_status(self) -> None: ...


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
        self._signals = StopSignals()
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
        """First SIGINT/SIGTERM: graceful stop; second: forced (:class:`.loop.StopSignals`)."""
        name = signal.Signals(signum).name
        if self._signals.signal() == "stop":
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

    @property
    def signals(self) -> int:
        """The stop signals received."""
        return self._signals.received

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
        raise Q4MError(f"bad database URL {safe_url(str(url))}: {err}") from None
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


# -- ``q4m worker`` with AsyncJob classes (called by sqlalchemy_q4m.worker.runtime) -------------


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


def run_process(runtime: ProcessHost, status: StatusLine | None = None) -> int:
    """The runtime's process body for async classes: ``concurrency`` tasks in one event loop
    instead of threads, with the same status line, counters, signals and exit codes."""
    _only_async(runtime.classes)
    return asyncio.run(_run_process(runtime, status))


async def _run_process(runtime: ProcessHost, status: StatusLine | None) -> int:
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
            runtime.publish_status()
        return run.result()
    finally:
        runtime.publish_status()
        await engine.dispose()
