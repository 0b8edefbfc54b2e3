"""``q4m enqueue`` and ``q4m stats``: jobs from JSON lines into a queue, and the counts of
the queues."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from typing import Any

from ..exc import Q4MError
from ..exc import QueueTableError
from ..ops import enqueue_rows
from ..ops import foreign_queue_tables
from ..ops import queue_counts
from ..ops import queue_table_names
from ..schema.ddl import JOB_ID
from ..schema.reflect import reflect_queue_table
from ..worker.runtime import make_engine
from .connect import connect
from .options import flag_env

__all__ = ["cmd_enqueue", "cmd_stats", "parse_json_rows"]


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
        with connect(engine) as conn:
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
    as_json = bool(args.json) or flag_env("Q4M_JSON")
    engine = make_engine(args.url)
    try:
        with connect(engine) as conn:
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
