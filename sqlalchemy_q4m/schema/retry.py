"""Retries, delayed jobs and priorities: the columns that carry them and the pure decisions.

Q4M has no UPDATE, so a job's bookkeeping lives in integer columns of the row itself and a
retry is a *copy* of the row: ``attempts + 1`` and ``run_at = now + backoff``, inserted before
the failed original is ended.  ``run_at`` (Unix epoch seconds) is an integer because Q4M
conditions can only test integers: workers subscribe with ``run_at <= now``, rebuilt at each
wait.  On the portable backend the copy and the removal commit in one transaction; on Q4M they
are two statements, so a crash between them runs the job once more (at least once, never lost).

This module holds no I/O: :func:`decide` and :meth:`RetryPolicy.delay` are pure functions the
thread and asyncio workers share.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
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

from ..exc import Q4MError
from .checks import check_seconds

__all__ = [
    "ATTEMPTS",
    "PRIORITY",
    "RUN_AT",
    "Bury",
    "PriorityMixin",
    "Retry",
    "RetryMixin",
    "RetryPolicy",
    "ScheduledMixin",
    "decide",
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


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how late a failed job runs again.

    Attempt ``n`` (1-based count of failures so far) waits ``base * 2**(n-1)`` seconds, capped
    at ``cap``, multiplied by a random factor in ``[1 - jitter, 1 + jitter]`` so that jobs
    failing together do not come back together.  ``max_attempts`` counts runs, the first one
    included: after that many failures the job is dead-lettered.
    """

    max_attempts: int = 5
    base: float = 2.0
    cap: float = 3600.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise Q4MError(f"max_attempts must be an integer >= 1, not {self.max_attempts!r}")
        check_seconds("retry base", self.base)
        check_seconds("retry cap", self.cap)
        if not 0 <= self.jitter <= 1:
            raise Q4MError(f"jitter must be between 0 and 1, not {self.jitter!r}")

    def delay(self, failures: int, rand: Callable[[], float] = random.random) -> int:
        """Whole seconds to wait before the run that follows ``failures`` failures."""
        if failures < 1:
            return 0
        exponent = min(failures - 1, 62)
        raw = min(self.cap, self.base * 2.0**exponent)
        factor = 1.0 - self.jitter + 2.0 * self.jitter * rand()
        return max(0, min(math.ceil(self.cap), math.ceil(raw * factor)))


@dataclass(frozen=True)
class Retry:
    """Decision: run again, as a copy with these ``attempts`` and ``run_at``."""

    attempts: int
    run_at: int
    delay: int


@dataclass(frozen=True)
class Bury:
    """Decision: no attempt left; move the job to the dead-letter table."""

    attempts: int


def decide(
    policy: RetryPolicy,
    previous_failures: int,
    *,
    now: float | None = None,
    rand: Callable[[], float] = random.random,
    can_retry: bool = True,
) -> Retry | Bury:
    """What to do with a job that just failed after ``previous_failures`` earlier failures.

    ``can_retry`` is False when the table has no ``attempts``/``run_at`` columns to count with
    (or the job was already ended, at most once): such a failure is buried at once.
    """
    failures = max(0, previous_failures) + 1
    if not can_retry or failures >= policy.max_attempts:
        return Bury(attempts=failures)
    delay = policy.delay(failures, rand)
    current = int(time.time() if now is None else now)
    return Retry(attempts=failures, run_at=current + delay, delay=delay)


def due_condition(table: Table, now: float | None = None) -> ColumnElement[bool] | None:
    """``run_at <= now`` for a table with a ``run_at`` column, else None."""
    column = table.columns.get(RUN_AT)
    if column is None:
        return None
    current = int(time.time() if now is None else now)
    return column <= current
