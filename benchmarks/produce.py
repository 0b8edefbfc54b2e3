"""Enqueue: ``enqueue()`` in bulk and one job per call, and the README's plain ORM inserts,
each against the raw PyMySQL producer issuing the same INSERTs in the same run."""

from __future__ import annotations

import time

from sqlalchemy import insert
from sqlalchemy.engine import URL
from sqlalchemy.orm import Session

from sqlalchemy_q4m import enqueue as enqueue_jobs
from sqlalchemy_q4m import new_job_id

from .common import RAW_INSERT
from .common import TABLE
from .common import BenchJob
from .common import library_engine
from .common import raw_connect
from .common import raw_native_connect
from .report import Progress
from .report import Report
from .report import Settings
from .report import alternate
from .report import counting
from .report import rate_row
from .report import statements_row


def _enqueue_library(url: URL, count: int, bulk: bool) -> float:
    engine = library_engine(url)
    try:
        _truncate(url)
        rows = [{"payload": f"job {i}", "enqueued_at": 0.0} for i in range(count)]
        with engine.connect():
            pass  # warm the pool: the raw side also connects before its clock starts
        start = time.perf_counter()
        with Session(engine) as session:
            if bulk:
                session.execute(insert(BenchJob), rows)
                session.commit()
            else:
                for row in rows:
                    session.add(BenchJob(**row))
                    session.commit()
        return count / (time.perf_counter() - start)
    finally:
        engine.dispose()


def _enqueue_producer(url: URL, count: int) -> float:
    """``sqlalchemy_q4m.producer.enqueue()`` on an engine: its own transaction, committed."""
    engine = library_engine(url)
    try:
        _truncate(url)
        rows = [{"payload": f"job {i}", "enqueued_at": 0.0} for i in range(count)]
        with engine.connect():
            pass  # warm the pool: the raw side also connects before its clock starts
        start = time.perf_counter()
        enqueue_jobs(engine, BenchJob, rows)
        return count / (time.perf_counter() - start)
    finally:
        engine.dispose()


def _enqueue_single(url: URL, count: int, sent: list[int] | None = None) -> float:
    """``enqueue(engine, BenchJob, [row])`` once per job: a producer of one job per call;
    with ``sent``, the commands sent per job (counted at the driver) go into ``sent[0]``."""
    engine = library_engine(url)
    try:
        _truncate(url)
        rows = [{"payload": f"job {i}", "enqueued_at": 0.0} for i in range(count)]
        enqueue_jobs(engine, BenchJob, rows[:1])  # warm: connected, detected, compiled
        with counting() as commands:
            start = time.perf_counter()
            for row in rows:
                enqueue_jobs(engine, BenchJob, [row])
            rate = count / (time.perf_counter() - start)
        if sent is not None:
            sent[0] = commands[0]
        return rate
    finally:
        engine.dispose()


def _enqueue_single_raw(url: URL, count: int, native: bool, sent: list[int] | None = None) -> float:
    """The raw producer of one job per call: INSERT + COMMIT, or on Q4M (no transactions)
    one INSERT with autocommit, as a raw user would write it."""
    _truncate(url)
    conn = raw_connect(url)
    try:
        conn.autocommit(native)
        rows = [(new_job_id().bytes, f"job {i}", 0.0) for i in range(count)]
        with counting() as commands, conn.cursor() as cur:
            start = time.perf_counter()
            for row in rows:
                cur.execute(RAW_INSERT, row)
                if not native:
                    conn.commit()
            rate = count / (time.perf_counter() - start)
        if sent is not None:
            sent[0] = commands[0]
        return rate
    finally:
        conn.close()


def _enqueue_raw(url: URL, count: int, bulk: bool, native: bool = False) -> float:
    """The raw producer: ``executemany`` (or one INSERT per job) and a COMMIT each; on Q4M
    with autocommit on and no COMMIT, as a raw user would (Q4M has no transactions)."""
    _truncate(url)
    conn = raw_native_connect(url) if native else raw_connect(url)
    try:
        start = time.perf_counter()
        with conn.cursor() as cur:
            rows = [(new_job_id().bytes, f"job {i}", 0.0) for i in range(count)]
            if bulk:
                cur.executemany(RAW_INSERT, rows)
                if not native:
                    conn.commit()
            else:
                for row in rows:
                    cur.execute(RAW_INSERT, row)
                    if not native:
                        conn.commit()
        return count / (time.perf_counter() - start)
    finally:
        conn.close()


def _truncate(url: URL) -> None:
    conn = raw_connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute(f"TRUNCATE TABLE {TABLE}")
    finally:
        conn.close()


def enqueue(url: URL, s: Settings, report: Report, progress: Progress) -> None:
    progress("enqueue")
    native = s.native
    autocommit = " (autocommit)" if native else ""
    raw, lib, orm = alternate(
        s.repeats,
        lambda: _enqueue_raw(url, s.enqueue_jobs, True, native),
        lambda: _enqueue_producer(url, s.enqueue_jobs),
        lambda: _enqueue_library(url, s.enqueue_jobs, True),
    )
    report.rows.append(
        rate_row(
            "enqueue",
            f"bulk: `enqueue(engine, BenchJob, {s.enqueue_jobs} dicts)` vs `executemany`"
            + autocommit,
            lib,
            raw,
        )
    )
    report.rows.append(
        rate_row(
            "enqueue",
            f"bulk: ORM `session.execute(insert(BenchJob), {s.enqueue_jobs} dicts)` vs "
            "`executemany`" + autocommit,
            orm,
            raw,
            note="the README's bulk insert: SQLAlchemy's ORM bulk path, the library adds the "
            "id default",
        )
    )
    raw, lib = alternate(
        s.single_repeats,
        lambda: _enqueue_single_raw(url, s.enqueue_single_jobs, native),
        lambda: _enqueue_single(url, s.enqueue_single_jobs),
    )
    raw_loop = "INSERT (autocommit; Q4M)" if native else "INSERT + COMMIT"
    report.rows.append(
        rate_row(
            "enqueue",
            f"one job per call: `enqueue(engine, BenchJob, [row])` vs raw {raw_loop} per job",
            lib,
            raw,
        )
    )
    raw_sent, lib_sent = [0], [0]
    count = s.enqueue_single_jobs
    _enqueue_single_raw(url, count, native, raw_sent)
    _enqueue_single(url, count, lib_sent)
    report.rows.append(
        statements_row(
            "commands sent per job, one job per call: `enqueue(engine, BenchJob, [row])`",
            lib_sent[0] / count,
            raw_sent[0] / count,
            note=f"vs raw {raw_loop}; the listener check may add one statement per 0.25 s",
        )
    )
    raw, lib = alternate(
        s.repeats,
        lambda: _enqueue_raw(url, s.enqueue_single_jobs, False, native),
        lambda: _enqueue_library(url, s.enqueue_single_jobs, False),
    )
    report.rows.append(
        rate_row(
            "enqueue",
            "one job per transaction: `session.add(job); session.commit()` vs "
            + ("INSERT (autocommit)" if native else "INSERT + COMMIT"),
            lib,
            raw,
            note="the README's plain insert: SQLAlchemy's unit of work, the library adds the "
            "id default",
        )
    )
