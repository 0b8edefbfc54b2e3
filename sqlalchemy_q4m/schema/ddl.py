"""Queue tables: how they are declared, validated and compiled.

A queue table is a table marked ``info["q4m_queue"]`` (what :class:`QueueMixin` and
:func:`queue_table` do) or declared with ``mysql_engine="QUEUE"`` / ``mariadb_engine="QUEUE"``.
Its layout depends on the backend chosen for the engine (:mod:`sqlalchemy_q4m.server`):

* native: ``ENGINE=QUEUE`` with no key at all (the job id is a plain column);
* portable: ``ENGINE=InnoDB`` with the job id as primary key (FIFO order by key); a queue
  with a priority column (``PriorityMixin``) also gets the index its claim reads,
  ``INDEX q4m_claim (priority DESC, id)`` (without it the claim sorts the whole table and
  locks every row it sorts, so a second consumer finds nothing while one job is held).

Both layouts are rendered by SQLAlchemy's own MySQL DDL compiler; the hook below only removes
the key Q4M cannot hold (and adds the claim index where InnoDB needs it), picks the engine, and
refuses declarations Q4M cannot hold, on both backends alike so a model can move between them.
"""

from __future__ import annotations

import re
import uuid
from typing import Any
from typing import ClassVar

from sqlalchemy import Boolean
from sqlalchemy import Column
from sqlalchemy import Connection
from sqlalchemy import Date
from sqlalchemy import DateTime
from sqlalchemy import ForeignKeyConstraint
from sqlalchemy import Integer
from sqlalchemy import MetaData
from sqlalchemy import Table
from sqlalchemy import Time
from sqlalchemy import event
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Mapped
from sqlalchemy.orm import mapped_column
from sqlalchemy.schema import CheckConstraint
from sqlalchemy.schema import ColumnCollectionConstraint
from sqlalchemy.schema import CreateIndex
from sqlalchemy.schema import CreateTable
from sqlalchemy.schema import PrimaryKeyConstraint
from sqlalchemy.schema import SchemaItem
from sqlalchemy.schema import UniqueConstraint
from sqlalchemy.sql.compiler import DDLCompiler

from ..exc import QueueTableError
from ..server import BackendName
from ..server import backend_for_dialect
from ..server import detect_backend
from ..types import JobId
from ..types import new_job_id
from .retry import ATTEMPTS
from .retry import PRIORITY
from .retry import PRIORITY_INFO_KEY
from .retry import RUN_AT

__all__ = [
    "CLAIM_INDEX",
    "JOB_ID",
    "QueueMixin",
    "claim_order",
    "is_queue_table",
    "job_id_column",
    "queue_table",
    "queue_table_problems",
    "shadowing_columns",
    "validate_name",
]

#: The name of the job id column every declared queue table carries.
JOB_ID = "id"
QUEUE_INFO_KEY = "q4m_queue"
JOB_ID_INFO_KEY = "q4m_job_id"
#: The index the portable layout of a priority queue carries for its claim (see below).
CLAIM_INDEX = "q4m_claim"
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]{0,63}$")
_DIALECTS = ("mysql", "mariadb")


def validate_name(name: str, what: str = "table") -> str:
    """Return ``name`` if it is a plain identifier Q4M's parser accepts, else raise.

    Queue table and column names end up inside ``queue_wait('table:expr')`` strings, which
    Q4M parses itself; only ``[A-Za-z_][A-Za-z0-9_$]*`` (at most 64 characters) is allowed.
    """
    if not isinstance(name, str) or not _NAME.match(name):
        raise QueueTableError(
            f"invalid {what} name {name!r}: use letters, digits, '_' or '$', "
            "not starting with a digit, at most 64 characters"
        )
    return name


def shadowing_columns(table: Table, name: str) -> list[Column[Any]]:
    """The other columns of ``table`` a Q4M condition on ``name`` could read instead.

    Q4M resolves a condition column by comparing only ``len(name)`` characters,
    case-insensitively, with the table's condition-capable columns (integers, and DATE or
    old-format date/time columns) in the server's column order, so ``n`` reads an ``nx``
    placed before it.  The model's order need not be the server's (``ALTER TABLE ADD COLUMN``
    appends), so every longer such column counts, wherever it is declared.
    """
    prefix = name.lower()
    return [
        column
        for column in table.columns
        if column.name.lower() != prefix
        and column.name.lower().startswith(prefix)
        and isinstance(
            getattr(column.type, "impl_instance", column.type),
            Integer | Boolean | Date | DateTime | Time,
        )
    ]


def _library_column_problems(table: Table) -> list[str]:
    """The library's condition columns (``run_at``, ...) a user's column would shadow."""
    return [
        f"column {other.name!r} shadows {name!r} in Q4M conditions (Q4M matches condition "
        f"columns by prefix, so a condition on {name!r} would read {other.name!r}): rename "
        f"{other.name!r} so that it does not start with {name!r}"
        for name in (RUN_AT, ATTEMPTS, PRIORITY)
        if name in table.columns
        for other in shadowing_columns(table, name)
    ]


def job_id_column(name: str = JOB_ID) -> Column[uuid.UUID]:
    """The job identity column: a client-generated UUIDv7 (see :mod:`sqlalchemy_q4m.types`)."""
    return Column(
        name,
        JobId(),
        primary_key=True,
        autoincrement=False,
        default=new_job_id,
        info={JOB_ID_INFO_KEY: True},
    )


def _mark(table: Table) -> None:
    table.info[QUEUE_INFO_KEY] = True
    for dialect in _DIALECTS:
        table.dialect_kwargs[f"{dialect}_engine"] = "QUEUE"


def is_queue_table(table: Any) -> bool:
    """True for a table declared as a queue table (mixin, ``queue_table()`` or ENGINE=QUEUE)."""
    if not isinstance(table, Table):
        return False
    if table.info.get(QUEUE_INFO_KEY):
        return True
    return any(
        str(table.kwargs.get(f"{dialect}_engine", "")).upper() == "QUEUE" for dialect in _DIALECTS
    )


def queue_table(name: str, metadata: MetaData, *args: SchemaItem, **kw: Any) -> Table:
    """A Core :class:`~sqlalchemy.Table` for a queue, with the job id column added.

    ``queue_table("shell_jobs", metadata, Column("command", Text))`` is the Core spelling of
    a :class:`QueueMixin` model.
    """
    validate_name(name)
    table = Table(name, metadata, job_id_column(), *args, **kw)
    _mark(table)
    _refuse_shadowed(table)
    return table


class QueueMixin:
    """Declarative mixin that makes a mapped class a queue table.

    Adds the ``id`` job identity (a UUIDv7 the client makes, so the ORM has an identity on a
    keyless Q4M table) and marks the table ``ENGINE=QUEUE`` for MySQL and MariaDB.
    """

    __queue_table__: ClassVar[bool] = True

    id: Mapped[uuid.UUID] = mapped_column(
        JobId(),
        primary_key=True,
        autoincrement=False,
        default=new_job_id,
        info={JOB_ID_INFO_KEY: True},
        sort_order=-1,
    )

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        table = cls.__dict__.get("__table__")
        if isinstance(table, Table):
            validate_name(table.name)
            _mark(table)
            _refuse_shadowed(table)


def _refuse_shadowed(table: Table) -> None:
    problems = _library_column_problems(table)
    if problems:
        raise QueueTableError(f"queue table {table.name!r}: " + "; ".join(problems))


def _describe(item: SchemaItem) -> str:
    name = getattr(item, "name", None)
    kind = type(item).__name__
    if isinstance(item, ForeignKeyConstraint):
        cols = ", ".join(c.name for c in item.columns)
        return f"foreign key ({cols}) -> {item.referred_table.name}"
    if name:
        return f"{kind} {name!r}"
    cols = ", ".join(c.name for c in getattr(item, "columns", []))
    return f"{kind} ({cols})"


def queue_table_problems(table: Table) -> list[str]:
    """What in ``table`` a Q4M table cannot hold (an empty list means it is fine)."""
    problems: list[str] = []
    try:
        validate_name(table.name)
    except QueueTableError as err:
        problems.append(str(err))
    for column in table.columns:
        try:
            validate_name(column.name, "column")
        except QueueTableError as err:
            problems.append(str(err))
        if column.info.get(JOB_ID_INFO_KEY):
            continue
        if column.primary_key:
            problems.append(f"primary key column {column.name!r} (Q4M tables hold no keys)")
        if column.autoincrement is True or (
            column.primary_key and column is table.autoincrement_column
        ):
            problems.append(f"AUTO_INCREMENT column {column.name!r}")
        if column.foreign_keys:
            problems.append(f"foreign key on column {column.name!r}")
    problems.extend(_library_column_problems(table))
    for index in table.indexes:
        problems.append(f"index {index.name!r} (Q4M tables hold no indexes)")
    for constraint in table.constraints:
        if isinstance(constraint, UniqueConstraint):
            problems.append(f"unique constraint {_describe(constraint)} (no keys)")
        elif isinstance(constraint, ForeignKeyConstraint):
            if not any(c.foreign_keys for c in constraint.columns):
                problems.append(_describe(constraint))
        elif isinstance(constraint, CheckConstraint):
            problems.append(f"check constraint {_describe(constraint)}")
    return problems


def _validate(table: Table) -> None:
    problems = queue_table_problems(table)
    if problems:
        raise QueueTableError(
            f"queue table {table.name!r} cannot hold: " + "; ".join(dict.fromkeys(problems))
        )


def claim_order(table: Table) -> list[tuple[Column[Any], bool]]:
    """The portable claim's ``ORDER BY``: (column, descending) pairs, a priority column
    (``info["q4m_priority"]``, ``PriorityMixin``) first, highest first, then the job id."""
    first = [(c, True) for c in table.columns if c.info.get(PRIORITY_INFO_KEY)]
    return [*first, *((c, False) for c in table.primary_key.columns)]


class ClaimIndex(ColumnCollectionConstraint):
    """``INDEX q4m_claim (priority DESC, id)`` inside a portable ``CREATE TABLE``: the claim
    reads it in order and stops at the first free row, locking only that one."""

    __visit_name__ = "q4m_claim_index"

    def __init__(self, table: Table) -> None:
        self.descending = {c.key for c, desc in claim_order(table) if desc}
        super().__init__(*(c for c, _ in claim_order(table)), name=CLAIM_INDEX)


def needs_claim_index(table: Table) -> bool:
    """True when the portable layout of ``table`` carries :data:`CLAIM_INDEX`: its claim
    orders by more than the primary key."""
    return bool(table.primary_key.columns) and any(desc for _, desc in claim_order(table))


@compiles(ClaimIndex, *_DIALECTS)
def _compile_claim_index(index: ClaimIndex, compiler: DDLCompiler, **kw: Any) -> str:
    quote = compiler.preparer.quote
    columns = ", ".join(
        quote(c.name) + (" DESC" if c.key in index.descending else "") for c in index.columns
    )
    return f"INDEX {quote(CLAIM_INDEX)} ({columns})"


def backend_for_ddl(dialect: Dialect) -> BackendName:
    """The layout to compile for ``dialect``: the detected or chosen backend, else native."""
    return backend_for_dialect(dialect) or "native"


@compiles(CreateTable, *_DIALECTS)
def _compile_create_table(create: CreateTable, compiler: DDLCompiler, **kw: Any) -> str:
    table = create.element
    if not is_queue_table(table):
        return str(compiler.visit_create_table(create, **kw))  # type: ignore[no-untyped-call]
    _validate(table)
    backend = backend_for_ddl(compiler.dialect)
    # Compile a copy so the user's Table keeps its declaration: SQLAlchemy renders the
    # columns and options; we only choose the engine and whether the job id is a key.
    copy = table.to_metadata(MetaData())
    engine = "QUEUE" if backend == "native" else "InnoDB"
    for dialect in _DIALECTS:
        copy.dialect_kwargs[f"{dialect}_engine"] = engine
    if backend == "portable" and not copy.primary_key.columns:
        raise QueueTableError(
            f"queue table {table.name!r} has no job id: the portable backend needs a key; "
            "declare it with QueueMixin or queue_table()"
        )
    if backend == "portable" and needs_claim_index(copy):
        copy.append_constraint(ClaimIndex(copy))
    rendered = compiler.visit_create_table(  # type: ignore[no-untyped-call]
        CreateTable(copy, if_not_exists=create.if_not_exists)
    )
    return str(rendered)


@compiles(PrimaryKeyConstraint, *_DIALECTS)
def _compile_primary_key(
    constraint: PrimaryKeyConstraint, compiler: DDLCompiler, **kw: Any
) -> str | None:
    """Q4M holds no key: on the native layout the job id's primary key is not rendered."""
    table = constraint.table
    if is_queue_table(table) and backend_for_ddl(compiler.dialect) == "native":
        return None  # DDLCompiler.create_table_constraints() skips None
    return compiler.visit_primary_key_constraint(constraint, **kw)


@compiles(CreateIndex, *_DIALECTS)
def _compile_create_index(create: CreateIndex, compiler: DDLCompiler, **kw: Any) -> str:
    table = create.element.table
    if isinstance(table, Table) and is_queue_table(table):
        _validate(table)
    return str(compiler.visit_create_index(create, **kw))  # type: ignore[no-untyped-call]


@event.listens_for(Table, "before_create")
def _detect_before_create(table: Table, connection: Connection, **kw: Any) -> None:
    """Detect the backend before a queue table is created, so the compiler knows the layout.

    A mock connection (``create_mock_engine``, Alembic's offline ``--sql`` mode) cannot be
    asked: the layout chosen for its dialect is used, and the compiler hook validates.
    """
    if not isinstance(connection, Connection):
        return
    if is_queue_table(table) and connection.dialect.name in _DIALECTS:
        _validate(table)
        detect_backend(connection)
