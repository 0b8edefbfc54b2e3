"""``q4m worker`` running AsyncJob classes, as subprocesses against the real server.

The job module is written into a temporary directory that is the worker's working directory
(``q4m worker`` imports job modules from there, as ``python -m`` would).  Jobs record
``start``/``done`` lines with single ``O_APPEND`` writes and a row through their AsyncSession.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlalchemy import Integer
from sqlalchemy import Text
from sqlalchemy import insert
from sqlalchemy import select
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.orm import Mapped
from sqlalchemy.orm import mapped_column

from sqlalchemy_q4m import QueueMixin
from sqlalchemy_q4m.worker.runtime import EXIT_OK
from sqlalchemy_q4m.worker.runtime import EXIT_USAGE

pytestmark = pytest.mark.acceptance

JOBS = "test_asyncio_cli_jobs"
DONE = "test_asyncio_cli_done"
DEAD = "test_asyncio_cli_dead"

JOB_MODULE = f'''
import asyncio
import os

from sqlalchemy import text

from sqlalchemy_q4m import Job
from sqlalchemy_q4m.worker.asyncio import AsyncJob


def record(event, n):
    fd = os.open(os.environ["AIO_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{{event}} {{n}} {{os.getpid()}}\\n".encode())
    finally:
        os.close(fd)


class TestAsyncioCliJob(AsyncJob):  # table "{JOBS}"
    dead_letter_table = "{DEAD}"

    async def execute(self, job):
        n = int(job.n)
        pause = float(os.environ.get("AIO_SLEEP", "0"))
        go = os.environ.get("AIO_GO")
        record("start", n)
        while go and not os.path.exists(go):  # held until the test says so
            await asyncio.sleep(0.02)
        await asyncio.sleep(pause)
        await self.session.execute(
            text("INSERT INTO {DONE} (n, pid) VALUES (:n, :pid)"), {{"n": n, "pid": os.getpid()}}
        )
        record("done", n)


class SyncJob(Job):
    table_name = "{JOBS}"

    def execute(self, job):
        pass
'''


class Base(DeclarativeBase):
    pass


class CliJob(QueueMixin, Base):
    __tablename__ = JOBS
    n: Mapped[int] = mapped_column(Integer)
    note: Mapped[str] = mapped_column(Text, default="")


class Done(Base):
    __tablename__ = DONE
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    n: Mapped[int] = mapped_column(Integer)
    pid: Mapped[int] = mapped_column(Integer)


@pytest.fixture(scope="module")
def tables(engine: Engine) -> Iterator[None]:
    Base.metadata.create_all(engine)
    yield
    Base.metadata.drop_all(engine)
    with engine.begin() as conn:
        conn.execute(text(f"DROP TABLE IF EXISTS {DEAD}"))


@pytest.fixture
def workdir(tmp_path: Path, engine: Engine, tables: None) -> Iterator[Path]:
    (tmp_path / "aio_jobs.py").write_text(JOB_MODULE)
    yield tmp_path
    with engine.begin() as conn:
        conn.execute(CliJob.__table__.delete())
        conn.execute(Done.__table__.delete())


def enqueue(engine: Engine, count: int) -> None:
    with engine.begin() as conn:
        conn.execute(insert(CliJob), [{"n": i} for i in range(count)])


def q4m(
    workdir: Path, url: URL, *args: str, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    full_env = {
        **os.environ,
        "AIO_LOG": str(workdir / "log"),
        "Q4M_URL": url.render_as_string(hide_password=False),
        **(env or {}),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "sqlalchemy_q4m", *args],
        cwd=workdir,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def events(workdir: Path) -> list[tuple[str, int]]:
    path = workdir / "log"
    if not path.exists():
        return []
    return [(e, int(n)) for e, n, _ in (line.split() for line in path.read_text().splitlines())]


def done_rows(engine: Engine) -> list[int]:
    with engine.connect() as conn:
        return list(conn.execute(select(Done.n)).scalars())


def queued(engine: Engine) -> int:
    with engine.connect() as conn:
        return len(conn.execute(select(CliJob.id)).all())


def test_async_classes_drain_the_queue_with_a_sync_url(
    workdir: Path, db_url: URL, engine: Engine
) -> None:
    enqueue(engine, 200)
    # Q4M_URL is mysql+pymysql://: the worker switches to an installed async driver
    proc = q4m(
        workdir,
        db_url,
        "worker",
        "aio_jobs:TestAsyncioCliJob",
        "--concurrency",
        "8",
        "--processes",
        "2",
        "--burst",
        "--status",
        "never",
    )
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_OK, err
    assert Counter(done_rows(engine)) == Counter(range(200))  # each exactly once
    assert Counter(n for e, n in events(workdir) if e == "done") == Counter(range(200))
    assert queued(engine) == 0
    assert "mysql+asyncmy://" in err and "task(s)" in err


def test_first_sigterm_finishes_the_jobs_in_hand(
    workdir: Path, db_url: URL, engine: Engine
) -> None:
    enqueue(engine, 20)
    proc = q4m(
        workdir,
        db_url.set(drivername="mysql+aiomysql"),
        "worker",
        "aio_jobs:TestAsyncioCliJob",
        "--concurrency",
        "4",
        "--status",
        "never",
        # the jobs wait for "go" (then 1 s): with a fixed duration alone, a task that started
        # late under load let an early one finish and take a fifth job before the signal
        env={"AIO_SLEEP": "1.0", "AIO_GO": str(workdir / "go")},
    )
    deadline = time.monotonic() + 30
    while sum(1 for e, _ in events(workdir) if e == "start") < 4:
        assert time.monotonic() < deadline and proc.poll() is None, proc.stderr
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    (workdir / "go").touch()
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == EXIT_OK, err
    started = [n for e, n in events(workdir) if e == "start"]
    finished = [n for e, n in events(workdir) if e == "done"]
    assert len(started) == 4 and sorted(finished) == sorted(started)  # none new, all finished
    assert sorted(done_rows(engine)) == sorted(started)
    assert queued(engine) == 16


def test_second_sigterm_returns_the_jobs_in_hand(
    workdir: Path, db_url: URL, engine: Engine
) -> None:
    enqueue(engine, 5)
    proc = q4m(
        workdir,
        db_url,
        "worker",
        "aio_jobs:TestAsyncioCliJob",
        "--concurrency",
        "2",
        "--status",
        "never",
        env={"AIO_SLEEP": "60"},
    )
    deadline = time.monotonic() + 30
    while sum(1 for e, _ in events(workdir) if e == "start") < 2:
        assert time.monotonic() < deadline and proc.poll() is None, proc.stderr
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 3, err  # EXIT_FORCED
    assert [e for e, _ in events(workdir)].count("done") == 0
    assert queued(engine) == 5 and done_rows(engine) == []  # returned, nothing lost


def test_mixing_job_and_async_job_classes_is_a_usage_error(
    workdir: Path, db_url: URL, engine: Engine
) -> None:
    proc = q4m(workdir, db_url, "worker", "aio_jobs:TestAsyncioCliJob", "aio_jobs:SyncJob")
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == EXIT_USAGE
    assert "cannot share a worker" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
