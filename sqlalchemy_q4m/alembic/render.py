"""Autogenerate renderers: the Python text of the queue operations in a migration script.

Each renderer adds ``import sqlalchemy_q4m.alembic`` to the migration, so the script registers
the operations it calls even when run outside the project's ``env.py``.  Columns are rendered
by Alembic itself (a plain ``create_table`` with the same payload, through the public
:func:`alembic.autogenerate.render_op_text`), so types, defaults and imports match Alembic's.
"""

from __future__ import annotations

from alembic.autogenerate import render_op_text
from alembic.autogenerate import renderers
from alembic.autogenerate.api import AutogenContext

from .ops import ConvertQueueTableOp
from .ops import CreateQueueTableOp
from .ops import DropQueueTableOp

__all__ = ["IMPORT_LINE"]

#: The import each rendered queue operation adds to the migration script.
IMPORT_LINE = "import sqlalchemy_q4m.alembic  # noqa: F401 - queue operations, sqlalchemy_q4m.types"


def _prefix(autogen_context: AutogenContext) -> str:
    prefix: str = autogen_context.opts.get("alembic_module_prefix") or ""
    return prefix


def _schema(schema: str | None) -> str:
    return f", schema={schema!r}" if schema else ""


@renderers.dispatch_for(CreateQueueTableOp)
def _render_create_queue_table(autogen_context: AutogenContext, op: CreateQueueTableOp) -> str:
    autogen_context.imports.add(IMPORT_LINE)
    text = render_op_text(autogen_context, op.as_plain_op())
    # ``<prefix>create_table('name',\n<columns...>`` -> ``<prefix>create_queue_table(...``
    head = f"{_prefix(autogen_context)}create_table("
    if not text.startswith(head):  # pragma: no cover - a render_item hook rewrote the call
        return text
    text = f"{_prefix(autogen_context)}create_queue_table(" + text[len(head) :]
    if not op.job_id:
        text = text[: -len("\n)")] + ",\njob_id=False\n)"
    if op.priority is not None:
        text = text[: -len("\n)")] + f",\npriority={op.priority!r}\n)"
    return text


@renderers.dispatch_for(DropQueueTableOp)
def _render_drop_queue_table(autogen_context: AutogenContext, op: DropQueueTableOp) -> str:
    autogen_context.imports.add(IMPORT_LINE)
    text = f"{_prefix(autogen_context)}drop_queue_table({op.table_name!r}{_schema(op.schema)}"
    if op.if_exists is not None:
        text += f", if_exists={bool(op.if_exists)!r}"
    return text + ")"


@renderers.dispatch_for(ConvertQueueTableOp)
def _render_convert_queue_table(autogen_context: AutogenContext, op: ConvertQueueTableOp) -> str:
    autogen_context.imports.add(IMPORT_LINE)
    return (
        f"{_prefix(autogen_context)}convert_queue_table({op.table_name!r}, "
        f"queue={op.queue!r}, primary_key={op.primary_key!r}{_schema(op.schema)}"
        + (f", priority={op.priority!r})" if op.priority is not None else ")")
    )
