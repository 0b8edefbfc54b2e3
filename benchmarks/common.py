"""What every scenario shares: the queue table, raw connections, filling, parallel runs."""

from __future__ import annotations

import argparse
import gc
import multiprocessing
import os
import queue
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pymysql
from sqlalchemy import Column
from sqlalchemy import Double
from sqlalchemy import Engine
from sqlalchemy import MetaData
from sqlalchemy import String
from sqlalchemy import create_engine
from sqlalchemy import make_url
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.orm import Mapped
from sqlalchemy.orm import mapped_column
from sqlalchemy.pool import NullPool

from sqlalchemy_q4m import QueueMixin
from sqlalchemy_q4m import RetryMixin
from sqlalchemy_q4m import detect_backend
from sqlalchemy_q4m import new_job_id
from sqlalchemy_q4m import queue_table
from sqlalchemy_q4m import use_backend

#: The table every scenario uses (in the benchmark's own database).
TABLE = "q4m_bench_jobs"

#: The claim/complete SQL of the raw baseline: what the portable backend issues.
RAW_CLAIM = (
    f"SELECT id, payload, enqueued_at FROM {TABLE} ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED"
)
RAW_DELETE_ONE = f"DELETE FROM {TABLE} WHERE id = %s"
RAW_INSERT = f"INSERT INTO {TABLE} (id, payload, enqueued_at) VALUES (%s, %s, %s)"
READ_COMMITTED = "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED"

#: The raw native baseline (Q4M, autocommit on): own a row, read it as its owner, end it.
RAW_WAIT = f"SELECT queue_wait('{TABLE}', 0)"
RAW_OWNED = f"SELECT id, payload, enqueued_at FROM {TABLE}"
RAW_END = "SELECT queue_end()"

#: The table of the retry rows: ``RetryMixin`` (``attempts``, ``run_at``), so the worker waits
#: with the condition ``run_at <= now``, and its raw baseline claims with the same one.
RETRY_TABLE = "q4m_bench_retry_jobs"
_RETRY_COLUMNS = "id, payload, enqueued_at, attempts, run_at"
RAW_RETRY_CLAIM = (
    f"SELECT {_RETRY_COLUMNS} FROM {RETRY_TABLE} WHERE run_at <= %s "
    "ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED"
)
RAW_RETRY_DELETE_ONE = f"DELETE FROM {RETRY_TABLE} WHERE id = %s"
RAW_RETRY_WAIT = f"SELECT queue_wait('{RETRY_TABLE}:run_at<=%d', 0)"  # % the epoch second
RAW_RETRY_OWNED = f"SELECT {_RETRY_COLUMNS} FROM {RETRY_TABLE}"


class Base(DeclarativeBase):
    pass


class BenchJob(QueueMixin, Base):
    """A no-op job: a short payload and the moment it was enqueued (for pickup latency)."""

    __tablename__ = TABLE
    payload: Mapped[str] = mapped_column(String(64))
    enqueued_at: Mapped[float] = mapped_column(Double, default=0.0)


class RetryBenchJob(RetryMixin, QueueMixin, Base):
    """The no-op job on a table with retries and delays: what the README's worker with
    ``RetryMixin`` consumes (its waits carry the condition ``run_at <= now``)."""

    __tablename__ = RETRY_TABLE
    payload: Mapped[str] = mapped_column(String(64))
    enqueued_at: Mapped[float] = mapped_column(Double, default=0.0)


#: The same table as a Core ``Table`` (``queue_session`` then yields Rows, not instances).
core_jobs = queue_table(
    TABLE, MetaData(), Column("payload", String(64)), Column("enqueued_at", Double)
)


def connect_kwargs(url: URL) -> dict[str, Any]:
    """PyMySQL keyword arguments for ``url``, as SQLAlchemy's dialect makes them."""
    engine = create_engine(url)
    try:
        args, kwargs = engine.dialect.create_connect_args(url)
    finally:
        engine.dispose()
    assert not args
    return dict(kwargs)


def raw_connect(url: URL, cls: type[pymysql.connections.Connection] | None = None) -> Any:
    """A raw PyMySQL connection in READ COMMITTED, as the portable backend uses."""
    conn = (cls or pymysql.connections.Connection)(**connect_kwargs(url))
    with conn.cursor() as cur:
        cur.execute(READ_COMMITTED)
    conn.commit()
    return conn


def raw_native_connect(url: URL) -> Any:
    """A raw PyMySQL connection with autocommit on, as a raw Q4M user runs it (Q4M has no
    transactions: there is nothing to commit)."""
    kwargs = connect_kwargs(url)
    kwargs["autocommit"] = True
    return pymysql.connections.Connection(**kwargs)


def server_backend(url: URL) -> str:
    """``native`` when the server has the Q4M engine (``ENGINE=QUEUE``), else ``portable``:
    what ``queue_session`` would detect, asked once for the whole benchmark."""
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            return detect_backend(conn)
    finally:
        engine.dispose()


def default_url() -> str:
    """The server the measuring tools use unless ``--url`` says: ``Q4M_BENCH_URL``, else the
    local MariaDB."""
    return os.environ.get("Q4M_BENCH_URL", "mysql+pymysql://root@127.0.0.1:3306")


def bench_parser(prog: str, doc: str | None, jobs: int) -> argparse.ArgumentParser:
    """The options every measuring tool shares: ``--url`` (``Q4M_BENCH_URL``), ``--jobs``
    (default ``jobs``) and ``--repeats``."""
    parser = argparse.ArgumentParser(prog=prog, description=doc)
    parser.add_argument("--url", default=default_url())
    parser.add_argument("--jobs", type=int, default=jobs)
    parser.add_argument("--repeats", type=int, default=3)
    return parser


@contextmanager
def bench_database(server_url: str) -> Iterator[tuple[URL, bool]]:
    """A database of its own on the server of ``server_url`` (its database name ignored),
    holding the benchmark's queue tables made for the server's backend, dropped at the end:
    its URL, and whether the server is Q4M's (the native backend)."""
    server = make_url(server_url)._replace(database=None)  # .set(database=None) keeps it
    url = server.set(database=f"q4m_bench_{uuid.uuid4().hex[:10]}")
    admin = create_engine(server, poolclass=NullPool)
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE `{url.database}`"))
    try:
        native = server_backend(url) == "native"
        engine = create_engine(url, poolclass=NullPool)
        use_backend(engine, "native" if native else "portable")
        Base.metadata.create_all(engine)
        engine.dispose()
        yield url, native
    finally:
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS `{url.database}`"))
        admin.dispose()


def library_engine(url: URL, pool: int = 1, **kw: Any) -> Engine:
    """The engine a library user would make (pool sized for ``pool`` workers)."""
    return create_engine(url, pool_size=pool, max_overflow=pool, **kw)


def fill(url: URL, count: int, table: str = TABLE) -> None:
    """Empty the queue ``table``, then enqueue ``count`` jobs with the fast raw path (due at
    once: ``run_at`` is 0 on the retry table)."""
    insert = RAW_INSERT.replace(TABLE, table, 1)
    conn = raw_connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute(f"DELETE FROM {table}")
            rows = [(new_job_id().bytes, f"job {i}", 0.0) for i in range(count)]
            for start in range(0, count, 5000):
                cur.executemany(insert, rows[start : start + 5000])
        conn.commit()
    finally:
        conn.close()


def remaining(url: URL, table: str = TABLE) -> int:
    conn = raw_connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute(f"SELECT COUNT(*) FROM {table}")
            (n,) = cur.fetchone()
        conn.rollback()
        return int(n)
    finally:
        conn.close()


class CountingConnection(pymysql.connections.Connection):  # type: ignore[misc]
    """A PyMySQL connection counting every command it sends (queries, COMMIT, ROLLBACK, ping):
    the statements an idle worker costs the server, counted at the client."""

    commands = 0
    _lock = threading.Lock()

    def _execute_command(self, command: int, sql: Any) -> Any:
        with CountingConnection._lock:
            CountingConnection.commands += 1
        return super()._execute_command(command, sql)


def counting_engine(url: URL) -> Engine:
    kwargs = connect_kwargs(url)
    return create_engine(url, creator=lambda: CountingConnection(**kwargs), pool_size=2)


def fork_context() -> Any:
    """The ``fork`` multiprocessing context, after collecting this process's garbage: a
    connection left unreferenced by an earlier scenario must be closed here, not finalized
    in a child, which would talk to the server over the parent's socket."""
    gc.collect()
    gc.freeze()
    return multiprocessing.get_context("fork")


@dataclass
class Run:
    """One measured run: jobs handled and the seconds from the start signal to the last end."""

    jobs: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.jobs / self.seconds if self.seconds > 0 else 0.0


Factory = Callable[..., Any]  # () -> object with .consume() -> int and .close()


def _entry(factory: Factory, args: tuple[Any, ...], go: Any, out: Any) -> None:
    try:
        worker = factory(*args)
        out.put(("ready", 0, 0.0, ""))
        go.wait()
        count = worker.consume()
        out.put(("done", count, time.monotonic(), ""))
        worker.close()
    except BaseException:
        out.put(("error", 0, 0.0, traceback.format_exc()))


def run_parallel(kind: str, workers: int, factory: Factory, *args: Any) -> Run:
    """Start ``workers`` threads or processes, wait until every one is connected, then start
    them together; the run lasts until the last one finds the queue empty."""
    go: Any
    out: Any
    if kind == "thread":
        go, out = threading.Event(), queue.Queue()
        runners: list[Any] = [
            threading.Thread(target=_entry, args=(factory, args, go, out), daemon=True)
            for _ in range(workers)
        ]
    else:
        ctx = fork_context()
        go, out = ctx.Event(), ctx.Queue()
        runners = [
            ctx.Process(target=_entry, args=(factory, args, go, out), daemon=True)
            for _ in range(workers)
        ]
    for runner in runners:
        runner.start()
    try:
        messages = [out.get(timeout=120) for _ in range(workers)]
        errors = [m[3] for m in messages if m[0] == "error"]
        if errors:
            go.set()
            raise RuntimeError("a benchmark worker failed to start:\n" + errors[0])
        start = time.monotonic()
        go.set()
        done = [out.get(timeout=600) for _ in range(workers)]
    finally:
        go.set()
        for runner in runners:
            runner.join(timeout=60)
    errors = [m[3] for m in done if m[0] == "error"]
    if errors:
        raise RuntimeError("a benchmark worker failed:\n" + errors[0])
    return Run(sum(m[1] for m in done), max(m[2] for m in done) - start)
