"""Queue tables: declaration, validation and the DDL SQLAlchemy's own compiler renders.

Compile-only tests pin the native (``ENGINE=QUEUE``, no key) and portable (InnoDB, primary key)
layouts for both dialect names; integration tests create the tables on the real server and
insert 10,000 jobs in one bulk ORM insert.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import CheckConstraint
from sqlalchemy import Column
from sqlalchemy import Engine
from sqlalchemy import ForeignKey
from sqlalchemy import ForeignKeyConstraint
from sqlalchemy import Index
from sqlalchemy import Integer
from sqlalchemy import MetaData
from sqlalchemy import String
from sqlalchemy import Table
from sqlalchemy import Text
from sqlalchemy import UniqueConstraint
from sqlalchemy import create_engine
from sqlalchemy import func
from sqlalchemy import insert
from sqlalchemy import inspect
from sqlalchemy import select
from sqlalchemy import text
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.orm import Mapped
from sqlalchemy.orm import Session
from sqlalchemy.orm import mapped_column
from sqlalchemy.schema import CreateIndex
from sqlalchemy.schema import CreateTable

from sqlalchemy_q4m import JobId
from sqlalchemy_q4m import QueueMixin
from sqlalchemy_q4m import detect_backend
from sqlalchemy_q4m import is_queue_table
from sqlalchemy_q4m import new_job_id
from sqlalchemy_q4m import queue_table
from sqlalchemy_q4m import use_backend
from sqlalchemy_q4m.exc import BackendError
from sqlalchemy_q4m.exc import QueueTableError

DIALECT_NAMES = ("mysql", "mariadb")


def dialect(name: str, backend: str | None) -> Dialect:
    """A fresh dialect of ``name`` (never connected), with ``backend`` fixed when given."""
    eng = create_engine(f"{name}+pymysql://")
    if backend is not None:
        use_backend(eng, backend)  # type: ignore[arg-type]
    return eng.dialect


def ddl(table: Table, name: str = "mysql", backend: str | None = None) -> str:
    return " ".join(str(CreateTable(table).compile(dialect=dialect(name, backend))).split())


class Base(DeclarativeBase):
    pass


class ShellJob(QueueMixin, Base):
    __tablename__ = "ddl_shell_jobs"
    command: Mapped[str] = mapped_column(Text)
    priority: Mapped[int] = mapped_column(Integer, default=0)


# -- compiled DDL ----------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize("name", DIALECT_NAMES)
@pytest.mark.parametrize("backend", [None, "native"])
def test_native_layout(name: str, backend: str | None) -> None:
    """Nothing detected yet defaults to native: ENGINE=QUEUE, no key, no AUTO_INCREMENT."""
    assert ddl(ShellJob.__table__, name, backend) == (  # type: ignore[arg-type]
        "CREATE TABLE ddl_shell_jobs ( id BINARY(16) NOT NULL, command TEXT NOT NULL, "
        "priority INTEGER NOT NULL )ENGINE=QUEUE"
    )


@pytest.mark.unit
@pytest.mark.parametrize("name", DIALECT_NAMES)
def test_portable_layout(name: str) -> None:
    assert ddl(ShellJob.__table__, name, "portable") == (  # type: ignore[arg-type]
        "CREATE TABLE ddl_shell_jobs ( id BINARY(16) NOT NULL, command TEXT NOT NULL, "
        "priority INTEGER NOT NULL, PRIMARY KEY (id) )ENGINE=InnoDB"
    )


@pytest.mark.unit
def test_make_url_dialects_compile_both_names() -> None:
    from sqlalchemy import make_url

    for name in DIALECT_NAMES:
        d = make_url(f"{name}+pymysql://").get_dialect()()
        assert d.name == name
        out = str(CreateTable(ShellJob.__table__).compile(dialect=d))  # type: ignore[arg-type]
        assert out.rstrip().endswith("ENGINE=QUEUE") and "PRIMARY KEY" not in out


@pytest.mark.unit
def test_layout_is_per_engine() -> None:
    native, portable = create_engine("mysql+pymysql://"), create_engine("mysql+pymysql://")
    use_backend(portable, "portable")
    table: Table = ShellJob.__table__  # type: ignore[assignment]
    assert "ENGINE=QUEUE" in str(CreateTable(table).compile(native))
    assert "ENGINE=InnoDB" in str(CreateTable(table).compile(portable))
    use_backend(portable, "auto")  # forget the choice: back to the default
    assert "ENGINE=QUEUE" in str(CreateTable(table).compile(portable))
    with pytest.raises(BackendError, match="bogus"):
        use_backend(portable, "bogus")  # type: ignore[arg-type]


@pytest.mark.unit
def test_compiling_does_not_change_the_declaration() -> None:
    table: Table = ShellJob.__table__  # type: ignore[assignment]
    ddl(table, "mysql", "native")
    assert [c.name for c in table.primary_key.columns] == ["id"]
    assert table.dialect_kwargs["mysql_engine"] == "QUEUE"
    assert table.dialect_kwargs["mariadb_engine"] == "QUEUE"


@pytest.mark.unit
@pytest.mark.parametrize("name", DIALECT_NAMES)
def test_core_queue_table_and_engine_queue_are_queue_tables(name: str) -> None:
    md = MetaData()
    core = queue_table("ddl_core", md, Column("payload", Text), Column("n", Integer))
    assert is_queue_table(core)
    assert ddl(core, name) == (
        "CREATE TABLE ddl_core ( id BINARY(16) NOT NULL, payload TEXT, n INTEGER )ENGINE=QUEUE"
    )
    assert "PRIMARY KEY (id)" in ddl(core, name, "portable")
    for option in ("mysql_engine", "mariadb_engine"):
        declared = Table(f"ddl_declared_{option}", md, Column("n", Integer), **{option: "queue"})
        assert is_queue_table(declared)
        assert ddl(declared, name).endswith("ENGINE=QUEUE")
        with pytest.raises(QueueTableError, match="no job id"):
            ddl(declared, name, "portable")  # no key to claim and delete by


@pytest.mark.unit
def test_plain_tables_are_untouched() -> None:
    md = MetaData()
    plain = Table(
        "ddl_plain",
        md,
        Column("id", Integer, primary_key=True),
        Column("name", String(10), unique=True),
        Column("n", Integer, index=True),
        mysql_engine="InnoDB",
    )
    assert not is_queue_table(plain)
    out = ddl(plain, "mysql", "native")
    assert "PRIMARY KEY (id)" in out and "UNIQUE (name)" in out and "AUTO_INCREMENT" in out
    index = next(iter(plain.indexes))
    assert "CREATE INDEX" in str(CreateIndex(index).compile(dialect=mysql.dialect()))


# -- rejected declarations -------------------------------------------------------------------


def _other(md: MetaData) -> Table:
    return Table("ddl_other", md, Column("id", Integer, primary_key=True))


REJECTED: dict[str, tuple[Any, str]] = {
    "index": (lambda md: [Column("n", Integer), Index("ix_ddl_bad_n", "n")], "ix_ddl_bad_n"),
    "column index": (lambda md: [Column("n", Integer, index=True)], "index"),
    "unique constraint": (
        lambda md: [Column("n", Integer), UniqueConstraint("n", name="uq_ddl_n")],
        "uq_ddl_n",
    ),
    "unique column": (lambda md: [Column("n", Integer, unique=True)], r"unique constraint.*\(n\)"),
    "foreign key": (
        lambda md: [Column("other_id", Integer, ForeignKey(_other(md).c.id))],
        "foreign key on column 'other_id'",
    ),
    "foreign key constraint": (
        lambda md: [
            Column("other_id", Integer),
            ForeignKeyConstraint(["other_id"], [_other(md).c.id]),
        ],
        "other_id",
    ),
    "autoincrement": (
        lambda md: [Column("seq", Integer, autoincrement=True)],
        "AUTO_INCREMENT column 'seq'",
    ),
    "extra primary key": (
        lambda md: [Column("k", Integer, primary_key=True)],
        "primary key column 'k'",
    ),
    "check constraint": (
        lambda md: [Column("n", Integer), CheckConstraint("n > 0", name="ck_ddl_n")],
        "ck_ddl_n",
    ),
    "bad column name": (lambda md: [Column("n`; DROP TABLE x; --", Integer)], "invalid column"),
    "column name with a space": (lambda md: [Column("a b", Integer)], "'a b'"),
}


@pytest.mark.unit
@pytest.mark.parametrize("name", DIALECT_NAMES)
@pytest.mark.parametrize("backend", ["native", "portable"])
@pytest.mark.parametrize("case", list(REJECTED))
def test_rejected_declarations(case: str, backend: str, name: str) -> None:
    """Q4M holds no key, index, foreign key or AUTO_INCREMENT: refused on both layouts, with
    the table and the item named."""
    make, item = REJECTED[case]
    md = MetaData()
    table = queue_table("ddl_bad", md, *make(md))
    with pytest.raises(QueueTableError, match=r"'ddl_bad'") as err:
        ddl(table, name, backend)
    assert err.match(item)
    for index in table.indexes:
        with pytest.raises(QueueTableError, match=r"'ddl_bad'"):
            CreateIndex(index).compile(dialect=dialect(name, backend))


@pytest.mark.unit
def test_orm_declarations_are_rejected_too() -> None:
    class Local(DeclarativeBase):
        pass

    class Indexed(QueueMixin, Local):
        __tablename__ = "ddl_indexed"
        name: Mapped[str] = mapped_column(String(20), index=True)
        __table_args__ = (UniqueConstraint("name", name="uq_ddl_indexed_name"),)

    with pytest.raises(QueueTableError, match="ddl_indexed") as err:
        ddl(Indexed.__table__)  # type: ignore[arg-type]
    assert err.match("ix_ddl_indexed_name") and err.match("uq_ddl_indexed_name")


@pytest.mark.unit
@pytest.mark.parametrize(
    "bad",
    ["jobs; DROP TABLE x", "jobs`", "jo bs", "1jobs", "jobs:pri", "x" * 65, "", "db.jobs", "jöbs"],
)
def test_bad_table_names_are_refused_at_declaration(bad: str) -> None:
    with pytest.raises(QueueTableError, match="invalid table name"):
        queue_table(bad, MetaData(), Column("n", Integer))

    class Local(DeclarativeBase):
        pass

    with pytest.raises(QueueTableError, match="invalid table name"):
        type("Bad", (QueueMixin, Local), {"__tablename__": bad, "n": mapped_column(Integer)})


@pytest.mark.unit
def test_engine_queue_table_with_a_bad_name_is_refused_at_ddl_time() -> None:
    table = Table("bad`name", MetaData(), Column("n", Integer), mysql_engine="QUEUE")
    with pytest.raises(QueueTableError, match="invalid table name"):
        ddl(table)


# -- job ids ---------------------------------------------------------------------------------


@pytest.mark.unit
def test_job_ids_are_unique_and_time_ordered() -> None:
    ids = [new_job_id() for _ in range(20_000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids, key=lambda u: u.bytes)
    assert all(u.version == 7 for u in ids[:10])
    job_id = JobId()
    d = mysql.dialect()
    assert job_id.process_bind_param(ids[0], d) == ids[0].bytes
    assert job_id.process_bind_param(str(ids[0]), d) == ids[0].bytes
    assert job_id.process_result_value(ids[0].bytes, d) == ids[0]
    assert job_id.process_bind_param(None, d) is None


# -- on the real server ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tables(engine: Engine) -> Iterator[Engine]:
    Base.metadata.create_all(engine)
    yield engine
    Base.metadata.drop_all(engine)


@pytest.mark.integration
def test_create_all_detects_the_portable_layout(tables: Engine) -> None:
    with tables.connect() as conn:
        assert detect_backend(conn) == "portable"
        row = conn.execute(
            text(
                "SELECT ENGINE FROM information_schema.TABLES "
                "WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'ddl_shell_jobs'"
            )
        ).one()
    assert row.ENGINE == "InnoDB"
    assert inspect(tables).get_pk_constraint("ddl_shell_jobs")["constrained_columns"] == ["id"]


@pytest.mark.integration
def test_rejected_declaration_never_reaches_the_server(engine: Engine) -> None:
    md = MetaData()
    queue_table("ddl_refused", md, Column("n", Integer), Index("ix_ddl_refused", "n"))
    with pytest.raises(QueueTableError, match="ddl_refused"):
        md.create_all(engine)
    assert not inspect(engine).has_table("ddl_refused")


@pytest.mark.integration
def test_bulk_insert_of_equal_payloads(tables: Engine) -> None:
    """10,000 dicts in one ``session.execute(insert(Model), ...)``: ten thousand jobs."""
    rows = [{"command": "same", "priority": 1} for _ in range(10_000)]
    with Session(tables) as s:
        s.execute(insert(ShellJob), rows)
        s.commit()
        count, distinct = s.execute(
            select(func.count(), func.count(ShellJob.id.distinct())).select_from(ShellJob)
        ).one()
        assert count == distinct == 10_000
        ids = s.scalars(select(ShellJob.id).limit(3)).all()
        assert all(isinstance(i, uuid.UUID) for i in ids)
        s.execute(ShellJob.__table__.delete())
        s.commit()


@pytest.mark.integration
def test_orm_identity_of_equal_payloads(tables: Engine) -> None:
    with Session(tables) as s:
        a, b = ShellJob(command="x"), ShellJob(command="x")
        s.add_all([a, b])
        s.commit()
        assert a.id != b.id
        assert s.get(ShellJob, a.id) is a
        s.execute(ShellJob.__table__.delete())
        s.commit()
