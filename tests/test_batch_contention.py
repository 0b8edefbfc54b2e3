"""Concurrent batches on a small, busy table: the completion never deadlocks (real server).

The completion used to be ``DELETE ... WHERE id IN (...)``, which MariaDB runs as a table scan
below about 2,000 rows: the scan locks rows other batches own, so 4 consumers of 200-job
batches lost about a third of their batches to deadlocks (error 1213) and every job of a lost
batch ran again.  It is now one ``DELETE ... WHERE id = ?`` per job (``executemany``): a
primary-key lookup of a row the batch holds already.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from batch_contention import contention_table
from batch_contention import run_contention
from sqlalchemy import Column
from sqlalchemy import Engine
from sqlalchemy import Integer
from sqlalchemy import MetaData
from sqlalchemy import Table
from sqlalchemy import create_engine
from sqlalchemy import event
from sqlalchemy import insert
from sqlalchemy import text
from sqlalchemy.engine import URL

from sqlalchemy_q4m import queue_batch
from sqlalchemy_q4m import queue_table
from sqlalchemy_q4m.types import new_job_id

pytestmark = pytest.mark.integration


@pytest.fixture
def contended(db_url: URL) -> Iterator[tuple[Engine, Table]]:
    engine = create_engine(db_url, pool_size=8, max_overflow=4)
    table = contention_table(engine, "tbc_jobs")
    yield engine, table
    table.drop(engine, checkfirst=True)
    engine.dispose()


def test_four_consumers_of_big_batches_never_lose_a_completion_to_a_deadlock(
    contended: tuple[Engine, Table],
) -> None:
    engine, table = contended
    result = run_contention(engine, table, seconds=5.0, consumers=4, size=200, backlog=600)
    print(result.summary())
    assert result.batches > 20 and result.produced > 2_000  # it was busy
    assert result.completion_deadlocks == 0, result.summary()
    assert result.ran_twice == 0, result.summary()  # each job ran exactly once
    assert result.left == 0 and len(result.runs) == result.produced


def test_the_completion_delete_is_a_primary_key_lookup(engine: Engine) -> None:
    metadata = MetaData()
    table = queue_table("tbc_explain", metadata, Column("n", Integer))
    metadata.drop_all(engine)
    metadata.create_all(engine)
    deletes: list[tuple[str, Any]] = []

    def capture(conn: Any, cursor: Any, statement: str, params: Any, *args: Any) -> None:
        if statement.lstrip().upper().startswith("DELETE"):
            deletes.append((statement, params))

    try:
        with engine.begin() as conn:  # small: where a long IN list was scanned
            conn.execute(insert(table), [{"id": new_job_id(), "n": n} for n in range(300)])
        event.listen(engine, "before_cursor_execute", capture)
        try:
            with queue_batch(table, bind=engine, size=200, timeout=5) as batch:
                assert len(batch) == 200
                for row in batch:
                    batch.end(row)
        finally:
            event.remove(engine, "before_cursor_execute", capture)
        assert deletes, "the batch sent no DELETE"
        with engine.connect() as conn:
            for statement, params in deletes:
                first = params[0] if isinstance(params, list) else params
                plan = conn.exec_driver_sql("EXPLAIN " + statement, first).mappings().all()
                assert len(plan) == 1, plan
                assert plan[0]["key"] == "PRIMARY" and plan[0]["type"] != "ALL", plan
            remaining = conn.execute(text("SELECT COUNT(*) FROM tbc_explain")).scalar()
        assert remaining == 100
    finally:
        metadata.drop_all(engine)
