"""Alembic environment of the example project.

One import wires sqlalchemy-q4m in (``op.create_queue_table`` & co. and autogenerate support);
the database URL comes from the ``Q4M_URL`` environment variable, and ``Q4M_BACKEND``
(``native`` / ``portable``) chooses the queue layout of offline ``--sql`` scripts.
"""

from __future__ import annotations

import os
from logging.config import fileConfig

from alembic import context
from example_models import Base
from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool

import sqlalchemy_q4m.alembic  # noqa: F401 - registers the queue operations and comparators

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logging", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def database_url() -> str:
    """``Q4M_URL``, else ``sqlalchemy.url`` from alembic.ini (unset there on purpose)."""
    url = os.environ.get("Q4M_URL") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise SystemExit("set Q4M_URL, e.g. Q4M_URL=mysql+pymysql://root@127.0.0.1:3306/test")
    return url


def run_migrations_offline() -> None:
    """Write the SQL to stdout (``alembic upgrade head --sql``); no server is asked."""
    context.configure(
        url=database_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        q4m_backend=os.environ.get("Q4M_BACKEND", "auto"),
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Migrate the database at ``Q4M_URL``; the queue layout follows its server."""
    engine = create_engine(database_url(), poolclass=NullPool)
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            q4m_backend=os.environ.get("Q4M_BACKEND", "auto"),
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
