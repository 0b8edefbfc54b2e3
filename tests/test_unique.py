"""Unique jobs on both backends: one job per key from many threads and processes at once; the
key is held while the job is queued or running (also on Q4M, where other connections do not
see an owned row), and released when it ends, is dead-lettered or its enqueuer dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
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
from sqlalchemy import Table
from sqlalchemy import create_engine
from sqlalchemy import delete
from sqlalchemy import func
from sqlalchemy import select
from sqlalchemy.pool import NullPool

from sqlalchemy_q4m import enqueue
from sqlalchemy_q4m import queue_session
from sqlalchemy_q4m import queue_table
from sqlalchemy_q4m.backends import unique_keys
from sqlalchemy_q4m.backends.unique_keys import KEYS
from sqlalchemy_q4m.backends.unique_keys import count_keys
from sqlalchemy_q4m.producer.unique import Unique
from sqlalchemy_q4m.producer.unique import UniqueKeyError
from sqlalchemy_q4m.schema.retry import retry_columns
from sqlalchemy_q4m.worker.deadletter import dead_letter_table
from sqlalchemy_q4m.worker.job import Job

pytestmark = pytest.mark.integration


def key_of(row: Any) -> str:
    return f"sync:{row['account']}"


@pytest.fixture(autouse=True)
def short_first_key_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    """In this process a "no keys" answer lasts 0.5 s and a queue's first keyed enqueue waits
    1 s (not 5 s and 6 s): the order of the two is what makes the wait safe, and
    tests/test_unique_markers.py tests it.  Subprocesses keep the defaults."""
    monkeypatch.setattr(unique_keys, "ABSENT_TTL", 0.5)
    monkeypatch.setattr(unique_keys, "FIRST_KEY_WAIT", 1.0)


@pytest.fixture(params=["portable", pytest.param("native", marks=pytest.mark.native)])
def setup(request: pytest.FixtureRequest, engine: Engine) -> Iterator[tuple[Engine, Table, str]]:
    """(engine, a fresh queue table with retry columns, its URL as text)."""
    if request.param == "portable":
        eng = engine
    else:
        eng = create_engine(os.environ["Q4M_TEST_URL"], poolclass=NullPool)
    name = f"tuq_{uuid.uuid4().hex[:8]}"
    metadata = MetaData()
    table = queue_table(
        name, metadata, Column("account", Integer, nullable=False), *retry_columns()
    )
    metadata.create_all(eng)
    try:
        yield eng, table, eng.url.render_as_string(hide_password=False)
    finally:
        table.drop(eng)
        with eng.begin() as conn:
            conn.execute(delete(KEYS).where(KEYS.c.queue == name))
        if eng is not engine:
            eng.dispose()


def jobs_in(engine: Engine, table: Table) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar() or 0)


def one(engine: Engine, table: Table, account: int = 7) -> Unique:
    (result,) = enqueue(engine, table, [{"account": account}], unique_key=key_of)
    return result


ENQUEUER = textwrap.dedent(
    """
    import sys, time
    from sqlalchemy import Column, Integer, MetaData, create_engine
    from sqlalchemy.pool import NullPool
    from sqlalchemy_q4m import enqueue, queue_table
    from sqlalchemy_q4m.schema.retry import retry_columns

    url, name, start = sys.argv[1], sys.argv[2], float(sys.argv[3])
    engine = create_engine(url, poolclass=NullPool)
    table = queue_table(name, MetaData(), Column("account", Integer, nullable=False),
                        *retry_columns())
    time.sleep(max(0.0, start - time.time()))
    (result,) = enqueue(engine, table, [{"account": 7}], unique_key=lambda r: "sync:7")
    print("enqueued" if result.enqueued else "there", result.job_id)
    """
)


def test_one_key_from_8_threads_and_4_processes_at_once_is_one_job(
    setup: tuple[Engine, Table, str],
) -> None:
    engine, table, url = setup
    start = time.time() + 4.0
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", ENQUEUER, url, table.name, str(start)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(4)
    ]
    results: list[Unique] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            time.sleep(max(0.0, start - time.time()))
            results.append(one(engine, table))
        except BaseException as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()[-2000:]
        outputs.append(out.decode().split())
    assert not errors, errors
    assert len(results) == 8
    job_ids = {r.job_id for r in results} | {uuid.UUID(o[1]) for o in outputs}
    enqueued = sum(r.enqueued for r in results) + sum(o[0] == "enqueued" for o in outputs)
    assert enqueued == 1, (results, outputs)
    assert len(job_ids) == 1, "every caller names the one job"
    assert jobs_in(engine, table) == 1


def test_the_key_is_held_while_queued_and_running_and_released_when_the_job_ends(
    setup: tuple[Engine, Table, str],
) -> None:
    engine, table, _ = setup
    first = one(engine, table)
    assert first.enqueued
    again = one(engine, table)
    assert (again.enqueued, again.job_id) == (False, first.job_id)
    assert one(engine, table, account=8).enqueued, "another key is another job"
    with queue_session(table, bind=engine, timeout=5, where=table.c.account == 7) as job:
        assert job is not None
        # running: on Q4M another connection cannot see the owned row; the key still holds
        running = one(engine, table)
        assert (running.enqueued, running.job_id) == (False, first.job_id)
    after = one(engine, table)
    assert after.enqueued and after.job_id != first.job_id
    with engine.connect() as conn:
        assert count_keys(conn, table.name) == 2


def test_a_job_that_is_aborted_keeps_its_key(setup: tuple[Engine, Table, str]) -> None:
    engine, table, _ = setup
    first = one(engine, table)
    session = queue_session(table, bind=engine, timeout=5)
    assert session.wait() is not None
    session.abort()
    assert one(engine, table).job_id == first.job_id
    assert jobs_in(engine, table) == 1


class Failing(Job):
    max_attempts = 1
    wait_timeout = 2.0

    def execute(self, job: Any) -> None:
        raise RuntimeError("boom")


class FailingTwice(Job):
    max_attempts = 3
    retry_base = 60.0
    wait_timeout = 2.0

    def execute(self, job: Any) -> None:
        raise RuntimeError("boom")


def test_a_dead_lettered_job_releases_its_key_and_a_retry_keeps_it(
    setup: tuple[Engine, Table, str],
) -> None:
    engine, table, _ = setup
    dead_name = f"tuqdead_{uuid.uuid4().hex[:8]}"
    try:
        first = one(engine, table)
        retrying = FailingTwice(engine, model=table, dead_letter_table=dead_name)
        assert retrying.run_once()
        retrying.close()
        # the retry copy (a new job id, due in a minute) holds the key now
        held = one(engine, table)
        assert not held.enqueued and held.job_id != first.job_id
        with engine.begin() as conn:  # make the copy due at once
            conn.execute(delete(table))
        fresh = one(engine, table)
        assert fresh.enqueued, "the copy is gone: its key is free"
        dying = Failing(engine, model=table, dead_letter_table=dead_name)
        assert dying.run_once()
        dying.close()
        with engine.connect() as conn:
            assert count_keys(conn, table.name) == 0
        assert one(engine, table).enqueued
    finally:
        dead_letter_table(dead_name).drop(engine, checkfirst=True)


OWNER = textwrap.dedent(
    """
    import sys, time
    from sqlalchemy import Column, Integer, MetaData, create_engine
    from sqlalchemy.pool import NullPool
    from sqlalchemy_q4m import queue_session, queue_table
    from sqlalchemy_q4m.schema.retry import retry_columns

    url, name = sys.argv[1], sys.argv[2]
    engine = create_engine(url, poolclass=NullPool)
    table = queue_table(name, MetaData(), Column("account", Integer, nullable=False),
                        *retry_columns())
    with queue_session(table, bind=engine, timeout=30) as job:
        print("owned", flush=True)
        time.sleep(600)
    """
)


def test_a_sigkilled_owner_returns_the_job_with_its_key_and_the_next_end_releases_it(
    setup: tuple[Engine, Table, str],
) -> None:
    engine, table, url = setup
    first = one(engine, table)
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER, url, table.name],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert owner.stdout is not None
        assert owner.stdout.readline() == b"owned\n", owner.stderr
        assert one(engine, table).job_id == first.job_id, "running in another process: held"
        owner.send_signal(signal.SIGKILL)
        owner.communicate(timeout=30)
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.communicate()
    # the server returns the job: still held, by the same job
    assert one(engine, table).job_id == first.job_id
    with queue_session(table, bind=engine, timeout=30) as job:
        assert job is not None
    assert one(engine, table).enqueued


def test_an_enqueuer_killed_between_the_key_and_the_job_does_not_block_the_key(
    setup: tuple[Engine, Table, str],
) -> None:
    """Q4M: the key commits before the job's INSERT; an enqueuer SIGKILLed in between leaves
    a key naming a job that never came.  Portable: key and job are one transaction."""
    engine, table, url = setup
    script = textwrap.dedent(
        """
        import os, signal, sys
        from sqlalchemy import Column, Integer, MetaData, create_engine
        from sqlalchemy.pool import NullPool
        from sqlalchemy_q4m import enqueue, queue_table
        from sqlalchemy_q4m.producer import unique
        from sqlalchemy_q4m.schema.retry import retry_columns

        url, name = sys.argv[1], sys.argv[2]
        engine = create_engine(url, poolclass=NullPool)
        table = queue_table(name, MetaData(), Column("account", Integer, nullable=False),
                            *retry_columns())
        real = unique.insert  # the job's INSERT: the process dies right before it
        unique.insert = lambda t: os.kill(os.getpid(), signal.SIGKILL) if t is table else real(t)
        enqueue(engine, table, [{"account": 7}], unique_key=lambda r: "sync:7")
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, url, table.name], capture_output=True, timeout=60
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert jobs_in(engine, table) == 0
    result = one(engine, table)
    assert result.enqueued
    assert jobs_in(engine, table) == 1


def test_a_key_whose_job_ended_without_deleting_it_is_free(
    setup: tuple[Engine, Table, str],
) -> None:
    """A worker that died after ``queue_end`` and before deleting the key."""
    engine, table, _ = setup
    assert one(engine, table).enqueued
    with engine.begin() as conn:
        conn.execute(delete(table))
    with engine.connect() as conn:
        assert count_keys(conn, table.name) == 1
    assert one(engine, table).enqueued
    assert jobs_in(engine, table) == 1


@pytest.mark.unit
def test_a_key_is_a_short_string() -> None:
    engine = create_engine("mysql+pymysql://nobody@127.0.0.1:1/none")  # never connected
    table = queue_table("tuq_bad", MetaData(), Column("account", Integer))
    with pytest.raises(UniqueKeyError):
        enqueue(engine, table, [{"account": 1}], unique_key=lambda r: 42)  # type: ignore[arg-type,return-value]
    with pytest.raises(UniqueKeyError):
        enqueue(engine, table, [{"account": 1}], unique_key=lambda r: "x" * 192)


def test_a_keys_table_dropped_under_a_worker_does_not_fail_its_jobs(engine: Engine) -> None:
    name = f"tuqdrop_{uuid.uuid4().hex[:8]}"
    metadata = MetaData()
    table = queue_table(name, metadata, Column("account", Integer, nullable=False))
    metadata.create_all(engine)
    try:
        assert one(engine, table).enqueued  # the keys table exists, and is known to
        enqueue(engine, table, [{"account": 1}])
        KEYS.drop(engine)
        for _ in range(2):
            with queue_session(table, bind=engine, timeout=5) as job:
                assert job is not None
        assert jobs_in(engine, table) == 0
        assert one(engine, table).enqueued, "made again"
    finally:
        table.drop(engine)
        with engine.begin() as conn:
            conn.execute(delete(KEYS).where(KEYS.c.queue == name))


def test_portable_key_and_job_commit_or_roll_back_with_the_callers_session(
    engine: Engine,
) -> None:
    from sqlalchemy.orm import Session

    name = f"tuqtx_{uuid.uuid4().hex[:8]}"
    metadata = MetaData()
    table = queue_table(name, metadata, Column("account", Integer, nullable=False))
    metadata.create_all(engine)
    try:
        with Session(engine) as session:
            (first,) = enqueue(session, table, [{"account": 7}], unique_key=key_of)
            assert first.enqueued
            session.rollback()
        assert jobs_in(engine, table) == 0
        with engine.connect() as conn:
            assert count_keys(conn, name) == 0
        with Session(engine) as session:
            results = enqueue(session, table, [{"account": 7}, {"account": 7}], unique_key=key_of)
            session.commit()
        assert [r.enqueued for r in results] == [True, False]
        assert results[0].job_id == results[1].job_id
        assert jobs_in(engine, table) == 1
    finally:
        table.drop(engine)
        with engine.begin() as conn:
            conn.execute(delete(KEYS).where(KEYS.c.queue == name))
