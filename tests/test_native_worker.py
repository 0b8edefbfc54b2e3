"""The job class and its consumer loop in-process on a real Q4M server (native backend).

The scenarios are those of ``test_worker.py``, run here against a database of this module's
own on the Q4M server (``Q4M_TEST_URL``): the fixtures ``db_url`` and ``engine`` below take
the place of the portable ones for the imported tests.  On Q4M a retry is an INSERT of a copy
then ``queue_end()``, a dead letter is committed before ``queue_end()``, a delayed job is kept
out by the ``run_at`` condition of ``queue_wait``, and an abort is ``queue_abort()``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import test_worker as portable
from native_support import native_engine
from native_support import private_database
from sqlalchemy import Engine
from sqlalchemy import event
from sqlalchemy.engine import URL

# The portable module's scenarios, collected here again with this module's fixtures.
tables = portable.tables
test_a_connection_killed_inside_execute_returns_the_job_and_the_worker_goes_on = (
    portable.test_a_connection_killed_inside_execute_returns_the_job_and_the_worker_goes_on
)
test_a_failing_job_is_retried_then_dead_lettered = (
    portable.test_a_failing_job_is_retried_then_dead_lettered
)
test_a_job_can_run_on_a_connection_the_caller_owns = (
    portable.test_a_job_can_run_on_a_connection_the_caller_owns
)
test_a_lost_connection_is_reopened_and_the_job_in_hand_runs_again = (
    portable.test_a_lost_connection_is_reopened_and_the_job_in_hand_runs_again
)
test_a_model_job_gets_the_instance_and_its_session_commits_with_the_end = (
    portable.test_a_model_job_gets_the_instance_and_its_session_commits_with_the_end
)
test_a_row_job_gets_a_tuple_of_the_payload_columns = (
    portable.test_a_row_job_gets_a_tuple_of_the_payload_columns
)
test_a_table_without_retry_columns_dead_letters_at_once = (
    portable.test_a_table_without_retry_columns_dead_letters_at_once
)
test_backoff_delays_the_retry = portable.test_backoff_delays_the_retry
test_delayed_jobs_wait_for_their_time = portable.test_delayed_jobs_wait_for_their_time
test_earlier_tables_win = portable.test_earlier_tables_win
test_end_before_execute_is_at_most_once = portable.test_end_before_execute_is_at_most_once
test_queue_abort_returns_the_job_untouched = portable.test_queue_abort_returns_the_job_untouched
test_recycle_after_makes_fresh_job_objects = portable.test_recycle_after_makes_fresh_job_objects
test_run_until_max_jobs_or_stop = portable.test_run_until_max_jobs_or_stop
test_the_default_table_name_comes_from_the_class_name = (
    portable.test_the_default_table_name_comes_from_the_class_name
)
test_where_conditions_on_reflected_and_declared_tables = (
    portable.test_where_conditions_on_reflected_and_declared_tables
)

pytestmark = [pytest.mark.native, pytest.mark.integration]


@pytest.fixture(scope="module")
def db_url(q4m_url: URL) -> Iterator[URL]:
    with private_database(q4m_url, "q4m_native_worker") as url:
        yield url


@pytest.fixture(scope="module")
def engine(db_url: URL) -> Iterator[Engine]:
    with native_engine(db_url, 10) as eng:
        yield eng


def test_a_retry_and_a_dead_letter_are_committed_before_queue_end(
    engine: Engine, tables: None
) -> None:
    """The order ``test_worker_native.py`` checks on the fake, seen on the real engine: Q4M has
    no transaction around the job, so the copy (or the dead letter) must be durable first."""
    portable.put(engine, portable.rows, {"command": "x", "n": 1})
    steps: list[str] = []

    @event.listens_for(engine, "before_cursor_execute")
    def statement(conn: Any, cursor: Any, sql: str, *args: Any) -> None:
        words = sql.split()
        if words[:2] == ["SELECT", "queue_end()"] or words[:1] == ["INSERT"]:
            steps.append(" ".join(words[:3]))

    @event.listens_for(engine, "commit")
    def commit(conn: Any) -> None:
        steps.append("COMMIT")

    class Failing(portable.Recorder):
        def execute(self, job: Any) -> None:
            raise RuntimeError("scripted failure")

    job = Failing(engine, max_attempts=2)
    try:
        assert job.run_once(timeout=2)
        assert steps == ["INSERT INTO tw_rows", "COMMIT", "SELECT queue_end() AS", "COMMIT"]
        steps.clear()
        assert job.run_once(timeout=2)
        assert steps == [
            "INSERT INTO tw_dead_letters",
            "COMMIT",
            "SELECT queue_end() AS",
            "COMMIT",
        ]
    finally:
        event.remove(engine, "before_cursor_execute", statement)
        event.remove(engine, "commit", commit)
        job.close()
    assert portable.count(engine, portable.rows) == 0
    assert [d.attempts for d in portable.dead_rows(engine)] == [2]
