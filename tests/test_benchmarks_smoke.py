"""The benchmark entry point, run as users run it, in its tiny mode against the test database.

Asserts that the report is written with the machine header and every scenario row (every
documented path at every concurrency, on both backends), that each figure and ratio is a
positive number and that every row carries a target.  Wall-clock figures are never asserted: they
depend on the machine, not on the code.
"""

from __future__ import annotations

import importlib.util
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

LABELS = [
    f"{n} {kind if n == 1 else plural}"
    for kind, plural in (("thread", "threads"), ("process", "processes"))
    for n in (1, 2, 4, 8)
]
CONSUMERS = [
    "`queue_session(bind=connection)`",
    "`queue_session(bind=engine)`",
    "`queue_session(bind=Session(engine))`",
    "`queue_consumer(bind=engine)`, `take()` per job",
    "worker runtime `Job.run_once`",
]
CORE = "`queue_session(core_table, bind=connection)` (yields Rows)"
RETRY = "worker runtime on a `RetryMixin` table (`run_at <= now`)"
ASYNC_SIDES = [
    "`async_queue_session(bind=AsyncConnection)`",
    "`async_queue_session(bind=AsyncEngine)`",
    "`async_queue_session(bind=AsyncSession)`",
    "`queue_consumer(bind=AsyncEngine)`, `take()` per job",
    "`AsyncJob.run_once`",
]
LATENCY = {
    "portable": [
        "pickup p50, idle queue, listen/notify",
        "pickup p99, idle queue, listen/notify",
        "commands/s sent by an idle worker (no jobs), listen/notify",
        "polling: pickup p50",
        "polling: pickup p99",
        "polling: commands/s sent by an idle worker",
        "commands/s while picking up sparse jobs",
    ],
    "native": [
        "pickup p50, idle queue",
        "pickup p99, idle queue",
        "commands/s sent by an idle worker (no jobs)",
        "commands/s while picking up sparse jobs",
    ],
}


def expected(backend: str, batch_size: int, batch_labels: list[str]) -> list[tuple[str, str]]:
    """(section, start of the scenario text) of every row a run must produce: every
    documented path at every concurrency, on either backend."""
    drivers = [d for d in ("aiomysql", "asyncmy") if importlib.util.find_spec(d) is not None]
    batch_names = [f"`queue_batch(size={batch_size})`", f"worker runtime, batch_size={batch_size}"]
    return [
        ("enqueue", "bulk: `enqueue(engine"),
        ("enqueue", "bulk: ORM"),
        ("enqueue", "one job per call"),
        ("enqueue", "one job per transaction"),
        ("statements", "commands sent per job, one job per call: `enqueue("),
        *[
            ("statements", f"commands sent per job, {name}, 1 thread")
            for name in (*CONSUMERS, CORE, RETRY, *batch_names)
        ],
        *[("consume", f"{name}, {label}") for label in LABELS for name in (*CONSUMERS, RETRY)],
        ("consume", f"{CORE}, 1 thread"),
        *[("latency", text) for text in LATENCY[backend]],
        ("memory", "peak RSS of a worker process, 4 threads"),
        *[("batched", f"{name}, {label}") for label in batch_labels for name in batch_names],
        *[
            ("asyncio", f"{side}, {driver}, {n} {'task' if n == 1 else 'tasks'}")
            for driver in drivers
            for n in (1, 2, 4, 8)
            for side in ASYNC_SIDES
        ],
    ]


#: Every row the tiny (portable) run must produce.
EXPECTED = expected("portable", 50, ["1 thread", "2 processes"])


def _check_rows(rows: list[list[str]], wanted: list[tuple[str, str]], report: str) -> None:
    """One row per expected scenario, no other, each with positive figures and a target."""
    assert len(rows) == len(wanted), report
    for section, scenario in wanted:
        matching = [r for r in rows if r[0] == f"| {section}" and r[1].startswith(scenario)]
        assert len(matching) == 1, f"no single row for {section}: {scenario}\n{report}"
        library, raw, ratio = (float(matching[0][i].replace(",", "")) for i in (2, 3, 5))
        assert library > 0 and raw > 0 and ratio > 0, matching[0]
        assert matching[0][6].strip() and matching[0][7].strip(" |"), matching[0]  # a target


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
    _check_rows(rows, EXPECTED, report)
    # the benchmark cleans up after itself: its table is gone from the test database
    assert "q4m_bench_jobs" not in _tables(db_url)


def _tables(url: URL) -> list[str]:
    engine = create_engine(url, poolclass=NullPool)
    try:
        return inspect(engine).get_table_names()
    finally:
        engine.dispose()


#: Every row of the native section (the quick run): the same paths as the portable run's.
NATIVE_EXPECTED = expected("native", 200, LABELS)


@pytest.mark.native
def test_quick_native_run_on_a_q4m_server(q4m_url: URL, tmp_path: Path) -> None:
    """``--url`` naming a Q4M server: the server's QUEUE engine selects the native scenarios
    (before, the portable backend was forced, the tables were InnoDB and every consume
    failed with QueueWaitError); their section goes into an existing report, which keeps
    the rest."""
    output = tmp_path / "RESULTS.md"
    output.write_text("# sqlalchemy-q4m benchmarks\n\nthe portable part, kept\n")
    server = q4m_url._replace(database=None)  # URL.set(database=None) keeps the database
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
    _check_rows(rows, NATIVE_EXPECTED, section)
    # the benchmark made its own database on the Q4M server and dropped it (concurrent runs
    # may have databases of their own: only this run's, named in its log, is checked)
    (created,) = re.findall(r"backend: native, database (q4m_bench_\w+)", done.stderr)
    assert created not in _databases(server) and created not in before


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
