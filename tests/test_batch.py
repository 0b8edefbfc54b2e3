"""``queue_batch``: many jobs per transaction on the portable backend, each finished on its own.

Claim limits and FIFO order, end/abort/unhandled jobs, ``handle()``, exceptions leaving the
block, disjoint concurrent batches, a killed connection returning every job (ended ones too),
deadlock and lock-wait handling at completion, writes committing with the batch, Core tables,
conditions, the timeout, and the native backend degrading to one job at a time.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any
from typing import ClassVar

import pymysql
import pytest
from sqlalchemy import Column
from sqlalchemy import Engine
from sqlalchemy import Integer
from sqlalchemy import MetaData
from sqlalchemy import Text
from sqlalchemy import create_engine
from sqlalchemy import event
from sqlalchemy import func
from sqlalchemy import insert
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
from sqlalchemy_q4m import queue_table
from sqlalchemy_q4m.consumer.batch import QueueBatch
from sqlalchemy_q4m.consumer.batch import queue_batch
from sqlalchemy_q4m.exc import CompletionFailed
from sqlalchemy_q4m.exc import NotOwner
from sqlalchemy_q4m.exc import Q4MError


class Base(DeclarativeBase):
    pass


class BatchJob(QueueMixin, Base):
    __tablename__ = "tb_batch_jobs"
    n: Mapped[int] = mapped_column(Integer)


class Note(Base):
    __tablename__ = "tb_notes"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    text: Mapped[str] = mapped_column(Text)


core_md = MetaData()
core_jobs = queue_table("tb_core_jobs", core_md, Column("payload", Text))


@pytest.fixture(scope="module")
def tables(engine: Engine) -> Iterator[Engine]:
    Base.metadata.create_all(engine)
    core_md.create_all(engine)
    yield engine
    Base.metadata.drop_all(engine)
    core_md.drop_all(engine)


@pytest.fixture
def db(tables: Engine) -> Iterator[Engine]:
    def clean() -> None:
        with tables.begin() as conn:
            for table in [*Base.metadata.sorted_tables, core_jobs]:
                conn.execute(table.delete())

    clean()
    yield tables
    clean()


def enqueue(engine: Engine, count: int, start: int = 0) -> list[uuid.UUID]:
    jobs = [BatchJob(n=start + i) for i in range(count)]
    with Session(engine, expire_on_commit=False) as s:
        for job in jobs:  # one by one: ids (UUIDv7) rise in this order
            s.add(job)
            s.flush()
        s.commit()
    return [job.id for job in jobs]


def numbers(engine: Engine) -> list[int]:
    """The ``n`` of every job still in the queue, owned or not."""
    with Session(engine) as s:
        return sorted(s.scalars(select(BatchJob.n)))


def claimable(engine: Engine) -> list[int]:
    """The ``n`` of the jobs another consumer could take right now."""
    with engine.connect() as conn, conn.begin():
        stmt = select(BatchJob.n).with_for_update(skip_locked=True)
        return sorted(conn.execute(stmt).scalars())


# -- arguments -----------------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"size": 0}, "size"),
        ({"size": 10_001}, "size"),
        ({"size": True}, "size"),
        ({"size": 2.5}, "size"),
        ({"timeout": -1}, "timeout"),
        ({"poll_interval": 0}, "poll_interval"),
        ({"backend": "bogus"}, "unknown queue backend"),
    ],
)
def test_bad_arguments_are_refused(kw: dict[str, Any], match: str) -> None:
    eng = create_engine("mysql+pymysql://u@127.0.0.1:1/none")
    with pytest.raises(Q4MError, match=match):
        QueueBatch(BatchJob, bind=eng, **kw)


@pytest.mark.unit
def test_a_session_bind_is_refused() -> None:
    eng = create_engine("mysql+pymysql://u@127.0.0.1:1/none")
    with pytest.raises(Q4MError, match="Engine or a Connection"), Session(eng) as s:
        QueueBatch(BatchJob, bind=s)  # type: ignore[arg-type]


# -- the portable backend ------------------------------------------------------------------------


@pytest.mark.integration
def test_claims_up_to_size_in_fifo_order(db: Engine) -> None:
    enqueue(db, 7)
    with queue_batch(BatchJob, bind=db, size=5, timeout=1) as batch:
        assert [job.n for job in batch] == [0, 1, 2, 3, 4]
        assert claimable(db) == [5, 6]  # held rows are invisible to other consumers
        for job in batch:
            batch.end(job)
    assert numbers(db) == [5, 6]
    with queue_batch(BatchJob, bind=db, size=5, timeout=1) as batch:
        assert [job.n for job in batch] == [5, 6]  # it never waits to fill the batch
        for job in batch:
            batch.end(job)
    assert numbers(db) == []


@pytest.mark.integration
def test_end_abort_and_unhandled(db: Engine) -> None:
    enqueue(db, 4)
    with queue_batch(BatchJob, bind=db, size=4, timeout=1) as batch:
        jobs = list(batch)
        batch.end(jobs[0])
        batch.end(jobs[2])
        batch.abort(jobs[1])  # returned; jobs[3] is left unhandled: returned too
        assert batch.pending == [jobs[3]]
        assert claimable(db) == []  # aborted rows stay locked until the batch ends
    assert numbers(db) == [1, 3]
    assert claimable(db) == [1, 3]


@pytest.mark.integration
def test_handle_ends_aborts_and_reraises(db: Engine) -> None:
    enqueue(db, 3)
    with queue_batch(BatchJob, bind=db, size=3, timeout=1) as batch:
        a, b, c = batch
        with batch.handle(a):
            pass
        with batch.handle(b):
            raise QueueAbort()
        with pytest.raises(ZeroDivisionError), batch.handle(c):
            1 / 0  # noqa: B018
        assert batch.pending == []
    assert numbers(db) == [1, 2]


@pytest.mark.integration
def test_an_exception_leaving_the_block_commits_the_ended_and_returns_the_rest(
    db: Engine,
) -> None:
    enqueue(db, 3)
    with pytest.raises(RuntimeError, match="boom"), queue_batch(BatchJob, bind=db, size=3) as batch:
        first, *_ = batch
        batch.end(first)
        raise RuntimeError("boom")
    assert numbers(db) == [1, 2]
    assert claimable(db) == [1, 2]


@pytest.mark.integration
def test_queue_abort_leaving_the_block_is_swallowed(db: Engine) -> None:
    enqueue(db, 2)
    with queue_batch(BatchJob, bind=db, size=2, timeout=1) as batch:
        batch.end(next(iter(batch)))
        raise QueueAbort()
    assert numbers(db) == [1]


@pytest.mark.integration
def test_finishing_a_job_twice_or_a_stranger_is_refused(db: Engine) -> None:
    enqueue(db, 1)
    with queue_batch(BatchJob, bind=db, size=2, timeout=1) as batch:
        (job,) = batch
        batch.end(job)
        with pytest.raises(NotOwner):
            batch.abort(job)
        with pytest.raises(NotOwner):
            batch.end(BatchJob(n=99))
    with pytest.raises(NotOwner):
        batch.end(job)
    assert numbers(db) == []


@pytest.mark.integration
def test_concurrent_batches_hold_disjoint_jobs(db: Engine) -> None:
    enqueue(db, 8)
    with queue_batch(BatchJob, bind=db, size=5, timeout=1) as first:
        with queue_batch(BatchJob, bind=db, size=5, timeout=1) as second:
            a = {job.n for job in first}
            b = {job.n for job in second}
            assert len(a) == 5 and len(b) == 3 and not a & b
            for job in second:
                second.end(job)
        for job in first:
            first.end(job)
    assert numbers(db) == []


@pytest.mark.integration
def test_a_killed_connection_returns_every_job_even_the_ended_ones(db: Engine) -> None:
    enqueue(db, 3)
    batch = queue_batch(BatchJob, bind=db, size=3, timeout=1)
    with pytest.raises(Exception), batch:  # noqa: B017 - the driver's error, translated or not
        for job in batch:
            batch.end(job)
        owner = batch.session.execute(text("SELECT CONNECTION_ID()")).scalar_one()
        with db.connect() as killer:
            killer.execute(text(f"KILL {int(owner)}"))
    assert claimable(db) == [0, 1, 2]  # the server rolled the batch back: all of it returns


@pytest.fixture
def injected(db: Engine, db_url: URL) -> Iterator[tuple[Engine, list[int], list[str]]]:
    """An engine whose next DELETEs fail with the MySQL error numbers put in the list."""
    eng = create_engine(db_url, pool_size=2, max_overflow=0)
    failures: list[int] = []
    deletes: list[str] = []

    @event.listens_for(eng, "before_cursor_execute")
    def _fail(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        # the jobs' own DELETEs (a unique-key table another test made gets one too)
        if statement.startswith("DELETE") and "q4m_unique_keys" not in statement:
            deletes.append(statement)
            if failures:
                code = failures.pop()
                if code == 1213:  # a real deadlock victim loses its whole transaction
                    cursor.connection.rollback()
                raise pymysql.err.OperationalError(code, "injected by the test")

    yield eng, failures, deletes
    eng.dispose()


@pytest.mark.integration
def test_lock_wait_timeout_at_completion_is_retried(
    injected: tuple[Engine, list[int], list[str]],
) -> None:
    eng, failures, deletes = injected
    enqueue(eng, 3)
    failures += [1205, 1205]
    with queue_batch(BatchJob, bind=eng, size=3, timeout=1) as batch:
        for job in batch:
            batch.end(job)
    assert len(deletes) == 3 and numbers(eng) == []


@pytest.mark.integration
def test_deadlock_at_completion_returns_the_whole_batch(
    injected: tuple[Engine, list[int], list[str]],
) -> None:
    eng, failures, _ = injected
    enqueue(eng, 3)
    failures.append(1213)
    batch = queue_batch(BatchJob, bind=eng, size=3, timeout=1)
    with pytest.raises(CompletionFailed, match="1213"), batch:
        for job in batch:
            batch.end(job)
    assert claimable(eng) == [0, 1, 2]


@pytest.mark.integration
def test_a_batch_deletes_each_job_by_its_key_in_one_executemany(
    injected: tuple[Engine, list[int], list[str]],
) -> None:
    eng, _, deletes = injected
    enqueue(eng, 120)
    with queue_batch(BatchJob, bind=eng, size=200, timeout=1) as batch:
        assert len(batch) == 120
        for job in batch:
            batch.end(job)
    assert len(deletes) == 1 and " IN " not in deletes[0]  # WHERE id = %(q4m_key_0)s, 120 times
    assert numbers(eng) == []


@pytest.mark.integration
def test_writes_commit_with_the_batch(db: Engine) -> None:
    enqueue(db, 2)
    with queue_batch(BatchJob, bind=db, size=2, timeout=1) as batch:
        for job in batch:
            batch.session.add(Note(id=job.n, text=f"done {job.n}"))
            batch.end(job)
    with Session(db) as s:
        assert sorted(s.scalars(select(Note.text))) == ["done 0", "done 1"]
    assert numbers(db) == []


@pytest.mark.integration
def test_connection_bind_inside_the_callers_transaction(db: Engine) -> None:
    enqueue(db, 2)
    with db.connect() as conn:
        conn = conn.execution_options(isolation_level="READ COMMITTED")
        with conn.begin() as trans:
            with queue_batch(BatchJob, bind=conn, size=2, timeout=1) as batch:
                for job in batch:
                    batch.end(job)
            assert numbers(db) == [0, 1]  # not committed: the caller's transaction
            trans.commit()
    assert numbers(db) == []


@pytest.mark.integration
def test_core_table_and_where(db: Engine) -> None:
    with db.begin() as conn:
        conn.execute(insert(core_jobs), [{"payload": "x"}, {"payload": "y"}])
    with queue_batch(core_jobs, bind=db, size=5, timeout=1) as batch:
        assert sorted(row.payload for row in batch) == ["x", "y"]
        for row in batch:
            batch.end(row)
    with db.connect() as conn:
        assert conn.execute(select(func.count()).select_from(core_jobs)).scalar() == 0
    enqueue(db, 6)
    with queue_batch(BatchJob, bind=db, size=5, where=BatchJob.n >= 4, timeout=1) as batch:
        assert [job.n for job in batch] == [4, 5]
        for job in batch:
            batch.end(job)
    assert numbers(db) == [0, 1, 2, 3]


@pytest.mark.integration
def test_timeout_on_an_empty_queue(db: Engine) -> None:
    start = time.monotonic()
    with queue_batch(BatchJob, bind=db, size=10, timeout=0.3) as batch:
        assert len(batch) == 0 and list(batch) == []
    assert 0.25 <= time.monotonic() - start < 2


# -- the native backend: one job at a time -------------------------------------------------------


class FakeSingle:
    """Stands in for the one-job ``QueueSession`` the native path delegates to."""

    calls: ClassVar[list[str]] = []

    def __init__(self, *targets: Any, **kw: Any) -> None:
        assert kw["backend"] == "native"
        self.owning = False
        self.subscription = None

    def wait(self) -> Any:
        FakeSingle.calls.append("wait")
        self.owning = True
        return BatchJob(n=1)

    def end(self) -> None:
        FakeSingle.calls.append("end")
        self.owning = False

    def abort(self) -> None:
        FakeSingle.calls.append("abort")
        self.owning = False

    def close(self) -> None:
        FakeSingle.calls.append("close")


@pytest.mark.unit
@pytest.mark.parametrize(
    ("finish", "expected"), [("end", "end"), ("abort", "abort"), (None, "abort")]
)
def test_native_degrades_to_one_job(
    monkeypatch: pytest.MonkeyPatch, finish: str | None, expected: str
) -> None:
    monkeypatch.setattr("sqlalchemy_q4m.consumer.batch.QueueSession", FakeSingle)
    FakeSingle.calls = []
    eng = create_engine("mysql+pymysql://u@127.0.0.1:1/none")
    with queue_batch(BatchJob, bind=eng, size=50, backend="native") as batch:
        assert len(batch) == 1  # Q4M owns one row per connection
        if finish is not None:
            getattr(batch, finish)(next(iter(batch)))
            assert FakeSingle.calls[-1] == expected  # at once, not at the end of the batch
    assert FakeSingle.calls == ["wait", expected, "close"]


@pytest.mark.integration
def test_a_lock_wait_timeout_claiming_in_the_callers_transaction_is_raised(db: Engine) -> None:
    """1205 (here: the claim waits for a table lock) undoes only the statement; the batch
    must not roll back the caller's transaction (its writes) and carry on: it raises."""
    enqueue(db, 1)
    with db.connect() as locker, db.connect() as conn:
        conn = conn.execution_options(isolation_level="READ COMMITTED")
        conn.execute(text("SET SESSION lock_wait_timeout = 1"))
        conn.commit()
        with conn.begin():
            conn.execute(insert(Note), {"id": 9, "text": "the caller's own write"})
            locker.execute(text("LOCK TABLES tb_batch_jobs WRITE"))
            try:
                with (
                    pytest.raises(OperationalError) as caught,
                    queue_batch(BatchJob, bind=conn, size=5, timeout=2),
                ):
                    pass
            finally:
                locker.execute(text("UNLOCK TABLES"))
            assert caught.value.orig.args[0] == 1205
            assert not conn.invalidated  # the caller's connection and transaction go on
            notes = conn.execute(select(Note.text)).scalars().all()
            assert notes == ["the caller's own write"]
            conn.rollback()
