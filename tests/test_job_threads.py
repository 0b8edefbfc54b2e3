"""One Job object used from two threads (issue 11 item 15).

A Job object runs on one pinned connection; a second thread's ``run_once`` on the same object
would wait on that connection while the first thread holds a job: on Q4M that ``queue_wait``
ends the first thread's job, on InnoDB the second claim and its COMMIT join the first job's
transaction.  The object refuses: the second thread gets :class:`JobInUse` at once, the first
thread's job is finished by the first thread, and the object serves the next thread once the
first is done.  Checked with two real threads on both backends.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlalchemy import Integer
from sqlalchemy import create_engine
from sqlalchemy import func
from sqlalchemy import select
from sqlalchemy.engine import URL
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.orm import Mapped
from sqlalchemy.orm import mapped_column

from sqlalchemy_q4m import Job
from sqlalchemy_q4m import QueueMixin
from sqlalchemy_q4m import detect_backend
from sqlalchemy_q4m import enqueue
from sqlalchemy_q4m.exc import JobInUse
from sqlalchemy_q4m.exc import Q4MError

pytestmark = pytest.mark.integration


class Base(DeclarativeBase):
    pass


class JtJob(QueueMixin, Base):
    __tablename__ = "jt_thread_jobs"
    n: Mapped[int] = mapped_column(Integer)


class Holding(Job):
    """Records who ran which job; job 1 is held until ``release`` is set."""

    model = JtJob
    wait_timeout = 5.0

    def __init__(self, bind: Any, **options: Any) -> None:
        super().__init__(bind, **options)
        self.entered = threading.Event()
        self.release = threading.Event()
        self.seen: list[tuple[int, str]] = []

    def execute(self, job: Any) -> None:
        self.seen.append((job.n, threading.current_thread().name))
        if job.n == 1:
            self.entered.set()
            assert self.release.wait(30)


@pytest.fixture(params=["portable", pytest.param("native", marks=pytest.mark.native)])
def bind(request: pytest.FixtureRequest, db_url: URL) -> Iterator[Engine]:
    if request.param == "native":
        url: URL = request.getfixturevalue("q4m_url")
    else:
        url = db_url
    eng = create_engine(url, pool_size=5)
    with eng.connect() as conn:
        assert detect_backend(conn) == request.param
    Base.metadata.drop_all(eng)
    Base.metadata.create_all(eng)
    try:
        yield eng
    finally:
        Base.metadata.drop_all(eng)
        eng.dispose()


def left(eng: Engine) -> int:
    with eng.connect() as conn:
        return int(conn.scalar(select(func.count()).select_from(JtJob)) or 0)


def test_a_second_thread_is_refused_while_the_first_holds_a_job(bind: Engine) -> None:
    enqueue(bind, JtJob, [{"n": 1}, {"n": 2}])
    job = Holding(bind)
    results: dict[str, Any] = {}

    def first() -> None:
        try:
            results["first"] = job.run_once(10)
        except BaseException as err:  # recorded, asserted below
            results["first"] = err

    def second() -> None:
        try:
            results["second"] = job.run_once(2)
        except BaseException as err:
            results["second"] = err

    a = threading.Thread(target=first, name="first")
    b = threading.Thread(target=second, name="second")
    a.start()
    try:
        assert job.entered.wait(10), "the first thread never got job 1"
        b.start()
        b.join(15)
        assert not b.is_alive()
    finally:
        job.release.set()
        a.join(15)
    assert isinstance(results["second"], JobInUse), results["second"]
    assert isinstance(results["second"], Q4MError)
    assert "first" in str(results["second"])  # names the thread that holds the object
    assert results["first"] is True  # its job was ended by itself, not by the other wait
    assert job.seen == [(1, "first")]
    assert left(bind) == 1  # job 2 untouched

    # Once the first thread is done, another thread may use the object: job 2, once.
    c = threading.Thread(target=second, name="third")
    c.start()
    c.join(15)
    assert results["second"] is True
    assert job.seen == [(1, "first"), (2, "third")]
    assert left(bind) == 0
    job.close()


def test_two_threads_looping_on_one_job_object_run_every_job_once(bind: Engine) -> None:
    """Two threads call ``run_once`` on one object until the queue is empty: each call either
    handles a job or is refused; no job is lost or run twice."""
    count = 12
    enqueue(bind, JtJob, [{"n": n} for n in range(10, 10 + count)])
    job = Holding(bind)
    refused = [0, 0]

    def loop(i: int) -> None:
        while len(job.seen) < count:
            try:
                job.run_once(0.2)
            except JobInUse:
                refused[i] += 1

    threads = [threading.Thread(target=loop, args=(i,), name=f"t{i}") for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert sorted(n for n, _ in job.seen) == list(range(10, 10 + count))
    assert left(bind) == 0
    job.close()
