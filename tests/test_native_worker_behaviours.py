"""The worker behaviours of ``test_worker_behaviours.py``, through both drivers (the sync
``Job`` and the ``AsyncJob``), on a real Q4M server (native backend, ``Q4M_TEST_URL``): the
fixtures ``db_url`` and ``engine`` below take the place of the portable ones.  The poll
schedule is the portable backend's own (Q4M blocks in ``queue_wait``): not run here."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import test_worker_behaviours as portable
from native_support import native_engine
from native_support import private_database
from sqlalchemy import Engine
from sqlalchemy.engine import URL

driver = portable.driver
queue = portable.queue
test_a_failure_is_retried_then_done = portable.test_a_failure_is_retried_then_done
test_a_job_is_dead_lettered_after_max_attempts = (
    portable.test_a_job_is_dead_lettered_after_max_attempts
)
test_an_aborted_job_goes_back_untouched = portable.test_an_aborted_job_goes_back_untouched
test_a_lost_connection_returns_the_job_and_the_loop_goes_on = (
    portable.test_a_lost_connection_returns_the_job_and_the_loop_goes_on
)
test_recycle_after_makes_fresh_job_objects = portable.test_recycle_after_makes_fresh_job_objects
test_end_before_execute_is_at_most_once = portable.test_end_before_execute_is_at_most_once
test_a_stop_finishes_the_job_in_hand_and_takes_no_new_one = (
    portable.test_a_stop_finishes_the_job_in_hand_and_takes_no_new_one
)
test_counts_are_the_same_for_both_drivers = portable.test_counts_are_the_same_for_both_drivers

pytestmark = [pytest.mark.native, pytest.mark.integration]


@pytest.fixture(scope="module")
def db_url(q4m_url: URL) -> Iterator[URL]:
    with private_database(q4m_url, "q4m_native_behaviours") as url:
        yield url


@pytest.fixture(scope="module")
def engine(db_url: URL) -> Iterator[Engine]:
    with native_engine(db_url, 10) as eng:
        yield eng
