"""Queue tables by name: reflecting one from the server (its ``id`` typed as a job id) and
the job class name to table name rule (``ShellJob`` -> ``shell_jobs``)."""

from __future__ import annotations

import re

from sqlalchemy import Connection
from sqlalchemy import MetaData
from sqlalchemy import Table
from sqlalchemy import inspect
from sqlalchemy.exc import NoSuchTableError

from ..exc import QueueTableError
from .ddl import JOB_ID
from .ddl import QUEUE_INFO_KEY
from .ddl import job_id_column
from .ddl import validate_name
from .retry import PRIORITY
from .retry import PRIORITY_INFO_KEY

__all__ = ["reflect_queue_table", "table_name_for"]


def table_name_for(class_name: str) -> str:
    """``ShellJob`` -> ``shell_jobs``, ``HTTPFetch`` -> ``http_fetches``, ``Entry`` ->
    ``entries``: the gem's class name to table name rule."""
    snake = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", class_name)
    snake = re.sub(r"([a-z\d])([A-Z])", r"\1_\2", snake).lower()
    if re.search(r"[^aeiou]y$", snake):
        return snake[:-1] + "ies"
    if re.search(r"(s|x|z|ch|sh)$", snake):
        return snake + "es"
    return snake + "s"


def reflect_queue_table(conn: Connection, name: str, metadata: MetaData | None = None) -> Table:
    """Load a queue table's definition from the server, its ``id`` typed as a job id.

    Raises :class:`QueueTableError` when the table does not exist or has no ``id`` column.
    """
    validate_name(name)
    began = not conn.in_transaction()
    try:
        if not inspect(conn).has_table(name):
            raise QueueTableError(f"queue table {name!r} does not exist")
        names = {c["name"] for c in inspect(conn).get_columns(name)}
        if JOB_ID not in names:
            raise QueueTableError(
                f"table {name!r} has no {JOB_ID!r} job id column: it is not a queue table"
            )
        table = Table(name, metadata or MetaData(), job_id_column(), autoload_with=conn)
    except NoSuchTableError:
        raise QueueTableError(f"queue table {name!r} does not exist") from None
    finally:
        if began and conn.in_transaction():
            conn.rollback()
    table.info[QUEUE_INFO_KEY] = True
    priority = table.columns.get(PRIORITY)
    if priority is not None:
        priority.info[PRIORITY_INFO_KEY] = True
    return table
