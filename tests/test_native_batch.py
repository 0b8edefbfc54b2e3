"""``queue_batch`` on a real Q4M server: a connection owns one row, so a batch is one job.

The backend-independent scenarios of ``test_batch.py`` run here again with a database of this
module's own on the Q4M server (fixtures ``db_url`` and ``engine`` below); the tests after
them pin what differs on Q4M (``test_batch.py`` checks those only with a stand-in session):
the batch holds one job whatever ``size`` says, and ``end``/``abort`` are ``queue_end()`` /
``queue_abort()`` at once, not at the end of the block.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import test_batch as portable
from native_support import native_engine
from native_support import private_database
from sqlalchemy import Engine
from sqlalchemy import func
from sqlalchemy import insert
from sqlalchemy import select
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.orm import Session
from test_batch import BatchJob
from test_batch import Note
from test_batch import core_jobs
from test_batch import enqueue

from sqlalchemy_q4m import QueueAbort
from sqlalchemy_q4m import queue_batch

# The portable module's scenarios, collected here again with this module's fixtures.
tables = portable.tables
db = portable.db
test_an_exception_leaving_the_block_commits_the_ended_and_returns_the_rest = (
    portable.test_an_exception_leaving_the_block_commits_the_ended_and_returns_the_rest
)
test_queue_abort_leaving_the_block_is_swallowed = (
    portable.test_queue_abort_leaving_the_block_is_swallowed
)
test_finishing_a_job_twice_or_a_stranger_is_refused = (
    portable.test_finishing_a_job_twice_or_a_stranger_is_refused
)
test_timeout_on_an_empty_queue = portable.test_timeout_on_an_empty_queue

pytestmark = [pytest.mark.native, pytest.mark.integration]


@pytest.fixture(scope="module")
def db_url(q4m_url: URL) -> Iterator[URL]:
    with private_database(q4m_url, "q4m_native_batch") as url:
        yield url


@pytest.fixture(scope="module")
def engine(db_url: URL) -> Iterator[Engine]:
    with native_engine(db_url, 10) as eng:
        yield eng


def visible(engine: Engine) -> list[int]:
    """The ``n`` of the jobs another consumer could take now (Q4M hides owned rows)."""
    with Session(engine) as s:
        return sorted(s.scalars(select(BatchJob.n)))


def total(engine: Engine) -> int:
    """Rows in the table, owned ones included (what a non-owner's COUNT(*) says)."""
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(BatchJob)).scalar_one())


def test_a_batch_holds_one_job_and_ends_it_at_once(db: Engine) -> None:
    enqueue(db, 3)
    with queue_batch(BatchJob, bind=db, size=50, timeout=2) as batch:
        (job,) = batch
        assert job.n == 0 and len(batch) == 1
        assert visible(db) == [1, 2] and total(db) == 3  # owned: hidden, still counted
        batch.end(job)
        assert total(db) == 2  # queue_end() now, not when the block ends
    with queue_batch(BatchJob, bind=db, size=50, timeout=2) as batch:
        (job,) = batch
        batch.abort(job)
        assert visible(db) == [1, 2]  # queue_abort() now: offered again at once
    with queue_batch(BatchJob, bind=db, size=50, timeout=2) as batch:
        (job,) = batch  # neither ended nor aborted: returned when the block ends
        assert job.n == 1 and visible(db) == [2]
    assert visible(db) == [1, 2] and total(db) == 2


def test_handle_ends_aborts_and_reraises(db: Engine) -> None:
    enqueue(db, 3)
    with (
        queue_batch(BatchJob, bind=db, size=3, timeout=2) as batch,
        batch.handle(next(iter(batch))),
    ):
        pass
    with (
        queue_batch(BatchJob, bind=db, size=3, timeout=2) as batch,
        batch.handle(next(iter(batch))),
    ):
        raise QueueAbort()
    with queue_batch(BatchJob, bind=db, size=3, timeout=2) as batch:
        with pytest.raises(ZeroDivisionError), batch.handle(next(iter(batch))):
            1 / 0  # noqa: B018
        assert batch.pending == []  # aborted by handle()
    assert visible(db) == [1, 2]


def test_writes_commit_before_the_job_is_ended(db: Engine) -> None:
    enqueue(db, 2)
    for _ in range(2):
        with queue_batch(BatchJob, bind=db, size=2, timeout=2) as batch:
            (job,) = batch
            batch.session.add(Note(id=job.n, text=f"done {job.n}"))
            batch.end(job)
    with pytest.raises(RuntimeError), queue_batch(BatchJob, bind=db, timeout=1) as batch:
        assert list(batch) == []
        batch.session.add(Note(id=9, text="never"))
        raise RuntimeError("rolled back")
    with Session(db) as s:
        assert sorted(s.scalars(select(Note.text))) == ["done 0", "done 1"]
    assert total(db) == 0


def test_core_table_and_where(db: Engine) -> None:
    with db.begin() as conn:
        conn.execute(insert(core_jobs), [{"payload": "x"}, {"payload": "y"}])
    for payload in ("x", "y"):
        with queue_batch(core_jobs, bind=db, size=5, timeout=2) as batch:
            (row,) = batch
            assert row.payload == payload
            batch.end(row)
    with db.connect() as conn:
        assert conn.execute(select(func.count()).select_from(core_jobs)).scalar() == 0
    enqueue(db, 6)
    with queue_batch(BatchJob, bind=db, size=5, where=BatchJob.n >= 4, timeout=2) as batch:
        assert [job.n for job in batch] == [4]
        batch.end(next(iter(batch)))
    assert visible(db) == [0, 1, 2, 3, 5]


def test_a_killed_connection_returns_the_job_in_hand(db: Engine) -> None:
    enqueue(db, 2)
    with queue_batch(BatchJob, bind=db, size=2, timeout=2) as batch:
        batch.end(next(iter(batch)))  # ended at once: gone for good
    batch = queue_batch(BatchJob, bind=db, size=2, timeout=2)
    with pytest.raises(Exception), batch:  # noqa: B017 - the driver's error, translated or not
        (job,) = batch
        assert job.n == 1
        owner = batch.session.execute(text("SELECT CONNECTION_ID()")).scalar_one()
        with db.connect() as killer:
            killer.execute(text(f"KILL {int(owner)}"))
        batch.end(job)
    assert visible(db) == [1]  # the server returned the owned row when the connection died
