"""The operations module (``sqlalchemy_q4m.ops``) and the worker registry, on both backends:
counts, jobs, dead letters, workers and throughput, as ``q4m stats|workers`` and the dashboard
read them."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Connection
from sqlalchemy import Engine
from sqlalchemy import Table
from sqlalchemy import create_engine
from sqlalchemy import insert
from sqlalchemy import select
from sqlalchemy import text
from sqlalchemy import update
from sqlalchemy.engine import URL
from web_support import private_database
from worker_support import number_table
from worker_support import q4m_env
from worker_support import run_q4m
from worker_support import start_q4m
from worker_support import stop
from worker_support import wait_for

from sqlalchemy_q4m import ops
from sqlalchemy_q4m.exc import Q4MError
from sqlalchemy_q4m.exc import QueueTableError
from sqlalchemy_q4m.schema.reflect import reflect_queue_table
from sqlalchemy_q4m.types import new_job_id
from sqlalchemy_q4m.worker.deadletter import bury
from sqlalchemy_q4m.worker.deadletter import dead_letter_table
from sqlalchemy_q4m.worker.deadletter import ensure_dead_letter_table
from sqlalchemy_q4m.worker.registry import Heartbeat
from sqlalchemy_q4m.worker.registry import Holding
from sqlalchemy_q4m.worker.registry import throughput_table
from sqlalchemy_q4m.worker.registry import utcnow
from sqlalchemy_q4m.worker.registry import worker_registry_table
from sqlalchemy_q4m.worker.runtime import EXIT_FORCED

TABLE = "ops_jobs"


@pytest.fixture(
    params=[
        pytest.param("portable", marks=pytest.mark.integration),
        pytest.param("native", marks=[pytest.mark.integration, pytest.mark.native]),
    ]
)
def db(request: pytest.FixtureRequest, server_url: URL) -> Iterator[Engine]:
    """A fresh database on the stock server (portable) or on the Q4M server (native)."""
    server = request.getfixturevalue("q4m_url") if request.param == "native" else server_url
    yield from private_database(server, f"q4m_ops_{request.param}_{os.getpid()}")


def dead(conn: Connection) -> Table:
    table = dead_letter_table()
    ensure_dead_letter_table(conn, table)
    return table


def fill(engine: Engine, ready: int, delayed: int) -> None:
    table = number_table(engine, TABLE)
    later = int(time.time()) + 3600
    with engine.begin() as conn:
        rows = [{"n": i, "run_at": 0} for i in range(ready)]
        rows += [{"n": 100 + i, "run_at": later} for i in range(delayed)]
        conn.execute(insert(table), rows)


def test_overview_counts_each_queue(db: Engine) -> None:
    fill(db, ready=3, delayed=2)
    with db.begin() as conn:
        bury(
            conn,
            dead(conn),
            queue=TABLE,
            values={"id": new_job_id(), "n": 7},
            error="boom",
            traceback="Traceback ...",
            attempts=3,
        )
    with db.connect() as conn:
        (summary,) = ops.overview(conn)
        assert ops.queue_table_names(conn) == [TABLE]  # the dead-letter table is no queue
    assert (summary.table, summary.total, summary.exact) == (TABLE, 5, True)
    assert (summary.delayed, summary.in_hand, summary.queued, summary.dead) == (2, 0, 3, 1)
    assert summary.oldest_age is not None and 0 <= summary.oldest_age < 120
    if summary.backend == "native":
        assert summary.q4m["rows_written"] == 5
    else:
        assert summary.q4m == {}


def test_overview_on_a_big_table_estimates_instead_of_scanning(db: Engine) -> None:
    fill(db, ready=3, delayed=2)
    with db.connect() as conn:
        (summary,) = ops.overview(conn, exact_limit=0)
    if summary.backend == "native":  # the engine keeps the count: always exact
        assert (summary.total, summary.exact, summary.delayed) == (5, True, None)
    else:  # information_schema's estimate, and no scan for the delayed ones
        assert (summary.exact, summary.delayed) == (False, None)
        assert summary.total >= 0


def test_list_jobs_filters_and_pages(db: Engine) -> None:
    fill(db, ready=5, delayed=2)
    with db.connect() as conn:
        table = reflect_queue_table(conn, TABLE)
        ready = ops.list_jobs(conn, table, state="ready", limit=3)
        assert len(ready.rows) == 3 and ready.more
        rest = ops.list_jobs(conn, table, state="ready", limit=3, offset=3)
        assert len(rest.rows) == 2 and not rest.more
        assert sorted(r["n"] for r in ready.rows + rest.rows) == [0, 1, 2, 3, 4]
        delayed = ops.list_jobs(conn, table, state="delayed")
        assert sorted(r["n"] for r in delayed.rows) == [100, 101]
        assert len(ops.list_jobs(conn, table).rows) == 7
        job_id = delayed.rows[0]["id"]
        uuid.UUID(job_id)  # ids are shown as UUIDs
        job = ops.get_job(conn, table, job_id)
        assert job is not None and job["n"] == delayed.rows[0]["n"]
        assert job["_run_at"] > time.time()
        held = ops.list_jobs(conn, table, state="in_hand", held=[job_id, "junk"])
        assert [r["id"] for r in held.rows] == [job_id]
        assert ops.get_job(conn, table, str(new_job_id())) is None
        with pytest.raises(Q4MError, match="unknown job state"):
            ops.list_jobs(conn, table, state="owned; DROP TABLE x")
        with pytest.raises(Q4MError, match="not a job id"):
            ops.get_job(conn, table, "1 OR 1=1")


def test_only_known_queue_tables_are_named(db: Engine) -> None:
    fill(db, ready=1, delayed=0)
    with db.connect() as conn:
        assert ops.check_queue_name(conn, TABLE) == TABLE
        for name in ("q4m_dead_letters", "nope", f"{TABLE}`; DROP TABLE {TABLE}; --"):
            with pytest.raises(QueueTableError):
                ops.check_queue_name(conn, name)


def test_dead_letters_list_show_retry_purge(db: Engine) -> None:
    number_table(db, TABLE)
    with db.begin() as conn:
        for n in (1, 2, 3):
            bury(
                conn,
                dead(conn),
                queue=TABLE,
                values={"id": new_job_id(), "n": n, "attempts": 2, "run_at": 0},
                error=f"error {n}",
                traceback="tb",
                attempts=3,
            )
    with db.connect() as conn:
        letters = ops.dead_letters(conn, queue=TABLE)
        assert [json.loads(d.payload)["n"] for d in letters] == [1, 2, 3]
        shown = ops.dead_letter(conn, letters[1].id)
        assert shown is not None and shown.error == "error 2"
        assert ops.dead_counts(conn) == {TABLE: 3}
        assert ops.retry_dead_letters(conn, TABLE, [letters[0].id]) == 1
        assert ops.purge_dead_letters(conn, TABLE, [letters[1].id]) == 1
        assert [d.id for d in ops.dead_letters(conn)] == [letters[2].id]
        table = reflect_queue_table(conn, TABLE)
        (row,) = conn.execute(select(table.c.n, table.c.attempts)).all()
        assert tuple(row) == (1, 0)
        conn.rollback()
        assert ops.purge_dead_letters(conn, TABLE) == 1
        assert ops.dead_counts(conn) == {}
        with pytest.raises(QueueTableError):
            ops.retry_dead_letters(conn, "not_a_queue")


def test_heartbeat_registers_beats_and_unregisters(db: Engine) -> None:
    held = [Holding(TABLE, str(new_job_id()), time.time() - 2)]
    beat = Heartbeat(
        db,
        name="p1",
        kind="threads",
        concurrency=4,
        processes=2,
        queues=lambda: [TABLE],
        in_hand=lambda: held,
        interval=0.2,
    )
    beat.start()
    try:
        (worker,) = wait_for(lambda: _workers(db), 10, "the worker's row")
        assert (worker.name, worker.pid, worker.queues) == ("p1", os.getpid(), [TABLE])
        assert (worker.concurrency, worker.processes, worker.lost) == (4, 2, False)
        for outcome in ("done", "done", "retried", "dead"):
            beat.observe(outcome, TABLE, 0.1)
        counted = wait_for(
            lambda: [w for w in _workers(db) if w.counts["done"] == 2 and w.in_hand], 10, "beat"
        )
        assert counted[0].counts["failed"] == 2
        assert [(t, i) for t, i, _ in counted[0].in_hand] == [(held[0].table, held[0].job_id)]
    finally:
        beat.stop()
    with db.connect() as conn:
        assert ops.workers(conn) == []  # a clean stop removes the row
        series = ops.throughput(conn, minutes=5)
    assert len(series) == 5
    assert sum(d for _, d, _ in series) == 2
    assert sum(f for _, _, f in series) == 2


def _workers(db: Engine) -> list[ops.WorkerInfo]:
    with db.connect() as conn:
        return ops.workers(conn)


def test_stale_workers_are_lost_then_pruned(db: Engine) -> None:
    beat = Heartbeat(
        db,
        name="q4m",
        kind="threads",
        concurrency=1,
        processes=1,
        queues=lambda: [TABLE],
        in_hand=lambda: [],
        interval=3600,
    )
    beat.register()
    registry = worker_registry_table()
    with db.begin() as conn:
        conn.execute(
            update(registry).values(heartbeat_at=text("UTC_TIMESTAMP() - INTERVAL 2 MINUTE"))
        )
    with db.connect() as conn:
        (worker,) = ops.workers(conn, stale_after=30)
        assert worker.lost and worker.heartbeat_age >= 119
        assert ops.prune_lost_workers(conn, older_than=3600) == 0
        assert ops.prune_lost_workers(conn, older_than=60) == 1
        assert ops.workers(conn) == []


@pytest.mark.acceptance
def test_q4m_workers_lists_a_running_worker_and_its_job(db: Engine, tmp_path: Path) -> None:
    table = number_table(db, "ops_records")
    with db.begin() as conn:
        conn.execute(insert(table), [{"n": 1}])
    url = db.url.render_as_string(hide_password=False)
    env = q4m_env(WORKER_TABLE="ops_records", WORKER_LOG=str(tmp_path / "log"), WORKER_SLEEP="30")
    worker = start_q4m(
        "worker",
        "worker_jobs:RecordJob",
        "--url",
        url,
        "--concurrency",
        "2",
        "--heartbeat",
        "0.3",
        env=env,
        output=tmp_path / "out",
    )
    try:

        def listed() -> list[dict[str, object]]:
            result = run_q4m("workers", "--url", url, "--json", env=q4m_env())
            assert result.returncode == 0, result.stderr
            rows = [json.loads(line) for line in result.stdout.splitlines()]
            return [r for r in rows if r["in_hand"]]

        (row,) = wait_for(listed, 60, "the worker with its job in hand")
        assert (row["pid"], row["queues"], row["concurrency"]) == (worker.pid, ["ops_records"], 2)
        assert row["in_hand"][0][0] == "ops_records" and not row["lost"]
        plain = run_q4m("workers", "--url", url, env=q4m_env())
        assert f"pid {worker.pid}" in plain.stdout and "in hand: ops_records" in plain.stdout
        worker.send_signal(signal.SIGINT)
        # two signals sent at once are one to the process (a pending signal does not queue):
        # the second goes once the first was handled
        wait_for(
            lambda: "signal received" in (tmp_path / "out").read_text(), 30, "the first SIGINT"
        )
        worker.send_signal(signal.SIGINT)  # second: return the job and exit now
        assert worker.wait(60) == EXIT_FORCED
        gone = run_q4m("workers", "--url", url, env=q4m_env())
        # a forced exit does not unregister: the row stays until its heartbeat is stale
        assert gone.returncode == 0
    finally:
        stop(worker)


@pytest.mark.acceptance
def test_a_clean_stop_removes_the_workers_row(db: Engine, tmp_path: Path) -> None:
    number_table(db, "ops_records")
    url = db.url.render_as_string(hide_password=False)
    env = q4m_env(WORKER_TABLE="ops_records", WORKER_LOG=str(tmp_path / "log"))
    worker = start_q4m(
        "worker",
        "worker_jobs:RecordJob",
        "--url",
        url,
        "--processes",
        "2",
        "--heartbeat",
        "0.3",
        env=env,
        output=tmp_path / "out",
    )
    try:
        rows = wait_for(lambda: len(_workers(db)) == 2 and _workers(db), 60, "two processes")
        assert sorted(w.name for w in rows) == ["p1", "p2"]
        assert all(w.processes == 2 for w in rows)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(60) == 0
        assert _workers(db) == []
    finally:
        stop(worker)


@pytest.mark.integration
def test_registry_tables_in_a_migration_match_the_ones_workers_create(server_url: URL) -> None:
    """Alembic: the tables in the user's MetaData are what autogenerate adds, and once a worker
    has created them on first use there is no difference left (``alembic check`` stays clean)."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from sqlalchemy import MetaData

    from sqlalchemy_q4m.worker.registry import ensure_registry_tables
    from sqlalchemy_q4m.worker.registry import throughput_table

    metadata = MetaData()
    worker_registry_table(metadata=metadata)
    throughput_table(metadata=metadata)
    for engine in private_database(server_url, f"q4m_ops_alembic_{os.getpid()}"):
        with engine.connect() as conn:
            diffs = compare_metadata(MigrationContext.configure(conn), metadata)
            added = sorted(d[1].name for d in diffs if d[0] == "add_table")
            assert added == ["q4m_throughput", "q4m_workers"]
            ensure_registry_tables(conn, *metadata.sorted_tables)
            assert compare_metadata(MigrationContext.configure(conn), metadata) == []


ASYNC_JOBS = """
import asyncio
import os

from sqlalchemy_q4m.worker.asyncio import AsyncJob


class HeldJob(AsyncJob):
    table_name = "ops_async"

    async def execute(self, job):
        while not os.path.exists(os.environ["OPS_GO"]):
            await asyncio.sleep(0.05)
"""


@pytest.mark.acceptance
def test_asyncio_workers_register_with_their_jobs_in_hand(db: Engine, tmp_path: Path) -> None:
    import subprocess
    import sys

    table = number_table(db, "ops_async")
    with db.begin() as conn:
        conn.execute(insert(table), [{"n": 1}, {"n": 2}])
    (tmp_path / "ops_async_jobs.py").write_text(ASYNC_JOBS)
    go = tmp_path / "go"
    env = q4m_env(OPS_GO=str(go))
    url = db.url.render_as_string(hide_password=False)
    command = ["worker", "ops_async_jobs:HeldJob", "--url", url, "--concurrency", "3"]
    with (tmp_path / "out").open("wb") as out:
        worker = subprocess.Popen(
            [sys.executable, "-m", "sqlalchemy_q4m", *command, "--heartbeat", "0.3"],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=out,
        )
    try:
        (row,) = wait_for(
            lambda: [w for w in _workers(db) if len(w.in_hand) == 2], 60, "two jobs in hand"
        )
        assert (row.kind, row.concurrency, row.pid) == ("asyncio", 3, worker.pid)
        assert {t for t, _, _ in row.in_hand} == {"ops_async"}
        go.write_text("")
        wait_for(lambda: [w for w in _workers(db) if w.counts["done"] == 2], 60, "done")
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(60) == 0
        assert _workers(db) == []
    finally:
        stop(worker)


@pytest.mark.unit
def test_a_registry_it_cannot_reach_warns_once_and_never_raises(
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine = create_engine("mysql+pymysql://root@127.0.0.1:1/nowhere")
    beat = Heartbeat(
        engine,
        name="q4m",
        kind="threads",
        concurrency=1,
        processes=1,
        queues=lambda: [TABLE],
        in_hand=lambda: [],
    )
    with caplog.at_level("DEBUG", logger="sqlalchemy_q4m.registry"):
        beat.register()
        beat.observe("done", TABLE, 0.1)
        beat.beat()
        beat.stop()  # writes the last minute: fails quietly too
    engine.dispose()
    assert not beat.registered
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "registering failed" in warnings[0].getMessage()
    assert [r.levelname for r in caplog.records].count("DEBUG") >= 2
    assert beat.tally.pending  # kept for a later try


def test_a_heartbeat_is_one_statement(db: Engine) -> None:
    from sqlalchemy import event

    beats = create_engine(db.url, isolation_level="AUTOCOMMIT")  # as the worker makes it
    sent: list[str] = []
    event.listen(beats, "before_cursor_execute", lambda *a: sent.append(a[2].split()[0]))
    beat = Heartbeat(
        beats,
        name="q4m",
        kind="threads",
        concurrency=1,
        processes=1,
        queues=lambda: [TABLE],
        in_hand=lambda: [],
    )
    beat.register()
    sent.clear()
    for _ in range(3):
        beat.beat()
    beat.stop()
    beats.dispose()
    assert sent == ["UPDATE"] * 3 + ["DELETE"]


def test_a_starting_worker_prunes_long_lost_ones(db: Engine) -> None:
    def heartbeat(name: str) -> Heartbeat:
        return Heartbeat(
            db,
            name=name,
            kind="threads",
            concurrency=1,
            processes=1,
            queues=lambda: [TABLE],
            in_hand=lambda: [],
        )

    heartbeat("old").register()
    heartbeat("recent").register()
    with db.begin() as conn:
        registry = worker_registry_table()
        for name, minutes in (("old", 61), ("recent", 5)):
            conn.execute(
                update(registry)
                .where(registry.c.name == name)
                .values(heartbeat_at=text(f"UTC_TIMESTAMP() - INTERVAL {minutes} MINUTE"))
            )
    minutes = throughput_table()
    with db.begin() as conn:
        conn.execute(
            insert(minutes),
            [
                {"minute": utcnow() - dt.timedelta(days=8), "queue": "old", "done": 1},
                {"minute": utcnow() - dt.timedelta(days=6), "queue": "kept", "done": 1},
            ],
        )
    heartbeat("new").register()
    found = {w.name: w.lost for w in _workers(db)}
    assert found == {"recent": True, "new": False}
    with db.connect() as conn:
        assert conn.execute(select(minutes.c.queue)).scalars().all() == ["kept"]


def test_q4m_dead_show(db: Engine, capsys: pytest.CaptureFixture[str]) -> None:
    from sqlalchemy_q4m.cli.commands import main

    number_table(db, TABLE)
    with db.begin() as conn:
        bury(
            conn,
            dead(conn),
            queue=TABLE,
            values={"id": new_job_id(), "n": 5},
            error="RuntimeError: boom",
            traceback="Traceback (most recent call last):\nRuntimeError: boom",
            attempts=3,
        )
    with db.connect() as conn:
        (letter,) = ops.dead_letters(conn)
    url = db.url.render_as_string(hide_password=False)
    assert main(["dead", "show", str(letter.id), "--url", url]) == 0
    out = capsys.readouterr().out
    assert "RuntimeError: boom" in out and '{"n": 5}' in out and "Traceback" in out
    assert main(["dead", "show", str(letter.id), "--url", url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["attempts"] == 3
    assert main(["dead", "show", "999", "--url", url]) == 2
    assert "no dead letter #999" in capsys.readouterr().err
