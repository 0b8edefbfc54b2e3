"""The benchmark entry point, run as users run it, in its tiny mode against the test database.

Asserts that the report is written with the machine header and every scenario row, and that
each figure and ratio is a positive number.  Wall-clock figures are never asserted: they
depend on the machine, not on the code.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import create_engine
from sqlalchemy import inspect
from sqlalchemy.engine import URL
from sqlalchemy.pool import NullPool

pytestmark = pytest.mark.acceptance

ROOT = Path(__file__).resolve().parent.parent

#: (section, scenario text) of every row the tiny run must produce.
EXPECTED = [
    ("enqueue", "bulk: `enqueue(engine"),
    ("enqueue", "bulk: ORM"),
    ("enqueue", "one job per transaction"),
    *[
        ("consume", f"`queue_session(bind=connection)`, {label}")
        for label in (
            "1 thread",
            "2 threads",
            "4 threads",
            "8 threads",
            "1 process",
            "2 processes",
            "4 processes",
            "8 processes",
        )
    ],
    ("consume", "`queue_session(bind=engine)`"),
    ("latency", "pickup p50"),
    ("latency", "pickup p99"),
    ("latency", "commands/s sent by an idle worker"),
    ("memory", "peak RSS of a worker process, 4 threads"),
    ("batched", "`queue_batch(size=50)`, 1 thread"),
    ("batched", "`queue_batch(size=50)`, 2 processes"),
    ("batched", "worker runtime, batch_size=50, 1 thread"),
    ("batched", "worker runtime, batch_size=50, 2 processes"),
]


def test_tiny_run_writes_every_row(db_url: URL, tmp_path: Path) -> None:
    output = tmp_path / "RESULTS.md"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--tiny",
            "--url",
            db_url.render_as_string(hide_password=False),
            "--output",
            str(output),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = output.read_text()
    assert "## Errors" not in report
    assert re.search(r"- 2 cores|- \d+ cores", report)
    assert "innodb_flush_log_at_trx_commit=" in report and "sync_binlog=" in report
    rows = [line.split(" | ") for line in report.splitlines() if line.startswith("| ")][1:]
    for section, scenario in EXPECTED:
        matching = [r for r in rows if r[0] == f"| {section}" and r[1].startswith(scenario)]
        assert len(matching) == 1, f"no single row for {section}: {scenario}\n{report}"
        library, raw, ratio = (float(matching[0][i].replace(",", "")) for i in (2, 3, 5))
        assert library > 0 and raw > 0 and ratio > 0, matching[0]
    # the benchmark cleans up after itself: its table is gone from the test database
    assert "q4m_bench_jobs" not in _tables(db_url)


def _tables(url: URL) -> list[str]:
    engine = create_engine(url, poolclass=NullPool)
    try:
        return inspect(engine).get_table_names()
    finally:
        engine.dispose()
