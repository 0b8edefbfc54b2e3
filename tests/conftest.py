"""Shared fixtures: one private database per test run on the real server, dropped at the end.

The server is found the one documented way: ``--dburi``, else ``Q4M_TEST_DBURI``, else the
local default ``mysql+pymysql://root@127.0.0.1:3306``.  Native Q4M tests use ``Q4M_TEST_URL``
and skip when it is not set.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine
from sqlalchemy import create_engine
from sqlalchemy import make_url
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.pool import NullPool

DEFAULT_DBURI = "mysql+pymysql://root@127.0.0.1:3306"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--dburi",
        default=os.environ.get("Q4M_TEST_DBURI", DEFAULT_DBURI),
        help="server URL for integration tests (env Q4M_TEST_DBURI); a database is created on it",
    )


@pytest.fixture(scope="session")
def server_url(request: pytest.FixtureRequest) -> URL:
    url = make_url(request.config.getoption("--dburi"))
    return url._replace(database=None)  # URL.set(database=None) keeps the database


@pytest.fixture(scope="session")
def db_url(server_url: URL) -> Iterator[URL]:
    """A database of this test run's own (``q4m_test_<random>``), dropped afterwards."""
    name = f"q4m_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(server_url, poolclass=NullPool)
    try:
        with admin.connect() as conn:
            conn.execute(text(f"CREATE DATABASE `{name}`"))
    except Exception as err:  # pragma: no cover - the environment, not the code
        pytest.exit(f"no database server at {server_url!r}: {err}", returncode=3)
    try:
        yield server_url.set(database=name)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS `{name}`"))
        admin.dispose()


@pytest.fixture(scope="session")
def engine(db_url: URL) -> Iterator[Engine]:
    eng = create_engine(db_url, pool_size=20, max_overflow=20, pool_pre_ping=True)
    yield eng
    eng.dispose()


@pytest.fixture(scope="session")
def q4m_url() -> URL:
    """A Q4M server (``Q4M_TEST_URL``) for native integration tests; skips without one."""
    url = os.environ.get("Q4M_TEST_URL")
    if not url:
        pytest.skip("Q4M_TEST_URL is not set: no Q4M (ENGINE=QUEUE) server to test against")
    return make_url(url)
