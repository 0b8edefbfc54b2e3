"""What the dashboard's queries cost on a big queue (not a CI test; run by hand).

    python -m benchmarks.dashboard --url mysql+pymysql://root@127.0.0.1:3306 --rows 1000000
    python -m benchmarks.dashboard --url mysql+pymysql://root@127.0.0.1:3307 --rows 1000000

Fills a queue table in a private database (``q4m_bench_dashboard``, dropped at the end unless
``--keep``) with ``--rows`` jobs (a tenth of them delayed), then times, median of ``--repeat``
runs, each query the overview page issues and the page itself over HTTP (Uvicorn + httpx), and
reports what each costs the server: the rows its handlers read (``Handler_read_*`` of the
session, before and after).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import Column
from sqlalchemy import Connection
from sqlalchemy import MetaData
from sqlalchemy import Text
from sqlalchemy import create_engine
from sqlalchemy import func
from sqlalchemy import insert
from sqlalchemy import select
from sqlalchemy import text
from sqlalchemy.engine import make_url

from sqlalchemy_q4m import ops
from sqlalchemy_q4m import queue_table
from sqlalchemy_q4m.schema.functions import queue_stats
from sqlalchemy_q4m.schema.reflect import reflect_queue_table
from sqlalchemy_q4m.schema.retry import retry_columns
from sqlalchemy_q4m.types import new_job_id

DATABASE = "q4m_bench_dashboard"
TABLE = "bench_dashboard_jobs"


def handler_reads(conn: Connection) -> int:
    rows = conn.execute(text("SHOW SESSION STATUS LIKE 'Handler_read%'")).all()
    return sum(int(value) for _, value in rows)


def measure(conn: Connection, work: Callable[[], Any], repeat: int) -> tuple[float, int, Any]:
    """(median seconds, rows read by the server in one run, the last result)."""
    times = []
    reads = 0
    result: Any = None
    for _ in range(repeat):
        before = handler_reads(conn)
        started = time.perf_counter()
        result = work()
        times.append(time.perf_counter() - started)
        reads = handler_reads(conn) - before - 1  # the SHOW itself reads nothing we count
        conn.rollback()
    return statistics.median(times), max(0, reads), result


def fill(conn: Connection, rows: int) -> float:
    table = queue_table(
        TABLE, MetaData(), Column("payload", Text, nullable=False), *retry_columns()
    )
    table.create(conn)
    conn.commit()
    later = int(time.time()) + 86400
    started = time.perf_counter()
    chunk = 5000
    for start in range(0, rows, chunk):
        batch = [
            {
                "id": new_job_id().bytes,
                "payload": f'{{"n": {n}, "what": "benchmark job"}}',
                "attempts": 0,
                "run_at": later if n % 10 == 0 else 0,
            }
            for n in range(start, min(rows, start + chunk))
        ]
        conn.execute(insert(table), batch)
        conn.commit()
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="mysql+pymysql://root@127.0.0.1:3306")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--keep", action="store_true", help="keep the database")
    args = parser.parse_args(argv)
    server = make_url(args.url)
    admin = create_engine(server._replace(database=None))
    with admin.begin() as conn:
        conn.execute(text(f"DROP DATABASE IF EXISTS {DATABASE}"))
        conn.execute(text(f"CREATE DATABASE {DATABASE}"))
    engine = create_engine(server._replace(database=DATABASE), pool_size=5)
    out = sys.stdout
    try:
        with engine.connect() as conn:
            version = conn.execute(select(func.version())).scalar()
            seconds = fill(conn, args.rows)
            table = reflect_queue_table(conn, TABLE)
            native = table.dialect_options["mysql"]["engine"] == "QUEUE"
            conn.rollback()
            conn.execute(text(f"ANALYZE TABLE {TABLE}")).all()
            conn.rollback()
            out.write(
                f"server {version} ({'Q4M, ENGINE=QUEUE' if native else 'InnoDB'}), "
                f"{args.rows:,} jobs filled in {seconds:.1f}s; median of {args.repeat} runs\n\n"
            )
            out.write(f"{'query':<58} {'ms':>9} {'rows read':>11}  result\n")
            now = int(time.time())
            cases: list[tuple[str, Callable[[], Any]]] = [
                (
                    "information_schema: queue tables + TABLE_ROWS estimate",
                    lambda: ops.queue_table_rows(conn),
                ),
                (
                    "SELECT COUNT(*)",
                    lambda: conn.execute(select(func.count()).select_from(table)).scalar(),
                ),
                (
                    "SELECT COUNT(*) WHERE run_at > now (delayed: a scan)",
                    lambda: conn.execute(
                        select(func.count()).select_from(table).where(table.c.run_at > now)
                    ).scalar(),
                ),
                (
                    "oldest job: " + ("head of the queue (LIMIT 1)" if native else "MIN(id)"),
                    lambda: conn.execute(
                        select(table.c.id).limit(1) if native else select(func.min(table.c.id))
                    ).scalar(),
                ),
                ("dead letters per queue (GROUP BY)", lambda: ops.dead_counts(conn)),
                ("workers (registry)", lambda: len(ops.workers(conn))),
                ("throughput, last 60 minutes", lambda: len(ops.throughput(conn))),
                (
                    "ops.overview (the page's counts; exact_limit 100,000)",
                    lambda: [
                        (q.total, q.exact, q.delayed)
                        for q in ops.overview(conn, reflect=lambda c, n: table)
                    ],
                ),
                (
                    "ops.overview, exact_limit 10,000,000 (counts by scanning)",
                    lambda: [
                        (q.total, q.exact, q.delayed)
                        for q in ops.overview(
                            conn, exact_limit=10_000_000, reflect=lambda c, n: table
                        )
                    ],
                ),
                (
                    "list_jobs: first page of 50 (ready)",
                    lambda: len(ops.list_jobs(conn, table, state="ready").rows),
                ),
                (
                    "list_jobs: page 200 of 50 (OFFSET 9950)",
                    lambda: len(ops.list_jobs(conn, table, state="ready", offset=9950).rows),
                ),
            ]
            if native:
                cases.insert(
                    3,
                    (
                        "queue_stats()",
                        lambda: ops.parse_q4m_stats(
                            conn.execute(select(queue_stats(TABLE))).scalar()
                        ).get("rows_written"),
                    ),
                )
            for label, work in cases:
                median, reads, result = measure(conn, work, args.repeat)
                shown = repr(result)
                out.write(f"{label:<58} {median * 1000:>9.1f} {reads:>11,}  {shown[:60]}\n")
                out.flush()
        out.write(f"\n{'HTTP GET / (the overview page, Uvicorn + httpx)':<58} ")
        out.write(f"{page_time(engine, args.repeat) * 1000:>9.1f}\n")
    finally:
        engine.dispose()
        if not args.keep:
            with admin.begin() as conn:
                conn.execute(text(f"DROP DATABASE IF EXISTS {DATABASE}"))
        admin.dispose()
    return 0


def page_time(engine: Any, repeat: int) -> float:
    import httpx

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from web_support import running

    from sqlalchemy_q4m.web import dashboard

    with running(dashboard(engine)) as url, httpx.Client(base_url=url, timeout=60) as client:
        client.get("/").raise_for_status()  # the first one reflects the table
        times = []
        for _ in range(repeat):
            started = time.perf_counter()
            client.get("/").raise_for_status()
            times.append(time.perf_counter() - started)
    return statistics.median(times)


if __name__ == "__main__":
    sys.exit(main())
