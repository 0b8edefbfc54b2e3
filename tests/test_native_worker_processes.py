"""Workers as subprocesses on a real Q4M server: processes and threads, SIGTERM, SIGKILL.

The scenarios of ``test_worker_processes.py`` against a database of this module's own on the
Q4M server, except the portable-only listening worker and, to keep the tier short, the
5000-job run and the supervisor's restart of a killed process (which does not depend on the
backend).  A job in hand is owned by the worker's connection, so a SIGKILLed worker's job
comes back when the server notices the dead connection, and a returned job is
``queue_abort()``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import test_worker_processes as portable
from native_support import native_engine
from native_support import private_database
from sqlalchemy import Engine
from sqlalchemy.engine import URL

# The portable module's scenarios, collected here again with this module's fixtures.
table = portable.table
test_a_job_whose_worker_is_sigkilled_runs_again_on_another_worker = (
    portable.test_a_job_whose_worker_is_sigkilled_runs_again_on_another_worker
)
test_a_second_sigterm_returns_the_jobs_in_hand = (
    portable.test_a_second_sigterm_returns_the_jobs_in_hand
)
test_first_sigterm_finishes_the_jobs_in_hand_and_takes_no_new_one = (
    portable.test_first_sigterm_finishes_the_jobs_in_hand_and_takes_no_new_one
)
test_the_grace_period_ends_with_the_jobs_in_hand_returned = (
    portable.test_the_grace_period_ends_with_the_jobs_in_hand_returned
)

pytestmark = [pytest.mark.native, pytest.mark.acceptance]


@pytest.fixture(scope="module")
def db_url(q4m_url: URL) -> Iterator[URL]:
    with private_database(q4m_url, "q4m_native_procs") as url:
        yield url


@pytest.fixture(scope="module")
def engine(db_url: URL) -> Iterator[Engine]:
    with native_engine(db_url, 5) as eng:
        yield eng
