"""The native backend's call sequence, checked without a server.

The real :func:`queue_session` runs through SQLAlchemy's ``mysql+pymysql`` dialect against
:mod:`fake_q4m`, a DBAPI double that answers as q4m.md's "Observed answers" say.  The tests
assert the exact statements: ``queue_wait`` → load the owned row → ``queue_end``/``queue_abort``,
``queue_end`` at once after a timeout, NULL → :class:`QueueWaitError`, never ``queue_wait``
while owning, and no owning connection ever handed back to the pool.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fake_q4m import FakeConnection
from fake_q4m import FakeQ4M
from fake_q4m import OperationalError
from sqlalchemy import Column
from sqlalchemy import Engine
from sqlalchemy import Integer
from sqlalchemy import MetaData
from sqlalchemy import String
from sqlalchemy import Text
from sqlalchemy import create_engine
from sqlalchemy import event
from sqlalchemy import exc
from sqlalchemy import insert
from sqlalchemy import select
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
from sqlalchemy_q4m.exc import ConnectionLost
from sqlalchemy_q4m.exc import NotOwner
from sqlalchemy_q4m.exc import Q4MError
from sqlalchemy_q4m.exc import QueueWaitError
from sqlalchemy_q4m.exc import SubscriptionError
from sqlalchemy_q4m.exc import UnsupportedServer

pytestmark = pytest.mark.unit

QUEUE_KINDS = ("wait", "select", "end", "abort")


class Base(DeclarativeBase):
    pass


class ShellJob(QueueMixin, Base):
    __tablename__ = "fq_shell_jobs"
    command: Mapped[str] = mapped_column(Text)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    label: Mapped[str] = mapped_column(String(20), default="")


class RubyJob(QueueMixin, Base):
    __tablename__ = "fq_ruby_jobs"
    script: Mapped[str] = mapped_column(Text)


class Note(Base):
    """A plain table the block writes to (to check the order of commit and queue_end)."""

    __tablename__ = "fq_notes"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    text: Mapped[str] = mapped_column(Text)


core_md = MetaData()
core_jobs = queue_table("fq_core_jobs", core_md, Column("payload", Text))


def fake_engine(fake: FakeQ4M, **kw: Any) -> Engine:
    return create_engine("mysql+pymysql://fake@localhost/test", module=fake, **kw)


@pytest.fixture
def fake() -> FakeQ4M:
    return FakeQ4M()


@pytest.fixture
def checkins() -> list[str]:
    """What the pool got back in owner mode (must stay empty)."""
    return []


@pytest.fixture
def engine(fake: FakeQ4M, checkins: list[str]) -> Iterator[Engine]:
    eng = fake_engine(fake)

    @event.listens_for(eng, "reset")
    def _reset(dbapi_conn: FakeConnection, record: Any, state: Any) -> None:
        if dbapi_conn.owner_mode:
            checkins.append(f"connection {dbapi_conn.id} returned to the pool in owner mode")

    @event.listens_for(eng, "checkin")
    def _checkin(dbapi_conn: FakeConnection | None, record: Any) -> None:
        if dbapi_conn is not None and dbapi_conn.owner_mode:
            checkins.append(f"connection {dbapi_conn.id} checked in in owner mode")

    Base.metadata.create_all(eng)
    core_md.create_all(eng)
    yield eng
    eng.dispose()


def enqueue(engine: Engine, *jobs: Any) -> None:
    with Session(engine) as s:
        s.add_all(jobs)
        s.commit()


def waiter_trace(fake: FakeQ4M) -> list[str]:
    """The queue statements of the last queue session: from the last ``queue_wait`` on."""
    last_wait = next(e for e in reversed(fake.log) if e.kind == "wait")
    trace = fake.trace(last_wait.conn, QUEUE_KINDS)
    start = len(trace) - 1 - trace[::-1].index(last_wait.text)
    return trace[start:]


def assert_clean(fake: FakeQ4M, checkins: list[str]) -> None:
    assert fake.violations == []
    assert checkins == []
    assert not any(c.owner_mode for c in fake.connections.values() if not c.closed)


# -- the fake itself answers as the spec's table says -----------------------------------------


def _sql(conn: FakeConnection, statement: str, *params: Any) -> Any:
    cur = conn.cursor()
    cur.execute(statement, params)
    return cur.fetchall()


def test_fake_answers_as_observed() -> None:
    fake = FakeQ4M()
    fake.add_table("t", {"id": "INT", "pri": "INT", "name": "VARCHAR(10)"})
    fake.add_table("t2", {"id": "INT"})
    fake.add_table("inno", {"id": "INT"}, queue=False)
    a, b = fake.connect(), fake.connect()
    with pytest.raises(OperationalError) as err:
        _sql(a, "SELECT queue_abort() AS q")
    assert err.value.args[0] == 1123 and "not in owner mode" in err.value.args[1]
    with pytest.raises(OperationalError) as err:
        _sql(a, "SELECT * FROM t WHERE queue_wait('t')")
    assert err.value.args[0] == 1123
    for spec in ("missing", "inno", "t:pri>", "t:name>1"):
        assert _sql(a, "SELECT queue_wait(%s, %s) AS q", spec, 0) == [(None,)]
        _sql(a, "SELECT queue_end() AS q")
    assert _sql(a, "SELECT queue_wait(%s, %s, %s) AS q", "t", "t2", 0) == [(0,)]
    _sql(a, "SELECT queue_end() AS q")
    fake.put("t2", id=9)
    assert _sql(a, "SELECT queue_wait(%s, %s, %s) AS q", "t", "t2", 0) == [(2,)]
    _sql(a, "SELECT queue_abort() AS q")
    fake.put("t", id=1, pri=1)
    fake.put("t", id=2, pri=7)
    assert _sql(a, "SELECT queue_wait(%s, %s) AS q", "t:pri>100", 0) == [(0,)]
    _sql(a, "SELECT queue_end() AS q")
    assert _sql(a, "SELECT queue_wait(%s, %s) AS q", "t:pri>=5", 0) == [(1,)]
    assert _sql(a, "SELECT t.id FROM t") == [(2,)]  # the owner sees its row only
    assert _sql(a, "SELECT count(*) AS n FROM t") == [(1,)]
    assert _sql(a, "SELECT t2.id FROM t2") == []  # other queue tables look empty
    assert _sql(b, "SELECT t.id FROM t") == [(1,)]  # others do not see owned rows
    assert _sql(b, "SELECT count(*) AS n FROM t") == [(2,)]  # but count them
    assert _sql(a, "SELECT queue_wait(%s) AS q", "t") == [(1,)]  # ends row 2, owns row 1
    assert fake.violations and "silently ended" in fake.violations[0]
    assert [r["id"] for r in fake.rows("t")] == [1]
    a.close()  # a dead owner returns its row
    assert fake.owner_of("t") == [None]
    b.rollback()
    with pytest.raises(OperationalError) as err:
        _sql(b, "CREATE TABLE k (id INT PRIMARY KEY) ENGINE=QUEUE")
    assert err.value.args[0] == 1069
    with pytest.raises(OperationalError) as err:
        _sql(b, "CREATE TABLE k (id INT AUTO_INCREMENT) ENGINE=QUEUE")
    assert err.value.args[0] == 1164


# -- DDL and detection -----------------------------------------------------------------------


def test_create_all_on_q4m_is_accepted_by_the_engine(fake: FakeQ4M, engine: Engine) -> None:
    """The fake refuses keys and AUTO_INCREMENT as Q4M does, so this proves the layout."""
    ddl = [t for t in fake.trace(kinds=("other",)) if t.startswith("CREATE TABLE fq_shell")]
    assert len(ddl) == 1
    assert ddl[0].endswith("ENGINE=QUEUE")
    assert "KEY" not in ddl[0] and "AUTO_INCREMENT" not in ddl[0]
    assert fake.tables["fq_shell_jobs"].queue
    with engine.connect() as conn:
        assert detect_backend(conn) == "native"


# -- the call sequence -----------------------------------------------------------------------


def test_end_sequence(fake: FakeQ4M, engine: Engine, checkins: list[str]) -> None:
    enqueue(engine, ShellJob(command="echo hi"))
    with queue_session(ShellJob, bind=engine, timeout=5) as job:
        assert job is not None and job.command == "echo hi"
        assert fake.owner_of("fq_shell_jobs") == [fake.waiters()[-1]]
    assert waiter_trace(fake) == [
        "queue_wait('fq_shell_jobs', 5)",
        "SELECT fq_shell_jobs",
        "queue_end()",
    ]
    assert fake.rows("fq_shell_jobs") == []
    assert_clean(fake, checkins)


def test_exception_aborts_and_reraises(fake: FakeQ4M, engine: Engine, checkins: list[str]) -> None:
    enqueue(engine, ShellJob(command="boom"))
    with pytest.raises(RuntimeError, match="boom"), queue_session(ShellJob, bind=engine) as job:
        assert job is not None
        raise RuntimeError(job.command)
    assert waiter_trace(fake) == [
        "queue_wait('fq_shell_jobs', 60)",
        "SELECT fq_shell_jobs",
        "queue_abort()",
    ]
    assert fake.owner_of("fq_shell_jobs") == [None]  # back in the queue, owned by nobody
    assert_clean(fake, checkins)


def test_queue_abort_is_swallowed(fake: FakeQ4M, engine: Engine, checkins: list[str]) -> None:
    enqueue(engine, ShellJob(command="later"))
    with queue_session(ShellJob, bind=engine, timeout=3) as job:
        assert job is not None
        raise QueueAbort
    assert waiter_trace(fake)[-1] == "queue_abort()"
    assert [r["command"] for r in fake.rows("fq_shell_jobs")] == ["later"]
    assert fake.owner_of("fq_shell_jobs") == [None]
    assert_clean(fake, checkins)


def test_timeout_leaves_owner_mode_at_once(
    fake: FakeQ4M, engine: Engine, checkins: list[str]
) -> None:
    started = time.monotonic()
    with queue_session(ShellJob, bind=engine, timeout=1) as job:
        assert job is None
    elapsed = time.monotonic() - started
    assert 0.9 <= elapsed < 2.0
    assert waiter_trace(fake) == ["queue_wait('fq_shell_jobs', 1)", "queue_end()"]
    assert_clean(fake, checkins)


def test_fractional_timeout_is_rounded_up_to_whole_seconds(fake: FakeQ4M, engine: Engine) -> None:
    with queue_session(ShellJob, bind=engine, timeout=0.2) as job:
        assert job is None
    assert waiter_trace(fake)[0] == "queue_wait('fq_shell_jobs', 1)"


def test_null_from_queue_wait_is_a_clear_error(
    fake: FakeQ4M, engine: Engine, checkins: list[str]
) -> None:
    fake.tables["fq_ruby_jobs"].queue = False  # e.g. created as InnoDB by mistake
    with pytest.raises(QueueWaitError, match=r"fq_ruby_jobs.*returned NULL"):
        queue_session(RubyJob, bind=engine, timeout=1).wait()
    trace = waiter_trace(fake)
    assert trace[0] == "queue_wait('fq_ruby_jobs', 1)"
    assert "queue_wait" not in " ".join(trace[1:])
    assert_clean(fake, checkins)


def test_condition_on_a_string_column_never_reaches_the_server(
    fake: FakeQ4M, engine: Engine
) -> None:
    with pytest.raises(Q4MError, match="label"):
        queue_session(ShellJob, bind=engine, where=ShellJob.label == "x")
    assert fake.waiters() == []


def test_where_is_sent_as_a_q4m_condition(
    fake: FakeQ4M, engine: Engine, checkins: list[str]
) -> None:
    enqueue(engine, ShellJob(command="low", priority=1), ShellJob(command="high", priority=9))
    where = (ShellJob.priority >= 5) & (ShellJob.priority != 7)
    with queue_session(ShellJob, bind=engine, where=where, timeout=2) as job:
        assert job is not None and job.command == "high"
    assert waiter_trace(fake)[0] == (
        "queue_wait('fq_shell_jobs:((`priority` >= 5) AND (`priority` != 7))', 2)"
    )
    with queue_session(ShellJob, bind=engine, where=ShellJob.priority > 5, timeout=1) as job:
        assert job is None
    assert [r["command"] for r in fake.rows("fq_shell_jobs")] == ["low"]
    assert_clean(fake, checkins)


def test_where_floor_division_owns_what_mariadb_would(
    fake: FakeQ4M, engine: Engine, checkins: list[str]
) -> None:
    """``//`` is FLOOR(a / b) on the portable backend; on Q4M it is sent as lower-case ``div``
    (which truncates) with the rounding fixed, so -7 // 2 is -4 on both."""
    for priority in (-7, -6, -5, 5):
        enqueue(engine, ShellJob(command=str(priority), priority=priority))
    owned = []
    for _ in range(4):
        with queue_session(
            ShellJob, bind=engine, where=ShellJob.priority // 2 == -3, timeout=0
        ) as job:
            if job is None:
                break
            owned.append(job.command)
    assert owned == ["-6", "-5"]
    assert " div 2" in waiter_trace(fake)[0] and "DIV" not in waiter_trace(fake)[0]
    assert_clean(fake, checkins)


def test_prefix_shadowed_condition_never_reaches_the_server(fake: FakeQ4M) -> None:
    md = MetaData()
    table = queue_table("fq_prefixed", md, Column("nx", Integer), Column("n", Integer))
    eng = fake_engine(fake)
    md.create_all(eng)
    fake.put("fq_prefixed", nx=7, n=1)
    with pytest.raises(SubscriptionError, match="'n' reads 'nx'"):
        queue_session(table, bind=eng, where=table.c.n >= 5, timeout=0)
    assert fake.waiters() == [] and fake.owner_of("fq_prefixed") == [None]
    # what the engine (and now the double) would have done with the condition
    conn = fake.connect()
    cur = conn.cursor()
    cur.execute("SELECT queue_wait(%s, %s)", ("fq_prefixed:`n` >= 5", 0))
    assert cur.fetchall() == [(1,)]
    conn.close()
    eng.dispose()


def test_several_models_earlier_wins(fake: FakeQ4M, engine: Engine, checkins: list[str]) -> None:
    enqueue(engine, RubyJob(script="puts 1"))
    enqueue(engine, ShellJob(command="ls"))
    with queue_session(ShellJob, RubyJob, bind=engine, timeout=2) as job:
        assert isinstance(job, ShellJob)
    with queue_session(ShellJob, RubyJob, bind=engine, timeout=2) as job:
        assert isinstance(job, RubyJob) and job.script == "puts 1"
    assert waiter_trace(fake) == [
        "queue_wait('fq_shell_jobs', 'fq_ruby_jobs', 2)",
        "SELECT fq_ruby_jobs",
        "queue_end()",
    ]
    assert_clean(fake, checkins)


def test_bulk_enqueue_of_equal_payloads(fake: FakeQ4M, engine: Engine) -> None:
    with Session(engine) as s:
        s.execute(insert(ShellJob), [{"command": "same"} for _ in range(1000)])
        s.commit()
    rows = fake.rows("fq_shell_jobs")
    assert len(rows) == 1000 and len({r["id"] for r in rows}) == 1000


def test_core_table_yields_a_row(fake: FakeQ4M, engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(insert(core_jobs), [{"payload": "a"}, {"payload": "a"}])
    with queue_session(core_jobs, bind=engine, timeout=1) as row:
        assert row is not None and row.payload == "a"
    assert len(fake.rows("fq_core_jobs")) == 1  # equal payloads are two jobs


def test_never_waits_while_owning_on_a_reused_connection(
    fake: FakeQ4M, engine: Engine, checkins: list[str]
) -> None:
    enqueue(engine, ShellJob(command="1"), ShellJob(command="2"), ShellJob(command="3"))
    with engine.connect() as conn:
        with queue_session(ShellJob, bind=conn, timeout=1) as job:
            assert job is not None
        with queue_session(ShellJob, bind=conn, timeout=1) as job:
            raise QueueAbort
        for _ in range(2):
            with queue_session(ShellJob, bind=conn, timeout=1) as job:
                assert job is not None
        with queue_session(ShellJob, bind=conn, timeout=1) as job:
            assert job is None
        with queue_session(ShellJob, bind=conn, timeout=1) as job:
            assert job is None
    trace = fake.trace(fake.waiters()[0], QUEUE_KINDS)
    waits = [i for i, t in enumerate(trace) if t.startswith("queue_wait")]
    assert len(waits) == 6
    for i in waits[1:]:  # each wait follows a queue_end()/queue_abort()
        assert trace[i - 1] in ("queue_end()", "queue_abort()")
    assert fake.rows("fq_shell_jobs") == []
    assert_clean(fake, checkins)


def test_lost_connection_at_end_is_never_pooled(
    fake: FakeQ4M, engine: Engine, checkins: list[str]
) -> None:
    enqueue(engine, ShellJob(command="fragile"))
    fake.fail_next("end", OperationalError(2013, "Lost connection to MySQL server during query"))
    with pytest.raises(ConnectionLost), queue_session(ShellJob, bind=engine, timeout=1) as job:
        assert job is not None
    owner = fake.waiters()[-1]
    assert fake.connections[owner].closed  # invalidated, not handed back
    assert fake.owner_of("fq_shell_jobs") == [None]  # so the server returned the row
    with queue_session(ShellJob, bind=engine, timeout=1) as job:
        assert job is not None and job.command == "fragile"
    assert_clean(fake, checkins)


def test_failing_abort_closes_the_connection(
    fake: FakeQ4M, engine: Engine, checkins: list[str]
) -> None:
    enqueue(engine, ShellJob(command="x"))
    fake.fail_next("abort", OperationalError(1205, "Lock wait timeout exceeded"))
    with pytest.raises(RuntimeError) as err, queue_session(ShellJob, bind=engine, timeout=1):
        raise RuntimeError("job failed")
    assert any("returning the job failed" in note for note in err.value.__notes__)
    assert fake.connections[fake.waiters()[-1]].closed
    assert fake.owner_of("fq_shell_jobs") == [None]
    assert_clean(fake, checkins)


@pytest.mark.parametrize(("code", "raised"), [(2013, ConnectionLost), (1205, exc.OperationalError)])
def test_an_error_in_queue_wait(
    fake: FakeQ4M, engine: Engine, checkins: list[str], code: int, raised: type[Exception]
) -> None:
    """A lost connection becomes ConnectionLost naming the step; any other error is raised as
    SQLAlchemy's, unchanged.  Either way the job stays in the queue."""
    enqueue(engine, ShellJob(command="x"))
    fake.fail_next("wait", OperationalError(code, "Lost connection or lock wait"))
    qs = queue_session(ShellJob, bind=engine, timeout=1)
    with pytest.raises(raised) as err, qs:
        pytest.fail("the block must not run")  # pragma: no cover
    if raised is ConnectionLost:
        assert str(err.value).startswith("queue_wait: connection lost")
    else:
        assert err.value.orig.args[0] == code  # type: ignore[attr-defined]
    assert fake.owner_of("fq_shell_jobs") == [None]
    with queue_session(ShellJob, bind=engine, timeout=1) as job:  # the job is there still
        assert job is not None and job.command == "x"
    assert_clean(fake, checkins)


def test_lost_connection_while_loading(fake: FakeQ4M, engine: Engine, checkins: list[str]) -> None:
    enqueue(engine, ShellJob(command="x"))
    fake.fail_next("select", OperationalError(2006, "MySQL server has gone away"))
    with pytest.raises(ConnectionLost), queue_session(ShellJob, bind=engine, timeout=1):
        pytest.fail("the block must not run")  # pragma: no cover
    assert fake.owner_of("fq_shell_jobs") == [None]
    assert_clean(fake, checkins)


def test_explicit_wait_end_abort(fake: FakeQ4M, engine: Engine, checkins: list[str]) -> None:
    enqueue(engine, ShellJob(command="a"))
    qs = queue_session(ShellJob, bind=engine, timeout=1)
    job = qs.wait()
    assert job is not None and qs.job is job and qs.owning
    assert qs.subscription is not None and qs.subscription.table is ShellJob.__table__
    qs.end()
    assert not qs.owning
    with pytest.raises(NotOwner):
        qs.end()
    with pytest.raises(NotOwner):
        qs.abort()
    with pytest.raises(Q4MError, match="waits once"):
        qs.wait()
    qs.close()
    timed_out = queue_session(ShellJob, bind=engine, timeout=1)
    assert timed_out.wait() is None
    with pytest.raises(NotOwner):
        timed_out.abort()
    assert fake.trace(kinds=("abort",)) == []  # NotOwner is raised before any queue_abort()
    assert_clean(fake, checkins)


def test_close_aborts_an_owned_job(fake: FakeQ4M, engine: Engine, checkins: list[str]) -> None:
    enqueue(engine, ShellJob(command="a"))
    qs = queue_session(ShellJob, bind=engine, timeout=1)
    assert qs.wait() is not None
    qs.close()
    qs.close()
    assert waiter_trace(fake)[-1] == "queue_abort()"
    assert fake.owner_of("fq_shell_jobs") == [None]
    assert_clean(fake, checkins)


def test_queue_sessionmaker(fake: FakeQ4M, engine: Engine, checkins: list[str]) -> None:
    QS = queue_sessionmaker(engine, timeout=2)
    enqueue(engine, ShellJob(command="made"))
    with QS(ShellJob) as job:
        assert job is not None and job.command == "made"
    with QS(ShellJob, timeout=1) as job:
        assert job is None
    assert fake.trace(kinds=("wait",)) == [
        "queue_wait('fq_shell_jobs', 2)",
        "queue_wait('fq_shell_jobs', 1)",
    ]
    assert isinstance(QS(ShellJob), QueueSession)
    assert_clean(fake, checkins)


def test_unbounded_wait_is_woken_by_an_insert(fake: FakeQ4M, engine: Engine) -> None:
    timer = threading.Timer(
        0.3, fake.put, ("fq_shell_jobs",), {"id": b"\x01" * 16, "command": "late"}
    )
    timer.start()
    try:
        started = time.monotonic()
        with queue_session(ShellJob, bind=engine, timeout=None) as job:
            assert job is not None and job.command == "late"
        assert time.monotonic() - started < 5
    finally:
        timer.cancel()
    assert waiter_trace(fake)[0] == "queue_wait('fq_shell_jobs', 60)"


def test_session_bind_commits_before_queue_end(
    fake: FakeQ4M, engine: Engine, checkins: list[str]
) -> None:
    enqueue(engine, ShellJob(command="a"), ShellJob(command="b"))
    with Session(engine) as session:
        with queue_session(ShellJob, bind=session, timeout=1) as job:
            assert job is not None
            session.add(Note(id=1, text=job.command))
        log = [(e.conn, e.text) for e in fake.log]
        pinned = fake.waiters()[-1]
        insert_at = log.index(
            (next(c for c, t in log if t == "INSERT fq_notes"), "INSERT fq_notes")
        )
        user = log[insert_at][0]
        assert user != pinned  # Q4M has no transactions: the job is owned on its own connection
        commit_at = log.index((user, "COMMIT"), insert_at)
        assert commit_at < log.index((pinned, "queue_end()"))
        with pytest.raises(ValueError), queue_session(ShellJob, bind=session, timeout=1):
            session.add(Note(id=2, text="never"))
            raise ValueError
        log = [(e.conn, e.text) for e in fake.log]
        aborted = log.index((fake.waiters()[-1], "queue_abort()"))
        assert any(t == "ROLLBACK" for c, t in log[commit_at + 1 : aborted] if c == user)
    assert [r["text"] for r in fake.rows("fq_notes")] == ["a"]
    assert_clean(fake, checkins)


def test_waiting_on_two_queues_in_threads(
    fake: FakeQ4M, engine: Engine, checkins: list[str]
) -> None:
    """Concurrent consumers each own a different row; every job is taken once."""
    enqueue(engine, *(ShellJob(command=str(i)) for i in range(40)))
    taken: list[str] = []
    lock = threading.Lock()

    def consume() -> None:
        while True:
            with queue_session(ShellJob, RubyJob, bind=engine, timeout=1) as job:
                if job is None:
                    return
                with lock:
                    taken.append(job.command)

    threads = [threading.Thread(target=consume) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(taken, key=int) == [str(i) for i in range(40)]
    assert fake.rows("fq_shell_jobs") == []
    assert_clean(fake, checkins)


# -- servers that cannot run a backend -------------------------------------------------------


@pytest.mark.parametrize("version", ["10.5.21-MariaDB", "5.7.44"])
def test_old_server_without_skip_locked_or_q4m(version: str) -> None:
    fake = FakeQ4M(version=version, queue_engine=False)
    eng = fake_engine(fake)
    try:
        with pytest.raises(UnsupportedServer, match="SKIP LOCKED"):
            queue_session(ShellJob, bind=eng, timeout=1).wait()
        with pytest.raises(UnsupportedServer):
            queue_session(ShellJob, bind=eng, timeout=1, backend="portable").wait()
        assert fake.waiters() == []
    finally:
        eng.dispose()


def test_old_server_with_q4m_runs_native() -> None:
    fake = FakeQ4M(version="5.7.44", queue_engine=True)
    eng = fake_engine(fake)
    try:
        Base.metadata.create_all(eng, tables=[ShellJob.__table__])
        enqueue(eng, ShellJob(command="old"))
        with queue_session(ShellJob, bind=eng, timeout=1) as job:
            assert job is not None and job.command == "old"
        assert fake.violations == []
    finally:
        eng.dispose()


def test_load_sees_the_owned_row_only(fake: FakeQ4M, engine: Engine) -> None:
    """The load is a plain SELECT of the table: correct only because the owner sees one row."""
    enqueue(engine, ShellJob(command="first"), ShellJob(command="second"))
    with queue_session(ShellJob, bind=engine, timeout=1) as job:
        assert job is not None and job.command == "first"
        with Session(engine) as other:
            visible = other.scalars(select(ShellJob.command)).all()
        assert visible == ["second"]
