"""Alembic support for queue tables: operations, autogenerate renderers and comparators.

Wire it into ``env.py`` with one import, next to the models::

    import sqlalchemy_q4m.alembic  # registers op.create_queue_table & co. and autogenerate

Migrations then use ``op.create_queue_table(name, *columns)``, ``op.drop_queue_table(name)``
and ``op.convert_queue_table(name, queue=True)``; they compile to ``ENGINE=QUEUE`` on a Q4M
server and to the portable InnoDB layout elsewhere (offline ``--sql``: native, unless
``context.configure(..., q4m_backend="portable")``).  Needs Alembic >= 1.18.
"""

from __future__ import annotations

from . import compare as compare
from . import render as render
from .ops import BACKEND_OPTION
from .ops import AlterQueueEngine
from .ops import ConvertQueueTableOp
from .ops import CreateQueueTableOp
from .ops import DropQueueTableOp
from .ops import migration_backend

__all__ = [
    "BACKEND_OPTION",
    "AlterQueueEngine",
    "ConvertQueueTableOp",
    "CreateQueueTableOp",
    "DropQueueTableOp",
    "migration_backend",
]
