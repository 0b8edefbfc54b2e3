"""A consumer SIGKILLed at each step of a job's life, per backend and per bind: what happens.

A child process owns the one job in the queue with ``queue_session``, writes one row to an
InnoDB table in the job (the job's effect), and stops at a chosen step, printing it; the test
then kills it with SIGKILL, drains the queue with a second consumer (which writes the same
effect) and counts the effects: 0 = the job was lost, 1 = exactly once, 2 = it ran again (at
least once).  The steps, in the order a job lives them:

* ``claimed``: the job is owned, nothing written;
* ``written``: the job's writes are sent, not committed;
* ``before-end``: just before the end statement (``queue_end()`` on Q4M, the ``DELETE`` on
  InnoDB); on Q4M the job's writes are committed by then;
* ``ended``: the end statement ran, the final ``COMMIT`` has not;
* ``done``: the block is over (the job's end is committed).

This is the table of the README's "Guarantees" section; each of its cells is one case here.
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import Column
from sqlalchemy import Engine
from sqlalchemy import Integer
from sqlalchemy import MetaData
from sqlalchemy import Table
from sqlalchemy import create_engine
from sqlalchemy import func
from sqlalchemy import insert
from sqlalchemy import select
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.pool import NullPool

from sqlalchemy_q4m import queue_session
from sqlalchemy_q4m import queue_table
from sqlalchemy_q4m import use_backend

pytestmark = pytest.mark.integration

JOBS = "cp_jobs"
EFFECTS = "cp_effects"
md = MetaData()
jobs = queue_table(JOBS, md, Column("n", Integer, nullable=False))
effects = Table(
    EFFECTS,
    md,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("n", Integer, nullable=False),
)

STEPS = ["claimed", "written", "before-end", "ended", "done"]
#: ``worker``: a :class:`~sqlalchemy_q4m.Job` worker's ``run_once`` (its own connection, the
#: job's writes through ``self.session``).
BINDS = ["engine", "connection", "session", "worker"]

#: Effects counted after the kill and the drain: 1 = exactly once, 2 = ran again (at least
#: once), 0 = lost.  Same for every bind.
EXPECTED = {
    "portable": {"claimed": 1, "written": 1, "before-end": 1, "ended": 1, "done": 1},
    # Q4M: the job's writes commit before queue_end(), which is durable at once: a crash
    # between the two runs the job again; once queue_end() ran, the writes are durable.
    "native": {"claimed": 1, "written": 1, "before-end": 2, "ended": 1, "done": 1},
}

CHILD = r"""
import sys, time
from sqlalchemy import Column, Integer, MetaData, Table, create_engine, event, insert
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool
from sqlalchemy_q4m import Job, queue_session, queue_table, use_backend

url, backend, bind_kind, step, jobs_name, effects_name = sys.argv[1:]
md = MetaData()
jobs = queue_table(jobs_name, md, Column("n", Integer, nullable=False))
effects = Table(effects_name, md, Column("id", Integer, primary_key=True), Column("n", Integer))
engine = create_engine(url, poolclass=NullPool)
use_backend(engine, backend)
owning = False

def pause(at):
    if at == step:
        print("at", at, flush=True)
        time.sleep(600)

def is_end(statement):
    if backend == "native":
        return "queue_end" in statement
    return statement.lstrip().upper().startswith("DELETE") and jobs_name in statement

@event.listens_for(engine, "before_cursor_execute")
def _before(conn, cursor, statement, *args):
    if owning and is_end(statement):
        pause("before-end")

@event.listens_for(engine, "after_cursor_execute")
def _after(conn, cursor, statement, *args):
    if owning and is_end(statement):
        pause("ended")

def run(bind):
    global owning
    qs = queue_session(jobs, bind=bind, timeout=10)
    with qs as row:
        assert row is not None
        owning = True
        pause("claimed")
        if bind_kind == "session":
            bind.execute(insert(effects).values(n=row.n))
            bind.flush()
        else:
            qs.connection.execute(insert(effects).values(n=row.n))
        pause("written")
    owning = False
    pause("done")

class EffectJob(Job):
    table_name = jobs_name
    backend = backend

    def execute(self, row):
        global owning
        owning = True
        pause("claimed")
        self.session.execute(insert(effects).values(n=row[0]))
        pause("written")

if bind_kind == "worker":
    assert EffectJob(engine).run_once(timeout=10)
    owning = False
    pause("done")
elif bind_kind == "engine":
    run(engine)
elif bind_kind == "connection":
    with engine.connect() as conn:
        run(conn)
else:
    with Session(engine) as session:
        run(session)
print("finished without stopping", flush=True)
"""


def _private_database(url: URL, prefix: str) -> Iterator[Engine]:
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = create_engine(url, poolclass=NullPool)
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE `{name}`"))
    eng = create_engine(url.set(database=name), poolclass=NullPool)
    try:
        yield eng
    finally:
        eng.dispose()
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS `{name}`"))
        admin.dispose()


@pytest.fixture(scope="module")
def portable_db(server_url: URL) -> Iterator[Engine]:
    for eng in _private_database(server_url, "cp"):
        use_backend(eng, "portable")
        md.create_all(eng)
        yield eng


@pytest.fixture(scope="module")
def native_db(q4m_url: URL) -> Iterator[Engine]:
    for eng in _private_database(q4m_url, "cp"):
        use_backend(eng, "native")
        md.create_all(eng)
        yield eng


def _read_line(proc: subprocess.Popen[str], seconds: float) -> str:
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(seconds):
            return ""
    return proc.stdout.readline().strip()


def count(engine: Engine, table: Table) -> int:
    """Rows in the table (on Q4M, owned rows included)."""
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


def drain(engine: Engine) -> int:
    """A second consumer runs whatever is left (writing the same effect); the jobs it ran."""
    ran = 0
    deadline = time.monotonic() + 60
    while count(engine, jobs) and time.monotonic() < deadline:
        qs = queue_session(jobs, bind=engine, timeout=2)
        with qs as row:
            if row is not None:
                qs.connection.execute(insert(effects).values(n=row.n))
                ran += 1
    assert count(engine, jobs) == 0, "the killed owner's job never came back"
    return ran


def crash_at(engine: Engine, backend: str, bind: str, step: str) -> tuple[int, int]:
    """(effects after kill + drain, jobs the drain ran)."""
    with engine.begin() as conn:
        conn.execute(effects.delete())
        conn.execute(jobs.delete())
        row = {"n": 7}
        if "id" in jobs.c:
            row["id"] = uuid.uuid4().bytes
        conn.execute(insert(jobs).values(**row))
    url = engine.url.render_as_string(hide_password=False)
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, url, backend, bind, step, JOBS, EFFECTS],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = _read_line(child, 60)
        if line != f"at {step}":
            child.kill()
            _, err = child.communicate(timeout=30)
            pytest.fail(f"the child did not stop at {step!r}: {line!r}\n{err[-3000:]}")
        os.kill(child.pid, signal.SIGKILL)
        child.wait(30)
    finally:
        if child.poll() is None:  # pragma: no cover - only after a failure
            child.kill()
            child.wait(30)
        for stream in (child.stdout, child.stderr):
            if stream is not None:
                stream.close()
    ran = drain(engine)
    with engine.connect() as conn:
        ns = conn.execute(select(effects.c.n)).scalars().all()
    assert set(ns) <= {7}
    return len(ns), ran


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("bind", BINDS)
def test_portable_consumer_killed_at_each_step(portable_db: Engine, bind: str, step: str) -> None:
    runs, _ = crash_at(portable_db, "portable", bind, step)
    assert runs == EXPECTED["portable"][step]


@pytest.mark.native
@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("bind", BINDS)
def test_native_consumer_killed_at_each_step(native_db: Engine, bind: str, step: str) -> None:
    runs, _ = crash_at(native_db, "native", bind, step)
    assert runs == EXPECTED["native"][step]
