"""Retries and dead letters through real worker processes and ``q4m dead``; and ``q4m demo``."""

from __future__ import annotations

import collections
import contextlib
import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlalchemy import Table
from sqlalchemy import select
from sqlalchemy.engine import URL
from worker_jobs import read_log
from worker_support import count_rows
from worker_support import number_table
from worker_support import q4m_env
from worker_support import run_q4m

from sqlalchemy_q4m.cli.commands import main
from sqlalchemy_q4m.worker.deadletter import dead_letter_table

pytestmark = pytest.mark.acceptance

TABLE = "trc_jobs"
DEAD = "trc_dead_letters"


@pytest.fixture
def table(engine: Engine) -> Iterator[Table]:
    table = number_table(engine, TABLE)
    yield table
    table.drop(engine)
    dead_letter_table(DEAD).drop(engine, checkfirst=True)


def url_of(db_url: URL) -> str:
    return db_url.render_as_string(hide_password=False)


def flaky_worker(db_url: URL, log: Path, failures: int, *extra: str) -> None:
    env = q4m_env(
        WORKER_LOG=str(log),
        WORKER_TABLE=TABLE,
        WORKER_FAILURES=str(failures),
        Q4M_DEAD_TABLE=DEAD,
        Q4M_RETRY_BASE="0",
    )
    args = ["worker", "worker_jobs:FlakyJob", "--url", url_of(db_url), "--burst", *extra]
    result = run_q4m(*args, "--concurrency", "2", env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


def dead(db_url: URL, *args: str) -> str:
    """``q4m dead ARGS`` in-process (the workers above are the subprocesses)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["dead", *args, "--url", url_of(db_url), "--dead-table", DEAD])
    assert code == 0
    return out.getvalue()


def enqueue(db_url: URL, *numbers: int) -> None:
    with contextlib.redirect_stdout(io.StringIO()):
        for n in numbers:
            assert main(["enqueue", TABLE, "--url", url_of(db_url), "--json", f'{{"n": {n}}}']) == 0


def test_a_job_failing_twice_runs_three_times(
    db_url: URL, engine: Engine, table: Table, tmp_path: Path
) -> None:
    enqueue(db_url, 1)
    log = tmp_path / "jobs.log"
    flaky_worker(db_url, log, 2, "--max-attempts", "3")
    events = collections.Counter(e for e, _, _ in read_log(str(log)))
    assert events == {"run": 3, "done": 1}
    assert count_rows(engine, table) == 0
    assert dead(db_url, "list") == "no dead letters\n"


def test_an_always_failing_job_is_dead_lettered_and_dead_retry_brings_it_back(
    db_url: URL, engine: Engine, table: Table, tmp_path: Path
) -> None:
    enqueue(db_url, 7)
    log = tmp_path / "jobs.log"
    flaky_worker(db_url, log, -1, "--max-attempts", "2")
    assert [e for e, _, _ in read_log(str(log))] == ["run", "run"]
    assert count_rows(engine, table) == 0
    (letter,) = [json.loads(line) for line in dead(db_url, "list", "--json").splitlines()]
    assert letter["queue"] == TABLE and letter["attempts"] == 2
    assert letter["error"] == "RuntimeError: flaky job 7 failing on attempt 2"
    assert json.loads(letter["payload"]) == {"n": 7}
    assert "Traceback (most recent call last)" in letter["traceback"]
    assert letter["enqueued_at"] and letter["failed_at"]
    assert f"#{letter['id']} {TABLE}" in dead(db_url, "list", TABLE)

    assert dead(db_url, "retry", TABLE) == f"requeued 1 dead job(s) into {TABLE}\n"
    with engine.connect() as conn:
        (row,) = conn.execute(select(table)).all()
    assert (row.n, row.attempts, row.run_at) == (7, 0, 0)
    assert dead(db_url, "list") == "no dead letters\n"
    flaky_worker(db_url, log, 0)  # fixed: it runs once more and succeeds
    assert read_log(str(log))[-1][:2] == ("done", 7)
    assert count_rows(engine, table) == 0


def test_dead_purge(db_url: URL, engine: Engine, table: Table, tmp_path: Path) -> None:
    enqueue(db_url, 1, 2, 3)
    flaky_worker(db_url, tmp_path / "jobs.log", -1, "--max-attempts", "1")
    ids = [json.loads(line)["id"] for line in dead(db_url, "list", "--json").splitlines()]
    assert len(ids) == 3
    assert dead(db_url, "purge", TABLE, "--id", str(ids[0])) == f"purged 1 dead job(s) of {TABLE}\n"
    assert dead(db_url, "purge", TABLE) == f"purged 2 dead job(s) of {TABLE}\n"
    assert dead(db_url, "list") == "no dead letters\n"


def test_demo_runs_and_reuses_its_table_safely(db_url: URL, engine: Engine) -> None:
    env = q4m_env(Q4M_URL=url_of(db_url), Q4M_DEAD_TABLE=DEAD)
    args = ["demo", "--jobs", "30", "--processes", "1", "--concurrency", "3"]
    result = run_q4m(*args, "--table", "trc_shell_jobs", env=env, timeout=120)
    try:
        assert result.returncode == 0, result.stderr[-3000:]
        summary = result.stdout
        assert "table trc_shell_jobs created" in summary
        # the failures on purpose are named up front and logged in one line each
        assert "on purpose: job(s) 25 fail once, then pass when retried; job 30 fails" in summary
        assert result.stderr.count("CommandFailed: exit status") == 4
        assert "Traceback" not in result.stderr
        assert "portable backend" in summary
        for line in (
            "enqueued       30",
            "done           29",
            "dead           1",
            "left in queue  0",
        ):
            assert line in summary
        assert "dead letter #" in summary and "disk full" in summary
        with engine.connect() as conn:
            (letter,) = conn.execute(select(dead_letter_table(DEAD))).all()
        assert letter.queue == "trc_shell_jobs" and letter.attempts == 3
        assert "disk full" in letter.error
        with engine.begin() as conn:  # a table holding jobs is never run by the demo
            from sqlalchemy_q4m.ops import enqueue_rows
            from sqlalchemy_q4m.schema.reflect import reflect_queue_table

            enqueue_rows(conn, reflect_queue_table(conn, "trc_shell_jobs"), [{"command": "true"}])
        refused = run_q4m(*args, "--table", "trc_shell_jobs", env=env)
        assert refused.returncode == 2 and "already holds 1 job(s)" in refused.stderr
    finally:
        with engine.begin() as conn:
            from sqlalchemy import text

            conn.execute(text("DROP TABLE IF EXISTS trc_shell_jobs"))
        dead_letter_table(DEAD).drop(engine, checkfirst=True)
