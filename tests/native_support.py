"""Helpers for native tests: a private database on the Q4M server (``Q4M_TEST_URL``)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy import Engine
from sqlalchemy import MetaData
from sqlalchemy import create_engine
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.pool import NullPool


@contextmanager
def private_database(server: URL, prefix: str) -> Iterator[URL]:
    """A new database ``<prefix>_<random>`` on ``server`` (a Q4M server), dropped afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = create_engine(server, poolclass=NullPool)
    try:
        with admin.connect() as conn:
            conn.execute(text(f"CREATE DATABASE `{name}`"))
        try:
            yield server.set(database=name)
        finally:
            with admin.connect() as conn:
                conn.execute(text(f"DROP DATABASE IF EXISTS `{name}`"))
    finally:
        admin.dispose()


@contextmanager
def native_engine(url: URL, pool_size: int = 20) -> Iterator[Engine]:
    """An engine on ``url`` that has been checked to be a Q4M server, disposed afterwards."""
    from sqlalchemy_q4m import detect_backend

    eng = create_engine(url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True)
    try:
        with eng.connect() as conn:
            assert detect_backend(conn) == "native"
        yield eng
    finally:
        eng.dispose()


@contextmanager
def tables_on(
    request: pytest.FixtureRequest, backend: str, metadata: MetaData, prefix: str
) -> Iterator[tuple[URL, Engine]]:
    """For a fixture parametrized by backend: the database of ``backend`` (this run's own on
    MariaDB, a private one named ``<prefix>_<random>`` on the Q4M server) and an engine on it,
    with ``metadata``'s tables created (dropped afterwards)."""
    if backend == "portable":
        url: URL = request.getfixturevalue("db_url")
        eng = create_engine(url, pool_size=5, max_overflow=5)
        try:
            metadata.create_all(eng)
            yield url, eng
            metadata.drop_all(eng)
        finally:
            eng.dispose()
        return
    q4m_url: URL = request.getfixturevalue("q4m_url")
    with private_database(q4m_url, prefix) as url, native_engine(url, 5) as eng:
        metadata.create_all(eng)
        yield url, eng
