"""The worker's per-job policy, without I/O: what happens to a job once ``execute`` ended.

A job that returned is ended (``done``); one that called ``queue_abort()`` goes back to the
queue untouched (``aborted``); one that raised is retried as a copy with ``attempts + 1`` and
``run_at = now + backoff`` (``retried``) or, with no attempt left, moved to the dead letters
(``dead``).  A job in hand when the connection is lost is ``lost`` (the server returns it).
:func:`settle` says which; the synchronous and the asyncio drivers only perform the statements
it asks for, so both behave the same by construction.  :func:`reconnect_delay` is the backoff
between two reconnects of the run loop.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from ..exc import Q4MError
from ..schema.checks import check_seconds

__all__ = [
    "OUTCOMES",
    "Aborted",
    "Bury",
    "Done",
    "Outcome",
    "Retry",
    "RetryPolicy",
    "attempts_allowed",
    "decide",
    "reconnect_delay",
    "settle",
]

Outcome = Literal["done", "retried", "dead", "aborted", "lost"]
OUTCOMES: tuple[Outcome, ...] = ("done", "retried", "dead", "aborted", "lost")


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


@dataclass(frozen=True)
class Done:
    """Decision: the job returned; end it (unless ``end_before_execute`` ended it already)."""

    end: bool


@dataclass(frozen=True)
class Aborted:
    """Decision: the job asked to go back; return it (impossible when it was ended first:
    ``end`` is then False and the driver only warns)."""

    give_back: bool


#: The decisions without a value of their own, made once (settle runs for every job).
_END = {True: Done(end=True), False: Done(end=False)}
_GIVE_BACK = {True: Aborted(give_back=True), False: Aborted(give_back=False)}


def settle(
    policy: RetryPolicy,
    previous_failures: int,
    *,
    failed: bool,
    aborted: bool,
    ended: bool,
    can_retry: bool,
    now: float | None = None,
    rand: Callable[[], float] = random.random,
) -> Done | Aborted | Retry | Bury:
    """How a job that ``execute`` just finished with ends.

    ``failed``: it raised (or its writes could not be kept); ``aborted``: it called
    ``queue_abort()``; ``ended``: ``end_before_execute`` removed it before it ran (at most
    once: a failure is buried, never retried); ``can_retry``: its table has the
    ``attempts``/``run_at`` columns a retry needs.
    """
    if not failed:
        if aborted:
            return _GIVE_BACK[not ended]
        return _END[not ended]
    return decide(policy, previous_failures, now=now, rand=rand, can_retry=can_retry and not ended)


def attempts_allowed(policy: RetryPolicy, *, ended: bool, can_retry: bool) -> int:
    """The runs a job gets (for the log line of a failure): 1 when it cannot be retried."""
    return policy.max_attempts if can_retry and not ended else 1


def reconnect_delay(
    failures: int, cap: float, rand: Callable[[float, float], float] = random.uniform
) -> float:
    """Seconds before the run loop reconnects after ``failures`` database errors in a row:
    0.5 s doubling per failure up to ``cap``, times a jitter in [0.75, 1.25]."""
    delay: float = min(cap, 0.5 * 2 ** min(max(failures, 1) - 1, 10))
    return delay * rand(0.75, 1.25)
