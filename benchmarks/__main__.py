"""``python -m benchmarks [--url URL] [--quick] [--output PATH]``: run every scenario and write
the markdown report (``benchmarks/RESULTS.md`` by default).

The benchmark works in a database of its own: ``q4m_bench_<random>``, created on the server
named by ``--url`` (``Q4M_BENCH_URL``, default ``mysql+pymysql://root@127.0.0.1:3306``) and
dropped at the end; when the URL names a database, it uses that one and drops only its table.

The server decides the backend, as it does for ``queue_session``: on a server with the Q4M
engine (``ENGINE=QUEUE``) the queue table is a QUEUE table and every scenario runs against raw
autocommit ``queue_wait``/``SELECT``/``queue_end`` loops; its report is the report's native
section, written into ``--output`` between its markers (the portable part of an existing
report is kept).  Elsewhere the scenarios run against raw SKIP LOCKED loops and write the
whole report (an existing native section is kept).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
import traceback
import uuid
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pymysql
from sqlalchemy import create_engine
from sqlalchemy import make_url
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.pool import NullPool

from sqlalchemy_q4m import use_backend

from .common import Base
from .common import server_backend
from .scenarios import SCENARIOS
from .scenarios import Report
from .scenarios import Settings

DEFAULT_URL = "mysql+pymysql://root@127.0.0.1:3306"
HERE = Path(__file__).resolve().parent
SERVER_VARIABLES = (
    "innodb_flush_log_at_trx_commit",
    "sync_binlog",
    "log_bin",
    "innodb_flush_method",
    "innodb_doublewrite",
    "innodb_buffer_pool_size",
    "innodb_lock_wait_timeout",
)
NATIVE_BEGIN = "<!-- native section: written by `python -m benchmarks --url <a Q4M server>` -->"
NATIVE_END = "<!-- end of the native section -->"


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument(
        "--url",
        default=os.environ.get("Q4M_BENCH_URL", DEFAULT_URL),
        help="server (or database) URL (env Q4M_BENCH_URL; default %(default)s)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="small sizes, one repeat: under a minute (CI)"
    )
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # smoke test
    parser.add_argument(
        "--output", default=str(HERE / "RESULTS.md"), help="report path (default %(default)s)"
    )
    parser.add_argument(
        "--only", action="append", choices=list(SCENARIOS), help="run only these scenarios"
    )
    return parser.parse_args(argv)


def machine(url: URL) -> dict[str, Any]:
    """Cores, CPU, server version and its durability settings: what the figures depend on."""
    info: dict[str, Any] = {
        "cores": os.cpu_count(),
        "cpu": _cpu_model(),
        "python": platform.python_version(),
        "sqlalchemy": version("SQLAlchemy"),
        "pymysql": pymysql.VERSION_STRING,
        "kernel": platform.release(),
        "load": _load(),
        "commit": _git_commit(),
    }
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            info["server"] = conn.execute(text("SELECT VERSION()")).scalar()
            rows = conn.execute(text("SHOW GLOBAL VARIABLES")).all()
            variables = {str(k): str(v) for k, v in rows}
            info["variables"] = {k: variables.get(k, "n/a") for k in SERVER_VARIABLES}
            q4m = conn.execute(
                text(
                    "SELECT PLUGIN_VERSION FROM information_schema.PLUGINS "
                    "WHERE PLUGIN_NAME = 'QUEUE'"
                )
            ).scalar()
            info["q4m"] = f"plugin {q4m}" if q4m else "n/a"
    finally:
        engine.dispose()
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def _git_commit() -> str:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=HERE,
            capture_output=True,
            text=True,
            check=False,
        )
        return done.stdout.strip() or "n/a"
    except OSError:
        return "n/a"


def _fmt(value: float, unit: str) -> str:
    if unit == "jobs/s":
        return f"{value:,.0f}"
    if unit == "per job":
        return f"{value:,.2f}"
    return f"{value:,.1f}"


def _table_rows(report: Report) -> list[str]:
    lines = []
    for row in report.rows:
        met = "" if row.met is None else ("yes" if row.met else "**no**")
        note = f" ({row.note})" if row.note else ""
        lines.append(
            f"| {row.section} | {row.scenario}{note} | {_fmt(row.library, row.unit)} | "
            f"{_fmt(row.raw, row.unit)} | {row.unit} | {row.ratio:.2f} | {row.target} | {met} |"
        )
    return lines


def render(info: dict[str, Any], report: Report, quick: bool, seconds: float, s: Settings) -> str:
    v = info["variables"]
    lines = [
        "# sqlalchemy-q4m benchmarks",
        "",
        f"Generated by `python -m benchmarks{' --quick' if quick else ''}` on "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} "
        f"(commit {info['commit']}), in {seconds:.0f} s.",
        "",
        "## Machine",
        "",
        f"- {info['cores']} cores, {info['cpu']}; Linux {info['kernel']}; "
        f"load average at start {info['load']}, at the end {_load()} (other work on the"
        " machine shares the cores: compare the ratios, not the absolute rates)",
        f"- server {info['server']}: innodb_flush_log_at_trx_commit="
        f"{v['innodb_flush_log_at_trx_commit']}, sync_binlog={v['sync_binlog']}, "
        f"log_bin={v['log_bin']}, innodb_flush_method={v['innodb_flush_method']}, "
        f"innodb_doublewrite={v['innodb_doublewrite']}, "
        f"innodb_buffer_pool_size={v['innodb_buffer_pool_size']}",
        f"- Python {info['python']}, SQLAlchemy {info['sqlalchemy']}, PyMySQL {info['pymysql']}"
        " (pure Python driver, both sides)",
        "",
        "## Results",
        "",
        "Each library figure is measured in the same run as its raw baseline issuing the"
        " same SQL (PyMySQL; the asyncio rows: the same async driver), alternating, best of "
        f"{s.repeats} run{'s' if s.repeats > 1 else ''} each (one-job consume: best of"
        f" {s.consume_repeats}). `ratio` = library / raw: higher is better for jobs/s, lower is"
        " better for ms, MB, queries/s and statements per job. Every row has a target.",
        "",
        "| section | scenario | library | raw PyMySQL | unit | ratio | target | met |",
        "|---|---|---:|---:|---|---:|---|---|",
    ]
    lines += _table_rows(report)
    if report.extra:
        lines += ["", "## Notes from this run", ""]
        for key, value in report.extra.items():
            lines.append(f"- {key}: {value}")
    if report.errors:
        lines += ["", "## Errors", ""]
        for error in report.errors:
            lines += ["```", error.rstrip(), "```"]
    notes = HERE / "NOTES.md"
    if notes.exists() and not quick:
        lines += ["", notes.read_text().rstrip()]
    return "\n".join(lines) + "\n"


def render_native(
    info: dict[str, Any], report: Report, quick: bool, seconds: float, s: Settings
) -> str:
    """The native (Q4M) section of the report, between its markers."""
    lines = [
        NATIVE_BEGIN,
        "## Native backend (Q4M, `ENGINE=QUEUE`)",
        "",
        f"Generated by `python -m benchmarks --url <the Q4M server>{' --quick' if quick else ''}`"
        f" on {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} "
        f"(commit {info['commit']}), in {seconds:.0f} s, on {info['cores']} cores "
        f"({info['cpu']}), load average at start {info['load']}, at the end {_load()}.",
        "",
        f"- server {info['server']} with Q4M {info.get('q4m', 'n/a')}; Python {info['python']}, "
        f"SQLAlchemy {info['sqlalchemy']}, PyMySQL {info['pymysql']} (both sides)",
        f"- consume: {s.consume_jobs} jobs per run, each figure the best of "
        f"{s.consume_repeats} alternating run{'s' if s.consume_repeats > 1 else ''}; enqueue, "
        f"batched and asyncio: best of {s.repeats}",
        "- raw baseline: PyMySQL with autocommit on, on the same table (`q4m_bench_jobs`, "
        "`ENGINE=QUEUE`): per job `SELECT queue_wait('q4m_bench_jobs', 0)`, "
        "`SELECT id, payload, enqueued_at FROM q4m_bench_jobs` (the owner sees its row), "
        "`SELECT queue_end()` (also the batched rows' baseline: a Q4M batch holds one job); "
        "pickup latency: the same loop blocking in `queue_wait('q4m_bench_jobs', 5)`; "
        "asyncio: the same statements on the same async driver; enqueue: `executemany` (or one "
        "`INSERT` per job), no COMMIT",
        "- `ratio` = library / raw, measured in the same run; every row has a target",
        "",
        "| section | scenario | library | raw PyMySQL | unit | ratio | target | met |",
        "|---|---|---:|---:|---|---:|---|---|",
    ]
    lines += _table_rows(report)
    if report.extra:
        lines += ["", "### Notes from this run", ""]
        lines += [f"- {key}: {value}" for key, value in report.extra.items()]
    if report.errors:
        lines += ["", "### Errors", ""]
        for error in report.errors:
            lines += ["```", error.rstrip(), "```"]
    notes = HERE / "NOTES_NATIVE.md"
    if notes.exists() and not quick:
        lines += ["", notes.read_text().rstrip()]
    lines.append(NATIVE_END)
    return "\n".join(lines) + "\n"


def native_section(text: str) -> str | None:
    """The native section of a report (markers included), or None."""
    begin, end = text.find(NATIVE_BEGIN), text.find(NATIVE_END)
    if begin < 0 or end < begin:
        return None
    return text[begin : end + len(NATIVE_END)] + "\n"


def merge_native(existing: str | None, section: str) -> str:
    """``existing`` with its native section replaced by ``section`` (or ``section`` added
    at the end); a report of its own when there is none yet."""
    if existing is None:
        return "# sqlalchemy-q4m benchmarks\n\n" + section
    old = native_section(existing)
    if old is not None:
        return existing.replace(old, section)
    return existing.rstrip() + "\n\n" + section


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    settings = Settings.tiny() if args.tiny else Settings.quick() if args.quick else Settings()
    args.quick = args.quick or args.tiny
    given = make_url(args.url)
    server = given._replace(database=None)  # URL.set(database=None) keeps the database
    own_database = given.database is None
    url = server.set(database=f"q4m_bench_{uuid.uuid4().hex[:10]}") if own_database else given
    admin = create_engine(server, poolclass=NullPool)
    started = time.monotonic()

    def progress(what: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {what}", file=sys.stderr, flush=True)

    report = Report()
    try:
        if own_database:
            with admin.connect() as conn:
                conn.execute(text(f"CREATE DATABASE `{url.database}`"))
        info = machine(url)
        backend = server_backend(url)
        if backend == "native":
            settings = settings if args.tiny else settings.for_native()
            settings.backend = "native"
        progress(f"backend: {backend}, database {url.database}")
        engine = create_engine(url, poolclass=NullPool)
        use_backend(engine, "native" if backend == "native" else "portable")
        Base.metadata.drop_all(engine)
        Base.metadata.create_all(engine)
        engine.dispose()
        for name in args.only or SCENARIOS:
            try:
                SCENARIOS[name](url, settings, report, progress)
            except Exception:
                report.errors.append(f"{name}: {traceback.format_exc()}")
                progress(f"{name} FAILED")
        output = Path(args.output)
        existing = output.read_text() if output.exists() else None
        seconds = time.monotonic() - started
        if settings.native:
            section = render_native(info, report, args.quick, seconds, settings)
            output.write_text(merge_native(existing, section))
        else:
            text_ = render(info, report, args.quick, seconds, settings)
            kept = None if existing is None else native_section(existing)
            output.write_text(text_ if kept is None else text_ + "\n" + kept)
        progress(f"wrote {output}")
    finally:
        if own_database:
            with admin.connect() as conn:
                conn.execute(text(f"DROP DATABASE IF EXISTS `{url.database}`"))
        else:
            engine = create_engine(url, poolclass=NullPool)
            Base.metadata.drop_all(engine)
            engine.dispose()
        admin.dispose()
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
