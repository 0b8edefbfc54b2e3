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
    ("enqueue", "one job per call"),
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


#: Every row of the native section: enqueue, and each library consumer at every concurrency.
NATIVE_EXPECTED = [
    ("enqueue", "bulk: `enqueue(engine"),
    ("enqueue", "bulk: ORM"),
    ("enqueue", "one job per call"),
    ("enqueue", "one job per transaction"),
    *[
        ("consume", f"{consumer}, {label}")
        for consumer in (
            "`queue_session(bind=connection)`",
            "`queue_session(bind=engine)`",
            "worker runtime `Job.run_once`",
        )
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
    *[
        ("statements", f"commands sent per job, {consumer}, 1 thread")
        for consumer in (
            "`queue_session(bind=connection)`",
            "`queue_session(bind=engine)`",
            "worker runtime `Job.run_once`",
        )
    ],
]


@pytest.mark.native
def test_quick_native_run_on_a_q4m_server(q4m_url: URL, tmp_path: Path) -> None:
    """``--url`` naming a Q4M server: the server's QUEUE engine selects the native scenarios
    (before, the portable backend was forced, the tables were InnoDB and every consume
    failed with QueueWaitError); their section goes into an existing report, which keeps
    the rest."""
    output = tmp_path / "RESULTS.md"
    output.write_text("# sqlalchemy-q4m benchmarks\n\nthe portable part, kept\n")
    server = q4m_url.set(database=None)
    before = _databases(server)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--quick",
            "--url",
            server.render_as_string(hide_password=False),
            "--output",
            str(output),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "backend: native" in done.stderr
    report = output.read_text()
    assert report.startswith("# sqlalchemy-q4m benchmarks\n\nthe portable part, kept\n")
    section = report[report.index("## Native backend (Q4M, `ENGINE=QUEUE`)") :]
    assert "### Errors" not in section and "with Q4M plugin" in section
    rows = [line.split(" | ") for line in section.splitlines() if line.startswith("| ")][1:]
    assert len(rows) == len(NATIVE_EXPECTED), section
    for section_name, scenario in NATIVE_EXPECTED:
        matching = [r for r in rows if r[0] == f"| {section_name}" and r[1].startswith(scenario)]
        assert len(matching) == 1, f"no single row for {section_name}: {scenario}\n{section}"
        library, raw, ratio = (float(matching[0][i].replace(",", "")) for i in (2, 3, 5))
        assert library > 0 and raw > 0 and ratio > 0, matching[0]
    # the benchmark made its own database on the Q4M server and dropped it
    assert {d for d in _databases(server) - before if d.startswith("q4m_bench_")} == set()


def _databases(url: URL) -> set[str]:
    engine = create_engine(url, poolclass=NullPool)
    try:
        return set(inspect(engine).get_schema_names())
    finally:
        engine.dispose()


@pytest.mark.unit
def test_the_native_section_is_replaced_and_kept() -> None:
    """A native run replaces only its own section; a portable run's report keeps it."""
    from benchmarks.__main__ import NATIVE_BEGIN
    from benchmarks.__main__ import NATIVE_END
    from benchmarks.__main__ import merge_native
    from benchmarks.__main__ import native_section

    first = f"{NATIVE_BEGIN}\n## Native\nrun 1\n{NATIVE_END}\n"
    second = f"{NATIVE_BEGIN}\n## Native\nrun 2\n{NATIVE_END}\n"
    portable = "# sqlalchemy-q4m benchmarks\n\nthe portable table\n"
    assert merge_native(None, first).endswith(first)
    merged = merge_native(portable, first)
    assert merged.startswith(portable) and native_section(merged) == first
    again = merge_native(merged, second)
    assert again.startswith(portable) and native_section(again) == second
    assert "run 1" not in again
    assert native_section(portable) is None
