"""Listen/notify: the tagged, guarded wait (compiled SQL) and wake-ups on the real server."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Column
from sqlalchemy import Connection
from sqlalchemy import Engine
from sqlalchemy import Integer
from sqlalchemy import MetaData
from sqlalchemy import create_engine
from sqlalchemy import event
from sqlalchemy import insert
from sqlalchemy import select
from sqlalchemy import text
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import URL
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from sqlalchemy_q4m import Job
from sqlalchemy_q4m import QueueSession
from sqlalchemy_q4m import queue_session
from sqlalchemy_q4m import queue_table
from sqlalchemy_q4m.backends.listeners import LISTENERS_RECHECK
from sqlalchemy_q4m.backends.listeners import anchor_for
from sqlalchemy_q4m.backends.listeners import announce
from sqlalchemy_q4m.backends.notify import notify
from sqlalchemy_q4m.backends.notify import notify_committed
from sqlalchemy_q4m.backends.wakeup import like_pattern
from sqlalchemy_q4m.backends.wakeup import listen_wait
from sqlalchemy_q4m.backends.wakeup import listening_supported
from sqlalchemy_q4m.backends.wakeup import wait_statement
from sqlalchemy_q4m.backends.wakeup import wait_tag
from sqlalchemy_q4m.exc import Q4MError
from sqlalchemy_q4m.schema.functions import subscriptions
from sqlalchemy_q4m.types import new_job_id

meta = MetaData()
#: Seconds within which a woken consumer has its job: far below the listen timeouts (5 s) the
#: wake tests use, so it tells a wake from a timeout on a loaded machine (speed is measured by
#: the benchmark, not asserted here).
WOKEN = 2.0

jobs = queue_table("tn_jobs", meta, Column("n", Integer))
other = queue_table("tn_other", meta, Column("n", Integer))
idle = queue_table("tn_idle", meta, Column("n", Integer))


def mariadb() -> Any:
    dialect = mysql.dialect()
    dialect.is_mariadb = True
    dialect.default_schema_name = "db"
    return dialect


# -- unit ----------------------------------------------------------------------------------


@pytest.mark.unit
def test_wait_statement_is_tagged_guarded_and_out_of_the_slow_log() -> None:
    subs = subscriptions([jobs, other], {other: other.c.n.in_([1, 2])})
    stmt = wait_statement(subs, "q4m_anchor_1_ab", 2.5, mariadb())
    sql = " ".join(str(stmt.compile(dialect=mariadb())).split())
    assert sql == (
        "/* q4m:wait db.tn_jobs db.tn_other */ SET STATEMENT long_query_time=86400 FOR "
        "SELECT get_lock(%s, %s) AS get_lock_1 FROM DUAL WHERE "
        "NOT (EXISTS (SELECT 1 FROM tn_jobs ORDER BY tn_jobs.id LIMIT %s "
        "FOR UPDATE SKIP LOCKED)) AND "
        "NOT (EXISTS (SELECT 1 FROM tn_other WHERE tn_other.n IN (__[POSTCOMPILE_n_1]) "
        "ORDER BY tn_other.id LIMIT %s FOR UPDATE SKIP LOCKED))"
    )
    params = stmt.compile(dialect=mariadb()).params
    assert params["q4m_anchor"] == "q4m_anchor_1_ab" and params["q4m_seconds"] == 2.5


@pytest.mark.unit
def test_tag_and_like_pattern() -> None:
    subs = subscriptions([jobs, other])
    assert wait_tag(subs, mariadb()) == "/* q4m:wait db.tn_jobs db.tn_other */"
    assert like_pattern(subs[1], mariadb()) == "/* q4m:wait% db.tn!_other %"
    odd = mariadb()
    odd.default_schema_name = "odd */ db"  # table names are validated; database names not
    tag = wait_tag(subs, odd)
    assert tag.count("*/") == 1 and "odd" not in tag  # digests, not the raw names


@pytest.mark.unit
def test_anchor_name_is_validated() -> None:
    with pytest.raises(Q4MError):
        wait_statement(subscriptions([jobs]), "x'); DROP TABLE t; --", 1.0, mariadb())


@pytest.mark.unit
@pytest.mark.parametrize("listen", [0, -1.0])
def test_listen_must_be_positive(listen: float) -> None:
    engine = create_engine("sqlite://")
    with pytest.raises(Q4MError, match="listen"):
        QueueSession(jobs, bind=engine, listen=listen)

    class Tn(Job):
        model = jobs

    with pytest.raises(Q4MError, match="listen"):
        Tn(engine, listen=listen)


@pytest.mark.unit
def test_notify_is_a_no_op_off_mariadb() -> None:
    assert not listening_supported(mysql.dialect())
    assert listening_supported(mariadb())
    assert notify(create_engine("sqlite://"), jobs) == 0
    with pytest.raises(Q4MError, match="jobs"):
        notify(create_engine("sqlite://"), jobs, jobs=0)


# -- integration ---------------------------------------------------------------------------


@pytest.fixture
def db(engine: Engine) -> Iterator[Engine]:
    meta.drop_all(engine)
    meta.create_all(engine)
    with engine.connect() as conn:
        if not listening_supported(conn.dialect):  # pragma: no cover
            pytest.skip("listen/notify needs MariaDB")
    yield engine
    meta.drop_all(engine)


def put(engine: Engine, n: int = 1) -> None:
    with engine.begin() as conn:
        conn.execute(insert(jobs), [{"id": new_job_id(), "n": i} for i in range(n)])


def waiting(engine: Engine, table: str = "tn_jobs") -> bool:
    with engine.connect() as conn:
        found = conn.execute(
            text(
                "SELECT COUNT(*) FROM information_schema.PROCESSLIST "
                "WHERE COMMAND = 'Query' AND INFO LIKE :p"
            ),
            {"p": f"/* q4m:wait%{table}%"},
        ).scalar()
    return bool(found)


def settled(engine: Engine) -> None:
    """Wait until this process has listened for longer than ``LISTENERS_RECHECK``: its waits
    then last their full ``listen`` (before, they end by then; see ``Anchor.bound``)."""
    anchor = anchor_for(engine)
    announce(anchor, [engine.url.database or ""])
    announced = anchor.slots[engine.url.database or ""][1]
    time.sleep(max(0.0, announced + LISTENERS_RECHECK - time.monotonic()))


def until(check: Any, limit: float = 5.0) -> None:
    deadline = time.monotonic() + limit
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


class Consumer(threading.Thread):
    """One queue_session wait in a thread; records when it got its job."""

    def __init__(self, engine: Engine | Connection, **options: Any) -> None:
        super().__init__(daemon=True)
        self.engine, self.options = engine, options
        self.got: float | None = None
        self.job: Any = None

    def run(self) -> None:
        with queue_session(jobs, bind=self.engine, **self.options) as job:
            self.got, self.job = time.monotonic(), job


@pytest.mark.integration
def test_a_notified_job_is_picked_up_at_once(db: Engine) -> None:
    latencies = []
    for _ in range(3):
        consumer = Consumer(db, timeout=10, listen=5)
        consumer.start()
        until(lambda: waiting(db))
        put(db)
        committed = time.monotonic()
        assert notify(db, jobs) == 1
        consumer.join(5)
        assert consumer.job is not None and consumer.got is not None
        latencies.append(consumer.got - committed)
    print(f"notified pickup: {[round(x * 1000, 1) for x in latencies]} ms")
    assert max(latencies) < WOKEN  # woken, not the 5 s listen timeout (speed: the benchmark)


@pytest.mark.integration
def test_without_notify_the_job_waits_for_the_listen_timeout(db: Engine) -> None:
    settled(db)
    consumer = Consumer(db, timeout=5, listen=0.5)
    consumer.start()
    until(lambda: waiting(db))
    started = time.monotonic()
    put(db)
    consumer.join(5)
    assert consumer.job is not None and consumer.got is not None
    assert 0.2 < consumer.got - started < 3.0  # after GET_LOCK timed out, before timeout=5


@pytest.mark.integration
def test_a_job_committed_before_the_wait_is_seen_by_its_guard(db: Engine) -> None:
    subs = subscriptions([jobs])
    with db.connect() as conn:
        conn.execution_options(isolation_level="READ COMMITTED")
        assert conn.execute(select(jobs.c.id)).first() is None  # the "empty claim"
        put(db)  # committed between the empty claim and the wait
        started = time.monotonic()
        assert listen_wait(conn, subs, 5.0) is True  # roll back, then claim
        assert time.monotonic() - started < WOKEN  # not the 5 s wait
        with db.connect() as probe:  # the guard holds the job until the rollback
            skip = select(jobs.c.id).with_for_update(skip_locked=True)
            assert probe.execute(skip).first() is None
            probe.rollback()
            conn.rollback()
            assert probe.execute(skip).first() is not None


@pytest.mark.integration
def test_a_dead_anchor_is_replaced(db: Engine, db_url: URL) -> None:
    subs = subscriptions([jobs])
    anchor = anchor_for(db)
    admin = create_engine(db_url, poolclass=NullPool)
    with admin.connect() as conn:
        conn.execute(text(f"KILL {int(anchor.thread_id)}"))
    with db.connect() as conn:
        conn.execution_options(isolation_level="READ COMMITTED")
        started = time.monotonic()
        assert listen_wait(conn, subs, 5.0) is False  # GET_LOCK got the dead anchor's lock
        assert time.monotonic() - started < WOKEN  # not the 5 s wait
        assert conn.execute(text("SELECT IS_USED_LOCK(:n)"), {"n": anchor.name}).scalar() is None
        fresh = anchor_for(db)
        assert fresh is not anchor and fresh.name != anchor.name
        started = time.monotonic()
        assert listen_wait(conn, subs, 0.3) is False  # blocks again, on the new anchor
        assert time.monotonic() - started >= 0.25
        conn.rollback()
    admin.dispose()


@pytest.mark.integration
def test_notify_without_waiters_wakes_nobody(db: Engine) -> None:
    consumer = Consumer(db, timeout=2, listen=1)
    consumer.start()
    until(lambda: waiting(db))
    assert notify(db, idle) == 0
    assert notify(db, other, jobs=3) == 0
    put(db)
    assert notify(db, jobs, jobs=3) == 1  # one waiter
    consumer.join(5)
    assert consumer.job is not None


@pytest.mark.integration
def test_notify_refuses_an_uncommitted_connection_and_session(db: Engine) -> None:
    with db.connect() as conn:
        conn.execute(text("SELECT 1"))
        with pytest.raises(Q4MError, match="after the commit"):
            notify(conn, jobs)
        conn.commit()
        assert notify(conn, jobs) == 0 and not conn.in_transaction()
    with Session(db) as session:
        session.execute(text("SELECT 1"))
        with pytest.raises(Q4MError, match="after the commit"):
            notify(session, jobs)
        session.commit()
        assert notify(session, jobs) == 0


def counting(db_url: URL) -> tuple[Engine, list[str]]:
    engine = create_engine(db_url, poolclass=NullPool)
    statements: list[str] = []

    @event.listens_for(engine, "before_cursor_execute")
    def _count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    return engine, statements


@pytest.mark.integration
def test_an_idle_listening_consumer_sends_two_statements_per_listen(
    db: Engine, db_url: URL
) -> None:
    engine, statements = counting(db_url)
    with engine.connect() as conn:  # connect and detect first: only the waits are counted
        conn.execution_options(isolation_level="READ COMMITTED")
        queue_session(jobs, bind=conn, timeout=0).wait()
        settled(engine)
        statements.clear()
        started = time.monotonic()
        assert queue_session(jobs, bind=conn, timeout=2, listen=0.5).wait() is None
        elapsed = time.monotonic() - started
    waits = [s for s in statements if s.startswith("/* q4m:wait")]
    rate = len(statements) / elapsed
    print(
        f"idle listening consumer: {rate:.1f} statements/s ({len(statements)} in {elapsed:.2f} s)"
    )
    assert 1.9 < elapsed < 4.0 and len(waits) == 4
    assert len(statements) <= 9  # 4 claims + 4 waits (+ the claim at the deadline)
    engine.dispose()


@pytest.mark.integration
def test_the_callers_transaction_falls_back_to_polling(db: Engine, db_url: URL) -> None:
    engine, statements = counting(db_url)
    with engine.connect() as conn:
        conn.execution_options(isolation_level="READ COMMITTED")
        conn.execute(text("SELECT 1"))  # the caller's transaction
        statements.clear()
        started = time.monotonic()
        assert (
            queue_session(jobs, bind=conn, timeout=0.3, listen=5, poll_interval=0.05).wait() is None
        )
        assert time.monotonic() - started < 4.0  # polled until timeout=0.3, not listen=5
        conn.rollback()
    assert statements and not any("q4m:wait" in s for s in statements)
    assert len(statements) >= 4  # polled
    engine.dispose()


class TnJob(Job):
    model = jobs
    listen = 5.0
    wait_timeout = 5.0

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.seen: list[Any] = []

    def execute(self, job: Any) -> None:
        self.seen.append(job)


@pytest.mark.integration
def test_a_listening_worker_runs_a_notified_job(db: Engine) -> None:
    worker = TnJob(db)
    done: list[float] = []
    thread = threading.Thread(
        target=lambda: worker.run_once() and done.append(time.monotonic()), daemon=True
    )
    thread.start()
    until(lambda: waiting(db))
    put(db)
    committed = time.monotonic()
    assert notify(db, jobs) == 1
    thread.join(5)
    assert done and done[0] - committed < WOKEN
    assert len(worker.seen) == 1
    worker.close()


@pytest.mark.unit
@pytest.mark.parametrize(
    ("argv", "env", "expected"), [(["--listen", "2.5"], None, 2.5), ([], "4", 4.0)]
)
def test_cli_listen_option(
    monkeypatch: pytest.MonkeyPatch, argv: list[str], env: str | None, expected: float
) -> None:
    from sqlalchemy_q4m.cli import commands as cli
    from sqlalchemy_q4m.cli import parser
    from sqlalchemy_q4m.cli import workers as cli_workers

    if env is not None:
        monkeypatch.setenv("Q4M_LISTEN", env)
    seen: list[Any] = []

    def fake_run_workers(config: Any, status_stream: Any = None) -> Any:
        seen.append(dict(config.job_options))
        return type("R", (), {"code": 0})()

    monkeypatch.setattr(cli_workers, "run_workers", fake_run_workers)
    assert cli.main(["worker", "--status", "never", *argv, "mod:Job"]) == 0
    assert seen == [{"listen": expected}]
    with pytest.raises(SystemExit):
        parser.build_parser().parse_args(["worker", "--listen", "0", "mod:Job"])


@pytest.mark.integration
def test_an_engine_bound_enqueue_notifies_after_its_commit(db: Engine) -> None:
    from sqlalchemy_q4m import enqueue

    consumer = Consumer(db, timeout=10, listen=5)
    consumer.start()
    until(lambda: waiting(db))
    started = time.monotonic()
    enqueue(db, jobs, [{"n": 1}])
    consumer.join(5)
    assert consumer.got is not None and consumer.got - started < WOKEN
    settled(db)
    consumer = Consumer(db, timeout=10, listen=0.5)
    consumer.start()
    until(lambda: waiting(db))
    started = time.monotonic()
    enqueue(db, jobs, [{"n": 2}], notify=False)
    consumer.join(5)
    assert consumer.got is not None and consumer.got - started > 0.2  # the listen timeout


@pytest.mark.unit
def test_an_anchor_that_cannot_connect_raises_a_dbapi_error() -> None:
    from sqlalchemy.exc import DBAPIError

    engine = create_engine("mysql+pymysql://root@127.0.0.1:1/nowhere")
    with pytest.raises(DBAPIError):
        anchor_for(engine)
    engine.dispose()


@pytest.mark.integration
def test_q4m_enqueue_wakes_a_listening_consumer(db: Engine, db_url: URL) -> None:
    from sqlalchemy_q4m.cli import commands as cli

    consumer = Consumer(db, timeout=10, listen=5)
    consumer.start()
    until(lambda: waiting(db))
    started = time.monotonic()
    url = db_url.render_as_string(hide_password=False)
    assert cli.main(["enqueue", "tn_jobs", "--url", url, "--json", '{"n": 3}']) == 0
    consumer.join(5)
    assert consumer.job is not None and consumer.job.n == 3
    assert consumer.got is not None and consumer.got - started < WOKEN  # not the 5 s listen


@pytest.mark.integration
def test_notify_wakes_jobs_plus_one_of_several_waiters(db: Engine) -> None:
    consumers = [Consumer(db, timeout=10, listen=5) for _ in range(4)]
    for consumer in consumers:
        consumer.start()

    def count() -> int:
        with db.connect() as conn:
            return int(
                conn.execute(
                    text(
                        "SELECT COUNT(*) FROM information_schema.PROCESSLIST "
                        "WHERE COMMAND = 'Query' AND INFO LIKE '/* q4m:wait%tn_jobs%'"
                    )
                ).scalar_one()
            )

    until(lambda: count() == 4)
    put(db, 2)
    committed = time.monotonic()
    assert notify(db, jobs, jobs=2) == 3
    until(lambda: sum(c.job is not None for c in consumers) == 2, 2.0)
    assert max(c.got or 0 for c in consumers) - committed < WOKEN
    # the spare woken consumer found nothing: it claims again and goes back to waiting
    until(lambda: count() == 2)
    put(db, 2)
    assert notify(db, jobs, jobs=2) == 2  # the two still waiting
    for consumer in consumers:
        consumer.join(5)
    assert all(c.job is not None for c in consumers)


def _child_anchor(url: URL, out: Any) -> None:
    engine = create_engine(url, poolclass=NullPool)
    anchor = anchor_for(engine)
    out.put((anchor.name, anchor.thread_id))


@pytest.mark.integration
def test_a_forked_child_makes_its_own_anchor(db: Engine, db_url: URL) -> None:
    import multiprocessing

    parent = anchor_for(db)
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    child = ctx.Process(target=_child_anchor, args=(db_url, out))
    child.start()
    name, thread_id = out.get(timeout=10)
    child.join(10)
    assert name != parent.name and thread_id != parent.thread_id
    with db.connect() as conn:
        held = conn.execute(text("SELECT IS_USED_LOCK(:n)"), {"n": parent.name}).scalar()
    assert held == parent.thread_id and anchor_for(db) is parent


@pytest.mark.integration
def test_a_listening_batch_is_woken(db: Engine) -> None:
    from sqlalchemy_q4m import queue_batch

    got: list[float] = []

    def run() -> None:
        with queue_batch(jobs, bind=db, size=10, timeout=10, listen=5) as batch:
            got.append(time.monotonic())
            for job in batch:
                batch.end(job)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    until(lambda: waiting(db))
    put(db, 3)
    committed = time.monotonic()
    assert notify(db, jobs, jobs=3) == 1
    thread.join(5)
    assert got and got[0] - committed < WOKEN


@pytest.mark.integration
def test_a_wake_that_fails_after_the_commit_is_logged_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Raising would look like a failed enqueue, and a retry would enqueue the jobs twice."""
    unreachable = create_engine("mysql+pymysql://root@127.0.0.1:1/test", poolclass=NullPool)
    try:
        with caplog.at_level("WARNING", logger="sqlalchemy_q4m.notify"):
            assert notify_committed(unreachable, jobs, jobs=3) == 0
    finally:
        unreachable.dispose()
    assert "3 committed job(s) wait for the consumers' listen timeout" in caplog.text


@pytest.mark.integration
@pytest.mark.parametrize("driver", ["aiomysql", "asyncmy"])
def test_an_async_listening_consumer_is_woken(db: Engine, db_url: URL, driver: str) -> None:
    """The wait is awaited like any query; twice, on two event loops (a new loop gets a
    working anchor whatever became of the first loop's)."""
    from sqlalchemy.ext.asyncio import create_async_engine

    async def main() -> float:
        async_engine = create_async_engine(db_url.set(drivername=f"mysql+{driver}"))
        try:
            got: list[float] = []

            async def consumer() -> None:
                async with queue_session(jobs, bind=async_engine, timeout=10, listen=5) as job:
                    assert job is not None and job.n == 0
                    got.append(time.monotonic())

            task = asyncio.create_task(consumer())
            while not await asyncio.to_thread(waiting, db):
                await asyncio.sleep(0.02)
            put(db)
            committed = time.monotonic()
            assert await asyncio.to_thread(notify, db, jobs) == 1
            await asyncio.wait_for(task, 10)
            return got[0] - committed
        finally:
            await async_engine.dispose()

    for _ in range(2):
        assert asyncio.run(main()) < WOKEN  # woken, not the 5 s listen timeout
