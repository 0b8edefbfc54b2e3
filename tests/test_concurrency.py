"""Many consumers on the real server: every job is consumed exactly once and none is left, and
a consumer killed with SIGKILL while it owns a job hands that job to another consumer."""

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
from sqlalchemy import Column
from sqlalchemy import Engine
from sqlalchemy import Integer
from sqlalchemy import MetaData
from sqlalchemy import create_engine
from sqlalchemy import func
from sqlalchemy import insert
from sqlalchemy import select
from sqlalchemy.engine import URL

from sqlalchemy_q4m import QueueAbort
from sqlalchemy_q4m import queue_session
from sqlalchemy_q4m import queue_table

pytestmark = pytest.mark.integration

JOBS = 5_000
THREADS = 8
PROCESSES = 4

md = MetaData()
jobs = queue_table("cc_jobs", md, Column("n", Integer, nullable=False))

#: A consumer process: drains ``cc_jobs`` with its own threads and prints what it ended.
CONSUMER = r"""
import sys, threading
from sqlalchemy import Column, Integer, MetaData, create_engine
from sqlalchemy_q4m import QueueAbort, queue_session, queue_table

url, threads = sys.argv[1], int(sys.argv[2])
jobs = queue_table("cc_jobs", MetaData(), Column("n", Integer, nullable=False))
engine = create_engine(url, pool_size=threads, max_overflow=0)
lock = threading.Lock()
with engine.connect():  # connected and imported: ready; wait for the start signal
    pass
print("ready", flush=True)
sys.stdin.readline()

def consume():
    aborted = set()
    while True:
        done = None
        with queue_session(jobs, bind=engine, timeout=0.5, poll_interval=0.01) as row:
            if row is None:
                return
            if row.n % 50 == 0 and row.id not in aborted:
                aborted.add(row.id)  # hand every 50th job back once: it must still end once
                raise QueueAbort
            done = row.id
        if done is not None:
            with lock:
                print("ended", done.hex, flush=True)

workers = [threading.Thread(target=consume) for _ in range(threads)]
for w in workers:
    w.start()
for w in workers:
    w.join()
engine.dispose()
"""

#: Owns one job, says which, then waits to be killed.
OWNER = r"""
import sys, time
from sqlalchemy import Column, Integer, MetaData, create_engine
from sqlalchemy_q4m import queue_session, queue_table

jobs = queue_table("cc_jobs", MetaData(), Column("n", Integer, nullable=False))
engine = create_engine(sys.argv[1])
with queue_session(jobs, bind=engine, timeout=10) as row:
    print("owned", row.id.hex, flush=True)
    time.sleep(60)
"""


@pytest.fixture(scope="module")
def table(engine: Engine) -> Iterator[Engine]:
    md.create_all(engine)
    yield engine
    md.drop_all(engine)


@pytest.fixture
def db(table: Engine) -> Iterator[Engine]:
    with table.begin() as conn:
        conn.execute(jobs.delete())
    yield table
    with table.begin() as conn:
        conn.execute(jobs.delete())


def left(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(jobs)).scalar_one())


def fill(engine: Engine, n: int) -> set[uuid.UUID]:
    with engine.begin() as conn:
        conn.execute(insert(jobs), [{"n": i} for i in range(n)])
        return set(conn.execute(select(jobs.c.id)).scalars())


def spawn(script: str, *args: Any, stdin: bool = False) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", script, *map(str, args)],
        stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_threads_and_processes_drain_every_job_exactly_once(db: Engine, db_url: URL) -> None:
    """8 threads here (a Connection each) and 4 consumer processes (an Engine each, 2 threads)
    take 5,000 jobs together; every 50th job is handed back once on its first delivery; each
    job ends exactly once and none is left."""
    expected = fill(db, JOBS)
    assert len(expected) == JOBS
    url = db_url.render_as_string(hide_password=False)
    procs = [spawn(CONSUMER, url, 2, stdin=True) for _ in range(PROCESSES)]
    ended: list[uuid.UUID] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    engine = create_engine(db_url, pool_size=THREADS, max_overflow=0)

    def consume() -> None:
        """A worker thread: one connection of its own, one queue session per job."""
        aborted: set[uuid.UUID] = set()
        try:
            with engine.connect() as conn:
                while True:
                    done = None
                    with queue_session(jobs, bind=conn, timeout=0.5, poll_interval=0.01) as row:
                        if row is None:
                            return
                        if row.n % 50 == 0 and row.id not in aborted:
                            aborted.add(row.id)
                            raise QueueAbort
                        done = row.id
                    if done is not None:
                        with lock:
                            ended.append(done)
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=consume) for _ in range(THREADS)]
    try:
        for p in procs:  # every process connected before anyone starts: all take part
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        for t in threads:
            t.start()
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        for t in threads:
            t.join(120)
        outputs = [p.communicate(timeout=120) for p in procs]  # also closes stdin
    finally:
        for p in procs:
            if p.poll() is None:  # pragma: no cover - only after a failure
                p.kill()
                p.wait()
        engine.dispose()
    assert errors == []
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err
    by_process = [
        [uuid.UUID(hex=line.split()[1]) for line in out.splitlines() if line.startswith("ended")]
        for out, _ in outputs
    ]
    everything = ended + [i for ids in by_process for i in ids]
    assert len(everything) == JOBS  # no job ended twice ...
    assert set(everything) == expected  # ... and every job ended
    assert left(db) == 0
    assert ended and all(by_process)  # all consumers took part


def test_sigkilled_owner_hands_its_job_to_another_consumer(db: Engine, db_url: URL) -> None:
    (only,) = fill(db, 1)
    owner = spawn(OWNER, db_url.render_as_string(hide_password=False))
    try:
        assert owner.stdout is not None
        line = owner.stdout.readline()
        assert line.startswith("owned"), owner.stderr.read() if owner.stderr else line
        assert uuid.UUID(hex=line.split()[1]) == only
        with queue_session(jobs, bind=db, timeout=0.3) as row:
            assert row is None  # owned by the live process: nobody else gets it
        os.kill(owner.pid, signal.SIGKILL)
        assert owner.wait(10) == -signal.SIGKILL
        started = time.monotonic()
        with queue_session(jobs, bind=db, timeout=10, poll_interval=0.02) as row:
            assert row is not None and row.id == only
        assert time.monotonic() - started < 5
    finally:
        if owner.poll() is None:  # pragma: no cover - only after a failure
            owner.kill()
            owner.wait()
        for stream in (owner.stdout, owner.stderr):
            if stream is not None:
                stream.close()
    assert left(db) == 0
