"""The ``q4m`` command line (also ``python -m sqlalchemy_q4m``).

The CLI only parses arguments and prints; the work is done by :mod:`~sqlalchemy_q4m.runtime`
(workers), :mod:`~sqlalchemy_q4m.deadletter`, :mod:`~sqlalchemy_q4m.demo` and the functions
here that read and write queue tables.  Every option has a ``Q4M_…`` environment variable,
named in ``--help``.  Bad input gives one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Sequence
from typing import Any
from typing import NoReturn
from typing import TextIO

from sqlalchemy import Connection
from sqlalchemy import Table
from sqlalchemy import func
from sqlalchemy import inspect
from sqlalchemy import select
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.types import LargeBinary
from sqlalchemy.types import _Binary

from .ddl import JOB_ID
from .deadletter import DEAD_LETTER_TABLE
from .deadletter import count_dead
from .deadletter import dead_letter_table
from .deadletter import list_dead
from .deadletter import purge_dead
from .deadletter import retry_dead
from .enqueue import enqueue
from .exc import Q4MError
from .functions import queue_stats
from .notify import notify_committed
from .retry import RUN_AT
from .runtime import EXIT_USAGE
from .runtime import WorkerConfig
from .runtime import load_scheduled_classes
from .runtime import make_engine
from .runtime import run_workers
from .runtime import setup_logging
from .schedule import Scheduler
from .schedule import list_schedules
from .schedule import schedules_of
from .server import detect_backend
from .signals import on_stop_signals
from .unique import count_keys
from .worker import reflect_queue_table

__all__ = ["build_parser", "enqueue_rows", "main", "parse_json_rows", "queue_counts"]

DEFAULT_URL = "mysql+pymysql://root@127.0.0.1:3306/test"


class _Parser(argparse.ArgumentParser):
    """argparse, but an error is one line (``q4m: error: ...``) and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _env(name: str, default: Any) -> Any:
    return os.environ.get(name, default)


def _flag_env(name: str) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise Q4MError(f"environment variable {name}={raw!r}: use 1/0, true/false, yes/no")


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, not {number}")
    return number


def _seconds(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {value!r}") from None
    if number < 0 or number != number:
        raise argparse.ArgumentTypeError(f"must be >= 0 seconds, not {value}")
    return number


def _positive_seconds(value: str) -> float:
    number = _seconds(value)
    if number == 0:
        raise argparse.ArgumentTypeError(f"must be > 0 seconds, not {value}")
    return number


def _option(
    parser: argparse.ArgumentParser,
    flag: str,
    env: str,
    help: str,
    *,
    default: Any = None,
    type: Callable[[str], Any] | None = None,
    **kw: Any,
) -> None:
    """An option whose default comes from ``env`` (named in the help text)."""
    text = f"{help} [env {env}" + (f"; default {default}]" if default is not None else "]")
    if type is not None:
        kw["type"] = type
    parser.add_argument(flag, default=_env(env, default), help=text, **kw)


def _id_list(raw: str) -> list[int] | None:
    """``Q4M_DEAD_ID=3,4`` -> ``[3, 4]``; empty -> None (all)."""
    parts = [p.strip() for p in raw.split(",") if p.strip()]
    if not parts:
        return None
    try:
        return [_positive_int(p) for p in parts]
    except argparse.ArgumentTypeError as err:
        raise Q4MError(f"environment variable Q4M_DEAD_ID={raw!r}: {err}") from None


def _switch(parser: argparse.ArgumentParser, flag: str, env: str, help: str) -> None:
    parser.add_argument(flag, action="store_true", default=None, help=f"{help} [env {env}=1]")


def _url_option(parser: argparse.ArgumentParser) -> None:
    _option(parser, "--url", "Q4M_URL", "database URL", default=DEFAULT_URL)


def _dead_table_option(parser: argparse.ArgumentParser) -> None:
    _option(
        parser,
        "--dead-table",
        "Q4M_DEAD_TABLE",
        "dead-letter table name",
        default=DEAD_LETTER_TABLE,
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``q4m`` and its subcommands."""
    parser = _Parser(
        prog="q4m",
        description="Job queues on MySQL/MariaDB: Q4M (ENGINE=QUEUE) or InnoDB + SKIP LOCKED.",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

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
    _url_option(worker)
    _option(
        worker,
        "--concurrency",
        "Q4M_CONCURRENCY",
        "worker threads per process",
        default="1",
        type=_positive_int,
    )
    _option(
        worker,
        "--processes",
        "Q4M_PROCESSES",
        "worker processes",
        default="1",
        type=_positive_int,
    )
    _option(
        worker,
        "--grace",
        "Q4M_GRACE",
        "seconds the jobs in hand get after the first SIGTERM/SIGINT (0: no limit)",
        default="30",
        type=_seconds,
    )
    _switch(worker, "--burst", "Q4M_BURST", "exit once the queues are empty")
    _option(
        worker,
        "--max-attempts",
        "Q4M_MAX_ATTEMPTS",
        "runs before a failing job is dead-lettered (default: the job class's)",
        type=_positive_int,
    )
    _option(
        worker,
        "--retry-base",
        "Q4M_RETRY_BASE",
        "first retry delay in seconds, doubled each time (default: the job class's)",
        type=_seconds,
    )
    _option(
        worker,
        "--recycle-after",
        "Q4M_RECYCLE_AFTER",
        "reconnect and make fresh job objects after this many jobs per worker",
        type=_positive_int,
    )
    _option(
        worker,
        "--batch-size",
        "Q4M_BATCH_SIZE",
        "jobs claimed per transaction on the portable backend (default: the job class's; "
        "one at a time on Q4M)",
        type=_positive_int,
    )
    _option(
        worker,
        "--listen",
        "Q4M_LISTEN",
        "idle portable workers wait up to SECONDS to be woken by a producer's notify() "
        "instead of polling (MariaDB; default: the job class's)",
        type=_positive_seconds,
        metavar="SECONDS",
    )
    _option(
        worker,
        "--dead-table",
        "Q4M_DEAD_TABLE",
        "dead-letter table name (default: the job class's)",
    )
    _switch(
        worker,
        "--end-before-execute",
        "Q4M_END_BEFORE_EXECUTE",
        "remove each job before running it (at most once)",
    )
    _option(
        worker,
        "--backend",
        "Q4M_BACKEND",
        "queue backend",
        default="auto",
        choices=["auto", "native", "portable"],
    )
    _option(worker, "--log-level", "Q4M_LOG_LEVEL", "log level (default INFO, WARNING on a TTY)")
    _option(
        worker,
        "--status",
        "Q4M_STATUS",
        "live status line: auto (on a TTY), always or never",
        default="auto",
        choices=["auto", "always", "never"],
    )
    worker.set_defaults(func=cmd_worker)

    enqueue = sub.add_parser(
        "enqueue", help="add jobs: --json '{...}' or one JSON object per line on stdin"
    )
    enqueue.add_argument("table", help="queue table")
    _url_option(enqueue)
    _option(enqueue, "--json", "Q4M_JOB", "one job as a JSON object", dest="json_text")
    _option(
        enqueue,
        "--delay",
        "Q4M_DELAY",
        "seconds before the jobs may run (needs a run_at column)",
        type=_seconds,
    )
    _option(
        enqueue,
        "--batch-size",
        "Q4M_BATCH_SIZE",
        "rows per INSERT",
        default="1000",
        type=_positive_int,
    )
    enqueue.set_defaults(func=cmd_enqueue)

    scheduler = sub.add_parser(
        "scheduler",
        help="run the schedules of job classes (module:Class or a module), without workers",
    )
    scheduler.add_argument(
        "specs", nargs="+", metavar="MODULE[:Class]", help="job classes with a schedule"
    )
    _url_option(scheduler)
    _option(scheduler, "--log-level", "Q4M_LOG_LEVEL", "log level", default="INFO")
    scheduler.set_defaults(func=cmd_scheduler)

    schedule = sub.add_parser("schedule", help="recurring jobs: list")
    schedule_sub = schedule.add_subparsers(dest="action", required=True, parser_class=_Parser)
    schedule_list = schedule_sub.add_parser("list", help="each schedule, its last and next tick")
    _url_option(schedule_list)
    _switch(schedule_list, "--json", "Q4M_JSON", "print JSON")
    schedule_list.set_defaults(func=cmd_schedule_list)

    stats = sub.add_parser("stats", help="queued, delayed, owned and dead jobs per queue table")
    stats.add_argument("tables", nargs="*", metavar="TABLE", help="default: every queue table")
    _url_option(stats)
    _dead_table_option(stats)
    _switch(stats, "--json", "Q4M_JSON", "print JSON")
    stats.set_defaults(func=cmd_stats)

    dead = sub.add_parser("dead", help="dead letters: list, retry or purge")
    dead_sub = dead.add_subparsers(dest="action", required=True, parser_class=_Parser)
    dead_list = dead_sub.add_parser("list", help="show dead letters")
    dead_list.add_argument("table", nargs="?", help="queue table (default: all)")
    _option(
        dead_list,
        "--limit",
        "Q4M_LIMIT",
        "how many to show",
        default="50",
        type=_positive_int,
    )
    _switch(dead_list, "--json", "Q4M_JSON", "one JSON object per line, tracebacks included")
    for name, helptext in (
        ("retry", "put dead letters back into their queue"),
        ("purge", "delete dead letters"),
    ):
        action = dead_sub.add_parser(name, help=helptext)
        action.add_argument("table", help="queue table")
        action.add_argument(
            "--id",
            dest="ids",
            type=_positive_int,
            action="append",
            default=_id_list(os.environ.get("Q4M_DEAD_ID", "")),
            help="only this dead letter (repeatable) [env Q4M_DEAD_ID, comma-separated]",
        )
    for action in dead_sub.choices.values():
        _url_option(action)
        _dead_table_option(action)
        action.set_defaults(func=cmd_dead)

    demo = sub.add_parser("demo", help="the seed scenario: shell jobs, producers, workers")
    _url_option(demo)
    _option(demo, "--jobs", "Q4M_DEMO_JOBS", "jobs to enqueue", default="200", type=_positive_int)
    _option(
        demo,
        "--concurrency",
        "Q4M_CONCURRENCY",
        "worker threads per process",
        default="4",
        type=_positive_int,
    )
    _option(
        demo,
        "--processes",
        "Q4M_PROCESSES",
        "worker processes",
        default="2",
        type=_positive_int,
    )
    _option(demo, "--table", "Q4M_DEMO_TABLE", "queue table of the demo", default="shell_jobs")
    _dead_table_option(demo)
    demo.set_defaults(func=cmd_demo)
    return parser


# -- commands ---------------------------------------------------------------------------------


def cmd_worker(args: argparse.Namespace) -> int:
    burst = bool(args.burst) or _flag_env("Q4M_BURST")
    end_first = bool(args.end_before_execute) or _flag_env("Q4M_END_BEFORE_EXECUTE")
    tty = sys.stderr.isatty()
    status = args.status == "always" or (args.status == "auto" and tty)
    level = args.log_level or ("WARNING" if status else "INFO")
    _check_level(level)
    setup_logging(level, clear_line=status)
    options: dict[str, Any] = {}
    if args.max_attempts is not None:
        options["max_attempts"] = args.max_attempts
    if args.retry_base is not None:
        options["retry_base"] = args.retry_base
    if args.recycle_after is not None:
        options["recycle_after"] = args.recycle_after
    if args.batch_size is not None:
        options["batch_size"] = args.batch_size
    if args.listen is not None:
        options["listen"] = args.listen
    if args.dead_table is not None:
        options["dead_letter_table"] = args.dead_table
    if end_first:
        options["end_before_execute"] = True
    if args.backend != "auto":
        options["backend"] = args.backend
    if os.getcwd() not in sys.path:  # like `python -m`: job modules next to the caller
        sys.path.insert(0, os.getcwd())
    config = WorkerConfig(
        specs=tuple(args.specs),
        url=args.url,
        concurrency=args.concurrency,
        processes=args.processes,
        grace=args.grace or None,
        burst=burst,
        job_options=tuple(sorted(options.items())),
        log_level=level,
        status=status,
        sys_path=tuple(sys.path[:1]),
    )
    result = run_workers(config, status_stream=sys.stderr if status else None)
    return result.code


def cmd_scheduler(args: argparse.Namespace) -> int:
    _check_level(args.log_level)
    setup_logging(args.log_level)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    classes = load_scheduled_classes(args.specs)
    engine = make_engine(args.url, 1)
    try:
        scheduler = Scheduler(engine, schedules_of(classes, engine))
        with on_stop_signals(lambda signum: scheduler.stop()):
            scheduler.run()
    finally:
        engine.dispose()
    return 0


def _when(value: Any) -> str | None:
    return None if value is None else f"{value:%Y-%m-%d %H:%M:%S}"


def cmd_schedule_list(args: argparse.Namespace) -> int:
    engine = make_engine(args.url)
    try:
        with engine.connect() as conn:
            states = list_schedules(conn)
    finally:
        engine.dispose()
    if bool(args.json) or _flag_env("Q4M_JSON"):
        for state in states:
            record = dict(state.__dict__)
            for key in ("created_at", "last_tick", "next_tick"):
                record[key] = None if record[key] is None else record[key].isoformat()
            print(json.dumps(record))
        return 0
    if not states:
        print("no schedules")
        return 0
    for state in states:
        print(
            f"{state.name} -> {state.queue}  {state.spec}  last={_when(state.last_tick) or '-'}"
            f"  next={_when(state.next_tick) or '-'}  fired={state.fired} (UTC)"
        )
    return 0


def _check_level(level: str) -> None:
    if level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise Q4MError(f"unknown log level {level!r}")


def parse_json_rows(lines: Iterable[str], where: str = "stdin") -> list[dict[str, Any]]:
    """One JSON object per non-blank line; raises :class:`Q4MError` naming the bad line."""
    rows: list[dict[str, Any]] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise Q4MError(f"{where} line {number}: invalid JSON ({err.msg})") from None
        if not isinstance(value, dict):
            raise Q4MError(f"{where} line {number}: a job is a JSON object, not {value!r:.40}")
        rows.append(value)
    return rows


def enqueue_rows(
    conn: Connection,
    table: Table,
    rows: Sequence[dict[str, Any]],
    *,
    delay: float | None = None,
    batch_size: int = 1000,
) -> int:
    """Insert ``rows`` (column name -> value) as new jobs with :func:`~sqlalchemy_q4m.enqueue`;
    returns how many.  On a connection outside a transaction each batch is committed, then
    workers that listen are woken; in the caller's transaction nothing is committed (nor
    woken: that is for after the caller's commit).  JSON text for a binary column is UTF-8
    encoded; with ``delay``, a row's own ``run_at`` is replaced."""
    columns = {c.name for c in table.columns}
    binary = {c.name for c in table.columns if isinstance(c.type, _Binary | LargeBinary)}
    if delay is not None and RUN_AT not in columns:
        raise Q4MError(f"--delay needs a {RUN_AT!r} column, which {table.name!r} lacks")
    # Every row is checked before the first batch commits (enqueue() checks one batch), so
    # bad input enqueues nothing; the messages speak of the command's JSON "jobs".
    prepared: list[dict[str, Any]] = []
    for number, row in enumerate(rows, 1):
        unknown = sorted(set(row) - columns)
        if unknown:
            raise Q4MError(f"job {number}: {table.name!r} has no column {', '.join(unknown)}")
        if JOB_ID in row:
            raise Q4MError(f"job {number}: {JOB_ID!r} is the job id, made by the client")
        values = {
            k: (v.encode() if k in binary and isinstance(v, str) else v) for k, v in row.items()
        }
        for key, value in values.items():
            if isinstance(value, dict | list):
                raise Q4MError(f"job {number}: column {key!r} takes a scalar, not {value!r:.40}")
        if delay is not None:
            values.pop(RUN_AT, None)
        prepared.append(values)
    own = not conn.in_transaction()
    for start in range(0, len(prepared), batch_size):
        batch = prepared[start : start + batch_size]
        enqueue(conn, table, batch, delay=delay, chunk_size=batch_size)
        if not own:
            continue
        conn.commit()
        if delay is None:
            notify_committed(conn, table, jobs=len(batch))  # wakes workers with --listen
    return len(prepared)


def cmd_enqueue(args: argparse.Namespace) -> int:
    if args.json_text is not None:
        rows = parse_json_rows([args.json_text], where="--json")
        if not rows:
            raise Q4MError("--json: empty")
    else:
        if sys.stdin.isatty():
            raise Q4MError("give --json '{...}' or pipe one JSON object per line into stdin")
        rows = parse_json_rows(sys.stdin)
    engine = make_engine(args.url)
    try:
        with engine.connect() as conn:
            table = reflect_queue_table(conn, args.table)
            count = enqueue_rows(conn, table, rows, delay=args.delay, batch_size=args.batch_size)
    finally:
        engine.dispose()
    print(f"enqueued {count} job(s) into {args.table}")
    return 0


def _queue_tables(conn: Connection, dead_name: str) -> list[str]:
    """Tables of the current database that look like queue tables: ENGINE=QUEUE, or a
    16-byte binary ``id`` primary key (the portable layout)."""
    rows = conn.execute(
        text(
            "SELECT t.TABLE_NAME, t.ENGINE, c.COLUMN_TYPE, c.COLUMN_KEY "
            "FROM information_schema.TABLES t LEFT JOIN information_schema.COLUMNS c "
            "ON c.TABLE_SCHEMA = t.TABLE_SCHEMA AND c.TABLE_NAME = t.TABLE_NAME "
            "AND c.COLUMN_NAME = :id "
            "WHERE t.TABLE_SCHEMA = DATABASE() AND t.TABLE_TYPE = 'BASE TABLE' "
            "ORDER BY t.TABLE_NAME"
        ),
        {"id": JOB_ID},
    ).all()
    names = []
    for name, engine, column_type, key in rows:
        if name == dead_name:
            continue
        if str(engine).upper() == "QUEUE" or (
            str(column_type).lower() == "binary(16)" and key == "PRI"
        ):
            names.append(str(name))
    return names


def queue_counts(conn: Connection, table: Table, dead_name: str) -> dict[str, Any]:
    """``queued`` (ready now), ``delayed``, ``owned`` (in progress), ``dead`` for one queue;
    on Q4M also the engine's own counters (``queue_stats``)."""
    backend = detect_backend(conn)
    total = int(conn.execute(select(func.count()).select_from(table)).scalar() or 0)
    id_column = table.c[JOB_ID]
    if backend == "portable":  # rows another transaction holds are the owned ones
        free = len(conn.execute(select(id_column).with_for_update(skip_locked=True)).all())
    else:  # Q4M: other connections' owned rows are counted but not returned
        free = len(conn.execute(select(id_column)).all())
    conn.rollback()
    delayed = 0
    run_at = table.columns.get(RUN_AT)
    if run_at is not None:
        stmt = select(func.count()).select_from(table).where(run_at > int(time.time()))
        delayed = int(conn.execute(stmt).scalar() or 0)
    counts: dict[str, Any] = {
        "table": table.name,
        "backend": backend,
        "queued": max(0, free - delayed),
        "delayed": delayed,
        "owned": max(0, total - free),
        "dead": count_dead(conn, dead_letter_table(dead_name), table.name),
        "unique_keys": count_keys(conn, table.name),
        "schedules": sum(1 for s in list_schedules(conn) if s.queue == table.name),
    }
    if backend == "native":
        raw = conn.execute(select(queue_stats(table.name))).scalar()
        counts["q4m"] = _parse_q4m_stats(str(raw or ""))
    conn.rollback()
    return counts


def _parse_q4m_stats(raw: str) -> dict[str, str]:
    """``queue_stats()`` text (``key=value`` per line) as a dict; kept raw if unparsable."""
    stats: dict[str, str] = {}
    for line in raw.replace(",", "\n").splitlines():
        key, sep, value = line.partition("=")
        if not sep:
            key, sep, value = line.partition(":")
        if sep and key.strip():
            stats[key.strip()] = value.strip()
    return stats if stats or not raw.strip() else {"raw": raw.strip()}


def cmd_stats(args: argparse.Namespace) -> int:
    as_json = bool(args.json) or _flag_env("Q4M_JSON")
    engine = make_engine(args.url)
    try:
        with engine.connect() as conn:
            conn.execution_options(isolation_level="READ COMMITTED")
            names = list(args.tables) or _queue_tables(conn, args.dead_table)
            results = [
                queue_counts(conn, reflect_queue_table(conn, name), args.dead_table)
                for name in names
            ]
    finally:
        engine.dispose()
    if as_json:
        print(json.dumps(results, indent=2))
        return 0
    if not results:
        print("no queue tables")
        return 0
    width = max(len("table"), *(len(r["table"]) for r in results))
    print(f"{'table':<{width}}  {'queued':>8}  {'delayed':>8}  {'owned':>6}  {'dead':>6}  backend")
    for r in results:
        print(
            f"{r['table']:<{width}}  {r['queued']:>8}  {r['delayed']:>8}  {r['owned']:>6}  "
            f"{r['dead']:>6}  {r['backend']}"
        )
        for key, value in r.get("q4m", {}).items():
            print(f"{'':<{width}}  {key} {value}")
        if r["unique_keys"] or r["schedules"]:
            print(f"{'':<{width}}  unique keys {r['unique_keys']}, schedules {r['schedules']}")
    return 0


def cmd_dead(args: argparse.Namespace) -> int:
    dead = dead_letter_table(args.dead_table)
    engine = make_engine(args.url)
    try:
        with engine.connect() as conn:
            table_name = getattr(args, "table", None)
            if (
                table_name is not None
                and not inspect(conn).has_table(table_name)
                and (args.action != "purge" or not count_dead(conn, dead, table_name))
            ):
                raise Q4MError(f"queue table {table_name!r} does not exist")
            conn.rollback()
            if args.action == "list":
                return _print_dead(conn, dead, table_name, args)
            assert table_name is not None  # retry and purge require it
            if args.action == "retry":
                table = reflect_queue_table(conn, table_name)
                moved = retry_dead(conn, dead, table, args.ids)
                print(f"requeued {moved} dead job(s) into {table_name}")
                return 0
            purged = purge_dead(conn, dead, table_name, args.ids)
            print(f"purged {purged} dead job(s) of {table_name}")
            return 0
    finally:
        engine.dispose()


def _print_dead(conn: Connection, dead: Table, queue: str | None, args: argparse.Namespace) -> int:
    letters = list_dead(conn, dead, queue, limit=args.limit)
    if bool(args.json) or _flag_env("Q4M_JSON"):
        for letter in letters:
            record = dict(letter.__dict__)
            for key in ("enqueued_at", "failed_at"):
                value = record[key]
                record[key] = value.isoformat() if value is not None else None
            print(json.dumps(record))
        return 0
    if not letters:
        print("no dead letters")
        return 0
    for letter in letters:
        print(
            f"#{letter.id} {letter.queue} {letter.job_id} attempts={letter.attempts} "
            f"failed_at={letter.failed_at:%Y-%m-%d %H:%M:%S} error={letter.error[:120]!r} "
            f"payload={letter.payload[:200]}"
        )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(
        url=args.url,
        jobs=args.jobs,
        concurrency=args.concurrency,
        processes=args.processes,
        table=args.table,
        dead_table=args.dead_table,
    )


# -- entry point ------------------------------------------------------------------------------


def _one_line(err: BaseException) -> str:
    """The error and its causes on one line."""
    parts = []
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, DBAPIError) and current.orig is not None:
            message = f"database error: {current.orig}"
        else:
            message = str(current).strip() or type(current).__name__
        parts.append(" ".join(message.split()))
        current = current.__cause__
    return " (caused by: ".join(parts) + ")" * (len(parts) - 1)


def main(argv: Sequence[str] | None = None, stdout: TextIO | None = None) -> int:
    """Run ``q4m``; returns the exit code (2 for bad input, with a one-line message)."""
    try:
        args = build_parser().parse_args(argv)
        code: int = args.func(args)
        return code
    except (Q4MError, SQLAlchemyError, OSError) as err:
        sys.stderr.write(f"q4m: error: {_one_line(err)}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        sys.stderr.write("q4m: interrupted\n")
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
