"""The scenarios of issue 6, each measured against its raw-PyMySQL baseline in the same run."""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field
from dataclasses import replace
from typing import Any

import pymysql
from sqlalchemy import insert
from sqlalchemy.engine import URL
from sqlalchemy.orm import Session

from sqlalchemy_q4m import enqueue as enqueue_jobs
from sqlalchemy_q4m import new_job_id
from sqlalchemy_q4m import queue_session
from sqlalchemy_q4m.backends.notify import notify
from sqlalchemy_q4m.consumer.session import POLL_INTERVAL

from .common import RAW_CLAIM
from .common import RAW_DELETE_ONE
from .common import RAW_INSERT
from .common import TABLE
from .common import BenchJob
from .common import CountingConnection
from .common import counting_engine
from .common import fill
from .common import fork_context
from .common import library_engine
from .common import raw_connect
from .common import raw_native_connect
from .common import remaining
from .common import run_parallel
from .workers import BatchLoop
from .workers import BatchRuntimeLoop
from .workers import CoreSessionLoop
from .workers import EngineSessionLoop
from .workers import RawBatchLoop
from .workers import RawLoop
from .workers import RawNativeLoop
from .workers import RuntimeLoop
from .workers import SessionLoop
from .workers import worker_runtime_available


@dataclass
class Settings:
    """How big each scenario is; ``quick()`` is the CI smoke size."""

    enqueue_jobs: int = 20_000
    enqueue_single_jobs: int = 1_000
    #: One-job-per-call rows sit near their target and the machine is shared: more repeats.
    single_repeats: int = 5
    consume_jobs: int = 5_000
    concurrency: tuple[int, ...] = (1, 2, 4, 8)
    repeats: int = 3
    #: Consume ratios sit near their target and the machine is shared: more repeats.
    consume_repeats: int = 5
    latency_samples: int = 200
    latency_gap: float = 0.1
    idle_seconds: float = 10.0
    rss_jobs: int = 2_000
    batch_jobs: int = 30_000
    batch_size: int = 200
    batch_workers: tuple[tuple[str, int], ...] = (("thread", 1), ("process", 2), ("process", 4))
    #: ``native`` on a Q4M server (``ENGINE=QUEUE``), else ``portable``: set by ``__main__``
    #: from what the server has, as ``queue_session`` detects it.
    backend: str = "portable"

    @property
    def native(self) -> bool:
        return self.backend == "native"

    def for_native(self) -> Settings:
        """Sizes for a Q4M server, where a durable ``queue_end()`` per job makes one
        consumer several times slower than on InnoDB here: fewer jobs per consume run and
        fewer repeats, so the whole native run stays near ten minutes."""
        return replace(
            self,
            backend="native",
            consume_jobs=min(self.consume_jobs, 2_000),
            consume_repeats=min(self.consume_repeats, 3),
        )

    @classmethod
    def tiny(cls) -> Settings:
        """Every row, with almost no work: the test suite's smoke run."""
        return cls(
            enqueue_jobs=200,
            enqueue_single_jobs=20,
            single_repeats=1,
            consume_jobs=40,
            repeats=1,
            consume_repeats=1,
            latency_samples=5,
            latency_gap=0.05,
            idle_seconds=0.5,
            rss_jobs=40,
            batch_jobs=400,
            batch_size=50,
            batch_workers=(("thread", 1), ("process", 2)),
        )

    @classmethod
    def quick(cls) -> Settings:
        return cls(
            enqueue_jobs=2_000,
            enqueue_single_jobs=100,
            single_repeats=1,
            consume_jobs=300,
            repeats=1,
            consume_repeats=1,
            latency_samples=20,
            latency_gap=0.08,
            idle_seconds=1.5,
            rss_jobs=300,
            batch_jobs=4_000,
        )


@dataclass
class Row:
    """One line of the report: the library's figure, the baseline's, and their ratio."""

    section: str
    scenario: str
    library: float
    raw: float
    unit: str
    target: str = ""
    met: bool | None = None
    note: str = ""
    higher_is_better: bool = True

    @property
    def ratio(self) -> float:
        return self.library / self.raw if self.raw else 0.0


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


Progress = Callable[[str], None]


def _label(kind: str, n: int) -> str:
    plural = {"thread": "threads", "process": "processes"}[kind]
    return f"{n} {kind if n == 1 else plural}"


def _alternate(repeats: int, *measures: Callable[[], float]) -> list[float]:
    """Run the measures alternately ``repeats`` times; keep each one's best rate (the run
    least disturbed by anything else on the machine)."""
    best = [0.0] * len(measures)
    for _ in range(repeats):
        for i, measure in enumerate(measures):
            best[i] = max(best[i], measure())
    return best


# -- 1. enqueue -------------------------------------------------------------------------------


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


def _enqueue_single(url: URL, count: int) -> float:
    """``enqueue(engine, BenchJob, [row])`` once per job: a producer of one job per call."""
    engine = library_engine(url)
    try:
        _truncate(url)
        rows = [{"payload": f"job {i}", "enqueued_at": 0.0} for i in range(count)]
        enqueue_jobs(engine, BenchJob, rows[:1])  # warm: connected, detected, compiled
        start = time.perf_counter()
        for row in rows:
            enqueue_jobs(engine, BenchJob, [row])
        return count / (time.perf_counter() - start)
    finally:
        engine.dispose()


def _enqueue_single_raw(url: URL, count: int, native: bool) -> float:
    """The raw producer of one job per call: INSERT + COMMIT, or on Q4M (no transactions)
    one INSERT with autocommit, as a raw user would write it."""
    _truncate(url)
    conn = raw_connect(url)
    try:
        conn.autocommit(native)
        rows = [(new_job_id().bytes, f"job {i}", 0.0) for i in range(count)]
        start = time.perf_counter()
        with conn.cursor() as cur:
            for row in rows:
                cur.execute(RAW_INSERT, row)
                if not native:
                    conn.commit()
        return count / (time.perf_counter() - start)
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
    raw, lib, orm = _alternate(
        s.repeats,
        lambda: _enqueue_raw(url, s.enqueue_jobs, True, s.native),
        lambda: _enqueue_producer(url, s.enqueue_jobs),
        lambda: _enqueue_library(url, s.enqueue_jobs, True),
    )
    report.rows.append(
        Row(
            "enqueue",
            f"bulk: `enqueue(engine, BenchJob, {s.enqueue_jobs} dicts)` vs `executemany`"
            + (" (autocommit)" if s.native else ""),
            lib,
            raw,
            "jobs/s",
            ">= 0.85",
            lib / raw >= 0.85,
        )
    )
    report.rows.append(
        Row(
            "enqueue",
            f"bulk: ORM `session.execute(insert(BenchJob), {s.enqueue_jobs} dicts)` vs "
            "`executemany`: SQLAlchemy's ORM bulk path",
            orm,
            raw,
            "jobs/s",
            note="informational, no target: the library's producer is `enqueue()`, above",
        )
    )
    native = s.native
    raw, lib = _alternate(
        s.single_repeats,
        lambda: _enqueue_single_raw(url, s.enqueue_single_jobs, native),
        lambda: _enqueue_single(url, s.enqueue_single_jobs),
    )
    raw_loop = "INSERT (autocommit; Q4M)" if native else "INSERT + COMMIT"
    report.rows.append(
        Row(
            "enqueue",
            f"one job per call: `enqueue(engine, BenchJob, [row])` vs raw {raw_loop} per job",
            lib,
            raw,
            "jobs/s",
            ">= 0.85",
            lib / raw >= 0.85,
            note="statements per job as the raw loop's (tests/test_statement_counts_enqueue.py)",
        )
    )
    lib, raw = _alternate(
        s.repeats,
        lambda: _enqueue_raw(url, s.enqueue_single_jobs, False, s.native),
        lambda: _enqueue_library(url, s.enqueue_single_jobs, False),
    )[::-1]
    report.rows.append(
        Row(
            "enqueue",
            "one job per transaction: `session.add(job); session.commit()` vs "
            + ("INSERT (autocommit)" if s.native else "INSERT + COMMIT"),
            lib,
            raw,
            "jobs/s",
            note="not a target of the issue; shown for scale",
        )
    )


# -- 2. consume -------------------------------------------------------------------------------


def _consume(url: URL, count: int, kind: str, workers: int, factory: Any, *args: Any) -> float:
    fill(url, count)
    run = run_parallel(kind, workers, factory, url, *args)
    left = remaining(url)
    if left or run.jobs != count:
        raise RuntimeError(
            f"{factory.__name__} x{workers} {kind}: {run.jobs} of {count} jobs done, "
            f"{left} left in the queue"
        )
    return run.rate


def consume(url: URL, s: Settings, report: Report, progress: Progress) -> None:
    if s.native:
        consume_native(url, s, report, progress)
        return
    runtime = worker_runtime_available()
    if not runtime:
        report.extra["runtime"] = (
            "the worker runtime (`sqlalchemy_q4m.worker.Job`, issue 3) is not in this tree: "
            "no row for it"
        )
    for kind in ("thread", "process"):
        for n in s.concurrency:
            progress(f"consume {n} {kind}(s)")
            measures = [
                lambda n=n, kind=kind: _consume(url, s.consume_jobs, kind, n, RawLoop),
                lambda n=n, kind=kind: _consume(url, s.consume_jobs, kind, n, SessionLoop),
            ]
            if runtime:
                measures.append(
                    lambda n=n, kind=kind: _consume(url, s.consume_jobs, kind, n, RuntimeLoop)
                )
            rates = _alternate(s.consume_repeats, *measures)
            label = _label(kind, n)
            report.rows.append(
                Row(
                    "consume",
                    f"`queue_session(bind=connection)`, {label}",
                    rates[1],
                    rates[0],
                    "jobs/s",
                    ">= 0.85",
                    rates[1] / rates[0] >= 0.85,
                )
            )
            if runtime:
                report.rows.append(
                    Row(
                        "consume",
                        f"worker runtime `Job.run_once`, {label}",
                        rates[2],
                        rates[0],
                        "jobs/s",
                        ">= 0.85",
                        rates[2] / rates[0] >= 0.85,
                    )
                )
    progress("consume, queue_session(bind=engine) and on a Core table")
    raw, lib, core = _alternate(
        s.repeats,
        lambda: _consume(url, s.consume_jobs, "thread", 1, RawLoop),
        lambda: _consume(url, s.consume_jobs, "thread", 1, EngineSessionLoop),
        lambda: _consume(url, s.consume_jobs, "thread", 1, CoreSessionLoop),
    )
    report.rows.append(
        Row(
            "consume",
            "`queue_session(core_table, bind=connection)` (yields Rows), 1 thread",
            core,
            raw,
            "jobs/s",
            note="what the ORM instance costs",
        )
    )
    report.rows.append(
        Row(
            "consume",
            "`queue_session(bind=engine)` (a pooled connection per job), 1 thread",
            lib,
            raw,
            "jobs/s",
            note="the README one-liner; not the worker path",
        )
    )


#: The library consumers of the native consume rows: (loop, how the row names it).
NATIVE_CONSUMERS: tuple[tuple[Any, str], ...] = (
    (SessionLoop, "`queue_session(bind=connection)`"),
    (EngineSessionLoop, "`queue_session(bind=engine)`"),
    (RuntimeLoop, "worker runtime `Job.run_once`"),
)


def consume_native(url: URL, s: Settings, report: Report, progress: Progress) -> None:
    """Consume on Q4M: each library consumer against the raw autocommit loop
    (:class:`~benchmarks.workers.RawNativeLoop`), alternating, at every concurrency."""
    progress("native commands per job")
    commands_native(url, s, report)
    for kind in ("thread", "process"):
        for n in s.concurrency:
            progress(f"native consume {n} {kind}(s)")
            loops = [RawNativeLoop, *(loop for loop, _ in NATIVE_CONSUMERS)]
            rates = _alternate(
                s.consume_repeats,
                *(
                    lambda n=n, kind=kind, loop=loop: _consume(url, s.consume_jobs, kind, n, loop)
                    for loop in loops
                ),
            )
            raw = rates[0]
            for (_, name), rate in zip(NATIVE_CONSUMERS, rates[1:], strict=True):
                report.rows.append(
                    Row(
                        "consume",
                        f"{name}, {_label(kind, n)}",
                        rate,
                        raw,
                        "jobs/s",
                        ">= 0.85",
                        rate / raw >= 0.85,
                    )
                )


def _commands_per_job(url: URL, count: int, loop: Any) -> float:
    """Commands (queries, COMMIT, ROLLBACK) one consumer sends per job, counted at the
    driver: PyMySQL's command method is wrapped while ``loop`` drains ``count`` jobs."""
    fill(url, count)
    worker = loop(url)
    sent = 0
    original = pymysql.connections.Connection._execute_command

    def counting(self: Any, command: int, sql: Any) -> Any:
        nonlocal sent
        sent += 1
        return original(self, command, sql)

    pymysql.connections.Connection._execute_command = counting
    try:
        done = worker.consume()
    finally:
        pymysql.connections.Connection._execute_command = original
        worker.close()
    if done != count:
        raise RuntimeError(f"{loop.__name__}: {done} of {count} jobs done")
    return sent / done


def commands_native(url: URL, s: Settings, report: Report) -> None:
    """What each native consumer sends per job: the round trips behind the ratios."""
    count = min(s.consume_jobs, 500)
    raw = _commands_per_job(url, count, RawNativeLoop)
    for loop, name in NATIVE_CONSUMERS:
        report.rows.append(
            Row(
                "statements",
                f"commands sent per job, {name}, 1 thread",
                _commands_per_job(url, count, loop),
                raw,
                "per job",
                note="counted at the driver; informational",
                higher_is_better=False,
            )
        )


# -- 3. pickup latency and idle cost ----------------------------------------------------------


#: ``listen`` of the library consumer in the listen/notify latency rows (seconds).
LISTEN = 1.0


def _idle_worker(
    url: URL,
    library: bool,
    idle: float,
    samples: int,
    poll: float,
    out: Any,
    listen: float | None = None,
) -> None:
    """Child process: poll (or, with ``listen``, wait to be woken) on an idle queue for
    ``idle`` seconds counting commands sent, then report the pickup latency of the next
    ``samples`` jobs."""
    try:
        latencies: list[float] = []
        if library:
            engine = counting_engine(url)
            conn = engine.connect().execution_options(isolation_level="READ COMMITTED")

            def step(timeout: float) -> None:
                with queue_session(
                    BenchJob, bind=conn, timeout=timeout, poll_interval=poll, listen=listen
                ) as job:
                    if job is not None:
                        latencies.append(time.monotonic() - job.enqueued_at)
        else:
            raw = raw_connect(url, CountingConnection)
            cur = raw.cursor()

            def step(timeout: float) -> None:
                deadline = time.monotonic() + timeout
                while True:
                    cur.execute(RAW_CLAIM, (1,))
                    row = cur.fetchone()
                    if row is not None:
                        latencies.append(time.monotonic() - row[2])
                        cur.execute(RAW_DELETE_ONE, (row[0],))
                        raw.commit()
                        return
                    if time.monotonic() >= deadline:
                        raw.rollback()
                        return
                    time.sleep(poll)

        step(0)  # once, so one-time work (backend detection) is not counted as idle cost
        CountingConnection.commands = 0
        start = time.monotonic()
        while time.monotonic() - start < idle:
            step(min(5.0, max(0.0, idle - (time.monotonic() - start))))
        qps = CountingConnection.commands / (time.monotonic() - start)
        out.put(("idle", qps))
        CountingConnection.commands = 0
        start = time.monotonic()
        while len(latencies) < samples:
            step(5.0)
        busy_qps = CountingConnection.commands / (time.monotonic() - start)
        out.put(("latency", latencies, busy_qps))
    except BaseException:
        out.put(("error", traceback.format_exc()))


def _latency(
    url: URL, s: Settings, library: bool, poll: float, listen: float | None = None
) -> tuple[float, list[float], float]:
    """Idle commands/s, pickup latencies and busy commands/s of one consumer process; with
    ``listen`` the producer calls ``notify(engine, BenchJob)`` after each commit."""
    fill(url, 0)
    ctx = fork_context()
    out = ctx.Queue()
    child = ctx.Process(
        target=_idle_worker,
        args=(url, library, s.idle_seconds, s.latency_samples, poll, out, listen),
    )
    child.start()
    try:
        message = out.get(timeout=s.idle_seconds + 60)
        if message[0] == "error":
            raise RuntimeError(message[1])
        qps = float(message[1])
        producer = raw_connect(url)
        producer.autocommit(True)
        waker = library_engine(url) if listen is not None else None
        rng = random.Random(6)
        with producer.cursor() as cur:
            for i in range(s.latency_samples):
                time.sleep(rng.uniform(0.5 * s.latency_gap, 1.5 * s.latency_gap))
                cur.execute(RAW_INSERT, (new_job_id().bytes, f"job {i}", time.monotonic()))
                if waker is not None:
                    notify(waker, BenchJob)  # after the (auto)commit
        producer.close()
        if waker is not None:
            waker.dispose()
        message = out.get(timeout=60)
        if message[0] == "error":
            raise RuntimeError(message[1])
        return qps, list(message[1]), float(message[2])
    finally:
        child.join(timeout=10)
        if child.is_alive():
            child.kill()
            child.join()


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))] * 1000


def latency(url: URL, s: Settings, report: Report, progress: Progress) -> None:
    progress("pickup latency")
    poll = POLL_INTERVAL
    raw_qps, raw_lat, raw_busy = _latency(url, s, False, poll)
    lib_qps, lib_lat, lib_busy = _latency(url, s, True, poll)
    listen_qps, listen_lat, _ = _latency(url, s, True, poll, LISTEN)
    p50, p99 = _pct(lib_lat, 50), _pct(lib_lat, 99)
    l50, l99 = _pct(listen_lat, 50), _pct(listen_lat, 99)
    polling = "informational: polling; the targets apply to listen/notify"
    waking = f"`listen={LISTEN:g}`, producer calls `notify(engine, BenchJob)`; raw side polls"
    report.rows += [
        Row(
            "latency",
            f"pickup p50, idle queue, listen/notify (listen={LISTEN:g} s)",
            l50,
            _pct(raw_lat, 50),
            "ms",
            "<= 25 ms",
            l50 <= 25,
            note=waking,
            higher_is_better=False,
        ),
        Row(
            "latency",
            "pickup p99, idle queue, listen/notify",
            l99,
            _pct(raw_lat, 99),
            "ms",
            "<= 100 ms",
            l99 <= 100,
            note=waking,
            higher_is_better=False,
        ),
        Row(
            "latency",
            "commands/s sent by an idle worker (no jobs), listen/notify",
            listen_qps,
            raw_qps,
            "queries/s",
            "<= 20",
            listen_qps <= 20,
            note=waking,
            higher_is_better=False,
        ),
        Row(
            "latency",
            f"polling: pickup p50, idle queue (poll every {poll * 1000:g} ms)",
            p50,
            _pct(raw_lat, 50),
            "ms",
            note=polling,
            higher_is_better=False,
        ),
        Row(
            "latency",
            "polling: pickup p99, idle queue",
            p99,
            _pct(raw_lat, 99),
            "ms",
            note=polling,
            higher_is_better=False,
        ),
        Row(
            "latency",
            "polling: commands/s sent by an idle worker (no jobs)",
            lib_qps,
            raw_qps,
            "queries/s",
            note=polling,
            higher_is_better=False,
        ),
        Row(
            "latency",
            "commands/s while picking up sparse jobs",
            lib_busy,
            raw_busy,
            "queries/s",
            note="includes each job's claim, DELETE and COMMIT",
            higher_is_better=False,
        ),
    ]
    report.extra["latency_samples"] = len(lib_lat)
    report.extra["latency_stats"] = {
        "listen_mean_ms": statistics.fmean(listen_lat) * 1000,
        "library_mean_ms": statistics.fmean(lib_lat) * 1000,
        "raw_mean_ms": statistics.fmean(raw_lat) * 1000,
    }


# -- 4. worker memory ---------------------------------------------------------------------------


def _rss(url: URL, kind: str, jobs: int) -> dict[str, int]:
    fill(url, jobs)
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.rss", kind, url.render_as_string(hide_password=False)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"benchmarks.rss {kind} failed:\n{done.stderr[-2000:]}")
    result: dict[str, int] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def memory(url: URL, s: Settings, report: Report, progress: Progress) -> None:
    progress("worker RSS")
    kind = "runtime" if worker_runtime_available() else "library"
    raw = _rss(url, "raw", s.rss_jobs)
    lib = _rss(url, kind, s.rss_jobs)
    peak = lib["peak_kb"] / 1024
    what = "worker runtime" if kind == "runtime" else "`queue_session` loop"
    report.rows.append(
        Row(
            "memory",
            f"peak RSS of a worker process, 4 threads ({what}) after {s.rss_jobs} jobs",
            peak,
            raw["peak_kb"] / 1024,
            "MB",
            "<= 80 MB",
            peak <= 80,
            higher_is_better=False,
        )
    )


# -- 5. batched consume -------------------------------------------------------------------------


def batched(url: URL, s: Settings, report: Report, progress: Progress) -> None:
    runtime = worker_runtime_available()
    for kind, n in s.batch_workers:
        progress(f"batched consume {n} {kind}(s)")
        measures = [
            lambda n=n, kind=kind: _consume(url, s.batch_jobs, kind, n, RawBatchLoop, s.batch_size),
            lambda n=n, kind=kind: _consume(url, s.batch_jobs, kind, n, BatchLoop, s.batch_size),
            lambda n=n, kind=kind: _consume(
                url, max(s.consume_jobs, s.batch_jobs // 10), kind, n, RawLoop
            ),
        ]
        if runtime:
            measures.append(
                lambda n=n, kind=kind: _consume(
                    url, s.batch_jobs, kind, n, BatchRuntimeLoop, s.batch_size
                )
            )
        raw, lib, single, *worker = _alternate(s.repeats, *measures)
        label = _label(kind, n)
        report.rows.append(
            Row(
                "batched",
                f"`queue_batch(size={s.batch_size})`, {label}",
                lib,
                raw,
                "jobs/s",
                ">= 10,000 jobs/s",
                lib >= 10_000,
                note=f"{lib / single:.1f}x the raw one-job-per-transaction loop ({single:,.0f}/s)",
            )
        )
        if worker:
            report.rows.append(
                Row(
                    "batched",
                    f"worker runtime, batch_size={s.batch_size}, {label}",
                    worker[0],
                    raw,
                    "jobs/s",
                    ">= 10,000 jobs/s",
                    worker[0] >= 10_000,
                    note=f"{worker[0] / single:.1f}x the raw one-job-per-transaction loop "
                    f"({single:,.0f}/s); vs the raw batched loop in the ratio column",
                )
            )
