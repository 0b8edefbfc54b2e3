"""A job's life in a queue session, as decisions without I/O: wait → own → end / abort.

:class:`Lifecycle` is the one state machine both queue sessions run: the synchronous
:class:`~sqlalchemy_q4m.consumer.session.QueueSession` and the asyncio
:class:`~sqlalchemy_q4m.consumer.asyncio.AsyncQueueSession` are drivers that tell it what
happened (a claim got a job or nothing, a pause is over, the block exited) and perform the
:class:`Action` it answers with their own I/O: a claim statement, ``time.sleep`` or
``asyncio.sleep``, a listen wait.  It reads no clock either: the drivers pass ``now``
(``time.monotonic()``).  So the two drivers poll on the same schedule, give up at the same
deadline and end or abort on the same exits by construction (h11's and httpcore's sans-IO
state machines under httpx's sync and async clients are the model).

States::

    idle --start--> waiting --claimed--> owning --ended--> ended
                       |                    |--aborted--> aborted
                       |--gave_up--> timed out
    idle, waiting --finish--> closed   (released owning nothing)
    any --broke--> broken   (the connection was invalidated: the server returns its row)

The poll schedule is fixed: on a non-blocking backend (portable) one claim starts every
``poll_interval`` seconds however long the claim took, so an idle consumer costs exactly
``1 / poll_interval`` queries a second; on a blocking one (Q4M) the next claim follows at once
(``queue_wait`` itself waited).  With ``listen`` an idle consumer waits to be woken instead of
sleeping.  A claim is told how long it may block: what is left of ``timeout`` (60 s a claim
without one).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy.sql.elements import ColumnElement

from ..exc import NotOwner
from ..exc import Q4MError
from ..exc import QueueAbort
from ..schema.checks import check_seconds

__all__ = [
    "POLL_INTERVAL",
    "Action",
    "Exit",
    "Lifecycle",
    "State",
    "Step",
    "Where",
    "check_wait_options",
]

#: A condition per queue session, or per target (a mapping of target to condition).
Where = ColumnElement[bool] | Mapping[Any, ColumnElement[bool]] | None

#: Default seconds between two claim attempts on the portable backend while the queue is empty.
#: 50 ms costs an idle consumer 20 queries/s and delays pickup by 25 ms on average (half the
#: interval); any polling schedule at 20 queries/s has a median delay of at least 25 ms.
POLL_INTERVAL = 0.05

#: Longest a claim is told to block when there is no deadline (the native backend loops).
UNBOUNDED_CLAIM = 60.0

#: A listen wait shorter than this is not worth a round trip: claim again instead.
MIN_LISTEN = 0.001


_PLAIN = (int, float)  # checked by class: a bool is not a number of seconds
_INF = float("inf")


def check_wait_options(
    timeout: float | None, poll_interval: float, listen: float | None = None
) -> None:
    """Refuse a negative ``timeout``, a non-positive ``poll_interval`` or ``listen``, and NaN
    or infinity in any, with an :class:`~sqlalchemy_q4m.exc.OptionError`."""
    if (
        timeout.__class__ in _PLAIN
        and poll_interval.__class__ is float
        and listen is None
        and 0 <= timeout < _INF  # NaN fails every comparison
        and 0 < poll_interval < _INF
    ):
        return  # the common case (a queue session per job): nothing more to check
    check_seconds("timeout", timeout, optional=True)
    check_seconds("poll_interval", poll_interval, positive=True)
    check_seconds("listen", listen, positive=True, optional=True)


class State(enum.Enum):
    """Where a queue session is in its job's life."""

    IDLE = "idle"  #: made; :meth:`Lifecycle.start` not called yet
    WAITING = "waiting"  #: claiming, pausing between claims or listening
    OWNING = "owning"  #: a job is owned; the block runs
    ENDED = "ended"  #: the job was removed from the queue
    ABORTED = "aborted"  #: the job was given back to the queue
    TIMED_OUT = "timed out"  #: nothing came before the deadline; nothing owned
    CLOSED = "closed"  #: released owning nothing (closed before a job, or cancelled waiting)
    BROKEN = "broken"  #: given up on an error: the connection was invalidated

    @property
    def finished(self) -> bool:
        """True once the session can do nothing more (its connection is released)."""
        return self in _FINISHED


#: A tuple, not a set: a membership test compares by identity, where a set would call the
#: members' ``Enum.__hash__`` (a Python function) once per test, and every job makes one.
_FINISHED = (State.ENDED, State.ABORTED, State.TIMED_OUT, State.CLOSED, State.BROKEN)


class Step(enum.Enum):
    """What the driver performs next while waiting."""

    CLAIM = "claim"  #: one claim attempt, blocking at most ``seconds`` (a blocking backend)
    SLEEP = "sleep"  #: pause ``seconds`` until the next poll tick
    LISTEN = "listen"  #: wait at most ``seconds`` to be woken by ``notify``
    OWN = "own"  #: a job is owned: hand it to the caller
    GIVE_UP = "give up"  #: the deadline passed: close what the wait began, return None


@dataclass(frozen=True)
class Action:
    """One step for a driver to perform, and for how many seconds (CLAIM, SLEEP, LISTEN)."""

    step: Step
    seconds: float = 0.0


#: The actions without seconds, made once (every job takes one).
_OWN = Action(Step.OWN)
_GIVE_UP = Action(Step.GIVE_UP)


class Exit(enum.Enum):
    """What leaving a queue session's block does."""

    END = "end"  #: normal exit while owning: remove the job
    ABORT = "abort"  #: an exception while owning: give the job back
    RELEASE = "release"  #: nothing owned: only release the connection


class Lifecycle:
    """The decisions of one queue session's job life; see the module docstring.

    The driver calls :meth:`start` once the backend is known, then performs each
    :class:`Action` and reports back: :meth:`claimed` or :meth:`missed` after a CLAIM,
    :meth:`paused` after a SLEEP or a LISTEN, :meth:`gave_up` after GIVE_UP.
    """

    __slots__ = (
        "_blocking",
        "_deadline",
        "_listen",
        "_started",
        "poll_interval",
        "state",
        "timeout",
    )

    def __init__(self, timeout: float | None, poll_interval: float) -> None:
        self.timeout = timeout
        self.poll_interval = poll_interval
        self.state = State.IDLE
        self._deadline: float | None = None
        self._started = 0.0  # when the last claim attempt started: the poll schedule's tick
        self._blocking = False
        self._listen: float | None = None

    @property
    def owning(self) -> bool:
        """True while a job is owned."""
        return self.state is State.OWNING

    # -- waiting ------------------------------------------------------------------------------

    def check_idle(self) -> None:
        """Refuse a second wait: a queue session owns one job in its life."""
        if self.state is not State.IDLE:
            raise Q4MError("a QueueSession waits once; make a new one for the next job")

    def start(self, now: float, *, blocking: bool, listen: float | None = None) -> Action:
        """The wait begins at ``now``: the first claim.  ``blocking``: the backend waits in
        the server; ``listen``: idle pauses wait up to that long to be woken instead of
        sleeping (None: poll)."""
        if self.state is not State.IDLE:
            self.check_idle()  # raises
        self.state = State.WAITING
        self._deadline = None if self.timeout is None else now + self.timeout
        self._blocking = blocking
        self._listen = listen
        return self._claim(now)

    def claimed(self) -> Action:
        """The claim got a job: it is owned."""
        if self.state is not State.WAITING:
            self._expect(State.WAITING)  # raises
        self.state = State.OWNING
        return _OWN

    def missed(self, now: float) -> Action:
        """The claim found nothing at ``now``: give up, claim again, listen or sleep."""
        self._expect(State.WAITING)
        deadline = self._deadline
        if deadline is not None and now >= deadline:
            return _GIVE_UP
        if self._blocking:
            return self._claim(now)
        if self._listen is not None:
            seconds = self._listen if deadline is None else min(self._listen, deadline - now)
            if seconds > MIN_LISTEN:
                return Action(Step.LISTEN, seconds)
            return self._claim(now)
        # a fixed schedule: the next claim starts poll_interval after the last one started
        wake = self._started + self.poll_interval
        if deadline is not None:
            wake = min(wake, deadline)
        return Action(Step.SLEEP, max(0.0, wake - now))

    def paused(self, now: float) -> Action:
        """A SLEEP or LISTEN is over at ``now``: the next claim."""
        self._expect(State.WAITING)
        return self._claim(now)

    def gave_up(self) -> None:
        """GIVE_UP was performed: nothing is owned, the connection was released."""
        self._expect(State.WAITING)
        self.state = State.TIMED_OUT

    def _claim(self, now: float) -> Action:
        self._started = now
        deadline = self._deadline
        seconds = UNBOUNDED_CLAIM if deadline is None else max(0.0, deadline - now)
        return Action(Step.CLAIM, seconds)

    # -- owning -------------------------------------------------------------------------------

    def check_owning(self) -> None:
        """Raise :class:`~sqlalchemy_q4m.exc.NotOwner` unless a job is owned."""
        if self.state is not State.OWNING:
            raise NotOwner()

    def exit(self, exc: BaseException | None) -> tuple[Exit, bool]:
        """What leaving the block with ``exc`` (None: normally) does, and whether ``exc`` is
        swallowed (a :class:`~sqlalchemy_q4m.exc.QueueAbort` is)."""
        swallow = isinstance(exc, QueueAbort)
        if self.state is not State.OWNING:
            return Exit.RELEASE, swallow
        return (Exit.END if exc is None else Exit.ABORT), swallow

    def ended(self) -> None:
        """The job was removed from the queue."""
        if self.state is not State.OWNING:
            self._expect(State.OWNING)  # raises
        self.state = State.ENDED

    def aborted(self) -> None:
        """The job was given back to the queue."""
        if self.state is not State.OWNING:
            self._expect(State.OWNING)  # raises
        self.state = State.ABORTED

    def broke(self) -> None:
        """Given up on an error (in any state): the connection was invalidated, so the server
        returns whatever row it held."""
        self.state = State.BROKEN

    def finish(self) -> None:
        """The connection was released cleanly: a final state stays, else CLOSED (a driver
        releases an owned job only by ending or aborting it, or broken)."""
        if self.state not in _FINISHED:
            self.state = State.CLOSED

    def _expect(self, state: State) -> None:
        if self.state is not state:
            raise Q4MError(f"queue session is {self.state.value}, not {state.value}")
