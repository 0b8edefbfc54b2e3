"""``q4m``'s argument parser: its commands, their options, and the function each one runs."""

from __future__ import annotations

import argparse
import os

from .apps import cmd_demo
from .apps import cmd_web
from .dead import cmd_dead
from .options import Parser
from .options import dead_table_option
from .options import id_list
from .options import level_name
from .options import option
from .options import port_number
from .options import positive_int
from .options import positive_seconds
from .options import seconds_value
from .options import switch
from .options import url_option
from .queues import cmd_enqueue
from .queues import cmd_stats
from .workers import cmd_schedule_list
from .workers import cmd_scheduler
from .workers import cmd_worker
from .workers import cmd_workers

__all__ = ["build_parser"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``q4m`` and its subcommands."""
    parser = Parser(
        prog="q4m",
        description="Job queues on MySQL/MariaDB: Q4M (ENGINE=QUEUE) or InnoDB + SKIP LOCKED.",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    worker = sub.add_parser(
        "worker",
        help="run workers for job classes (module:Class)",
        epilog="Exit codes: 0 stopped cleanly (or queues drained with --burst); 1 a worker "
        "crashed; 2 bad input; 3 forced stop (second signal or grace period over): the jobs "
        "in hand were returned to the queue.",
    )
    worker.add_argument(
        "specs", nargs="+", metavar="module:Class", help="job classes; earlier tables win"
    )
    url_option(worker)
    option(
        worker,
        "--concurrency",
        "Q4M_CONCURRENCY",
        "worker threads per process",
        default="1",
        type=positive_int,
    )
    option(
        worker,
        "--processes",
        "Q4M_PROCESSES",
        "worker processes",
        default="1",
        type=positive_int,
    )
    option(
        worker,
        "--grace",
        "Q4M_GRACE",
        "seconds the jobs in hand get after the first SIGTERM/SIGINT (0: no limit)",
        default="30",
        type=seconds_value,
    )
    switch(worker, "--burst", "Q4M_BURST", "exit once the queues are empty")
    option(
        worker,
        "--max-attempts",
        "Q4M_MAX_ATTEMPTS",
        "runs before a failing job is dead-lettered (default: the job class's)",
        type=positive_int,
    )
    option(
        worker,
        "--retry-base",
        "Q4M_RETRY_BASE",
        "first retry delay in seconds, doubled each time (default: the job class's)",
        type=seconds_value,
    )
    option(
        worker,
        "--recycle-after",
        "Q4M_RECYCLE_AFTER",
        "reconnect and make fresh job objects after this many jobs per worker",
        type=positive_int,
    )
    option(
        worker,
        "--batch-size",
        "Q4M_BATCH_SIZE",
        "jobs claimed per transaction on the portable backend (default: the job class's; "
        "one at a time on Q4M)",
        type=positive_int,
    )
    option(
        worker,
        "--listen",
        "Q4M_LISTEN",
        "idle portable workers wait up to SECONDS to be woken by a producer's notify() "
        "instead of polling (MariaDB; default: the job class's)",
        type=positive_seconds,
        metavar="SECONDS",
    )
    option(
        worker,
        "--dead-table",
        "Q4M_DEAD_TABLE",
        "dead-letter table name (default: the job class's)",
    )
    switch(
        worker,
        "--end-before-execute",
        "Q4M_END_BEFORE_EXECUTE",
        "remove each job before running it (at most once)",
    )
    option(
        worker,
        "--backend",
        "Q4M_BACKEND",
        "queue backend",
        default="auto",
        choices=["auto", "native", "portable"],
    )
    option(
        worker,
        "--log-level",
        "Q4M_LOG_LEVEL",
        "log level (default INFO, WARNING on a TTY)",
        type=level_name,
    )
    option(
        worker,
        "--status",
        "Q4M_STATUS",
        "live status line: auto (on a TTY), always or never",
        default="auto",
        choices=["auto", "always", "never"],
    )
    option(
        worker,
        "--heartbeat",
        "Q4M_HEARTBEAT",
        "seconds between two heartbeats in the worker registry (0: do not register)",
        default="5",
        type=seconds_value,
    )
    option(
        worker,
        "--metrics-port",
        "Q4M_METRICS_PORT",
        "serve Prometheus metrics on this port (pip install 'sqlalchemy-q4m[metrics]')",
        type=port_number,
    )
    option(
        worker,
        "--metrics-host",
        "Q4M_METRICS_HOST",
        "address the metrics are served on",
        default="127.0.0.1",
    )
    worker.set_defaults(func=cmd_worker)

    enqueue = sub.add_parser(
        "enqueue", help="add jobs: --json '{...}' or one JSON object per line on stdin"
    )
    enqueue.add_argument("table", help="queue table")
    url_option(enqueue)
    option(enqueue, "--json", "Q4M_JOB", "one job as a JSON object", dest="json_text")
    option(
        enqueue,
        "--delay",
        "Q4M_DELAY",
        "seconds before the jobs may run (needs a run_at column)",
        type=seconds_value,
    )
    option(
        enqueue,
        "--batch-size",
        "Q4M_BATCH_SIZE",
        "rows per INSERT",
        default="1000",
        type=positive_int,
    )
    enqueue.set_defaults(func=cmd_enqueue)

    scheduler = sub.add_parser(
        "scheduler",
        help="run the schedules of job classes (module:Class or a module), without workers",
    )
    scheduler.add_argument(
        "specs", nargs="+", metavar="MODULE[:Class]", help="job classes with a schedule"
    )
    url_option(scheduler)
    option(scheduler, "--log-level", "Q4M_LOG_LEVEL", "log level", default="INFO")
    scheduler.set_defaults(func=cmd_scheduler)

    schedule = sub.add_parser("schedule", help="recurring jobs: list")
    schedule_sub = schedule.add_subparsers(dest="action", required=True, parser_class=Parser)
    schedule_list = schedule_sub.add_parser("list", help="each schedule, its last and next tick")
    url_option(schedule_list)
    switch(schedule_list, "--json", "Q4M_JSON", "print JSON")
    schedule_list.set_defaults(func=cmd_schedule_list)

    stats = sub.add_parser("stats", help="queued, delayed, owned and dead jobs per queue table")
    stats.add_argument("tables", nargs="*", metavar="TABLE", help="default: every queue table")
    url_option(stats)
    dead_table_option(stats)
    switch(stats, "--json", "Q4M_JSON", "print JSON")
    stats.set_defaults(func=cmd_stats)

    dead = sub.add_parser("dead", help="dead letters: list, show, retry or purge")
    dead_sub = dead.add_subparsers(dest="action", required=True, parser_class=Parser)
    dead_list = dead_sub.add_parser("list", help="show dead letters")
    dead_list.add_argument("table", nargs="?", help="queue table (default: all)")
    option(
        dead_list,
        "--limit",
        "Q4M_LIMIT",
        "how many to show",
        default="50",
        type=positive_int,
    )
    switch(dead_list, "--json", "Q4M_JSON", "one JSON object per line, tracebacks included")
    for name, helptext in (
        ("retry", "put dead letters back into their queue"),
        ("purge", "delete dead letters"),
    ):
        action = dead_sub.add_parser(name, help=helptext)
        action.add_argument("table", help="queue table")
        action.add_argument(
            "--id",
            dest="ids",
            type=positive_int,
            action="append",
            default=id_list(os.environ.get("Q4M_DEAD_ID", "")),
            help="only this dead letter (repeatable) [env Q4M_DEAD_ID, comma-separated]",
        )
    dead_show = dead_sub.add_parser("show", help="one dead letter: error, traceback, payload")
    dead_show.add_argument("id", type=positive_int, help="the dead letter's number (#N)")
    switch(dead_show, "--json", "Q4M_JSON", "print JSON")
    for action in dead_sub.choices.values():
        url_option(action)
        dead_table_option(action)
        action.set_defaults(func=cmd_dead)

    workers = sub.add_parser("workers", help="running workers: host, pid, queues, jobs in hand")
    url_option(workers)
    option(
        workers,
        "--stale-after",
        "Q4M_STALE_AFTER",
        "seconds without a heartbeat after which a worker is shown as lost",
        default="30",
        type=positive_seconds,
    )
    option(
        workers,
        "--prune-after",
        "Q4M_PRUNE_AFTER",
        "delete the rows of workers silent for this many seconds (0: keep them)",
        default="3600",
        type=seconds_value,
    )
    switch(workers, "--json", "Q4M_JSON", "print JSON")
    workers.set_defaults(func=cmd_workers)

    web = sub.add_parser(
        "web",
        help="the web dashboard (pip install 'sqlalchemy-q4m[web]')",
        epilog="Retry, purge and enqueue need a token (Bearer or the login form) or HTTP basic "
        "credentials; without any the dashboard is read-only.  It refuses to listen on an "
        "address other than loopback without them.",
    )
    url_option(web)
    option(web, "--host", "Q4M_WEB_HOST", "address to listen on", default="127.0.0.1")
    option(web, "--port", "Q4M_WEB_PORT", "port to listen on", default="8080", type=port_number)
    option(web, "--token", "Q4M_WEB_TOKEN", "token for the actions that change data")
    option(
        web,
        "--basic-auth",
        "Q4M_WEB_BASIC_AUTH",
        "USER:PASSWORD for HTTP basic authentication (every page)",
    )
    switch(web, "--read-only", "Q4M_WEB_READ_ONLY", "no retry, purge or enqueue")
    dead_table_option(web)
    option(
        web,
        "--refresh",
        "Q4M_WEB_REFRESH",
        "seconds between two refreshes of a page (0: none)",
        default="5",
        type=seconds_value,
    )
    web.set_defaults(func=cmd_web)

    demo = sub.add_parser("demo", help="the seed scenario: shell jobs, producers, workers")
    url_option(demo)
    option(demo, "--jobs", "Q4M_DEMO_JOBS", "jobs to enqueue", default="200", type=positive_int)
    option(
        demo,
        "--concurrency",
        "Q4M_CONCURRENCY",
        "worker threads per process",
        default="4",
        type=positive_int,
    )
    option(
        demo,
        "--processes",
        "Q4M_PROCESSES",
        "worker processes",
        default="2",
        type=positive_int,
    )
    option(demo, "--table", "Q4M_DEMO_TABLE", "queue table of the demo", default="shell_jobs")
    dead_table_option(demo)
    demo.set_defaults(func=cmd_demo)
    return parser
