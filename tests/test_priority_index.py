"""The portable claim of a ``PriorityMixin`` queue reads an index, not the whole table
(issue 11 item 16).

The claim is ``ORDER BY priority DESC, id LIMIT n FOR UPDATE SKIP LOCKED``.  Without an index
in that order InnoDB locks every row it sorts: while one consumer held one job, a second
consumer got nothing.  The portable layout carries the index the claim needs (``q4m_claim``);
the Q4M layout holds no index, and Alembic sees no difference on either backend.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Column
from sqlalchemy import Engine
from sqlalchemy import MetaData
from sqlalchemy import Text
from sqlalchemy import create_engine
from sqlalchemy import inspect
from sqlalchemy import text
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import URL
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.orm import Mapped
from sqlalchemy.orm import mapped_column
from sqlalchemy.pool import NullPool
from sqlalchemy.schema import CreateTable
from test_alembic import downgrade_section
from test_alembic import fresh_database
from test_alembic import make_config
from test_alembic import revision
from test_alembic import upgrade_section

from sqlalchemy_q4m import PriorityMixin
from sqlalchemy_q4m import QueueMixin
from sqlalchemy_q4m import RetryMixin
from sqlalchemy_q4m import detect_backend
from sqlalchemy_q4m import enqueue
from sqlalchemy_q4m import queue_session
from sqlalchemy_q4m import queue_table
from sqlalchemy_q4m import use_backend
from sqlalchemy_q4m.ddl import CLAIM_INDEX
from sqlalchemy_q4m.functions import subscriptions
from sqlalchemy_q4m.loading import claim_statement
from sqlalchemy_q4m.retry import priority_column

JOBS = 20


class Base(DeclarativeBase):
    pass


class PiJob(PriorityMixin, QueueMixin, Base):
    __tablename__ = "pi_jobs"
    command: Mapped[str] = mapped_column(Text)


class PiRetried(PriorityMixin, RetryMixin, QueueMixin, Base):
    __tablename__ = "pi_retried"
    command: Mapped[str] = mapped_column(Text)


class PiPlain(QueueMixin, Base):
    __tablename__ = "pi_plain"
    command: Mapped[str] = mapped_column(Text)


def dialect(name: str, backend: str) -> Any:
    eng = create_engine(f"{name}+pymysql://")
    use_backend(eng, backend)  # type: ignore[arg-type]
    return eng.dialect


def ddl(table: Any, name: str, backend: str) -> str:
    return " ".join(str(CreateTable(table).compile(dialect=dialect(name, backend))).split())


# -- compiled DDL ------------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize("name", ["mysql", "mariadb"])
def test_the_portable_layout_has_the_claim_index(name: str) -> None:
    assert ddl(PiJob.__table__, name, "portable") == (
        "CREATE TABLE pi_jobs ( id BINARY(16) NOT NULL, command TEXT NOT NULL, "
        "priority INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (id), "
        f"INDEX {CLAIM_INDEX} (priority DESC, id) )ENGINE=InnoDB"
    )


@pytest.mark.unit
@pytest.mark.parametrize("name", ["mysql", "mariadb"])
def test_the_native_layout_and_tables_without_priority_have_no_index(name: str) -> None:
    assert "INDEX" not in ddl(PiJob.__table__, name, "native")
    assert "INDEX" not in ddl(PiPlain.__table__, name, "portable")
    assert "INDEX" not in ddl(PiPlain.__table__, name, "native")


@pytest.mark.unit
def test_the_index_follows_the_claims_order() -> None:
    """Same columns, same directions as the claim's ORDER BY: the index serves it."""
    (sub,) = subscriptions([PiRetried])
    claim = str(claim_statement(sub).compile(dialect=mysql.dialect()))
    assert "ORDER BY pi_retried.priority DESC, pi_retried.id" in claim
    assert f"INDEX {CLAIM_INDEX} (priority DESC, id)" in ddl(
        PiRetried.__table__, "mysql", "portable"
    )


# -- the real servers --------------------------------------------------------------------------


@pytest.fixture
def portable(db_url: URL) -> Iterator[Engine]:
    eng = create_engine(db_url, pool_size=5)
    Base.metadata.drop_all(eng)
    Base.metadata.create_all(eng)
    try:
        yield eng
    finally:
        Base.metadata.drop_all(eng)
        eng.dispose()


def holding_one(eng: Engine, target: Any, **kw: Any) -> tuple[threading.Thread, Any, Any]:
    """A consumer (in a thread of its own) holding one job until the returned event is set."""
    got: list[Any] = []
    ready, release = threading.Event(), threading.Event()

    def consume() -> None:
        with queue_session(target, bind=eng, timeout=10, **kw) as job:
            got.append(job.command if job is not None else None)
            ready.set()
            release.wait(30)

    thread = threading.Thread(target=consume)
    thread.start()
    assert ready.wait(15)
    return thread, release, got


@pytest.mark.integration
@pytest.mark.parametrize("model", [PiJob, PiRetried])
def test_a_second_consumer_gets_a_job_while_the_first_holds_one(
    portable: Engine, model: Any
) -> None:
    with portable.connect() as conn:
        assert detect_backend(conn) == "portable"
    enqueue(portable, model, [{"command": f"job {i}", "priority": i % 3} for i in range(JOBS)])
    kw: dict[str, Any] = {}
    if model is PiRetried:  # what the worker subscribes with: due jobs only
        kw["where"] = model.run_at <= int(time.time())
    thread, release, first = holding_one(portable, model, **kw)
    try:
        assert first[0] is not None
        with queue_session(model, bind=portable, timeout=5, **kw) as job:
            assert job is not None, "the second consumer got nothing while the first held one"
            assert job.command != first[0]
    finally:
        release.set()
        thread.join(15)


@pytest.mark.integration
@pytest.mark.parametrize("model", [PiJob, PiRetried])
def test_explain_shows_the_claim_reads_the_index(portable: Engine, model: Any) -> None:
    indexes = inspect(portable).get_indexes(model.__tablename__)
    assert [(i["name"], i["column_names"]) for i in indexes] == [(CLAIM_INDEX, ["priority", "id"])]
    enqueue(portable, model, [{"command": "x", "priority": i % 3} for i in range(JOBS)])
    where = model.run_at <= int(time.time()) if model is PiRetried else None
    (sub,) = subscriptions([model], where)
    claim = claim_statement(sub).compile(
        dialect=portable.dialect, compile_kwargs={"literal_binds": True}
    )
    with portable.connect() as conn:
        plan = conn.execute(text(f"EXPLAIN {claim}")).mappings().all()
    assert len(plan) == 1
    assert plan[0]["key"] == CLAIM_INDEX, dict(plan[0])
    assert "filesort" not in str(plan[0]["Extra"] or "")


@pytest.mark.integration
@pytest.mark.native
def test_the_q4m_layout_holds_no_index(q4m_url: URL) -> None:
    eng = create_engine(q4m_url, pool_size=2)
    try:
        with eng.connect() as conn:
            assert detect_backend(conn) == "native"
        PiJob.__table__.drop(eng, checkfirst=True)  # type: ignore[attr-defined]
        PiJob.__table__.create(eng)  # type: ignore[attr-defined]
        try:
            insp = inspect(eng)
            options = insp.get_table_options("pi_jobs")
            assert options.get("mysql_engine", options.get("mariadb_engine")) == "QUEUE"
            assert insp.get_indexes("pi_jobs") == []
        finally:
            PiJob.__table__.drop(eng)  # type: ignore[attr-defined]
    finally:
        eng.dispose()


# -- Alembic -----------------------------------------------------------------------------------


def priority_models() -> MetaData:
    md = MetaData()
    queue_table("pa_jobs", md, Column("command", Text), priority_column())
    return md


@pytest.mark.integration
def test_alembic_creates_the_index_on_portable_and_sees_no_diff(
    tmp_path: Path, db_url: URL
) -> None:
    with fresh_database(db_url) as url:
        engine = create_engine(url, poolclass=NullPool)
        try:
            config = make_config(tmp_path, url, priority_models())
            source = revision(config, "0001", "priority queue")
            up = upgrade_section(source)
            assert "op.create_queue_table('pa_jobs'," in up
            assert "priority='priority'\n    )" in up  # the claim's order, not an index
            assert "index" not in source.lower()
            command.upgrade(config, "head")
            indexes = inspect(engine).get_indexes("pa_jobs")
            assert [i["name"] for i in indexes] == [CLAIM_INDEX]
            command.check(config)  # the claim index is the layout, not a diff
            with engine.connect() as conn:
                assert compare_metadata(MigrationContext.configure(conn), priority_models()) == []
            # dropping the model drops the queue table (recognised with its claim index)
            config.attributes["target_metadata"] = MetaData()
            dropped = revision(config, "0002", "drop")
            assert "op.drop_queue_table('pa_jobs')" in upgrade_section(dropped)
            assert "priority='priority'" in downgrade_section(dropped)  # recreated alike
            command.upgrade(config, "head")
            command.downgrade(config, "0001")
            indexes = inspect(engine).get_indexes("pa_jobs")
            assert [i["name"] for i in indexes] == [CLAIM_INDEX]
            command.downgrade(config, "base")
            assert "pa_jobs" not in inspect(engine).get_table_names()
        finally:
            engine.dispose()


@pytest.mark.integration
@pytest.mark.native
def test_alembic_on_q4m_no_index_no_diff_and_a_portable_table_converts(
    tmp_path: Path, q4m_url: URL
) -> None:
    with fresh_database(q4m_url) as url:
        engine = create_engine(url, poolclass=NullPool)
        try:
            config = make_config(tmp_path, url, priority_models())
            revision(config, "0001", "priority queue")
            command.upgrade(config, "head")
            assert inspect(engine).get_indexes("pa_jobs") == []
            command.check(config)

            # The table in the portable layout (as create_all makes it on a stock server):
            # converting it to ENGINE=QUEUE drops the claim index in the same statement.
            with engine.begin() as conn:
                conn.execute(
                    text(
                        "ALTER TABLE pa_jobs ENGINE=InnoDB, ADD PRIMARY KEY (id), "
                        f"ADD INDEX {CLAIM_INDEX} (priority DESC, id)"
                    )
                )
            source = revision(config, "0002", "back to queue")
            assert "op.convert_queue_table('pa_jobs', queue=True" in source
            assert "index" not in source.lower()
            command.upgrade(config, "head")
            insp = inspect(engine)
            options = insp.get_table_options("pa_jobs")
            assert options.get("mysql_engine", options.get("mariadb_engine")) == "QUEUE"
            assert insp.get_indexes("pa_jobs") == []
            command.check(config)
            command.downgrade(config, "base")
        finally:
            engine.dispose()


@pytest.mark.integration
def test_alembic_converting_to_the_portable_layout_adds_the_index(
    tmp_path: Path, db_url: URL
) -> None:
    """A priority queue moved from Q4M (no key, no index; here as InnoDB) to a stock server."""
    with fresh_database(db_url) as url:
        engine = create_engine(url, poolclass=NullPool)
        try:
            with engine.begin() as conn:
                conn.execute(
                    text(
                        "CREATE TABLE pa_jobs (id BINARY(16) NOT NULL, command TEXT, "
                        "priority INT NOT NULL DEFAULT 0) ENGINE=InnoDB"
                    )
                )
            config = make_config(tmp_path, url, priority_models())
            source = revision(config, "0001", "to the portable layout")
            expected = "op.convert_queue_table('pa_jobs', queue=True, primary_key=['id'], "
            assert expected + "priority='priority')" in upgrade_section(source)
            command.upgrade(config, "head")
            insp = inspect(engine)
            assert insp.get_pk_constraint("pa_jobs")["constrained_columns"] == ["id"]
            indexes = insp.get_indexes("pa_jobs")
            assert [(i["name"], i["column_names"]) for i in indexes] == [
                (CLAIM_INDEX, ["priority", "id"])
            ]
            command.check(config)
        finally:
            engine.dispose()
