"""``queue_consumer``: many jobs, one after another, on one connection set up once, on MariaDB
(portable) and on the Q4M engine (native).

The behaviours a queue session has (end on a normal exit, abort on an exception, timeouts, the
poll schedule, interrupts) run for the consumer's queue sessions in
``tests/test_consumer_drivers.py``, and the statements per job for each of its binds in
``tests/test_statement_counts.py``; here is what is the consumer's own: one connection for
every job, what happens to it between jobs, after a loss and on close, the owner record, the
refusals, and real concurrent consumers (threads and processes) counting lost and doubled jobs.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any
from typing import ClassVar

import pytest
from consumer_kills import check_once
from consumer_kills import drain_one_killed
from native_support import tables_on
from sqlalchemy import Engine
from sqlalchemy import Integer
from sqlalchemy import Text
from sqlalchemy import create_engine
from sqlalchemy import insert
from sqlalchemy import select
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.orm import Mapped
from sqlalchemy.orm import mapped_column
from sqlalchemy.pool import NullPool

from sqlalchemy_q4m import QueueAbort
from sqlalchemy_q4m import QueueMixin
from sqlalchemy_q4m import queue_consumer
from sqlalchemy_q4m import queue_session
from sqlalchemy_q4m import use_backend
from sqlalchemy_q4m.backends.pinned import IDLE
from sqlalchemy_q4m.backends.pinned import kept_connections
from sqlalchemy_q4m.exc import AlreadyOwning
from sqlalchemy_q4m.exc import ConnectionLost
from sqlalchemy_q4m.exc import NotOwner
from sqlalchemy_q4m.exc import Q4MError


class Base(DeclarativeBase):
    pass


class CJob(QueueMixin, Base):
    __tablename__ = "test_queue_consumer_jobs"
    payload: Mapped[str] = mapped_column(Text)
    n: Mapped[int] = mapped_column(Integer)  # its place in the enqueue call (Q4M conditions)


class Done(Base):
    """What a job writes through its session (InnoDB on both servers)."""

    __tablename__ = "test_queue_consumer_done"
    __table_args__: ClassVar[dict[str, str]] = {"mysql_engine": "InnoDB"}
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    payload: Mapped[str] = mapped_column(Text)
    by: Mapped[int] = mapped_column(Integer)


SERVERS = [
    pytest.param("portable", marks=pytest.mark.integration),
    pytest.param("native", marks=[pytest.mark.native, pytest.mark.integration]),
]


@pytest.fixture(scope="module", params=SERVERS)
def server(request: pytest.FixtureRequest) -> Iterator[tuple[str, URL, Engine]]:
    with tables_on(request, request.param, Base.metadata, "q4m_consumer") as (url, eng):
        use_backend(eng, request.param)
        yield request.param, url, eng


@pytest.fixture
def eng(server: tuple[str, URL, Engine]) -> Iterator[Engine]:
    engine = server[2]
    yield engine
    with engine.begin() as conn:
        conn.execute(CJob.__table__.delete())
        conn.execute(Done.__table__.delete())


def enqueue(engine: Engine, *payloads: str) -> None:
    with engine.begin() as conn:
        conn.execute(insert(CJob), [{"payload": p, "n": i} for i, p in enumerate(payloads)])


def queued(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return sorted(conn.execute(select(CJob.payload)).scalars())


def connection_id(conn: Any) -> int:
    return int(conn.exec_driver_sql("SELECT CONNECTION_ID()").scalar())


def kill(engine: Engine, thread_id: int) -> None:
    with engine.connect() as admin:
        admin.exec_driver_sql(f"KILL {int(thread_id)}")


def test_one_connection_serves_every_job_and_goes_back_on_close(eng: Engine) -> None:
    enqueue(eng, *"abcde")
    ids, got = set(), []
    with queue_consumer(CJob, bind=eng, timeout=0) as consumer:
        while True:
            qs = consumer.take()
            with qs as job:
                if job is None:
                    break
                got.append(job.payload)
                ids.add(connection_id(qs.connection))
        assert eng.pool.checkedout() == 1  # type: ignore[attr-defined]
    assert sorted(got) == list("abcde") and queued(eng) == []
    assert len(ids) == 1
    # handed back as queue_session(bind=engine) hands its connection back: kept ready for
    # the engine's next consumer, and back in the pool after IDLE seconds unused
    assert len(kept_connections(eng)) == 1
    deadline = time.monotonic() + IDLE + 5
    while eng.pool.checkedout() and time.monotonic() < deadline:  # type: ignore[attr-defined]
        time.sleep(0.05)
    assert eng.pool.checkedout() == 0  # type: ignore[attr-defined]


def test_a_connection_bind_stays_the_callers(eng: Engine, server: Any) -> None:
    """Nothing of the caller's Connection is taken between jobs: it runs its own statements
    there, and the consumer's close leaves it open."""
    enqueue(eng, "a", "b")
    with eng.connect() as conn:
        if server[0] == "portable":
            conn = conn.execution_options(isolation_level="READ COMMITTED")
        consumer = queue_consumer(CJob, bind=conn, timeout=0)
        got = []
        for _ in range(2):
            with consumer.take() as job:
                assert job is not None
                got.append(job.payload)
            assert conn.execute(select(CJob.payload)).scalars().all() == (
                ["b"] if len(got) == 1 else []
            )
            conn.rollback()
        consumer.close()
        assert not conn.closed and conn.execute(text("SELECT 1")).scalar() == 1
    assert got == ["a", "b"]


def test_an_exception_returns_the_job_and_the_next_take_gets_it(eng: Engine) -> None:
    enqueue(eng, "a")
    with queue_consumer(CJob, bind=eng, timeout=0) as consumer:
        with pytest.raises(RuntimeError), consumer.take() as job:
            assert job is not None
            raise RuntimeError("boom")
        with consumer.take() as job:
            assert job is not None and job.payload == "a"
            raise QueueAbort  # swallowed, returned
        with consumer.take() as job:
            assert job is not None and job.payload == "a"
    assert queued(eng) == []


def test_refusals(eng: Engine) -> None:
    """A take while the last job is waited for or owned, and after close, is refused; a
    finished job's session and connection are not the block's any more."""
    enqueue(eng, "a", "b")
    consumer = queue_consumer(CJob, bind=eng, timeout=0)
    qs = consumer.take()
    assert qs.wait() is not None
    with pytest.raises(Q4MError, match="not finished"):
        consumer.take()
    qs.end()
    with pytest.raises(NotOwner):
        qs.session  # noqa: B018
    with pytest.raises(NotOwner):
        qs.connection  # noqa: B018
    with pytest.raises(Q4MError, match="waits once"):
        qs.wait()
    consumer.close()
    consumer.close()  # twice is fine
    with pytest.raises(Q4MError, match="closed"):
        consumer.take()
    assert queued(eng) == ["b"]


def test_close_returns_a_job_still_owned(eng: Engine) -> None:
    enqueue(eng, "a")
    consumer = queue_consumer(CJob, bind=eng, timeout=0)
    assert consumer.take().wait() is not None
    consumer.close()
    assert queued(eng) == ["a"]
    with queue_session(CJob, bind=eng, timeout=0) as job:  # on the connection kept, maybe
        assert job is not None and job.payload == "a"
    assert queued(eng) == []


def test_the_owner_is_recorded_only_during_a_job(eng: Engine, server: Any) -> None:
    """While a job is owned, a second queue session on the connection is refused
    (``AlreadyOwning``: one job per connection); between two jobs the connection is free."""
    enqueue(eng, "a", "b")
    with eng.connect() as conn:
        if server[0] == "portable":
            conn = conn.execution_options(isolation_level="READ COMMITTED")
        consumer = queue_consumer(CJob, bind=conn, timeout=0)
        with consumer.take() as job:
            assert job is not None
            with pytest.raises(AlreadyOwning):
                queue_session(CJob, bind=conn, timeout=0).wait()
        with queue_session(CJob, bind=conn, timeout=0) as other:
            assert other is not None and other.payload == "b"
        consumer.close()
    assert queued(eng) == []


def test_where_per_take(eng: Engine) -> None:
    enqueue(eng, "a", "b", "c")
    with queue_consumer(CJob, bind=eng, timeout=0) as consumer:
        with consumer.take(where=CJob.n == 2) as job:
            assert job is not None and job.payload == "c"
        with consumer.take(where=CJob.n == 2) as job:
            assert job is None
        with consumer.take() as job:  # the consumer's own condition (none) again
            assert job is not None and job.payload == "a"
    assert queued(eng) == ["b"]


@pytest.mark.parametrize("how", ["consumer:engine", "consumer:connection", "session:connection"])
def test_a_connection_killed_between_jobs_is_replaced(eng: Engine, server: Any, how: str) -> None:
    """The connection dies between two jobs: the next wait says so (nothing was owned), and
    the one after runs on a new connection; every job runs once.  On an Engine the consumer
    pins a new one; a caller's Connection reconnects, as the transaction the failed claim
    began was rolled back with it (before, a portable Connection refused every later
    statement with ``PendingRollbackError``, for ``queue_session`` as for the consumer)."""
    enqueue(eng, "a", "b")
    api, kind = how.split(":")
    with eng.connect() as caller:
        if server[0] == "portable":
            caller = caller.execution_options(isolation_level="READ COMMITTED")
        bind: Any = eng if kind == "engine" else caller
        consumer = queue_consumer(CJob, bind=bind, timeout=0)

        def next_session() -> Any:
            return consumer.take() if api == "consumer" else queue_session(CJob, bind=bind)

        qs = next_session()
        with qs as job:
            assert job is not None and job.payload == "a"
            first = connection_id(qs.connection)
        kill(eng, first)
        time.sleep(0.2)
        with pytest.raises(ConnectionLost), next_session() as job:
            pass
        qs = next_session()
        with qs as job:
            assert job is not None and job.payload == "b"
            assert connection_id(qs.connection) != first
        consumer.close()
    assert queued(eng) == []


def test_a_connection_killed_while_owning_returns_the_job(eng: Engine) -> None:
    enqueue(eng, "a")
    with queue_consumer(CJob, bind=eng, timeout=0) as consumer:
        qs = consumer.take()
        with pytest.raises(ConnectionLost), qs as job:
            assert job is not None
            kill(eng, connection_id(qs.connection))
            time.sleep(0.2)
        assert queued(eng) == ["a"]  # the server returned it
        with consumer.take(timeout=5) as job:
            assert job is not None and job.payload == "a"
    assert queued(eng) == []


def _consume(engine: Engine, by: int, hold: float = 0.0) -> None:
    """One consumer draining the queue; each job writes its payload through its session
    (and then takes ``hold`` seconds more)."""
    with queue_consumer(CJob, bind=engine, timeout=1) as consumer:
        while True:
            qs = consumer.take()
            with qs as job:
                if job is None:
                    return
                qs.session.add(Done(payload=job.payload, by=by))
                time.sleep(hold)


def _drain(engine: Engine, by: int, failures: list[BaseException]) -> None:
    """:func:`_consume` in a thread: what it raises is kept for the test."""
    try:
        _consume(engine, by)
    except BaseException as err:  # pragma: no cover - reported by the test
        failures.append(err)


def _done(engine: Engine) -> Counter[str]:
    with engine.connect() as conn:
        return Counter(conn.execute(select(Done.payload)).scalars())


def test_concurrent_threads_each_with_a_consumer(eng: Engine) -> None:
    payloads = [str(i) for i in range(300)]
    enqueue(eng, *payloads)
    failures: list[BaseException] = []
    threads = [threading.Thread(target=_drain, args=(eng, i, failures)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not failures, failures
    done = _done(eng)
    assert sorted(done) == sorted(payloads), "lost jobs"
    assert max(done.values()) == 1, "doubled jobs"
    assert queued(eng) == []


def _process(url: str, backend: str, by: int, hold: float) -> None:
    engine = create_engine(url, poolclass=NullPool)
    use_backend(engine, backend)  # type: ignore[arg-type]
    _consume(engine, by, hold)


def test_concurrent_processes_one_killed_mid_job(eng: Engine, server: Any) -> None:
    """Three processes drain the queue, one of them SIGKILLed while it runs jobs: the job it
    owned goes back to the queue and runs again; none is lost.  On InnoDB none runs twice
    (the job's write commits with its removal); on Q4M the write commits just before
    ``queue_end()``, so a kill between the two may run that one job twice (at least once)."""
    backend, url, _ = server
    payloads = [str(i) for i in range(120)]
    enqueue(eng, *payloads)
    dsn = url.render_as_string(hide_password=False)
    drain_one_killed(_process, dsn, backend, lambda: _done_by(eng).values())
    check_once(_done(eng), payloads, backend)
    assert queued(eng) == []


def _done_by(engine: Engine) -> dict[int, int]:
    with engine.connect() as conn:
        return {row.id: row.by for row in conn.execute(select(Done.id, Done.by))}
