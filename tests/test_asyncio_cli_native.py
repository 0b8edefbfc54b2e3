"""``q4m worker`` running AsyncJob classes on the real Q4M engine, as subprocesses.

The tasks of each process block in ``queue_wait`` on their own connections (asyncmy, from a
``mysql+pymysql://`` URL); jobs record ``start``/``done`` lines with single ``O_APPEND``
writes and an InnoDB row through their AsyncSession.  A database of this module's own on the
``Q4M_TEST_URL`` server, dropped at the end.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlalchemy import Integer
from sqlalchemy import create_engine
from sqlalchemy import func
from sqlalchemy import insert
from sqlalchemy import select
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.orm import Mapped
from sqlalchemy.orm import mapped_column
from sqlalchemy.pool import NullPool

from sqlalchemy_q4m import QueueMixin
from sqlalchemy_q4m.worker.runtime import EXIT_FORCED
from sqlalchemy_q4m.worker.runtime import EXIT_OK

pytestmark = [pytest.mark.native, pytest.mark.acceptance]

JOBS = "anc_jobs"
DONE = "anc_done"

JOB_MODULE = f'''
import asyncio
import os

from sqlalchemy import text

from sqlalchemy_q4m.worker.asyncio import AsyncJob


def record(event, n):
    fd = os.open(os.environ["AIO_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{{event}} {{n}} {{os.getpid()}}\\n".encode())
    finally:
        os.close(fd)


class NativeCliJob(AsyncJob):  # table "{JOBS}", reflected
    table_name = "{JOBS}"

    async def execute(self, job):
        n = int(job.n)
        record("start", n)
        await asyncio.sleep(float(os.environ.get("AIO_SLEEP", "0")))
        await self.session.execute(
            text("INSERT INTO {DONE} (n, pid) VALUES (:n, :pid)"), {{"n": n, "pid": os.getpid()}}
        )
        record("done", n)
'''


class Base(DeclarativeBase):
    pass


class CliJob(QueueMixin, Base):
    __tablename__ = JOBS
    n: Mapped[int] = mapped_column(Integer)


class Done(Base):
    __tablename__ = DONE
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    n: Mapped[int] = mapped_column(Integer)
    pid: Mapped[int] = mapped_column(Integer)


@pytest.fixture(scope="module")
def q4m_db(q4m_url: URL) -> Iterator[URL]:
    name = f"q4m_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(q4m_url, poolclass=NullPool)
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE `{name}`"))
    try:
        yield q4m_url.set(database=name)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS `{name}`"))
        admin.dispose()


@pytest.fixture(scope="module")
def db(q4m_db: URL) -> Iterator[Engine]:
    eng = create_engine(q4m_db, poolclass=NullPool)
    Base.metadata.create_all(eng)
    yield eng
    eng.dispose()


@pytest.fixture
def workdir(tmp_path: Path, db: Engine) -> Iterator[Path]:
    (tmp_path / "anc_jobs_module.py").write_text(JOB_MODULE)
    yield tmp_path
    with db.begin() as conn:
        conn.execute(CliJob.__table__.delete())
        conn.execute(Done.__table__.delete())


def q4m(workdir: Path, url: URL, *args: str, **env: str) -> subprocess.Popen[str]:
    full_env = {
        **os.environ,
        "AIO_LOG": str(workdir / "log"),
        "Q4M_URL": url.render_as_string(hide_password=False),
        **env,
    }
    return subprocess.Popen(
        [sys.executable, "-m", "sqlalchemy_q4m", "worker", "anc_jobs_module:NativeCliJob", *args],
        cwd=workdir,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen[str], seconds: float = 120) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:  # pragma: no cover - only after a failure
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"the worker did not exit:\n{err[-3000:]}") from None
    return proc.returncode, err


def log(workdir: Path) -> list[tuple[str, int]]:
    path = workdir / "log"
    if not path.exists():
        return []
    return [(e, int(n)) for e, n, _ in (line.split() for line in path.read_text().splitlines())]


def queued(db: Engine) -> int:
    with db.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(CliJob)).scalar_one())


def test_async_worker_processes_drain_a_q4m_queue(workdir: Path, db: Engine, q4m_db: URL) -> None:
    with db.begin() as conn:
        conn.execute(insert(CliJob), [{"n": i} for i in range(60)])
    proc = q4m(workdir, q4m_db, "--concurrency", "4", "--processes", "2", "--burst")
    code, err = finish(proc)
    assert code == EXIT_OK, err[-3000:]
    done = Counter(n for e, n in log(workdir) if e == "done")
    assert sorted(done) == list(range(60)) and max(done.values()) == 1
    assert queued(db) == 0
    with db.connect() as conn:
        assert conn.execute(select(func.count()).select_from(Done)).scalar_one() == 60


def test_two_sigterms_return_the_jobs_in_hand(workdir: Path, db: Engine, q4m_db: URL) -> None:
    """Two of four tasks hold a job (sleeping in execute), two block in queue_wait; the
    second SIGTERM cancels them all: exit 3, both jobs back in the queue, none done."""
    with db.begin() as conn:
        conn.execute(insert(CliJob), [{"n": 1}, {"n": 2}])
    proc = q4m(workdir, q4m_db, "--concurrency", "4", AIO_SLEEP="60")
    try:
        deadline = time.monotonic() + 60
        while len([e for e, _ in log(workdir) if e == "start"]) < 2:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the jobs did not start"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        code, err = finish(proc, 60)
    finally:
        if proc.poll() is None:  # pragma: no cover - only after a failure
            proc.kill()
            proc.communicate()
    assert code == EXIT_FORCED, err[-3000:]
    assert [e for e, _ in log(workdir)] == ["start", "start"]
    # the server returned both jobs (aborted by the tasks, or by their closed connections)
    deadline = time.monotonic() + 30
    while True:
        with db.connect() as conn:
            visible = sorted(conn.execute(select(CliJob.n)).scalars())
        if visible == [1, 2]:
            break
        assert time.monotonic() < deadline, visible
        time.sleep(0.1)
    with db.connect() as conn:
        assert conn.execute(select(func.count()).select_from(Done)).scalar_one() == 0
