"""The conditions of a worker's waits (the job's ``where`` and ``run_at <= now``): built once
per second and reused by the waits of that second, unless a job's ``where`` is a callable,
which is called at each wait.  No server: the targets are declared tables."""

from __future__ import annotations

import time
from typing import Any

import pytest
from sqlalchemy import Column
from sqlalchemy import Integer
from sqlalchemy import MetaData
from sqlalchemy import create_engine

from sqlalchemy_q4m import queue_table
from sqlalchemy_q4m.schema.retry import retry_columns
from sqlalchemy_q4m.worker import Consumer
from sqlalchemy_q4m.worker import Job
from sqlalchemy_q4m.worker.targets import calls_where
from sqlalchemy_q4m.worker.targets import resolve_targets

pytestmark = pytest.mark.unit

metadata = MetaData()
TIMED = queue_table("waits_timed_jobs", metadata, Column("n", Integer), *retry_columns())
NOW = 1_764_360_000.25


class TimedJob(Job):
    model = TIMED

    def execute(self, job: Any) -> None:
        return None


def _consumer(**options: Any) -> Consumer:
    engine = create_engine("mysql+pymysql://nobody@127.0.0.1:1/none")  # never connects
    job = TimedJob(engine, **options)
    consumer = Consumer([job], engine)
    consumer._serve(resolve_targets(consumer.jobs, None))  # type: ignore[arg-type]
    return consumer


def _sql(where: Any) -> str:
    (condition,) = where.values()
    return str(condition.compile(compile_kwargs={"literal_binds": True}))


def test_the_waits_of_one_second_share_their_conditions(monkeypatch: pytest.MonkeyPatch) -> None:
    consumer = _consumer()
    targets = consumer._targets
    assert targets is not None
    clock = [NOW]
    monkeypatch.setattr(time, "time", lambda: clock[0])
    first = consumer._where_now(targets)
    clock[0] = NOW + 0.5
    assert consumer._where_now(targets) is first
    assert _sql(first).endswith(f"<= {int(NOW)}")
    clock[0] = NOW + 1
    later = consumer._where_now(targets)
    assert later is not first
    assert _sql(later).endswith(f"<= {int(NOW) + 1}")


def test_a_callable_where_is_called_at_each_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def where(table: Any) -> Any:
        calls.append(table)
        return table.c.n >= 5

    consumer = _consumer(where=where)
    targets = consumer._targets
    assert targets is not None
    assert calls_where(targets[0].job)
    monkeypatch.setattr(time, "time", lambda: NOW)
    first = consumer._where_now(targets)
    second = consumer._where_now(targets)
    assert len(calls) == 2
    assert second is not first
    assert "n >= 5" in _sql(first)


def test_where_mappings_with_a_callable_are_called_too() -> None:
    consumer = _consumer(where={TIMED: lambda table: table.c.n >= 5})
    assert consumer._targets is not None
    assert calls_where(consumer._targets[0].job)
    assert not calls_where(_consumer(where={TIMED: TIMED.c.n >= 5}).jobs[0])
    assert not calls_where(_consumer().jobs[0])
