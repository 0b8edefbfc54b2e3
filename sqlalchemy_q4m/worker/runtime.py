"""The worker runtime: threads x processes of consumers, status, shutdown and exit codes.

* ``concurrency`` threads per process, each a :class:`~sqlalchemy_q4m.worker.Consumer` with its
  own pinned connection (never shared); ``processes`` > 1 starts that many child processes
  (``spawn``, each its own process group) under a supervisor that forwards signals, restarts a
  child that dies, and adds up their counters for the status line.
* Shutdown: the first SIGTERM/SIGINT finishes the jobs in hand and takes no new one; a second
  one, or the end of the ``grace`` period, exits at once: the connections close, so the server
  returns the jobs in hand to the queue (on both backends), and nothing is lost.
* Exit codes: :mod:`sqlalchemy_q4m.worker.config` (``EXIT_OK``, ``EXIT_ERROR``, ``EXIT_USAGE``,
  ``EXIT_FORCED``), with the configuration, the engine and the status line.

Job classes are loaded from ``module:Class`` specs in one place, :func:`load_job_class`; the
dispatch from a claimed row to its job object is the consumer's (one place too).  AsyncJob
classes run in an event loop instead of threads (:mod:`.asyncio_runtime`).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from typing import TextIO

from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError

from ..exc import Q4MError
from ..producer.schedule import Scheduler
from ..producer.schedule import SchedulerThread
from ..producer.schedule import schedules_of
from .asyncio_runtime import preflight_async
from .asyncio_runtime import run_process
from .config import EXIT_ERROR
from .config import EXIT_FORCED
from .config import EXIT_OK
from .config import EXIT_USAGE
from .config import StatusLine
from .config import WorkerConfig
from .config import load_job_class
from .config import load_scheduled_classes
from .config import make_engine
from .config import preflight_classes
from .config import safe_url
from .config import setup_logging
from .consumer import Consumer
from .job import Job
from .loop import StopSignals
from .metrics import SupervisorMetrics
from .observe import start_observers
from .policy import OUTCOMES
from .signals import on_stop_signals
from .stats import Stats

__all__ = [
    "EXIT_ERROR",
    "EXIT_FORCED",
    "EXIT_OK",
    "EXIT_USAGE",
    "ProcessRuntime",
    "RunResult",
    "StatusLine",
    "Supervisor",
    "WorkerConfig",
    "load_job_class",
    "load_scheduled_classes",
    "make_engine",
    "preflight",
    "run_workers",
    "setup_logging",
]

logger = logging.getLogger("sqlalchemy_q4m.runtime")


def _jobs(classes: Sequence[type[Job]], engine: Engine, options: dict[str, Any]) -> list[Job]:
    return [cls(engine, **options) for cls in classes]


def preflight(config: WorkerConfig) -> list[type[Job]]:
    """Load the job classes, connect once and resolve every table: bad input fails here,
    before any worker starts, as a :class:`Q4MError` with a one-line message."""
    for path in config.sys_path:
        if path not in sys.path:
            sys.path.insert(0, path)
    classes = [load_job_class(spec) for spec in config.specs]
    schedules_of(classes)  # a bad schedule fails here (ScheduleError), not in a worker
    if any(getattr(cls, "is_async", False) for cls in classes):  # AsyncJob: an event loop
        preflight_async(config, classes)
        return classes
    engine = make_engine(config.url, 1)
    try:
        consumer = Consumer(_jobs(classes, engine, dict(config.job_options)), engine)
        try:
            consumer.connect()
        finally:
            consumer.close()
    except DBAPIError as err:
        raise Q4MError(f"cannot use the database at {safe_url(config.url)}: {err.orig}") from None
    finally:
        engine.dispose()
    return classes


class ProcessRuntime:
    """``concurrency`` consumer threads in this process, until stopped (see module docs)."""

    def __init__(
        self,
        config: WorkerConfig,
        classes: Sequence[type[Job]],
        *,
        name: str = "q4m",
        parent_pid: int | None = None,
        publish: Any = None,
        publish_index: int = 0,
    ) -> None:
        self.config = config
        self.classes = list(classes)
        self.name = name
        self.parent_pid = parent_pid
        self.publish = publish
        self.publish_index = publish_index
        self.stats = Stats()
        self.consumers: list[Consumer] = []
        self._signals = 0
        self._seen = StopSignals()  # the signals the main loop has acted on
        self._stop_at: float | None = None
        self._crashed = False
        self._wake = threading.Event()
        self.scheduler: SchedulerThread | None = None

    def _start_scheduler(self) -> SchedulerThread | None:
        """The schedules of the job classes (``schedule = ...``), in a thread of their own on
        an engine of their own; None when no class has one."""
        probe = make_engine(self.config.url, 1)
        schedules = schedules_of(self.classes, probe)
        if not schedules:
            probe.dispose()
            return None
        logger.info("%s: running %d schedule(s)", self.name, len(schedules))
        self.scheduler = SchedulerThread(Scheduler(probe, schedules)).start()
        return self.scheduler

    def _on_signal(self, signum: int) -> None:
        # Only counted: a handler runs between two bytecodes of the main thread, which may
        # hold the lock of self._wake (or logging's) at that moment; taking it here would
        # deadlock.  The main loop looks at the count at least every 0.2 s.
        self._signals += 1

    def request_stop(self, reason: str) -> None:
        """Graceful stop: every consumer finishes its job in hand and takes no new one."""
        if self._stop_at is None:
            grace = self.config.grace
            self._stop_at = time.monotonic() + grace if grace else float("inf")
            in_hand = [c.in_hand for c in self.consumers if c.in_hand]
            logger.warning(
                "%s: %s: stopping, finishing %d job(s) in hand%s",
                self.name,
                reason,
                len(in_hand),
                f" (grace {grace:g}s; signal again to return them now)" if grace else "",
            )
        for consumer in self.consumers:
            consumer.stop()
        if self.scheduler is not None:
            self.scheduler.scheduler.stop()

    def force_exit(self, reason: str) -> None:
        """Exit now: closing the connections makes the server return the jobs in hand."""
        for consumer in self.consumers:
            if consumer.in_hand:
                logger.warning(
                    "%s: %s: returning %s to the queue", self.name, reason, consumer.in_hand
                )
        logger.warning("%s: forced stop (%s), exit %d", self.name, reason, EXIT_FORCED)
        self.publish_status()
        for handler in logging.getLogger().handlers:
            handler.flush()
        sys.stderr.flush()
        os._exit(EXIT_FORCED)

    def _thread_main(self, consumer: Consumer) -> None:
        try:
            consumer.run(burst=self.config.burst)
        except Exception:
            logger.exception("%s: %s crashed", self.name, consumer.name)
            self._crashed = True
            self._wake.set()

    def publish_status(self) -> None:
        """Write this process's counters and jobs in hand where the supervisor reads them."""
        if self.publish is None:
            return
        counts = self.stats.snapshot()
        base = self.publish_index * (len(OUTCOMES) + 1)
        for i, outcome in enumerate(OUTCOMES):
            self.publish[base + i] = counts.get(outcome, 0)
        self.publish[base + len(OUTCOMES)] = sum(1 for c in self.consumers if c.in_hand)

    def run(self, status: StatusLine | None = None) -> int:
        """Start the threads (or tasks) and supervise them; returns the exit code.  The worker
        registry's heartbeat and the metrics watch them meanwhile (:mod:`.observe`), and the
        job classes' schedules run beside them."""
        observers = start_observers(self)
        scheduler = self._start_scheduler()
        try:
            return self._run(status)
        finally:
            if scheduler is not None:
                scheduler.stop()
                scheduler.scheduler.engine.dispose()
            observers.stop()

    def _run(self, status: StatusLine | None) -> int:
        if any(getattr(cls, "is_async", False) for cls in self.classes):
            return run_process(self, status)
        engine = make_engine(self.config.url, self.config.concurrency)
        options = dict(self.config.job_options)
        self.consumers = [
            Consumer(
                _jobs(self.classes, engine, options),
                engine,
                stats=self.stats,
                name=f"{self.name}-w{i + 1}",
            )
            for i in range(self.config.concurrency)
        ]
        threads = [
            threading.Thread(target=self._thread_main, args=(c,), name=c.name, daemon=True)
            for c in self.consumers
        ]
        logger.info(
            "%s: %d worker(s) on %s, tables %s",
            self.name,
            len(threads),
            safe_url(self.config.url),
            ", ".join(self.consumers[0].tables),
        )
        try:
            with on_stop_signals(self._on_signal):
                for thread in threads:
                    thread.start()
                while any(t.is_alive() for t in threads):
                    self._wake.wait(0.2)
                    self._wake.clear()
                    self._tick()
                    if status is not None:
                        in_hand = sum(1 for c in self.consumers if c.in_hand)
                        status.update(self.stats.snapshot(), in_hand)
                    self.publish_status()
        finally:
            self.publish_status()
            engine.dispose()
        return EXIT_ERROR if self._crashed else EXIT_OK

    def _tick(self) -> None:
        while self._seen.received < self._signals:
            if self._seen.signal() == "stop":
                self.request_stop("signal received")
            else:
                self.force_exit("second signal")
        if self._crashed:
            self.request_stop("a worker crashed")
        if self.parent_pid is not None and os.getppid() != self.parent_pid:
            self.request_stop("supervisor is gone")
        if self._stop_at is not None and time.monotonic() >= self._stop_at:
            self.force_exit("grace period over")


def _child_main(
    config: WorkerConfig, index: int, shared: Any, parent_pid: int
) -> None:  # pragma: no cover - runs in a child process (covered by the acceptance tests)
    os.setpgid(0, 0)  # terminal signals reach the supervisor only; it forwards them
    setup_logging(config.log_level, clear_line=config.status)
    try:
        classes = preflight_classes(config)
    except Q4MError as err:
        logger.error("%s", err)
        sys.exit(EXIT_USAGE)
    runtime = ProcessRuntime(
        config,
        classes,
        name=f"p{index + 1}",
        parent_pid=parent_pid,
        publish=shared,
        publish_index=index,
    )
    sys.exit(runtime.run())


class Supervisor:
    """``processes`` child processes of ``concurrency`` threads each (see module docs)."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self._signals = 0
        self._forwarded = 0
        self._stop_at: float | None = None
        self.children: list[Any] = []
        self.totals: dict[str, int] = {}

    def _on_signal(self, signum: int) -> None:
        self._signals += 1  # only counted: see ProcessRuntime._on_signal

    def _pause(self, seconds: float) -> None:
        """Sleep up to ``seconds``, in steps of 0.2 s, until a signal is to be forwarded."""
        deadline = time.monotonic() + seconds
        while self._forwarded == self._signals:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(0.2, left))

    def run(self, status: StatusLine | None = None) -> int:
        ctx = multiprocessing.get_context("spawn")
        width = len(OUTCOMES) + 1
        shared = ctx.Array("q", self.config.processes * width, lock=False)
        carried: dict[str, int] = dict.fromkeys(OUTCOMES, 0)
        children: list[Any] = [None] * self.config.processes
        self.children = children
        codes: list[int] = []
        restarts = 0

        def start(i: int) -> None:
            proc = ctx.Process(
                target=_child_main,
                args=(self.config, i, shared, os.getpid()),
                name=f"q4m-p{i + 1}",
                daemon=False,
            )
            proc.start()
            children[i] = proc

        with on_stop_signals(self._on_signal):
            for i in range(self.config.processes):
                start(i)
            while True:
                self._pause(0.2)
                self._forward()
                alive = 0
                for i, proc in enumerate(children):
                    if proc is None:
                        continue
                    if proc.is_alive():
                        alive += 1
                        continue
                    proc.join()
                    code = proc.exitcode if proc.exitcode is not None else EXIT_ERROR
                    children[i] = None
                    if code in (EXIT_OK, EXIT_FORCED, EXIT_USAGE) or self._stop_at is not None:
                        codes.append(code)
                        continue
                    for k, outcome in enumerate(OUTCOMES):  # its counters restart at zero
                        carried[outcome] += shared[i * width + k]
                        shared[i * width + k] = 0
                    restarts += 1
                    delay = min(30.0, 0.5 * 2 ** min(restarts, 6))
                    logger.error(
                        "worker process %d exited with %s; restarting in %.1fs",
                        i + 1,
                        code,
                        delay,
                    )
                    self._pause(delay)
                    self._forward()  # a stop signal during the pause: no restart
                    if self._stop_at is None:
                        start(i)
                        alive += 1
                if status is not None:
                    counts: dict[str, int] = {
                        o: carried[o]
                        + sum(shared[i * width + k] for i in range(self.config.processes))
                        for k, o in enumerate(OUTCOMES)
                    }
                    in_hand = sum(
                        shared[i * width + len(OUTCOMES)] for i in range(self.config.processes)
                    )
                    status.update(counts, in_hand)
                if alive == 0:
                    break
                if self._stop_at is not None and time.monotonic() > self._stop_at:
                    for proc in children:  # last resort: a child ignoring its own deadline
                        if proc is not None and proc.is_alive():
                            proc.kill()
                    codes.append(EXIT_FORCED)
        self.totals = {
            o: carried[o] + sum(shared[i * width + k] for i in range(self.config.processes))
            for k, o in enumerate(OUTCOMES)
        }
        if any(c < 0 or c == EXIT_ERROR for c in codes):
            return EXIT_ERROR
        return max(codes, default=EXIT_OK) if all(c >= 0 for c in codes) else EXIT_ERROR

    def _forward(self) -> None:
        while self._forwarded < self._signals:
            self._forwarded += 1
            if self._forwarded == 1:
                grace = self.config.grace
                self._stop_at = time.monotonic() + (grace + 10.0 if grace else float("inf"))
                logger.warning("supervisor: stopping the worker processes")
            else:
                logger.warning("supervisor: forcing the worker processes to stop")
            for proc in self._children_alive():
                os.kill(proc.pid, signal.SIGTERM)

    def _children_alive(self) -> list[Any]:
        return [p for p in multiprocessing.active_children() if p.name.startswith("q4m-p")]


@dataclass(frozen=True)
class RunResult:
    """How a run ended: the exit code, what the workers did, how long it took."""

    code: int
    totals: dict[str, int]
    elapsed: float


def run_workers(config: WorkerConfig, *, status_stream: TextIO | None = None) -> RunResult:
    """Check the input (:func:`preflight`), then run the workers until they stop."""
    classes = preflight(config)
    label = f"{config.processes}x{config.concurrency} workers"
    status = StatusLine(label, status_stream, config.progress_every)
    started = time.monotonic()
    if config.processes == 1:
        runtime = ProcessRuntime(config, classes)
        code = runtime.run(status)
        totals = runtime.stats.snapshot()
    else:
        supervisor = Supervisor(config)
        served = None
        if config.metrics_port is not None:  # the children's metrics, added up
            served = SupervisorMetrics(config.metrics_host, config.metrics_port)
        try:
            code = supervisor.run(status)
        finally:
            if served is not None:
                served.close()
        totals = supervisor.totals
    status.finish()
    elapsed = time.monotonic() - started
    logger.info(
        "stopped after %.1fs: %s; exit %d",
        elapsed,
        ", ".join(f"{k} {v}" for k, v in totals.items()),
        code,
    )
    return RunResult(code, totals, elapsed)
