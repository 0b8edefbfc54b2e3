"""Alembic operations for queue tables: create, drop, and convert between layouts.

``op.create_queue_table()`` and ``op.drop_queue_table()`` are :class:`CreateTableOp` /
:class:`DropTableOp` subclasses, so everything Alembic does with tables (diffs, reversal,
rewriters) keeps working; the table they build is a queue table and compiles through the
``@compiles`` hooks of :mod:`sqlalchemy_q4m.schema.ddl` to the layout of the server the
migration runs against.  ``op.convert_queue_table()`` turns an existing table into a queue
table (or back).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from alembic.migration import MigrationContext
from alembic.operations import Operations
from alembic.operations import ops
from sqlalchemy import BINARY
from sqlalchemy import Column
from sqlalchemy import Connection
from sqlalchemy import MetaData
from sqlalchemy import PrimaryKeyConstraint
from sqlalchemy import Table
from sqlalchemy import inspect
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.schema import ExecutableDDLElement
from sqlalchemy.schema import SchemaItem
from sqlalchemy.sql.compiler import DDLCompiler

from ..exc import QueueTableError
from ..schema.ddl import CLAIM_INDEX
from ..schema.ddl import JOB_ID
from ..schema.ddl import JOB_ID_INFO_KEY
from ..schema.ddl import QUEUE_INFO_KEY
from ..schema.ddl import job_id_column
from ..schema.ddl import validate_name
from ..schema.retry import PRIORITY_INFO_KEY
from ..server import BackendName
from ..server import backend_for_dialect
from ..server import detect_backend
from ..server import use_backend
from ..types import JobId

__all__ = [
    "BACKEND_OPTION",
    "AlterQueueEngine",
    "ConvertQueueTableOp",
    "CreateQueueTableOp",
    "DropQueueTableOp",
    "migration_backend",
]

#: ``context.configure(..., q4m_backend="portable")`` fixes the layout a migration compiles to
#: (``"native"``, ``"portable"`` or ``"auto"``); needed offline (``--sql``), where no server
#: can be asked and the native layout is the default.
BACKEND_OPTION = "q4m_backend"
_DIALECTS = ("mysql", "mariadb")
_ENGINE_KEYS = tuple(f"{dialect}_engine" for dialect in _DIALECTS)


def migration_backend(context: MigrationContext) -> BackendName:
    """The queue layout this migration compiles to, fixed for its dialect before any DDL.

    ``q4m_backend`` in ``context.configure()`` wins; otherwise the server of the migration's
    connection is asked (:func:`~sqlalchemy_q4m.server.detect_backend`); offline, the layout
    chosen for the dialect, else native.
    """
    choice = context.opts.get(BACKEND_OPTION) or "auto"
    connection = context.connection
    online = not context.as_sql and isinstance(connection, Connection)
    if choice != "auto":
        use_backend(connection if online else context.dialect, choice)  # type: ignore[arg-type]
    if online:
        assert isinstance(connection, Connection)
        return detect_backend(connection)
    return backend_for_dialect(context.dialect) or "native"


def is_job_id(column: Column[Any]) -> bool:
    """True for the job id column a queue table gets from QueueMixin / queue_table().

    A reflected table carries no marker: there a ``BINARY(16)`` column named ``id`` is it.
    """
    if column.info.get(JOB_ID_INFO_KEY):
        return True
    type_ = column.type
    binary16 = isinstance(type_, JobId) or (isinstance(type_, BINARY) and type_.length == 16)
    return column.name == JOB_ID and binary16


def table_kwargs(table: Table) -> dict[str, Any]:
    """The table's dialect options, without the engine (the layout decides it)."""
    return {k: v for k, v in table.kwargs.items() if k not in _ENGINE_KEYS}


def priority_of(table: Table) -> str | None:
    """The column ``table``'s portable claim orders by: one marked ``info["q4m_priority"]``
    (``PriorityMixin``), or on a reflected table the first column of its claim index."""
    for column in table.columns:
        if column.info.get(PRIORITY_INFO_KEY):
            return column.name
    for index in table.indexes:
        if index.name == CLAIM_INDEX and len(index.columns) > 1:
            return next(iter(index.columns)).name
    return None


def payload_items(table: Table) -> tuple[list[SchemaItem], bool]:
    """The columns and constraints of ``table`` a ``create_queue_table()`` call spells out.

    The job id column and its primary key are left out (the operation adds them); the flag
    says whether the table has a job id at all.
    """
    job_ids = [c for c in table.columns if is_job_id(c)]
    items: list[SchemaItem] = [c for c in table.columns if not is_job_id(c)]
    for constraint in table.constraints:
        if isinstance(constraint, PrimaryKeyConstraint):
            extra = [c for c in constraint.columns if not is_job_id(c)]
            if extra:
                items.append(PrimaryKeyConstraint(*[c.name for c in constraint.columns]))
            continue
        items.append(constraint)
    return items, bool(job_ids)


@Operations.register_operation("create_queue_table")
class CreateQueueTableOp(ops.CreateTableOp):
    """``op.create_queue_table(name, *columns, **kw)``: create a queue table.

    The job id column is added as ``queue_table()`` adds it (``job_id=False`` leaves it out,
    for a keyless Q4M-only table); ``ENGINE=QUEUE`` on a Q4M server, the portable InnoDB layout
    elsewhere, with the same validation as ``create_all``.  ``priority="priority"`` names the
    column the portable claim orders by (``PriorityMixin``): that layout then gets the claim
    index (:data:`~sqlalchemy_q4m.schema.ddl.CLAIM_INDEX`), as ``create_all`` gives it.
    """

    def __init__(
        self,
        table_name: str,
        columns: Sequence[SchemaItem],
        *,
        schema: str | None = None,
        if_not_exists: bool | None = None,
        job_id: bool = True,
        priority: str | None = None,
        **kw: Any,
    ) -> None:
        validate_name(table_name)
        for engine_key in _ENGINE_KEYS:
            kw.pop(engine_key, None)
        super().__init__(table_name, columns, schema=schema, if_not_exists=if_not_exists, **kw)
        self.job_id = job_id
        self.priority = None if priority is None else validate_name(priority, "column")

    @classmethod
    def from_table(
        cls, table: Table, *, _namespace_metadata: MetaData | None = None
    ) -> CreateQueueTableOp:
        """The operation that creates ``table`` (a declared or a reflected queue table)."""
        items, job_id = payload_items(table)
        info = {k: v for k, v in table.info.items() if k != QUEUE_INFO_KEY}
        return cls(
            table.name,
            items,
            schema=table.schema,
            job_id=job_id,
            priority=priority_of(table),
            comment=table.comment,
            info=info,
            prefixes=list(table._prefixes),
            **table_kwargs(table),
        )

    def to_table(self, migration_context: MigrationContext | None = None) -> Table:
        """The queue table this operation creates, marked like ``queue_table()`` marks it."""
        columns = [job_id_column(), *self.columns] if self.job_id else list(self.columns)
        info = {**(self.info or {}), QUEUE_INFO_KEY: True}
        kw = {**self.kw, **dict.fromkeys(_ENGINE_KEYS, "QUEUE")}
        plain = ops.CreateTableOp(
            self.table_name,
            columns,
            schema=self.schema,
            comment=self.comment,
            info=info,
            prefixes=self.prefixes,
            **kw,
        )
        table = plain.to_table(migration_context)
        if self.priority is not None:
            if self.priority not in table.c:
                raise QueueTableError(
                    f"queue table {self.table_name!r} has no priority column {self.priority!r}"
                )
            table.c[self.priority].info[PRIORITY_INFO_KEY] = True
        return table

    def reverse(self) -> DropQueueTableOp:
        return DropQueueTableOp.from_table(self.to_table())

    def as_plain_op(self) -> ops.CreateTableOp:
        """A plain ``create_table`` with the same payload (used to render the columns)."""
        return ops.CreateTableOp(
            self.table_name,
            list(self.columns),
            schema=self.schema,
            comment=self.comment,
            prefixes=self.prefixes,
            if_not_exists=self.if_not_exists,
            **self.kw,
        )

    @classmethod
    def create_queue_table(
        cls,
        operations: Operations,
        table_name: str,
        *columns: SchemaItem,
        job_id: bool = True,
        priority: str | None = None,
        if_not_exists: bool | None = None,
        **kw: Any,
    ) -> Table:
        """Create queue table ``table_name`` with ``columns`` (the job id is added).

        ``op.create_queue_table("shell_jobs", sa.Column("command", sa.Text()))`` is the
        migration spelling of ``queue_table("shell_jobs", metadata, Column("command", Text))``.
        """
        op = cls(
            table_name,
            columns,
            job_id=job_id,
            priority=priority,
            if_not_exists=if_not_exists,
            **kw,
        )
        table: Table = operations.invoke(op)
        return table


@Operations.register_operation("drop_queue_table")
class DropQueueTableOp(ops.DropTableOp):
    """``op.drop_queue_table(name)``: drop a queue table; reverses into ``create_queue_table``."""

    def __init__(
        self,
        table_name: str,
        *,
        schema: str | None = None,
        if_exists: bool | None = None,
        create_op: CreateQueueTableOp | None = None,
    ) -> None:
        super().__init__(table_name, schema=schema, if_exists=if_exists)
        self.create_op = create_op

    @classmethod
    def from_table(
        cls, table: Table, *, _namespace_metadata: MetaData | None = None
    ) -> DropQueueTableOp:
        """The operation that drops ``table``, remembering it so the drop can be reversed."""
        return cls(table.name, schema=table.schema, create_op=CreateQueueTableOp.from_table(table))

    def reverse(self) -> CreateQueueTableOp:
        if self.create_op is None:
            raise QueueTableError(
                f"cannot reverse drop_queue_table({self.table_name!r}): its columns are unknown"
            )
        return self.create_op

    def to_table(self, migration_context: MigrationContext | None = None) -> Table:
        if self.create_op is not None:
            return self.create_op.to_table(migration_context)
        return Table(self.table_name, MetaData(), schema=self.schema)

    @classmethod
    def drop_queue_table(
        cls,
        operations: Operations,
        table_name: str,
        *,
        schema: str | None = None,
        if_exists: bool | None = None,
    ) -> None:
        """Drop queue table ``table_name`` (jobs still in it are lost)."""
        validate_name(table_name)
        operations.invoke(cls(table_name, schema=schema, if_exists=if_exists))


@Operations.register_operation("convert_queue_table")
class ConvertQueueTableOp(ops.MigrateOperation):
    """``op.convert_queue_table(name, queue=True)``: turn an existing table into a queue table
    in the layout of this server, or (``queue=False``) into an ordinary InnoDB table keyed on
    ``primary_key``.

    Autogenerate emits it when a table's engine drifted from its model, e.g. a queue model
    whose table is InnoDB on a Q4M server.  Native layout: ``DROP PRIMARY KEY, ENGINE=QUEUE``
    (and the claim index dropped, online); portable layout: ``ENGINE=InnoDB`` keyed on the job
    id, with the claim index on ``priority`` when given (a ``PriorityMixin`` queue).
    """

    def __init__(
        self,
        table_name: str,
        *,
        queue: bool = True,
        primary_key: Sequence[str] = (JOB_ID,),
        schema: str | None = None,
        priority: str | None = None,
    ) -> None:
        self.table_name = validate_name(table_name)
        self.queue = queue
        self.primary_key = [validate_name(c, "column") for c in primary_key]
        self.schema = schema
        self.priority = None if priority is None else validate_name(priority, "column")

    def reverse(self) -> ConvertQueueTableOp:
        return ConvertQueueTableOp(
            self.table_name,
            queue=not self.queue,
            primary_key=self.primary_key,
            schema=self.schema,
            priority=self.priority,
        )

    def to_diff_tuple(self) -> tuple[Any, ...]:
        return ("convert_queue_table", self.schema, self.table_name, self.queue)

    def target(self, backend: BackendName) -> tuple[str, list[str]]:
        """The engine and the primary key columns the table gets."""
        if not self.queue:
            return "InnoDB", list(self.primary_key)
        if backend == "native":
            return "QUEUE", []
        return "InnoDB", [JOB_ID]

    def assumed_primary_key(self, backend: BackendName) -> list[str]:
        """The key the table has before the conversion, when the server cannot be asked."""
        if self.queue:
            return list(self.primary_key)
        return [] if backend == "native" else [JOB_ID]

    @classmethod
    def convert_queue_table(
        cls,
        operations: Operations,
        table_name: str,
        *,
        queue: bool = True,
        primary_key: Sequence[str] = (JOB_ID,),
        schema: str | None = None,
        priority: str | None = None,
    ) -> None:
        """Convert ``table_name`` to a queue table of this server's layout (``queue=False``:
        back to an ordinary InnoDB table keyed on ``primary_key``); ``priority`` names the
        column the portable claim orders by (its layout gets the claim index)."""
        operations.invoke(
            cls(table_name, queue=queue, primary_key=primary_key, schema=schema, priority=priority)
        )


class AlterQueueEngine(ExecutableDDLElement):
    """``ALTER TABLE t [DROP PRIMARY KEY,] [DROP INDEX i,] ENGINE=x [, ADD PRIMARY KEY (...)]``
    in one statement (Q4M refuses a table with a key or an index, error 1069, so they go in
    the same statement as the engine)."""

    inherit_cache = False

    def __init__(
        self,
        table: Table,
        engine: str,
        *,
        drop_primary_key: bool = False,
        add_primary_key: Sequence[str] = (),
        drop_indexes: Sequence[str] = (),
        add_claim_index: Sequence[str] = (),
    ) -> None:
        if engine not in ("QUEUE", "InnoDB"):
            raise QueueTableError(f"unknown engine {engine!r}: use 'QUEUE' or 'InnoDB'")
        if engine == "QUEUE" and (add_primary_key or add_claim_index):
            raise QueueTableError(
                f"queue table {table.name!r} cannot hold a primary key or an index"
            )
        self.table = table
        self.engine = engine
        self.drop_primary_key = drop_primary_key
        self.add_primary_key = [validate_name(c, "column") for c in add_primary_key]
        self.drop_indexes = [validate_name(i, "index") for i in drop_indexes]
        #: (priority, job id): the claim index added, descending on the first column
        self.add_claim_index = [validate_name(c, "column") for c in add_claim_index]


@compiles(AlterQueueEngine, *_DIALECTS)
def _compile_alter_engine(element: AlterQueueEngine, compiler: DDLCompiler, **kw: Any) -> str:
    preparer = compiler.preparer
    parts = []
    if element.drop_primary_key:
        parts.append("DROP PRIMARY KEY")
    parts.extend(f"DROP INDEX {preparer.quote(name)}" for name in element.drop_indexes)
    parts.append(f"ENGINE={element.engine}")
    if element.add_primary_key:
        columns = ", ".join(preparer.quote(c) for c in element.add_primary_key)
        parts.append(f"ADD PRIMARY KEY ({columns})")
    if element.add_claim_index:
        first, *rest = element.add_claim_index
        columns = ", ".join([f"{preparer.quote(first)} DESC", *map(preparer.quote, rest)])
        parts.append(f"ADD INDEX {preparer.quote(CLAIM_INDEX)} ({columns})")
    return f"ALTER TABLE {preparer.format_table(element.table)} {', '.join(parts)}"


@Operations.implementation_for(CreateQueueTableOp)
def _create_queue_table(operations: Operations, operation: CreateQueueTableOp) -> Table:
    migration_backend(operations.migration_context)
    table = operation.to_table(operations.migration_context)
    kw = {}
    if operation.if_not_exists is not None:
        kw["if_not_exists"] = operation.if_not_exists
    # Alembic's create_table fires before_create: ddl.py validates the table and detects the
    # backend there, exactly as create_all does; the @compiles hooks pick the layout.
    operations.impl.create_table(table, **kw)
    return table


@Operations.implementation_for(DropQueueTableOp)
def _drop_queue_table(operations: Operations, operation: DropQueueTableOp) -> None:
    kw = {}
    if operation.if_exists is not None:
        kw["if_exists"] = operation.if_exists
    table = Table(operation.table_name, MetaData(), schema=operation.schema)
    operations.impl.drop_table(table, **kw)


@Operations.implementation_for(ConvertQueueTableOp)
def _convert_queue_table(operations: Operations, operation: ConvertQueueTableOp) -> None:
    context = operations.migration_context
    backend = migration_backend(context)
    engine, key = operation.target(backend)
    connection = context.connection
    drop_indexes: list[str] = []
    claim_index = bool(operation.queue and engine == "InnoDB" and operation.priority)
    if not context.as_sql and isinstance(connection, Connection):
        insp = inspect(connection)
        current = insp.get_pk_constraint(operation.table_name, schema=operation.schema)
        current_key = list(current.get("constrained_columns") or [])
        indexes = insp.get_indexes(operation.table_name, schema=operation.schema)
        has_claim_index = any(i["name"] == CLAIM_INDEX for i in indexes)
        if engine == "QUEUE" and has_claim_index:  # Q4M holds no index (error 1069)
            drop_indexes = [CLAIM_INDEX]
        claim_index = claim_index and not has_claim_index
    else:
        current_key = operation.assumed_primary_key(backend)
    same_key = current_key == key
    table = Table(operation.table_name, MetaData(), schema=operation.schema)
    operations.execute(
        AlterQueueEngine(
            table,
            engine,
            drop_primary_key=bool(current_key) and not same_key,
            add_primary_key=[] if same_key else key,
            drop_indexes=drop_indexes,
            add_claim_index=[operation.priority, JOB_ID]
            if claim_index and operation.priority
            else [],
        )
    )
