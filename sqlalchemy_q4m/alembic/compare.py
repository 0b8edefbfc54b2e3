"""Autogenerate comparators for queue tables.

Alembic's own table comparison runs first and applies the user's ``include_name`` /
``include_object`` filters; these comparators only refine what it found:

* a per-table comparator reports engine drift (a queue model whose table is InnoDB on a Q4M
  server, an ordinary model whose table is ``ENGINE=QUEUE``) as ``convert_queue_table``;
* a schema-level pass, run last, turns ``create_table`` / ``drop_table`` of queue tables into
  ``create_queue_table`` / ``drop_queue_table`` and lifts the conversions out of the per-table
  group so they render as top-level ``op.`` calls (also with ``render_as_batch``).

The portable layout (InnoDB, primary key on the job id, and for a priority queue the claim
index ``q4m_claim``) on a stock server is what the model compiles to there, so it is never
reported: the claim index is no ``Index`` of the model, and Alembic's ``remove_index`` for it
is dropped here.
"""

from __future__ import annotations

from typing import Any

from alembic.autogenerate import comparators
from alembic.autogenerate.api import AutogenContext
from alembic.operations import ops
from alembic.util import DispatchPriority
from sqlalchemy import BINARY
from sqlalchemy import Column
from sqlalchemy import Table

from ..schema.ddl import CLAIM_INDEX
from ..schema.ddl import JOB_ID
from ..schema.ddl import is_queue_table
from ..server import BackendName
from .ops import ConvertQueueTableOp
from .ops import CreateQueueTableOp
from .ops import DropQueueTableOp
from .ops import migration_backend
from .ops import priority_of
from .render import IMPORT_LINE

__all__ = ["has_portable_queue_layout", "reflected_engine", "uses_q4m_types"]

_DIALECTS = ("mysql", "mariadb")


def reflected_engine(table: Table) -> str:
    """The storage engine a reflected MySQL/MariaDB table reports (upper case, "" if none)."""
    for dialect in _DIALECTS:
        engine = table.kwargs.get(f"{dialect}_engine")
        if engine:
            return str(engine).upper()
    return ""


def has_portable_queue_layout(table: Table) -> bool:
    """True when a reflected table has the portable queue layout: InnoDB, keyed on a
    ``BINARY(16)`` job id and nothing else (no foreign key, other constraint, or index but
    the claim index)."""
    if reflected_engine(table) != "INNODB":
        return False
    key = [c.name for c in table.primary_key.columns]
    if key != [JOB_ID]:
        return False
    job_id = table.c[JOB_ID].type
    if not isinstance(job_id, BINARY) or job_id.length != 16:
        return False
    indexes = {index.name for index in table.indexes}
    return indexes <= {CLAIM_INDEX} and not table.foreign_keys and len(table.constraints) == 1


def _is_reflected_queue(
    autogen_context: AutogenContext, table: Table, backend: BackendName
) -> bool:
    if reflected_engine(table) == "QUEUE":
        return True
    if backend != "portable" or not has_portable_queue_layout(table):
        return False
    indexes = autogen_context.inspector.get_indexes(table.name, schema=table.schema)
    return {index["name"] for index in indexes} <= {CLAIM_INDEX}


@comparators.dispatch_for("table")
def _compare_queue_engine(
    autogen_context: AutogenContext,
    modify_table_ops: ops.ModifyTableOps,
    schema: str | None,
    tname: str,
    conn_table: Table | None,
    metadata_table: Table | None,
) -> None:
    """Report a table whose engine does not match its model as ``convert_queue_table`` (on
    the portable backend also a priority queue without its claim index, as tables made before
    the index was part of the layout are)."""
    if conn_table is None or metadata_table is None:
        return
    if autogen_context.dialect is None or autogen_context.dialect.name not in _DIALECTS:
        return
    backend = migration_backend(autogen_context.migration_context)
    engine = reflected_engine(conn_table)
    key = [c.name for c in conn_table.primary_key.columns]
    if is_queue_table(metadata_table):
        drifted = engine != "QUEUE" if backend == "native" else key != [JOB_ID]
        priority = priority_of(metadata_table) if backend == "portable" else None
        if not drifted and priority is not None:
            indexes = autogen_context.inspector.get_indexes(tname, schema=schema)
            drifted = all(index["name"] != CLAIM_INDEX for index in indexes)
        if drifted:
            modify_table_ops.ops.append(
                ConvertQueueTableOp(
                    tname,
                    queue=True,
                    primary_key=key or [JOB_ID],
                    schema=schema,
                    priority=priority,
                )
            )
    elif engine == "QUEUE":
        model_key = [c.name for c in metadata_table.primary_key.columns]
        modify_table_ops.ops.append(
            ConvertQueueTableOp(tname, queue=False, primary_key=model_key, schema=schema)
        )


def _metadata_table(autogen_context: AutogenContext, op: ops.CreateTableOp) -> Table:
    key = f"{op.schema}.{op.table_name}" if op.schema else op.table_name
    table = autogen_context.table_key_to_table.get(key)
    return table if table is not None else op.to_table()


def _queue_ops(
    autogen_context: AutogenContext, op: ops.MigrateOperation, backend: BackendName
) -> list[Any]:
    """The operations that replace ``op`` (usually just ``[op]``)."""
    if type(op) is ops.CreateTableOp:
        table = _metadata_table(autogen_context, op)
        if is_queue_table(table):
            return [CreateQueueTableOp.from_table(table)]
    elif type(op) is ops.DropTableOp:
        table = op.to_table()
        if _is_reflected_queue(autogen_context, table, backend):
            drop = DropQueueTableOp.from_table(table)
            if drop.create_op is not None and drop.create_op.priority is None:
                drop.create_op.priority = _claim_priority(autogen_context, table)
            return [drop]
    elif isinstance(op, ops.ModifyTableOps):
        converts = [o for o in op.ops if isinstance(o, ConvertQueueTableOp)]
        if converts:
            op.ops = [o for o in op.ops if not isinstance(o, ConvertQueueTableOp)]
            return ([op] if op.ops else []) + converts
    return [op]


def _claim_priority(autogen_context: AutogenContext, table: Table) -> str | None:
    """The priority column of a reflected portable queue: the first of its claim index."""
    if reflected_engine(table) == "QUEUE":
        return None
    for index in autogen_context.inspector.get_indexes(table.name, schema=table.schema):
        columns = index["column_names"]
        if index["name"] == CLAIM_INDEX and len(columns) > 1 and columns[0] is not None:
            return columns[0]
    return None


def _only_claim_index_drops(
    autogen_context: AutogenContext, op: Any, dropped: set[tuple[str | None, str]]
) -> bool:
    """Drop Alembic's ``remove_index`` of the claim index from ``op`` (the changes of one
    table) when the table is a queue, modelled or being dropped; True if nothing is left."""
    if not isinstance(op, ops.ModifyTableOps):
        return False
    key = f"{op.schema}.{op.table_name}" if op.schema else op.table_name
    table = autogen_context.table_key_to_table.get(key)
    queue = table is not None and is_queue_table(table)
    if not (queue or (op.schema, op.table_name) in dropped):
        return False
    op.ops = [o for o in op.ops if not _is_claim_index_drop(o)]
    return not op.ops


def _is_claim_index_drop(op: ops.MigrateOperation) -> bool:
    """Alembic's ``remove_index`` of the portable layout's claim index (not in the model)."""
    return isinstance(op, ops.DropIndexOp) and op.index_name == CLAIM_INDEX


def _is_ours(type_: Any) -> bool:
    return type(type_).__module__.startswith("sqlalchemy_q4m")


def uses_q4m_types(op: ops.MigrateOperation) -> bool:
    """True when ``op`` renders a column type of this package (e.g. ``JobId``): Alembic
    renders it as ``sqlalchemy_q4m.types.JobId()`` but adds no import for it."""
    if isinstance(op, ops.OpContainer):
        return any(uses_q4m_types(o) for o in op.ops)
    if isinstance(op, ops.CreateTableOp):
        return any(isinstance(c, Column) and _is_ours(c.type) for c in op.columns)
    if isinstance(op, ops.AddColumnOp):
        return _is_ours(op.column.type)
    if isinstance(op, ops.AlterColumnOp):
        return _is_ours(op.modify_type) or _is_ours(op.existing_type)
    return False


@comparators.dispatch_for("schema", priority=DispatchPriority.LAST)
def _queue_table_ops(
    autogen_context: AutogenContext, upgrade_ops: ops.UpgradeOps, schemas: set[str | None]
) -> None:
    """Replace the table operations Alembic found for queue tables by the queue operations."""
    if autogen_context.dialect is None or autogen_context.dialect.name not in _DIALECTS:
        return
    backend = migration_backend(autogen_context.migration_context)
    replaced: list[Any] = []
    for op in upgrade_ops.ops:
        replaced.extend(_queue_ops(autogen_context, op, backend))
    dropped = {(o.schema, o.table_name) for o in replaced if isinstance(o, DropQueueTableOp)}
    upgrade_ops.ops = [
        o for o in replaced if not _only_claim_index_drops(autogen_context, o, dropped)
    ]
    if uses_q4m_types(upgrade_ops):
        autogen_context.imports.add(IMPORT_LINE)
