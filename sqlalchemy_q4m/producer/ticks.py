"""The schedule tables (``q4m_schedules``, ``q4m_schedule_ticks``) and one turn of a schedule
(:func:`fire_due`): lock its row, enqueue the due ticks' jobs, record them, commit.  Why that is
exactly once on both backends is told in :mod:`sqlalchemy_q4m.producer.schedule`."""

import datetime as dt
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Column
from sqlalchemy import Connection
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
from sqlalchemy.exc import IntegrityError
from sqlalchemy.schema import CreateTable

from ..schema.functions import queue_set_srcid
from ..server import BackendName
from .cron import EPOCH
from .cron import Schedule
from .cron import ScheduleError
from .enqueue import enqueue

__all__ = [
    "SCHEDULES",
    "SCHEDULES_TABLE",
    "TICKS",
    "TICKS_TABLE",
    "ScheduleState",
    "ensure_schedule_tables",
    "fire_due",
    "list_schedules",
    "prune_ticks",
    "queue_name",
    "schedule_tables",
]

SCHEDULES_TABLE = "q4m_schedules"
TICKS_TABLE = "q4m_schedule_ticks"
#: Q4M's relay sources (``queue_set_srcid``'s first argument is 0..63).
MAX_SOURCES = 64
#: Tick rows older than this are deleted (``last_tick`` is what guards exactly once).
KEEP_TICKS = dt.timedelta(days=7)


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


def queue_name(schedule: Schedule) -> str:
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
    queue = queue_name(schedule)
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
    queue = queue_name(schedule)
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
            rowid = (tick - EPOCH) // dt.timedelta(microseconds=1)
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
