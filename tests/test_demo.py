"""``q4m demo``'s job class logs a failing shell command in one line (the demo's deliberate
failures), while any other error keeps its traceback; run through the worker on the server.
(The whole demo runs in ``test_retry_cli.py``.)"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Column
from sqlalchemy import Engine
from sqlalchemy import MetaData
from sqlalchemy import Table
from sqlalchemy import Text
from sqlalchemy import insert
from sqlalchemy import select

from sqlalchemy_q4m import queue_table
from sqlalchemy_q4m.cli.demo import ShellJob
from sqlalchemy_q4m.cli.demo import deliberate_failures
from sqlalchemy_q4m.cli.demo import demo_commands
from sqlalchemy_q4m.worker.deadletter import dead_letter_table

pytestmark = pytest.mark.integration

TABLE = "test_demo_shell_jobs"
DEAD = "test_demo_dead_letters"


@pytest.fixture
def table(engine: Engine) -> Iterator[Table]:
    # no attempts/run_at columns: a failure is dead-lettered at once
    table = queue_table(TABLE, MetaData(), Column("command", Text, nullable=False))
    table.create(engine)
    yield table
    table.drop(engine)
    dead_letter_table(DEAD).drop(engine, checkfirst=True)


class BrokenShellJob(ShellJob):
    """A bug in a job: not the command's failure."""

    def execute(self, job: Any) -> None:
        raise KeyError("a bug")


def run_one(engine: Engine, table: Table, job_class: type[ShellJob], command: str) -> str:
    with engine.begin() as conn:
        conn.execute(insert(table), [{"command": command}])
    job = job_class(engine, table_name=TABLE, dead_letter_table=DEAD)
    assert job.run_once(timeout=10)
    with engine.connect() as conn:
        (error,) = conn.execute(select(dead_letter_table(DEAD).c.error)).scalars().all()
    with engine.begin() as conn:
        conn.execute(dead_letter_table(DEAD).delete())
    return str(error)


def failure_lines(caplog: pytest.LogCaptureFixture, job_class: type[ShellJob]) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == f"sqlalchemy_q4m.job.{job_class.__name__}" and "failed on attempt" in r.msg
    ]


def test_a_failing_command_is_logged_in_one_line(
    engine: Engine, table: Table, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR):
        error = run_one(engine, table, ShellJob, "echo 'job 7: disk full' >&2; exit 3")
    assert error == "CommandFailed: exit status 3: job 7: disk full"
    (line,) = failure_lines(caplog, ShellJob)
    assert "\n" not in line and "Traceback" not in line
    assert re.fullmatch(
        rf"{TABLE} \S+: failed on attempt 1/1 after [0-9.]+s: "
        "CommandFailed: exit status 3: job 7: disk full",
        line,
    ), line


def test_any_other_error_keeps_its_traceback(
    engine: Engine, table: Table, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR):
        error = run_one(engine, table, BrokenShellJob, "true")
    assert error == "KeyError: 'a bug'"
    (message,) = failure_lines(caplog, BrokenShellJob)
    assert "Traceback (most recent call last):" in message
    assert 'raise KeyError("a bug")' in message


@pytest.mark.unit
def test_the_jobs_failing_on_purpose_are_the_ones_named() -> None:
    commands = demo_commands(200, "/nonexistent")
    flaky, doomed = deliberate_failures(200)
    assert flaky == [25, 50, 75, 100, 125, 150, 175] and doomed == 200
    failing = [n for n, c in enumerate(commands, 1) if "exit" in c]
    assert failing == [*flaky, doomed]
    assert deliberate_failures(1) == ([], None)
    assert deliberate_failures(25) == ([], 25)
