"""The queue operations compiled to SQL (offline, both dialect names), their reversal, the
validation they share with ``create_all``, and the engine-drift comparator."""

from __future__ import annotations

import io
import re

import pytest
from alembic.autogenerate import render_op_text
from alembic.autogenerate import render_python_code
from alembic.autogenerate.api import AutogenContext
from alembic.migration import MigrationContext
from alembic.operations import Operations
from alembic.operations import ops
from sqlalchemy import BINARY
from sqlalchemy import Column
from sqlalchemy import Engine
from sqlalchemy import ForeignKey
from sqlalchemy import Integer
from sqlalchemy import MetaData
from sqlalchemy import String
from sqlalchemy import Table
from sqlalchemy import Text
from sqlalchemy import UniqueConstraint
from sqlalchemy import create_mock_engine
from sqlalchemy import inspect
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Dialect

from sqlalchemy_q4m import JobId
from sqlalchemy_q4m import queue_table
from sqlalchemy_q4m.alembic import AlterQueueEngine
from sqlalchemy_q4m.alembic import ConvertQueueTableOp
from sqlalchemy_q4m.alembic import CreateQueueTableOp
from sqlalchemy_q4m.alembic import DropQueueTableOp
from sqlalchemy_q4m.alembic.compare import _compare_queue_engine
from sqlalchemy_q4m.alembic.compare import uses_q4m_types
from sqlalchemy_q4m.alembic.render import IMPORT_LINE
from sqlalchemy_q4m.exc import QueueTableError

DIALECTS = ["mysql", "mariadb"]
RENDER_OPTS = {
    "alembic_module_prefix": "op.",
    "sqlalchemy_module_prefix": "sa.",
    "user_module_prefix": None,
}


def offline(dialect_name: str, **opts: object) -> tuple[Operations, io.StringIO]:
    """Operations writing SQL to a buffer, as ``alembic upgrade --sql`` does."""
    buffer = io.StringIO()
    context = MigrationContext.configure(
        dialect_name=dialect_name, opts={"as_sql": True, "output_buffer": buffer, **opts}
    )
    return Operations(context), buffer


def statements(buffer: io.StringIO) -> list[str]:
    return [re.sub(r"\s+", " ", s).strip() for s in buffer.getvalue().split(";") if s.strip()]


@pytest.mark.unit
@pytest.mark.parametrize("dialect_name", DIALECTS)
def test_create_queue_table_native_layout(dialect_name: str) -> None:
    op, buffer = offline(dialect_name)
    table = op.create_queue_table("shell_jobs", Column("command", Text, nullable=False))  # type: ignore[attr-defined]
    assert [c.name for c in table.columns] == ["id", "command"]
    assert statements(buffer) == [
        "CREATE TABLE shell_jobs ( id BINARY(16) NOT NULL, command TEXT NOT NULL )ENGINE=QUEUE"
    ]


@pytest.mark.unit
@pytest.mark.parametrize("dialect_name", DIALECTS)
def test_create_queue_table_portable_layout_when_configured(dialect_name: str) -> None:
    op, buffer = offline(dialect_name, q4m_backend="portable")
    op.create_queue_table("ruby_jobs", Column("command", Text), comment="ruby")  # type: ignore[attr-defined]
    assert statements(buffer) == [
        "CREATE TABLE ruby_jobs ( id BINARY(16) NOT NULL, command TEXT, PRIMARY KEY (id) )"
        "ENGINE=InnoDB COMMENT='ruby'"
    ]


@pytest.mark.unit
def test_create_queue_table_without_job_id_and_drop() -> None:
    op, buffer = offline("mysql")
    op.create_queue_table("raw_jobs", Column("n", Integer, autoincrement=False), job_id=False)  # type: ignore[attr-defined]
    op.drop_queue_table("raw_jobs", if_exists=True)  # type: ignore[attr-defined]
    assert statements(buffer) == [
        "CREATE TABLE raw_jobs ( n INTEGER )ENGINE=QUEUE",
        "DROP TABLE IF EXISTS raw_jobs",
    ]


def create_all_error(table: Table, dialect: Dialect) -> str:
    engine = create_mock_engine(
        f"{dialect.name}://", lambda sql, *a, **kw: str(sql.compile(dialect=dialect))
    )
    with pytest.raises(QueueTableError) as err:
        table.metadata.create_all(engine, checkfirst=False)  # type: ignore[arg-type]
    return str(err.value)


BAD_COLUMNS = [
    lambda: [Column("n", Integer, index=True)],
    lambda: [Column("n", Integer, unique=True)],
    lambda: [Column("n", Integer, autoincrement=True)],
    lambda: [Column("n", Integer), UniqueConstraint("n", name="uq_n")],
]


@pytest.mark.unit
@pytest.mark.parametrize("dialect_name", DIALECTS)
@pytest.mark.parametrize("make_columns", BAD_COLUMNS)
def test_validation_errors_are_those_of_create_all(dialect_name: str, make_columns: object) -> None:
    op, buffer = offline(dialect_name)
    expected = create_all_error(
        queue_table("bad_jobs", MetaData(), *make_columns()),  # type: ignore[operator]
        op.migration_context.dialect,
    )
    with pytest.raises(QueueTableError) as err:
        op.create_queue_table("bad_jobs", *make_columns())  # type: ignore[attr-defined, operator]
    assert str(err.value) == expected
    assert expected.startswith("queue table 'bad_jobs' cannot hold: ")
    assert buffer.getvalue() == ""


@pytest.mark.unit
def test_invalid_names_are_refused_before_any_sql() -> None:
    op, buffer = offline("mysql")
    with pytest.raises(QueueTableError, match="invalid table name"):
        op.create_queue_table("jobs; DROP TABLE x", Column("command", Text))  # type: ignore[attr-defined]
    with pytest.raises(QueueTableError, match="invalid table name"):
        op.convert_queue_table("jobs`")  # type: ignore[attr-defined]
    with pytest.raises(QueueTableError, match="invalid column name"):
        op.convert_queue_table("jobs", queue=False, primary_key=["a b"])  # type: ignore[attr-defined]
    assert buffer.getvalue() == ""


@pytest.mark.unit
@pytest.mark.parametrize(
    ("backend", "queue", "expected"),
    [
        ("native", True, "ALTER TABLE shell_jobs DROP PRIMARY KEY, ENGINE=QUEUE"),
        ("native", False, "ALTER TABLE shell_jobs ENGINE=InnoDB, ADD PRIMARY KEY (id)"),
        ("portable", True, "ALTER TABLE shell_jobs ENGINE=InnoDB"),
        ("portable", False, "ALTER TABLE shell_jobs ENGINE=InnoDB"),
    ],
)
def test_convert_queue_table_offline(backend: str, queue: bool, expected: str) -> None:
    op, buffer = offline("mariadb", q4m_backend=backend)
    op.convert_queue_table("shell_jobs", queue=queue)  # type: ignore[attr-defined]
    assert statements(buffer) == [expected]


@pytest.mark.unit
@pytest.mark.parametrize("dialect", [mysql.dialect(), mysql.dialect(is_mariadb=True)])
def test_alter_queue_engine_quotes_names(dialect: Dialect) -> None:
    table = Table("order", MetaData(), schema="jobs")
    sql = str(AlterQueueEngine(table, "InnoDB", add_primary_key=["key"]).compile(dialect=dialect))
    assert sql == "ALTER TABLE jobs.`order` ENGINE=InnoDB, ADD PRIMARY KEY (`key`)"
    with pytest.raises(QueueTableError, match="unknown engine"):
        AlterQueueEngine(table, "MyISAM; DROP TABLE x")
    with pytest.raises(QueueTableError, match="cannot hold a primary key"):
        AlterQueueEngine(table, "QUEUE", add_primary_key=["id"])


@pytest.mark.unit
def test_ops_reverse_into_each_other() -> None:
    md = MetaData()
    table = queue_table("shell_jobs", md, Column("command", Text), comment="shell commands")
    create = CreateQueueTableOp.from_table(table)
    assert [getattr(c, "name", None) for c in create.columns] == ["command"]
    drop = create.reverse()
    assert isinstance(drop, DropQueueTableOp)
    again = drop.reverse()
    assert isinstance(again, CreateQueueTableOp)
    rebuilt = again.to_table()
    assert [c.name for c in rebuilt.columns] == ["id", "command"]
    assert rebuilt.comment == "shell commands"
    assert rebuilt.kwargs["mysql_engine"] == rebuilt.kwargs["mariadb_engine"] == "QUEUE"
    assert create.to_diff_tuple()[0] == "add_table" and drop.to_diff_tuple()[0] == "remove_table"
    with pytest.raises(QueueTableError, match="cannot reverse"):
        DropQueueTableOp("shell_jobs").reverse()

    convert = ConvertQueueTableOp("events", queue=False, primary_key=["n"])
    back = convert.reverse()
    assert (back.queue, back.primary_key) == (True, ["n"])
    assert back.reverse().to_diff_tuple() == convert.to_diff_tuple()


@pytest.mark.unit
def test_rendered_operations_import_the_package() -> None:
    md = MetaData()
    table = queue_table("shell_jobs", md, Column("command", Text, nullable=False))
    upgrade = ops.UpgradeOps(
        [
            CreateQueueTableOp.from_table(table),
            DropQueueTableOp.from_table(table),
            ConvertQueueTableOp("ruby_jobs", queue=True, schema="app"),
        ]
    )
    code = render_python_code(upgrade)
    assert "op.create_queue_table('shell_jobs',\n    sa.Column('command', sa.Text()" in code
    assert "op.drop_queue_table('shell_jobs')" in code
    assert (
        "op.convert_queue_table('ruby_jobs', queue=True, primary_key=['id'], schema='app')" in code
    )
    for op in upgrade.ops:
        autogen = AutogenContext(
            MigrationContext.configure(dialect_name="mysql", opts=RENDER_OPTS), autogenerate=False
        )
        render_op_text(autogen, op)
        assert autogen.imports == {IMPORT_LINE}
    raw = CreateQueueTableOp("raw_jobs", [Column("n", Integer)], job_id=False)
    assert "job_id=False\n    )" in render_python_code(ops.UpgradeOps([raw]))


@pytest.mark.unit
def test_uses_q4m_types_finds_job_id_columns() -> None:
    plain = ops.AddColumnOp("log", Column("job_id", JobId()))
    other = ops.AddColumnOp("log", Column("n", Integer))
    assert uses_q4m_types(ops.UpgradeOps([ops.ModifyTableOps("log", [plain])]))
    assert not uses_q4m_types(ops.UpgradeOps([ops.ModifyTableOps("log", [other])]))


def drift_ops(metadata_table: Table, conn_table: Table, backend: str) -> list[object]:
    context = MigrationContext.configure(dialect_name="mysql", opts={"q4m_backend": backend})
    autogen = AutogenContext(context, metadata=metadata_table.metadata)
    modify = ops.ModifyTableOps(metadata_table.name, [])
    _compare_queue_engine(autogen, modify, None, metadata_table.name, conn_table, metadata_table)
    return list(modify.ops)


@pytest.mark.unit
def test_drift_an_ordinary_model_on_a_queue_table_is_converted_back() -> None:
    model = Table("events", MetaData(), Column("n", Integer, primary_key=True))
    reflected = Table("events", MetaData(), Column("n", Integer), mysql_engine="QUEUE")
    (found,) = drift_ops(model, reflected, "native")
    assert isinstance(found, ConvertQueueTableOp)
    assert (found.queue, found.primary_key) == (False, ["n"])


@pytest.mark.unit
def test_drift_queue_model_layouts() -> None:
    model = queue_table("jobs", MetaData(), Column("command", Text))
    innodb = Table(
        "jobs",
        MetaData(),
        Column("id", String(16), primary_key=True),
        Column("command", Text),
        mysql_engine="InnoDB",
    )
    queue = Table("jobs", MetaData(), Column("id", String(16)), mysql_engine="QUEUE")
    keyless = Table("jobs", MetaData(), Column("id", String(16)), mysql_engine="InnoDB")
    (native_drift,) = drift_ops(model, innodb, "native")
    assert isinstance(native_drift, ConvertQueueTableOp) and native_drift.queue
    assert drift_ops(model, queue, "native") == []
    assert drift_ops(model, innodb, "portable") == []  # the portable layout is not a diff
    (portable_drift,) = drift_ops(model, keyless, "portable")
    assert isinstance(portable_drift, ConvertQueueTableOp) and portable_drift.queue


@pytest.mark.integration
def test_online_operations_on_the_server(engine: Engine) -> None:
    """On stock MariaDB: the portable layout, create_all's validation, and a conversion that
    looks at the table's real key."""
    with engine.connect() as conn:
        op = Operations(MigrationContext.configure(conn))
        try:
            with pytest.raises(QueueTableError, match="al_ops_bad"):
                op.create_queue_table("al_ops_bad", Column("n", Integer, ForeignKey("x.n")))  # type: ignore[attr-defined]
            op.create_queue_table("al_ops_jobs", Column("command", Text))  # type: ignore[attr-defined]
            insp = inspect(conn)
            assert insp.get_pk_constraint("al_ops_jobs")["constrained_columns"] == ["id"]

            op.create_table(
                "al_ops_plain",
                Column("n", Integer, primary_key=True, autoincrement=False),
                Column("id", JobId(), nullable=False),
                mysql_engine="InnoDB",
            )
            op.convert_queue_table("al_ops_plain", queue=True, primary_key=["n"])  # type: ignore[attr-defined]
            assert inspect(conn).get_pk_constraint("al_ops_plain")["constrained_columns"] == ["id"]
            op.convert_queue_table("al_ops_plain", queue=False, primary_key=["n"])  # type: ignore[attr-defined]
            assert inspect(conn).get_pk_constraint("al_ops_plain")["constrained_columns"] == ["n"]
        finally:
            op.drop_table("al_ops_plain", if_exists=True)
            op.drop_queue_table("al_ops_jobs", if_exists=True)  # type: ignore[attr-defined]
        assert not {"al_ops_jobs", "al_ops_plain", "al_ops_bad"} & set(
            inspect(conn).get_table_names()
        )


@pytest.mark.unit
def test_only_a_binary16_id_is_taken_for_the_job_id() -> None:
    declared = Table("legacy", MetaData(), Column("id", Integer), mysql_engine="QUEUE")
    op = CreateQueueTableOp.from_table(declared)
    assert op.job_id is False and [getattr(c, "name", None) for c in op.columns] == ["id"]
    reflected = Table("jobs", MetaData(), Column("id", BINARY(16)), Column("command", Text))
    op = CreateQueueTableOp.from_table(reflected)
    assert op.job_id is True and [getattr(c, "name", None) for c in op.columns] == ["command"]
