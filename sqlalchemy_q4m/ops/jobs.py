"""The jobs of a queue: a page of them by state, one by id, and rows enqueued from outside
(the command line, a web form)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection
from sqlalchemy import Table
from sqlalchemy import false
from sqlalchemy import inspect
from sqlalchemy import select
from sqlalchemy.types import LargeBinary
from sqlalchemy.types import _Binary

from ..backends.notify import notify_committed
from ..exc import Q4MError
from ..exc import RowError
from ..producer.enqueue import enqueue
from ..schema.ddl import JOB_ID
from ..schema.retry import ATTEMPTS
from ..schema.retry import RUN_AT

__all__ = [
    "JOB_STATES",
    "JobPage",
    "enqueue_rows",
    "get_job",
    "job_age",
    "job_id_text",
    "list_jobs",
]

#: Filters of :func:`list_jobs`.
JOB_STATES = ("all", "ready", "delayed", "in_hand")


def job_age(job_id: Any, now: float | None = None) -> float | None:
    """Seconds since a UUIDv7 job id was made (None for other ids)."""
    try:
        if isinstance(job_id, bytes | bytearray | memoryview):
            value = uuid.UUID(bytes=bytes(job_id))
        elif isinstance(job_id, uuid.UUID):
            value = job_id
        else:
            value = uuid.UUID(str(job_id))
    except (ValueError, TypeError):
        return None
    if value.version != 7:
        return None
    return max(0.0, (time.time() if now is None else now) - (value.int >> 80) / 1000)


def job_id_text(job_id: Any) -> str:
    """A job id as text: a UUID for 16 bytes, else ``str``."""
    if isinstance(job_id, bytes | bytearray | memoryview) and len(bytes(job_id)) == 16:
        return str(uuid.UUID(bytes=bytes(job_id)))
    return str(job_id)


def _id_value(table: Table, job_id: str) -> Any:
    """The value to compare ``table.c.id`` with for a job id given as text."""
    try:
        value = uuid.UUID(job_id)
    except ValueError:
        raise Q4MError(f"not a job id: {job_id!r:.60}") from None
    if isinstance(table.c[JOB_ID].type, _Binary | LargeBinary):
        return value.bytes
    return value


@dataclass
class JobPage:
    """One page of :func:`list_jobs`: rows as column -> value (the id as text)."""

    table: str
    state: str
    offset: int
    limit: int
    columns: list[str]
    rows: list[dict[str, Any]]
    more: bool


def _row(table: Table, mapping: Any) -> dict[str, Any]:
    row = {c.name: mapping[c.name] for c in table.columns}
    row[JOB_ID] = job_id_text(row[JOB_ID])
    for key, value in row.items():
        if isinstance(value, bytes | bytearray | memoryview):
            row[key] = bytes(value).decode("utf-8", "backslashreplace")
    return row


def list_jobs(
    conn: Connection,
    table: Table,
    *,
    state: str = "all",
    limit: int = 50,
    offset: int = 0,
    held: Sequence[str] = (),
) -> JobPage:
    """A page of the jobs waiting in ``table``: ``all``, ``ready`` (due now), ``delayed``
    (``run_at`` in the future) or ``in_hand`` (the ids in ``held``, from the registry; on
    Q4M other connections cannot read owned rows, so those come from the registry only)."""
    if state not in JOB_STATES:
        raise Q4MError(f"unknown job state {state!r}: use one of {', '.join(JOB_STATES)}")
    limit = max(1, min(int(limit), 500))
    offset = max(0, int(offset))
    stmt = select(table)
    run_at = table.columns.get(RUN_AT)
    now = int(time.time())
    if state in ("ready", "delayed") and run_at is None:
        if state == "delayed":
            stmt = stmt.where(false())
    elif state == "ready":
        assert run_at is not None
        stmt = stmt.where(run_at <= now)
    elif state == "delayed":
        assert run_at is not None
        stmt = stmt.where(run_at > now)
    elif state == "in_hand":
        ids = []
        for job_id in held:
            try:
                ids.append(_id_value(table, job_id))
            except Q4MError:
                continue
        stmt = stmt.where(table.c[JOB_ID].in_(ids))
    if inspect(conn).get_table_options(table.name).get("mysql_engine", "").upper() != "QUEUE":
        stmt = stmt.order_by(table.c[JOB_ID])
    rows = conn.execute(stmt.limit(limit + 1).offset(offset)).mappings().all()
    conn.rollback()
    return JobPage(
        table=table.name,
        state=state,
        offset=offset,
        limit=limit,
        columns=[c.name for c in table.columns],
        rows=[_row(table, r) for r in rows[:limit]],
        more=len(rows) > limit,
    )


def get_job(conn: Connection, table: Table, job_id: str) -> dict[str, Any] | None:
    """One waiting job by id (None when it is not there, or in another worker's hand on Q4M);
    on Q4M a scan (the engine has no index)."""
    row = (
        conn.execute(select(table).where(table.c[JOB_ID] == _id_value(table, job_id)))
        .mappings()
        .first()
    )
    conn.rollback()
    if row is None:
        return None
    result = _row(table, row)
    age = job_age(job_id)
    result["_age"] = age
    result["_attempts"] = row.get(ATTEMPTS)
    result["_run_at"] = row.get(RUN_AT)
    return result


def enqueue_rows(
    conn: Connection,
    table: Table,
    rows: Sequence[dict[str, Any]],
    *,
    delay: float | None = None,
    batch_size: int = 1000,
    labels: Sequence[str] | None = None,
) -> int:
    """Insert ``rows`` (column name -> value) as new jobs with :func:`~sqlalchemy_q4m.enqueue`;
    returns how many.  Every row is checked before the first is sent (a bad one raises
    :class:`~sqlalchemy_q4m.exc.RowError` named by its ``labels`` entry, else ``job N``, and
    nothing is enqueued).  On a connection outside a transaction the rows are committed
    together, then workers that listen are woken; in the caller's transaction nothing is
    committed (nor woken: that is for after the caller's commit).  JSON text for a binary
    column is UTF-8 encoded; with ``delay``, a row's own ``run_at`` is replaced."""

    def where(number: int) -> str:
        return labels[number - 1] if labels is not None else f"job {number}"

    columns = {c.name for c in table.columns}
    binary = {c.name for c in table.columns if isinstance(c.type, _Binary | LargeBinary)}
    if delay is not None and RUN_AT not in columns:
        raise Q4MError(f"--delay needs a {RUN_AT!r} column, which {table.name!r} lacks")
    prepared: list[dict[str, Any]] = []
    for number, row in enumerate(rows, 1):
        values = dict(row)
        for key in binary.intersection(values):
            if isinstance(values[key], str):
                try:
                    values[key] = values[key].encode("utf-8")
                except UnicodeEncodeError as err:
                    raise RowError(
                        f"{key!r} takes valid Unicode, not a string with {err.reason}",
                        row=number,
                        column=key,
                        where=where(number),
                    ) from None
        if delay is not None:
            values.pop(RUN_AT, None)
        prepared.append(values)
    own = not conn.in_transaction()
    try:
        enqueue(conn, table, prepared, delay=delay, chunk_size=batch_size, notify=False)
    except RowError as err:  # raised before anything was sent
        if own:
            conn.rollback()
        raise RowError(err.reason, row=err.row, column=err.column, where=where(err.row)) from None
    if own:
        conn.commit()
        if delay is None and prepared:
            notify_committed(conn, table, jobs=len(prepared))  # wakes workers with --listen
    return len(prepared)
