"""``enqueue()`` on a real Q4M server: the integration scenarios of ``test_enqueue.py`` run again
with a database of this module's own on the Q4M server (fixtures ``db_url`` and ``engine``
below).  Not repeated: the two that roll an enqueue back, which Q4M (no transactions) cannot.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import test_enqueue as portable
from native_support import native_engine
from native_support import private_database
from sqlalchemy import Engine
from sqlalchemy.engine import URL

# The portable module's scenarios, collected here again with this module's fixtures.
offline = portable.offline
tables = portable.tables
db = portable.db
test_cli_enqueue_rows_leaves_missing_columns_to_the_server = (
    portable.test_cli_enqueue_rows_leaves_missing_columns_to_the_server
)
test_core_table_and_mixed_key_sets_keep_row_order = (
    portable.test_core_table_and_mixed_key_sets_keep_row_order
)
test_database_errors_are_sqlalchemy_errors = portable.test_database_errors_are_sqlalchemy_errors
test_defaults_and_server_defaults = portable.test_defaults_and_server_defaults
test_delay_sets_run_at = portable.test_delay_sets_run_at
test_engine_bind_commits_and_returns_ids_in_row_order = (
    portable.test_engine_bind_commits_and_returns_ids_in_row_order
)
test_instances_as_rows = portable.test_instances_as_rows
test_listeners_see_the_insert = portable.test_listeners_see_the_insert

pytestmark = [pytest.mark.native, pytest.mark.integration]


@pytest.fixture(scope="module")
def db_url(q4m_url: URL) -> Iterator[URL]:
    with private_database(q4m_url, "q4m_native_enqueue") as url:
        yield url


@pytest.fixture(scope="module")
def engine(db_url: URL) -> Iterator[Engine]:
    with native_engine(db_url, 20) as eng:
        yield eng
