"""Pickup latency and the cost of an idle consumer (portable: polling and listen/notify;
native: ``queue_wait`` blocking in the server), and a worker process's memory."""

from __future__ import annotations

import inspect
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

from sqlalchemy.engine import URL

from sqlalchemy_q4m import new_job_id
from sqlalchemy_q4m import notify
from sqlalchemy_q4m import queue_session

from .common import RAW_CLAIM
from .common import RAW_DELETE_ONE
from .common import RAW_END
from .common import RAW_INSERT
from .common import RAW_OWNED
from .common import TABLE
from .common import BenchJob
from .common import CountingConnection
from .common import connect_kwargs
from .common import counting_engine
from .common import fill
from .common import fork_context
from .common import library_engine
from .common import raw_connect
from .report import Progress
from .report import Report
from .report import Row
from .report import Settings
from .workers import worker_runtime_available

#: ``listen`` of the library consumer in the listen/notify latency rows (seconds).
LISTEN = 1.0
#: ``queue_session``'s default poll interval, read from its signature (public).
POLL_INTERVAL: float = inspect.signature(queue_session).parameters["poll_interval"].default
#: A latency or query-rate row's target against the raw loop: 0.85 the other way round.
WORSE = round(1 / 0.85, 2)

Step = Callable[[float], None]


def _library_step(url: URL, poll: float, listen: float | None, out: list[float]) -> Step:
    engine = counting_engine(url)
    conn = engine.connect().execution_options(isolation_level="READ COMMITTED")

    def step(timeout: float) -> None:
        with queue_session(
            BenchJob, bind=conn, timeout=timeout, poll_interval=poll, listen=listen
        ) as job:
            if job is not None:
                out.append(time.monotonic() - job.enqueued_at)

    return step


def _raw_polling_step(url: URL, poll: float, out: list[float]) -> Step:
    raw = raw_connect(url, CountingConnection)
    cur = raw.cursor()

    def step(timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            cur.execute(RAW_CLAIM, (1,))
            row = cur.fetchone()
            if row is not None:
                out.append(time.monotonic() - row[2])
                cur.execute(RAW_DELETE_ONE, (row[0],))
                raw.commit()
                return
            if time.monotonic() >= deadline:
                raw.rollback()
                return
            time.sleep(poll)

    return step


def _raw_native_step(url: URL, out: list[float]) -> Step:
    """Q4M as a raw user waits: ``queue_wait('t', seconds)`` blocks in the server until a row
    arrives; the owner reads it and ends it (or leaves owner mode after a timeout)."""
    kwargs = connect_kwargs(url)
    kwargs["autocommit"] = True
    cur = CountingConnection(**kwargs).cursor()

    def step(timeout: float) -> None:
        cur.execute(f"SELECT queue_wait('{TABLE}', %s)", (math.ceil(timeout),))
        (got,) = cur.fetchone()
        if got:
            cur.execute(RAW_OWNED)
            row = cur.fetchone()
            out.append(time.monotonic() - row[2])
        cur.execute(RAW_END)

    return step


def _idle_worker(
    url: URL, side: str, idle: float, samples: int, poll: float, out: Any, listen: float | None
) -> None:
    """Child process: wait on an idle queue for ``idle`` seconds counting commands sent,
    then report the pickup latency of the next ``samples`` jobs.  ``side``: ``library``,
    ``raw`` (polling) or ``raw-native`` (``queue_wait``)."""
    try:
        latencies: list[float] = []
        if side == "library":
            step = _library_step(url, poll, listen, latencies)
        elif side == "raw":
            step = _raw_polling_step(url, poll, latencies)
        else:
            step = _raw_native_step(url, latencies)
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
    url: URL, s: Settings, side: str, poll: float, listen: float | None = None
) -> tuple[float, list[float], float]:
    """Idle commands/s, pickup latencies and busy commands/s of one consumer process; with
    ``listen`` the producer calls ``notify(engine, BenchJob)`` after each commit."""
    fill(url, 0)
    ctx = fork_context()
    out = ctx.Queue()
    child = ctx.Process(
        target=_idle_worker,
        args=(url, side, s.idle_seconds, s.latency_samples, poll, out, listen),
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


def _absolute(scenario: str, lib: float, raw: float, unit: str, limit: float, note: str) -> Row:
    """A lower-is-better row with an absolute target (ms, queries/s, MB)."""
    return Row("latency", scenario, lib, raw, unit, f"<= {limit:g}", lib <= limit, note, False)


def _relative(scenario: str, lib: float, raw: float, unit: str, note: str) -> Row:
    """A lower-is-better row whose target is the raw loop's figure, with 0.85's slack."""
    met = lib <= WORSE * raw
    return Row("latency", scenario, lib, raw, unit, f"<= {WORSE:g} x raw", met, note, False)


def latency(url: URL, s: Settings, report: Report, progress: Progress) -> None:
    if s.native:
        latency_native(url, s, report, progress)
        return
    progress("pickup latency")
    poll = POLL_INTERVAL
    raw_qps, raw_lat, raw_busy = _latency(url, s, "raw", poll)
    lib_qps, lib_lat, lib_busy = _latency(url, s, "library", poll)
    listen_qps, listen_lat, _ = _latency(url, s, "library", poll, LISTEN)
    raw50, raw99 = _pct(raw_lat, 50), _pct(raw_lat, 99)
    waking = f"`listen={LISTEN:g}`, producer calls `notify(engine, BenchJob)`; raw side polls"
    polling = f"both poll every {poll * 1000:g} ms"
    report.rows += [
        _absolute(
            f"pickup p50, idle queue, listen/notify (listen={LISTEN:g} s)",
            _pct(listen_lat, 50),
            raw50,
            "ms",
            25,
            waking,
        ),
        _absolute(
            "pickup p99, idle queue, listen/notify", _pct(listen_lat, 99), raw99, "ms", 100, waking
        ),
        _absolute(
            "commands/s sent by an idle worker (no jobs), listen/notify",
            listen_qps,
            raw_qps,
            "queries/s",
            20,
            waking,
        ),
        _relative("polling: pickup p50, idle queue", _pct(lib_lat, 50), raw50, "ms", polling),
        _relative("polling: pickup p99, idle queue", _pct(lib_lat, 99), raw99, "ms", polling),
        _relative(
            "polling: commands/s sent by an idle worker (no jobs)",
            lib_qps,
            raw_qps,
            "queries/s",
            polling,
        ),
        _relative(
            "commands/s while picking up sparse jobs",
            lib_busy,
            raw_busy,
            "queries/s",
            "includes each job's claim, DELETE and COMMIT",
        ),
    ]
    report.extra["latency_samples"] = len(lib_lat)
    report.extra["latency_stats"] = {
        "listen_mean_ms": round(statistics.fmean(listen_lat) * 1000, 2),
        "library_mean_ms": round(statistics.fmean(lib_lat) * 1000, 2),
        "raw_mean_ms": round(statistics.fmean(raw_lat) * 1000, 2),
    }


def latency_native(url: URL, s: Settings, report: Report, progress: Progress) -> None:
    """Q4M: ``queue_session(bind=connection, timeout=5)`` blocks in ``queue_wait`` as the raw
    loop does; a job inserted (autocommit) reaches it in about one round trip."""
    progress("native pickup latency")
    raw_qps, raw_lat, raw_busy = _latency(url, s, "raw-native", POLL_INTERVAL)
    lib_qps, lib_lat, lib_busy = _latency(url, s, "library", POLL_INTERVAL)
    note = "both block in `queue_wait` (up to 5 s a call)"
    report.rows += [
        _absolute("pickup p50, idle queue", _pct(lib_lat, 50), _pct(raw_lat, 50), "ms", 25, note),
        _absolute("pickup p99, idle queue", _pct(lib_lat, 99), _pct(raw_lat, 99), "ms", 100, note),
        _absolute(
            "commands/s sent by an idle worker (no jobs)", lib_qps, raw_qps, "queries/s", 20, note
        ),
        _relative(
            "commands/s while picking up sparse jobs",
            lib_busy,
            raw_busy,
            "queries/s",
            "each job's `queue_wait`, owner `SELECT` and `queue_end()`",
        ),
    ]
    report.extra["latency_samples"] = len(lib_lat)
    report.extra["latency_stats"] = {
        "library_mean_ms": round(statistics.fmean(lib_lat) * 1000, 2),
        "raw_mean_ms": round(statistics.fmean(raw_lat) * 1000, 2),
    }


# -- worker memory ----------------------------------------------------------------------------


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
    raw = _rss(url, "raw-native" if s.native else "raw", s.rss_jobs)
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
