"""What one ``enqueue(engine, Model, [row])`` sends, counted at the driver, against the raw
loop a user would write: INSERT + COMMIT (MariaDB, InnoDB) or one INSERT with autocommit
(Q4M).  Every command the driver sends is counted (statements, COMMIT, ROLLBACK, the pool's
reset-on-return ROLLBACK), so a count is deterministic; speed is the benchmark's business."""

from __future__ import annotations

import importlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import pymysql
import pytest
from native_support import private_database
from sqlalchemy import CheckConstraint
from sqlalchemy import Column
from sqlalchemy import Engine
from sqlalchemy import Integer
from sqlalchemy import MetaData
from sqlalchemy import String
from sqlalchemy import create_engine
from sqlalchemy import event
from sqlalchemy import func
from sqlalchemy import select
from sqlalchemy.engine import URL
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import ProgrammingError

from sqlalchemy_q4m import detect_backend
from sqlalchemy_q4m import enqueue
from sqlalchemy_q4m import queue_session
from sqlalchemy_q4m import queue_table
from sqlalchemy_q4m.backends.driver import dialect_cache
from sqlalchemy_q4m.backends.listeners import anchor_for
from sqlalchemy_q4m.backends.listeners import announce
from sqlalchemy_q4m.backends.wakeup import listening_supported
from sqlalchemy_q4m.ops import enqueue_rows
from sqlalchemy_q4m.types import new_job_id

#: The module holding ``LISTENERS_RECHECK`` (``sqlalchemy_q4m.backends.listeners``).
notify_module = importlib.import_module("sqlalchemy_q4m.backends.listeners")

meta = MetaData()
jobs = queue_table("tsc_jobs", meta, Column("n", Integer), Column("note", String(32)))
JOBS = 20


class Counting(pymysql.connections.Connection):  # type: ignore[misc]
    """A PyMySQL connection recording every command it sends (SQL text, COMMIT, ROLLBACK)."""

    sent: list[str] | None = None

    def _execute_command(self, command: int, sql: Any) -> Any:
        if Counting.sent is not None:
            raw = bytes(sql) if isinstance(sql, bytes | bytearray) else None
            text = raw.decode("utf-8", "replace") if raw is not None else str(sql)
            Counting.sent.append(text)
        return super()._execute_command(command, sql)


def connect_args(url: URL) -> dict[str, Any]:
    return {
        "host": url.host,
        "port": url.port or 3306,
        "user": url.username,
        "password": url.password or "",
        "database": url.database,
    }


def counting_engine(url: URL) -> Engine:
    """An engine as a user makes one (QueuePool, default reset-on-return), counting."""
    args = connect_args(url)
    return create_engine(url, creator=lambda: Counting(**args), pool_size=2)


def kinds(sent: list[str]) -> list[str]:
    """Each command as its first word (``INSERT``, ``COMMIT``, ``SELECT`` ...)."""
    return [s.split(None, 1)[0].upper() for s in sent]


def record(run: Any) -> list[str]:
    Counting.sent = []
    try:
        run()
        return Counting.sent
    finally:
        Counting.sent = None


def raw_loop(url: URL, autocommit: bool) -> list[str]:
    """The raw producer: one INSERT (+ COMMIT without autocommit) per job, one connection."""
    conn = Counting(**connect_args(url), autocommit=autocommit)
    sql = f"INSERT INTO {jobs.name} (id, n, note) VALUES (%s, %s, %s)"

    def run() -> None:
        with conn.cursor() as cur:
            for i in range(JOBS):
                cur.execute(sql, (new_job_id().bytes, i, "raw"))
                if not autocommit:
                    conn.commit()

    try:
        return record(run)
    finally:
        conn.close()


def library_loop(engine: Engine, **options: Any) -> list[str]:
    enqueue(engine, jobs, [{"n": -1, "note": "warm"}], **options)  # connect, detect, compile

    def run() -> None:
        for i in range(JOBS):
            enqueue(engine, jobs, [{"n": i, "note": "lib"}], **options)

    return record(run)


@pytest.fixture
def recheck_rarely(monkeypatch: pytest.MonkeyPatch) -> None:
    """Producers trust "nobody listens" for 60 s: a count that cannot depend on how slowly a
    loaded machine runs the loop (how often the answer is renewed is tested on its own)."""
    monkeypatch.setattr(notify_module, "LISTENERS_RECHECK", 60.0)


# -- MariaDB (portable) ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def db_url(server_url: URL) -> Iterator[URL]:
    """A database of this module's own: no other test's listener holds its slots."""
    with private_database(server_url, "q4m_counts") as url:
        yield url


@pytest.fixture
def portable(db_url: URL) -> Iterator[Engine]:
    eng = counting_engine(db_url)
    meta.drop_all(eng)
    meta.create_all(eng)
    with eng.connect() as conn:
        if not listening_supported(conn.dialect):  # pragma: no cover
            pytest.skip("needs MariaDB")
    yield eng
    meta.drop_all(eng)
    eng.dispose()


@pytest.mark.integration
@pytest.mark.usefixtures("recheck_rarely")
def test_one_job_per_call_sends_what_the_raw_loop_sends(portable: Engine, db_url: URL) -> None:
    raw = kinds(raw_loop(db_url, autocommit=False))
    assert raw == ["INSERT", "COMMIT"] * JOBS
    assert kinds(library_loop(portable)) == raw  # no reset ROLLBACK, no listener scan
    assert kinds(library_loop(portable, notify=False)) == raw
    with portable.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(jobs)) == 3 * JOBS + 2


@pytest.mark.integration
def test_whether_anybody_listens_is_asked_once_per_recheck_period(
    portable: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(notify_module, "LISTENERS_RECHECK", 0.3)
    time.sleep(0.35)
    sent = record(lambda: enqueue(portable, jobs, [{"n": 1}]))
    assert kinds(sent) == ["INSERT", "COMMIT", "SELECT", "ROLLBACK"]
    assert "is_used_lock('q4m_l_" in sent[2].lower()
    started = time.monotonic()
    sent = record(lambda: enqueue(portable, jobs, [{"n": 2}]))
    if time.monotonic() - started < 0.3:  # within the period: the answer is reused
        assert kinds(sent) == ["INSERT", "COMMIT"]
    time.sleep(0.35)
    assert kinds(record(lambda: enqueue(portable, jobs, [{"n": 3}])))[2:] == ["SELECT", "ROLLBACK"]


@pytest.mark.integration
@pytest.mark.usefixtures("recheck_rarely")
def test_with_a_listening_process_each_job_wakes_by_one_scan(portable: Engine, db_url: URL) -> None:
    enqueue(portable, jobs, [{"n": 0}])  # "nobody listens", trusted for 60 s
    listener = create_engine(db_url)
    try:
        anchor = anchor_for(listener)  # a process starts listening on this database:
        announce(anchor, [db_url.database or ""])  # it holds one of its listener slots
        dialect_cache(portable.dialect, "listeners").clear()  # as after the recheck period
        # the warm-up call asks once; then per job: the waiter scan (no waiter: no KILL) and
        # the ROLLBACK ending it, on the producer's own connection
        assert kinds(library_loop(portable)) == ["INSERT", "COMMIT", "SELECT", "ROLLBACK"] * JOBS
    finally:
        listener.dispose()


class Consumer(threading.Thread):
    def __init__(self, engine: Engine, **options: Any) -> None:
        super().__init__(daemon=True)
        self.engine, self.options = engine, options
        self.got: float | None = None
        self.job: Any = None

    def run(self) -> None:
        with queue_session(jobs, bind=self.engine, **self.options) as job:
            self.got, self.job = time.monotonic(), job


def waiting(engine: Engine) -> bool:
    from sqlalchemy import text

    with engine.connect() as conn:
        found = conn.execute(
            text(
                "SELECT COUNT(*) FROM information_schema.PROCESSLIST "
                "WHERE COMMAND = 'Query' AND INFO LIKE :p"
            ),
            {"p": f"/* q4m:wait%{jobs.name}%"},
        ).scalar()
    return bool(found)


@pytest.mark.integration
def test_a_listener_newer_than_the_producers_answer_still_gets_the_job(
    portable: Engine, db_url: URL, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The producer decided "nobody listens" before this consumer began to wait, and skips
    the wake; the consumer's waits end within the recheck period after it announced itself,
    so it claims the job then, not after its 20 s ``listen``."""
    monkeypatch.setattr(notify_module, "LISTENERS_RECHECK", 3.0)
    with portable.connect() as conn:
        conn.execute(jobs.delete())
        conn.commit()
    time.sleep(0.1)
    enqueue(portable, jobs, [{"n": 0, "note": "first"}])  # asks: nobody listens (for 3 s)
    with portable.connect() as conn:
        conn.execute(jobs.delete())
        conn.commit()
    listener = create_engine(db_url)
    try:
        consumer = Consumer(listener, timeout=30, listen=20)
        consumer.start()
        deadline = time.monotonic() + 2.5
        while not waiting(portable):
            assert time.monotonic() < deadline, "the consumer did not start waiting in time"
            time.sleep(0.005)
        sent = record(lambda: enqueue(portable, jobs, [{"n": 7, "note": "late"}]))
        committed = time.monotonic()
        assert kinds(sent) == ["INSERT", "COMMIT"]  # the stale "nobody": no wake was sent
        consumer.join(15)
        assert consumer.job is not None and consumer.job.n == 7
        assert consumer.got is not None and consumer.got - committed < 10  # not listen=20
    finally:
        listener.dispose()


# -- Q4M (native) ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def q4m_db(q4m_url: URL) -> Iterator[URL]:
    with private_database(q4m_url, "q4m_counts") as url:
        yield url


@pytest.fixture
def native(q4m_db: URL) -> Iterator[Engine]:
    eng = counting_engine(q4m_db)
    with eng.connect() as conn:
        assert detect_backend(conn) == "native"
    meta.drop_all(eng)
    meta.create_all(eng)
    yield eng
    meta.drop_all(eng)
    eng.dispose()


@pytest.mark.native
@pytest.mark.integration
def test_native_one_job_per_call_sends_what_the_raw_loop_sends(native: Engine, q4m_db: URL) -> None:
    raw = kinds(raw_loop(q4m_db, autocommit=True))
    assert raw == ["INSERT"] * JOBS
    assert kinds(library_loop(native)) == raw  # Q4M rows need no COMMIT; nothing to wake
    with native.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(jobs)) == 2 * JOBS + 1


# -- the Engine path's transaction and errors ------------------------------------------------

checked = queue_table("tsc_checked", meta, Column("n", Integer, CheckConstraint("n < 100")))


@pytest.mark.integration
@pytest.mark.usefixtures("recheck_rarely")
@pytest.mark.parametrize("observed", [False, True], ids=["pool", "connection"])
def test_an_engine_bound_enqueue_is_one_transaction(
    portable: Engine, db_url: URL, observed: bool
) -> None:
    """Directly on the pool's connection (nothing observes) or through a Connection (a
    statement listener): the same commands, and the chunks commit or roll back together."""
    seen: list[str] = []
    if observed:
        event.listen(portable, "before_cursor_execute", lambda *a: seen.append(a[2]))
    raw = kinds(raw_loop(db_url, autocommit=False))
    assert kinds(library_loop(portable)) == raw
    inserts = [s for s in seen if s.startswith("INSERT")]
    assert len(inserts) == (JOBS + 1 if observed else 0)  # the listener saw every INSERT
    rows = [{"n": n} for n in (1, 2, 3, 4, 100)]  # the last breaks the CHECK, in chunk 3

    def failing() -> None:
        with pytest.raises(OperationalError, match="tsc_checked"):  # MariaDB's error 4025
            enqueue(portable, checked, rows, chunk_size=2)

    sent = record(failing)
    assert kinds(sent) == ["INSERT", "INSERT", "INSERT", "ROLLBACK"]
    with portable.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(checked)) == 0  # all or nothing
    assert len(enqueue(portable, checked, rows[:4], chunk_size=2)) == 4
    with portable.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(checked)) == 4


@pytest.mark.integration
def test_an_engine_bound_enqueue_raises_sqlalchemy_errors_and_keeps_the_pool_usable(
    portable: Engine,
) -> None:
    missing = queue_table("tsc_never_created", MetaData(), Column("n", Integer))
    with pytest.raises(ProgrammingError, match="tsc_never_created"):
        enqueue(portable, missing, [{"n": 1}])
    assert len(enqueue(portable, jobs, [{"n": 1}])) == 1  # the connection went back clean
    with portable.connect() as conn:
        assert conn.scalar(select(1)) == 1


@pytest.mark.integration
def test_asking_whether_anybody_listens_leaves_a_connection_out_of_a_transaction(
    portable: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``ops.enqueue_rows`` on a Connection out of a transaction commits its rows, then asks
    whether anybody listens.  That look-up is rolled back even when nobody does: left open,
    the next call on the connection would take it for the caller's transaction and commit
    nothing, and its jobs would vanish when the connection closed (the demo's producer lost
    its second batch this way)."""
    monkeypatch.setattr(notify_module, "LISTENERS_RECHECK", 0.0)  # ask on every call
    with portable.connect() as conn:
        for n in range(3):
            enqueue_rows(conn, jobs, [{"n": n, "note": "conn"}])
            assert not conn.in_transaction()
    with portable.connect() as conn:
        notes = conn.scalars(select(jobs.c.n).where(jobs.c.note == "conn").order_by(jobs.c.n))
        assert list(notes) == [0, 1, 2]
