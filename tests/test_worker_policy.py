"""The worker's sans-IO cores: the per-job policy (:mod:`sqlalchemy_q4m.worker.policy`) and the
run loop's decisions (:mod:`sqlalchemy_q4m.worker.loop`), with no server and no clock.  The
synchronous and the asyncio drivers only perform what these decide."""

from __future__ import annotations

import pytest
from sqlalchemy.exc import OperationalError

from sqlalchemy_q4m.exc import CompletionFailed
from sqlalchemy_q4m.exc import ConnectionLost
from sqlalchemy_q4m.exc import Q4MError
from sqlalchemy_q4m.worker.loop import DUE_SLICE
from sqlalchemy_q4m.worker.loop import LOOP_ERRORS
from sqlalchemy_q4m.worker.loop import RunLoop
from sqlalchemy_q4m.worker.loop import StopSignals
from sqlalchemy_q4m.worker.loop import wait_slices
from sqlalchemy_q4m.worker.policy import Aborted
from sqlalchemy_q4m.worker.policy import Bury
from sqlalchemy_q4m.worker.policy import Done
from sqlalchemy_q4m.worker.policy import Retry
from sqlalchemy_q4m.worker.policy import RetryPolicy
from sqlalchemy_q4m.worker.policy import attempts_allowed
from sqlalchemy_q4m.worker.policy import reconnect_delay
from sqlalchemy_q4m.worker.policy import settle

pytestmark = pytest.mark.unit

POLICY = RetryPolicy(max_attempts=3, base=2.0, cap=100.0, jitter=0.0)
NOW = 1_764_360_000.0


def _settle(attempts: int = 0, **kw: bool) -> Done | Aborted | Retry | Bury:
    flags = {"failed": False, "aborted": False, "ended": False, "can_retry": True, **kw}
    return settle(POLICY, attempts, now=NOW, rand=lambda: 0.5, **flags)


# -- the per-job policy --------------------------------------------------------------------


def test_a_job_that_returns_is_ended() -> None:
    assert _settle() == Done(end=True)


def test_a_job_ended_before_execute_is_not_ended_again() -> None:
    assert _settle(ended=True) == Done(end=False)


def test_an_aborted_job_goes_back_unless_it_was_ended_first() -> None:
    assert _settle(aborted=True) == Aborted(give_back=True)
    assert _settle(aborted=True, ended=True) == Aborted(give_back=False)


def test_a_failure_is_retried_with_backoff_until_max_attempts_then_buried() -> None:
    assert _settle(0, failed=True) == Retry(attempts=1, run_at=int(NOW) + 2, delay=2)
    assert _settle(1, failed=True) == Retry(attempts=2, run_at=int(NOW) + 4, delay=4)
    assert _settle(2, failed=True) == Bury(attempts=3)
    assert _settle(7, failed=True) == Bury(attempts=8)


def test_a_failure_that_cannot_be_retried_is_buried_at_once() -> None:
    assert _settle(0, failed=True, can_retry=False) == Bury(attempts=1)
    assert _settle(0, failed=True, ended=True) == Bury(attempts=1)  # at most once
    assert attempts_allowed(POLICY, ended=False, can_retry=True) == 3
    assert attempts_allowed(POLICY, ended=True, can_retry=True) == 1
    assert attempts_allowed(POLICY, ended=False, can_retry=False) == 1


def test_a_failure_wins_over_an_abort() -> None:
    assert isinstance(_settle(0, failed=True, aborted=True), Retry)


def test_the_backoff_is_capped_and_jittered() -> None:
    policy = RetryPolicy(max_attempts=99, base=2.0, cap=60.0, jitter=0.5)
    assert policy.delay(0) == 0
    assert policy.delay(1, lambda: 0.0) == 1
    assert policy.delay(1, lambda: 1.0) == 3
    assert policy.delay(40, lambda: 1.0) == 60  # never over the cap
    with pytest.raises(Q4MError):
        RetryPolicy(max_attempts=0)


def test_the_reconnect_backoff_doubles_up_to_its_cap() -> None:
    exact = lambda low, high: 1.0  # noqa: E731 - no jitter
    assert [reconnect_delay(n, 30.0, exact) for n in range(1, 9)] == [
        0.5,
        1.0,
        2.0,
        4.0,
        8.0,
        16.0,
        30.0,
        30.0,
    ]
    assert reconnect_delay(1, 30.0, lambda low, high: high) == 0.625


# -- the run loop ------------------------------------------------------------------------


def test_the_loop_goes_on_until_stopped_or_max_jobs() -> None:
    loop = RunLoop(max_jobs=3)
    assert loop.goes_on(stopping=False) and loop.limit() == 3
    assert not loop.goes_on(stopping=True)  # stop: the job in hand was finished, no new one
    loop.succeeded(2)
    assert loop.limit() == 1
    loop.succeeded(1)
    assert not loop.goes_on(stopping=False)
    assert RunLoop().limit() is None


def test_the_loop_recycles_after_recycle_after_jobs() -> None:
    loop = RunLoop(recycle_after=2)
    assert not loop.recycle_due(1)
    assert loop.recycle_due(2)
    assert not RunLoop().recycle_due(10_000)


def test_database_errors_back_off_and_a_success_reports_the_database_back() -> None:
    loop = RunLoop(reconnect_max=1.0, rand=lambda low, high: 1.0)
    lost = ConnectionLost("gone")
    assert [loop.failed(lost) for _ in range(4)] == [0.5, 1.0, 1.0, 1.0]
    assert loop.succeeded(0) is True  # "database is back", once
    assert loop.succeeded(1) is False
    assert loop.failed(lost) == 0.5  # the backoff starts over


def test_an_undone_completion_goes_on_at_once() -> None:
    loop = RunLoop()
    assert loop.failed(CompletionFailed("undone")) is None
    assert loop.failures == 0
    assert isinstance(CompletionFailed("x"), LOOP_ERRORS)
    assert isinstance(OperationalError("s", {}, Exception()), LOOP_ERRORS)


def test_burst_mode_checks_for_an_empty_queue_only_after_an_empty_turn() -> None:
    assert RunLoop(burst=True).drained(0)
    assert not RunLoop(burst=True).drained(1)
    assert not RunLoop().drained(0)


def test_the_first_signal_stops_and_the_next_ones_force() -> None:
    signals = StopSignals()
    assert [signals.signal() for _ in range(3)] == ["stop", "force", "force"]


def test_a_wait_is_one_slice_without_run_at() -> None:
    waits = wait_slices(5.0, timed=False, clock=lambda: 0.0)  # no time passes
    assert next(waits) == 5.0


def test_a_timed_wait_is_cut_into_due_slices() -> None:
    now = [0.0]
    waits = []
    for seconds in wait_slices(2.5, timed=True, clock=lambda: now[0]):
        waits.append(seconds)
        now[0] += seconds
    assert waits == [DUE_SLICE, DUE_SLICE, 0.5]


def test_a_zero_timeout_still_waits_once() -> None:
    assert list(wait_slices(0.0, timed=True, clock=lambda: 0.0)) == [0.0]
