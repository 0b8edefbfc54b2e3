"""Shared fixtures: one private database per test run on the real server, dropped at the end.

The server is found the one documented way: ``--dburi``, else ``Q4M_TEST_DBURI``, else the
local default ``mysql+pymysql://root@127.0.0.1:3306``.  Native Q4M tests (marker ``native``) use
``Q4M_TEST_URL``.  Without it they skip, summed up in one line that says how to get a Q4M server
-- unless native tests are required: with ``CI`` set (``CI=true``, as CI runners set it) or
``Q4M_REQUIRE_NATIVE=1`` (``.ci/test`` sets it when it started the Q4M engine), a native test
that skips, for whatever reason, is reported as a failure instead.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Generator
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


NO_Q4M_SERVER = (
    "native tier: Q4M_TEST_URL is not set. For a Q4M server run `docker compose up -d --wait q4m`"
    " and set Q4M_TEST_URL=mysql+pymysql://root@127.0.0.1:13308/test"
)


def native_required() -> bool:
    """True where a skipped native test is a failure: on CI (``CI`` set to anything but
    ``false``/``0``/empty) or with ``Q4M_REQUIRE_NATIVE=1``."""
    ci = os.environ.get("CI", "").strip().lower() not in {"", "0", "false", "no"}
    return ci or os.environ.get("Q4M_REQUIRE_NATIVE", "") == "1"


@pytest.fixture(scope="session")
def q4m_url() -> URL:
    """A Q4M server (``Q4M_TEST_URL``) for native integration tests; skips without one."""
    url = os.environ.get("Q4M_TEST_URL")
    if not url:
        pytest.skip(NO_Q4M_SERVER)
    return make_url(url)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Every ``native`` test needs Q4M_TEST_URL, whether or not it asks for ``q4m_url``.
    Skipping here, before any fixture, gives all of them one location: ``-ra`` sums them up
    in one line instead of one per test."""
    if item.get_closest_marker("native") is not None and not os.environ.get("Q4M_TEST_URL"):
        pytest.skip(NO_Q4M_SERVER)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A skipped ``native`` test is a failure where native tests are required."""
    report = yield
    if not report.skipped or item.get_closest_marker("native") is None:
        return report
    if hasattr(report, "wasxfail"):
        return report
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    if native_required():
        report.outcome = "failed"
        report.longrepr = (
            "a native test skipped where native tests are required "
            f"(CI={os.environ.get('CI', '')!r}, "
            f"Q4M_REQUIRE_NATIVE={os.environ.get('Q4M_REQUIRE_NATIVE', '')!r}): {reason}"
        )
    return report


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """An in-process CLI run installs the library's stderr handler on the root logger
    (``runtime.setup_logging``); take it off afterwards, so later tests do not log to a
    captured stream pytest has closed."""
    root = logging.getLogger()
    level = root.level
    yield
    for handler in list(root.handlers):
        if getattr(handler, "q4m_handler", False):
            root.removeHandler(handler)
    root.setLevel(level)
