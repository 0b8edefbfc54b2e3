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
from sqlalchemy import Engine
from sqlalchemy import Table
from sqlalchemy import inspect
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import NoSuchModuleError
from sqlalchemy.exc import SQLAlchemyError

from ..exc import OptionError
from ..exc import Q4MError
from ..exc import QueueTableError
from ..ops import dead_letter
from ..ops import enqueue_rows
from ..ops import foreign_queue_tables
from ..ops import prune_lost_workers
from ..ops import queue_counts
from ..ops import queue_table_names
from ..ops import workers
from ..producer.schedule import Scheduler
from ..producer.schedule import list_schedules
from ..producer.schedule import schedules_of
from ..schema.checks import check_seconds
from ..schema.ddl import JOB_ID
from ..worker.consumer import reflect_queue_table
from ..worker.deadletter import DEAD_LETTER_TABLE
from ..worker.deadletter import count_dead
from ..worker.deadletter import dead_letter_table
from ..worker.deadletter import list_dead
from ..worker.deadletter import purge_dead
from ..worker.deadletter import retry_dead
from ..worker.runtime import EXIT_USAGE
from ..worker.runtime import WorkerConfig
from ..worker.runtime import load_scheduled_classes
from ..worker.runtime import make_engine
from ..worker.runtime import run_workers
from ..worker.runtime import setup_logging
from ..worker.signals import on_stop_signals

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


def _seconds(value: str, positive: bool = False) -> float:
    """A number of seconds, checked as the library checks its own (no NaN, infinity or
    negative)."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {value!r}") from None
    try:
        checked = check_seconds("the option", number, positive=positive)
    except OptionError as err:
        raise argparse.ArgumentTypeError(str(err).replace("the option ", "")) from None
    assert checked is not None
    return checked


def _port(value: str) -> int:
    number = _positive_int(value)
    if number > 65535:
        raise argparse.ArgumentTypeError(f"not a port: {number}")
    return number


def _positive_seconds(value: str) -> float:
    return _seconds(value, positive=True)


def _choice(choices: Sequence[str]) -> Callable[[str], str]:
    """argparse checks ``choices`` on the command line only; as a ``type`` the check also
    applies to a default taken from the environment."""

    def check(value: str) -> str:
        if value not in choices:
            raise argparse.ArgumentTypeError(
                f"invalid choice: {value!r} (choose from {', '.join(choices)})"
            )
        return value

    return check


def _log_level(value: str) -> str:
    try:
        _check_level(value)
    except Q4MError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return value


def _database_url(value: str) -> str:
    """A MySQL/MariaDB URL whose driver is installed; errors never show its password."""
    try:
        url = make_url(value)
    except (ArgumentError, ValueError):
        raise argparse.ArgumentTypeError(
            "bad database URL: cannot parse it (dialect+driver://user:password@host/database)"
        ) from None
    safe = url.render_as_string(hide_password=True)
    if url.get_backend_name() not in ("mysql", "mariadb"):
        raise argparse.ArgumentTypeError(
            f"bad database URL {safe}: sqlalchemy-q4m needs MySQL or MariaDB"
        )
    try:
        url.get_dialect().import_dbapi()
    except NoSuchModuleError:
        raise argparse.ArgumentTypeError(
            f"bad database URL {safe}: unknown driver {url.get_driver_name()!r}"
        ) from None
    except ImportError as err:
        raise argparse.ArgumentTypeError(
            f"bad database URL {safe}: its driver is not installed ({err})"
        ) from None
    charset = url.query.get("charset")
    if charset is not None and not _known_charset(charset):
        raise argparse.ArgumentTypeError(f"bad database URL {safe}: unknown charset {charset!r}")
    return value


def _known_charset(name: Any) -> bool:
    """Whether MySQL knows character set ``name`` (PyMySQL's table of them)."""
    from pymysql.charset import charset_by_name

    return isinstance(name, str) and charset_by_name(name) is not None


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
    if type is None and "choices" in kw:
        type = _choice(kw["choices"])
    if type is not None:  # argparse applies it to a string default (the environment's) too
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
    _option(parser, "--url", "Q4M_URL", "database URL", default=DEFAULT_URL, type=_database_url)


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
    _option(
        worker,
        "--log-level",
        "Q4M_LOG_LEVEL",
        "log level (default INFO, WARNING on a TTY)",
        type=_log_level,
    )
    _option(
        worker,
        "--status",
        "Q4M_STATUS",
        "live status line: auto (on a TTY), always or never",
        default="auto",
        choices=["auto", "always", "never"],
    )
    _option(
        worker,
        "--heartbeat",
        "Q4M_HEARTBEAT",
        "seconds between two heartbeats in the worker registry (0: do not register)",
        default="5",
        type=_seconds,
    )
    _option(
        worker,
        "--metrics-port",
        "Q4M_METRICS_PORT",
        "serve Prometheus metrics on this port (pip install 'sqlalchemy-q4m[metrics]')",
        type=_port,
    )
    _option(
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

    dead = sub.add_parser("dead", help="dead letters: list, show, retry or purge")
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
    dead_show = dead_sub.add_parser("show", help="one dead letter: error, traceback, payload")
    dead_show.add_argument("id", type=_positive_int, help="the dead letter's number (#N)")
    _switch(dead_show, "--json", "Q4M_JSON", "print JSON")
    for action in dead_sub.choices.values():
        _url_option(action)
        _dead_table_option(action)
        action.set_defaults(func=cmd_dead)

    workers = sub.add_parser("workers", help="running workers: host, pid, queues, jobs in hand")
    _url_option(workers)
    _option(
        workers,
        "--stale-after",
        "Q4M_STALE_AFTER",
        "seconds without a heartbeat after which a worker is shown as lost",
        default="30",
        type=_positive_seconds,
    )
    _option(
        workers,
        "--prune-after",
        "Q4M_PRUNE_AFTER",
        "delete the rows of workers silent for this many seconds (0: keep them)",
        default="3600",
        type=_seconds,
    )
    _switch(workers, "--json", "Q4M_JSON", "print JSON")
    workers.set_defaults(func=cmd_workers)

    web = sub.add_parser(
        "web",
        help="the web dashboard (pip install 'sqlalchemy-q4m[web]')",
        epilog="Retry, purge and enqueue need a token (Bearer or the login form) or HTTP basic "
        "credentials; without any the dashboard is read-only.  It refuses to listen on an "
        "address other than loopback without them.",
    )
    _url_option(web)
    _option(web, "--host", "Q4M_WEB_HOST", "address to listen on", default="127.0.0.1")
    _option(web, "--port", "Q4M_WEB_PORT", "port to listen on", default="8080", type=_port)
    _option(web, "--token", "Q4M_WEB_TOKEN", "token for the actions that change data")
    _option(
        web,
        "--basic-auth",
        "Q4M_WEB_BASIC_AUTH",
        "USER:PASSWORD for HTTP basic authentication (every page)",
    )
    _switch(web, "--read-only", "Q4M_WEB_READ_ONLY", "no retry, purge or enqueue")
    _dead_table_option(web)
    _option(
        web,
        "--refresh",
        "Q4M_WEB_REFRESH",
        "seconds between two refreshes of a page (0: none)",
        default="5",
        type=_seconds,
    )
    web.set_defaults(func=cmd_web)

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
        heartbeat=args.heartbeat,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
    )
    _probe(args.url)
    result = run_workers(config, status_stream=sys.stderr if status else None)
    return result.code


def _connect(engine: Engine) -> Connection:
    """``engine.connect()``; a driver's own complaint about the URL's parameters (a
    ``TypeError`` for an unknown one, a ``ValueError`` for a bad value: not database errors)
    becomes a one-line :class:`Q4MError`."""
    try:
        return engine.connect()
    except SQLAlchemyError:
        raise
    except (TypeError, ValueError, AttributeError, LookupError) as err:
        safe = engine.url.render_as_string(hide_password=True)
        raise Q4MError(f"cannot connect to {safe}: {type(err).__name__}: {err}") from None


def _probe(url: str) -> None:
    """Connect once as :func:`_connect` does, so that a driver's complaint about the URL is
    one line before workers start; database errors are left to the command's own checks."""
    engine = make_engine(url)
    try:
        _connect(engine).close()
    except SQLAlchemyError:
        pass
    finally:
        engine.dispose()


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


def parse_json_rows(lines: Iterable[str | bytes], where: str = "stdin") -> list[dict[str, Any]]:
    """One JSON object per non-blank line; raises :class:`Q4MError` naming the bad line."""
    return [row for _, row in _numbered_json_rows(lines, where)]


def _numbered_json_rows(
    lines: Iterable[str | bytes], where: str
) -> list[tuple[str, dict[str, Any]]]:
    """(``"<where> line N"``, object) for each non-blank line; lines may be UTF-8 bytes."""
    rows: list[tuple[str, dict[str, Any]]] = []
    for number, line in enumerate(lines, 1):
        label = f"{where} line {number}"
        if isinstance(line, bytes):
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError as err:
                raise Q4MError(f"{label}: not UTF-8 ({err.reason} at byte {err.start})") from None
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise Q4MError(f"{label}: invalid JSON ({err.msg})") from None
        except RecursionError:
            raise Q4MError(f"{label}: JSON nested too deeply") from None
        if not isinstance(value, dict):
            raise Q4MError(f"{label}: a job is a JSON object, not {value!r:.40}")
        rows.append((label, value))
    return rows


def cmd_enqueue(args: argparse.Namespace) -> int:
    if args.json_text is not None:
        numbered = _numbered_json_rows([args.json_text], where="--json")
        if not numbered:
            raise Q4MError("--json: empty")
    else:
        if sys.stdin.isatty():
            raise Q4MError("give --json '{...}' or pipe one JSON object per line into stdin")
        numbered = _numbered_json_rows(getattr(sys.stdin, "buffer", sys.stdin), where="stdin")
    labels = [label for label, _ in numbered]
    rows = [row for _, row in numbered]
    engine = make_engine(args.url)
    try:
        with _connect(engine) as conn:
            table = reflect_queue_table(conn, args.table)
            count = enqueue_rows(
                conn,
                table,
                rows,
                delay=args.delay,
                batch_size=args.batch_size,
                labels=labels,
            )
    finally:
        engine.dispose()
    print(f"enqueued {count} job(s) into {args.table}")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    as_json = bool(args.json) or _flag_env("Q4M_JSON")
    engine = make_engine(args.url)
    try:
        with _connect(engine) as conn:
            conn.execution_options(isolation_level="READ COMMITTED")
            named = list(args.tables)
            results = []
            if not named:
                for name in foreign_queue_tables(conn, args.dead_table):
                    sys.stderr.write(
                        f"q4m stats: skipped {name}: an ENGINE=QUEUE table without a job id "
                        f"column ({JOB_ID!r}), not a sqlalchemy-q4m queue table\n"
                    )
            for name in named or queue_table_names(conn, args.dead_table):
                try:
                    table = reflect_queue_table(conn, name)
                except QueueTableError as err:
                    if named:  # asked for by name: an error
                        raise
                    # found by looking (ENGINE=QUEUE), but not ours: the others still count
                    sys.stderr.write(f"q4m stats: skipped {name}: {err}\n")
                    continue
                results.append(queue_counts(conn, table, args.dead_table))
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
        counters = r.get("q4m", {})
        label = max((len(key) for key in counters), default=0)
        for key, value in counters.items():  # the engine's own counters, one a line
            print(f"{'':<{width}}  {key:<{label}}  {value:>8}")
        if r["unique_keys"] or r["schedules"]:
            print(f"{'':<{width}}  unique keys {r['unique_keys']}, schedules {r['schedules']}")
    return 0


def cmd_workers(args: argparse.Namespace) -> int:
    as_json = bool(args.json) or _flag_env("Q4M_JSON")
    engine = make_engine(args.url)
    try:
        with _connect(engine) as conn:
            if args.prune_after:
                prune_lost_workers(conn, older_than=args.prune_after)
            found = workers(conn, stale_after=args.stale_after)
    finally:
        engine.dispose()
    if as_json:
        for w in found:
            record = dict(w.__dict__)
            for key in ("started_at", "heartbeat_at"):
                record[key] = record[key].isoformat()
            print(json.dumps(record))
        return 0
    if not found:
        print("no workers registered")
        return 0
    now = time.time()
    for w in found:
        state = f"LOST (silent {w.heartbeat_age:.0f}s)" if w.lost else "alive"
        counts = " ".join(f"{k} {v}" for k, v in w.counts.items())
        print(
            f"{w.host} pid {w.pid} {w.name} {w.kind} {w.processes}x{w.concurrency} {state}  "
            f"queues {','.join(w.queues)}  since {w.started_at:%Y-%m-%d %H:%M:%S}  {counts}"
        )
        for table, job_id, since in w.in_hand:
            print(f"    in hand: {table} {job_id} for {now - since:.1f}s")
    return 0


def cmd_web(args: argparse.Namespace) -> int:
    try:
        from ..web import serve
    except ImportError as err:
        raise Q4MError(f"q4m web needs: pip install 'sqlalchemy-q4m[web]' ({err})") from None
    read_only = bool(args.read_only) or _flag_env("Q4M_WEB_READ_ONLY")
    _probe(args.url)
    return serve(
        args.url,
        host=args.host,
        port=args.port,
        token=args.token,
        basic_auth=args.basic_auth,
        read_only=read_only,
        dead_table=args.dead_table,
        refresh=args.refresh,
    )


def cmd_dead(args: argparse.Namespace) -> int:
    dead = dead_letter_table(args.dead_table)
    engine = make_engine(args.url)
    try:
        with _connect(engine) as conn:
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
            if args.action == "show":
                return _show_dead(conn, args)
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


def _show_dead(conn: Connection, args: argparse.Namespace) -> int:
    letter = dead_letter(conn, args.id, args.dead_table)
    if letter is None:
        raise Q4MError(f"no dead letter #{args.id}")
    record = dict(letter.__dict__)
    for key in ("enqueued_at", "failed_at"):
        value = record[key]
        record[key] = value.isoformat() if value is not None else None
    if bool(args.json) or _flag_env("Q4M_JSON"):
        print(json.dumps(record))
        return 0
    for key in ("id", "queue", "job_id", "attempts", "enqueued_at", "failed_at", "error"):
        print(f"{key:<12} {record[key]}")
    print(f"payload      {letter.payload}")
    print(letter.traceback.rstrip())
    return 0


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

    _probe(args.url)
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
            seen.add(id(current.orig))  # said already: not again as the cause
        else:
            message = str(current).strip() or type(current).__name__
        parts.append(" ".join(message.split()))
        current = current.__cause__
    return " (caused by: ".join(parts) + ")" * (len(parts) - 1)


def _hide_password(message: str, url: str | None) -> str:
    """``message`` without the password of ``url``, should any layer have quoted it."""
    try:
        password = make_url(url).password if url else None
    except (ArgumentError, ValueError):
        password = None
    return message.replace(password, "***") if password else message


def main(argv: Sequence[str] | None = None, stdout: TextIO | None = None) -> int:
    """Run ``q4m``; returns the exit code (2 for bad input, with a one-line message)."""
    args: argparse.Namespace | None = None
    try:
        args = build_parser().parse_args(argv)
        code: int = args.func(args)
        return code
    except (Q4MError, SQLAlchemyError, OSError) as err:
        message = _hide_password(_one_line(err), getattr(args, "url", None))
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")
        sys.stderr.write(f"q4m: error: {message}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        sys.stderr.write("q4m: interrupted\n")
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
