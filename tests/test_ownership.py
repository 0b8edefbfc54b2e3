"""One owner per job, whatever the caller does with the connection (issue 11, items 2-4).

* A second owner on a connection that owns a job is refused with :class:`AlreadyOwning`
  before any statement is sent (on InnoDB the second claim would take the same row again, as
  SKIP LOCKED does not skip the transaction's own locks; on Q4M its ``queue_wait`` would end
  the first job).
* Committing, rolling back or closing the transaction that holds a portable claim inside the
  block fails the block with :class:`OwnershipReleased` (the commit or rollback never reaches
  the server), so no second consumer can own the job while the block runs.
* Claims take no gap locks on any bind: a Connection at the server's REPEATABLE READ gets a
  READ COMMITTED transaction when the library begins it, and an open REPEATABLE READ
  transaction of the caller's is refused with :class:`UnsafeBind`.

Portable tests run on the MariaDB server (``--dburi``), native ones on ``Q4M_TEST_URL`` in a
database of their own (other test runs share that server's ``test`` database).
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlalchemy import Integer
from sqlalchemy import create_engine
from sqlalchemy import event
from sqlalchemy import func
from sqlalchemy import insert
from sqlalchemy import select
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.orm import Mapped
from sqlalchemy.orm import Session
from sqlalchemy.orm import mapped_column
from sqlalchemy.pool import NullPool

from sqlalchemy_q4m import QueueAbort
from sqlalchemy_q4m import QueueMixin
from sqlalchemy_q4m import queue_batch
from sqlalchemy_q4m import queue_session
from sqlalchemy_q4m import use_backend
from sqlalchemy_q4m.exc import AlreadyOwning
from sqlalchemy_q4m.exc import OwnershipReleased
from sqlalchemy_q4m.exc import UnsafeBind

pytestmark = pytest.mark.integration


class Base(DeclarativeBase):
    pass


class Job(QueueMixin, Base):
    __tablename__ = "own_jobs"
    n: Mapped[int] = mapped_column(Integer)


class Effect(Base):
    """An InnoDB table the jobs write to."""

    __tablename__ = "own_effects"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    n: Mapped[int] = mapped_column(Integer)


@pytest.fixture(scope="module")
def tables(engine: Engine) -> Iterator[Engine]:
    Base.metadata.create_all(engine)
    yield engine
    Base.metadata.drop_all(engine)


@pytest.fixture
def db(tables: Engine) -> Iterator[Engine]:
    def clean() -> None:
        with tables.begin() as conn:
            conn.execute(Job.__table__.delete())
            conn.execute(Effect.__table__.delete())

    clean()
    yield tables
    clean()


def enqueue(engine: Engine, *numbers: int) -> list[uuid.UUID]:
    with Session(engine, expire_on_commit=False) as s:
        jobs = [Job(n=n) for n in numbers]
        s.add_all(jobs)
        s.commit()
        return [job.id for job in jobs]


def claimable(engine: Engine) -> list[uuid.UUID]:
    """Ids another consumer could own right now."""
    with engine.connect() as conn, conn.begin():
        return list(conn.execute(select(Job.id).with_for_update(skip_locked=True)).scalars())


def claimable_soon(engine: Engine, seconds: float = 10) -> list[uuid.UUID]:
    """Claimable ids once a closed owner's connection is gone on the server too (the server
    rolls a closed connection's transaction back on its own thread, a moment later)."""
    deadline = time.monotonic() + seconds
    while not (ids := claimable(engine)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return ids


def total(engine: Engine, table: Any = Job) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


class Statements:
    """Counts the statements an engine sends (a listener: the library then executes through
    SQLAlchemy, so every statement is seen)."""

    def __init__(self, engine: Engine) -> None:
        self.sent: list[str] = []
        event.listen(engine, "before_cursor_execute", self._seen)
        self.engine = engine

    def _seen(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        self.sent.append(statement)

    def close(self) -> None:
        event.remove(self.engine, "before_cursor_execute", self._seen)


# -- item 2: nested owners on one connection (portable) ---------------------------------------


def _outer_and_inner(bind_kind: str, engine: Engine) -> Iterator[tuple[Any, Any]]:
    """(outer bind, the bind an inner queue session on the same connection gets)."""
    if bind_kind == "engine":
        yield engine, None  # inner: the outer's qs.connection
    elif bind_kind == "connection":
        with engine.connect() as conn:
            yield conn, conn
    else:
        with Session(engine) as session:
            yield session, session


@pytest.mark.parametrize("bind_kind", ["engine", "connection", "session"])
def test_a_second_owner_on_the_connection_is_refused_before_any_statement(
    db: Engine, bind_kind: str
) -> None:
    first, second = enqueue(db, 1, 2)
    for outer_bind, inner_bind in _outer_and_inner(bind_kind, db):
        qs = queue_session(Job, bind=outer_bind, timeout=2)
        with qs as job:
            assert job is not None and job.id == first
            inner = qs.connection if inner_bind is None else inner_bind
            watch = Statements(db)
            try:
                with pytest.raises(AlreadyOwning), queue_session(Job, bind=inner, timeout=1):
                    pytest.fail("the inner block must not run")  # pragma: no cover
            finally:
                watch.close()
            assert watch.sent == []
            assert claimable(db) == [second]  # the outer still holds its job, alone
            assert qs.owning
            if bind_kind == "session":
                outer_bind.add(Effect(n=job.n))
            else:
                qs.connection.execute(insert(Effect.__table__).values(n=job.n))
    assert claimable(db) == [second]
    assert total(db, Effect) == 1


def test_a_failing_inner_owner_cannot_free_the_outer_job(db: Engine) -> None:
    """Before: the inner claim re-took the outer's row, and its failure rolled back the
    transaction holding the outer's lock.  Now the inner never starts."""
    enqueue(db, 1)
    with db.connect() as conn, queue_session(Job, bind=conn, timeout=2) as job:
        assert job is not None
        with pytest.raises(AlreadyOwning), queue_session(Job, bind=conn, timeout=1):
            raise RuntimeError("never reached")  # pragma: no cover
        assert claimable(db) == []  # still locked by the outer
    assert total(db) == 0


def test_batch_and_session_on_one_connection_refuse_each_other(db: Engine) -> None:
    enqueue(db, 1, 2, 3)
    with db.connect() as conn:
        with queue_session(Job, bind=conn, timeout=2) as job:
            assert job is not None
            with pytest.raises(AlreadyOwning), queue_batch(Job, bind=conn, size=5, timeout=1):
                pass  # pragma: no cover
        with queue_batch(Job, bind=conn, size=5, timeout=2) as batch:
            assert len(list(batch)) == 2
            with pytest.raises(AlreadyOwning), queue_session(Job, bind=conn, timeout=1):
                pass  # pragma: no cover
            for held in batch:
                batch.end(held)
    assert total(db) == 0


def test_owners_one_after_the_other_on_one_connection_are_fine(db: Engine) -> None:
    enqueue(db, 1, 2)
    with db.connect() as conn:
        for _ in range(2):
            with queue_session(Job, bind=conn, timeout=2) as job:
                assert job is not None
        with queue_session(Job, bind=conn, timeout=0.1) as job:
            assert job is None
    assert total(db) == 0


# -- item 3: the caller ends the transaction holding the job (portable) ----------------------


def test_committing_the_session_in_a_session_bound_block_fails_it(db: Engine) -> None:
    (job_id,) = enqueue(db, 1)
    with (
        Session(db) as session,
        pytest.raises(OwnershipReleased),
        queue_session(Job, bind=session, timeout=2),
    ):
        session.add(Effect(n=1))
        session.flush()
        with pytest.raises(OwnershipReleased):
            session.commit()
        assert claimable(db) == []  # never reached the server: nobody else can own it
        session.commit()  # still refused (and the block fails)
    assert claimable(db) == [job_id]
    assert total(db, Effect) == 0


@pytest.mark.parametrize("action", ["commit", "rollback"])
def test_ending_the_pinned_connections_transaction_fails_the_block(db: Engine, action: str) -> None:
    (job_id,) = enqueue(db, 1)
    qs = queue_session(Job, bind=db, timeout=2)
    with pytest.raises(OwnershipReleased), qs as job:
        assert job is not None
        qs.connection.execute(insert(Effect.__table__).values(n=1))
        getattr(qs.connection, action)()
    assert claimable(db) == [job_id]
    assert total(db, Effect) == 0
    with queue_session(Job, bind=db, timeout=2) as job:
        assert job is not None and job.id == job_id


@pytest.mark.parametrize("action", ["commit", "rollback"])
def test_ending_the_callers_connection_transaction_fails_the_block(db: Engine, action: str) -> None:
    """On the caller's own Connection, before any statement of theirs: the claim's
    transaction is SQLAlchemy's (never begun on the driver only), so the caller's
    ``commit()`` or ``rollback()`` is seen and stopped."""
    (job_id,) = enqueue(db, 1)
    with db.connect() as conn:
        conn = conn.execution_options(isolation_level="READ COMMITTED")
        with pytest.raises(OwnershipReleased), queue_session(Job, bind=conn, timeout=2) as job:
            assert job is not None
            getattr(conn, action)()
    assert claimable(db) == [job_id]


def test_the_claims_transaction_is_the_drivers_until_the_connection_is_handed_out(
    db: Engine,
) -> None:
    """On an Engine bind with nobody listening, the claim's transaction is begun on the driver
    (SQLAlchemy's Connection has none); ``qs.connection`` hands it to SQLAlchemy without a
    statement, so the caller's statements join it and the end commits them with the job's
    removal."""
    (first, second) = enqueue(db, 1, 2)
    qs = queue_session(Job, bind=db, timeout=2)
    with qs as job:
        assert job is not None and job.id == first
        assert qs.driver_transaction and not qs._pinned.in_transaction()  # type: ignore[union-attr]
    with (qs := queue_session(Job, bind=db, timeout=2)) as job:
        assert job is not None and job.id == second
        conn = qs.connection
        assert conn.in_transaction()
        conn.execute(insert(Effect.__table__).values(n=2))
    assert claimable(db) == [] and total(db, Effect) == 1


def test_transaction_listeners_still_see_every_job(db: Engine) -> None:
    """A job's transaction is begun and ended on the driver only where nobody could tell: with
    a ``commit`` listener of the caller's on the engine, each job's commit goes through
    SQLAlchemy and reaches it, and every job still ends."""
    enqueue(db, 1, 2, 3)
    seen: list[object] = []

    def on_commit(conn: object) -> None:
        seen.append(conn)

    event.listen(db, "commit", on_commit)
    try:
        for _ in range(3):
            with queue_session(Job, bind=db, timeout=2) as job:
                assert job is not None
    finally:
        event.remove(db, "commit", on_commit)
    assert len(seen) == 3
    assert claimable(db) == []


def test_the_job_session_commit_inside_the_block_fails_it(db: Engine) -> None:
    (job_id,) = enqueue(db, 1)
    qs = queue_session(Job, bind=db, timeout=2)
    with pytest.raises(OwnershipReleased), qs as job:
        assert job is not None
        qs.session.add(Effect(n=1))
        qs.session.commit()
    assert claimable(db) == [job_id] and total(db, Effect) == 0


def test_a_caught_release_still_fails_the_end(db: Engine) -> None:
    (job_id,) = enqueue(db, 1)
    qs = queue_session(Job, bind=db, timeout=2)
    with pytest.raises(OwnershipReleased), qs as job:
        assert job is not None
        with contextlib.suppress(OwnershipReleased):  # swallowed: the end refuses anyway
            qs.connection.commit()
    assert claimable(db) == [job_id]


@pytest.mark.parametrize("action", ["session.close", "session.rollback", "connection.close"])
def test_closing_inside_the_block_fails_it_and_returns_the_job(db: Engine, action: str) -> None:
    """A Session's rollback or close, or the pinned connection's close, cannot be stopped
    (the connection goes back to the pool and is reset or closed, which frees the row); it
    raises, so the block stops there, its writes are rolled back and the job is back, as
    after a crash at that point."""
    (job_id,) = enqueue(db, 1)
    what, method = action.split(".")
    with Session(db) as session:
        qs = queue_session(Job, bind=session if what == "session" else db, timeout=2)
        with pytest.raises(OwnershipReleased), qs as job:
            assert job is not None
            qs.session.add(Effect(n=1))
            qs.session.flush()
            getattr(session if what == "session" else qs.connection, method)()
            pytest.fail("the block must stop there")  # pragma: no cover
    assert claimable_soon(db) == [job_id]
    assert total(db, Effect) == 0
    with queue_session(Job, bind=db, timeout=2) as job:
        assert job is not None and job.id == job_id


def test_two_consumers_never_own_a_job_whose_block_commits_early(db: Engine) -> None:
    """The race of item 3, with a real second consumer polling while the first commits its
    Session inside the block."""
    (job_id,) = enqueue(db, 1)
    owned_by_second: list[uuid.UUID] = []
    first_done = threading.Event()

    def second() -> None:
        while not first_done.is_set():
            with queue_session(Job, bind=db, timeout=0.2, poll_interval=0.01) as job:
                if job is not None:
                    owned_by_second.append(job.id)
                    raise QueueAbort

    thread = threading.Thread(target=second)
    thread.start()
    try:
        with (
            Session(db) as session,
            pytest.raises(OwnershipReleased),
            queue_session(Job, bind=session, timeout=2),
        ):
            owned_by_second.clear()  # ownerships before this block claimed it
            try:
                session.commit()
            finally:
                time.sleep(0.5)  # the second consumer polls meanwhile
                assert owned_by_second == []
    finally:
        first_done.set()
        thread.join(10)
    assert claimable(db) == [job_id]


# -- item 4: no gap locks, whatever the bind -------------------------------------------------


@pytest.fixture
def short_lock_waits(db: Engine, db_url: URL) -> Iterator[Engine]:
    """An engine at the server's default isolation (REPEATABLE READ) whose lock waits give up
    after one second (MariaDB)."""
    eng = create_engine(db_url, poolclass=NullPool)

    @event.listens_for(eng, "connect")
    def _short(dbapi_conn: Any, record: Any) -> None:
        cur = dbapi_conn.cursor()
        # a producer starved by idle consumers' gap locks fails (1205, or 1969 from
        # max_statement_time when consumers keep re-taking the gap) instead of hanging
        cur.execute("SET SESSION innodb_lock_wait_timeout = 1, max_statement_time = 5")
        cur.close()

    yield eng
    eng.dispose()


@pytest.mark.parametrize("consumer", ["queue_session", "queue_batch"])
def test_idle_consumers_on_repeatable_read_connections_do_not_stall_producers(
    short_lock_waits: Engine, consumer: str
) -> None:
    eng = short_lock_waits
    with eng.connect() as probe:
        assert probe.get_isolation_level() == "REPEATABLE READ"
    stop = threading.Event()
    taken: list[int] = []
    errors: list[BaseException] = []

    def consume() -> None:
        try:
            with eng.connect() as conn:
                while not stop.is_set():
                    if consumer == "queue_batch":
                        with queue_batch(
                            Job, bind=conn, size=3, timeout=0.3, poll_interval=0.01
                        ) as batch:
                            for job in batch:
                                batch.end(job)
                                taken.append(job.n)
                        continue
                    with queue_session(Job, bind=conn, timeout=0.3, poll_interval=0.01) as job:
                        if job is not None:
                            taken.append(job.n)
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=consume) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)  # the consumers are idle, scanning the empty table
        with eng.connect() as producer:
            for n in range(10):
                producer.execute(insert(Job.__table__).values(id=uuid.uuid4().bytes, n=n))
                producer.commit()  # 1205 here if an idle claim holds the table's end gap
        deadline = time.monotonic() + 20
        while len(taken) < 10 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join(20)
    assert errors == []
    assert sorted(taken) == list(range(10))
    with eng.connect() as conn:  # the caller's connection keeps its own isolation level
        assert conn.get_isolation_level() == "REPEATABLE READ"


def test_the_callers_connection_keeps_its_isolation_level(short_lock_waits: Engine) -> None:
    enqueue(short_lock_waits, 1)
    with short_lock_waits.connect() as conn:
        with queue_session(Job, bind=conn, timeout=2) as job:
            assert job is not None
            level = conn.exec_driver_sql("SELECT @@tx_isolation").scalar()
            assert level == "REPEATABLE-READ"  # the session's level; the claim's was RC
        conn.execute(select(1))
        assert conn.get_isolation_level() == "REPEATABLE READ"


def test_an_open_repeatable_read_transaction_is_refused(db: Engine) -> None:
    (job_id,) = enqueue(db, 1)
    with db.connect() as conn:
        conn.execute(select(1))  # the caller's transaction, at the server default
        with (
            pytest.raises(UnsafeBind, match="READ COMMITTED"),
            queue_session(Job, bind=conn, timeout=1),
        ):
            pass  # pragma: no cover
        assert conn.in_transaction() and not conn.invalidated  # untouched
    with Session(db) as session:
        session.execute(select(1))
        with pytest.raises(UnsafeBind), queue_session(Job, bind=session, timeout=1):
            pass  # pragma: no cover
    with db.connect() as conn:
        conn.execute(select(1))
        with pytest.raises(UnsafeBind), queue_batch(Job, bind=conn, size=5, timeout=1):
            pass  # pragma: no cover
        assert conn.in_transaction() and not conn.invalidated
    assert claimable(db) == [job_id]


def test_an_open_read_committed_transaction_is_joined(db: Engine) -> None:
    enqueue(db, 1)
    with db.connect().execution_options(isolation_level="READ COMMITTED") as conn:
        conn.execute(select(1))
        with queue_session(Job, bind=conn, timeout=2) as job:
            assert job is not None
            conn.execute(insert(Effect.__table__).values(n=job.n))
        assert conn.in_transaction()  # the caller's: committed by the caller
        conn.commit()
    assert total(db) == 0 and total(db, Effect) == 1


# -- native (Q4M) -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def q4m(q4m_url: URL) -> Iterator[Engine]:
    """A database of this module's own on the Q4M server, with its tables."""
    name = f"own_{uuid.uuid4().hex[:10]}"
    admin = create_engine(q4m_url, poolclass=NullPool)
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE `{name}`"))
    eng = create_engine(q4m_url.set(database=name), pool_size=5)
    use_backend(eng, "native")
    Base.metadata.create_all(eng)
    try:
        yield eng
    finally:
        eng.dispose()
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE `{name}`"))
        admin.dispose()


@pytest.mark.native
def test_native_second_owner_on_one_connection_is_refused(q4m: Engine) -> None:
    """Before: the inner queue_wait silently ended the outer's job, lost when the outer
    failed.  Now the inner is refused and the outer's failure returns its job."""
    with q4m.begin() as conn:
        conn.execute(insert(Job.__table__), [{"id": uuid.uuid4().bytes, "n": n} for n in (1, 2)])
    with (
        q4m.connect() as conn,
        pytest.raises(RuntimeError),
        queue_session(Job, bind=conn, timeout=2) as job,
    ):
        assert job is not None and job.n == 1
        with pytest.raises(AlreadyOwning), queue_session(Job, bind=conn, timeout=1):
            pass  # pragma: no cover
        raise RuntimeError("the outer fails: its job must come back")
    assert total(q4m) == 2
    for expected in (1, 2):
        with queue_session(Job, bind=q4m, timeout=2) as job:
            assert job is not None and job.n == expected
    assert total(q4m) == 0


@pytest.mark.native
def test_native_open_transaction_on_the_connection_is_refused(q4m: Engine) -> None:
    """queue_end() cannot be part of the caller's transaction on Q4M: the job's writes would
    commit after the job is gone."""
    with q4m.begin() as conn:
        conn.execute(insert(Job.__table__).values(id=uuid.uuid4().bytes, n=1))
    with q4m.connect() as conn:
        conn.execute(select(1))
        with pytest.raises(UnsafeBind, match="Q4M"), queue_session(Job, bind=conn, timeout=1):
            pass  # pragma: no cover
    assert total(q4m) == 1
    with queue_session(Job, bind=q4m, timeout=2) as job:
        assert job is not None


@pytest.mark.native
def test_native_connection_closed_inside_the_block_never_reaches_the_pool_owning(
    q4m: Engine,
) -> None:
    with q4m.begin() as conn:
        conn.execute(insert(Job.__table__).values(id=uuid.uuid4().bytes, n=1))
    qs = queue_session(Job, bind=q4m, timeout=2)
    with pytest.raises(OwnershipReleased), qs as job:
        assert job is not None
        qs.connection.close()  # the pool closes it instead of keeping an owner-mode connection
    for _ in range(6):  # every pooled connection is usable and owns nothing
        with q4m.connect() as conn, pytest.raises(OperationalError):
            conn.exec_driver_sql("SELECT queue_rowid()")  # not in owner mode
    with queue_session(Job, bind=q4m, timeout=5) as job:
        assert job is not None and job.n == 1
    assert total(q4m) == 0
