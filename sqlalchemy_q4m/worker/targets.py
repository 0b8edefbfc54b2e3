"""What a consumer serves: its job objects' queue tables, resolved once per connection.

A job class names its tables (``table_name``, reflected from the server) or declares them
(``model``); :func:`resolve_targets` turns the job objects of a consumer into
:class:`Target` s, one per table in priority order, and :func:`where_for` builds each wait's
conditions (the job's ``where`` and ``run_at <= now``).
"""

from __future__ import annotations

import collections
import functools
import logging
import time
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING
from typing import Any

from sqlalchemy import Connection
from sqlalchemy import Table
from sqlalchemy import and_
from sqlalchemy import inspect
from sqlalchemy.sql.elements import ColumnElement

from ..exc import Q4MError
from ..schema.ddl import JOB_ID
from ..schema.functions import subscriptions
from ..schema.reflect import reflect_queue_table
from ..schema.reflect import table_name_for
from ..schema.retry import ATTEMPTS
from ..schema.retry import RUN_AT
from ..schema.retry import due_condition
from .deadletter import payload_of

if TYPE_CHECKING:
    from .job import Job

__all__ = [
    "Target",
    "calls_where",
    "check_retry_columns",
    "declared_of",
    "resolve_targets",
    "row_type",
    "table_names_of",
    "where_for",
]

logger = logging.getLogger("sqlalchemy_q4m.worker")


def declared_of(model: Any) -> list[Any]:
    if model is None:
        return []
    if isinstance(model, list | tuple):
        return list(model)
    return [model]


def table_names_of(
    class_name: str, table_name: str | Sequence[str] | None, model: Any
) -> list[str]:
    declared = declared_of(model)
    if declared:
        return [t.name if isinstance(t, Table) else t.__table__.name for t in declared]
    if table_name is None:
        return [table_name_for(class_name)]
    if isinstance(table_name, str):
        return [table_name]
    return list(table_name)


@dataclass
class Target:
    job: Job
    target: Any
    table: Table
    row_type: Callable[..., Any] | None
    payload_names: list[str]

    @functools.cached_property
    def orm(self) -> bool:
        """The target is a mapped class (read per job: worked out once)."""
        return not isinstance(self.target, Table)

    @functools.cached_property
    def can_retry(self) -> bool:
        """The table has the ``attempts`` and ``run_at`` columns a retry needs (read per
        job: worked out once, the table does not change under a target)."""
        return ATTEMPTS in self.table.columns and RUN_AT in self.table.columns

    @functools.cached_property
    def _identity_keys(self) -> tuple[str | None, str | None]:
        """The attribute names of the job id and ``attempts`` on mapped instances."""
        mapper = inspect(self.target)
        names: list[str | None] = []
        for name in (JOB_ID, ATTEMPTS):
            column = self.table.columns.get(name)
            names.append(None if column is None else mapper.get_property_by_column(column).key)
        return names[0], names[1]

    def identify(self, item: Any) -> tuple[Any, int]:
        """A claimed job's id and earlier attempts, read without copying all its values."""
        if self.orm:
            id_key, attempts_key = self._identity_keys
            job_id = None if id_key is None else getattr(item, id_key)
            attempts = None if attempts_key is None else getattr(item, attempts_key)
        else:
            values = payload_of(item, self.table)
            job_id, attempts = values.get(JOB_ID), values.get(ATTEMPTS)
        return job_id, int(attempts or 0)


#: ``(job class, table name)`` already warned about missing retry columns in this process.
_NO_RETRY_WARNED: set[tuple[type[Job], str]] = set()


def check_retry_columns(t: Target) -> None:
    """At start-up: ``max_attempts`` > 1 on a table without ``attempts``/``run_at`` cannot
    be honoured (the first failure is dead-lettered): a warning, once per process and table,
    naming what to add.  Not refused: one job class may serve tables with and without them."""
    job = t.job
    if t.can_retry or job.end_before_execute or job.policy.max_attempts <= 1:
        return
    key = (type(job), t.table.name)
    if key in _NO_RETRY_WARNED:
        return
    _NO_RETRY_WARNED.add(key)
    logger.warning(
        "%s: queue table %r has no %r and %r columns: max_attempts=%d is not used, a failed "
        "job goes to the dead letters at once; add %s to retry it (or set max_attempts = 1)",
        type(job).__name__,
        t.table.name,
        ATTEMPTS,
        RUN_AT,
        job.policy.max_attempts,
        "RetryMixin to the model"
        if t.orm
        else "retry_columns() to the table (or RetryMixin to its model)",
    )


def row_type(table: Table) -> tuple[Callable[..., Any], list[str]]:
    names = [c.name for c in table.columns if c.name != JOB_ID]
    return collections.namedtuple("JobRow", names, rename=True), names


def resolve_targets(jobs: Sequence[Job], conn: Connection) -> list[Target]:
    """One target per table of ``jobs``, in order (reflecting named tables on ``conn``),
    validated (no table twice, queue tables only); warns about tables that cannot retry."""
    targets: list[Target] = []
    for job in jobs:
        declared = job.declared_targets()
        if declared:
            for model in declared:
                table = model if isinstance(model, Table) else model.__table__
                targets.append(Target(job, model, table, None, []))
        else:
            for name in job.table_names():
                table = reflect_queue_table(conn, name)
                make_row, names = row_type(table)
                targets.append(Target(job, table, table, make_row, names))
    subscriptions([t.target for t in targets])  # validates: no table twice, queues
    for t in targets:
        check_retry_columns(t)
    return targets


def job_where(job: Job) -> Any:
    """The job's ``where``: from the instance (an option) or the class (not bound: a plain
    function)."""
    return vars(job).get("where", type(job).where)


def calls_where(job: Job) -> bool:
    """True when the job's ``where`` (or a value of its mapping) is a callable: called at
    each wait, so its conditions are not reused."""
    user = job_where(job)
    if isinstance(user, Mapping):
        return any(callable(value) for value in user.values())
    return callable(user)


def where_for(
    targets: Sequence[Target], now: float | None = None
) -> dict[Any, ColumnElement[bool]] | None:
    """Each target's condition (the job's ``where`` and ``run_at <= now``); None when there is
    none, so the subscriptions are the memoized unconditional ones."""
    current = time.time() if now is None else now
    where: dict[Any, ColumnElement[bool]] = {}
    for t in targets:
        parts: list[ColumnElement[bool]] = []
        user = job_where(t.job)
        mapped = isinstance(user, Mapping)
        if mapped:  # keyed by model, Table or table name
            user = user.get(t.target, user.get(t.table.name))
        if callable(user):  # where = lambda table: table.c.priority >= 5 (reflected)
            user = user(t.table)
        elif user is not None and not mapped and len(t.job.table_names()) > 1:
            raise Q4MError(
                f"{type(t.job).__name__}: with several tables, where must be a mapping "
                "{model_or_table: condition}"
            )
        if user is not None:
            parts.append(user)
        due = due_condition(t.table, current)
        if due is not None:
            parts.append(due)
        if parts:
            where[t.target] = parts[0] if len(parts) == 1 else and_(*parts)
    return where or None
