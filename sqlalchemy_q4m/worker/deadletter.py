"""The dead-letter table: jobs that failed ``max_attempts`` times, kept for people to look at.

One InnoDB table (``q4m_dead_letters`` by default) holds the dead jobs of every queue: the queue
table's name, the last job id, the payload as JSON, the error, the traceback, the number of
attempts and the times.  ``q4m dead retry`` puts the payload back into its queue with a fresh
id and ``attempts = 0``; ``q4m dead purge`` deletes.  On the portable backend a job's burial
commits in the same transaction as its removal from the queue; on Q4M the dead letter is
committed first and the job ended after it (a crash in between leaves the job in the queue too:
at least once, never lost).
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import json
import uuid
from collections.abc import Mapping
from typing import Any

from sqlalchemy import BigInteger
from sqlalchemy import Column
from sqlalchemy import Connection
from sqlalchemy import DateTime
from sqlalchemy import Integer
from sqlalchemy import MetaData
from sqlalchemy import String
from sqlalchemy import Table
from sqlalchemy import insert
from sqlalchemy import inspect
from sqlalchemy.dialects.mysql import LONGTEXT
from sqlalchemy.schema import CreateTable

from ..exc import Q4MError
from ..schema.ddl import JOB_ID
from ..schema.ddl import validate_name
from ..schema.retry import ATTEMPTS
from ..schema.retry import RUN_AT

__all__ = [
    "DEAD_LETTER_TABLE",
    "bury",
    "dead_letter_table",
    "decode_payload",
    "encode_payload",
    "ensure_dead_letter_table",
    "payload_of",
]

DEAD_LETTER_TABLE = "q4m_dead_letters"
#: Columns that are bookkeeping, not payload: not stored, reset on ``retry``.
BOOKKEEPING = frozenset({JOB_ID, ATTEMPTS, RUN_AT})
_BYTES_TAG = "__q4m_bytes__"


def dead_letter_table(name: str = DEAD_LETTER_TABLE, metadata: MetaData | None = None) -> Table:
    """The dead-letter table (InnoDB, ``AUTO_INCREMENT`` key) as a Core :class:`Table`."""
    validate_name(name)
    return Table(
        name,
        metadata if metadata is not None else MetaData(),
        Column("id", BigInteger, primary_key=True, autoincrement=True),
        Column("queue", String(64), nullable=False),
        Column("job_id", String(36), nullable=False),
        Column("payload", LONGTEXT, nullable=False),
        Column("error", LONGTEXT, nullable=False),
        Column("traceback", LONGTEXT, nullable=False),
        Column("attempts", Integer, nullable=False),
        Column("enqueued_at", DateTime, nullable=True),
        Column("failed_at", DateTime, nullable=False),
        mysql_engine="InnoDB",
        mariadb_engine="InnoDB",
        mysql_charset="utf8mb4",
        mariadb_charset="utf8mb4",
    )


def ensure_dead_letter_table(conn: Connection, table: Table) -> None:
    """``CREATE TABLE IF NOT EXISTS`` (safe when many workers start at once); commits."""
    began = not conn.in_transaction()
    conn.execute(CreateTable(table, if_not_exists=True))
    if began:
        conn.commit()


def _encode_value(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return {_BYTES_TAG: base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, decimal.Decimal | uuid.UUID):
        return str(value)
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    return value


def encode_payload(values: Mapping[str, Any]) -> str:
    """JSON for a job's payload columns; bytes are tagged so they come back as bytes."""
    return json.dumps(
        {key: _encode_value(value) for key, value in values.items()},
        sort_keys=True,
        default=str,
    )


def decode_payload(payload: str) -> dict[str, Any]:
    """The inverse of :func:`encode_payload` (dates and decimals stay strings: the driver
    and the server convert them back on insert)."""
    data = json.loads(payload)
    if not isinstance(data, dict):
        raise Q4MError("a dead letter's payload is not a JSON object")
    return {
        key: base64.b64decode(value[_BYTES_TAG])
        if isinstance(value, dict) and set(value) == {_BYTES_TAG}
        else value
        for key, value in data.items()
    }


def payload_of(job: Any, table: Table) -> dict[str, Any]:
    """A job's column values by column name: a mapped instance, a Row, or a mapping."""
    if isinstance(job, Mapping):
        return {c.name: job.get(c.name) for c in table.columns}
    mapping = getattr(job, "_mapping", None)
    if mapping is not None:
        return {c.name: mapping.get(c, mapping.get(c.name)) for c in table.columns}
    mapper = inspect(job).mapper
    return {c.name: getattr(job, mapper.get_property_by_column(c).key) for c in table.columns}


def _enqueued_at(job_id: Any) -> dt.datetime | None:
    """The creation time encoded in a UUIDv7 job id (None for anything else)."""
    try:
        value = job_id if isinstance(job_id, uuid.UUID) else uuid.UUID(str(job_id))
    except (ValueError, TypeError):
        return None
    if value.version != 7:
        return None
    return dt.datetime.fromtimestamp((value.int >> 80) / 1000, dt.timezone.utc).replace(tzinfo=None)


def bury(
    conn: Connection,
    dead: Table,
    *,
    queue: str,
    values: Mapping[str, Any],
    error: str,
    traceback: str,
    attempts: int,
) -> None:
    """Insert one dead letter on ``conn`` (in the caller's transaction: not committed)."""
    job_id = values.get(JOB_ID)
    payload = {k: v for k, v in values.items() if k not in BOOKKEEPING}
    conn.execute(
        insert(dead).values(
            queue=queue,
            job_id=str(job_id),
            payload=encode_payload(payload),
            error=error[:65000],
            traceback=traceback,
            attempts=attempts,
            enqueued_at=_enqueued_at(job_id),
            failed_at=dt.datetime.now(dt.timezone.utc).replace(tzinfo=None, microsecond=0),
        )
    )
