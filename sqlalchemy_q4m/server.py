"""What a server can run: the QUEUE engine (native backend) or InnoDB with SKIP LOCKED.

The choice is made once per engine (per SQLAlchemy :class:`~sqlalchemy.engine.Dialect`
instance, which an engine owns) and remembered: detected on first use, or set by
:func:`use_backend`.  The DDL compiler reads the same choice, so ``create_all`` and
``queue_session`` always agree on the layout of a queue table.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING
from typing import Literal
from typing import TypeAlias

from sqlalchemy import Connection
from sqlalchemy import Engine
from sqlalchemy import text
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import Session

from .exc import BackendError
from .exc import UnsupportedServer

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection
    from sqlalchemy.ext.asyncio import AsyncEngine
    from sqlalchemy.ext.asyncio import AsyncSession

    AnyBind: TypeAlias = (
        Engine | Connection | Session | AsyncEngine | AsyncConnection | AsyncSession | Dialect
    )

__all__ = [
    "BackendName",
    "backend_for_dialect",
    "check_server",
    "detect_backend",
    "use_backend",
    "validate_backend_name",
]

BackendName = Literal["native", "portable"]
_NAMES: tuple[BackendName, ...] = ("native", "portable")
#: The dialect attribute holding its chosen backend: it lives exactly as long as the dialect
#: (its engine's), and reading it costs a dict look-up, not a weak reference per call.
_CHOSEN = "_q4m_backend"
_lock = threading.Lock()

#: Oldest servers with ``SELECT ... FOR UPDATE SKIP LOCKED``.
MIN_MARIADB = (10, 6)
MIN_MYSQL = (8, 0, 1)


def validate_backend_name(name: str) -> BackendName:
    """``name`` ('native' or 'portable') as a :data:`BackendName`; :class:`BackendError` for
    any other."""
    if name not in _NAMES:
        raise BackendError(f"unknown queue backend {name!r}: use 'native', 'portable' or 'auto'")
    return "native" if name == "native" else "portable"


def _dialect_of(bind: AnyBind) -> Dialect:
    if isinstance(bind, Dialect):  # e.g. an offline Alembic migration's dialect
        return bind
    if isinstance(bind, Session):
        return bind.get_bind().dialect
    sync_session = getattr(bind, "sync_session", None)
    if isinstance(sync_session, Session):
        return sync_session.get_bind().dialect
    dialect: Dialect = bind.dialect  # type: ignore[union-attr]
    return dialect


def use_backend(bind: AnyBind, name: Literal["native", "portable", "auto"]) -> None:
    """Fix the backend for everything that uses ``bind``'s engine; ``"auto"`` detects again."""
    dialect = _dialect_of(bind)
    with _lock:
        if name == "auto":
            vars(dialect).pop(_CHOSEN, None)
        else:
            vars(dialect)[_CHOSEN] = validate_backend_name(name)


def backend_for_dialect(dialect: Dialect) -> BackendName | None:
    """The backend chosen for this dialect, or None when nothing has been detected yet."""
    chosen: BackendName | None = vars(dialect).get(_CHOSEN)
    return chosen


def has_queue_engine(connection: Connection) -> bool:
    """True when the server has the Q4M storage engine (``ENGINE=QUEUE``) enabled."""
    support = connection.execute(
        text("SELECT SUPPORT FROM information_schema.ENGINES WHERE ENGINE = 'QUEUE'")
    ).scalar()
    return str(support or "").upper() in ("YES", "DEFAULT")


#: Key in a dialect's ``__dict__``: the backends :func:`check_server` has accepted for it (a
#: dialect's server does not change: every queue session checks it without a call).
_CHECKED = "_q4m_server_checked"


def check_server(dialect: Dialect, backend: BackendName) -> None:
    """Raise :class:`UnsupportedServer` when ``backend`` cannot run on this dialect's server."""
    checked = vars(dialect).get(_CHECKED)
    if checked is not None and backend in checked:
        return
    _check_server(dialect, backend)
    if dialect.server_version_info:  # known: the answer holds for the dialect's life
        vars(dialect)[_CHECKED] = frozenset({backend, *(checked or ())})


def _check_server(dialect: Dialect, backend: BackendName) -> None:
    if dialect.name not in ("mysql", "mariadb"):
        raise UnsupportedServer(
            f"sqlalchemy-q4m needs MySQL or MariaDB, not the {dialect.name!r} dialect"
        )
    if backend != "portable":
        return
    version = tuple(dialect.server_version_info or ())
    if not version:
        return
    is_mariadb = bool(getattr(dialect, "is_mariadb", False))
    minimum = MIN_MARIADB if is_mariadb else MIN_MYSQL
    if version < minimum:
        product = "MariaDB" if is_mariadb else "MySQL"
        raise UnsupportedServer(
            f"the portable backend needs SELECT ... FOR UPDATE SKIP LOCKED: "
            f"{product} {'.'.join(map(str, minimum))} or newer, this server is "
            f"{'.'.join(map(str, version))}; install Q4M or upgrade the server"
        )


def detect_backend(connection: Connection) -> BackendName:
    """The backend for ``connection``'s engine: the one fixed by :func:`use_backend`, else
    ``native`` when the server has the QUEUE engine and ``portable`` otherwise (remembered)."""
    dialect = connection.dialect
    chosen = backend_for_dialect(dialect)
    if chosen is None:
        began = not connection.in_transaction()
        try:
            detected: BackendName = "native" if has_queue_engine(connection) else "portable"
        finally:
            if began:
                connection.rollback()
        with _lock:
            chosen = vars(dialect).setdefault(_CHOSEN, detected)
    check_server(dialect, chosen)
    return chosen
