"""The example project (``alembic_example/``) migrates a real database up and down.

It runs as its README says: ``alembic.ini`` from the project, the URL in ``Q4M_URL``; the
database is a fresh one next to the test run's ``db_url`` database.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine
from sqlalchemy import inspect
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.pool import NullPool

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).resolve().parent.parent / "alembic_example"


@pytest.fixture
def example_url(db_url: URL, monkeypatch: pytest.MonkeyPatch) -> Iterator[URL]:
    """A fresh database, named in ``Q4M_URL`` as the example's README does."""
    name = f"{db_url.database}_ex{uuid.uuid4().hex[:6]}"
    admin = create_engine(db_url, poolclass=NullPool)
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE `{name}`"))
    url = db_url.set(database=name)
    monkeypatch.setenv("Q4M_URL", url.render_as_string(hide_password=False))
    monkeypatch.delenv("Q4M_BACKEND", raising=False)
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS `{name}`"))
        admin.dispose()


def example_config() -> Config:
    config = Config(str(EXAMPLE / "alembic.ini"), stdout=io.StringIO(), output_buffer=io.StringIO())
    config.attributes["configure_logging"] = False  # leave the test run's logging alone
    return config


def test_example_migrations_upgrade_check_and_downgrade(example_url: URL) -> None:
    config = example_config()
    engine = create_engine(example_url, poolclass=NullPool)
    try:
        command.upgrade(config, "head")
        insp = inspect(engine)
        assert set(insp.get_table_names()) == {
            "alembic_version",
            "shell_jobs",
            "ruby_jobs",
            "job_log",
        }
        assert [c["name"] for c in insp.get_columns("shell_jobs")] == ["id", "command", "priority"]
        for queue in ("shell_jobs", "ruby_jobs"):  # the portable layout on stock MariaDB
            assert insp.get_pk_constraint(queue)["constrained_columns"] == ["id"]
            assert insp.get_indexes(queue) == []
        assert [i["name"] for i in insp.get_indexes("job_log")] == ["ix_job_log_queue"]
        command.check(config)  # the models and the migrations agree

        command.downgrade(config, "0001")
        columns = [c["name"] for c in inspect(engine).get_columns("shell_jobs")]
        assert columns == ["id", "command"]

        command.downgrade(config, "base")
        assert set(inspect(engine).get_table_names()) == {"alembic_version"}
        with engine.connect() as conn:
            assert conn.execute(text("SELECT COUNT(*) FROM alembic_version")).scalar() == 0
    finally:
        engine.dispose()


def test_example_offline_sql_for_q4m_and_for_a_stock_server(
    example_url: URL, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = example_config()
    command.upgrade(config, "head", sql=True)
    native = config.output_buffer.getvalue()  # type: ignore[union-attr]
    shell = native.split("CREATE TABLE shell_jobs")[1].split(";")[0]
    assert "ENGINE=QUEUE" in shell and "PRIMARY KEY" not in shell
    assert "ALTER TABLE shell_jobs ADD COLUMN priority INTEGER NOT NULL DEFAULT 0;" in native

    monkeypatch.setenv("Q4M_BACKEND", "portable")
    config = example_config()
    command.upgrade(config, "head", sql=True)
    portable = config.output_buffer.getvalue()  # type: ignore[union-attr]
    ruby = portable.split("CREATE TABLE ruby_jobs")[1].split(";")[0]
    assert "ENGINE=InnoDB" in ruby and "PRIMARY KEY (id)" in ruby
