"""Subscriptions with a condition cost a job no compilation: ``subscriptions()`` memoizes them by
the identity of their expressions, and the statements made from them (the portable claim, Q4M's
``queue_wait``) are compiled once per subscription.  Before, a worker on a table with ``run_at``
(delayed jobs, retries: its condition ``run_at <= now``) validated, rendered and compiled its
claim for every job, and spent twice the client CPU per job of a worker on a plain table."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from native_support import tables_on
from sqlalchemy import Engine
from sqlalchemy import and_
from sqlalchemy import create_engine
from sqlalchemy import event
from sqlalchemy import func
from sqlalchemy import insert
from sqlalchemy import select
from sqlalchemy.engine import URL
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.orm import Mapped

from sqlalchemy_q4m import QueueMixin
from sqlalchemy_q4m import ScheduledMixin
from sqlalchemy_q4m import queue_session
from sqlalchemy_q4m.backends import driver
from sqlalchemy_q4m.backends.driver import dialect_cache
from sqlalchemy_q4m.backends.loading import conditional_claim
from sqlalchemy_q4m.backends.loading import loader_for
from sqlalchemy_q4m.backends.native import wait_sql
from sqlalchemy_q4m.exc import SubscriptionError
from sqlalchemy_q4m.schema.functions import subscriptions
from sqlalchemy_q4m.worker import Job


class Base(DeclarativeBase):
    pass


class CondJob(ScheduledMixin, QueueMixin, Base):
    __tablename__ = "test_conditional_claims_jobs"
    n: Mapped[int]


DIALECT = create_engine("mysql+pymysql://").dialect


@pytest.mark.unit
def test_subscriptions_with_a_condition_are_memoized_by_its_identity() -> None:
    cond = CondJob.n > 2
    first = subscriptions([CondJob], cond)
    assert subscriptions([CondJob], cond) is first
    again = subscriptions([CondJob], CondJob.n > 2)  # the same SQL, another expression
    assert again is not first and again[0].condition == first[0].condition
    mapping = {CondJob: cond}
    by_mapping = subscriptions([CondJob], mapping)
    assert subscriptions([CondJob], mapping) is by_mapping
    mapping[CondJob] = CondJob.n > 3  # changed in place: not the memoized one
    changed = subscriptions([CondJob], mapping)
    assert changed is not by_mapping and changed[0].condition == "(`n` > 3)"
    assert subscriptions([CondJob]) is not first and subscriptions([CondJob])[0].where is None


@pytest.mark.unit
def test_a_refused_condition_is_refused_every_time() -> None:
    bad = func.abs(CondJob.n) > 1  # a function: nothing Q4M can evaluate
    for _ in range(2):  # not memoized as if it had been accepted
        with pytest.raises(SubscriptionError, match="abs"):
            subscriptions([CondJob], bad)


@pytest.mark.unit
def test_a_conditional_claim_is_compiled_once_per_subscription_with_literal_values() -> None:
    sub = subscriptions([CondJob], and_(CondJob.n % 3 == 1, CondJob.run_at <= 17))[0]
    loader = loader_for(sub, DIALECT)
    sql = conditional_claim(loader, sub, 1)
    assert sql is not None and conditional_claim(loader, sub, 1) is sql
    assert conditional_claim(loader, sub, 5) is not sql  # another limit
    # values rendered by the dialect (no parameter); "%" doubled for the driver to undo
    assert "n %% 3 = 1" in sql.sql and "run_at <= 17" in sql.sql and "LIMIT 1" in sql.sql
    assert sql.defaults == {} and not sql.bare
    other = subscriptions([CondJob], CondJob.run_at <= 18)[0]
    assert conditional_claim(loader, other, 1) is not sql


@pytest.mark.unit
def test_queue_wait_is_compiled_once_per_memoized_subscriptions() -> None:
    cond = CondJob.run_at <= 17
    made = wait_sql(DIALECT, subscriptions([CondJob], cond), 0)
    assert wait_sql(DIALECT, subscriptions([CondJob], cond), 0) is made
    assert "test_conditional_claims_jobs:(`run_at` <= 17)" in made.sql


@pytest.mark.unit
def test_a_condition_written_in_each_call_is_compiled_once() -> None:
    """``queue_session(Model, where=Model.n >= 5)`` in a loop builds new subscriptions per
    call: their statements are found by the rendered condition, not compiled again."""
    first = subscriptions([CondJob], CondJob.n >= 5)
    again = subscriptions([CondJob], CondJob.n >= 5)
    assert first is not again
    assert wait_sql(DIALECT, again, 0) is wait_sql(DIALECT, first, 0)
    loader = loader_for(first[0], DIALECT)
    claim = conditional_claim(loader, first[0], 1)
    assert claim is not None and conditional_claim(loader, again[0], 1) is claim
    other = subscriptions([CondJob], CondJob.n >= 6)
    assert wait_sql(DIALECT, other, 0) is not wait_sql(DIALECT, first, 0)
    assert conditional_claim(loader, other[0], 1) is not claim
    assert "n >= 6" in (conditional_claim(loader, other[0], 1) or claim).sql
    # found by their condition, the per-call subscriptions are not kept: the caches stay put
    waits, claims = (
        dialect_cache(DIALECT, "native_wait"),
        dialect_cache(DIALECT, "conditional_claims"),
    )
    sizes = len(waits), len(claims)
    for _ in range(300):
        subs = subscriptions([CondJob], CondJob.n >= 5)
        assert wait_sql(DIALECT, subs, 0) is wait_sql(DIALECT, first, 0)
        assert conditional_claim(loader, subs[0], 1) is claim
    assert (len(waits), len(claims)) == sizes


SERVERS = [
    pytest.param("portable", marks=pytest.mark.integration),
    pytest.param("native", marks=[pytest.mark.native, pytest.mark.integration]),
]


@pytest.fixture(scope="module", params=SERVERS)
def server(request: pytest.FixtureRequest) -> Iterator[tuple[str, Engine]]:
    """The backend's name and an engine on a database with the table."""
    with tables_on(request, request.param, Base.metadata, "q4m_cond") as (_url, eng):
        yield request.param, eng


def _fill(engine: Engine, rows: list[dict[str, Any]]) -> None:
    with engine.begin() as conn:
        conn.execute(CondJob.__table__.delete())
        conn.execute(insert(CondJob), rows)


def test_a_condition_claims_only_its_jobs(server: tuple[str, Engine]) -> None:
    """``n % 3 = 1`` (a ``%`` the driver must see undoubled) and ``run_at``: the matching
    jobs, each once, the others left."""
    _name, engine = server
    later = int(time.time()) + 3600
    _fill(engine, [{"n": n, "run_at": later if n == 4 else 0} for n in range(10)])
    where = and_(CondJob.n % 3 == 1, CondJob.run_at <= int(time.time()))
    got = []
    with engine.connect() as conn:
        while True:
            with queue_session(CondJob, bind=conn, where=where, timeout=0) as job:
                if job is None:
                    break
                got.append(job.n)
    assert sorted(got) == [1, 7]  # 4 is not due yet
    with engine.connect() as conn:
        left = conn.execute(select(CondJob.n).order_by(CondJob.n)).scalars().all()
    assert left == [0, 2, 3, 4, 5, 6, 8, 9]


def test_the_portable_claim_with_a_condition_is_the_precompiled_statement(db_url: URL) -> None:
    """With a statement listener the claim goes through ``exec_driver_sql``, so its text is
    seen: the condition's values are in it (before, SQLAlchemy compiled a claim per job and
    bound them as parameters)."""
    engine = create_engine(db_url, pool_size=2, max_overflow=0)
    seen: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda *a: seen.append(a[2]))
    try:
        Base.metadata.create_all(engine)
        _fill(engine, [{"n": 1, "run_at": 0}])
        with engine.connect() as conn:
            qs = queue_session(CondJob, bind=conn, where=CondJob.n < 5, timeout=0)
            with qs as job:
                assert job is not None and job.n == 1
        claims = [s for s in seen if "SKIP LOCKED" in s]
        assert len(claims) == 1 and "n < 5" in claims[0], claims
    finally:
        Base.metadata.drop_all(engine)
        engine.dispose()


def test_a_worker_on_a_run_at_table_compiles_its_claim_once_per_second(
    server: tuple[str, Engine], monkeypatch: pytest.MonkeyPatch
) -> None:
    """40 jobs of a ``ScheduledMixin`` table (condition ``run_at <= now``, rebuilt each
    second): the claim (portable) or ``queue_wait`` (Q4M) is compiled once per second the
    run spans, not once per job."""
    _name, engine = server
    _fill(engine, [{"n": n, "run_at": 0} for n in range(40)])
    compiled: list[str] = []
    real = driver.DriverSQL.compile.__func__  # type: ignore[attr-defined]

    def counting(cls: Any, stmt: Any, dialect: Any, **kw: Any) -> Any:
        made = real(cls, stmt, dialect, **kw)
        if "queue_wait" in made.sql or "SKIP LOCKED" in made.sql:
            compiled.append(made.sql)
        return made

    monkeypatch.setattr(driver.DriverSQL, "compile", classmethod(counting))

    class Work(Job):
        model = CondJob
        max_attempts = 1

        def execute(self, job: Any) -> None:
            return None

    worker = Work(engine)
    started = time.time()
    done = 0
    while worker.run_once(timeout=0):
        done += 1
    seconds = int(time.time()) - int(started) + 1  # the whole seconds the run touched
    assert done == 40
    assert 1 <= len(compiled) <= seconds, compiled
