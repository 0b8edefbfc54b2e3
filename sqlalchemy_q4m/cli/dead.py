"""``q4m dead list|show|retry|purge``: the dead letters of a queue."""

from __future__ import annotations

import argparse
import json

from sqlalchemy import Connection
from sqlalchemy import Table

from ..exc import Q4MError
from ..ops import check_dead_queue
from ..ops import dead_letter
from ..ops.dead import list_dead
from ..ops.dead import purge_dead
from ..ops.dead import retry_dead
from ..schema.reflect import reflect_queue_table
from ..worker.deadletter import dead_letter_table
from ..worker.runtime import make_engine
from .connect import connect
from .options import flag_env

__all__ = ["cmd_dead"]


def cmd_dead(args: argparse.Namespace) -> int:
    dead = dead_letter_table(args.dead_table)
    engine = make_engine(args.url)
    try:
        with connect(engine) as conn:
            table_name = getattr(args, "table", None)
            if table_name is not None:
                check_dead_queue(conn, dead, table_name, purging=args.action == "purge")
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
    if bool(args.json) or flag_env("Q4M_JSON"):
        print(json.dumps(record))
        return 0
    for key in ("id", "queue", "job_id", "attempts", "enqueued_at", "failed_at", "error"):
        print(f"{key:<12} {record[key]}")
    print(f"payload      {letter.payload}")
    print(letter.traceback.rstrip())
    return 0


def _print_dead(conn: Connection, dead: Table, queue: str | None, args: argparse.Namespace) -> int:
    letters = list_dead(conn, dead, queue, limit=args.limit)
    if bool(args.json) or flag_env("Q4M_JSON"):
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
