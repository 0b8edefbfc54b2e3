"""The native backend against a real Q4M server (``ENGINE=QUEUE``).

These run only when ``Q4M_TEST_URL`` names a Q4M server (``docker compose up -d q4m`` gives one
at ``mysql+pymysql://root@127.0.0.1:13308/test``) and skip with that reason otherwise.  They
repeat the scenarios of ``test_native_sequence.py`` (checked there against a fake DBAPI) and of
``test_session.py`` / ``test_concurrency.py`` on the real engine.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from native_support import private_database
from sqlalchemy import Column
from sqlalchemy import Engine
from sqlalchemy import Index
from sqlalchemy import Integer
from sqlalchemy import MetaData
from sqlalchemy import Table
from sqlalchemy import Text
from sqlalchemy import create_engine
from sqlalchemy import event
from sqlalchemy import func
from sqlalchemy import insert
from sqlalchemy import inspect
from sqlalchemy import select
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.orm import Mapped
from sqlalchemy.orm import Session
from sqlalchemy.orm import mapped_column

from sqlalchemy_q4m import QueueAbort
from sqlalchemy_q4m import QueueMixin
from sqlalchemy_q4m import detect_backend
from sqlalchemy_q4m import queue_abort
from sqlalchemy_q4m import queue_session
from sqlalchemy_q4m import queue_table
from sqlalchemy_q4m.exc import QueueTableError
from sqlalchemy_q4m.exc import QueueWaitError

pytestmark = [pytest.mark.native, pytest.mark.integration]


class Base(DeclarativeBase):
    pass


class ShellJob(QueueMixin, Base):
    __tablename__ = "nq_shell_jobs"
    command: Mapped[str] = mapped_column(Text)
    priority: Mapped[int] = mapped_column(Integer, default=0)


class RubyJob(QueueMixin, Base):
    __tablename__ = "nq_ruby_jobs"
    script: Mapped[str] = mapped_column(Text)


class Note(Base):
    """A plain InnoDB table written by job blocks."""

    __tablename__ = "nq_notes"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    text: Mapped[str] = mapped_column(Text)


#: Declared as a queue table here, but created on the server as InnoDB: queue_wait says NULL.
not_a_queue = Table("nq_not_a_queue", MetaData(), Column("n", Integer), mysql_engine="QUEUE")

core_md = MetaData()
core_jobs = queue_table("nq_core_jobs", core_md, Column("n", Integer, nullable=False))


def owner_mode(dbapi_conn: Any) -> bool:
    """True when the raw connection is in Q4M owner mode (queue_rowid() is then no error)."""
    cur = dbapi_conn.cursor()
    try:
        cur.execute("SELECT queue_rowid()")
        cur.fetchall()
        return True
    except Exception:
        return False
    finally:
        cur.close()


@pytest.fixture(scope="module")
def db_url(q4m_url: URL) -> Iterator[URL]:
    """A database of this module's own on the Q4M server: the server is shared, and another
    run of these tests at the same time must not see (drop, clean, consume) these tables."""
    with private_database(q4m_url, "q4m_native_integration") as url:
        yield url


@pytest.fixture(scope="module")
def q4m(db_url: URL) -> Iterator[tuple[Engine, list[str]]]:
    """An engine on the Q4M server with this module's tables, and a list of the connections
    its pool got back in owner mode (must stay empty)."""
    problems: list[str] = []
    eng = create_engine(db_url, pool_size=10, max_overflow=10)

    @event.listens_for(eng, "reset")
    def _reset(dbapi_conn: Any, record: Any, state: Any) -> None:
        if owner_mode(dbapi_conn):
            problems.append("a connection went back to the pool in owner mode")

    def drop() -> None:
        Base.metadata.drop_all(eng)
        core_md.drop_all(eng)
        with eng.begin() as conn:
            conn.exec_driver_sql("DROP TABLE IF EXISTS nq_not_a_queue")

    drop()
    Base.metadata.create_all(eng)
    core_md.create_all(eng)
    with eng.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE nq_not_a_queue (n INT) ENGINE=InnoDB")
    try:
        yield eng, problems
    finally:
        drop()
        eng.dispose()


@pytest.fixture
def db(q4m: tuple[Engine, list[str]]) -> Iterator[Engine]:
    eng, problems = q4m

    def clean() -> None:
        with eng.begin() as conn:
            for table in (ShellJob.__table__, RubyJob.__table__, Note.__table__, core_jobs):
                conn.execute(table.delete())

    clean()
    yield eng
    assert problems == []
    clean()


def enqueue(engine: Engine, *jobs: Any) -> list[uuid.UUID]:
    with Session(engine, expire_on_commit=False) as s:
        s.add_all(jobs)
        s.commit()
        return [job.id for job in jobs]


def total(engine: Engine, model: Any = ShellJob) -> int:
    """Rows in the table, owned ones included (what a non-owner's COUNT(*) says)."""
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(model)).scalar_one())


# -- tables ----------------------------------------------------------------------------------


def test_tables_are_engine_queue_without_keys(db: Engine) -> None:
    with db.connect() as conn:
        assert detect_backend(conn) == "native"
        engines = dict(
            conn.execute(
                text(
                    "SELECT TABLE_NAME, ENGINE FROM information_schema.TABLES "
                    "WHERE TABLE_SCHEMA = DATABASE() "
                    "AND TABLE_NAME IN ('nq_shell_jobs', 'nq_core_jobs', 'nq_notes')"
                )
            ).all()
        )
    assert engines["nq_shell_jobs"].upper() == "QUEUE"
    assert engines["nq_core_jobs"].upper() == "QUEUE"
    assert engines["nq_notes"].upper() == "INNODB"
    assert inspect(db).get_pk_constraint("nq_shell_jobs")["constrained_columns"] == []
    assert inspect(db).get_indexes("nq_shell_jobs") == []


def test_rejected_declaration_never_reaches_the_server(db: Engine) -> None:
    md = MetaData()
    queue_table("nq_refused", md, Column("n", Integer), Index("ix_nq_refused", "n"))
    with pytest.raises(QueueTableError, match="nq_refused"):
        md.create_all(db)
    assert not inspect(db).has_table("nq_refused")


def test_bulk_insert_of_equal_payloads(db: Engine) -> None:
    with Session(db) as s:
        s.execute(insert(ShellJob), [{"command": "same"} for _ in range(10_000)])
        s.commit()
    with db.connect() as conn:
        count, distinct = conn.execute(
            select(func.count(), func.count(ShellJob.id.distinct())).select_from(ShellJob)
        ).one()
    assert count == distinct == 10_000


def test_rollback_does_not_undo_an_enqueue(db: Engine) -> None:
    """Q4M has no transactions (documented): an INSERT is durable at once."""
    with Session(db) as s:
        s.add(ShellJob(command="kept"))
        s.flush()
        s.rollback()
    assert total(db) == 1


# -- queue_session ---------------------------------------------------------------------------


def test_end_removes_the_job(db: Engine) -> None:
    (job_id,) = enqueue(db, ShellJob(command="echo hi"))
    qs = queue_session(ShellJob, bind=db, timeout=5)
    with qs as job:
        assert job is not None and job.id == job_id
        assert qs.session.scalars(select(ShellJob.id)).all() == [job_id]  # owner's view
        with Session(db) as other:
            assert other.scalars(select(ShellJob.id)).all() == []  # owned: invisible
        assert total(db) == 1  # but counted
    assert total(db) == 0


def test_exception_aborts_and_reraises(db: Engine) -> None:
    (job_id,) = enqueue(db, ShellJob(command="boom"))
    with pytest.raises(RuntimeError), queue_session(ShellJob, bind=db, timeout=5):
        raise RuntimeError
    with queue_session(ShellJob, bind=db, timeout=5) as job:
        assert job is not None and job.id == job_id
        raise QueueAbort  # swallowed, back again
    with Session(db) as other:
        assert other.scalars(select(ShellJob.id)).all() == [job_id]


def test_timeout_returns_none_and_leaves_owner_mode(db: Engine) -> None:
    with db.connect() as conn:
        started = time.monotonic()
        with queue_session(ShellJob, bind=conn, timeout=1) as job:
            assert job is None
        assert 0.9 <= time.monotonic() - started < 3
        assert not owner_mode(conn.connection.dbapi_connection)
        enqueue(db, ShellJob(command="seen"))
        # in owner mode without a row the table would look empty to this connection
        assert conn.execute(select(ShellJob.command)).scalars().all() == ["seen"]
        conn.rollback()


def test_null_from_queue_wait_is_a_clear_error(db: Engine) -> None:
    with pytest.raises(QueueWaitError, match="nq_not_a_queue"):
        queue_session(not_a_queue, bind=db, timeout=1).wait()


def test_queue_abort_not_owning_is_an_error_the_library_never_makes(db: Engine) -> None:
    with db.connect() as conn, pytest.raises(OperationalError) as err:
        conn.execute(select(queue_abort()))
    assert err.value.orig.args[0] == 1123  # type: ignore[union-attr]


def test_where(db: Engine) -> None:
    enqueue(db, ShellJob(command="low", priority=1), ShellJob(command="high", priority=9))
    with queue_session(ShellJob, bind=db, where=ShellJob.priority >= 5, timeout=2) as job:
        assert job is not None and job.command == "high"
    with queue_session(ShellJob, bind=db, where=ShellJob.priority > 5, timeout=1) as job:
        assert job is None
    assert total(db) == 1


def test_several_models_earlier_wins(db: Engine) -> None:
    enqueue(db, RubyJob(script="puts 1"))
    enqueue(db, ShellJob(command="ls"))
    with queue_session(ShellJob, RubyJob, bind=db, timeout=2) as job:
        assert isinstance(job, ShellJob)
    with queue_session(ShellJob, RubyJob, bind=db, timeout=2) as job:
        assert isinstance(job, RubyJob) and job.script == "puts 1"
    assert total(db, RubyJob) == 0


def test_never_waits_while_owning(db: Engine) -> None:
    """Two jobs, two sessions on one connection: a queue_wait while owning would silently
    delete the first job, so the second session would see nothing."""
    enqueue(db, ShellJob(command="1"), ShellJob(command="2"))
    with db.connect() as conn:
        with queue_session(ShellJob, bind=conn, timeout=2) as job:
            assert job is not None and job.command == "1"
            raise QueueAbort
        taken = []
        for _ in range(2):
            with queue_session(ShellJob, bind=conn, timeout=2) as job:
                assert job is not None
                taken.append(job.command)
    assert sorted(taken) == ["1", "2"]


def test_core_table(db: Engine) -> None:
    with db.begin() as conn:
        conn.execute(insert(core_jobs), [{"n": 1}, {"n": 1}])
    for _ in range(2):
        with queue_session(core_jobs, bind=db, timeout=2) as row:
            assert row is not None and row.n == 1
    assert total(db, core_jobs) == 0


def test_session_bind(db: Engine) -> None:
    """On Q4M the session is committed first, then the job ended (at least once)."""
    enqueue(db, ShellJob(command="a"), ShellJob(command="b"))
    with Session(db) as session:
        with queue_session(ShellJob, bind=session, timeout=2) as job:
            session.add(Note(id=1, text=job.command))
        with pytest.raises(ValueError), queue_session(ShellJob, bind=session, timeout=2):
            session.add(Note(id=2, text="never"))
            raise ValueError
    with Session(db) as s:
        assert s.scalars(select(Note.id)).all() == [1]
    assert total(db) == 1


def test_session_bind_untouched_commits_only_when_observed(db: Engine) -> None:
    """A Session the block left untouched is not committed (nothing to commit), unless a
    listener would see that commit: then it is, as before."""
    enqueue(db, ShellJob(command="a"), ShellJob(command="b"))
    with Session(db) as session:
        with queue_session(ShellJob, bind=session, timeout=2) as job:
            assert job is not None and not session.in_transaction()
        commits: list[Session] = []

        def committed(orm: Session) -> None:
            commits.append(orm)

        event.listen(session, "after_commit", committed)
        with queue_session(ShellJob, bind=session, timeout=2) as job:
            assert job is not None
        assert commits == [session]
    assert total(db) == 0


# -- many consumers --------------------------------------------------------------------------


def test_threads_drain_every_job_exactly_once(db: Engine) -> None:
    with db.begin() as conn:
        conn.execute(insert(core_jobs), [{"n": i} for i in range(500)])
    ended: list[int] = []
    lock = threading.Lock()

    def consume() -> None:
        while True:
            with queue_session(core_jobs, bind=db, timeout=1) as row:
                if row is None:
                    return
                with lock:
                    ended.append(row.n)

    threads = [threading.Thread(target=consume) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(ended) == list(range(500))
    assert total(db, core_jobs) == 0


OWNER = r"""
import sys, time
from sqlalchemy import Column, Integer, MetaData, create_engine
from sqlalchemy_q4m import queue_session, queue_table

jobs = queue_table("nq_core_jobs", MetaData(), Column("n", Integer, nullable=False))
with queue_session(jobs, bind=create_engine(sys.argv[1]), timeout=10) as row:
    print("owned", row.n, flush=True)
    time.sleep(60)
"""


def test_sigkilled_owner_hands_its_job_to_another_consumer(db: Engine, db_url: URL) -> None:
    with db.begin() as conn:
        conn.execute(insert(core_jobs), [{"n": 7}])
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER, db_url.render_as_string(hide_password=False)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert owner.stdout is not None
        assert owner.stdout.readline().split() == ["owned", "7"]
        with queue_session(core_jobs, bind=db, timeout=1) as row:
            assert row is None
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait(10)
        with queue_session(core_jobs, bind=db, timeout=10) as row:
            assert row is not None and row.n == 7
    finally:
        if owner.poll() is None:  # pragma: no cover - only after a failure
            owner.kill()
            owner.wait()
        for stream in (owner.stdout, owner.stderr):
            if stream is not None:
                stream.close()
