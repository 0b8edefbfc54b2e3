"""The job-life state machine (:mod:`sqlalchemy_q4m.consumer.lifecycle`) without I/O: the
clock is an argument, so every schedule is exact.  ``test_consumer_drivers.py`` checks that the
sync and asyncio drivers perform what it decides."""

from __future__ import annotations

import pytest

from sqlalchemy_q4m.consumer.lifecycle import UNBOUNDED_CLAIM
from sqlalchemy_q4m.consumer.lifecycle import Action
from sqlalchemy_q4m.consumer.lifecycle import Exit
from sqlalchemy_q4m.consumer.lifecycle import Lifecycle
from sqlalchemy_q4m.consumer.lifecycle import State
from sqlalchemy_q4m.consumer.lifecycle import Step
from sqlalchemy_q4m.consumer.lifecycle import check_wait_options
from sqlalchemy_q4m.exc import NotOwner
from sqlalchemy_q4m.exc import OptionError
from sqlalchemy_q4m.exc import Q4MError
from sqlalchemy_q4m.exc import QueueAbort

pytestmark = pytest.mark.unit


def claim(seconds: float) -> Action:
    return Action(Step.CLAIM, seconds)


def test_the_first_claim_may_block_for_the_whole_timeout() -> None:
    life = Lifecycle(timeout=5, poll_interval=0.05)
    assert life.state is State.IDLE
    assert life.start(100.0, blocking=True) == claim(5)
    assert life.state is State.WAITING


def test_without_a_timeout_a_claim_blocks_at_most_a_minute() -> None:
    life = Lifecycle(timeout=None, poll_interval=0.05)
    assert life.start(0.0, blocking=True) == claim(UNBOUNDED_CLAIM)
    assert life.missed(61.0) == claim(UNBOUNDED_CLAIM)  # never gives up


def test_a_blocking_backend_claims_again_at_once_with_what_is_left() -> None:
    life = Lifecycle(timeout=5, poll_interval=0.05)
    life.start(0.0, blocking=True)
    assert life.missed(2.0) == claim(3.0)
    assert life.missed(5.0) == Action(Step.GIVE_UP)


def test_the_poll_schedule_is_fixed_however_long_a_claim_takes() -> None:
    """A claim starts every poll_interval: the pause is what is left of the interval."""
    life = Lifecycle(timeout=None, poll_interval=0.1)
    life.start(0.0, blocking=False)
    assert life.missed(0.03) == Action(Step.SLEEP, pytest.approx(0.07))
    assert life.paused(0.1) == claim(UNBOUNDED_CLAIM)
    # a slow claim (0.15 s, more than the interval): the next one follows at once
    assert life.missed(0.25) == Action(Step.SLEEP, 0.0)


def test_claim_start_times_over_a_simulated_wait() -> None:
    """Claims taking 0.06 s with a 0.1 s interval start at 0, 0.1, 0.2, ...; the last one at
    the deadline, then it gives up."""
    life = Lifecycle(timeout=0.5, poll_interval=0.1)
    now, starts = 0.0, []
    action = life.start(now, blocking=False)
    while action.step is not Step.GIVE_UP:
        if action.step is Step.CLAIM:
            starts.append(round(now, 6))
            now += 0.06
            action = life.missed(now)
        else:
            assert action.step is Step.SLEEP
            now += action.seconds
            action = life.paused(now)
    assert starts == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]
    life.gave_up()
    assert life.state is State.TIMED_OUT and life.state.finished


def test_the_pause_never_runs_past_the_deadline() -> None:
    life = Lifecycle(timeout=0.12, poll_interval=0.1)
    life.start(0.0, blocking=False)
    assert life.missed(0.01) == Action(Step.SLEEP, pytest.approx(0.09))
    assert life.paused(0.1) == claim(pytest.approx(0.02))  # the claim gets what is left
    assert life.missed(0.11) == Action(Step.SLEEP, pytest.approx(0.01))
    assert life.paused(0.12) == claim(0.0)
    assert life.missed(0.13) == Action(Step.GIVE_UP)


def test_a_zero_timeout_claims_once() -> None:
    life = Lifecycle(timeout=0, poll_interval=0.05)
    assert life.start(7.0, blocking=False) == claim(0)
    assert life.missed(7.0) == Action(Step.GIVE_UP)


def test_listening_replaces_the_pause() -> None:
    life = Lifecycle(timeout=10, poll_interval=0.05)
    life.start(0.0, blocking=False, listen=2.0)
    assert life.missed(1.0) == Action(Step.LISTEN, 2.0)
    assert life.paused(3.0) == claim(7.0)
    assert life.missed(9.5) == Action(Step.LISTEN, 0.5)  # never past the deadline
    assert life.paused(9.9995) == claim(pytest.approx(0.0005))
    assert life.missed(9.9995) == claim(pytest.approx(0.0005))  # too short to listen: claim


def test_a_claim_that_gets_a_job_owns_it() -> None:
    life = Lifecycle(timeout=1, poll_interval=0.05)
    life.start(0.0, blocking=False)
    assert life.claimed() == Action(Step.OWN)
    assert life.owning and life.state is State.OWNING
    life.check_owning()
    life.ended()
    assert life.state is State.ENDED and not life.owning


@pytest.mark.parametrize(
    ("owning", "exc", "expected"),
    [
        (True, None, (Exit.END, False)),
        (True, RuntimeError("boom"), (Exit.ABORT, False)),
        (True, QueueAbort(), (Exit.ABORT, True)),
        (True, KeyboardInterrupt(), (Exit.ABORT, False)),
        (False, None, (Exit.RELEASE, False)),
        (False, QueueAbort(), (Exit.RELEASE, True)),
        (False, RuntimeError("boom"), (Exit.RELEASE, False)),
    ],
)
def test_leaving_the_block(owning: bool, exc: BaseException | None, expected: object) -> None:
    life = Lifecycle(timeout=1, poll_interval=0.05)
    life.start(0.0, blocking=True)
    if owning:
        life.claimed()
    assert life.exit(exc) == expected


def test_a_queue_session_waits_once() -> None:
    life = Lifecycle(timeout=1, poll_interval=0.05)
    life.start(0.0, blocking=True)
    with pytest.raises(Q4MError, match="waits once"):
        life.start(1.0, blocking=True)
    life.finish()
    assert life.state is State.CLOSED
    with pytest.raises(Q4MError, match="waits once"):
        life.check_idle()


def test_out_of_order_events_are_refused() -> None:
    life = Lifecycle(timeout=1, poll_interval=0.05)
    with pytest.raises(Q4MError, match="idle, not waiting"):
        life.missed(0.0)
    with pytest.raises(NotOwner):
        life.check_owning()
    life.start(0.0, blocking=True)
    with pytest.raises(Q4MError, match="waiting, not owning"):
        life.ended()
    life.claimed()
    with pytest.raises(Q4MError, match="owning, not waiting"):
        life.gave_up()
    life.aborted()
    assert life.state is State.ABORTED


def test_broken_and_finished_states() -> None:
    life = Lifecycle(timeout=1, poll_interval=0.05)
    life.start(0.0, blocking=True)
    life.claimed()
    life.broke()
    assert life.state is State.BROKEN and life.state.finished
    life.finish()  # a later clean release does not hide the break
    assert life.state is State.BROKEN
    ended = Lifecycle(timeout=1, poll_interval=0.05)
    ended.start(0.0, blocking=True)
    ended.claimed()
    ended.ended()
    ended.finish()
    assert ended.state is State.ENDED


@pytest.mark.parametrize(
    ("timeout", "poll_interval", "listen"),
    [
        (-1, 0.05, None),
        (1, 0, None),
        (1, float("nan"), None),
        (1, 0.05, 0),
        (float("inf"), 1, None),
    ],
)
def test_bad_wait_options_are_refused(
    timeout: float, poll_interval: float, listen: float | None
) -> None:
    with pytest.raises(OptionError):
        check_wait_options(timeout, poll_interval, listen)
