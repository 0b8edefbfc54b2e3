"""``queue_session`` on a real Q4M server: the scenarios of ``test_session.py`` that hold on
both backends, run again with a database of this module's own on the Q4M server (fixtures
``db_url`` and ``engine`` below).  Not repeated: what only InnoDB does (a caller's transaction
holding the claim, sub-second timeouts, lock-wait and deadlock retries while claiming, the
SKIP LOCKED pool watch); ``test_native_integration.py`` has the Q4M side of those.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import test_session as portable
from native_support import native_engine
from native_support import private_database
from sqlalchemy import Column
from sqlalchemy import Engine
from sqlalchemy import Integer
from sqlalchemy import MetaData
from sqlalchemy import String
from sqlalchemy import event
from sqlalchemy.engine import URL

from sqlalchemy_q4m import enqueue
from sqlalchemy_q4m import queue_session
from sqlalchemy_q4m import queue_table

# The portable module's scenarios, collected here again with this module's fixtures.
tables = portable.tables
db = portable.db
watched = portable.watched
short_waits = portable.short_waits
test_a_job_arriving_during_the_wait_is_taken = portable.test_a_job_arriving_during_the_wait_is_taken
test_connection_bind = portable.test_connection_bind
test_core_table_yields_a_row = portable.test_core_table_yields_a_row
test_end_removes_the_job = portable.test_end_removes_the_job
test_exception_aborts_and_reraises = portable.test_exception_aborts_and_reraises
test_explicit_api = portable.test_explicit_api
test_fifo_order = portable.test_fifo_order
test_killed_owner_connection_returns_the_job = portable.test_killed_owner_connection_returns_the_job
test_lock_wait_timeout_at_completion_returns_the_job = (
    portable.test_lock_wait_timeout_at_completion_returns_the_job
)
test_pool_never_receives_an_owning_connection = (
    portable.test_pool_never_receives_an_owning_connection
)
test_queue_abort_is_swallowed = portable.test_queue_abort_is_swallowed
test_session_bind_is_atomic = portable.test_session_bind_is_atomic
test_session_bind_write_failing_at_end_returns_the_job = (
    portable.test_session_bind_write_failing_at_end_returns_the_job
)
test_several_models_earlier_wins = portable.test_several_models_earlier_wins
test_where = portable.test_where
test_where_per_model = portable.test_where_per_model

pytestmark = [pytest.mark.native, pytest.mark.integration]


@pytest.fixture(scope="module")
def db_url(q4m_url: URL) -> Iterator[URL]:
    with private_database(q4m_url, "q4m_native_session") as url:
        yield url


@pytest.fixture(scope="module")
def engine(db_url: URL) -> Iterator[Engine]:
    with native_engine(db_url, 20) as eng:
        yield eng


@pytest.mark.parametrize("observed", [False, True], ids=["cursor", "exec_driver_sql"])
def test_a_condition_with_a_percent_sign_reaches_the_engine_intact(
    engine: Engine, observed: bool
) -> None:
    """``queue_wait``'s arguments are sent as literals: ``priority // 2`` is rendered with a
    ``%`` (``mod``), which must arrive as one ``%`` on the driver's cursor and through
    ``exec_driver_sql`` (a statement listener present) alike; -7 // 2 is -4 on the engine."""
    md = MetaData()
    table = queue_table(
        "qs_percent_jobs", md, Column("priority", Integer), Column("cmd", String(8))
    )
    md.drop_all(engine)
    md.create_all(engine)
    seen: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement)

    try:
        enqueue(engine, table, [{"priority": p, "cmd": str(p)} for p in (-7, -6, -5, 5)])
        if observed:
            event.listen(engine, "before_cursor_execute", record)
        owned = []
        for _ in range(4):
            with queue_session(
                table, bind=engine, where=table.c.priority // 2 == -3, timeout=0
            ) as job:
                if job is None:
                    break
                owned.append(job.cmd)
        assert sorted(owned) == ["-5", "-6"]
        if observed:
            assert any("queue_wait('qs_percent_jobs:" in s and "%" in s for s in seen)
    finally:
        if observed:
            event.remove(engine, "before_cursor_execute", record)
        md.drop_all(engine)
