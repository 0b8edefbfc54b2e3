"""The job class on the native backend, checked without a server through :mod:`fake_q4m`.

What must hold on Q4M, which has no transactions and no UPDATE: a retry is an INSERT of a copy,
committed, then ``queue_end()``; a dead letter is committed before ``queue_end()``; an abort is
``queue_abort()``; the subscription tests ``run_at <= now``; ``queue_wait`` is never called
while owning.  The same scenarios run on a real Q4M server in ``test_native_worker.py`` (and
through worker processes in ``test_native_worker_processes.py`` and ``test_native_cli.py``).
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from fake_q4m import FakeQ4M
from sqlalchemy import Engine
from sqlalchemy import Text
from sqlalchemy import create_engine
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.orm import Mapped
from sqlalchemy.orm import Session
from sqlalchemy.orm import mapped_column

from sqlalchemy_q4m import Job
from sqlalchemy_q4m import QueueMixin
from sqlalchemy_q4m import RetryMixin

pytestmark = pytest.mark.unit

SEQUENCE = ("wait", "select", "insert", "end", "abort", "other")


class Base(DeclarativeBase):
    pass


class FwJob(RetryMixin, QueueMixin, Base):
    __tablename__ = "fw_jobs"
    command: Mapped[str] = mapped_column(Text)


class Scripted(Job):
    """Behaves as ``command`` says: ``ok``, ``fail``, ``abort``, or ``write then fail`` (a
    write through ``self.session`` first)."""

    model = FwJob
    retry_base = 0
    max_attempts = 2

    def execute(self, job: Any) -> None:
        if job.command == "write then fail":
            self.session.add(FwJob(command="written by the job"))
            self.session.flush()
            raise RuntimeError("scripted failure")
        if job.command == "fail":
            raise RuntimeError("scripted failure")
        if job.command == "abort":
            self.queue_abort()


@pytest.fixture
def fake() -> FakeQ4M:
    return FakeQ4M()


@pytest.fixture
def native(fake: FakeQ4M) -> Engine:
    engine = create_engine("mysql+pymysql://fake@localhost/test", module=fake)
    Base.metadata.create_all(engine)
    return engine


def put(engine: Engine, command: str) -> None:
    with Session(engine) as s:
        s.add(FwJob(command=command))
        s.commit()


def job_statements(fake: FakeQ4M) -> list[str]:
    """The statements after the last ``queue_wait`` that found a job, minus set-up noise."""
    trace = [
        t
        for t in fake.trace()
        if not t.startswith(("SET ", "SELECT @@", "SELECT VERSION", "SELECT DATABASE"))
    ]
    starts = [i for i, t in enumerate(trace) if t.startswith("queue_wait")]
    return trace[starts[-1] :]


def test_success_is_wait_load_end(fake: FakeQ4M, native: Engine) -> None:
    put(native, "ok")
    job = Scripted(native)
    before = int(time.time())
    assert job.run_once(timeout=1)
    statements = job_statements(fake)
    # autocommit: no transaction, so nothing to commit (the raw Q4M loop's statements)
    assert statements[1:] == ["SELECT fw_jobs", "queue_end()"]
    wait = statements[0]
    assert wait.startswith("queue_wait('fw_jobs:(`run_at` <= ")
    assert before <= int(wait.split("<= ")[1].split(")")[0]) <= int(time.time())
    assert fake.rows("fw_jobs") == [] and fake.violations == []
    job.close()


def test_a_retry_inserts_a_copy_then_ends_the_original(fake: FakeQ4M, native: Engine) -> None:
    put(native, "fail")
    (original,) = fake.rows("fw_jobs")
    job = Scripted(native)
    assert job.run_once(timeout=1)
    assert job_statements(fake)[1:] == [
        "SELECT fw_jobs",  # execute wrote nothing: no session, nothing to roll back
        "BEGIN",  # the connection is in autocommit: a transaction is explicit
        "INSERT fw_jobs",  # the copy: attempts + 1, run_at = now + backoff
        "COMMIT",
        "queue_end()",  # then the original (a crash in between runs it twice: at least once)
    ]
    (copy,) = fake.rows("fw_jobs")
    assert copy["attempts"] == 1 and copy["command"] == "fail"
    assert copy["id"] != original["id"] and abs(copy["run_at"] - time.time()) < 2
    assert job.run_once(timeout=1)  # second failure: the last attempt
    assert job_statements(fake)[1:] == [
        "SELECT fw_jobs",
        "BEGIN",
        "INSERT q4m_dead_letters",
        "COMMIT",  # the dead letter is durable before the job is ended
        "queue_end()",
    ]
    assert fake.rows("fw_jobs") == []
    (letter,) = fake.rows("q4m_dead_letters")
    assert letter["attempts"] == 2 and letter["error"] == "RuntimeError: scripted failure"
    assert fake.violations == []
    job.close()


def test_a_failed_jobs_own_writes_are_rolled_back_before_its_retry(
    fake: FakeQ4M, native: Engine
) -> None:
    put(native, "write then fail")
    job = Scripted(native)
    assert job.run_once(timeout=1)
    assert job_statements(fake)[1:] == [
        "SELECT fw_jobs",
        "BEGIN",
        "INSERT fw_jobs",  # the job's own write, through self.session
        "ROLLBACK",  # undone: Q4M owning is not transactional, the session's writes are
        "BEGIN",
        "INSERT fw_jobs",  # the retry copy
        "COMMIT",
        "queue_end()",
    ]
    # (a queue table is not transactional: the fake, like Q4M, keeps the job's own row)
    copies = [r for r in fake.rows("fw_jobs") if r["command"] == "write then fail"]
    assert [c["attempts"] for c in copies] == [1]
    assert fake.violations == []
    job.close()


def test_queue_abort_is_queue_abort(fake: FakeQ4M, native: Engine) -> None:
    put(native, "abort")
    job = Scripted(native)
    assert job.run_once(timeout=1)
    assert job_statements(fake)[1:] == ["SELECT fw_jobs", "queue_abort()"]
    assert len(fake.rows("fw_jobs")) == 1 and fake.violations == []
    job.close()


def test_a_timeout_leaves_owner_mode(fake: FakeQ4M, native: Engine) -> None:
    job = Scripted(native)
    assert job.run_once(timeout=0.2) is False
    assert job_statements(fake)[:2][1] == "queue_end()"
    assert fake.violations == []
    job.close()
