"""Loading jobs on a real Q4M server: the ORM, type processors, reflected and Core tables.

The integration scenarios of ``test_loading.py``, run again with a database of this module's
own on the Q4M server (fixtures ``db_url`` and ``engine`` below); not repeated: the statement
trace of the portable claim (SELECT ... FOR UPDATE, DELETE).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import test_loading as portable
from native_support import native_engine
from native_support import private_database
from sqlalchemy import Engine
from sqlalchemy.engine import URL

# The portable module's scenarios, collected here again with this module's fixtures.
tables = portable.tables
db = portable.db
test_a_direct_instance_is_clean_typed_and_persistent_in_the_session = (
    portable.test_a_direct_instance_is_clean_typed_and_persistent_in_the_session
)
test_a_killed_connection_is_invalidated_and_reported_lost = (
    portable.test_a_killed_connection_is_invalidated_and_reported_lost
)
test_a_relationship_loads_through_the_session = (
    portable.test_a_relationship_loads_through_the_session
)
test_core_rows_are_processed = portable.test_core_rows_are_processed
test_driver_level_errors_are_sqlalchemy_errors = (
    portable.test_driver_level_errors_are_sqlalchemy_errors
)
test_driver_level_only_when_nothing_observes_statements = (
    portable.test_driver_level_only_when_nothing_observes_statements
)
test_mappings_the_orm_must_load = portable.test_mappings_the_orm_must_load
test_polymorphic_jobs_load_as_their_class = portable.test_polymorphic_jobs_load_as_their_class
test_the_session_is_made_on_demand_and_holds_the_job = (
    portable.test_the_session_is_made_on_demand_and_holds_the_job
)

pytestmark = [pytest.mark.native, pytest.mark.integration]


@pytest.fixture(scope="module")
def db_url(q4m_url: URL) -> Iterator[URL]:
    with private_database(q4m_url, "q4m_native_loading") as url:
        yield url


@pytest.fixture(scope="module")
def engine(db_url: URL) -> Iterator[Engine]:
    with native_engine(db_url, 20) as eng:
        yield eng
