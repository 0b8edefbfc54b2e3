"""``q4m demo``: the seed scenario on a real server.

It creates the ``shell_jobs`` queue table (or reuses it when it is empty and has a ``command``
column; it never runs a table that already holds jobs), starts a producer that enqueues shell
commands while worker processes drain them, shows progress, and prints a summary.  A few
commands fail once (retried with backoff) and one always fails (dead-lettered after three
attempts), so every path of the worker shows up; the demo names them up front, and a command
that exits non-zero is logged in one line (other errors keep their tracebacks).  The table is
left in place, empty, for the next run; the dead letter stays for ``q4m dead list|retry|purge``.
"""

from __future__ import annotations

import datetime as dt
import logging
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from sqlalchemy import Column
from sqlalchemy import Connection
from sqlalchemy import Engine
from sqlalchemy import MetaData
from sqlalchemy import Table
from sqlalchemy import Text
from sqlalchemy import create_engine
from sqlalchemy import func
from sqlalchemy import inspect
from sqlalchemy import select
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

from ..backends.base import error_code
from ..exc import Q4MError
from ..ops import dead_letters
from ..ops import enqueue_rows
from ..schema.ddl import queue_table
from ..schema.ddl import validate_name
from ..schema.reflect import reflect_queue_table
from ..schema.retry import ATTEMPTS
from ..schema.retry import RUN_AT
from ..schema.retry import retry_columns
from ..server import detect_backend
from ..worker.job import Job
from ..worker.runtime import WorkerConfig
from ..worker.runtime import make_engine
from ..worker.runtime import run_workers
from ..worker.runtime import setup_logging

__all__ = [
    "CommandFailed",
    "ShellJob",
    "deliberate_failures",
    "demo_commands",
    "prepare_table",
    "run_demo",
]

logger = logging.getLogger("sqlalchemy_q4m.demo")

#: MySQL's "Unknown database" error number.
UNKNOWN_DATABASE = 1049


class CommandFailed(RuntimeError):
    """A shell command exited with a non-zero status: the job's own way of failing (the
    demo's deliberate failures), logged in one line."""


class _OneLineFailures(logging.Filter):
    """The worker logs a failed job with its traceback.  For :class:`CommandFailed` the
    traceback would only point into :meth:`ShellJob.execute`: the log keeps the first line
    (attempt, error, the command's last line of stderr).  Other errors keep their tracebacks."""

    def filter(self, record: logging.LogRecord) -> bool:
        first, newline, _ = record.getMessage().partition("\n")
        if newline and f"{CommandFailed.__name__}: " in first:
            record.msg, record.args = first, ()
        return True


class ShellJob(Job):
    """Runs ``job[0]`` (the ``command`` column) with the shell; a non-zero exit status is a
    failure (:class:`CommandFailed`), retried with backoff, dead-lettered after three runs."""

    table_name = "shell_jobs"
    max_attempts = 3
    retry_base = 0.5
    retry_jitter = 0.5

    def __init__(
        self, bind: Engine | Connection, logger: logging.Logger | None = None, **options: Any
    ) -> None:
        super().__init__(bind, logger, **options)
        if not any(isinstance(f, _OneLineFailures) for f in self.logger.filters):
            self.logger.addFilter(_OneLineFailures())

    def execute(self, job: Any) -> None:
        result = subprocess.run(
            job[0], shell=True, capture_output=True, text=True, timeout=60, check=False
        )
        if result.returncode != 0:
            detail = result.stderr.strip().splitlines()
            raise CommandFailed(
                f"exit status {result.returncode}" + (f": {detail[-1]}" if detail else "")
            )
        self.log.debug("output: %s", result.stdout.strip())


def deliberate_failures(count: int) -> tuple[list[int], int | None]:
    """Which of :func:`demo_commands`' ``count`` jobs fail on purpose: every 25th fails once,
    the last (of more than one) always."""
    doomed = count if count > 1 else None
    return [n for n in range(25, count + 1, 25) if n != doomed], doomed


def demo_commands(count: int, workdir: str) -> list[str]:
    """``count`` shell commands: mostly quick ones, every 25th fails once, the last always."""
    flaky, doomed = deliberate_failures(count)
    commands = []
    for n in range(1, count + 1):
        if n == doomed:
            commands.append(f"echo 'job {n}: disk full (fails every time, on purpose)' >&2; exit 3")
        elif n in flaky:
            marker = f"{workdir}/flaky-{n}"
            commands.append(
                f"test -e {marker} || {{ touch {marker}; "
                f"echo 'job {n}: flaky (fails once, on purpose)' >&2; exit 1; }}"
            )
        else:
            commands.append(f"sleep 0.0{n % 5}; echo 'job {n}: {n} squared is {n * n}'")
    return commands


def _on_purpose(count: int, retries: bool) -> str:
    """The header line that names the jobs failing on purpose."""
    flaky, doomed = deliberate_failures(count)
    parts = []
    if flaky:
        jobs = ", ".join(map(str, flaky))
        parts.append(f"job(s) {jobs} fail once" + (", then pass when retried" if retries else ""))
    if doomed is not None:
        parts.append(f"job {doomed} fails every time and ends as a dead letter")
    if not parts:
        return ""
    return "  on purpose: " + "; ".join(parts) + " (logged in one line each)\n"


def prepare_table(conn: Connection, name: str) -> tuple[Table, bool]:
    """Create the demo table, or reuse it if it is empty and has the demo's columns.
    Returns the table and whether it was created."""
    if not inspect(conn).has_table(name):
        table = queue_table(
            name, MetaData(), Column("command", Text, nullable=False), *retry_columns()
        )
        table.create(conn)
        conn.commit()
        return reflect_queue_table(conn, name), True
    table = reflect_queue_table(conn, name)
    if "command" not in table.columns:
        raise Q4MError(
            f"table {name!r} exists without a 'command' column; pass --table to use another name"
        )
    waiting = int(conn.execute(select(func.count()).select_from(table)).scalar() or 0)
    conn.rollback()
    if waiting:
        raise Q4MError(
            f"table {name!r} already holds {waiting} job(s), and the demo executes what it "
            "finds there as shell commands: empty it or pass --table to use another name"
        )
    return table, False


def _produce(engine: Engine, table: Table, commands: list[str], done: threading.Event) -> None:
    try:
        with engine.connect() as conn:
            for start in range(0, len(commands), 20):
                batch = [{"command": c} for c in commands[start : start + 20]]
                enqueue_rows(conn, table, batch)
                time.sleep(0.05)
    except Exception:
        logger.exception("the producer failed")
    finally:
        done.set()


def _ensure_database(engine: Engine) -> None:
    """Create the URL's database when the server says it does not exist (error 1049), so
    the demo works on a fresh server; anything else is left to fail with its own message."""
    try:
        with engine.connect():
            return
    except DBAPIError as err:
        name = engine.url.database
        if error_code(err) != UNKNOWN_DATABASE or not name:
            raise
    validate_name(name, "database")
    server = create_engine(engine.url._replace(database=None), poolclass=NullPool)
    try:
        with server.connect() as conn:
            quoted = conn.dialect.identifier_preparer.quote(name)
            conn.execute(text(f"CREATE DATABASE IF NOT EXISTS {quoted}"))
        sys.stdout.write(f"q4m demo: created database {name!r}\n")
    finally:
        server.dispose()


def run_demo(
    *,
    url: str,
    jobs: int = 200,
    concurrency: int = 4,
    processes: int = 2,
    table: str = "shell_jobs",
    dead_table: str = "q4m_dead_letters",
) -> int:
    """Run the demo; returns the exit code (0 when every job ended done or dead as planned)."""
    tty = sys.stderr.isatty()
    setup_logging("WARNING", clear_line=tty)
    engine = make_engine(url, 2)
    _ensure_database(engine)
    workdir = tempfile.mkdtemp(prefix="q4m-demo-")
    try:
        with engine.connect() as conn:
            backend = detect_backend(conn)
            queue, created = prepare_table(conn, table)
            version = conn.execute(select(func.version())).scalar()
        out = sys.stdout
        retries = {ATTEMPTS, RUN_AT} <= set(queue.columns.keys())
        out.write(
            f"q4m demo: {engine.url.render_as_string(hide_password=True)} "
            f"(server {version}, {backend} backend)\n"
            f"  table {table} {'created' if created else 'reused (empty)'}"
            + (
                ""
                if retries
                else f" (no {ATTEMPTS}/{RUN_AT} columns: failures are dead-lettered at once)"
            )
            + "; "
            f"{jobs} shell jobs from a producer, {processes} process(es) x {concurrency} "
            "worker threads\n" + _on_purpose(jobs, retries)
        )
        out.flush()
        began = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None) - dt.timedelta(seconds=1)
        commands = demo_commands(jobs, workdir)
        produced = threading.Event()
        producer = threading.Thread(
            target=_produce, args=(engine, queue, commands, produced), name="producer"
        )
        producer.start()
        config = WorkerConfig(
            specs=("sqlalchemy_q4m.cli.demo:ShellJob",),
            url=url,
            concurrency=concurrency,
            processes=processes,
            burst=True,
            job_options=(("dead_letter_table", dead_table), ("table_name", table)),
            log_level="WARNING",
            status=tty,
            progress_every=1.0,
        )
        if not tty:
            logging.getLogger("sqlalchemy_q4m.runtime").setLevel("INFO")
        result = run_workers(config, status_stream=sys.stderr if tty else None)
        producer.join()
        with engine.connect() as conn:
            left = int(conn.execute(select(func.count()).select_from(queue)).scalar() or 0)
            letters = [
                d for d in dead_letters(conn, dead_table, table, limit=500) if d.failed_at >= began
            ]
        totals = result.totals
        out.write(
            "\nsummary\n"
            f"  enqueued       {len(commands)}\n"
            f"  done           {totals.get('done', 0)}\n"
            f"  retried        {totals.get('retried', 0)}  (failed, run again after a backoff)\n"
            f"  dead           {totals.get('dead', 0)}  (see: q4m dead list {table})\n"
            f"  aborted/lost   {totals.get('aborted', 0)}/{totals.get('lost', 0)}\n"
            f"  left in queue  {left}\n"
            f"  time           {result.elapsed:.1f}s including retry backoffs; "
            f"exit {result.code}\n"
        )
        for letter in letters[:5]:
            out.write(f"  dead letter #{letter.id}: {letter.error} (payload {letter.payload})\n")
        out.flush()
        complete = totals.get("done", 0) + totals.get("dead", 0) == len(commands) and not left
        return result.code if result.code else (0 if complete else 1)
    finally:
        engine.dispose()
        shutil.rmtree(workdir, ignore_errors=True)
