"""The job class (the Ruby ``q4m`` gem's ``Q4M::Job``, in Python) and the consumer loop under it.

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
:mod:`sqlalchemy_q4m.retry`) or moved to the dead-letter table (:mod:`sqlalchemy_q4m.deadletter`).

A :class:`Consumer` owns one pinned connection and serves one or more job classes; their tables
are waited on in the order given (earlier tables win: priority).  Connections are never shared:
each consumer checks out its own and keeps it, reconnecting with backoff when the server goes
away (the job it owned is returned by the server, not lost).

With ``batch_size = N`` (N > 1) on the portable backend a consumer claims up to N jobs in one
transaction with :func:`~sqlalchemy_q4m.batch.queue_batch` (earlier tables first, filling the
batch from later ones) and runs ``execute`` for each with the same outcomes as one at a time:
a job that returns is ended, one that aborts is returned, one that raises gets its retry copy
or dead letter written in the batch's transaction, and each job's writes through
``self.session`` sit in a savepoint of their own, so a failed or aborted job's writes are
undone while the batch keeps its row locks.  The batch commits once, after its last job; a
crash or a lost connection before that returns *every* job of the batch (the ended ones run
again: at least once, and the window is the batch).  A stop request (the first SIGTERM)
finishes the job in hand and returns the batch's unstarted jobs.  On the native backend (Q4M
owns one row per connection), with ``end_before_execute`` (at most once needs the removal
committed before the job runs) and in the asyncio worker the consumer takes one job at a time
(logged once).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import random
import re
import threading
import time
import traceback
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Iterator
from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field
from types import TracebackType
from typing import Any
from typing import ClassVar
from typing import Literal
from typing import Protocol

from sqlalchemy import Connection
from sqlalchemy import Engine
from sqlalchemy import MetaData
from sqlalchemy import Table
from sqlalchemy import and_
from sqlalchemy import func
from sqlalchemy import insert
from sqlalchemy import inspect
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import NoSuchTableError
from sqlalchemy.orm import Session
from sqlalchemy.orm import SessionTransaction
from sqlalchemy.sql.elements import ColumnElement

from ..backends import get_backend
from ..backends.base import Backend
from ..backends.loading import Unloadable
from ..backends.unique_keys import key_moved
from ..backends.unique_keys import refresh as refresh_unique_keys
from ..consumer.batch import MAX_SIZE as MAX_BATCH_SIZE
from ..consumer.batch import QueueBatch
from ..consumer.session import QueueSession
from ..consumer.session import check_wait_options
from ..exc import CompletionFailed
from ..exc import ConnectionLost
from ..exc import JobInUse
from ..exc import Q4MError
from ..exc import QueueAbort
from ..exc import QueueTableError
from ..exc import QueueWaitError
from ..schema.checks import check_seconds
from ..schema.ddl import JOB_ID
from ..schema.ddl import QUEUE_INFO_KEY
from ..schema.ddl import job_id_column
from ..schema.ddl import validate_name
from ..schema.functions import Subscription
from ..schema.functions import subscriptions
from ..schema.retry import ATTEMPTS
from ..schema.retry import PRIORITY
from ..schema.retry import PRIORITY_INFO_KEY
from ..schema.retry import RUN_AT
from ..schema.retry import Bury
from ..schema.retry import Retry
from ..schema.retry import RetryPolicy
from ..schema.retry import decide
from ..schema.retry import due_condition
from ..server import BackendName
from ..server import detect_backend
from ..types import new_job_id
from .deadletter import DEAD_LETTER_TABLE
from .deadletter import bury
from .deadletter import dead_letter_table
from .deadletter import ensure_dead_letter_table
from .deadletter import payload_of

__all__ = [
    "Consumer",
    "Job",
    "Outcome",
    "Stats",
    "reflect_queue_table",
    "table_name_for",
]

logger = logging.getLogger("sqlalchemy_q4m.worker")

Outcome = Literal["done", "retried", "dead", "aborted", "lost"]
OUTCOMES: tuple[Outcome, ...] = ("done", "retried", "dead", "aborted", "lost")

#: What the run loop survives: a lost connection or server (it reconnects with backoff; the
#: server returns the job in hand), a completion the server undid (the job runs again), or a
#: ``queue_wait`` that returned NULL (a table dropped or replaced under a Q4M worker: it backs
#: off and waits again, as the portable worker does after its claim's error).
LOOP_ERRORS = (ConnectionLost, DBAPIError, CompletionFailed, QueueWaitError)

#: Longest single wait while a subscription tests ``run_at <= now`` (rebuilt at each wait).
DUE_SLICE = 1.0

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


def table_name_for(class_name: str) -> str:
    """``ShellJob`` -> ``shell_jobs``, ``HTTPFetch`` -> ``http_fetches``, ``Entry`` ->
    ``entries``: the gem's class name to table name rule."""
    snake = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", class_name)
    snake = re.sub(r"([a-z\d])([A-Z])", r"\1_\2", snake).lower()
    if re.search(r"[^aeiou]y$", snake):
        return snake[:-1] + "ies"
    if re.search(r"(s|x|z|ch|sh)$", snake):
        return snake + "es"
    return snake + "s"


def reflect_queue_table(conn: Connection, name: str, metadata: MetaData | None = None) -> Table:
    """Load a queue table's definition from the server, its ``id`` typed as a job id.

    Raises :class:`QueueTableError` when the table does not exist or has no ``id`` column.
    """
    validate_name(name)
    began = not conn.in_transaction()
    try:
        if not inspect(conn).has_table(name):
            raise QueueTableError(f"queue table {name!r} does not exist")
        names = {c["name"] for c in inspect(conn).get_columns(name)}
        if JOB_ID not in names:
            raise QueueTableError(
                f"table {name!r} has no {JOB_ID!r} job id column: it is not a queue table"
            )
        table = Table(name, metadata or MetaData(), job_id_column(), autoload_with=conn)
    except NoSuchTableError:
        raise QueueTableError(f"queue table {name!r} does not exist") from None
    finally:
        if began and conn.in_transaction():
            conn.rollback()
    table.info[QUEUE_INFO_KEY] = True
    priority = table.columns.get(PRIORITY)
    if priority is not None:
        priority.info[PRIORITY_INFO_KEY] = True
    return table


@dataclass
class Stats:
    """What consumers did, by outcome (thread-safe counters)."""

    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    #: Called after each job with (outcome, table, seconds in hand): the worker registry's
    #: and the metrics' hook (see :mod:`sqlalchemy_q4m.observe`).
    hooks: list[Callable[[str, str | None, float | None], None]] = field(
        default_factory=list, repr=False
    )

    def add(self, outcome: Outcome, table: str | None = None, seconds: float | None = None) -> None:
        with self._lock:
            self.counts[outcome] = self.counts.get(outcome, 0) + 1
        for hook in self.hooks:
            try:
                hook(outcome, table, seconds)
            except Exception:  # an observer never stops a worker
                logger.debug("a stats hook failed", exc_info=True)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counts)


class _JobLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """Prefixes every line with the job's table and id: ``shell_jobs 0193...: done``."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        extra = self.extra or {}
        return f"{extra.get('q4m_table')} {extra.get('q4m_job_id')}: {msg}", kwargs


class Job:
    """Subclass and implement :meth:`execute`; see the module docstring.

    Class attributes (each also a keyword argument of the constructor):

    * ``table_name`` (a name or a sequence, earlier first) or ``model`` (a ``QueueMixin``
      class or queue ``Table``, or a sequence of them); neither: the class name, snake_case
      plural.  ``where``: an extra subscription condition on integer columns: an
      expression, a callable ``table -> expression`` (for reflected tables), or a mapping
      from model, Table or table name to either.
    * ``max_attempts`` (5), ``retry_base`` (2 s), ``retry_cap`` (3600 s), ``retry_jitter``
      (0.5): the :class:`~sqlalchemy_q4m.retry.RetryPolicy`; ``dead_letter_table``.
    * ``wait_timeout`` (1 s, how often a waiting worker checks for a stop), ``poll_interval``
      (portable backend), ``listen`` (None; seconds an idle portable worker waits to be woken
      by a producer's :func:`~sqlalchemy_q4m.notify.notify` instead of polling, on MariaDB;
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
        declared = _declared(cls.model)
        if declared:
            subscriptions(declared)  # raises SubscriptionError for anything not a queue
        for name in _names(cls.__name__, cls.table_name, cls.model):
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
        self.log: logging.LoggerAdapter = _JobLog(self.logger, {})  # type: ignore[type-arg]
        self._run: _Run | None = None  # the job in hand
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
        with self._using():
            return self._get_consumer().run_once(timeout)

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
            raise JobInUse(
                f"this {type(self).__name__} object is running in thread {self._user!r}: "
                "one Job object serves one thread at a time; make one per thread"
            )
        self._user = threading.current_thread().name
        try:
            yield
        finally:
            self._in_use.release()

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
        return _declared(self.model)

    def table_names(self) -> list[str]:
        """The queue tables this job object consumes, earlier first."""
        return _names(type(self).__name__, self.table_name, self.model)


def _declared(model: Any) -> list[Any]:
    if model is None:
        return []
    if isinstance(model, list | tuple):
        return list(model)
    return [model]


def _names(class_name: str, table_name: str | Sequence[str] | None, model: Any) -> list[str]:
    declared = _declared(model)
    if declared:
        return [t.name if isinstance(t, Table) else t.__table__.name for t in declared]
    if table_name is None:
        return [table_name_for(class_name)]
    if isinstance(table_name, str):
        return [table_name]
    return list(table_name)


@dataclass
class _Target:
    job: Job
    target: Any
    table: Table
    row_type: Callable[..., Any] | None
    payload_names: list[str]

    @property
    def orm(self) -> bool:
        return not isinstance(self.target, Table)

    @property
    def can_retry(self) -> bool:
        return ATTEMPTS in self.table.columns and RUN_AT in self.table.columns

    @functools.cached_property
    def _identity_keys(self) -> tuple[str | None, str | None]:
        """The attribute names of the job id and ``attempts`` on mapped instances."""
        mapper = inspect(self.target)
        names: list[str | None] = []
        for name in (JOB_ID, ATTEMPTS):
            column = self.table.columns.get(name)
            names.append(None if column is None else mapper.get_property_by_column(column).key)
        return names[0], names[1]

    def identify(self, item: Any) -> tuple[Any, int]:
        """A claimed job's id and earlier attempts, read without copying all its values."""
        if self.orm:
            id_key, attempts_key = self._identity_keys
            job_id = None if id_key is None else getattr(item, id_key)
            attempts = None if attempts_key is None else getattr(item, attempts_key)
        else:
            values = payload_of(item, self.table)
            job_id, attempts = values.get(JOB_ID), values.get(ATTEMPTS)
        return job_id, int(attempts or 0)


#: ``(job class, table name)`` already warned about missing retry columns in this process.
_NO_RETRY_WARNED: set[tuple[type[Job], str]] = set()


def _check_retry_columns(t: _Target) -> None:
    """At start-up: ``max_attempts`` > 1 on a table without ``attempts``/``run_at`` cannot
    be honoured (the first failure is dead-lettered): a warning, once per process and table,
    naming what to add.  Not refused: one job class may serve tables with and without them."""
    job = t.job
    if t.can_retry or job.end_before_execute or job.policy.max_attempts <= 1:
        return
    key = (type(job), t.table.name)
    if key in _NO_RETRY_WARNED:
        return
    _NO_RETRY_WARNED.add(key)
    logger.warning(
        "%s: queue table %r has no %r and %r columns: max_attempts=%d is not used, a failed "
        "job goes to the dead letters at once; add %s to retry it (or set max_attempts = 1)",
        type(job).__name__,
        t.table.name,
        ATTEMPTS,
        RUN_AT,
        job.policy.max_attempts,
        "RetryMixin to the model"
        if t.orm
        else "retry_columns() to the table (or RetryMixin to its model)",
    )


def _row_type(table: Table) -> tuple[Callable[..., Any], list[str]]:
    names = [c.name for c in table.columns if c.name != JOB_ID]
    return collections.namedtuple("JobRow", names, rename=True), names


@dataclass
class _Run:
    """One job in hand from its claim to its outcome: what ``execute`` gets, and how it ended
    (recorded by ``with run.executing(): ...``, which swallows the job's own exception)."""

    target: _Target
    owner: _Owner
    item: Any
    arg: Any
    attempts: int
    log: logging.LoggerAdapter  # type: ignore[type-arg]
    ended: bool  # end_before_execute: the job is gone already
    nested: SessionTransaction | None = None  # the savepoint of the job's writes (InnoDB)
    used_session: bool = False  # execute asked for self.session
    aborted: bool = False
    error: BaseException | None = None
    details: str = ""  # the error's traceback
    started: float = 0.0
    elapsed: float = 0.0

    @property
    def job(self) -> Job:
        return self.target.job

    @functools.cached_property
    def values(self) -> dict[str, Any]:
        """The job's column values by name (for a retry copy or a dead letter)."""
        return payload_of(self.item, self.target.table)

    def session(self) -> Session:
        """The ORM session ``execute`` writes through, made on first use.  Its writes are
        undone on failure or abort: on InnoDB by a savepoint begun here (the claim's row lock
        must outlive it); on Q4M, where owning is not transactional, by rolling back the
        session's transaction."""
        if not self.used_session:
            self.values  # noqa: B018 - read now: a rollback of the session expires the job
        session = self.owner.session
        if not self.used_session:
            self.used_session = True
            backend = self.owner.backend
            if backend is not None and backend.name == "portable":
                self.nested = session.begin_nested()
        return session

    def executing(self) -> _Run:
        """Start the clock; the ``with`` block around ``execute`` records how it ends."""
        self.log.debug("started (attempt %d)", self.attempts + 1)
        self.started = time.monotonic()
        return self

    def __enter__(self) -> _Run:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        job = self.job
        if exc is None:
            self.aborted = job._abort_requested
        elif isinstance(exc, QueueAbort):
            self.aborted = True
        elif isinstance(exc, Exception):
            self.error, self.details = exc, "".join(traceback.format_exception(exc))
        job._run = None
        job._abort_requested = False
        self.elapsed = time.monotonic() - self.started
        return isinstance(exc, Exception) or exc is None  # a cancellation goes on


class _Owner(Protocol):
    """What the job steps use of the thing owning the job: a :class:`QueueSession`, or a
    :class:`_BatchSlot` (one job of a claimed batch)."""

    backend: Backend | None

    @property
    def subscription(self) -> Subscription | None: ...

    @property
    def session(self) -> Session: ...

    @property
    def owning(self) -> bool: ...

    @property
    def connection(self) -> Connection: ...

    def end(self) -> None: ...

    def abort(self) -> None: ...

    def close(self) -> None: ...


class _BatchSlot:
    """One job of a :class:`QueueBatch`, seen as the job steps see a queue session: ``end``
    marks it done (removed when the batch commits), ``abort`` returns it with the batch."""

    __slots__ = ("backend", "batch", "item", "subscription")

    def __init__(self, batch: QueueBatch[Any], item: Any) -> None:
        self.batch, self.item = batch, item
        self.subscription: Subscription | None = batch.subscription_of(item)
        self.backend: Backend | None = get_backend("portable")

    @property
    def session(self) -> Session:
        return self.batch.session

    @property
    def owning(self) -> bool:
        return self.batch.holds(self.item)

    @property
    def connection(self) -> Connection:
        return self.batch.session.connection()

    def end(self) -> None:
        self.batch.end(self.item)

    def abort(self) -> None:
        self.batch.abort(self.item)

    def close(self) -> None:
        if self.owning:
            self.abort()


class _Holding:
    """What :meth:`Consumer._holding` returns (a class, not a generator: it runs per job)."""

    __slots__ = ("consumer",)

    def __init__(self, consumer: Consumer) -> None:
        self.consumer = consumer

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        consumer = self.consumer
        if isinstance(exc, LOOP_ERRORS):
            consumer.stats.add("lost", *consumer._held_for())
            consumer.lost_job = consumer.in_hand
        consumer._in_hand = None


class Consumer:
    """One pinned connection serving one or more job objects; see the module docstring.

    ``jobs`` are served in order (their tables too): earlier tables win.  The first job's
    ``wait_timeout``, ``poll_interval``, ``listen``, ``backend``, ``recycle_after``,
    ``reconnect_max`` and ``batch_size`` apply to the consumer.
    """

    def __init__(
        self,
        jobs: Sequence[Job],
        bind: Engine | Connection,
        *,
        stats: Stats | None = None,
        name: str = "worker",
    ) -> None:
        if not jobs:
            raise Q4MError("a consumer needs at least one job object")
        self.jobs = list(jobs)
        self.name = name
        self.stats = stats or Stats()
        self._engine = bind if isinstance(bind, Engine) else None
        self._conn: Connection | None = None if isinstance(bind, Engine) else bind
        self._targets: list[_Target] | None = None
        #: Worked out with the targets, not per job: their models, each table's target,
        #: whether a table has ``run_at`` and whether any wait has a condition.
        self._models: list[Any] = []
        self._by_table: dict[Table, _Target] = {}
        self._timed = self._conditional = False
        self._backend: BackendName | None = None
        self._ready = False  # the pinned connection is prepared (backend, tables)
        self._stop = threading.Event()
        self._since_recycle = 0
        self._failures = 0  # database errors in a row (the reconnect backoff)
        #: ``"table id"`` of the job in hand, for the runtime's shutdown report.
        self._in_hand: tuple[str, Any] | None = None
        self._in_hand_since = 0.0  # time.time() when the job in hand was claimed
        #: ``"table id"`` of the job in hand when the database was lost (for the log line).
        self.lost_job: str | None = None
        first = self.jobs[0]
        self.wait_timeout = float(first.wait_timeout)
        self.poll_interval = float(first.poll_interval)
        self.listen = None if first.listen is None else float(first.listen)
        self.recycle_after = first.recycle_after
        self.reconnect_max = float(first.reconnect_max)
        self.backend_option = first.backend
        self.batch_size = int(first.batch_size)
        self._batch_noted = False  # "one job at a time" logged once

    @property
    def in_hand(self) -> str | None:
        """``"table id"`` of the job in hand, for the runtime's shutdown report."""
        held = self._in_hand
        return None if held is None else f"{held[0]} {held[1]}"

    @property
    def holding(self) -> tuple[str, str, float] | None:
        """(table, job id, since: Unix time) of the job in hand, for the worker registry."""
        held, since = self._in_hand, self._in_hand_since
        return None if held is None else (held[0], str(held[1]), since)

    def _held_for(self) -> tuple[str | None, float | None]:
        """The table of the job in hand and the seconds it has been held (for the hooks)."""
        held = self._in_hand
        if held is None:
            return None, None
        return held[0], time.time() - self._in_hand_since

    @property
    def tables(self) -> list[str]:
        return [name for job in self.jobs for name in job.table_names()]

    def stop(self) -> None:
        """Take no new job; the one in hand is finished (thread-safe)."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def close(self) -> None:
        """Give back the connection this consumer checked out."""
        conn, self._conn = self._conn, None
        if conn is not None and self._engine is not None:
            conn.close()
        elif conn is not None:
            self._conn = conn  # the caller's: keep it

    # -- connection and targets -----------------------------------------------------------

    def connect(self) -> Connection:
        """The pinned connection (checked out and prepared on first use or after a loss)."""
        conn = self._conn
        if self._ready and conn is not None and not conn.closed and not conn.invalidated:
            return conn
        self._ready = False
        if self._engine is None:
            if conn is None or conn.closed:
                raise Q4MError("the consumer's connection was closed by its owner")
            if conn.in_transaction():
                conn.rollback()
        else:
            if conn is not None:
                conn.close()
                self._conn = None
            conn = self._engine.connect()
        try:
            backend = self._resolve_backend(conn)
            if backend == "portable" and self._engine is not None:
                conn.execution_options(isolation_level="READ COMMITTED")
            self._prepare(conn)
        except BaseException:
            if self._engine is not None:
                conn.close()
            raise
        self._conn, self._ready = conn, True
        return conn

    def _resolve_backend(self, conn: Connection) -> BackendName:
        option = self.backend_option
        if option in (None, "auto"):
            self._backend = detect_backend(conn)
        else:
            self._backend = "native" if option == "native" else "portable"
        return self._backend

    def _prepare(self, conn: Connection) -> None:
        """Resolve the tables (reflecting named ones) and create missing dead-letter tables;
        done before any claim because DDL commits implicitly."""
        if self._targets is None:
            targets: list[_Target] = []
            for job in self.jobs:
                declared = job.declared_targets()
                if declared:
                    for model in declared:
                        table = model if isinstance(model, Table) else model.__table__
                        targets.append(_Target(job, model, table, None, []))
                else:
                    for name in job.table_names():
                        table = reflect_queue_table(conn, name)
                        row_type, names = _row_type(table)
                        targets.append(_Target(job, table, table, row_type, names))
            subscriptions([t.target for t in targets])  # validates: no table twice, queues
            for t in targets:
                _check_retry_columns(t)
            self._targets = targets
            self._models = [t.target for t in targets]
            self._by_table = {t.table: t for t in targets}
            self._timed = any(RUN_AT in t.table.columns for t in targets)
            self._conditional = self._timed or any(
                vars(t.job).get("where", type(t.job).where) is not None for t in targets
            )
        for dead_name in {job.dead_letter_table for job in self.jobs}:
            if not inspect(conn).has_table(dead_name):
                ensure_dead_letter_table(conn, dead_letter_table(dead_name))
        refresh_unique_keys(conn)  # the unique keys' hooks need no look-up during a job
        if conn.in_transaction():
            conn.rollback()

    def _where(self, targets: Sequence[_Target]) -> dict[Any, ColumnElement[bool]] | None:
        """Each target's condition (the job's ``where`` and ``run_at <= now``); None when
        there is none, so the subscriptions are the memoized unconditional ones."""
        now = time.time()
        where: dict[Any, ColumnElement[bool]] = {}
        for t in targets:
            parts: list[ColumnElement[bool]] = []
            # From the instance (an option) or the class (not bound: a plain function).
            user = vars(t.job).get("where", type(t.job).where)
            mapped = isinstance(user, Mapping)
            if mapped:  # keyed by model, Table or table name
                user = user.get(t.target, user.get(t.table.name))
            if callable(user):  # where = lambda table: table.c.priority >= 5 (reflected)
                user = user(t.table)
            elif user is not None and not mapped and len(t.job.table_names()) > 1:
                raise Q4MError(
                    f"{type(t.job).__name__}: with several tables, where must be a mapping "
                    "{model_or_table: condition}"
                )
            if user is not None:
                parts.append(user)
            due = due_condition(t.table, now)
            if due is not None:
                parts.append(due)
            if parts:
                where[t.target] = parts[0] if len(parts) == 1 else and_(*parts)
        return where or None

    # -- one job ----------------------------------------------------------------------------
    # The async consumer shares every step here and only awaits them: the wait options
    # (_waits), the steps before and after execute, and the bookkeeping around a job in hand.

    def run_once(self, timeout: float | None = None) -> bool:
        """Wait for one job of any target and handle it (with ``batch_size`` > 1 on the
        portable backend: one batch); False when none came in time."""
        return self._handle(timeout) > 0

    def _handle(self, timeout: float | None = None, limit: int | None = None) -> int:
        """Wait for one job, or one batch of at most ``limit`` jobs; the number handled."""
        conn = self.connect()
        size = self._batch_size()
        if limit is not None:
            size = min(size, limit)
        if size > 1:
            return self._handle_batch(conn, size, timeout)
        for targets, options in self._waits(timeout):
            qs: QueueSession[Any] = QueueSession(*targets, bind=conn, **options)
            qs.accept_unloadable = True
            item = qs.wait()
            if item is None:
                continue
            try:
                with self._holding():
                    if isinstance(item, Unloadable):
                        self._count(self._bury_unloadable(qs, item))
                        return 1
                    run = self._before_execute(qs, item)
                    with run.executing():
                        run.job.execute(run.arg)
                    self._count(self._after_execute(qs, run))
            finally:
                self._give_back(qs)
            return 1
        return 0

    def _batch_size(self) -> int:
        """The jobs to claim at once: ``batch_size`` on the portable backend, else 1 (the
        native backend and ``end_before_execute`` run one job at a time; logged once)."""
        if self.batch_size <= 1:
            return 1
        reason = None
        if self._backend != "portable":
            reason = "the native backend owns one job per connection"
        elif any(job.end_before_execute for job in self.jobs):
            reason = "end_before_execute removes each job before it runs"
        if reason is None:
            return self.batch_size
        self._one_at_a_time(reason)
        return 1

    def _one_at_a_time(self, reason: str) -> None:
        """Log once that ``batch_size`` is not used, and why."""
        if self.batch_size > 1 and not self._batch_noted:
            self._batch_noted = True
            logger.info(
                "[%s] %s: batch_size %d ignored, one job at a time: %s",
                self.name,
                self._label(),
                self.batch_size,
                reason,
            )

    def _handle_batch(self, conn: Connection, size: int, timeout: float | None) -> int:
        """Claim up to ``size`` jobs in one transaction and run each as :meth:`_handle` runs
        one; the batch commits after its last job.  A stop request leaves the unstarted jobs
        to the batch, which returns them; an error returns the whole batch."""
        for targets, options in self._waits(timeout):
            batch: QueueBatch[Any] = QueueBatch(*targets, bind=conn, size=size, **options)
            batch.accept_unloadable = True
            items = batch.wait()
            if not items:
                continue
            logger.debug(
                "[%s] %s: claimed a batch of %d job(s)", self.name, self._label(), len(items)
            )
            handled = 0
            outcomes: list[Outcome] = []  # counted once the batch commits
            try:
                for item in items:
                    if self.stopping:
                        logger.info(
                            "[%s] %s: stopping: %d unstarted job(s) of the batch returned",
                            self.name,
                            self._label(),
                            len(items) - handled,
                        )
                        break
                    slot = _BatchSlot(batch, item)
                    with self._holding():
                        if isinstance(item, Unloadable):
                            outcomes.append(self._bury_unloadable(slot, item))
                        else:
                            run = self._before_execute(slot, item)
                            with run.executing():
                                run.job.execute(run.arg)
                            outcomes.append(self._after_execute(slot, run))
                    handled += 1
                batch.close()  # removes the ended jobs, returns the others: one COMMIT
            except BaseException:
                # rolled back: what the batch's handled jobs did is undone and they run again
                # (a deadlocked completion, CompletionFailed, included): counted as lost
                for _ in outcomes:
                    self.stats.add("lost")
                self.lost_job = f"a batch of {len(items)} job(s)"
                try:
                    batch.give_back()
                except Exception:  # the connection is gone: the server returns the batch
                    logger.debug("returning a batch failed", exc_info=True)
                raise
            for outcome in outcomes:
                self._count(outcome)
            return handled
        return 0

    def _waits(self, timeout: float | None) -> Iterator[tuple[list[Any], dict[str, Any]]]:
        """The targets and options of each wait until ``timeout`` (default ``wait_timeout``)
        passes.  ``run_at <= now`` is fixed in each wait, so with ``run_at`` columns waits
        are cut into slices of at most DUE_SLICE seconds and the condition is rebuilt."""
        targets = self._targets
        assert targets is not None
        models, timed, conditional = self._models, self._timed, self._conditional
        deadline = time.monotonic() + (self.wait_timeout if timeout is None else timeout)
        while True:
            remaining = max(0.0, deadline - time.monotonic())
            yield (
                models,
                {
                    "where": self._where(targets) if conditional else None,
                    "timeout": min(remaining, DUE_SLICE) if timed else remaining,
                    "backend": self._backend,
                    "poll_interval": self.poll_interval,
                    "listen": self.listen,
                },
            )
            if time.monotonic() >= deadline:
                return

    def _holding(self) -> _Holding:
        """Around a job in hand: a database error on the way counts it as lost (the server
        returns it, or undid its completion) and goes on to the loop, which reconnects."""
        return _Holding(self)

    def _count(self, outcome: Outcome) -> None:
        self.stats.add(outcome, *self._held_for())
        self._since_recycle += 1

    @staticmethod
    def _give_back(qs: _Owner) -> None:
        """Return a job still owned after a failure (or a cancellation) on the way."""
        if qs.owning:
            try:
                qs.close()
            except Exception:  # the connection is gone: the server returns the job
                logger.debug("returning a job failed", exc_info=True)

    def _before_execute(self, qs: _Owner, item: Any) -> _Run:
        """Get the job object ready for ``execute``: its id, attempts and logger, the job
        ended first (``end_before_execute``), a savepoint for its writes on InnoDB."""
        sub = qs.subscription
        assert sub is not None
        t = self._by_table[sub.table]
        job_id, attempts = t.identify(item)
        job = t.job
        log = _JobLog(job.logger, {"q4m_table": t.table.name, "q4m_job_id": job_id})
        self._in_hand, self._in_hand_since = (t.table.name, job_id), time.time()
        ended = bool(job.end_before_execute)
        run = _Run(t, qs, item, item, attempts, log, ended)
        if t.row_type is not None:
            values = run.values
            run.arg = t.row_type(*(values[n] for n in t.payload_names))
        if ended:
            qs.end()
        job.job_id, job.attempts, job.log = job_id, attempts, log
        job._run = run
        job._abort_requested = False
        return run

    def _after_execute(self, qs: _Owner, run: _Run) -> Outcome:
        """End, return, retry or bury the job as ``execute`` ended."""
        log, nested, ended = run.log, run.nested, run.ended
        if not ended and self._connection_lost():
            # execute (or the server) lost the pinned connection: the server has returned the
            # job and the transaction is gone, so there is nothing to end, retry or bury here
            error = run.error
            cause = f": {_describe(error)}" if error is not None else ""
            raise ConnectionLost(f"connection lost while running the job{cause}") from error
        if run.error is None and not run.aborted and run.used_session and not ended:
            self._keep_writes(qs, run)  # a failure here is the job's own
        error = run.error
        if error is None:
            if nested is not None:
                if run.aborted:
                    nested.rollback()
            elif run.aborted and not ended and run.used_session:
                qs.session.rollback()  # Q4M: the job's writes
            if run.aborted:
                if ended:
                    log.warning("queue_abort() after end_before_execute: the job is gone")
                else:
                    qs.abort()
                    log.info("aborted after %.3fs: returned to the queue", run.elapsed)
                return "aborted"
            if not ended:
                qs.end()
            log.info("done in %.3fs", run.elapsed)
            return "done"
        if nested is not None:
            if qs.session.get_nested_transaction() is nested:  # also after a failed flush
                nested.rollback()
        elif not ended and run.used_session:
            qs.session.rollback()  # Q4M: the job's writes
        policy = run.job.policy
        log.error(
            "failed on attempt %d/%d after %.3fs: %s\n%s",
            run.attempts + 1,
            policy.max_attempts if run.target.can_retry and not ended else 1,
            run.elapsed,
            _describe(error),
            run.details.rstrip(),
        )
        decision = decide(policy, run.attempts, can_retry=run.target.can_retry and not ended)
        return self._after_failure(qs, run, decision, error)

    def _bury_unloadable(self, qs: _Owner, row: Unloadable) -> Outcome:
        """A claimed row that cannot be loaded as a job (a malformed id, a value its column
        type cannot read) can never run: it goes to the dead letters with its values as the
        driver returned them and is removed, instead of failing every claim of the queue's
        head.  As for any burial, on Q4M the dead letter is committed before the end."""
        sub = qs.subscription
        assert sub is not None
        t = self._by_table[sub.table]
        job_id = row.values.get(JOB_ID)
        log = _JobLog(t.job.logger, {"q4m_table": t.table.name, "q4m_job_id": job_id})
        try:
            attempts = int(row.values.get(ATTEMPTS) or 0) + 1
        except (TypeError, ValueError):
            attempts = 1
        dead = dead_letter_table(t.job.dead_letter_table)
        conn = qs.connection
        bury(
            conn,
            dead,
            queue=t.table.name,
            values=row.values,
            error=f"cannot be loaded: {_describe(row.error)}",
            traceback=row.details,
            attempts=attempts,
        )
        backend = qs.backend
        if backend is not None and backend.name == "native":
            conn.commit()
        qs.end()
        log.error(
            "cannot be loaded (%s): moved to %s with its values as read: %r",
            _describe(row.error),
            dead.name,
            row.values,
        )
        return "dead"

    def _keep_writes(self, qs: _Owner, run: _Run) -> None:
        """Flush what ``execute`` wrote through ``self.session`` (on InnoDB: release its
        savepoint) before the job is ended.  An error there is the job's own failure (a
        constraint it broke, an UPDATE Q4M refuses, a session its own error handling left
        unusable): recorded as its error, so it is retried and dead-lettered by the policy
        instead of being taken for a lost connection and run again forever.  A lost
        connection is raised."""
        try:
            if run.nested is not None:
                run.nested.commit()
            else:
                session = qs.session
                if session.new or session.dirty or session.deleted:
                    session.flush()
        except Exception as err:
            if self._connection_lost() or (
                isinstance(err, DBAPIError) and err.connection_invalidated
            ):
                raise
            run.error, run.details = err, "".join(traceback.format_exception(err))

    def _after_failure(
        self, qs: _Owner, run: _Run, decision: Retry | Bury, error: BaseException
    ) -> Outcome:
        t, log = run.target, run.log
        if isinstance(decision, Retry):
            copy = dict(run.values)
            copy[JOB_ID] = new_job_id()
            copy[ATTEMPTS] = decision.attempts
            copy[RUN_AT] = decision.run_at
            qs.session.execute(insert(t.table).values(copy))
            key_moved(qs.session.connection(), t.table, run.values.get(JOB_ID), copy[JOB_ID])
            self._end_after_write(qs)
            log.warning(
                "retry %d/%d in %ds as %s",
                decision.attempts + 1,
                t.job.policy.max_attempts,
                decision.delay,
                copy[JOB_ID],
            )
            return "retried"
        dead = dead_letter_table(t.job.dead_letter_table)
        record: dict[str, Any] = {
            "queue": t.table.name,
            "values": run.values,
            "error": _describe(error),
            "traceback": run.details,
            "attempts": decision.attempts,
        }
        if run.ended:
            conn = self.connect()
            bury(conn, dead, **record)
            conn.commit()
        else:
            bury(qs.session.connection(), dead, **record)
            self._end_after_write(qs)
        log.error("dead after %d attempt(s): moved to %s", decision.attempts, dead.name)
        return "dead"

    def _connection_lost(self) -> bool:
        """True when the pinned connection was invalidated (a disconnect was seen on it)."""
        conn = self._conn
        return conn is not None and conn.invalidated

    @staticmethod
    def _end_after_write(qs: _Owner) -> None:
        """End the job after writes made in its session: on InnoDB in the same transaction;
        on Q4M (no transactions) the writes are committed first, so a crash in between
        runs the job again rather than losing the writes (at least once)."""
        backend = qs.backend
        if backend is not None and backend.name == "native":
            qs.session.commit()
        qs.end()

    # -- the loop ---------------------------------------------------------------------------
    # The async consumer's run is this loop with the calls awaited; what it decides (when to
    # stop or recycle, how long to back off, what it logs) is in the helpers below it.

    def run(self, *, burst: bool = False, max_jobs: int | None = None) -> None:
        """Handle jobs until stopped; see :meth:`Job.run`."""
        self._failures = handled = 0
        while self._goes_on(handled, max_jobs):
            if self._recycle_due():
                self.recycle()
            try:
                got = self._handle(limit=None if max_jobs is None else max_jobs - handled)
            except LOOP_ERRORS as err:
                delay = self._after_error(err)
                if delay is not None:
                    self._drop_connection()
                    self._stop.wait(delay)
                continue
            handled += self._after_success(got)
            if not got and burst and not self._has_waiting():
                self._log_drained()
                break
        self.close()

    def _goes_on(self, handled: int, max_jobs: int | None) -> bool:
        return not self.stopping and (max_jobs is None or handled < max_jobs)

    def _recycle_due(self) -> bool:
        return self.recycle_after is not None and self._since_recycle >= self.recycle_after

    def _after_success(self, got: int) -> int:
        """Note that the database answered again; the number of jobs handled."""
        if self._failures:
            logger.warning("[%s] %s: database is back", self.name, self._label())
        self._failures = 0
        return int(got)

    def _after_error(self, err: Exception) -> float | None:
        """Log what ``run_once`` raised.  None: go on at once (the server undid a completion,
        the job runs again); else the seconds to wait (backoff with jitter) before the loop
        reconnects, after dropping the connection."""
        if isinstance(err, CompletionFailed):
            logger.warning("[%s] %s: %s", self.name, self.lost_job or self._label(), err)
            self.lost_job = None
            return None
        self._failures += 1
        lost, self.lost_job = self.lost_job, None
        delay: float = min(self.reconnect_max, 0.5 * 2 ** min(self._failures - 1, 10))
        delay *= random.uniform(0.75, 1.25)
        logger.error(
            "[%s] %s: database error%s: %s; reconnecting in %.1fs",
            self.name,
            self._label(),
            f" with {lost} in hand (the server returns it)" if lost else "",
            _describe(err),
            delay,
        )
        return delay

    def _log_drained(self) -> None:
        logger.info("[%s] %s: queue empty, stopping (burst)", self.name, self._label())

    def recycle(self) -> None:
        """Drop the connection and make fresh job objects (``recycle_after``)."""
        logger.info("[%s] recycling after %d jobs", self.name, self._since_recycle)
        self._drop_connection()
        self.jobs = [job._renewed() for job in self.jobs]
        self._targets = None
        self._ready = False
        self._since_recycle = 0

    def _drop_connection(self) -> None:
        self._ready = False  # the caller's connection is rolled back and prepared again
        conn = self._conn
        if conn is None or self._engine is None:
            return
        self._conn = None
        try:
            if not conn.invalidated:
                conn.invalidate()
            conn.close()
        except Exception:  # pragma: no cover - already gone
            logger.debug("closing a lost connection failed", exc_info=True)

    def _has_waiting(self) -> bool:
        """True while a target table holds any row: delayed jobs, or jobs other workers own
        (they may fail and come back); burst mode stops only once every table is empty."""
        conn = self.connect()
        try:
            for t in self._targets or []:
                if conn.execute(select(func.count()).select_from(t.table)).scalar():
                    return True
            return False
        finally:
            if conn.in_transaction():
                conn.rollback()

    def _label(self) -> str:
        return ",".join(self.tables)


def _describe(error: BaseException) -> str:
    """``Type: message`` on one line."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


def consumers_for(
    classes: Iterable[type[Job]],
    bind: Engine | Connection,
    *,
    stats: Stats | None = None,
    name: str = "worker",
    **options: Any,
) -> Consumer:
    """One consumer serving instances of ``classes`` (tables in the order given)."""
    return Consumer([cls(bind, **options) for cls in classes], bind, stats=stats, name=name)
