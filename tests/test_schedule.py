"""Recurring jobs: tick arithmetic, exactly once per tick on both backends, with schedulers
SIGKILLed and restarted at random while they run."""

from __future__ import annotations

import collections
import datetime as dt
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import BigInteger
from sqlalchemy import Column
from sqlalchemy import Engine
from sqlalchemy import MetaData
from sqlalchemy import Table
from sqlalchemy import create_engine
from sqlalchemy import delete
from sqlalchemy import select
from sqlalchemy.engine import URL
from sqlalchemy.pool import NullPool
from worker_support import q4m_env
from worker_support import run_q4m
from worker_support import start_q4m
from worker_support import stop
from worker_support import wait_for

from sqlalchemy_q4m import queue_table
from sqlalchemy_q4m.producer.cron import Schedule
from sqlalchemy_q4m.producer.cron import ScheduleError
from sqlalchemy_q4m.producer.schedule import Scheduler
from sqlalchemy_q4m.producer.schedule import schedule_of
from sqlalchemy_q4m.producer.ticks import SCHEDULES
from sqlalchemy_q4m.producer.ticks import TICKS
from sqlalchemy_q4m.producer.ticks import ensure_schedule_tables
from sqlalchemy_q4m.producer.ticks import fire_due
from sqlalchemy_q4m.producer.ticks import list_schedules
from sqlalchemy_q4m.worker.job import Job

UTC = dt.timezone.utc


def at(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text)


# -- the arithmetic (no server) ----------------------------------------------------------------


@pytest.mark.unit
def test_interval_ticks_are_multiples_of_the_interval_since_the_epoch() -> None:
    s = Schedule("s", "t", dt.timedelta(seconds=30))
    assert s.next_after(at("2026-01-01 00:00:00")) == at("2026-01-01 00:00:30")
    assert s.next_after(at("2026-01-01 00:00:29.9")) == at("2026-01-01 00:00:30")
    assert s.last_at_or_before(at("2026-01-01 00:00:30")) == at("2026-01-01 00:00:30")
    assert s.last_at_or_before(at("2026-01-01 00:00:59")) == at("2026-01-01 00:00:30")


@pytest.mark.unit
def test_cron_ticks_honour_the_time_zone() -> None:
    utc = Schedule("s", "t", "0 9 * * *")
    paris = Schedule("p", "t", "0 9 * * *", timezone="Europe/Paris")
    assert utc.next_after(at("2026-01-01 08:00")) == at("2026-01-01 09:00")
    assert paris.next_after(at("2026-01-01 00:00")) == at("2026-01-01 08:00")  # CET = UTC+1
    assert paris.next_after(at("2026-07-01 00:00")) == at("2026-07-01 07:00")  # CEST = UTC+2
    assert utc.last_at_or_before(at("2026-01-01 09:00")) == at("2026-01-01 09:00")
    assert utc.last_at_or_before(at("2026-01-01 08:59")) == at("2025-12-31 09:00")
    assert Schedule("f", "t", "*/5 * * * *").spec == "*/5 * * * *"


@pytest.mark.unit
@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"every": "61 * * * *"}, "bad cron expression"),
        ({"every": dt.timedelta(milliseconds=500)}, "at least 1 second"),
        ({"every": 5}, "cron text or a timedelta"),
        ({"every": "* * * * *", "timezone": "Mars/Olympus"}, "unknown time zone"),
        ({"every": "* * * * *", "missed": "all"}, "'once' or 'skip'"),
        ({"every": "* * * * *", "grace": -1}, ">= 0"),
    ],
)
def test_bad_schedules_get_a_typed_error(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(ScheduleError, match=message):
        Schedule("s", "t", **kw)


@pytest.mark.unit
def test_on_time_ticks_are_all_due_in_order() -> None:
    s = Schedule("s", "t", dt.timedelta(seconds=10), grace=60)
    ticks, newest = s.due(at("2026-01-01 00:00:00"), at("2026-01-01 00:00:35"), first=False)
    assert ticks == [
        at("2026-01-01 00:00:10"),
        at("2026-01-01 00:00:20"),
        at("2026-01-01 00:00:30"),
    ]
    assert newest == at("2026-01-01 00:00:30")
    first, _ = s.due(at("2026-01-01 00:00:10"), at("2026-01-01 00:00:12"), first=True)
    assert first == [at("2026-01-01 00:00:10")]  # a tick at the registration counts


@pytest.mark.unit
def test_missed_ticks_run_once_or_are_skipped() -> None:
    anchor, now = at("2026-01-01 00:00:00"), at("2026-01-01 01:00:05")
    once = Schedule("s", "t", dt.timedelta(seconds=60), grace=30, missed="once")
    ticks, newest = once.due(anchor, now, first=False)
    assert ticks == [at("2026-01-01 00:59:00"), at("2026-01-01 01:00:00")]
    assert newest == at("2026-01-01 01:00:00")
    skip = Schedule("s", "t", dt.timedelta(seconds=60), grace=30, missed="skip")
    ticks, newest = skip.due(anchor, now, first=False)
    assert ticks == [at("2026-01-01 01:00:00")]
    assert newest == at("2026-01-01 01:00:00")
    # nothing on time, one missed: skip moves the anchor on without a job
    ticks, newest = skip.due(anchor, at("2026-01-01 00:30:59"), first=False)
    assert (ticks, newest) == ([], at("2026-01-01 00:30:00"))


@pytest.mark.unit
def test_a_job_class_declares_its_schedule() -> None:
    class ReportJob(Job):
        table_name = "report_jobs"
        schedule = "*/5 * * * *"
        schedule_missed = "skip"

    class Plain(Job):
        pass

    s = schedule_of(ReportJob)
    assert s is not None
    assert (s.target, s.every, s.missed) == ("report_jobs", "*/5 * * * *", "skip")
    assert s.name.endswith("ReportJob")
    assert schedule_of(Plain) is None


# -- on the servers ----------------------------------------------------------------------------


def tick_table(name: str, native: bool) -> Table:
    kw: dict[str, Any] = {}
    if not native:
        kw = {"mysql_engine": "InnoDB", "mariadb_engine": "InnoDB"}
    return queue_table(name, MetaData(), Column("tick", BigInteger, nullable=False), **kw)


def payload(tick: dt.datetime) -> dict[str, Any]:
    return {"tick": int(tick.timestamp())}


def clear_schedule(engine: Engine, name: str) -> None:
    with engine.begin() as conn:
        ensure_schedule_tables(conn)
        conn.execute(delete(SCHEDULES).where(SCHEDULES.c.name == name))
        conn.execute(delete(TICKS).where(TICKS.c.schedule == name))


@pytest.fixture(params=["portable", pytest.param("native", marks=pytest.mark.native)])
def engine_native(request: pytest.FixtureRequest, engine: Engine) -> Iterator[tuple[Engine, bool]]:
    """(engine, native): the portable test database, or the Q4M server."""
    if request.param == "portable":
        yield engine, False
        return
    eng = create_engine(os.environ["Q4M_TEST_URL"], poolclass=NullPool)
    yield eng, True
    eng.dispose()


@pytest.mark.integration
def test_a_crash_between_the_job_and_the_commit_does_not_enqueue_a_tick_twice(
    engine_native: tuple[Engine, bool], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job INSERT went through (durable at once on Q4M), the scheduler died before its
    COMMIT: the next scheduler enqueues the same tick, and the queue holds it once."""
    backend_engine, native = engine_native
    suffix = uuid.uuid4().hex[:8]
    table = tick_table(f"tsc_{suffix}", native)
    name = f"crash-{suffix}"
    table.create(backend_engine)
    clear_schedule(backend_engine, name)
    backend = "native" if native else "portable"
    schedule = Schedule(name, table, dt.timedelta(seconds=1), payload=payload)
    try:
        with backend_engine.connect() as conn:
            conn.execution_options(isolation_level="READ COMMITTED")
            fire_due(conn, schedule, table, backend)  # registers the schedule
            time.sleep(2.2)
            real_insert = TICKS.insert

            class Died(Exception):
                pass

            def dies(*a: Any, **kw: Any) -> Any:
                raise Died

            monkeypatch.setattr(TICKS, "insert", dies)
            with pytest.raises(Died):
                fire_due(conn, schedule, table, backend)
            conn.rollback()
            monkeypatch.setattr(TICKS, "insert", real_insert)
            fired = fire_due(conn, schedule, table, backend)
            assert fired, "the retried turn enqueued the due ticks"
            jobs = collections.Counter(conn.execute(select(table.c.tick)).scalars())
            recorded = {
                int(t.replace(tzinfo=UTC).timestamp())
                for t in conn.execute(
                    select(TICKS.c.tick).where(TICKS.c.schedule == name)
                ).scalars()
            }
            conn.rollback()
        assert recorded and set(jobs) == recorded
        assert max(jobs.values()) == 1, f"a tick enqueued twice: {jobs}"
    finally:
        table.drop(backend_engine)
        clear_schedule(backend_engine, name)


SCHEDULER = textwrap.dedent(
    """
    import datetime as dt, logging, signal, sys
    from sqlalchemy import BigInteger, Column, MetaData, create_engine
    from sqlalchemy.pool import NullPool
    from sqlalchemy_q4m import queue_table
    from sqlalchemy_q4m.producer.schedule import Schedule, Scheduler

    url, table_name, name = sys.argv[1:4]
    engine = create_engine(url, poolclass=NullPool)
    table = queue_table(table_name, MetaData(), Column("tick", BigInteger, nullable=False))
    schedule = Schedule(
        name, table, dt.timedelta(seconds=1),
        payload=lambda tick: {"tick": int(tick.timestamp())},
    )
    scheduler = Scheduler(engine, [schedule])
    signal.signal(signal.SIGTERM, lambda *a: scheduler.stop())
    logging.basicConfig(level=logging.WARNING)
    print("ready", flush=True)
    scheduler.run()
    """
)


def start_scheduler(url: str, table: str, name: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", SCHEDULER, url, table, name],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def chaos(engine: Engine, url: str, native: bool, seconds: float = 30.0) -> None:
    """Three schedulers on a 1-second schedule for ``seconds``; every 2-4 s one of them is
    SIGKILLed and restarted.  Then: each tick from the first to the last is in the queue
    exactly once and recorded once."""
    suffix = uuid.uuid4().hex[:8]
    table = tick_table(f"tschaos_{suffix}", native)
    name = f"chaos-{suffix}"
    table.create(engine)
    clear_schedule(engine, name)
    procs = [start_scheduler(url, table.name, name) for _ in range(3)]
    kills = 0
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            time.sleep(random.uniform(2.0, 4.0))
            victim = random.randrange(len(procs))
            procs[victim].send_signal(signal.SIGKILL)
            procs[victim].communicate(timeout=30)
            kills += 1
            procs[victim] = start_scheduler(url, table.name, name)
        for proc in procs:  # a SIGTERM before the handler is set would kill it
            assert proc.stdout is not None
            assert proc.stdout.readline() == b"ready\n"
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            _, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err.decode()[-2000:]
        with engine.connect() as conn:
            jobs = collections.Counter(conn.execute(select(table.c.tick)).scalars())
            recorded = [
                int(t.replace(tzinfo=UTC).timestamp())
                for t in conn.execute(
                    select(TICKS.c.tick).where(TICKS.c.schedule == name)
                ).scalars()
            ]
            (state,) = [s for s in list_schedules(conn) if s.name == name]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
        table.drop(engine)
        clear_schedule(engine, name)
    assert kills >= 7
    doubled = {tick: n for tick, n in jobs.items() if n > 1}
    assert not doubled, f"ticks enqueued more than once: {doubled}"
    assert len(jobs) >= seconds - 5, f"only {len(jobs)} ticks in {seconds}s"
    first, last = min(jobs), max(jobs)
    missing = sorted(set(range(first, last + 1)) - set(jobs))
    assert not missing, f"ticks never enqueued: {missing}"
    assert sorted(recorded) == sorted(jobs), "the tick table and the queue disagree"
    assert state.fired == len(jobs)
    assert state.last_tick is not None
    assert int(state.last_tick.replace(tzinfo=UTC).timestamp()) == last


@pytest.mark.acceptance
def test_three_schedulers_sigkilled_at_random_enqueue_each_tick_once_portable(
    engine: Engine, db_url: URL
) -> None:
    chaos(engine, db_url.render_as_string(hide_password=False), native=False)


@pytest.mark.acceptance
@pytest.mark.native
def test_three_schedulers_sigkilled_at_random_enqueue_each_tick_once_native(
    q4m_url: URL,
) -> None:
    engine = create_engine(q4m_url, poolclass=NullPool)
    try:
        chaos(engine, q4m_url.render_as_string(hide_password=False), native=True)
    finally:
        engine.dispose()


@pytest.mark.integration
def test_a_scheduler_thread_stops_when_asked(engine: Engine) -> None:
    suffix = uuid.uuid4().hex[:8]
    table = tick_table(f"tsstop_{suffix}", native=False)
    name = f"stop-{suffix}"
    table.create(engine)
    clear_schedule(engine, name)
    scheduler = Scheduler(engine, [Schedule(name, table, dt.timedelta(seconds=1), payload=payload)])
    thread = threading.Thread(target=scheduler.run)
    thread.start()
    try:
        time.sleep(3.5)
    finally:
        scheduler.stop()
        thread.join(timeout=10)
    try:
        assert not thread.is_alive()
        assert 2 <= scheduler.fired <= 5
        with engine.connect() as conn:
            assert conn.execute(select(table.c.tick)).scalars().all()
    finally:
        table.drop(engine)
        clear_schedule(engine, name)


@pytest.mark.acceptance
def test_q4m_worker_runs_the_schedule_and_q4m_schedule_list_and_stats_show_it(
    engine: Engine, db_url: URL, tmp_path: Path
) -> None:
    suffix = uuid.uuid4().hex[:8]
    table = tick_table(f"tscli_{suffix}", native=False)
    name = f"cli-{suffix}"
    table.create(engine)
    clear_schedule(engine, name)
    url = db_url.render_as_string(hide_password=False)
    log = tmp_path / "ran.log"
    env = q4m_env(SCHED_TABLE=table.name, SCHED_NAME=name, SCHED_LOG=str(log))
    try:
        worker = start_q4m(
            "worker", "schedule_jobs:Ticker", "--url", url, env=env, output=tmp_path / "w.out"
        )
        try:
            wait_for(lambda: log.exists() and len(log.read_text().split()) >= 3, 60, "3 ticks run")
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(60) == 0, (tmp_path / "w.out").read_text()
        finally:
            stop(worker)
        ran = [int(t) for t in log.read_text().split()]
        assert len(ran) == len(set(ran))
        listed = run_q4m("schedule", "list", "--url", url, env=env)
        assert listed.returncode == 0, listed.stderr
        (line,) = [x for x in listed.stdout.splitlines() if x.startswith(name)]
        assert f"-> {table.name}  every 1s  last=" in line and "fired=" in line
        scheduler = start_q4m(
            "scheduler", "schedule_jobs", "--url", url, env=env, output=tmp_path / "s.out"
        )
        try:
            before = len(ran)
            wait_for(lambda: jobs_count(engine, table) >= 2, 60, "the scheduler alone enqueues")
            scheduler.send_signal(signal.SIGTERM)
            assert scheduler.wait(60) == 0, (tmp_path / "s.out").read_text()
        finally:
            stop(scheduler)
        assert before >= 3
        stats = run_q4m("stats", table.name, "--url", url, "--json", env=env)
        assert stats.returncode == 0, stats.stderr
        (counts,) = json.loads(stats.stdout)
        assert counts["schedules"] == 1
        assert counts["queued"] == jobs_count(engine, table)
        bad = run_q4m("scheduler", "schedule_jobs:NotScheduled", "--url", url, env=env)
        assert bad.returncode == 2 and "has a schedule" in bad.stderr
    finally:
        table.drop(engine)
        clear_schedule(engine, name)


def jobs_count(engine: Engine, table: Table) -> int:
    with engine.connect() as conn:
        return len(conn.execute(select(table.c.tick)).all())


@pytest.mark.integration
def test_two_schedules_racing_for_one_q4m_source_both_register(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Scheduler B picked source 0 before A's row with source 0 committed: B's INSERT hits the
    (queue, srcid) unique key and must try the next source, not touch A's row."""
    from sqlalchemy_q4m.producer import ticks as module

    suffix = uuid.uuid4().hex[:8]
    a, b = f"race-a-{suffix}", f"race-b-{suffix}"
    queue = f"trace_{suffix}"
    for name in (a, b):
        clear_schedule(engine, name)
    real = module._free_source
    answers = [0, 0]  # A: 0 (right); B: 0 (stale: A has it), then the real answers
    monkeypatch.setattr(
        module, "_free_source", lambda c, q: answers.pop() if answers else real(c, q)
    )
    try:
        with engine.connect() as conn:
            now = dt.datetime(2026, 1, 1)
            module._register(conn, Schedule(a, queue, dt.timedelta(seconds=1)), now, True)
            module._register(conn, Schedule(b, queue, dt.timedelta(seconds=1)), now, True)
            rows = {s.name: s.srcid for s in list_schedules(conn) if s.name in (a, b)}
        assert set(rows) == {a, b}
        assert rows[a] != rows[b]
    finally:
        for name in (a, b):
            clear_schedule(engine, name)


@pytest.mark.integration
def test_a_scheduler_whose_connection_is_killed_at_random_enqueues_each_tick_once(
    engine_native: tuple[Engine, bool],
) -> None:
    """The server drops the scheduler's connection (``KILL``) every 0.2-0.6 s for 10 s: it
    reconnects, and each tick is in the queue once, none missing."""
    eng, native = engine_native
    suffix = uuid.uuid4().hex[:8]
    table = tick_table(f"tskill_{suffix}", native)
    name = f"kill-{suffix}"
    table.create(eng)
    clear_schedule(eng, name)
    schedule = Schedule(name, table, dt.timedelta(seconds=1), payload=payload)
    scheduler = Scheduler(eng, [schedule], reconnect_max=0.3)
    thread = threading.Thread(target=scheduler.run)
    thread.start()
    kills = 0
    try:
        with eng.connect() as admin:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                time.sleep(random.uniform(0.2, 0.6))
                conn = scheduler._conn
                raw = None if conn is None or conn.invalidated else conn.connection.dbapi_connection
                if raw is None:
                    continue
                try:
                    admin.exec_driver_sql(f"KILL CONNECTION {int(raw.thread_id())}")
                    kills += 1
                except Exception:  # it was gone already
                    admin.rollback()
        time.sleep(3)
    finally:
        scheduler.stop()
        thread.join(timeout=30)
    try:
        assert not thread.is_alive()
        with eng.connect() as conn:
            jobs = collections.Counter(conn.execute(select(table.c.tick)).scalars())
    finally:
        table.drop(eng)
        clear_schedule(eng, name)
    assert kills >= 10
    assert jobs and max(jobs.values()) == 1, f"ticks enqueued twice: {jobs}"
    missing = sorted(set(range(min(jobs), max(jobs) + 1)) - set(jobs))
    assert not missing, f"ticks never enqueued: {missing}"
    assert len(jobs) >= 8
