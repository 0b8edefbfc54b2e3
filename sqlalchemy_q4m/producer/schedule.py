"""Recurring jobs: a job class with ``schedule = "*/5 * * * *"`` (or a ``timedelta``) gets one
job per tick, enqueued **exactly once** however many schedulers run.

::

    class Report(Job):
        table_name = "report_jobs"
        schedule = "*/5 * * * *"            # cron (UTC, or schedule_timezone = "Europe/Paris")
        schedule_missed = "once"            # ticks missed while no scheduler ran: "once"/"skip"

        def schedule_payload(self, tick):   # the row to enqueue for a tick (default: {})
            return {"day": tick.date().isoformat()}

How: every schedule has a row in the InnoDB table ``q4m_schedules`` (its last tick); a
scheduler locks that row (``SELECT ... FOR UPDATE``), works out the ticks due by the
*server's* clock, enqueues their jobs, records each tick in ``q4m_schedule_ticks`` (primary key
``(schedule, tick)``) and moves ``last_tick`` on, then commits.  Schedulers are serialized per
schedule by the row lock, so a tick is never enqueued by two of them.

* **portable** (InnoDB queue tables): the jobs, the tick rows and ``last_tick`` commit in one
  transaction; a scheduler that dies or loses the database before the commit leaves nothing,
  and the next one enqueues the same ticks.  Exactly once.
* **native** (Q4M): a job ``INSERT`` is durable at once, outside the transaction, so a scheduler
  killed between the ``INSERT`` and the ``COMMIT`` would leave a job whose tick is not recorded.
  Each schedule therefore gets one of Q4M's 64 relay sources per queue table (``srcid`` in
  ``q4m_schedules``) and every job is inserted after ``queue_set_srcid(srcid, 'a', tick_us)``
  (the tick in microseconds since the epoch).  The engine keeps, in the queue table itself, the
  newest rowid it accepted from each source and silently drops an ``INSERT`` that is not newer:
  the next scheduler's retry of the same tick is dropped.  Ticks are inserted in increasing
  order (the row lock serializes them), so a new tick is never mistaken for an old one.
  Exactly once; at most 64 schedules per Q4M queue table.

Missed ticks: a tick is on time while it is at most ``schedule_grace`` seconds (default 60) in
the past; every on-time tick is enqueued, in order.  Older ones were missed (no scheduler ran):
``schedule_missed = "once"`` enqueues the latest missed tick once, ``"skip"`` none of them.  A
schedule seen for the first time starts at the first tick at or after that moment.
"""

from __future__ import annotations

import datetime as dt
import logging
import random
import threading
import time
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Iterator
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection
from sqlalchemy import Engine
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError

from ..backends.notify import notify_committed
from ..exc import Q4MError
from ..schema.ddl import validate_name
from ..schema.reflect import reflect_queue_table
from ..schema.reflect import table_name_for
from ..server import BackendName
from ..server import detect_backend
from .cron import Schedule
from .cron import ScheduleError
from .cron import utc_naive
from .ticks import SCHEDULES
from .ticks import ensure_schedule_tables
from .ticks import fire_due
from .ticks import prune_ticks
from .ticks import queue_name

__all__ = [
    "Schedule",
    "ScheduleError",
    "Scheduler",
    "SchedulerThread",
    "schedule_of",
    "schedules_of",
]

logger = logging.getLogger("sqlalchemy_q4m.schedule")

#: Longest pause of a scheduler between two looks at its schedules.
MAX_SLEEP = 1.0


def schedule_of(job_class: type[Any], bind: Engine | Connection | None = None) -> Schedule | None:
    """The :class:`Schedule` a job class declares with ``schedule = ...`` (None without).

    Class attributes: ``schedule`` (cron text or ``timedelta``), ``schedule_name`` (default:
    ``module.Class``), ``schedule_timezone``, ``schedule_missed`` (``"once"``/``"skip"``),
    ``schedule_grace`` (seconds); the method ``schedule_payload(self, tick)`` (called on an
    instance made with ``bind``; without a bind the schedule is only checked).
    """
    every = getattr(job_class, "schedule", None)
    if every is None:
        return None
    model = getattr(job_class, "model", None)
    table_name = getattr(job_class, "table_name", None)
    target: Any
    if isinstance(model, list | tuple):
        target = model[0]
    elif model is not None:
        target = model
    elif isinstance(table_name, str):
        target = table_name
    elif table_name:
        target = table_name[0]
    else:
        target = table_name_for(job_class.__name__)
    payload: Callable[[dt.datetime], Mapping[str, Any]] | None = None
    if "schedule_payload" in _attrs(job_class) and bind is not None:  # None: only checked
        instance = job_class(bind)
        payload = instance.schedule_payload
    name = getattr(job_class, "schedule_name", None) or (
        f"{job_class.__module__}.{job_class.__qualname__}"
    )
    return Schedule(
        name=name,
        target=target,
        every=every,
        payload=payload,
        timezone=getattr(job_class, "schedule_timezone", None),
        missed=getattr(job_class, "schedule_missed", "once"),
        grace=getattr(job_class, "schedule_grace", 60.0),
    )


def _attrs(cls: type[Any]) -> set[str]:
    return {name for klass in cls.__mro__ if klass is not object for name in vars(klass)}


def schedules_of(
    classes: Iterable[type[Any]], bind: Engine | Connection | None = None
) -> list[Schedule]:
    """The schedules ``classes`` declare (classes without ``schedule`` are left out)."""
    found = [s for cls in classes if (s := schedule_of(cls, bind)) is not None]
    names = [s.name for s in found]
    if len(set(names)) != len(names):
        raise ScheduleError(f"two schedules share a name: {sorted(names)}")
    return found


# -- the loop -----------------------------------------------------------------------------------


class Scheduler:
    """Runs ``schedules`` on ``engine`` until :meth:`stop`: any number of schedulers, in any
    processes on any machines, may run the same schedules (see the module docstring).  A lost
    database is survived by reconnecting with backoff."""

    def __init__(
        self,
        engine: Engine,
        schedules: Sequence[Schedule],
        *,
        backend: BackendName | None = None,
        reconnect_max: float = 30.0,
    ) -> None:
        names = [s.name for s in schedules]
        if len(set(names)) != len(names):
            raise ScheduleError(f"two schedules share a name: {sorted(names)}")
        for schedule in schedules:
            validate_name(queue_name(schedule))
        self.engine = engine
        self.schedules = list(schedules)
        self.backend = backend
        self.reconnect_max = reconnect_max
        self.fired = 0
        self._stopping = False  # a plain flag: stop() may run in a signal handler
        self._conn: Connection | None = None
        self._targets: dict[str, Any] = {}

    def stop(self) -> None:
        """Stop after the turn in hand (thread-safe, and safe in a signal handler: it only
        sets a flag, which the loop looks at every 0.1 s)."""
        self._stopping = True

    @property
    def stopping(self) -> bool:
        return self._stopping

    def _pause(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self._stopping and (left := deadline - time.monotonic()) > 0:
            time.sleep(min(0.1, left))

    def _connect(self) -> Connection:
        conn = self._conn
        if conn is not None and not conn.closed and not conn.invalidated:
            return conn
        conn = self.engine.connect()
        try:
            if self.backend is None:
                self.backend = detect_backend(conn)
            conn.execution_options(isolation_level="READ COMMITTED")
            ensure_schedule_tables(conn)
            self._resolve_targets(conn)
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return conn

    def _resolve_targets(self, conn: Connection) -> None:
        for schedule in self.schedules:
            if schedule.name in self._targets:
                continue
            target = schedule.target
            if isinstance(target, str):
                target = reflect_queue_table(conn, target)
            self._targets[schedule.name] = target
        if conn.in_transaction():
            conn.rollback()

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.invalidate()
                conn.close()
            except Exception:  # pragma: no cover - already gone
                logger.debug("closing a lost connection failed", exc_info=True)

    def run_once(self) -> dt.datetime | None:
        """One turn over every schedule; the earliest next tick (naive UTC by the server)."""
        conn = self._connect()
        assert self.backend is not None
        soonest: dt.datetime | None = None
        for schedule in self.schedules:
            try:
                ticks = fire_due(conn, schedule, self._targets[schedule.name], self.backend)
            except BaseException:
                if conn.in_transaction() and not conn.invalidated:
                    conn.rollback()
                raise
            for tick in ticks:
                logger.info("schedule %s: enqueued the tick of %s UTC", schedule.name, tick)
            if ticks and self.backend == "portable":  # committed: wake listening consumers
                notify_committed(self.engine, self._targets[schedule.name], jobs=len(ticks))
            self.fired += len(ticks)
            nxt = conn.execute(
                select(SCHEDULES.c.next_tick).where(SCHEDULES.c.name == schedule.name)
            ).scalar()
            conn.rollback()
            if nxt is not None and (soonest is None or nxt < soonest):
                soonest = nxt
        return soonest

    def run(self) -> None:
        """Turn until stopped; sleep until the next tick (at most a second) in between."""
        failures = 0
        turns = 0
        while not self.stopping:
            try:
                soonest = self.run_once()
                if turns % 3600 == 0:
                    prune_ticks(self._connect())
                turns += 1
                if failures:
                    logger.warning("scheduler: database is back")
                failures = 0
            except (DBAPIError, Q4MError) as err:
                if isinstance(err, ScheduleError):
                    raise
                failures += 1
                delay = min(self.reconnect_max, 0.5 * 2 ** min(failures - 1, 10))
                delay *= random.uniform(0.75, 1.25)
                logger.error("scheduler: database error: %s; reconnecting in %.1fs", err, delay)
                self._drop()
                self._pause(delay)
                continue
            pause = MAX_SLEEP
            if soonest is not None:
                now = utc_naive(dt.datetime.now(dt.timezone.utc))
                pause = min(MAX_SLEEP, max(0.01, (soonest - now).total_seconds()))
            # a little jitter: schedulers started together do not queue on the row lock
            self._pause(pause + random.uniform(0, 0.05))
        self.close()

    def close(self) -> None:
        """Give the connection back."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def __iter__(self) -> Iterator[Schedule]:
        return iter(self.schedules)


class SchedulerThread:
    """A :class:`Scheduler` in a daemon thread beside a worker's consumers (``q4m worker``
    runs the schedules of the job classes it serves)."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.thread = threading.Thread(target=self._main, name="q4m-scheduler", daemon=True)

    def _main(self) -> None:
        try:
            self.scheduler.run()
        except Exception:
            logger.exception("scheduler crashed")

    def start(self) -> SchedulerThread:
        self.thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the turn in hand and wait for it (up to ``timeout`` seconds)."""
        self.scheduler.stop()
        if self.thread.is_alive() and threading.current_thread() is not self.thread:
            self.thread.join(timeout)
