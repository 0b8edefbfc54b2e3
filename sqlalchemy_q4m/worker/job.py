"""The job class: the Ruby ``q4m`` gem's ``Q4M::Job``, in Python (its consumer loop is
:mod:`sqlalchemy_q4m.worker.consumer`).

::

    class ShellJob(Job):                    # consumes "shell_jobs" (class name -> snake_case
        def execute(self, job):             # plural), or table_name = "...", or model = Row
            if subprocess.call(job[0], shell=True) != 0:
                self.queue_abort()          # give the job back when execute returns

    ShellJob(engine).run()                  # until stop(); run_once(timeout) handles one job

Without ``model`` the table is reflected and ``execute`` receives a tuple-like row of the
payload columns (every column but the job id), as the gem did; with ``model = SomeQueueModel``
it receives the mapped instance.  An exception in ``execute`` is logged with its traceback and
the job is retried with backoff (tables with ``attempts``/``run_at`` columns, see
:mod:`.policy`) or moved to the dead-letter table (:mod:`.deadletter`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from collections.abc import Sequence
from typing import Any
from typing import ClassVar
from typing import Literal

from sqlalchemy import Connection
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from ..consumer.batch import MAX_SIZE as MAX_BATCH_SIZE
from ..consumer.session import check_wait_options
from ..exc import JobInUse
from ..exc import Q4MError
from ..schema.checks import check_seconds
from ..schema.ddl import validate_name
from ..schema.functions import subscriptions
from .consumer import Consumer
from .deadletter import DEAD_LETTER_TABLE
from .jobrun import JobLog
from .jobrun import JobRun
from .policy import RetryPolicy
from .stats import Stats
from .targets import declared_of
from .targets import table_names_of

__all__ = ["OPTIONS", "Job", "Stats"]

#: The options a job class accepts (as class attributes or keyword arguments).
OPTIONS = (
    "max_attempts",
    "retry_base",
    "retry_cap",
    "retry_jitter",
    "wait_timeout",
    "poll_interval",
    "listen",
    "end_before_execute",
    "recycle_after",
    "dead_letter_table",
    "backend",
    "reconnect_max",
    "batch_size",
)


class Job:
    """Subclass and implement :meth:`execute`; see the module docstring.

    Class attributes (each also a keyword argument of the constructor):

    * ``table_name`` (a name or a sequence, earlier first) or ``model`` (a ``QueueMixin``
      class or queue ``Table``, or a sequence of them); neither: the class name, snake_case
      plural.  ``where``: an extra subscription condition on integer columns: an
      expression, a callable ``table -> expression`` (for reflected tables), or a mapping
      from model, Table or table name to either.
    * ``max_attempts`` (5), ``retry_base`` (2 s), ``retry_cap`` (3600 s), ``retry_jitter``
      (0.5): the :class:`~sqlalchemy_q4m.RetryPolicy`; ``dead_letter_table``.
    * ``wait_timeout`` (1 s, how often a waiting worker checks for a stop), ``poll_interval``
      (portable backend), ``listen`` (None; seconds an idle portable worker waits to be woken
      by a producer's :func:`~sqlalchemy_q4m.notify` instead of polling, on MariaDB;
      each wait still ends after ``wait_timeout``, so the worker sees a stop in time),
      ``backend``, ``reconnect_max`` (longest pause between reconnects).
    * ``end_before_execute``: remove the job before running it (at most once: a crash loses
      it, a failure is dead-lettered, never retried); ``recycle_after``: after that many jobs
      the consumer drops its connection and makes fresh job objects.
    * ``batch_size`` (1): jobs claimed per transaction on the portable backend (see the
      module docstring); one at a time on Q4M and with ``end_before_execute``.
    """

    table_name: ClassVar[str | Sequence[str] | None] = None
    model: ClassVar[Any] = None
    where: ClassVar[Any] = None
    max_attempts: ClassVar[int] = 5
    retry_base: ClassVar[float] = 2.0
    retry_cap: ClassVar[float] = 3600.0
    retry_jitter: ClassVar[float] = 0.5
    wait_timeout: ClassVar[float] = 1.0
    poll_interval: ClassVar[float] = 0.1
    listen: ClassVar[float | None] = None
    end_before_execute: ClassVar[bool] = False
    recycle_after: ClassVar[int | None] = None
    dead_letter_table: ClassVar[str] = DEAD_LETTER_TABLE
    backend: ClassVar[Literal["native", "portable", "auto"] | None] = None
    reconnect_max: ClassVar[float] = 30.0
    batch_size: ClassVar[int] = 1

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if cls.__dict__.get("model") is not None and cls.__dict__.get("table_name") is not None:
            raise Q4MError(f"{cls.__name__}: set model or table_name, not both")
        declared = declared_of(cls.model)
        if declared:
            subscriptions(declared)  # raises SubscriptionError for anything not a queue
        for name in table_names_of(cls.__name__, cls.table_name, cls.model):
            validate_name(name)

    def __init__(
        self, bind: Engine | Connection, logger: logging.Logger | None = None, **options: Any
    ) -> None:
        if not isinstance(bind, Engine | Connection):
            raise Q4MError(f"bind must be an Engine or a Connection, not {bind!r}")
        unknown = sorted(set(options) - set(OPTIONS) - {"table_name", "model", "where"})
        if unknown:
            raise Q4MError(f"unknown job option(s): {', '.join(unknown)}")
        self.bind = bind
        self.logger = logger or logging.getLogger(f"sqlalchemy_q4m.job.{type(self).__name__}")
        self.given_options = dict(options)
        for name, value in options.items():
            setattr(self, name, value)
        for name in self.table_names():
            validate_name(name)
        check_seconds("wait_timeout", self.wait_timeout, positive=True)
        check_wait_options(None, self.poll_interval, self.listen)
        check_seconds("reconnect_max", self.reconnect_max)
        if self.recycle_after is not None and self.recycle_after < 1:
            raise Q4MError(f"recycle_after must be >= 1, not {self.recycle_after!r}")
        size = self.batch_size
        if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_BATCH_SIZE:
            raise Q4MError(
                f"batch_size must be an integer from 1 to {MAX_BATCH_SIZE}, not {size!r}"
            )
        self.policy = RetryPolicy(
            max_attempts=self.max_attempts,
            base=self.retry_base,
            cap=self.retry_cap,
            jitter=self.retry_jitter,
        )
        validate_name(self.dead_letter_table)
        #: While ``execute`` runs: the job's id, its earlier failures, a logger for it.
        self.job_id: Any = None
        self.attempts = 0
        self.log: logging.LoggerAdapter = JobLog(self.logger, {})  # type: ignore[type-arg]
        self._run: JobRun | None = None  # the job in hand
        self._abort_requested = False
        self._consumer: Consumer | None = None
        #: Held while run/run_once/close use the consumer: its one pinned connection serves
        #: one thread at a time (a second wait on it would end the job in hand on Q4M).
        self._in_use = threading.Lock()
        self._user = ""  # the thread holding it, for the error message

    # -- what subclasses write ------------------------------------------------------------

    def execute(self, job: Any) -> object:
        """Do the job.  Return normally: it is done; raise: it is retried or dead-lettered;
        call :meth:`queue_abort` (or raise ``QueueAbort``): it goes back to the queue."""
        raise NotImplementedError(f"{type(self).__name__}.execute(job) is not implemented")

    def queue_abort(self) -> None:
        """Return the job to the queue (untouched, not counted as a failure) once
        :meth:`execute` returns, as the gem's ``queue_abort`` did."""
        self._abort_requested = True

    @property
    def session(self) -> Session:
        """The ORM session the job was claimed in: on the portable backend, writes made
        through it commit atomically with the job's removal (and are undone on failure)."""
        if self._run is None or self._run.ended:
            raise Q4MError("no job in hand (or it was ended before execute)")
        return self._run.session()

    # -- running ------------------------------------------------------------------------

    def run_once(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` (default ``wait_timeout``) seconds for one job (with
        ``batch_size`` > 1 on the portable backend: one batch) and handle it; True if a job
        was handled.  Database errors are raised."""
        # the body of _using, inlined: run_once runs once per job
        lock = self._in_use
        if not lock.acquire(blocking=False):
            raise self._in_use_error()
        self._user = threading.current_thread().name
        try:
            return self._get_consumer().run_once(timeout)
        finally:
            lock.release()

    def run(self, *, burst: bool = False, max_jobs: int | None = None) -> None:
        """Handle jobs until :meth:`stop` (or, with ``burst``, until the queue is empty, or
        after ``max_jobs``); survives a lost database by reconnecting."""
        with self._using():
            self._get_consumer().run(burst=burst, max_jobs=max_jobs)

    def stop(self) -> None:
        """Finish the job in hand, take no new one (thread-safe)."""
        if self._consumer is not None:
            self._consumer.stop()

    def close(self) -> None:
        """Release the connection this job object checked out."""
        if self._consumer is not None:
            with self._using():
                self._consumer.close()

    @contextlib.contextmanager
    def _using(self) -> Iterator[None]:
        """Hold the object for this thread, or raise :class:`JobInUse` if another thread
        (or this one, re-entering from ``execute``) holds it: its consumer's connection
        serves one thread at a time.  Another thread may use it once this one is done."""
        if not self._in_use.acquire(blocking=False):
            raise self._in_use_error()
        self._user = threading.current_thread().name
        try:
            yield
        finally:
            self._in_use.release()

    def _in_use_error(self) -> JobInUse:
        return JobInUse(
            f"this {type(self).__name__} object is running in thread {self._user!r}: "
            "one Job object serves one thread at a time; make one per thread"
        )

    def _renewed(self) -> Job:
        """A fresh job object with the same bind, logger and options (``recycle_after``)."""
        return type(self)(self.bind, self.logger, **self.given_options)

    def _get_consumer(self) -> Consumer:
        if self._consumer is None:
            self._consumer = Consumer([self], self.bind)
        return self._consumer

    # -- declaration ----------------------------------------------------------------------

    def declared_targets(self) -> list[Any]:
        """The models or Tables given with ``model`` (empty: tables are reflected by name)."""
        return declared_of(self.model)

    def table_names(self) -> list[str]:
        """The queue tables this job object consumes, earlier first."""
        return table_names_of(type(self).__name__, self.table_name, self.model)
