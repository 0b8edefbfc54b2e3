"""Operations: the queries about queues, jobs, dead letters and workers, in one place.

The ``q4m`` command line, the demo and the web dashboard all read and change queues through
these functions, on both backends.  Two kinds of counts:

* :func:`queue_counts` is exact (``q4m stats``): it reads every row of the queue, which is
  fine for a command run now and then, not for a page refreshed every few seconds.
* :func:`overview` is cheap enough for every refresh on big queues: the row count is exact on
  Q4M (the engine keeps it: ``COUNT(*)`` costs nothing) and on InnoDB while the table's
  estimate (``information_schema.TABLES.TABLE_ROWS``) is below ``exact_limit``; above it the
  estimate is shown as such.  Delayed jobs are counted only below ``exact_limit`` (a scan:
  ``run_at`` has no index); the jobs in hand come from the worker registry; the oldest job's
  age from its UUIDv7 id (``MIN(id)`` on the InnoDB primary key, the head of the queue on Q4M).

Table names that come from outside (a web page, the command line) are checked against the
queue tables of the database (:func:`queue_table_names`) before anything is reflected.
"""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid
from collections.abc import Callable
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field
from typing import Any

from sqlalchemy import Connection
from sqlalchemy import Table
from sqlalchemy import delete
from sqlalchemy import false
from sqlalchemy import func
from sqlalchemy import inspect
from sqlalchemy import select
from sqlalchemy import text
from sqlalchemy.types import LargeBinary
from sqlalchemy.types import _Binary

from ..backends.wakeup import notify_committed
from ..exc import Q4MError
from ..exc import QueueTableError
from ..exc import RowError
from ..producer.enqueue import enqueue
from ..producer.schedule import list_schedules
from ..producer.unique import count_keys
from ..schema.ddl import JOB_ID
from ..schema.functions import queue_stats
from ..schema.reflect import reflect_queue_table
from ..schema.retry import ATTEMPTS
from ..schema.retry import RUN_AT
from ..server import detect_backend
from ..worker.deadletter import DEAD_LETTER_TABLE
from ..worker.deadletter import dead_letter_table
from ..worker.registry import COUNTERS
from ..worker.registry import DEFAULT_STALE_AFTER
from ..worker.registry import THROUGHPUT_TABLE
from ..worker.registry import WORKERS_TABLE
from ..worker.registry import throughput_table
from ..worker.registry import worker_registry_table
from .deadletters import DeadLetter
from .deadletters import count_dead
from .deadletters import purge_dead
from .deadletters import retry_dead

__all__ = [
    "JOB_STATES",
    "JobPage",
    "QueueSummary",
    "WorkerInfo",
    "check_queue_name",
    "dead_counts",
    "dead_letter",
    "dead_letters",
    "enqueue_rows",
    "get_job",
    "job_age",
    "list_jobs",
    "overview",
    "parse_q4m_stats",
    "prune_lost_workers",
    "purge_dead_letters",
    "queue_counts",
    "queue_table_names",
    "retry_dead_letters",
    "throughput",
    "workers",
]

#: Filters of :func:`list_jobs`.
JOB_STATES = ("all", "ready", "delayed", "in_hand")
#: Tables of the library that are never queues.
_OWN_TABLES = frozenset({DEAD_LETTER_TABLE, WORKERS_TABLE, THROUGHPUT_TABLE})


# -- which tables are queues ------------------------------------------------------------------


def _scan_tables(
    conn: Connection, dead_name: str = DEAD_LETTER_TABLE
) -> tuple[list[tuple[str, str, int]], list[str]]:
    """(name, engine, estimated rows) of the queue tables of the current database:
    ENGINE=QUEUE with an ``id`` column, or a 16-byte binary ``id`` primary key (the portable
    layout); and the names of the ENGINE=QUEUE tables without a job id, which are not ours.
    One information_schema query, no table is opened."""
    rows = conn.execute(
        text(
            "SELECT t.TABLE_NAME, t.ENGINE, t.TABLE_ROWS, c.COLUMN_TYPE, c.COLUMN_KEY "
            "FROM information_schema.TABLES t LEFT JOIN information_schema.COLUMNS c "
            "ON c.TABLE_SCHEMA = t.TABLE_SCHEMA AND c.TABLE_NAME = t.TABLE_NAME "
            "AND c.COLUMN_NAME = :id "
            "WHERE t.TABLE_SCHEMA = DATABASE() AND t.TABLE_TYPE = 'BASE TABLE' "
            "ORDER BY t.TABLE_NAME"
        ),
        {"id": JOB_ID},
    ).all()
    found = []
    foreign = []
    for name, engine, estimate, column_type, key in rows:
        if name == dead_name or name in _OWN_TABLES:
            continue
        queue_engine = str(engine).upper() == "QUEUE"
        if (queue_engine and column_type is not None) or (
            str(column_type).lower() == "binary(16)" and key == "PRI"
        ):
            found.append((str(name), str(engine).upper(), int(estimate or 0)))
        elif queue_engine:
            foreign.append(str(name))
    return found, foreign


def _table_rows(conn: Connection, dead_name: str = DEAD_LETTER_TABLE) -> list[tuple[str, str, int]]:
    """The queue tables of :func:`_scan_tables`."""
    return _scan_tables(conn, dead_name)[0]


def foreign_queue_tables(conn: Connection, dead_name: str = DEAD_LETTER_TABLE) -> list[str]:
    """ENGINE=QUEUE tables of the current database without a job id (``id``): Q4M tables
    that sqlalchemy-q4m did not make, which the tools skip and name."""
    return _scan_tables(conn, dead_name)[1]


def queue_table_names(conn: Connection, dead_name: str = DEAD_LETTER_TABLE) -> list[str]:
    """Names of the queue tables of the current database (see :func:`_table_rows`)."""
    return [name for name, _, _ in _table_rows(conn, dead_name)]


def check_queue_name(conn: Connection, name: str, dead_name: str = DEAD_LETTER_TABLE) -> str:
    """``name`` if it is one of the database's queue tables, else :class:`QueueTableError`:
    names from a web page or a form are looked up here, never pasted into SQL."""
    for known in queue_table_names(conn, dead_name):
        if known == name:
            return known
    raise QueueTableError(f"no queue table {name!r} in this database")


# -- exact counts (q4m stats) -----------------------------------------------------------------


def queue_counts(conn: Connection, table: Table, dead_name: str) -> dict[str, Any]:
    """``queued`` (ready now), ``delayed``, ``owned`` (in progress), ``dead`` for one queue;
    on Q4M also the engine's own counters (``queue_stats``).  Exact: reads every row."""
    backend = detect_backend(conn)
    total = int(conn.execute(select(func.count()).select_from(table)).scalar() or 0)
    id_column = table.c[JOB_ID]
    if backend == "portable":  # rows another transaction holds are the owned ones
        free = len(conn.execute(select(id_column).with_for_update(skip_locked=True)).all())
    else:  # Q4M: other connections' owned rows are counted but not returned
        free = len(conn.execute(select(id_column)).all())
    conn.rollback()
    delayed = 0
    run_at = table.columns.get(RUN_AT)
    if run_at is not None:
        stmt = select(func.count()).select_from(table).where(run_at > int(time.time()))
        delayed = int(conn.execute(stmt).scalar() or 0)
    counts: dict[str, Any] = {
        "table": table.name,
        "backend": backend,
        "queued": max(0, free - delayed),
        "delayed": delayed,
        "owned": max(0, total - free),
        "dead": count_dead(conn, dead_letter_table(dead_name), table.name),
        "unique_keys": count_keys(conn, table.name),
        "schedules": sum(1 for s in list_schedules(conn) if s.queue == table.name),
    }
    if backend == "native":
        raw = conn.execute(select(queue_stats(table.name))).scalar()
        counts["q4m"] = parse_q4m_stats(raw)
    conn.rollback()
    return counts


def parse_q4m_stats(raw: str | bytes | None) -> dict[str, Any]:
    """``queue_stats()`` (``key: value`` lines; bytes with some drivers) as a dict, numbers as
    ints; ``{"raw": ...}`` if it cannot be parsed."""
    if raw is None:
        return {}
    if isinstance(raw, bytes | bytearray | memoryview):
        raw = bytes(raw).decode("utf-8", "replace")
    stats: dict[str, Any] = {}
    for line in raw.replace(",", "\n").splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            key, sep, value = line.partition("=")
        if sep and key.strip():
            value = value.strip()
            stats[key.strip()] = int(value) if value.lstrip("-").isdigit() else value
    return stats if stats or not raw.strip() else {"raw": raw.strip()}


# -- cheap counts (the dashboard) -------------------------------------------------------------


@dataclass
class QueueSummary:
    """One queue as the overview shows it (see the module docstring for what is exact)."""

    table: str
    backend: str  # "native" (ENGINE=QUEUE) or "portable"
    total: int
    exact: bool  # total is a count, not an estimate
    delayed: int | None  # None: not counted (the table is too big for a scan)
    in_hand: int
    dead: int
    oldest_age: float | None  # seconds since the oldest job was enqueued
    q4m: dict[str, Any] = field(default_factory=dict)

    @property
    def queued(self) -> int:
        return max(0, self.total - (self.delayed or 0) - self.in_hand)


def job_age(job_id: Any, now: float | None = None) -> float | None:
    """Seconds since a UUIDv7 job id was made (None for other ids)."""
    try:
        if isinstance(job_id, bytes | bytearray | memoryview):
            value = uuid.UUID(bytes=bytes(job_id))
        elif isinstance(job_id, uuid.UUID):
            value = job_id
        else:
            value = uuid.UUID(str(job_id))
    except (ValueError, TypeError):
        return None
    if value.version != 7:
        return None
    return max(0.0, (time.time() if now is None else now) - (value.int >> 80) / 1000)


def job_id_text(job_id: Any) -> str:
    """A job id as text: a UUID for 16 bytes, else ``str``."""
    if isinstance(job_id, bytes | bytearray | memoryview) and len(bytes(job_id)) == 16:
        return str(uuid.UUID(bytes=bytes(job_id)))
    return str(job_id)


def _id_value(table: Table, job_id: str) -> Any:
    """The value to compare ``table.c.id`` with for a job id given as text."""
    try:
        value = uuid.UUID(job_id)
    except ValueError:
        raise Q4MError(f"not a job id: {job_id!r:.60}") from None
    if isinstance(table.c[JOB_ID].type, _Binary | LargeBinary):
        return value.bytes
    return value


def overview(
    conn: Connection,
    *,
    dead_name: str = DEAD_LETTER_TABLE,
    workers_name: str = WORKERS_TABLE,
    exact_limit: int = 100_000,
    stale_after: float = DEFAULT_STALE_AFTER,
    only: str | None = None,
    reflect: Callable[[Connection, str], Table] | None = None,
) -> list[QueueSummary]:
    """Every queue of the database (or the one named ``only``) with its counts, cheap on big
    tables (module docstring); ``reflect`` may cache the reflected tables."""
    dead = dead_counts(conn, dead_name)
    in_hand: dict[str, int] = {}
    for worker in workers(conn, workers_name, stale_after=stale_after):
        if not worker.lost:
            for held in worker.in_hand:
                in_hand[held[0]] = in_hand.get(held[0], 0) + 1
    summaries = []
    for name, engine, estimate in _table_rows(conn, dead_name):
        if only is not None and name != only:
            continue
        try:
            table = (reflect or reflect_queue_table)(conn, name)
        except QueueTableError:  # changed since information_schema was read: not a queue
            conn.rollback()
            continue
        native = engine == "QUEUE"
        counting = native or estimate <= exact_limit
        if counting:
            total = int(conn.execute(select(func.count()).select_from(table)).scalar() or 0)
        else:
            total = estimate
        delayed: int | None = 0
        run_at = table.columns.get(RUN_AT)
        if run_at is not None:
            if counting and total <= exact_limit:
                stmt = select(func.count()).select_from(table).where(run_at > int(time.time()))
                delayed = int(conn.execute(stmt).scalar() or 0)
            else:
                delayed = None
        if native:  # the head of the queue: the engine returns rows in queue order
            head = conn.execute(select(table.c[JOB_ID]).limit(1)).scalar()
        else:  # UUIDv7 ids sort by creation time: the first entry of the primary key
            head = conn.execute(select(func.min(table.c[JOB_ID]))).scalar()
        stats: dict[str, Any] = {}
        if native:
            stats = parse_q4m_stats(conn.execute(select(queue_stats(name))).scalar())
        conn.rollback()
        summaries.append(
            QueueSummary(
                table=name,
                backend="native" if native else "portable",
                total=total,
                exact=counting,
                delayed=delayed,
                in_hand=in_hand.get(name, 0),
                dead=dead.get(name, 0),
                oldest_age=None if head is None else job_age(head),
                q4m=stats,
            )
        )
    return summaries


# -- jobs -------------------------------------------------------------------------------------


@dataclass
class JobPage:
    """One page of :func:`list_jobs`: rows as column -> value (the id as text)."""

    table: str
    state: str
    offset: int
    limit: int
    columns: list[str]
    rows: list[dict[str, Any]]
    more: bool


def _row(table: Table, mapping: Any) -> dict[str, Any]:
    row = {c.name: mapping[c.name] for c in table.columns}
    row[JOB_ID] = job_id_text(row[JOB_ID])
    for key, value in row.items():
        if isinstance(value, bytes | bytearray | memoryview):
            row[key] = bytes(value).decode("utf-8", "backslashreplace")
    return row


def list_jobs(
    conn: Connection,
    table: Table,
    *,
    state: str = "all",
    limit: int = 50,
    offset: int = 0,
    held: Sequence[str] = (),
) -> JobPage:
    """A page of the jobs waiting in ``table``: ``all``, ``ready`` (due now), ``delayed``
    (``run_at`` in the future) or ``in_hand`` (the ids in ``held``, from the registry; on
    Q4M other connections cannot read owned rows, so those come from the registry only)."""
    if state not in JOB_STATES:
        raise Q4MError(f"unknown job state {state!r}: use one of {', '.join(JOB_STATES)}")
    limit = max(1, min(int(limit), 500))
    offset = max(0, int(offset))
    stmt = select(table)
    run_at = table.columns.get(RUN_AT)
    now = int(time.time())
    if state in ("ready", "delayed") and run_at is None:
        if state == "delayed":
            stmt = stmt.where(false())
    elif state == "ready":
        assert run_at is not None
        stmt = stmt.where(run_at <= now)
    elif state == "delayed":
        assert run_at is not None
        stmt = stmt.where(run_at > now)
    elif state == "in_hand":
        ids = []
        for job_id in held:
            try:
                ids.append(_id_value(table, job_id))
            except Q4MError:
                continue
        stmt = stmt.where(table.c[JOB_ID].in_(ids))
    if inspect(conn).get_table_options(table.name).get("mysql_engine", "").upper() != "QUEUE":
        stmt = stmt.order_by(table.c[JOB_ID])
    rows = conn.execute(stmt.limit(limit + 1).offset(offset)).mappings().all()
    conn.rollback()
    return JobPage(
        table=table.name,
        state=state,
        offset=offset,
        limit=limit,
        columns=[c.name for c in table.columns],
        rows=[_row(table, r) for r in rows[:limit]],
        more=len(rows) > limit,
    )


def get_job(conn: Connection, table: Table, job_id: str) -> dict[str, Any] | None:
    """One waiting job by id (None when it is not there, or in another worker's hand on Q4M);
    on Q4M a scan (the engine has no index)."""
    row = (
        conn.execute(select(table).where(table.c[JOB_ID] == _id_value(table, job_id)))
        .mappings()
        .first()
    )
    conn.rollback()
    if row is None:
        return None
    result = _row(table, row)
    age = job_age(job_id)
    result["_age"] = age
    result["_attempts"] = row.get(ATTEMPTS)
    result["_run_at"] = row.get(RUN_AT)
    return result


def enqueue_rows(
    conn: Connection,
    table: Table,
    rows: Sequence[dict[str, Any]],
    *,
    delay: float | None = None,
    batch_size: int = 1000,
    labels: Sequence[str] | None = None,
) -> int:
    """Insert ``rows`` (column name -> value) as new jobs with :func:`~sqlalchemy_q4m.enqueue`;
    returns how many.  Every row is checked before the first is sent (a bad one raises
    :class:`~sqlalchemy_q4m.exc.RowError` named by its ``labels`` entry, else ``job N``, and
    nothing is enqueued).  On a connection outside a transaction the rows are committed
    together, then workers that listen are woken; in the caller's transaction nothing is
    committed (nor woken: that is for after the caller's commit).  JSON text for a binary
    column is UTF-8 encoded; with ``delay``, a row's own ``run_at`` is replaced."""

    def where(number: int) -> str:
        return labels[number - 1] if labels is not None else f"job {number}"

    columns = {c.name for c in table.columns}
    binary = {c.name for c in table.columns if isinstance(c.type, _Binary | LargeBinary)}
    if delay is not None and RUN_AT not in columns:
        raise Q4MError(f"--delay needs a {RUN_AT!r} column, which {table.name!r} lacks")
    prepared: list[dict[str, Any]] = []
    for number, row in enumerate(rows, 1):
        values = dict(row)
        for key in binary.intersection(values):
            if isinstance(values[key], str):
                try:
                    values[key] = values[key].encode("utf-8")
                except UnicodeEncodeError as err:
                    raise RowError(
                        f"{key!r} takes valid Unicode, not a string with {err.reason}",
                        row=number,
                        column=key,
                        where=where(number),
                    ) from None
        if delay is not None:
            values.pop(RUN_AT, None)
        prepared.append(values)
    own = not conn.in_transaction()
    try:
        enqueue(conn, table, prepared, delay=delay, chunk_size=batch_size, notify=False)
    except RowError as err:  # raised before anything was sent
        if own:
            conn.rollback()
        raise RowError(err.reason, row=err.row, column=err.column, where=where(err.row)) from None
    if own:
        conn.commit()
        if delay is None and prepared:
            notify_committed(conn, table, jobs=len(prepared))  # wakes workers with --listen
    return len(prepared)


# -- dead letters -----------------------------------------------------------------------------


def _dead_exists(conn: Connection, dead: Table) -> bool:
    return bool(inspect(conn).has_table(dead.name))


def dead_counts(conn: Connection, dead_name: str = DEAD_LETTER_TABLE) -> dict[str, int]:
    """Dead letters per queue (one GROUP BY over the dead-letter table)."""
    dead = dead_letter_table(dead_name)
    if not _dead_exists(conn, dead):
        return {}
    rows = conn.execute(select(dead.c.queue, func.count()).group_by(dead.c.queue)).all()
    conn.rollback()
    return {str(queue): int(count) for queue, count in rows}


def dead_letters(
    conn: Connection,
    dead_name: str = DEAD_LETTER_TABLE,
    queue: str | None = None,
    *,
    limit: int = 50,
    offset: int = 0,
) -> list[DeadLetter]:
    """A page of dead letters, oldest first, of one queue or of all."""
    dead = dead_letter_table(dead_name)
    if not _dead_exists(conn, dead):
        return []
    stmt = select(dead).order_by(dead.c.id).limit(max(1, min(limit, 500))).offset(max(0, offset))
    if queue is not None:
        stmt = stmt.where(dead.c.queue == queue)
    letters = [DeadLetter(**row._asdict()) for row in conn.execute(stmt)]
    conn.rollback()
    return letters


def dead_letter(
    conn: Connection, letter_id: int, dead_name: str = DEAD_LETTER_TABLE
) -> DeadLetter | None:
    """One dead letter by its id."""
    dead = dead_letter_table(dead_name)
    if not _dead_exists(conn, dead):
        return None
    row = conn.execute(select(dead).where(dead.c.id == int(letter_id))).first()
    conn.rollback()
    return None if row is None else DeadLetter(**row._asdict())


def retry_dead_letters(
    conn: Connection,
    queue: str,
    ids: Sequence[int] | None = None,
    dead_name: str = DEAD_LETTER_TABLE,
) -> int:
    """Put dead letters of ``queue`` (all, or ``ids``) back into it; returns how many."""
    name = check_queue_name(conn, queue, dead_name)
    table = reflect_queue_table(conn, name)
    return retry_dead(conn, dead_letter_table(dead_name), table, ids)


def purge_dead_letters(
    conn: Connection,
    queue: str,
    ids: Sequence[int] | None = None,
    dead_name: str = DEAD_LETTER_TABLE,
) -> int:
    """Delete dead letters of ``queue`` (all, or ``ids``); returns how many."""
    return purge_dead(conn, dead_letter_table(dead_name), queue, ids)


# -- workers and throughput -------------------------------------------------------------------


@dataclass
class WorkerInfo:
    """One row of the worker registry; ``lost`` when its heartbeat is stale."""

    id: str
    host: str
    pid: int
    name: str
    kind: str
    concurrency: int
    processes: int
    queues: list[str]
    started_at: dt.datetime
    heartbeat_at: dt.datetime
    heartbeat_age: float
    counts: dict[str, int]
    in_hand: list[tuple[str, str, float]]  # (table, job id, since: Unix time)
    lost: bool


def workers(
    conn: Connection,
    workers_name: str = WORKERS_TABLE,
    *,
    stale_after: float = DEFAULT_STALE_AFTER,
) -> list[WorkerInfo]:
    """The registered workers, alive first; those silent for ``stale_after`` s are lost."""
    table = worker_registry_table(workers_name)
    if not inspect(conn).has_table(table.name):
        return []
    age = func.timestampdiff(text("SECOND"), table.c.heartbeat_at, func.utc_timestamp())
    rows = conn.execute(select(table, age.label("age")).order_by(table.c.started_at)).all()
    conn.rollback()
    found = []
    for row in rows:
        m = row._mapping
        try:
            held = [(str(t), str(i), float(s)) for t, i, s in json.loads(m["in_hand"] or "[]")]
            queues = [str(q) for q in json.loads(m["queues"] or "[]")]
        except (ValueError, TypeError):
            held, queues = [], []
        found.append(
            WorkerInfo(
                id=m["id"],
                host=m["host"],
                pid=int(m["pid"]),
                name=m["name"],
                kind=m["kind"],
                concurrency=int(m["concurrency"]),
                processes=int(m["processes"]),
                queues=queues,
                started_at=m["started_at"],
                heartbeat_at=m["heartbeat_at"],
                heartbeat_age=float(m["age"] or 0),
                counts={c: int(m[c]) for c in COUNTERS},
                in_hand=held,
                lost=float(m["age"] or 0) > stale_after,
            )
        )
    found.sort(key=lambda w: w.lost)
    return found


def prune_lost_workers(
    conn: Connection, workers_name: str = WORKERS_TABLE, *, older_than: float = 3600.0
) -> int:
    """Delete the rows of workers silent for more than ``older_than`` seconds."""
    table = worker_registry_table(workers_name)
    if not inspect(conn).has_table(table.name):
        return 0
    age = func.timestampdiff(text("SECOND"), table.c.heartbeat_at, func.utc_timestamp())
    result = conn.execute(delete(table).where(age > int(older_than)))
    conn.commit()
    return int(result.rowcount)


def throughput(
    conn: Connection,
    throughput_name: str = THROUGHPUT_TABLE,
    *,
    minutes: int = 60,
    queue: str | None = None,
) -> list[tuple[dt.datetime, int, int]]:
    """(minute, done, failed) for each of the last ``minutes`` minutes (zeros filled in)."""
    table = throughput_table(throughput_name)
    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None, second=0, microsecond=0)
    start = now - dt.timedelta(minutes=minutes - 1)
    found: dict[dt.datetime, tuple[int, int]] = {}
    if inspect(conn).has_table(table.name):
        stmt = (
            select(table.c.minute, func.sum(table.c.done), func.sum(table.c.failed))
            .where(table.c.minute >= start)
            .group_by(table.c.minute)
        )
        if queue is not None:
            stmt = stmt.where(table.c.queue == queue)
        found = {m: (int(d or 0), int(f or 0)) for m, d, f in conn.execute(stmt)}
        conn.rollback()
    series = []
    for i in range(minutes):
        minute = start + dt.timedelta(minutes=i)
        done, failed = found.get(minute, (0, 0))
        series.append((minute, done, failed))
    return series
