"""Statements per job, counted at the driver, for every documented bind on both backends.

Each library consumer must send exactly what the raw PyMySQL loop sends per job: on InnoDB the
claim (``SELECT ... FOR UPDATE SKIP LOCKED``), the ``DELETE`` and the ``COMMIT``; on Q4M
(autocommit) ``queue_wait()``, the owner's ``SELECT`` and ``queue_end()``.  Every command the
driver sends is counted (queries, COMMIT, ROLLBACK including the pool's reset-on-return, pings),
over 100 jobs after a warm-up job (the backend detected, the statements compiled, the
consumer's connection made ready once).  A count is deterministic, so this is an exact test.
The same holds for a queue without unique keys in a database where another queue holds some.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Callable
from collections.abc import Iterator
from typing import Any
from typing import ClassVar

import aiomysql
import pymysql
import pytest
from conftest import NO_Q4M_SERVER
from native_support import private_database
from pymysql.constants import COMMAND
from sqlalchemy import Engine
from sqlalchemy import Integer
from sqlalchemy import create_engine
from sqlalchemy import event
from sqlalchemy import insert
from sqlalchemy import literal
from sqlalchemy import make_url
from sqlalchemy import select
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.orm import Mapped
from sqlalchemy.orm import Session
from sqlalchemy.orm import mapped_column
from sqlalchemy.pool import NullPool

from sqlalchemy_q4m import QueueMixin
from sqlalchemy_q4m import enqueue
from sqlalchemy_q4m import queue_consumer
from sqlalchemy_q4m import queue_session
from sqlalchemy_q4m import use_backend
from sqlalchemy_q4m.backends import unique_keys
from sqlalchemy_q4m.backends.pinned import IDLE
from sqlalchemy_q4m.backends.pinned import kept_connections
from sqlalchemy_q4m.backends.unique_keys import count_keys

pytestmark = pytest.mark.integration

JOBS = 100


class Base(DeclarativeBase):
    pass


class CountJob(QueueMixin, Base):
    __tablename__ = "sc_jobs"
    n: Mapped[int] = mapped_column(Integer)


class Effect(Base):
    """What a job writes (InnoDB on both servers)."""

    __tablename__ = "sc_effects"
    __table_args__: ClassVar[dict[str, str]] = {"mysql_engine": "InnoDB"}
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)


def _describe(command: int, sql: Any) -> str:
    if command == COMMAND.COM_QUERY:
        text_ = sql.decode(errors="replace") if isinstance(sql, bytes) else str(sql)
        return " ".join(text_.split()[:2]).upper()
    return f"<command {command}>"


class Log:
    """Every command sent by the connections of one engine."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    def sync_creator(self, url: URL) -> Callable[[], Any]:
        kwargs = _connect_kwargs(url)
        log = self

        class Counting(pymysql.connections.Connection):  # type: ignore[misc]
            def _execute_command(self, command: int, sql: Any) -> Any:
                log.sent.append(_describe(command, sql))
                return super()._execute_command(command, sql)

        return lambda: Counting(**kwargs)

    def async_creator(self, url: URL) -> Callable[[], Any]:
        kwargs = _connect_kwargs(url.set(drivername="mysql+aiomysql"))
        log = self

        class Counting(aiomysql.Connection):  # type: ignore[misc]
            async def _execute_command(self, command: int, sql: Any) -> Any:
                log.sent.append(_describe(command, sql))
                return await super()._execute_command(command, sql)

        async def connect() -> Any:
            conn = Counting(**kwargs)
            await conn._connect()
            return conn

        return connect


def _connect_kwargs(url: URL) -> dict[str, Any]:
    """The driver's keyword arguments for ``url``, as SQLAlchemy's dialect makes them."""
    args, kwargs = url.get_dialect()().create_connect_args(url)
    assert not args
    return dict(kwargs)


#: The raw loop's statements per job (first two words), per backend.
RAW = {
    "portable": ["SELECT SC_JOBS.ID,", "DELETE FROM", "COMMIT"],
    "native": ["SELECT QUEUE_WAIT('SC_JOBS',", "SELECT SC_JOBS.ID,", "SELECT QUEUE_END()"],
}


@pytest.fixture(
    scope="module", params=["portable", pytest.param("native", marks=pytest.mark.native)]
)
def backend_url(request: pytest.FixtureRequest, db_url: URL) -> Iterator[tuple[str, URL]]:
    if request.param == "portable":
        yield "portable", db_url
        return
    url = os.environ.get("Q4M_TEST_URL")
    if not url:
        pytest.skip(NO_Q4M_SERVER)
    with private_database(make_url(url), "q4m_counts") as private:
        yield "native", private


@pytest.fixture(scope="module")
def tables(backend_url: tuple[str, URL]) -> Iterator[tuple[str, URL]]:
    name, url = backend_url
    eng = create_engine(url, poolclass=NullPool)
    use_backend(eng, name)  # type: ignore[arg-type]
    Base.metadata.create_all(eng)
    yield name, url
    Base.metadata.drop_all(eng)
    eng.dispose()


def _fill(url: URL, count: int) -> None:
    eng = create_engine(url, poolclass=NullPool)
    with eng.begin() as conn:
        conn.execute(CountJob.__table__.delete())
        conn.execute(Effect.__table__.delete())
        conn.execute(
            insert(CountJob.__table__), [{"id": uuid.uuid4().bytes, "n": i} for i in range(count)]
        )
    eng.dispose()


def _per_job(log: Log, start: int, jobs: int) -> list[str]:
    sent = log.sent[start:]
    assert len(sent) % jobs == 0, sent
    per = len(sent) // jobs
    first = sent[:per]
    assert sent == first * jobs, "every job sends the same statements"
    return first


#: Each bind of ``queue_session`` per job, and of ``queue_consumer`` taking each job.
SYNC_BINDS = [
    "engine",
    "connection",
    "session",
    "consumer:engine",
    "consumer:connection",
    "consumer:session",
]


def _counting_engine(url: URL, log: Log) -> Engine:
    return create_engine(url, creator=log.sync_creator(url), pool_size=2)


def _run_sync(
    name: str,
    url: URL,
    bind_kind: str,
    write: bool = False,
    level: str = "READ COMMITTED",
    seen: list[str] | None = None,
    target: Any = CountJob,
) -> list[str]:
    """The statements of each of 100 jobs (after a warm-up job) of ``target`` consumed with a
    ``bind_kind`` bind; with ``write``, each job inserts an ``Effect`` through
    ``qs.session``; with ``seen``, a ``before_cursor_execute`` listener appends every
    statement it sees."""
    log = Log()
    eng = _counting_engine(url, log)
    use_backend(eng, name)  # type: ignore[arg-type]
    if seen is not None:

        @event.listens_for(eng, "before_cursor_execute")
        def _seen(conn: Any, cursor: Any, sql: str, *args: Any) -> None:
            seen.append(_describe(COMMAND.COM_QUERY, sql))

    _fill(url, JOBS + 1)
    done: list[int] = []
    conn = None
    consumer = None
    kind = bind_kind.removeprefix("consumer:")
    try:
        if kind == "engine":
            bind: Any = eng
        elif kind == "connection":
            conn = eng.connect()
            if name == "portable" and level != "default":  # the worker's connection
                conn = conn.execution_options(isolation_level=level)
            bind = conn
        else:
            bind = Session(eng)
        if kind != bind_kind:
            consumer = queue_consumer(target, bind=bind, timeout=5)
        start = 0
        for i in range(JOBS + 1):
            if i == 1:
                start = len(log.sent)
            qs = (
                queue_session(target, bind=bind, timeout=5) if consumer is None else consumer.take()
            )
            with qs as job:
                assert job is not None
                done.append(job.n)
                if write:
                    qs.session.add(Effect(id=job.n))
        return _per_job(log, start, JOBS)
    finally:
        if consumer is not None:
            consumer.close()
        if isinstance(bind, Session):
            bind.close()
        if conn is not None:
            conn.close()
        eng.dispose()
        assert sorted(done) == list(range(JOBS + 1))
        if write:
            assert _effects(url) == list(range(JOBS + 1))


def _effects(url: URL) -> list[int]:
    eng = create_engine(url, poolclass=NullPool)
    try:
        with eng.connect() as conn:
            return sorted(conn.scalars(select(Effect.id)))
    finally:
        eng.dispose()


@pytest.mark.parametrize("bind_kind", SYNC_BINDS)
def test_each_sync_bind_sends_the_raw_loops_statements(
    tables: tuple[str, URL], bind_kind: str
) -> None:
    name, url = tables
    assert _run_sync(name, url, bind_kind) == RAW[name]


@pytest.mark.parametrize("bind_kind", SYNC_BINDS)
def test_a_core_table_sends_the_raw_loops_statements(
    tables: tuple[str, URL], bind_kind: str
) -> None:
    """The queue's Core ``Table`` as the target (Rows, not instances): the same statements.
    On Q4M the owner's SELECT is read in the consumer's autocommit too (no BEGIN, no
    COMMIT around it)."""
    name, url = tables
    assert _run_sync(name, url, bind_kind, target=CountJob.__table__) == RAW[name]


@pytest.mark.parametrize("bind_kind", SYNC_BINDS)
def test_a_job_writing_through_its_session(tables: tuple[str, URL], bind_kind: str) -> None:
    """InnoDB: the write commits with the DELETE.  Q4M: the write is a transaction of its own
    (BEGIN, INSERT, COMMIT), committed before queue_end(), which needs no COMMIT after it."""
    name, url = tables
    expected = {
        "portable": ["SELECT SC_JOBS.ID,", "INSERT INTO", "DELETE FROM", "COMMIT"],
        "native": [
            "SELECT QUEUE_WAIT('SC_JOBS',",
            "SELECT SC_JOBS.ID,",
            "BEGIN",
            "INSERT INTO",
            "COMMIT",
            "SELECT QUEUE_END()",
        ],
    }
    assert _run_sync(name, url, bind_kind, write=True) == expected[name]


@pytest.mark.parametrize("bind_kind", SYNC_BINDS)
def test_statement_listeners_still_see_every_statement(
    tables: tuple[str, URL], bind_kind: str
) -> None:
    """With a statement listener (tracing, say) the library's statements go through
    ``exec_driver_sql`` so that it sees them.  Autobegin then begins a transaction for them,
    so on Q4M the connection stays out of autocommit and each job commits before and after
    ``queue_end()``, as before this optimisation; on InnoDB nothing changes."""
    name, url = tables
    seen: list[str] = []
    sent = _run_sync(name, url, bind_kind, seen=seen)
    expected = {
        "portable": RAW["portable"],
        "native": [*RAW["native"][:2], "COMMIT", RAW["native"][2], "COMMIT"],
    }
    assert sent == expected[name]
    library = [s.split("(")[0] for s in sent if s != "COMMIT"]  # before parameters
    assert [s.split("(")[0] for s in seen[-len(library) :]] == library


@pytest.mark.parametrize("backend_url", ["portable"], indirect=True)  # Q4M: no isolation
def test_a_repeatable_read_connection_pays_one_set_transaction(tables: tuple[str, URL]) -> None:
    """A portable Connection bind at the server's default isolation: the claim's transaction is
    made READ COMMITTED with ``SET TRANSACTION`` (next transaction only), because the
    connection is the caller's and keeps its own session isolation level."""
    name, url = tables
    sent = _run_sync(name, url, "connection", level="default")
    assert sent == ["SET TRANSACTION", *RAW[name]]


#: Each asyncio bind of ``queue_session`` per job, and of ``queue_consumer`` taking each job.
ASYNC_BINDS = [
    "engine",
    "connection",
    "session",
    "consumer:engine",
    "consumer:connection",
    "consumer:session",
]


async def _run_async(name: str, url: URL, bind_kind: str) -> list[str]:
    log = Log()
    aurl = url.set(drivername="mysql+aiomysql")
    eng: AsyncEngine = create_async_engine(aurl, async_creator=log.async_creator(url), pool_size=2)
    use_backend(eng.sync_engine, name)  # type: ignore[arg-type]
    _fill(url, JOBS + 1)
    done: list[int] = []
    conn = None
    session = None
    consumer = None
    kind = bind_kind.removeprefix("consumer:")
    try:
        if kind == "engine":
            bind: Any = eng
        elif kind == "connection":
            conn = await eng.connect()
            if name == "portable":
                await conn.execution_options(isolation_level="READ COMMITTED")
            bind = conn
        else:
            bind = session = AsyncSession(eng)
        if kind != bind_kind:
            consumer = queue_consumer(CountJob, bind=bind, timeout=5)
        start = 0
        for i in range(JOBS + 1):
            if i == 1:
                start = len(log.sent)
            qs = (
                queue_session(CountJob, bind=bind, timeout=5)
                if consumer is None
                else consumer.take()
            )
            async with qs as job:
                assert job is not None
                done.append(job.n)
        return _per_job(log, start, JOBS)
    finally:
        if consumer is not None:
            await consumer.close()
        if session is not None:
            await session.close()
        if conn is not None:
            await conn.close()
        await eng.dispose()
        assert sorted(done) == list(range(JOBS + 1))


@pytest.mark.parametrize("bind_kind", ASYNC_BINDS)
def test_each_async_bind_sends_the_raw_loops_statements(
    tables: tuple[str, URL], bind_kind: str
) -> None:
    name, url = tables
    assert asyncio.run(_run_async(name, url, bind_kind)) == RAW[name]


# -- what the savings must not change ------------------------------------------------------------


def _autocommit(conn: Any) -> bool:
    return bool(conn.connection.dbapi_connection.get_autocommit())


def test_the_callers_own_connections_keep_their_mode(tables: tuple[str, URL]) -> None:
    """Consumer connections are kept ready (READ COMMITTED, or autocommit on Q4M) for the
    engine's next queue session, never handed to the caller's ``engine.connect()``, and
    reset when they go back to the pool."""
    name, url = tables
    _fill(url, 3)
    eng = create_engine(url, pool_size=3, max_overflow=0)
    use_backend(eng, name)  # type: ignore[arg-type]
    try:
        with eng.connect() as probe:
            default = probe.get_isolation_level()
        with queue_session(CountJob, bind=eng, timeout=5) as job:
            assert job is not None
        assert len(kept_connections(eng)) == 1
        (kept,) = kept_connections(eng)
        with eng.connect() as mine, eng.connect() as other:  # every other pool connection
            for conn in (mine, other):
                assert conn.connection.dbapi_connection is not kept.connection.dbapi_connection
                assert conn.get_isolation_level() == default
                assert not _autocommit(conn)
            mine.execute(insert(Effect.__table__).values(id=1))
            mine.rollback()
        assert _effects(url) == []
        time.sleep(IDLE + 0.1)  # unused too long: back to the pool at the next take
        with queue_session(CountJob, bind=eng, timeout=5) as job:
            assert job is not None
        eng.dispose()  # the kept one goes back to the pool, which closes it
        assert kept_connections(eng) == []
        assert kept.closed
        with eng.connect() as conn:
            assert conn.get_isolation_level() == default and not _autocommit(conn)
    finally:
        eng.dispose()


def test_a_kept_connection_never_makes_the_caller_wait(tables: tuple[str, URL]) -> None:
    """A pool with no connection to spare keeps none: the caller's ``engine.connect()`` right
    after a queue session gets the pool's one connection at once (it used to wait for
    ``pool_timeout`` and fail: the consumer connection was kept outside the pool)."""
    name, url = tables
    _fill(url, 1)
    eng = create_engine(url, pool_size=1, max_overflow=0, pool_timeout=2)
    use_backend(eng, name)  # type: ignore[arg-type]
    try:
        with queue_session(CountJob, bind=eng, timeout=5) as job:
            assert job is not None
        assert kept_connections(eng) == []
        started = time.monotonic()
        with eng.connect() as conn:
            assert conn.scalar(select(literal(1))) == 1
        assert time.monotonic() - started < 1.0
    finally:
        eng.dispose()


def test_an_unused_kept_connection_goes_back_to_the_pool_by_itself(
    tables: tuple[str, URL],
) -> None:
    """Kept connections unused for ``IDLE`` seconds go back to the pool without waiting for
    the engine's next queue session (a timer returns them)."""
    name, url = tables
    _fill(url, 1)
    eng = create_engine(url, pool_size=2, max_overflow=0)
    use_backend(eng, name)  # type: ignore[arg-type]
    try:
        with queue_session(CountJob, bind=eng, timeout=5) as job:
            assert job is not None
        assert len(kept_connections(eng)) == 1
        assert eng.pool.checkedout() == 1  # type: ignore[attr-defined]
        # the sweep takes the connection off the kept list, then checks it in (on Q4M a
        # round trip: out of autocommit): wait for both, not only the first
        deadline = time.monotonic() + IDLE + 2.0
        while (
            kept_connections(eng) or eng.pool.checkedout()  # type: ignore[attr-defined]
        ) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert kept_connections(eng) == []
        assert eng.pool.checkedout() == 0  # type: ignore[attr-defined]
    finally:
        eng.dispose()


@pytest.mark.parametrize("bind_kind", ["engine", "connection"])
def test_the_jobs_writes_still_roll_back(tables: tuple[str, URL], bind_kind: str) -> None:
    """On Q4M the consumer's connection is in autocommit, but a transaction SQLAlchemy
    begins on it (the job's writes, the caller's own work) is a real one: a failing job's
    writes are undone, and so is the caller's rolled-back work on its Connection."""
    name, url = tables
    _fill(url, 1)
    eng = create_engine(url, pool_size=2)
    use_backend(eng, name)  # type: ignore[arg-type]
    conn = eng.connect() if bind_kind == "connection" else None
    try:
        bind: Any = conn if conn is not None else eng
        qs = queue_session(CountJob, bind=bind, timeout=5)
        with pytest.raises(RuntimeError), qs as job:
            assert job is not None
            qs.session.add(Effect(id=job.n))
            qs.session.flush()
            raise RuntimeError("the job fails after its write")
        assert _effects(url) == []
        if conn is not None:
            conn.execute(insert(Effect.__table__).values(id=7))
            conn.rollback()
            assert _effects(url) == []
            conn.execute(insert(Effect.__table__).values(id=8))
            conn.commit()
            assert _effects(url) == [8]
        with queue_session(CountJob, bind=bind, timeout=5) as job:
            assert job is not None and job.n == 0  # the failed job ran again
    finally:
        if conn is not None:
            conn.close()
        eng.dispose()


# -- unique keys elsewhere in the database -------------------------------------------------------


class KeyedJob(QueueMixin, Base):
    """Another queue of the database, holding unique keys."""

    __tablename__ = "sc_keyed"
    n: Mapped[int] = mapped_column(Integer)


@pytest.fixture(scope="module")
def keys_elsewhere(tables: tuple[str, URL]) -> Iterator[tuple[str, URL]]:
    """The keys table exists and ``sc_keyed`` holds a key (its first keyed enqueue's wait is
    skipped: no consumer has looked yet)."""
    name, url = tables
    eng = create_engine(url, poolclass=NullPool)
    use_backend(eng, name)  # type: ignore[arg-type]
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(unique_keys, "FIRST_KEY_WAIT", 0.0)
            (held,) = enqueue(eng, KeyedJob, [{"n": 1}], unique_key=lambda row: "k1")
        assert held.enqueued
        with eng.connect() as conn:
            assert count_keys(conn, KeyedJob.__tablename__) == 1
        yield name, url
    finally:
        eng.dispose()


@pytest.fixture
def long_memo(monkeypatch: pytest.MonkeyPatch) -> None:
    """A keyless queue is looked up again every ``ABSENT_TTL`` seconds (a statement then); 100
    jobs on a busy machine may take longer than the default 5 s, so the count is kept exact."""
    monkeypatch.setattr(unique_keys, "ABSENT_TTL", 3600.0)


@pytest.mark.parametrize("bind_kind", SYNC_BINDS)
def test_a_keyless_queue_beside_keyed_ones_pays_nothing(
    keys_elsewhere: tuple[str, URL], long_memo: None, bind_kind: str
) -> None:
    name, url = keys_elsewhere
    assert _run_sync(name, url, bind_kind) == RAW[name]


@pytest.mark.parametrize("bind_kind", ASYNC_BINDS)
def test_a_keyless_queue_beside_keyed_ones_pays_nothing_async(
    keys_elsewhere: tuple[str, URL], long_memo: None, bind_kind: str
) -> None:
    name, url = keys_elsewhere
    assert asyncio.run(_run_async(name, url, bind_kind)) == RAW[name]
