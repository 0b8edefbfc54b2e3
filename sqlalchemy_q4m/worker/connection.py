"""The state a consumer keeps around its one pinned connection: the connection itself
(checked out, prepared, dropped after a loss), the targets it serves and each wait's timeout
and condition, the job in hand and its counters.  The run loop over it is
:mod:`sqlalchemy_q4m.worker.consumer` (sync) and :mod:`sqlalchemy_q4m.worker.asyncio`."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Sequence
from types import TracebackType
from typing import TYPE_CHECKING
from typing import Any
from typing import TypeVar

from sqlalchemy import Connection
from sqlalchemy import Engine
from sqlalchemy import Table
from sqlalchemy import func
from sqlalchemy import inspect
from sqlalchemy import select

from ..backends.unique_keys import refresh as refresh_unique_keys
from ..consumer.consuming import ConsumerCore
from ..consumer.consuming import QueueConsumer
from ..exc import Q4MError
from ..schema.retry import RUN_AT
from ..server import BackendName
from ..server import detect_backend
from .deadletter import dead_letter_table
from .deadletter import ensure_dead_letter_table
from .loop import LOOP_ERRORS
from .loop import wait_slices
from .policy import Outcome
from .stats import Stats
from .targets import Target
from .targets import calls_where
from .targets import job_where
from .targets import resolve_targets
from .targets import where_for

#: A queue consumer class, the sync or the asyncio one (:func:`set_up_consumer`).
C = TypeVar("C", bound=ConsumerCore[Any])

if TYPE_CHECKING:
    from .job import Job

__all__ = ["ConsumerBase", "Holding"]

logger = logging.getLogger("sqlalchemy_q4m.worker")


class Holding:
    """What :meth:`ConsumerBase._holding` returns (a class, not a generator: it runs per job)."""

    __slots__ = ("consumer",)

    def __init__(self, consumer: ConsumerBase) -> None:
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


class ConsumerBase:
    """One pinned connection serving one or more job objects: its state, the connection and
    the targets.  :class:`~sqlalchemy_q4m.worker.consumer.Consumer` (the run loop) and its
    asyncio twin build on it.

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
        self._targets: list[Target] | None = None
        #: Worked out with the targets, not per job: their models, each table's target,
        #: whether a table has ``run_at`` and whether any wait has a condition.
        self._models: list[Any] = []
        self._by_table: dict[Table, Target] = {}
        self._timed = self._conditional = False
        #: The waits' conditions do not change within a second (no callable ``where``), and
        #: (second, conditions) of the last ones built.
        self._where_static = True
        self._where_cache: tuple[int, dict[Any, Any] | None] | None = None
        self._backend: BackendName | None = None
        self._ready = False  # the pinned connection is prepared (backend, tables)
        #: The sync driver's queue consumer on the prepared connection (its jobs' queue
        #: sessions), made again whenever the connection or the targets are.
        self._queue_consumer: QueueConsumer[Any] | None = None
        self._stop = threading.Event()
        self._since_recycle = 0
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
        self._holder = Holding(self)  # no state of its own: one for every job

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
        self._drop_consumer()  # made again for the connection prepared here
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
            self._serve(resolve_targets(self.jobs, conn))
        for dead_name in {job.dead_letter_table for job in self.jobs}:
            if not inspect(conn).has_table(dead_name):
                ensure_dead_letter_table(conn, dead_letter_table(dead_name))
        # the unique keys' hooks need no look-up during a job
        assert self._targets is not None  # set by _serve
        refresh_unique_keys(conn, [t.table.name for t in self._targets])
        if conn.in_transaction():
            conn.rollback()

    def _serve(self, targets: list[Target]) -> None:
        """Take ``targets`` and work out, once, what each wait and each job reads of them."""
        self._targets = targets
        self._drop_consumer()  # its targets were the old ones
        self._models = [t.target for t in targets]
        self._by_table = {t.table: t for t in targets}
        self._timed = any(RUN_AT in t.table.columns for t in targets)
        self._conditional = self._timed or any(job_where(t.job) is not None for t in targets)
        self._where_static = not any(calls_where(t.job) for t in targets)
        self._where_cache = None

    def _drop_consumer(self) -> None:
        """Forget the queue consumer: the connection or the targets it was made for changed
        (the asyncio consumer forgets its own too)."""
        self._queue_consumer = None

    # -- the waits ------------------------------------------------------------------------

    def _slices(self, timeout: float | None) -> Iterator[tuple[float, dict[Any, Any] | None]]:
        """The timeout and condition of each wait until ``timeout`` (default
        ``wait_timeout``) passes, in the slices :func:`.loop.wait_slices` cuts (conditions
        rebuilt each)."""
        targets = self._targets
        assert targets is not None
        conditional = self._conditional
        for seconds in wait_slices(
            self.wait_timeout if timeout is None else timeout, timed=self._timed
        ):
            yield seconds, self._where_now(targets) if conditional else None

    def _waits(self, timeout: float | None) -> Iterator[tuple[list[Any], dict[str, Any]]]:
        """The targets and the queue-session options of each of :meth:`_slices`' waits (a
        batch makes a queue object per wait; one job at a time, both drivers take it from
        their queue consumer, :func:`set_up_consumer`)."""
        for seconds, where in self._slices(timeout):
            yield (
                self._models,
                {
                    "where": where,
                    "timeout": seconds,
                    "backend": self._backend,
                    "poll_interval": self.poll_interval,
                    "listen": self.listen,
                },
            )

    def _where_now(self, targets: list[Target]) -> dict[Any, Any] | None:
        """:func:`.targets.where_for` now, built once per second (``run_at <= now`` compares
        whole seconds) unless a job's ``where`` is a callable, which is called per wait."""
        now = time.time()
        second = int(now)
        cached = self._where_cache
        if cached is not None and cached[0] == second:
            return cached[1]
        where = where_for(targets, now)
        if self._where_static:
            self._where_cache = (second, where)
        return where

    def _holding(self) -> Holding:
        """Around a job in hand: a database error on the way counts it as lost (the server
        returns it, or undid its completion) and goes on to the loop, which reconnects."""
        return self._holder

    def _count(self, outcome: Outcome) -> None:
        self.stats.add(outcome, *self._held_for())
        self._since_recycle += 1

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


def set_up_consumer(base: ConsumerBase, make: Callable[..., C], bind: Any) -> C:
    """A queue consumer (``make``: the sync or the asyncio class) of ``base``'s targets on
    ``bind``, made once per prepared connection (``connect()`` and new targets drop it): each
    job's queue session is its next take, so the checks, the backend and the connection's
    mode are set up once, not per job."""
    consumer = make(
        *base._models,
        bind=bind,
        backend=base._backend,
        poll_interval=base.poll_interval,
        listen=base.listen,
    )
    consumer.accept_unloadable = True  # dead-lettered by the worker
    consumer.private_connection = True  # its jobs reach it only through the queue session
    return consumer
