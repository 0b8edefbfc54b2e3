"""``q4m worker``, ``q4m scheduler``, ``q4m schedule list`` and ``q4m workers``: running
workers and the scheduler, and listing what the registry and the schedule tables hold."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from ..ops import prune_lost_workers
from ..ops import workers
from ..producer.schedule import Scheduler
from ..producer.schedule import schedules_of
from ..producer.ticks import list_schedules
from ..worker.runtime import WorkerConfig
from ..worker.runtime import load_scheduled_classes
from ..worker.runtime import make_engine
from ..worker.runtime import run_workers
from ..worker.runtime import setup_logging
from ..worker.signals import on_stop_signals
from .connect import connect
from .connect import probe
from .options import check_level
from .options import flag_env

__all__ = ["cmd_schedule_list", "cmd_scheduler", "cmd_worker", "cmd_workers"]


def cmd_worker(args: argparse.Namespace) -> int:
    burst = bool(args.burst) or flag_env("Q4M_BURST")
    end_first = bool(args.end_before_execute) or flag_env("Q4M_END_BEFORE_EXECUTE")
    tty = sys.stderr.isatty()
    status = args.status == "always" or (args.status == "auto" and tty)
    level = args.log_level or ("WARNING" if status else "INFO")
    check_level(level)
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
    probe(args.url)
    result = run_workers(config, status_stream=sys.stderr if status else None)
    return result.code


def cmd_scheduler(args: argparse.Namespace) -> int:
    check_level(args.log_level)
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
    if bool(args.json) or flag_env("Q4M_JSON"):
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


def cmd_workers(args: argparse.Namespace) -> int:
    as_json = bool(args.json) or flag_env("Q4M_JSON")
    engine = make_engine(args.url)
    try:
        with connect(engine) as conn:
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
