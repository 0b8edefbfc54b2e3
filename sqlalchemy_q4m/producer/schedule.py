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
from dataclasses import dataclass
from dataclasses import field
from typing import Any
from typing import Literal
from zoneinfo import ZoneInfo
from zoneinfo import ZoneInfoNotFoundError

from cronsim import CronSim
from cronsim import CronSimError
from sqlalchemy import Column
from sqlalchemy import Connection
from sqlalchemy import Engine
from sqlalchemy import Integer
from sqlalchemy import MetaData
from sqlalchemy import PrimaryKeyConstraint
from sqlalchemy import String
from sqlalchemy import Table
from sqlalchemy import UniqueConstraint
from sqlalchemy import delete
from sqlalchemy import func
from sqlalchemy import insert
from sqlalchemy import inspect
from sqlalchemy import select
from sqlalchemy import update
from sqlalchemy.dialects.mysql import DATETIME
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import IntegrityError
from sqlalchemy.schema import CreateTable

from ..backends.wakeup import notify_committed
from ..exc import Q4MError
from ..schema.ddl import validate_name
from ..schema.functions import queue_set_srcid
from ..schema.reflect import reflect_queue_table
from ..schema.reflect import table_name_for
from ..server import BackendName
from ..server import detect_backend
from .enqueue import enqueue

__all__ = [
    "SCHEDULES_TABLE",
    "TICKS_TABLE",
    "Schedule",
    "ScheduleError",
    "ScheduleState",
    "Scheduler",
    "SchedulerThread",
    "ensure_schedule_tables",
    "fire_due",
    "list_schedules",
    "schedule_of",
    "schedule_tables",
    "schedules_of",
]

logger = logging.getLogger("sqlalchemy_q4m.schedule")

SCHEDULES_TABLE = "q4m_schedules"
TICKS_TABLE = "q4m_schedule_ticks"
#: Q4M's relay sources (``queue_set_srcid``'s first argument is 0..63).
MAX_SOURCES = 64
#: Ticks enqueued per transaction at most (a long on-time window is worked off in turns).
MAX_TICKS_PER_TURN = 1000
#: Longest pause of a scheduler between two looks at its schedules.
MAX_SLEEP = 1.0
#: Tick rows older than this are deleted (``last_tick`` is what guards exactly once).
KEEP_TICKS = dt.timedelta(days=7)

Missed = Literal["once", "skip"]
_EPOCH = dt.datetime(1970, 1, 1)


class ScheduleError(Q4MError, ValueError):
    """This schedule cannot be used: bad cron expression, interval, time zone or policy."""


def _utc_naive(value: dt.datetime) -> dt.datetime:
    if value.tzinfo is None:
        return value
    return value.astimezone(dt.timezone.utc).replace(tzinfo=None)


@dataclass(frozen=True)
class Schedule:
    """One recurring job: ``name`` (unique across schedulers), the queue ``target`` (model,
    Table, or table name), ``every`` (cron text or a ``timedelta``), and ``payload(tick)``
    (the row to enqueue; ``tick`` is a UTC-aware datetime)."""

    name: str
    target: Any
    every: str | dt.timedelta
    payload: Callable[[dt.datetime], Mapping[str, Any]] | None = None
    timezone: str | None = None
    missed: Missed = "once"
    grace: float = 60.0
    _zone: dt.tzinfo = field(default=dt.timezone.utc, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not 0 < len(self.name) <= 191:
            raise ScheduleError(f"a schedule name is 1 to 191 characters, not {self.name!r}")
        if self.missed not in ("once", "skip"):
            raise ScheduleError(f"schedule_missed is 'once' or 'skip', not {self.missed!r}")
        if isinstance(self.grace, bool) or not isinstance(self.grace, int | float):
            raise ScheduleError(f"schedule_grace is a number of seconds, not {self.grace!r}")
        if self.grace < 0:
            raise ScheduleError(f"schedule_grace must be >= 0, not {self.grace!r}")
        zone: dt.tzinfo = dt.timezone.utc
        if self.timezone is not None:
            try:
                zone = ZoneInfo(self.timezone)
            except (ZoneInfoNotFoundError, ValueError) as err:
                raise ScheduleError(f"unknown time zone {self.timezone!r}") from err
        object.__setattr__(self, "_zone", zone)
        every = self.every
        if isinstance(every, dt.timedelta):
            if every < dt.timedelta(seconds=1):
                raise ScheduleError(f"a schedule interval is at least 1 second, not {every!r}")
            if every.microseconds:
                raise ScheduleError(f"a schedule interval is whole seconds, not {every!r}")
        elif isinstance(every, str):
            try:
                CronSim(every, dt.datetime(2000, 1, 1, tzinfo=zone))
            except CronSimError as err:
                raise ScheduleError(f"bad cron expression {every!r}: {err}") from err
        else:
            raise ScheduleError(f"schedule is cron text or a timedelta, not {every!r}")

    @property
    def spec(self) -> str:
        """The schedule as text: the cron expression, or ``every 30s``."""
        if isinstance(self.every, dt.timedelta):
            return f"every {int(self.every.total_seconds())}s"
        return self.every + (f" ({self.timezone})" if self.timezone else "")

    def next_after(self, moment: dt.datetime) -> dt.datetime:
        """The first tick strictly after ``moment`` (naive UTC in, naive UTC out)."""
        if isinstance(self.every, dt.timedelta):
            step = int(self.every.total_seconds())
            seconds = (moment - _EPOCH) // dt.timedelta(seconds=1)
            return _EPOCH + dt.timedelta(seconds=(seconds // step + 1) * step)
        start = moment.replace(tzinfo=dt.timezone.utc).astimezone(self._zone)
        return _utc_naive(next(CronSim(self.every, start)))

    def last_at_or_before(self, moment: dt.datetime) -> dt.datetime | None:
        """The latest tick at or before ``moment`` (naive UTC), None if there is none."""
        if isinstance(self.every, dt.timedelta):
            step = int(self.every.total_seconds())
            seconds = (moment - _EPOCH) // dt.timedelta(seconds=1)
            return _EPOCH + dt.timedelta(seconds=seconds // step * step)
        start = (moment + dt.timedelta(microseconds=1)).replace(tzinfo=dt.timezone.utc)
        try:
            return _utc_naive(next(CronSim(self.every, start.astimezone(self._zone), reverse=True)))
        except StopIteration:  # pragma: no cover - cronsim gives up on impossible dates
            return None

    def due(
        self, anchor: dt.datetime, now: dt.datetime, first: bool
    ) -> tuple[list[dt.datetime], dt.datetime]:
        """The ticks to enqueue after ``anchor`` (exclusive; inclusive when ``first``) up to
        ``now``, and the new anchor (the latest tick considered, enqueued or skipped)."""
        floor = anchor - dt.timedelta(microseconds=1) if first else anchor
        on_time_from = now - dt.timedelta(seconds=self.grace)
        ticks: list[dt.datetime] = []
        newest = anchor
        missed = self.last_at_or_before(on_time_from - dt.timedelta(microseconds=1))
        if missed is not None and missed > floor:
            if self.missed == "once":
                ticks.append(missed)
            newest = floor = missed
        tick = self.next_after(max(floor, on_time_from - dt.timedelta(microseconds=1)))
        while tick <= now and len(ticks) < MAX_TICKS_PER_TURN:
            ticks.append(tick)
            newest = tick
            tick = self.next_after(tick)
        return ticks, newest

    def row_for(self, tick: dt.datetime) -> dict[str, Any]:
        """The row to enqueue for ``tick`` (naive UTC): ``payload(tick as UTC-aware)``."""
        if self.payload is None:
            return {}
        row = self.payload(tick.replace(tzinfo=dt.timezone.utc))
        if not isinstance(row, Mapping):
            raise ScheduleError(f"schedule {self.name!r}: schedule_payload returned {row!r:.60}")
        return dict(row)


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


# -- tables -------------------------------------------------------------------------------------


def schedule_tables(metadata: MetaData | None = None) -> tuple[Table, Table]:
    """``q4m_schedules`` (one row per schedule) and ``q4m_schedule_ticks`` (one per tick),
    both InnoDB."""
    metadata = metadata if metadata is not None else MetaData()
    options: dict[str, Any] = {
        "mysql_engine": "InnoDB",
        "mariadb_engine": "InnoDB",
        "mysql_charset": "utf8mb4",
        "mariadb_charset": "utf8mb4",
    }
    schedules = Table(
        SCHEDULES_TABLE,
        metadata,
        Column("name", String(191), primary_key=True),
        Column("queue", String(64), nullable=False),
        Column("spec", String(255), nullable=False),
        Column("srcid", Integer, nullable=True),
        Column("created_at", DATETIME(fsp=6), nullable=False),
        Column("last_tick", DATETIME(fsp=6), nullable=True),
        Column("next_tick", DATETIME(fsp=6), nullable=True),
        Column("fired", Integer, nullable=False, default=0),
        UniqueConstraint("queue", "srcid", name="q4m_schedules_srcid"),
        **options,
    )
    ticks = Table(
        TICKS_TABLE,
        metadata,
        Column("schedule", String(191), nullable=False),
        Column("tick", DATETIME(fsp=6), nullable=False),
        Column("job_id", String(36), nullable=False),
        Column("enqueued_at", DATETIME(fsp=6), nullable=False),
        PrimaryKeyConstraint("schedule", "tick"),
        **options,
    )
    return schedules, ticks


SCHEDULES, TICKS = schedule_tables()


def ensure_schedule_tables(conn: Connection) -> None:
    """``CREATE TABLE IF NOT EXISTS`` both tables (safe when many schedulers start); commits."""
    began = not conn.in_transaction()
    for table in (SCHEDULES, TICKS):
        conn.execute(CreateTable(table, if_not_exists=True))
    if began:
        conn.commit()


# -- one turn -----------------------------------------------------------------------------------


def _now(conn: Connection) -> dt.datetime:
    """The server's clock (UTC): every scheduler, on any machine, agrees on it."""
    value = conn.execute(select(func.utc_timestamp(6))).scalar()
    if isinstance(value, str):  # pragma: no cover - drivers that return text
        value = dt.datetime.fromisoformat(value)
    assert isinstance(value, dt.datetime)
    return value


def _queue_name(schedule: Schedule) -> str:
    target = schedule.target
    if isinstance(target, str):
        return target
    if isinstance(target, Table):
        return target.name
    return str(target.__table__.name)


def _free_source(conn: Connection, queue: str) -> int:
    """The lowest Q4M relay source no schedule of ``queue`` uses."""
    used = set(
        conn.execute(
            select(SCHEDULES.c.srcid).where(
                SCHEDULES.c.queue == queue, SCHEDULES.c.srcid.is_not(None)
            )
        ).scalars()
    )
    free = [n for n in range(MAX_SOURCES) if n not in used]
    if not free:
        conn.rollback()
        raise ScheduleError(
            f"queue table {queue!r} has {MAX_SOURCES} schedules already: Q4M has "
            f"{MAX_SOURCES} relay sources per table (queue_set_srcid)"
        )
    return free[0]


def _register(conn: Connection, schedule: Schedule, now: dt.datetime, native: bool) -> None:
    """Insert the schedule's row if it is missing (commits); on Q4M give it a free source."""
    queue = _queue_name(schedule)
    for _ in range(MAX_SOURCES + 1):
        srcid = _free_source(conn, queue) if native else None
        try:  # a plain INSERT: an upsert would also "update" the row holding that source
            conn.execute(
                insert(SCHEDULES).values(
                    name=schedule.name,
                    queue=queue,
                    spec=schedule.spec,
                    srcid=srcid,
                    created_at=now,
                    fired=0,
                )
            )
            conn.commit()
            return
        except IntegrityError:  # another scheduler registered it, or took that source
            conn.rollback()
        if conn.execute(select(SCHEDULES.c.name).where(SCHEDULES.c.name == schedule.name)).first():
            conn.rollback()
            return
    raise ScheduleError(f"could not register schedule {schedule.name!r}")  # pragma: no cover


def fire_due(
    conn: Connection,
    schedule: Schedule,
    target: Any,
    backend: BackendName,
) -> list[dt.datetime]:
    """One turn for one schedule on ``conn`` (no transaction open): lock its row, enqueue the
    due ticks' jobs into ``target`` (a model or Table), record them, commit.  Returns the
    ticks enqueued.  See the module docstring for why this is exactly once."""
    native = backend == "native"
    queue = _queue_name(schedule)
    now = _now(conn)
    row = conn.execute(
        select(SCHEDULES).where(SCHEDULES.c.name == schedule.name).with_for_update()
    ).first()
    if row is None:
        conn.rollback()
        _register(conn, schedule, now, native)
        now = _now(conn)
        row = conn.execute(
            select(SCHEDULES).where(SCHEDULES.c.name == schedule.name).with_for_update()
        ).one()
    srcid = row.srcid
    changes: dict[str, Any] = {}
    if row.spec != schedule.spec:
        changes["spec"] = schedule.spec
    if row.queue != queue or (native and srcid is None):
        # a new queue table (or a server that became Q4M): a source free on that table;
        # a race for it fails on the unique key and the next turn tries again
        changes["queue"] = queue
        srcid = changes["srcid"] = _free_source(conn, queue) if native else None
    first = row.last_tick is None
    anchor = row.created_at if first else row.last_tick
    ticks, newest = schedule.due(anchor, now, first)
    for tick in ticks:
        values = schedule.row_for(tick)
        if native:
            rowid = (tick - _EPOCH) // dt.timedelta(microseconds=1)
            conn.execute(select(queue_set_srcid(srcid, "a", rowid)))
        (job_id,) = enqueue(conn, target, [values], notify=False)
        conn.execute(
            TICKS.insert().values(
                schedule=schedule.name, tick=tick, job_id=str(job_id), enqueued_at=now
            )
        )
    if newest != anchor:
        changes["last_tick"] = newest
    changes["next_tick"] = schedule.next_after(max(newest, now))
    if ticks:
        changes["fired"] = SCHEDULES.c.fired + len(ticks)
    conn.execute(update(SCHEDULES).where(SCHEDULES.c.name == schedule.name).values(changes))
    conn.commit()
    return ticks


@dataclass(frozen=True)
class ScheduleState:
    """A schedule's row as ``q4m schedule list`` shows it."""

    name: str
    queue: str
    spec: str
    srcid: int | None
    created_at: dt.datetime
    last_tick: dt.datetime | None
    next_tick: dt.datetime | None
    fired: int


def list_schedules(conn: Connection) -> list[ScheduleState]:
    """Every schedule's state (empty when no scheduler ever ran)."""
    if not inspect(conn).has_table(SCHEDULES_TABLE):
        return []
    rows = conn.execute(select(SCHEDULES).order_by(SCHEDULES.c.name)).all()
    return [ScheduleState(**row._asdict()) for row in rows]


def prune_ticks(conn: Connection, keep: dt.timedelta = KEEP_TICKS) -> int:
    """Delete tick rows older than ``keep`` (by the server's clock); commits."""
    cutoff = _now(conn) - keep
    result = conn.execute(delete(TICKS).where(TICKS.c.tick < cutoff))
    conn.commit()
    return int(result.rowcount)


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
            validate_name(_queue_name(schedule))
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
                now = _utc_naive(dt.datetime.now(dt.timezone.utc))
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
