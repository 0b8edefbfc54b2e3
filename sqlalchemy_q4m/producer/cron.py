"""What a schedule is: cron text (in a time zone) or an interval, the ticks due between two
moments (on time, or missed: ``schedule_missed``), and the row each tick enqueues.  How a
:class:`~sqlalchemy_q4m.producer.schedule.Scheduler` enqueues each tick exactly once is told in
:mod:`sqlalchemy_q4m.producer.schedule`."""

import datetime as dt
from collections.abc import Callable
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field
from typing import Any
from typing import Literal
from zoneinfo import ZoneInfo
from zoneinfo import ZoneInfoNotFoundError

from cronsim import CronSim
from cronsim import CronSimError

from ..exc import Q4MError

__all__ = ["EPOCH", "MAX_TICKS_PER_TURN", "Missed", "Schedule", "ScheduleError", "utc_naive"]

#: Ticks enqueued per transaction at most (a long on-time window is worked off in turns).
MAX_TICKS_PER_TURN = 1000

Missed = Literal["once", "skip"]
EPOCH = dt.datetime(1970, 1, 1)


class ScheduleError(Q4MError, ValueError):
    """This schedule cannot be used: bad cron expression, interval, time zone or policy."""


def utc_naive(value: dt.datetime) -> dt.datetime:
    if value.tzinfo is None:
        return value
    return value.astimezone(dt.timezone.utc).replace(tzinfo=None)


@dataclass(frozen=True)
class Schedule:
    """One recurring job: ``name`` (unique across schedulers), the queue ``target`` (model,
    Table, or table name), ``every`` (cron text or a ``timedelta``), and ``payload(tick)``
    (the row to enqueue; ``tick`` is a UTC-aware datetime)."""

    name: str
    target: Any
    every: str | dt.timedelta
    payload: Callable[[dt.datetime], Mapping[str, Any]] | None = None
    timezone: str | None = None
    missed: Missed = "once"
    grace: float = 60.0
    _zone: dt.tzinfo = field(default=dt.timezone.utc, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not 0 < len(self.name) <= 191:
            raise ScheduleError(f"a schedule name is 1 to 191 characters, not {self.name!r}")
        if self.missed not in ("once", "skip"):
            raise ScheduleError(f"schedule_missed is 'once' or 'skip', not {self.missed!r}")
        if isinstance(self.grace, bool) or not isinstance(self.grace, int | float):
            raise ScheduleError(f"schedule_grace is a number of seconds, not {self.grace!r}")
        if self.grace < 0:
            raise ScheduleError(f"schedule_grace must be >= 0, not {self.grace!r}")
        zone: dt.tzinfo = dt.timezone.utc
        if self.timezone is not None:
            try:
                zone = ZoneInfo(self.timezone)
            except (ZoneInfoNotFoundError, ValueError) as err:
                raise ScheduleError(f"unknown time zone {self.timezone!r}") from err
        object.__setattr__(self, "_zone", zone)
        every = self.every
        if isinstance(every, dt.timedelta):
            if every < dt.timedelta(seconds=1):
                raise ScheduleError(f"a schedule interval is at least 1 second, not {every!r}")
            if every.microseconds:
                raise ScheduleError(f"a schedule interval is whole seconds, not {every!r}")
        elif isinstance(every, str):
            try:
                CronSim(every, dt.datetime(2000, 1, 1, tzinfo=zone))
            except CronSimError as err:
                raise ScheduleError(f"bad cron expression {every!r}: {err}") from err
        else:
            raise ScheduleError(f"schedule is cron text or a timedelta, not {every!r}")

    @property
    def spec(self) -> str:
        """The schedule as text: the cron expression, or ``every 30s``."""
        if isinstance(self.every, dt.timedelta):
            return f"every {int(self.every.total_seconds())}s"
        return self.every + (f" ({self.timezone})" if self.timezone else "")

    def next_after(self, moment: dt.datetime) -> dt.datetime:
        """The first tick strictly after ``moment`` (naive UTC in, naive UTC out)."""
        if isinstance(self.every, dt.timedelta):
            step = int(self.every.total_seconds())
            seconds = (moment - EPOCH) // dt.timedelta(seconds=1)
            return EPOCH + dt.timedelta(seconds=(seconds // step + 1) * step)
        start = moment.replace(tzinfo=dt.timezone.utc).astimezone(self._zone)
        return utc_naive(next(CronSim(self.every, start)))

    def last_at_or_before(self, moment: dt.datetime) -> dt.datetime | None:
        """The latest tick at or before ``moment`` (naive UTC), None if there is none."""
        if isinstance(self.every, dt.timedelta):
            step = int(self.every.total_seconds())
            seconds = (moment - EPOCH) // dt.timedelta(seconds=1)
            return EPOCH + dt.timedelta(seconds=seconds // step * step)
        start = (moment + dt.timedelta(microseconds=1)).replace(tzinfo=dt.timezone.utc)
        try:
            return utc_naive(next(CronSim(self.every, start.astimezone(self._zone), reverse=True)))
        except StopIteration:  # pragma: no cover - cronsim gives up on impossible dates
            return None

    def due(
        self, anchor: dt.datetime, now: dt.datetime, first: bool
    ) -> tuple[list[dt.datetime], dt.datetime]:
        """The ticks to enqueue after ``anchor`` (exclusive; inclusive when ``first``) up to
        ``now``, and the new anchor (the latest tick considered, enqueued or skipped)."""
        floor = anchor - dt.timedelta(microseconds=1) if first else anchor
        on_time_from = now - dt.timedelta(seconds=self.grace)
        ticks: list[dt.datetime] = []
        newest = anchor
        missed = self.last_at_or_before(on_time_from - dt.timedelta(microseconds=1))
        if missed is not None and missed > floor:
            if self.missed == "once":
                ticks.append(missed)
            newest = floor = missed
        tick = self.next_after(max(floor, on_time_from - dt.timedelta(microseconds=1)))
        while tick <= now and len(ticks) < MAX_TICKS_PER_TURN:
            ticks.append(tick)
            newest = tick
            tick = self.next_after(tick)
        return ticks, newest

    def row_for(self, tick: dt.datetime) -> dict[str, Any]:
        """The row to enqueue for ``tick`` (naive UTC): ``payload(tick as UTC-aware)``."""
        if self.payload is None:
            return {}
        row = self.payload(tick.replace(tzinfo=dt.timezone.utc))
        if not isinstance(row, Mapping):
            raise ScheduleError(f"schedule {self.name!r}: schedule_payload returned {row!r:.60}")
        return dict(row)
