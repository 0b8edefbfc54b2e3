"""The registry of running workers: one InnoDB row per worker process, kept fresh by a heartbeat.

Each worker process (sync threads or asyncio tasks, alone or under a supervisor) inserts a row
into ``q4m_workers`` when it starts: host, pid, layout, queues, start time.  A heartbeat thread
updates the row every few seconds with one statement (per process, not per thread): the
counters (done, failed, retried, dead, lost) and the jobs in hand (table, id, since when).  A
clean stop deletes the row; a row whose heartbeat is older than ``stale_after`` belongs to a
worker that died without saying so: it is shown as *lost*, and pruned after an hour (by the
next worker that starts, or ``q4m workers``).

Finished jobs are also added up per queue and per minute in ``q4m_throughput`` (one more
statement per process after each minute in which it finished jobs), so the dashboard can draw
the last hour even after workers stop; a week of minutes is kept.  Both tables are created
like the dead-letter table (``CREATE TABLE IF NOT EXISTS`` on first use); pass your
``MetaData`` to :func:`worker_registry_table` and :func:`throughput_table` to have Alembic's
autogenerate create them in a migration instead.
A registry that cannot write (no privilege, server gone) logs and lets the worker work.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field
from typing import Any

from sqlalchemy import BigInteger
from sqlalchemy import Column
from sqlalchemy import Connection
from sqlalchemy import DateTime
from sqlalchemy import Engine
from sqlalchemy import Integer
from sqlalchemy import MetaData
from sqlalchemy import String
from sqlalchemy import Table
from sqlalchemy import delete
from sqlalchemy import func
from sqlalchemy import insert
from sqlalchemy import text
from sqlalchemy import update
from sqlalchemy.dialects.mysql import insert as mysql_insert
from sqlalchemy.schema import CreateTable
from sqlalchemy.types import Text

from ..schema.ddl import validate_name

__all__ = [
    "DEFAULT_HEARTBEAT",
    "DEFAULT_STALE_AFTER",
    "THROUGHPUT_TABLE",
    "WORKERS_TABLE",
    "Heartbeat",
    "Holding",
    "ensure_registry_tables",
    "throughput_table",
    "utcnow",
    "worker_registry_table",
]

logger = logging.getLogger("sqlalchemy_q4m.registry")

WORKERS_TABLE = "q4m_workers"
THROUGHPUT_TABLE = "q4m_throughput"
#: Seconds between two heartbeats of a worker process.
DEFAULT_HEARTBEAT = 5.0
#: A worker whose last heartbeat is older than this many seconds is lost.
DEFAULT_STALE_AFTER = 30.0
#: Rows silent for this many seconds are deleted when a worker starts (and by q4m workers).
PRUNE_AFTER = 3600
#: Days of per-minute throughput kept (older minutes are deleted when a worker starts).
KEEP_THROUGHPUT_DAYS = 7
#: Counters a worker reports (the worker's outcomes; "failed" = retried + dead).
COUNTERS = ("done", "failed", "retried", "dead", "aborted", "lost")


def _innodb(name: str, metadata: MetaData | None, *columns: Column[Any]) -> Table:
    validate_name(name)
    return Table(
        name,
        metadata if metadata is not None else MetaData(),
        *columns,
        mysql_engine="InnoDB",
        mariadb_engine="InnoDB",
        mysql_charset="utf8mb4",
        mariadb_charset="utf8mb4",
    )


def worker_registry_table(name: str = WORKERS_TABLE, metadata: MetaData | None = None) -> Table:
    """The registry of running workers (InnoDB, one row per worker process)."""
    return _innodb(
        name,
        metadata,
        Column("id", String(36), primary_key=True),
        Column("host", String(255), nullable=False),
        Column("pid", Integer, nullable=False),
        Column("name", String(64), nullable=False),
        Column("kind", String(16), nullable=False),  # "threads" or "asyncio"
        Column("concurrency", Integer, nullable=False),
        Column("processes", Integer, nullable=False),
        Column("queues", Text, nullable=False),  # JSON list of table names
        Column("started_at", DateTime, nullable=False),
        Column("heartbeat_at", DateTime, nullable=False),
        *(Column(c, BigInteger, nullable=False, server_default="0") for c in COUNTERS),
        Column("in_hand", Text, nullable=False),  # JSON [[table, id, since], ...]
    )


def throughput_table(name: str = THROUGHPUT_TABLE, metadata: MetaData | None = None) -> Table:
    """Finished jobs per queue and per minute (InnoDB, added up by every worker process)."""
    return _innodb(
        name,
        metadata,
        Column("minute", DateTime, primary_key=True),
        Column("queue", String(64), primary_key=True),
        *(Column(c, BigInteger, nullable=False, server_default="0") for c in COUNTERS),
    )


def ensure_registry_tables(conn: Connection, *tables: Table) -> None:
    """``CREATE TABLE IF NOT EXISTS`` for each (safe when many workers start at once)."""
    began = not conn.in_transaction()
    for table in tables:
        conn.execute(CreateTable(table, if_not_exists=True))
    if began:
        conn.commit()


def utcnow() -> dt.datetime:
    """Now in UTC, naive, to the second (what the DATETIME columns hold)."""
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None, microsecond=0)


@dataclass(frozen=True)
class Holding:
    """A job in hand: its table, its id, since when (Unix time)."""

    table: str
    job_id: str
    since: float


@dataclass
class _Tally:
    """What the process did, in total and per (minute, queue) not yet written."""

    totals: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))
    pending: dict[tuple[dt.datetime, str], dict[str, int]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, outcome: str, table: str | None) -> None:
        keys = [outcome] + (["failed"] if outcome in ("retried", "dead") else [])
        minute = utcnow().replace(second=0)
        with self.lock:
            for key in keys:
                if key in self.totals:
                    self.totals[key] += 1
            if table is not None:
                bucket = self.pending.setdefault((minute, table), dict.fromkeys(COUNTERS, 0))
                for key in keys:
                    if key in bucket:
                        bucket[key] += 1

    def finished_minutes(self) -> bool:
        """Whether a minute that has ended waits to be written."""
        current = utcnow().replace(second=0)
        with self.lock:
            return any(minute < current for minute, _ in self.pending)

    def take(self, *, all_minutes: bool) -> dict[tuple[dt.datetime, str], dict[str, int]]:
        """The buckets to write: the finished minutes, or all of them (at the end)."""
        current = utcnow().replace(second=0)
        with self.lock:
            taken = {k: v for k, v in self.pending.items() if all_minutes or k[0] < current}
            for key in taken:
                del self.pending[key]
        return taken


class Heartbeat:
    """Registers this worker process and keeps its row fresh from a daemon thread.

    ``in_hand`` is called on each beat and returns the jobs in hand; :meth:`observe` is the
    hook the consumers' :class:`~sqlalchemy_q4m.worker.stats.Stats` call after each job.  Every
    database error is logged and swallowed: the registry never stops a worker.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        name: str,
        kind: str,
        concurrency: int,
        processes: int,
        queues: Callable[[], Sequence[str]],
        in_hand: Callable[[], Sequence[Holding]],
        interval: float = DEFAULT_HEARTBEAT,
        table: str = WORKERS_TABLE,
        throughput: str = THROUGHPUT_TABLE,
    ) -> None:
        self.engine = engine
        self.id = str(uuid.uuid4())
        self.name = name
        self.kind = kind
        self.concurrency = concurrency
        self.processes = processes
        self.queues = queues
        self.in_hand = in_hand
        self.interval = interval
        self.table = worker_registry_table(table)
        self.throughput = throughput_table(throughput)
        self.tally = _Tally()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.registered = False
        self._failing = False

    def observe(self, outcome: str, table: str | None, seconds: float | None) -> None:
        """Count one job's outcome (called from any worker thread)."""
        self.tally.add(outcome, table)

    def _jobs(self) -> str:
        try:
            held = [[h.table, h.job_id, h.since] for h in self.in_hand()]
        except Exception:  # a consumer changing under us: report none this time
            held = []
        return json.dumps(held)

    def _run(self, work: Callable[[Connection], None], what: str) -> bool:
        try:
            with self.engine.connect() as conn:
                work(conn)
                conn.commit()
            self._failing = False
            return True
        except Exception as err:
            # said once (then at DEBUG until it works again): a registry it cannot write to
            # (no privilege, server away) must not fill the worker's log every few seconds
            level = logging.DEBUG if self._failing else logging.WARNING
            self._failing = True
            logger.log(level, "worker registry: %s failed: %s", what, err)
            return False

    def register(self) -> None:
        """Insert the row (creating the tables if needed)."""

        def work(conn: Connection) -> None:
            ensure_registry_tables(conn, self.table, self.throughput)
            stale = func.timestampdiff(
                text("SECOND"), self.table.c.heartbeat_at, func.utc_timestamp()
            )
            conn.execute(delete(self.table).where(stale > PRUNE_AFTER))  # long-lost workers
            keep = func.utc_timestamp() - text(f"INTERVAL {KEEP_THROUGHPUT_DAYS} DAY")
            conn.execute(delete(self.throughput).where(self.throughput.c.minute < keep))
            conn.execute(
                insert(self.table).values(
                    id=self.id,
                    host=socket.gethostname()[:255],
                    pid=os.getpid(),
                    name=self.name[:64],
                    kind=self.kind,
                    concurrency=self.concurrency,
                    processes=self.processes,
                    queues=json.dumps(list(self.queues())),
                    started_at=func.utc_timestamp(),
                    heartbeat_at=func.utc_timestamp(),
                    in_hand="[]",
                )
            )

        self.registered = self._run(work, "registering")

    def beat(self) -> None:
        """One heartbeat: one UPDATE (and, once a minute, one upsert of finished minutes)."""
        with self.tally.lock:
            totals = dict(self.tally.totals)
        values: dict[str, Any] = {
            "heartbeat_at": func.utc_timestamp(),
            "in_hand": self._jobs(),
            **totals,
        }

        def work(conn: Connection) -> None:
            conn.execute(update(self.table).where(self.table.c.id == self.id).values(values))

        self._run(work, "heartbeat")
        if self.tally.finished_minutes():
            self.flush(all_minutes=False)

    def flush(self, *, all_minutes: bool) -> None:
        """Add the counted minutes to the throughput table (one statement)."""
        buckets = self.tally.take(all_minutes=all_minutes)
        if not buckets:
            return
        rows = [{"minute": m, "queue": q[:64], **counts} for (m, q), counts in buckets.items()]
        stmt = mysql_insert(self.throughput).values(rows)
        stmt = stmt.on_duplicate_key_update(
            {c: self.throughput.c[c] + stmt.inserted[c] for c in COUNTERS}
        )

        def work(conn: Connection) -> None:
            conn.execute(stmt)

        if not self._run(work, "throughput"):
            with self.tally.lock:  # kept for the next try
                for key, counts in buckets.items():
                    bucket = self.tally.pending.setdefault(key, dict.fromkeys(COUNTERS, 0))
                    for c, n in counts.items():
                        bucket[c] += n

    def start(self) -> Heartbeat:
        """Register (once the queues are known), then beat every ``interval`` seconds, from a
        daemon thread."""
        self._thread = threading.Thread(target=self._loop, name="q4m-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        for _ in range(50):  # the consumers are being made: their queues name the worker
            if self._stop.is_set() or self.queues():
                break
            self._stop.wait(0.1)
        if not self._stop.is_set():
            self.register()
        while not self._stop.wait(self.interval):
            if not self.registered:
                self.register()
            else:
                self.beat()

    def stop(self) -> None:
        """A clean stop: write the last counts and delete the row."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.flush(all_minutes=True)

        def work(conn: Connection) -> None:
            conn.execute(delete(self.table).where(self.table.c.id == self.id))

        if self.registered:
            self._run(work, "unregistering")
