"""Helpers for tests that run ``q4m`` as a subprocess: run it, start it, wait, make tables."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import Column
from sqlalchemy import Engine
from sqlalchemy import Integer
from sqlalchemy import MetaData
from sqlalchemy import Table
from sqlalchemy import func
from sqlalchemy import select

from sqlalchemy_q4m import queue_table
from sqlalchemy_q4m.schema.retry import retry_columns

HERE = Path(__file__).parent


def q4m_env(**extra: str) -> dict[str, str]:
    """The environment without any inherited ``Q4M_*`` setting, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("Q4M_")}
    env.update(extra)
    return env


def q4m_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "sqlalchemy_q4m", *args]


def run_q4m(
    *args: str, env: dict[str, str] | None = None, input: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m sqlalchemy_q4m ARGS`` in ``tests/`` and capture its output."""
    return subprocess.run(
        q4m_command(*args),
        cwd=HERE,
        env=env if env is not None else q4m_env(),
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def start_q4m(*args: str, env: dict[str, str], output: Path) -> subprocess.Popen[bytes]:
    """Start ``q4m ARGS`` in ``tests/`` with stdout and stderr going to ``output``."""
    with output.open("ab") as sink:
        return subprocess.Popen(q4m_command(*args), cwd=HERE, env=env, stdout=sink, stderr=sink)


def wait_for(check: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``check`` until it returns something true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def number_table(engine: Engine, name: str) -> Table:
    """A fresh queue table ``name(n INT, attempts, run_at)``."""
    metadata = MetaData()
    table = queue_table(name, metadata, Column("n", Integer, nullable=False), *retry_columns())
    metadata.drop_all(engine)
    metadata.create_all(engine)
    return table


def count_rows(engine: Engine, table: Table) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar() or 0)


def stop(process: subprocess.Popen[bytes]) -> None:
    """Make sure a process the test started is gone (SIGKILL if it is still running)."""
    if process.poll() is None:
        process.kill()
    process.wait(30)
