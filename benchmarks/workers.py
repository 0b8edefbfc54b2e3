"""The consumers being compared: the library's and the raw-PyMySQL loops issuing the same SQL.

Each class connects in ``__init__`` (before the start signal), drains the queue in
``consume()`` (stops when a claim finds nothing) and returns how many jobs it finished.
"""

from __future__ import annotations

import importlib
import time
from typing import Any

import pymysql
from sqlalchemy import Engine
from sqlalchemy.engine import URL
from sqlalchemy.orm import Session

from sqlalchemy_q4m import QueueAbort
from sqlalchemy_q4m import queue_batch
from sqlalchemy_q4m import queue_consumer
from sqlalchemy_q4m import queue_session
from sqlalchemy_q4m.exc import CompletionFailed

from .common import RAW_CLAIM
from .common import RAW_DELETE_ONE
from .common import RAW_END
from .common import RAW_OWNED
from .common import RAW_RETRY_CLAIM
from .common import RAW_RETRY_DELETE_ONE
from .common import RAW_RETRY_OWNED
from .common import RAW_RETRY_WAIT
from .common import RAW_WAIT
from .common import RETRY_TABLE
from .common import TABLE
from .common import BenchJob
from .common import RetryBenchJob
from .common import core_jobs
from .common import library_engine
from .common import raw_connect
from .common import raw_native_connect

#: MariaDB's ER_LOCK_DEADLOCK: the raw loops give the job back, as the library does.
DEADLOCK = 1213


class RawLoop:
    """``SELECT ... LIMIT 1 FOR UPDATE SKIP LOCKED`` → no-op → ``DELETE`` → ``COMMIT``."""

    table = TABLE
    timed = False  # the claim's condition: run_at <= the current epoch second
    claim, delete = RAW_CLAIM, RAW_DELETE_ONE

    def __init__(self, url: URL, engine: Engine | None = None) -> None:
        self.conn = raw_connect(url)

    def consume(self) -> int:
        conn, done, timed, claim, delete = self.conn, 0, self.timed, self.claim, self.delete
        with conn.cursor() as cur:
            while True:
                cur.execute(claim, (int(time.time()), 1) if timed else (1,))
                row = cur.fetchone()
                if row is None:
                    conn.rollback()
                    return done
                try:
                    cur.execute(delete, (row[0],))
                except pymysql.err.OperationalError as err:
                    if err.args[0] != DEADLOCK:
                        raise
                    conn.rollback()  # the job returns, as with queue_session
                    continue
                conn.commit()
                done += 1

    def close(self) -> None:
        self.conn.close()


class RawNativeLoop:
    """Q4M as a raw PyMySQL user runs it, autocommit on: ``SELECT queue_wait('t', 0)`` → the
    owner's ``SELECT`` (it sees only its row) → no-op → ``SELECT queue_end()``; after a 0
    (nothing left) ``queue_end()`` leaves owner mode, as the library does."""

    table = TABLE
    timed = False  # the wait's condition: run_at <= the current epoch second
    wait, owned = RAW_WAIT, RAW_OWNED

    def __init__(self, url: URL, engine: Engine | None = None) -> None:
        self.conn = raw_native_connect(url)

    def consume(self) -> int:
        done, timed, wait, owned = 0, self.timed, self.wait, self.owned
        with self.conn.cursor() as cur:
            while True:
                cur.execute(wait % int(time.time()) if timed else wait)
                (index,) = cur.fetchone()
                if index is None:
                    raise RuntimeError(f"{wait} returned NULL: not a QUEUE table?")
                if not index:
                    cur.execute(RAW_END)
                    return done
                cur.execute(owned)
                cur.fetchone()
                cur.execute(RAW_END)
                done += 1

    def close(self) -> None:
        self.conn.close()


class RawRetryLoop(RawLoop):
    """:class:`RawLoop` on the retry table, claiming with ``run_at <= now`` as the worker does."""

    table, timed = RETRY_TABLE, True
    claim, delete = RAW_RETRY_CLAIM, RAW_RETRY_DELETE_ONE


class RawNativeRetryLoop(RawNativeLoop):
    """:class:`RawNativeLoop` on the retry table, waiting with ``run_at<=now`` as the worker
    does (the condition written for each wait, with the current second)."""

    table, timed = RETRY_TABLE, True
    wait, owned = RAW_RETRY_WAIT, RAW_RETRY_OWNED


class RawNativeBatchLoop(RawNativeLoop):
    """The raw counterpart of ``queue_batch`` on Q4M, where a connection owns one row at a
    time and a batch holds one job: the raw one-job loop, with a batch size it ignores."""

    def __init__(self, url: URL, size: int) -> None:
        super().__init__(url)


def warm_up(engine: Engine, target: Any) -> None:
    """Before the start signal, what a long-running consumer has done once and for all: the
    backend detected and the claim and completion statements compiled for this engine (one
    job claimed and given back).  The raw loops' counterpart is connecting."""
    with engine.connect() as conn, queue_session(target, bind=conn, timeout=0) as job:
        if job is not None:
            raise QueueAbort  # the job goes back to the queue


class SessionLoop:
    """``with queue_session(BenchJob, bind=connection, timeout=0) as job`` per job, on one
    connection kept by the worker (as a worker thread does)."""

    target: Any = BenchJob

    def __init__(self, url: URL, engine: Engine | None = None) -> None:
        self.engine = engine or library_engine(url)
        self.own_engine = engine is None
        self.conn = self.engine.connect().execution_options(isolation_level="READ COMMITTED")
        self.bind: Any = self.conn
        warm_up(self.engine, self.target)

    def consume(self) -> int:
        done = 0
        while True:
            try:
                with queue_session(self.target, bind=self.bind, timeout=0) as job:
                    if job is None:
                        return done
            except CompletionFailed:  # a deadlock victim: the job returns and runs again
                continue
            done += 1

    def close(self) -> None:
        self.conn.close()
        if self.own_engine:
            self.engine.dispose()


class CoreSessionLoop(SessionLoop):
    """``queue_session`` on the Core ``Table`` of the same queue: Rows instead of instances."""

    target = core_jobs


class EngineSessionLoop(SessionLoop):
    """``with queue_session(BenchJob, bind=engine, timeout=0) as job``: a pooled connection
    checked out per job (the README's one-liner)."""

    def __init__(self, url: URL, engine: Engine | None = None) -> None:
        self.engine = engine or library_engine(url)
        self.own_engine = engine is None
        self.bind = self.engine
        warm_up(self.engine, BenchJob)  # and the pool holds a connection

    def close(self) -> None:
        if self.own_engine:
            self.engine.dispose()


class ConsumerLoop:
    """``with queue_consumer(BenchJob, bind=engine, timeout=0) as consumer``, then ``with
    consumer.take() as job`` per job: the queue session's set-up done once, on one consumer
    connection of the engine held until the consumer closes."""

    def __init__(self, url: URL, engine: Engine | None = None) -> None:
        self.engine = engine or library_engine(url)
        self.own_engine = engine is None
        warm_up(self.engine, BenchJob)
        self.consumer = queue_consumer(BenchJob, bind=self.engine, timeout=0)

    def consume(self) -> int:
        done = 0
        take = self.consumer.take
        while True:
            try:
                with take() as job:
                    if job is None:
                        return done
            except CompletionFailed:  # a deadlock victim: the job returns and runs again
                continue
            done += 1

    def close(self) -> None:
        self.consumer.close()
        if self.own_engine:
            self.engine.dispose()


class OrmSessionLoop(SessionLoop):
    """``with queue_session(BenchJob, bind=session, timeout=0) as job`` on one ORM
    ``Session(engine)`` kept by the consumer: the job's removal commits with the session's
    writes (portable); on Q4M the job is owned on a pinned connection beside it."""

    def __init__(self, url: URL, engine: Engine | None = None) -> None:
        self.engine = engine or library_engine(url)
        self.own_engine = engine is None
        warm_up(self.engine, BenchJob)
        self.session = self.bind = Session(self.engine)

    def close(self) -> None:
        self.session.close()
        if self.own_engine:
            self.engine.dispose()


def worker_runtime_available() -> bool:
    """True once the worker runtime (issue 3) is in the package with the documented API."""
    try:
        module = importlib.import_module("sqlalchemy_q4m.worker")
    except ImportError:
        return False
    job = getattr(module, "Job", None)
    return job is not None and hasattr(job, "run_once")


class RuntimeLoop:
    """The worker runtime's job class (``Job.run_once``) with a no-op ``execute``."""

    table = TABLE
    model: Any = BenchJob
    attempts = 1  # the table has no retry columns (and a no-op never fails)

    def __init__(self, url: URL, engine: Engine | None = None) -> None:
        job_class: Any = importlib.import_module("sqlalchemy_q4m.worker").Job

        class NoOpJob(job_class):  # type: ignore[misc]
            model = self.model
            max_attempts = self.attempts

            def execute(self, job: Any) -> None:
                return None

        self.engine = engine or library_engine(url)
        self.own_engine = engine is None
        self.job = NoOpJob(self.engine)
        warm_up(self.engine, self.model)
        # connected and prepared, as SessionLoop is (a private step: skipped if it moves)
        consumer = getattr(self.job, "_get_consumer", None)
        if consumer is not None:
            consumer().connect()

    def consume(self) -> int:
        done = 0
        while self.job.run_once(timeout=0):
            done += 1
        return done

    def close(self) -> None:
        if self.own_engine:
            self.engine.dispose()


class RetryRuntimeLoop(RuntimeLoop):
    """:class:`RuntimeLoop` on the retry table (``RetryMixin``): each wait has the condition
    ``run_at <= now``, rebuilt once a second."""

    table = RETRY_TABLE
    model = RetryBenchJob
    attempts = 3


class BatchRuntimeLoop:
    """The worker runtime with ``batch_size = n`` (``queue_batch`` under the job class, a
    savepoint per job) and a no-op ``execute``; counts only committed jobs."""

    def __init__(self, url: URL, size: int) -> None:
        from sqlalchemy_q4m.worker import Consumer
        from sqlalchemy_q4m.worker import Job

        class NoOpJob(Job):
            model = BenchJob
            max_attempts = 1  # the table has no retry columns (and a no-op never fails)

            def execute(self, job: Any) -> None:
                return None

        self.engine = library_engine(url)
        self.consumer = Consumer([NoOpJob(self.engine, batch_size=size)], self.engine)
        self.consumer.connect()  # before the start signal, as the other loops connect

    def consume(self) -> int:
        stats, rolled_back = self.consumer.stats, 0
        while True:
            before = stats.snapshot()["done"]
            try:
                if not self.consumer.run_once(timeout=0):
                    return int(stats.snapshot()["done"]) - rolled_back
            except CompletionFailed:  # a deadlock victim: the whole batch runs again
                rolled_back += stats.snapshot()["done"] - before

    def close(self) -> None:
        self.consumer.close()
        self.engine.dispose()


class RawBatchLoop:
    """The batched raw loop: claim ``LIMIT n``, one ``executemany`` of ``DELETE ... WHERE
    id = %s``, one ``COMMIT``."""

    def __init__(self, url: URL, size: int) -> None:
        self.conn, self.size = raw_connect(url), size

    def consume(self) -> int:
        conn, done = self.conn, 0
        with conn.cursor() as cur:
            while True:
                cur.execute(RAW_CLAIM, (self.size,))
                rows = cur.fetchall()
                if not rows:
                    conn.rollback()
                    return done
                keys = [r[0] for r in rows]
                try:
                    cur.executemany(RAW_DELETE_ONE, [(k,) for k in keys])  # as queue_batch does
                except pymysql.err.OperationalError as err:
                    if err.args[0] != DEADLOCK:
                        raise
                    conn.rollback()  # the whole batch returns, as in queue_batch
                    continue
                conn.commit()
                done += len(rows)

    def close(self) -> None:
        self.conn.close()


class BatchLoop:
    """``queue_batch(BenchJob, bind=connection, size=n)``, each job through ``handle()``."""

    def __init__(self, url: URL, size: int) -> None:
        self.engine = library_engine(url)
        self.conn = self.engine.connect().execution_options(isolation_level="READ COMMITTED")
        self.size = size

    def consume(self) -> int:
        done = 0
        while True:
            try:
                with queue_batch(BenchJob, bind=self.conn, size=self.size, timeout=0) as batch:
                    if not len(batch):
                        return done
                    for job in batch:
                        with batch.handle(job):
                            pass
            except CompletionFailed:  # a deadlock victim: the whole batch runs again
                continue
            done += len(batch)

    def close(self) -> None:
        self.conn.close()
        self.engine.dispose()
