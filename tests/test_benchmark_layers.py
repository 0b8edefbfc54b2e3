"""``benchmarks/layers.py``: the loops with which ``python -m benchmarks.cpu`` and
``benchmarks.floors`` take the consume path apart drain a queue exactly (every job removed
once, none left), on both servers, and the job-building one yields the jobs a queue session
would; so do the asyncio floors (the raw statements through SQLAlchemy's greenlet bridge, and
with each part of the bridge taken away) and the ORM ``Session``'s floor."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import create_engine
from sqlalchemy import func
from sqlalchemy import select
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.pool import NullPool

from benchmarks.asyncio_bench import FLOORS
from benchmarks.asyncio_bench import AsyncDrain
from benchmarks.asyncio_bench import drivers
from benchmarks.common import Base
from benchmarks.common import BenchJob
from benchmarks.common import fill
from benchmarks.common import server_backend
from benchmarks.layers import GuardedLoop
from benchmarks.layers import JobObjectLoop
from benchmarks.layers import SessionFloorLoop
from benchmarks.layers import StatementLoop
from sqlalchemy_q4m import use_backend
from sqlalchemy_q4m.backends.base import OWNER_KEY
from sqlalchemy_q4m.backends.base import check_free
from sqlalchemy_q4m.exc import AlreadyOwning

pytestmark = pytest.mark.integration


def _database(server: URL, backend: str) -> Iterator[URL]:
    """A database of its own on ``server`` holding the benchmark's queue table."""
    name = f"q4m_layers_{uuid.uuid4().hex[:10]}"
    admin = create_engine(server, poolclass=NullPool)
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE `{name}`"))
    url = server.set(database=name)
    try:
        engine = create_engine(url, poolclass=NullPool)
        use_backend(engine, backend)
        Base.metadata.create_all(engine)
        engine.dispose()
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS `{name}`"))
        admin.dispose()


@pytest.fixture(params=["portable", pytest.param("native", marks=pytest.mark.native)])
def bench_url(request: pytest.FixtureRequest, server_url: URL) -> Iterator[URL]:
    if request.param == "native":
        server = request.getfixturevalue("q4m_url")._replace(database=None)
    else:
        server = server_url
    yield from _database(server, request.param)


def _left(url: URL) -> int:
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(BenchJob)).scalar_one())
    finally:
        engine.dispose()


def _after_each_claim(loop: Any, probe: Callable[[Any], None]) -> None:
    """Make ``loop`` call ``probe(found)`` after each claim, with what it found (None: no job)."""
    original = loop._job

    def job_then_probe(fetched: Any) -> Any:
        found = original(fetched)
        probe(found)
        return found

    loop._job = job_then_probe


@pytest.mark.parametrize("loop_class", [StatementLoop, JobObjectLoop, GuardedLoop])
def test_a_layer_loop_drains_the_queue_once(bench_url: URL, loop_class: type) -> None:
    fill(bench_url, 57)
    loop = loop_class(bench_url)
    try:
        assert loop.consume() == 57
        assert loop.consume() == 0  # nothing left, nothing taken twice
    finally:
        loop.close()
    assert _left(bench_url) == 0


def test_the_job_building_loop_yields_mapped_jobs(bench_url: URL) -> None:
    fill(bench_url, 3)
    loop = JobObjectLoop(bench_url)
    try:
        # the claim (portable) or, outside owner mode, every row (Q4M): the first one built
        job, key = loop._job(loop.select.run(loop.conn, {}, True))
    finally:
        loop._end(commit=False)
        loop.close()
    assert isinstance(job, BenchJob) and isinstance(job.id, uuid.UUID)
    assert key == (job.id.bytes,) and job.payload.startswith("job ")


@pytest.mark.parametrize("loop_class", [StatementLoop, GuardedLoop])
def test_a_layer_loop_claims_in_a_transaction_of_the_driver(
    bench_url: URL, loop_class: type
) -> None:
    """Portable: each claim's transaction is begun by the driver, unseen by SQLAlchemy's
    Connection, and the loop commits it there, as a queue session on an Engine's connection
    does (``driver_begins``); Q4M: no transaction (autocommit), none begun."""
    portable = server_backend(bench_url) == "portable"
    fill(bench_url, 3)
    loop = loop_class(bench_url)
    seen: list[tuple[bool, bool]] = []

    def where_begun(found: Any) -> None:
        if found is not None:
            seen.append((loop.conn.in_transaction(), loop.driver_transaction))

    _after_each_claim(loop, where_begun)
    try:
        assert loop.consume() == 3
        assert not loop.driver_transaction and not loop.conn.in_transaction()
    finally:
        loop.close()
    assert seen == [(False, portable)] * 3
    assert _left(bench_url) == 0


def test_the_guarded_loop_owns_each_job_as_a_queue_session_does(bench_url: URL) -> None:
    """It records itself as the connection's owner around each job (a queue session on the
    same connection is refused meanwhile) and leaves no owner behind."""
    fill(bench_url, 2)
    loop = GuardedLoop(bench_url)
    refused: list[str] = []

    def try_a_queue_session(found: Any) -> None:
        if found is not None:
            with pytest.raises(AlreadyOwning) as caught:
                check_free(loop.conn)
            refused.append(str(caught.value))

    _after_each_claim(loop, try_a_queue_session)
    try:
        assert loop.consume() == 2
        assert OWNER_KEY not in loop.conn.info
    finally:
        loop.close()
    assert len(refused) == 2 and "already owns a job" in refused[0]
    assert _left(bench_url) == 0


def test_the_session_floor_loop_drains_in_the_sessions_transaction(bench_url: URL) -> None:
    """Portable: each job claimed in the Session's transaction, in the Session while it is
    held, out of it after the commit; on Q4M (no Session transaction holds a job) refused."""
    if server_backend(bench_url) == "native":
        with pytest.raises(ValueError, match="portable"):
            SessionFloorLoop(bench_url)
        return
    fill(bench_url, 5)
    loop = SessionFloorLoop(bench_url)
    held: list[bool] = []
    _after_each_claim(loop, lambda _found: held.append(loop.orm.in_transaction()))
    try:
        assert loop.consume() == 5
        assert loop.consume() == 0
        assert not loop.orm.in_transaction() and len(loop.orm.identity_map) == 0
    finally:
        loop.close()
    assert held == [True] * 7  # every claim, the two empty ones too, in the Session's
    assert _left(bench_url) == 0


@pytest.mark.parametrize("side", sorted(FLOORS))
@pytest.mark.parametrize("driver", drivers())
def test_the_asyncio_floors_drain_the_queue_once(bench_url: URL, driver: str, side: str) -> None:
    fill(bench_url, 41)
    native = server_backend(bench_url) == "native"
    drain = AsyncDrain(bench_url, driver, side, 3, native)  # three tasks, one loop
    try:
        assert drain.consume() == 41
        assert drain.consume() == 0
    finally:
        drain.close()
    assert _left(bench_url) == 0
