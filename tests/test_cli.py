"""The ``q4m`` command line: enqueue, stats, help and every error path (exit 2, one line)."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlalchemy import Table
from sqlalchemy import select
from sqlalchemy.engine import URL
from worker_support import count_rows
from worker_support import number_table
from worker_support import q4m_env
from worker_support import run_q4m

from sqlalchemy_q4m.cli.commands import main
from sqlalchemy_q4m.cli.parser import build_parser

TABLE = "tcli_jobs"
DEAD = "tcli_dead_letters"


@pytest.fixture
def table(engine: Engine) -> Iterator[Table]:
    table = number_table(engine, TABLE)
    yield table
    table.drop(engine)


def url_of(db_url: URL) -> str:
    return db_url.render_as_string(hide_password=False)


def q4m(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run ``main(args)`` in-process; returns (exit code, stdout, stderr)."""
    try:
        code = main(list(args))
    except SystemExit as exit_:  # argparse's own exits (--help, usage errors)
        code = int(exit_.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def assert_usage_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    assert re.match(r"^q4m( [a-z]+)*: error: ", err) and err.count("\n") == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err


@pytest.mark.unit
def test_every_option_names_its_environment_variable() -> None:
    parser = build_parser()
    subparsers = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    checked = 0
    for name, sub in subparsers.items():
        nested = [a for a in sub._actions if a.__class__.__name__ == "_SubParsersAction"]
        parsers = list(nested[0].choices.values()) if nested else [sub]
        for p in parsers:
            for action in p._actions:
                if action.option_strings and action.dest != "help":
                    assert "[env Q4M_" in (action.help or ""), (name, action.dest)
                    checked += 1
    assert checked >= 20


@pytest.mark.acceptance
def test_help_and_errors_from_the_real_entry_point(db_url: URL, table: Table) -> None:
    result = run_q4m("worker", "--help")
    assert result.returncode == 0
    for env in ("Q4M_URL", "Q4M_CONCURRENCY", "Q4M_PROCESSES", "Q4M_GRACE", "Q4M_BURST"):
        assert env in result.stdout
    bad = run_q4m("worker", "worker_jobs:NotAJob", "--url", url_of(db_url))
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == [bad.stderr.strip()]
    assert "is not a sqlalchemy_q4m.Job subclass" in bad.stderr
    env = q4m_env(Q4M_URL=url_of(db_url))
    missing = run_q4m("enqueue", "no_such_table", "--json", '{"n": 1}', env=env)
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    assert "Traceback" not in missing.stderr
    env_bad = run_q4m("worker", "x:Y", env=q4m_env(Q4M_CONCURRENCY="many"))
    assert env_bad.returncode == 2 and "many" in env_bad.stderr


@pytest.mark.integration
def test_enqueue_json_and_stdin_then_stats(
    db_url: URL,
    engine: Engine,
    table: Table,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = url_of(db_url)
    code, out, _ = q4m(capsys, "enqueue", TABLE, "--url", url, "--json", '{"n": 1}')
    assert code == 0 and out == f"enqueued 1 job(s) into {TABLE}\n"
    import io

    lines = "".join(json.dumps({"n": n}) + "\n" for n in range(2, 12)) + "\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(lines))
    code, out, _ = q4m(capsys, "enqueue", TABLE, "--url", url, "--batch-size", "3")
    assert code == 0 and "enqueued 10 job(s)" in out
    code, out, _ = q4m(
        capsys, "enqueue", TABLE, "--url", url, "--json", '{"n": 99}', "--delay", "600"
    )
    assert code == 0
    with engine.connect() as conn:
        numbers = conn.execute(select(table.c.n, table.c.run_at)).all()
    assert sorted(n for n, _ in numbers) == [*range(1, 12), 99]
    assert next(r for n, r in numbers if n == 99) >= int(time.time()) + 590
    monkeypatch.setenv("Q4M_URL", url)
    code, out, _ = q4m(capsys, "stats", "--json", "--dead-table", DEAD)
    assert code == 0
    stats = {s["table"]: s for s in json.loads(out)}
    assert stats[TABLE] == {
        "table": TABLE,
        "backend": "portable",
        "queued": 11,
        "delayed": 1,
        "owned": 0,
        "dead": 0,
        "unique_keys": 0,
        "schedules": 0,
    }
    code, out, _ = q4m(capsys, "stats", TABLE)
    assert code == 0
    header, row = out.splitlines()
    assert header.split() == ["table", "queued", "delayed", "owned", "dead", "backend"]
    assert row.split() == [TABLE, "11", "1", "0", "0", "portable"]


@pytest.mark.integration
@pytest.mark.parametrize(
    ("args", "stdin", "needles"),
    [
        (["enqueue", TABLE, "--json", "{bad"], None, ["--json line 1: invalid JSON"]),
        (["enqueue", TABLE, "--json", "[1, 2]"], None, ["a job is a JSON object"]),
        (["enqueue", TABLE, "--json", '{"nope": 1}'], None, ["has no column 'nope'"]),
        (["enqueue", TABLE, "--json", '{"id": "x", "n": 1}'], None, ["job id"]),
        (["enqueue", TABLE, "--json", '{"n": [1]}'], None, ["takes an integer"]),
        (["enqueue", TABLE], '{"n": 1}\n{"n": 2\n', ["stdin line 2: invalid JSON"]),
        (["enqueue", "missing_table", "--json", "{}"], None, ["'missing_table' does not exist"]),
        (["enqueue", "bad name!", "--json", "{}"], None, ["invalid table name"]),
        (["stats", "missing_table"], None, ["does not exist"]),
        (["dead", "retry", "missing_table"], None, ["does not exist"]),
        (["dead", "list", "missing_table"], None, ["does not exist"]),
        (["worker", "worker_jobs:NotAJob"], None, ["not a sqlalchemy_q4m.Job subclass"]),
        (["worker", "no_such_module_x:Job"], None, ["cannot import 'no_such_module_x'"]),
        (["worker", "worker_jobs:Missing"], None, ["has no 'Missing'"]),
        (["worker", "worker_jobs"], None, ["write it as module:Class"]),
        (["worker", "sqlalchemy_q4m.cli.demo:ShellJob"], None, ["'shell_jobs' does not exist"]),
        (["worker", "worker_jobs:RecordJob", "--concurrency", "0"], None, ["must be >= 1"]),
        (["worker", "worker_jobs:RecordJob", "--grace", "soon"], None, ["not a number"]),
        (["worker", "worker_jobs:RecordJob", "--log-level", "LOUD"], None, ["log level"]),
        (["frobnicate"], None, ["invalid choice"]),
        (["worker"], None, ["required"]),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    db_url: URL,
    table: Table,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    stdin: str | None,
    needles: list[str],
) -> None:
    import io
    import sys
    from pathlib import Path

    monkeypatch.setenv("Q4M_URL", url_of(db_url))
    monkeypatch.setattr(sys, "path", [str(Path(__file__).parent), *sys.path])
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code, _, err = q4m(capsys, *args)
    assert_usage_error(code, err, *needles)
    assert count_rows_safe(table) == 0


def count_rows_safe(table: Table) -> int:
    """Nothing was enqueued by a rejected command (checked through a fresh engine)."""
    import os

    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    url = os.environ["Q4M_URL"]
    engine = create_engine(url, poolclass=NullPool)
    try:
        return count_rows(engine, table)
    finally:
        engine.dispose()


@pytest.mark.integration
@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("not a url", "bad database URL"),
        ("nosuchdialect://x/y", "bad database URL"),
        ("mysql+pymysql://root@127.0.0.1:1/test", "cannot use the database"),
    ],
)
def test_bad_urls(capsys: pytest.CaptureFixture[str], url: str, needle: str) -> None:
    for args in (
        ["worker", "sqlalchemy_q4m.cli.demo:ShellJob", "--url", url],
        ["enqueue", TABLE, "--url", url, "--json", "{}"],
        ["stats", "--url", url],
        ["dead", "list", "--url", url],
    ):
        code, _, err = q4m(capsys, *args)
        assert_usage_error(code, err)
        if args[0] == "worker":
            assert needle in err


@pytest.mark.integration
def test_enqueue_delay_needs_a_run_at_column(
    engine: Engine, db_url: URL, capsys: pytest.CaptureFixture[str]
) -> None:
    from sqlalchemy import Column
    from sqlalchemy import Integer
    from sqlalchemy import MetaData

    from sqlalchemy_q4m import queue_table

    metadata = MetaData()
    plain: Any = queue_table("tcli_plain", metadata, Column("n", Integer))
    metadata.create_all(engine)
    try:
        code, _, err = q4m(
            capsys, "enqueue", "tcli_plain", "--url", url_of(db_url), "--json", "{}", "--delay", "5"
        )
        assert_usage_error(code, err, "needs a 'run_at' column")
    finally:
        plain.drop(engine)


@pytest.mark.integration
def test_stats_counts_a_job_in_hand_as_owned(
    db_url: URL, engine: Engine, table: Table, capsys: pytest.CaptureFixture[str]
) -> None:
    from sqlalchemy_q4m import queue_session

    url = url_of(db_url)
    for n in (1, 2):
        assert q4m(capsys, "enqueue", TABLE, "--url", url, "--json", f'{{"n": {n}}}')[0] == 0
    with queue_session(table, bind=engine, timeout=2) as job:
        assert job is not None
        code, out, _ = q4m(capsys, "stats", TABLE, "--url", url, "--json")
        assert code == 0
        (stats,) = json.loads(out)
        assert (stats["queued"], stats["owned"]) == (1, 1)
    code, out, _ = q4m(capsys, "stats", TABLE, "--url", url, "--json")
    (stats,) = json.loads(out)
    assert (stats["queued"], stats["owned"]) == (1, 0)


@pytest.mark.unit
def test_q4m_stats_text_is_parsed_or_kept_raw() -> None:
    from sqlalchemy_q4m.ops import parse_q4m_stats

    text = "rows_written=10\nrows_removed=4\nwait_immediate=3\n"
    assert parse_q4m_stats(text) == {"rows_written": 10, "rows_removed": 4, "wait_immediate": 3}
    # what the engine returns (bytes with PyMySQL): "key: value" lines
    raw = b"rows_written: 2\nrows_removed: 0\nbytes_total: 52\n"
    assert parse_q4m_stats(raw) == {"rows_written": 2, "rows_removed": 0, "bytes_total": 52}
    assert parse_q4m_stats("something else") == {"raw": "something else"}
    assert parse_q4m_stats("") == {}
    assert parse_q4m_stats(None) == {}


@pytest.mark.unit
def test_dead_ids_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("Q4M_DEAD_ID", "3, 4")
    args = build_parser().parse_args(["dead", "purge", "t"])
    assert args.ids == [3, 4]
    monkeypatch.setenv("Q4M_DEAD_ID", "x")
    code, _, err = q4m(capsys, "dead", "purge", "t")
    assert_usage_error(code, err, "Q4M_DEAD_ID")


@pytest.mark.integration
def test_the_demo_creates_a_missing_database(db_url: URL, engine: Engine) -> None:
    from sqlalchemy import create_engine
    from sqlalchemy import text
    from sqlalchemy.pool import NullPool

    from sqlalchemy_q4m.cli.demo import _ensure_database

    name = f"{db_url.database}_demo"
    demo_engine = create_engine(db_url.set(database=name), poolclass=NullPool)
    try:
        _ensure_database(demo_engine)
        with demo_engine.connect() as conn:
            assert conn.execute(text("SELECT DATABASE()")).scalar() == name
        _ensure_database(demo_engine)  # exists now: nothing to do
    finally:
        demo_engine.dispose()
        with engine.begin() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS `{name}`"))
