"""Retries, delayed jobs and priorities: the columns that carry them, the condition on them.

Q4M has no UPDATE, so a job's bookkeeping lives in integer columns of the row itself and a
retry is a *copy* of the row: ``attempts + 1`` and ``run_at = now + backoff``, inserted before
the failed original is ended.  ``run_at`` (Unix epoch seconds) is an integer because Q4M
conditions can only test integers: workers subscribe with ``run_at <= now``, rebuilt at each
wait.  On the portable backend the copy and the removal commit in one transaction; on Q4M they
are two statements, so a crash between them runs the job once more (at least once, never lost).

What a worker does with a failed job (:class:`~sqlalchemy_q4m.worker.policy.RetryPolicy`,
``decide``) is the worker's policy: :mod:`sqlalchemy_q4m.worker.policy`.
"""

from __future__ import annotations

import time
from typing import Any
from typing import ClassVar

from sqlalchemy import BigInteger
from sqlalchemy import Column
from sqlalchemy import Integer
from sqlalchemy import Table
from sqlalchemy import text
from sqlalchemy.orm import Mapped
from sqlalchemy.orm import mapped_column
from sqlalchemy.sql.elements import ColumnElement

__all__ = [
    "ATTEMPTS",
    "PRIORITY",
    "RUN_AT",
    "PriorityMixin",
    "RetryMixin",
    "ScheduledMixin",
    "due_condition",
    "priority_column",
    "retry_columns",
    "run_at_column",
]

#: Column names the worker recognises (on models, Core tables and reflected tables alike).
ATTEMPTS = "attempts"
RUN_AT = "run_at"
PRIORITY = "priority"
#: ``Column.info`` key marking the column the portable backend orders claims by (descending).
PRIORITY_INFO_KEY = "q4m_priority"


def run_at_column() -> Column[int]:
    """``run_at BIGINT NOT NULL DEFAULT 0``: the job may not start before this epoch second."""
    return Column(RUN_AT, BigInteger, nullable=False, default=0, server_default=text("0"))


def retry_columns() -> list[Column[Any]]:
    """The Core spelling of :class:`RetryMixin`: ``attempts`` and ``run_at``."""
    return [
        Column(ATTEMPTS, Integer, nullable=False, default=0, server_default=text("0")),
        run_at_column(),
    ]


def priority_column() -> Column[int]:
    """``priority INT NOT NULL DEFAULT 0``; higher first on the portable backend."""
    return Column(
        PRIORITY,
        Integer,
        nullable=False,
        default=0,
        server_default=text("0"),
        info={PRIORITY_INFO_KEY: True},
    )


class ScheduledMixin:
    """Adds ``run_at`` (epoch seconds): a delayed job is enqueued with ``run_at`` in the future
    and no worker takes it before then.  0 (the default) means "now"."""

    __q4m_scheduled__: ClassVar[bool] = True

    run_at: Mapped[int] = mapped_column(
        BigInteger, nullable=False, default=0, server_default=text("0"), sort_order=1001
    )


class RetryMixin(ScheduledMixin):
    """Adds ``attempts`` (failed runs so far) and ``run_at``: failures are retried with
    exponential backoff, then moved to the dead-letter table."""

    attempts: Mapped[int] = mapped_column(
        Integer, nullable=False, default=0, server_default=text("0"), sort_order=1000
    )


class PriorityMixin:
    """Adds ``priority``: on the portable backend higher values are claimed first; Q4M serves
    in insertion order, so there priority comes from the order of several tables."""

    priority: Mapped[int] = mapped_column(
        Integer,
        nullable=False,
        default=0,
        server_default=text("0"),
        info={PRIORITY_INFO_KEY: True},
        sort_order=1002,
    )


def due_condition(table: Table, now: float | None = None) -> ColumnElement[bool] | None:
    """``run_at <= now`` for a table with a ``run_at`` column, else None."""
    column = table.columns.get(RUN_AT)
    if column is None:
        return None
    current = int(time.time() if now is None else now)
    return column <= current
