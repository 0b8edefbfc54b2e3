"""The ``q4m`` command line against a real Q4M server: stats, enqueue, dead, demo.

The dead-letter scenarios of ``test_retry_cli.py`` run here again with a database of this
module's own on the Q4M server (fixtures ``db_url`` and ``engine`` below); ``stats`` and the
demo have native tests of their own.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import pytest
import test_retry_cli as portable
from native_support import native_engine
from native_support import private_database
from sqlalchemy import Engine
from sqlalchemy import Table
from sqlalchemy import select
from sqlalchemy import text
from sqlalchemy.engine import URL
from worker_support import q4m_env
from worker_support import run_q4m

from sqlalchemy_q4m import QueueAbort
from sqlalchemy_q4m import queue_session
from sqlalchemy_q4m import queue_stats
from sqlalchemy_q4m.cli.commands import main
from sqlalchemy_q4m.worker.deadletter import dead_letter_table

# The portable module's scenarios, collected here again with this module's fixtures.
table = portable.table
test_a_job_failing_twice_runs_three_times = portable.test_a_job_failing_twice_runs_three_times
test_an_always_failing_job_is_dead_lettered_and_dead_retry_brings_it_back = (
    portable.test_an_always_failing_job_is_dead_lettered_and_dead_retry_brings_it_back
)
test_dead_purge = portable.test_dead_purge

pytestmark = [pytest.mark.native, pytest.mark.acceptance]

TABLE = portable.TABLE
DEAD = portable.DEAD
#: The engine's own counters, in the order ``queue_stats()`` prints them.
Q4M_COUNTERS = [
    "rows_written",
    "rows_removed",
    "wait_immediate",
    "wait_delayed",
    "wait_timeout",
    "restored_by_abort",
    "restored_by_close",
    "bytes_total",
    "bytes_removed",
]


@pytest.fixture(scope="module")
def db_url(q4m_url: URL) -> Iterator[URL]:
    with private_database(q4m_url, "q4m_native_cli") as url:
        yield url


@pytest.fixture(scope="module")
def engine(db_url: URL) -> Iterator[Engine]:
    with native_engine(db_url, 5) as eng:
        yield eng


@pytest.fixture
def foreign(engine: Engine) -> Iterator[str]:
    """A QUEUE table that is not a library queue table (no job id): someone else's queue."""
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE tnc_foreign (n INT NOT NULL) ENGINE=QUEUE"))
        conn.execute(text("INSERT INTO tnc_foreign VALUES (1)"))
    yield "tnc_foreign"
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE IF EXISTS tnc_foreign"))


def url_of(db_url: URL) -> str:
    return db_url.render_as_string(hide_password=False)


def q4m(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run ``main(args)`` in-process; returns (exit code, stdout, stderr)."""
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_stats_lists_the_queues_with_the_engine_counters_and_names_skipped_tables(
    db_url: URL,
    engine: Engine,
    table: Table,
    foreign: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("Q4M_URL", url_of(db_url))
    monkeypatch.setenv("Q4M_DEAD_TABLE", DEAD)
    monkeypatch.setattr("sys.stdin", io.StringIO('{"n": 1}\n{"n": 2}\n{"n": 3}\n'))
    code, out, _ = q4m(capsys, "enqueue", TABLE)
    assert (code, out) == (0, f"enqueued 3 job(s) into {TABLE}\n")
    assert q4m(capsys, "enqueue", TABLE, "--json", '{"n": 4}', "--delay", "600")[0] == 0
    with queue_session(table, bind=engine, timeout=5) as job:
        assert job is not None and job.n == 1
        code, out, err = q4m(capsys, "stats", "--json")
        raise QueueAbort  # job 1 goes back: restored_by_abort 1

    assert code == 0, err
    assert f"skipped {foreign}" in err and "job id" in err
    (stats,) = json.loads(out)
    counters = stats.pop("q4m")
    assert stats == {
        "table": TABLE,
        "backend": "native",
        "queued": 2,
        "delayed": 1,
        "owned": 1,
        "dead": 0,
        "unique_keys": 0,
        "schedules": 0,
    }
    assert list(counters) == Q4M_COUNTERS
    assert all(isinstance(v, int) for v in counters.values())
    assert counters["rows_written"] == 4 and counters["rows_removed"] == 0
    assert counters["wait_immediate"] == 1 and counters["bytes_total"] > 0

    code, out, err = q4m(capsys, "stats")
    assert code == 0 and f"skipped {foreign}" in err
    header, row, *engine_lines = out.splitlines()
    assert header.split() == ["table", "queued", "delayed", "owned", "dead", "backend"]
    assert row.split() == [TABLE, "3", "1", "0", "0", "native"]
    shown = dict(line.split() for line in engine_lines)
    assert list(shown) == Q4M_COUNTERS
    assert shown["rows_written"] == "4" and shown["restored_by_abort"] == "1"

    code, _, err = q4m(capsys, "stats", foreign)  # a table asked for by name: an error
    assert code == 2 and foreign in err and "job id" in err

    with engine.connect() as conn:  # the function itself gives text, not the driver's bytes
        raw = conn.execute(select(queue_stats(TABLE))).scalar()
    assert isinstance(raw, str) and raw.startswith("rows_written: 4\n")


def test_demo_on_q4m(db_url: URL, engine: Engine) -> None:
    env = q4m_env(Q4M_URL=url_of(db_url), Q4M_DEAD_TABLE=DEAD)
    args = ["demo", "--jobs", "20", "--processes", "1", "--concurrency", "3"]
    result = run_q4m(*args, "--table", "tnc_shell_jobs", env=env, timeout=120)
    try:
        assert result.returncode == 0, result.stderr[-3000:]
        summary = result.stdout
        assert "table tnc_shell_jobs created" in summary and "native backend" in summary
        for line in ("enqueued       20", "done           19", "dead           1"):
            assert line in summary
        assert "left in queue  0" in summary
        with engine.connect() as conn:
            engine_name = conn.execute(
                text(
                    "SELECT ENGINE FROM information_schema.TABLES "
                    "WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'tnc_shell_jobs'"
                )
            ).scalar()
            (letter,) = conn.execute(select(dead_letter_table(DEAD))).all()
        assert str(engine_name).upper() == "QUEUE"
        assert letter.queue == "tnc_shell_jobs" and "disk full" in letter.error
    finally:
        with engine.begin() as conn:
            conn.execute(text("DROP TABLE IF EXISTS tnc_shell_jobs"))
        dead_letter_table(DEAD).drop(engine, checkfirst=True)
