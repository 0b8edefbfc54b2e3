"""``queue_session`` on the real server (the portable backend: InnoDB + SKIP LOCKED).

End, abort (exception and :class:`QueueAbort`), timeout, conditions, several models, the three
kinds of ``bind``, atomicity with a Session, lock-wait and deadlock retries, a killed owner,
and the guarantee that no pool ever receives a connection that still owns a job.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from typing import Any

import pymysql
import pytest
from sqlalchemy import Column
from sqlalchemy import Engine
from sqlalchemy import Integer
from sqlalchemy import MetaData
from sqlalchemy import Text
from sqlalchemy import create_engine
from sqlalchemy import event
from sqlalchemy import func
from sqlalchemy import insert
from sqlalchemy import select
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.orm import Mapped
from sqlalchemy.orm import Session
from sqlalchemy.orm import mapped_column

from sqlalchemy_q4m import QueueAbort
from sqlalchemy_q4m import QueueMixin
from sqlalchemy_q4m import QueueSession
from sqlalchemy_q4m import detect_backend
from sqlalchemy_q4m import queue_session
from sqlalchemy_q4m import queue_sessionmaker
from sqlalchemy_q4m import queue_table
from sqlalchemy_q4m.exc import CompletionFailed
from sqlalchemy_q4m.exc import ConnectionLost
from sqlalchemy_q4m.exc import NotOwner
from sqlalchemy_q4m.exc import OwnershipReleased
from sqlalchemy_q4m.exc import Q4MError
from sqlalchemy_q4m.exc import UnsupportedServer
from sqlalchemy_q4m.server import check_server

pytestmark = pytest.mark.integration


class Base(DeclarativeBase):
    pass


class ShellJob(QueueMixin, Base):
    __tablename__ = "ss_shell_jobs"
    command: Mapped[str] = mapped_column(Text)
    priority: Mapped[int] = mapped_column(Integer, default=0)


class RubyJob(QueueMixin, Base):
    __tablename__ = "ss_ruby_jobs"
    script: Mapped[str] = mapped_column(Text)


class Note(Base):
    """A plain InnoDB table the job blocks write to."""

    __tablename__ = "ss_notes"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    text: Mapped[str] = mapped_column(Text)


core_md = MetaData()
core_jobs = queue_table("ss_core_jobs", core_md, Column("payload", Text))


@pytest.fixture(scope="module")
def tables(engine: Engine) -> Iterator[Engine]:
    Base.metadata.create_all(engine)
    core_md.create_all(engine)
    yield engine
    Base.metadata.drop_all(engine)
    core_md.drop_all(engine)


@pytest.fixture
def db(tables: Engine) -> Iterator[Engine]:
    """The shared engine, with every table of this module empty before and after the test."""

    def clean() -> None:
        with tables.begin() as conn:
            for table in [*Base.metadata.sorted_tables, core_jobs]:
                conn.execute(table.delete())

    clean()
    yield tables
    clean()


@pytest.fixture
def watched(db: Engine, db_url: URL) -> Iterator[tuple[Engine, list[str]]]:
    """An engine whose pool records any connection handed back while its server session is
    still inside a transaction (which is where a portable claim holds the job's row lock).

    The server's own ``@@in_transaction`` is asked, not ``information_schema.INNODB_TRX``:
    InnoDB refreshes that table from a cache at most every 0.1 s (and not while anyone
    keeps reading it), so right after a COMMIT it can still list the finished transaction
    with its locks, and right after a claim it can still miss it."""
    problems: list[str] = []
    eng = create_engine(db_url, pool_size=3, max_overflow=0)

    @event.listens_for(eng, "reset")
    def _reset(dbapi_conn: Any, record: Any, state: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("SELECT @@in_transaction")
        (open_transaction,) = cur.fetchone()
        cur.close()
        if open_transaction:
            problems.append("connection returned to the pool inside an open transaction")

    yield eng, problems
    eng.dispose()


def enqueue(engine: Engine, *jobs: Any) -> list[uuid.UUID]:
    with Session(engine, expire_on_commit=False) as s:
        s.add_all(jobs)
        s.commit()
        return [job.id for job in jobs]


def count(engine: Engine, model: Any = ShellJob) -> int:
    with Session(engine) as s:
        return int(s.scalar(select(func.count()).select_from(model)) or 0)


def claimable(engine: Engine, model: Any = ShellJob) -> list[Any]:
    """Ids another consumer could take right now (rows not locked by an owner)."""
    with engine.connect() as conn, conn.begin():
        rows = conn.execute(select(model.id).with_for_update(skip_locked=True)).scalars().all()
        return list(rows)


# -- end, abort, timeout ---------------------------------------------------------------------


def test_end_removes_the_job(db: Engine) -> None:
    (job_id,) = enqueue(db, ShellJob(command="echo hi"))
    with queue_session(ShellJob, bind=db, timeout=5) as job:
        assert job is not None and job.id == job_id and job.command == "echo hi"
        assert claimable(db) == []  # owned: nobody else can take it
        assert count(db) == 1
    assert count(db) == 0


def test_exception_aborts_and_reraises(db: Engine) -> None:
    (job_id,) = enqueue(db, ShellJob(command="boom"))
    with pytest.raises(RuntimeError, match="boom"), queue_session(ShellJob, bind=db) as job:
        raise RuntimeError(job.command)
    assert claimable(db) == [job_id]
    with queue_session(ShellJob, bind=db, timeout=1) as again:
        assert again is not None and again.id == job_id


def test_queue_abort_is_swallowed(db: Engine) -> None:
    (job_id,) = enqueue(db, ShellJob(command="later"))
    with queue_session(ShellJob, bind=db, timeout=1) as job:
        assert job is not None
        raise QueueAbort
    assert claimable(db) == [job_id]


@pytest.mark.parametrize("timeout", [0.0, 0.4])
def test_timeout_returns_none_in_about_timeout(db: Engine, timeout: float) -> None:
    started = time.monotonic()
    with queue_session(ShellJob, bind=db, timeout=timeout) as job:
        assert job is None
    elapsed = time.monotonic() - started
    assert timeout <= elapsed < timeout + 0.6


def test_a_job_arriving_during_the_wait_is_taken(db: Engine) -> None:
    timer = threading.Timer(0.3, enqueue, (db, ShellJob(command="late")))
    timer.start()
    try:
        started = time.monotonic()
        with queue_session(ShellJob, bind=db, timeout=5, poll_interval=0.02) as job:
            assert job is not None and job.command == "late"
        assert time.monotonic() - started < 2
    finally:
        timer.join()


def test_fifo_order(db: Engine) -> None:
    ids = enqueue(db, *(ShellJob(command=str(i)) for i in range(5)))
    taken = []
    for _ in ids:
        with queue_session(ShellJob, bind=db, timeout=1) as job:
            taken.append(job.id)
    assert taken == ids


# -- conditions and several models -----------------------------------------------------------


def test_where(db: Engine) -> None:
    enqueue(db, ShellJob(command="low", priority=1), ShellJob(command="high", priority=9))
    with queue_session(ShellJob, bind=db, where=ShellJob.priority >= 5, timeout=1) as job:
        assert job is not None and job.command == "high"
    with queue_session(ShellJob, bind=db, where=ShellJob.priority >= 5, timeout=0.2) as job:
        assert job is None
    assert count(db) == 1


def test_several_models_earlier_wins(db: Engine) -> None:
    enqueue(db, RubyJob(script="puts 1"))
    enqueue(db, ShellJob(command="ls"))
    with queue_session(ShellJob, RubyJob, bind=db, timeout=1) as job:
        assert isinstance(job, ShellJob)
    qs = queue_session(ShellJob, RubyJob, bind=db, timeout=1)
    with qs as job:
        assert isinstance(job, RubyJob) and job.script == "puts 1"
        assert qs.subscription is not None and qs.subscription.target is RubyJob
    assert count(db, RubyJob) == 0


def test_where_per_model(db: Engine) -> None:
    enqueue(db, ShellJob(command="low", priority=1), RubyJob(script="r"))
    where = {ShellJob: ShellJob.priority > 5}
    with queue_session(ShellJob, RubyJob, bind=db, where=where, timeout=1) as job:
        assert isinstance(job, RubyJob)  # the shell job does not match
    assert count(db) == 1


def test_core_table_yields_a_row(db: Engine) -> None:
    with db.begin() as conn:
        conn.execute(insert(core_jobs), [{"payload": "same"}, {"payload": "same"}])
    for _ in range(2):
        with queue_session(core_jobs, bind=db, timeout=1) as row:
            assert row is not None and row.payload == "same"
    with db.connect() as conn:
        assert conn.execute(select(func.count()).select_from(core_jobs)).scalar() == 0


# -- binds -----------------------------------------------------------------------------------


def test_connection_bind(db: Engine) -> None:
    enqueue(db, ShellJob(command="a"), ShellJob(command="b"))
    with db.connect() as conn:
        for expected in ("a", "b"):
            with queue_session(ShellJob, bind=conn, timeout=1) as job:
                assert job is not None and job.command == expected
        with queue_session(ShellJob, bind=conn, timeout=0.1) as job:
            assert job is None
        assert not conn.closed and not conn.in_transaction()
    assert count(db) == 0


def test_connection_bind_joins_the_callers_transaction(db: Engine) -> None:
    (job_id,) = enqueue(db, ShellJob(command="a"))
    with db.connect().execution_options(isolation_level="READ COMMITTED") as conn:
        with conn.begin():
            with queue_session(ShellJob, bind=conn, timeout=1) as job:
                assert job is not None
                conn.execute(insert(Note.__table__).values(id=1, text="done"))
            assert conn.in_transaction()  # not committed by the queue session
            assert claimable(db) == []  # the removal waits for the caller's commit
            assert count(db, Note) == 0
        assert count(db) == 0 and count(db, Note) == 1
        with conn.begin() as trans:
            (again,) = enqueue(db, ShellJob(command="b"))
            with queue_session(ShellJob, bind=conn, timeout=1):
                pass
            trans.rollback()  # the caller rolls back: the job stays
        assert claimable(db) == [again] and job_id != again


def test_session_bind_is_atomic(db: Engine) -> None:
    enqueue(db, ShellJob(command="a"), ShellJob(command="b"))
    with Session(db) as session:
        with queue_session(ShellJob, bind=session, timeout=1) as job:
            session.add(Note(id=1, text=job.command))
        assert count(db) == 1 and count(db, Note) == 1  # committed together
        with pytest.raises(ValueError), queue_session(ShellJob, bind=session, timeout=1) as job:
            session.add(Note(id=2, text=job.command))
            session.flush()
            raise ValueError
        assert count(db) == 1 and count(db, Note) == 1  # rolled back together
        with queue_session(ShellJob, bind=session, timeout=1) as job:
            session.add(Note(id=1, text="duplicate key"))
            if detect_backend(session.connection()) == "portable":
                # a failed flush rolls the session's transaction back, which would free the
                # job while the block runs: the rollback is stopped and the block fails instead
                with pytest.raises(OwnershipReleased) as failed:
                    session.flush()
                assert isinstance(failed.value.__context__, IntegrityError)
            else:
                # Q4M: the job is owned on a pinned connection of its own, which the
                # session's rollback does not touch
                with pytest.raises(IntegrityError):
                    session.flush()
            raise QueueAbort
    assert count(db) == 1 and count(db, Note) == 1


def test_session_bind_write_failing_at_end_returns_the_job(db: Engine) -> None:
    enqueue(db, ShellJob(command="a"))
    with Session(db) as session:
        session.add(Note(id=1, text="x"))
        session.commit()
        with pytest.raises(IntegrityError), queue_session(ShellJob, bind=session, timeout=1):
            session.add(Note(id=1, text="duplicate key"))  # flushed by end(): fails there
        session.rollback()
    assert count(db) == 1 and count(db, Note) == 1
    assert len(claimable(db)) == 1


def test_queue_sessionmaker(db: Engine) -> None:
    QS = queue_sessionmaker(db, timeout=1, poll_interval=0.01)
    enqueue(db, ShellJob(command="made"))
    with QS(ShellJob) as job:
        assert job is not None and job.command == "made"
    started = time.monotonic()
    with QS(ShellJob, timeout=0.1) as job:
        assert job is None
    assert time.monotonic() - started < 0.5
    assert isinstance(QS(RubyJob), QueueSession)


def test_explicit_api(db: Engine) -> None:
    (job_id,) = enqueue(db, ShellJob(command="a"))
    qs = queue_session(ShellJob, bind=db, timeout=1)
    job = qs.wait()
    assert job is not None and qs.job is job and qs.owning
    # InnoDB: the row lock is the claim's transaction; Q4M owns it outside any (autocommit)
    assert qs.connection.in_transaction() == (
        qs.backend is not None and qs.backend.name == "portable"
    )
    assert qs.session.get(ShellJob, job_id) is job
    qs.abort()
    with pytest.raises(NotOwner):
        qs.end()
    with pytest.raises(Q4MError):
        qs.wait()
    qs2 = queue_session(ShellJob, bind=db, timeout=1)
    assert qs2.wait() is not None
    qs2.end()
    qs2.close()
    assert count(db) == 0


# -- the pool never holds an owning connection -----------------------------------------------


def test_pool_never_receives_an_owning_connection(watched: tuple[Engine, list[str]]) -> None:
    eng, problems = watched
    enqueue(eng, *(ShellJob(command=str(i)) for i in range(4)))
    returned: list[Any] = []
    qs = queue_session(ShellJob, bind=eng, timeout=1)
    with qs as job:
        assert job is not None
        pinned = qs.connection.connection.dbapi_connection
        event.listen(eng, "checkin", lambda dbapi_conn, record: returned.append(dbapi_conn))
        with Session(eng) as other:  # the pool is used meanwhile, by others
            assert other.scalar(select(func.count()).select_from(ShellJob)) == 4
        assert pinned not in returned
    # back in the pool, or kept for the engine's next queue session (idle, owning nothing;
    # it reaches the pool at dispose() at the latest, below)
    assert pinned in returned or pinned in kept_dbapi_connections(eng)
    with pytest.raises(RuntimeError), queue_session(ShellJob, bind=eng, timeout=1):
        raise RuntimeError
    with queue_session(ShellJob, bind=eng, timeout=1):
        raise QueueAbort
    with queue_session(ShellJob, bind=eng, timeout=1, where=ShellJob.priority > 1) as job:
        assert job is None
    for _ in range(3):
        with queue_session(ShellJob, bind=eng, timeout=1) as job:
            assert job is not None
    eng.dispose()  # the kept connections go back to the pool (the watch sees them too)
    assert pinned in returned
    assert problems == []
    assert count(eng) == 0


def kept_dbapi_connections(eng: Engine) -> list[Any]:
    """The DBAPI connections the library keeps for ``eng``'s next queue sessions."""
    from sqlalchemy_q4m.backends.pinned import kept_connections

    return [conn.connection.dbapi_connection for conn in kept_connections(eng)]


def test_a_forked_child_keeps_no_connection_of_its_parent(db: Engine) -> None:
    """The kept connections are per process (looked up by a process id the library keeps, not
    asked of the kernel per job): a child forked while its parent keeps one takes a
    connection of its own, never the parent's socket, and the parent's is still kept."""
    enqueue(db, ShellJob(command="parent"), ShellJob(command="child"))
    with queue_session(ShellJob, bind=db, timeout=1) as job:
        assert job is not None
    parent_kept = kept_dbapi_connections(db)
    assert len(parent_kept) == 1
    read, write = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: fork with threads running
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        code = 1
        try:
            before = kept_dbapi_connections(db)
            db.pool = db.pool.recreate()  # the parent's pooled sockets are not the child's
            with queue_session(ShellJob, bind=db, timeout=1) as job:
                got = job is not None and job.command == "child"
            after = kept_dbapi_connections(db)
            ok = before == [] and got and len(after) == 1 and after[0] not in parent_kept
            os.write(write, b"ok" if ok else f"{before} {got} {after}".encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        report = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and report == b"ok", report
    assert kept_dbapi_connections(db) == parent_kept


def test_the_pool_watch_sees_a_connection_that_owns_a_row(
    watched: tuple[Engine, list[str]],
) -> None:
    """The watch above is not blind: a raw connection handed back right after claiming a row
    (no COMMIT/ROLLBACK of its own) is reported, however recently the server was asked."""
    eng, problems = watched
    enqueue(eng, ShellJob(command="held"))
    raw = eng.raw_connection()
    cur = raw.cursor()
    cur.execute(f"SELECT id FROM {ShellJob.__tablename__} LIMIT 1 FOR UPDATE SKIP LOCKED")
    assert len(cur.fetchall()) == 1
    cur.close()
    raw.close()  # checked in: the "reset" listener runs before the pool's own rollback
    assert problems == ["connection returned to the pool inside an open transaction"]
    problems.clear()
    assert claimable(eng) != []  # and the pool's rollback did return the row


def test_killed_owner_connection_returns_the_job(watched: tuple[Engine, list[str]]) -> None:
    eng, problems = watched
    (job_id,) = enqueue(eng, ShellJob(command="doomed"))
    qs = queue_session(ShellJob, bind=eng, timeout=1)
    with pytest.raises(ConnectionLost), qs as job:
        assert job is not None
        owner = qs.connection.execute(text("SELECT CONNECTION_ID()")).scalar_one()
        with eng.connect() as killer:
            killer.execute(text(f"KILL {int(owner)}"))
    assert claimable(eng) == [job_id]  # the server rolled back: the job is back
    with queue_session(ShellJob, bind=eng, timeout=1) as job:
        assert job is not None and job.id == job_id
    assert problems == []


def test_a_connection_lost_before_the_claim_raises_connection_lost(db: Engine) -> None:
    """The claim's statement finds its connection killed: ConnectionLost naming the step,
    the connection invalidated, the job still there for the next consumer."""
    (job_id,) = enqueue(db, ShellJob(command="x"))
    with db.connect() as conn:
        conn = conn.execution_options(isolation_level="READ COMMITTED")  # no SET TRANSACTION
        own = conn.execute(text("SELECT CONNECTION_ID()")).scalar_one()
        conn.commit()
        with db.connect() as killer:
            killer.execute(text(f"KILL {int(own)}"))
        qs = queue_session(ShellJob, bind=conn, timeout=0)
        with pytest.raises(ConnectionLost, match=r"^claiming a job: connection lost"), qs:
            pytest.fail("the block must not run")  # pragma: no cover
        assert conn.invalidated
    assert claimable(db) == [job_id]


# -- lock waits and deadlocks ------------------------------------------------------------------


@pytest.fixture
def short_waits(db: Engine, db_url: URL) -> Iterator[Engine]:
    """An engine whose connections give up lock waits after one second."""
    eng = create_engine(db_url, pool_size=2, max_overflow=0)

    @event.listens_for(eng, "connect")
    def _short(dbapi_conn: Any, record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("SET SESSION lock_wait_timeout = 1, innodb_lock_wait_timeout = 1")
        cur.close()

    yield eng
    eng.dispose()


def test_lock_wait_timeout_while_claiming_is_retried(short_waits: Engine, db: Engine) -> None:
    """A real 1205: another client holds the table locked for 2.2 s, two lock waits long."""
    (job_id,) = enqueue(db, ShellJob(command="a"))
    errors: list[int] = []
    event.listen(
        short_waits, "handle_error", lambda ctx: errors.append(ctx.original_exception.args[0])
    )
    with db.connect() as locker:
        locker.exec_driver_sql("LOCK TABLES ss_shell_jobs WRITE")
        timer = threading.Timer(2.2, locker.exec_driver_sql, ("UNLOCK TABLES",))
        timer.start()
        try:
            with queue_session(ShellJob, bind=short_waits, timeout=5) as job:
                assert job is not None and job.id == job_id
        finally:
            timer.join()
    assert 1205 in errors
    assert count(db) == 0


def test_lock_wait_timeout_at_completion_returns_the_job(short_waits: Engine, db: Engine) -> None:
    """A real 1205 while the block's writes are flushed: the whole transaction is rolled back
    and the job goes back to the queue (it runs again; it is neither lost nor doubled)."""
    (job_id,) = enqueue(db, ShellJob(command="a"), Note(id=1, text="old"))[:1]
    with db.connect() as locker:
        locker.execute(text("UPDATE ss_notes SET text = 'locked' WHERE id = 1"))
        qs = queue_session(ShellJob, bind=short_waits, timeout=1)
        with pytest.raises(CompletionFailed, match="1205"), qs:
            qs.session.get(Note, 1).text = "new"  # type: ignore[union-attr]
        locker.rollback()
    assert claimable(db) == [job_id]
    with Session(db) as s:
        assert s.get(Note, 1).text == "old"  # type: ignore[union-attr]


@pytest.mark.parametrize("code", [1213, 1205])
def test_deadlock_while_claiming_is_retried(short_waits: Engine, db: Engine, code: int) -> None:
    """The server chose this claim as a deadlock victim (or a wait timed out): try again."""
    (job_id,) = enqueue(db, ShellJob(command="a"))
    failures = [code]

    @event.listens_for(short_waits, "before_cursor_execute")
    def _fail_once(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "SKIP LOCKED" in statement and failures:
            raise pymysql.err.OperationalError(failures.pop(), "Deadlock found (test)")

    with queue_session(ShellJob, bind=short_waits, timeout=1) as job:
        assert job is not None and job.id == job_id
    assert failures == [] and count(db) == 0


def test_lock_wait_timeout_on_delete_is_retried(short_waits: Engine, db: Engine) -> None:
    """A 1205 undoes only the DELETE statement; the row lock is still ours, so it is retried."""
    enqueue(db, ShellJob(command="a"))
    failures = [1205, 1205]
    deletes: list[str] = []

    @event.listens_for(short_waits, "before_cursor_execute")
    def _fail_twice(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.startswith("DELETE"):
            deletes.append(statement)
            if failures:
                raise pymysql.err.OperationalError(failures.pop(), "Lock wait timeout (test)")

    with queue_session(ShellJob, bind=short_waits, timeout=1) as job:
        assert job is not None
    assert len(deletes) == 3 and count(db) == 0


# -- servers that cannot run the portable backend (no server needed) ---------------------------


@pytest.mark.unit
@pytest.mark.parametrize(
    ("url", "version", "ok"),
    [
        ("mariadb+pymysql://", (10, 5, 25), False),
        ("mariadb+pymysql://", (10, 6, 0), True),
        ("mariadb+pymysql://", (11, 4, 2), True),
        ("mysql+pymysql://", (5, 7, 44), False),
        ("mysql+pymysql://", (8, 0, 0), False),
        ("mysql+pymysql://", (8, 0, 1), True),
        ("mysql+pymysql://", (8, 4, 0), True),
    ],
)
def test_old_servers_get_a_clear_error(url: str, version: tuple[int, ...], ok: bool) -> None:
    dialect = create_engine(url).dialect
    dialect.server_version_info = version
    dialect.is_mariadb = url.startswith("mariadb")
    check_server(dialect, "native")  # Q4M itself needs no SKIP LOCKED
    if ok:
        check_server(dialect, "portable")
    else:
        with pytest.raises(UnsupportedServer, match="SKIP LOCKED"):
            check_server(dialect, "portable")


@pytest.mark.unit
def test_other_databases_are_refused() -> None:
    with pytest.raises(UnsupportedServer, match="sqlite"):
        check_server(create_engine("sqlite://").dialect, "portable")
