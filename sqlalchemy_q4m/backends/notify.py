"""The producer's side of listen/notify: after its commit, a producer wakes the consumers
waiting on its queues (``KILL QUERY ID`` of their tagged waits), and skips the scan while no
process listens.  The protocol is told in :mod:`sqlalchemy_q4m.backends.wakeup`."""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection
from sqlalchemy import Engine
from sqlalchemy import column
from sqlalchemy import or_
from sqlalchemy import select
from sqlalchemy import table
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from ..exc import Q4MError
from ..schema.functions import Subscription
from ..schema.functions import subscriptions
from .base import error_code
from .listeners import listeners_present
from .listeners import listening_supported
from .listeners import nobody_listens
from .wakeup import like_pattern

__all__ = ["notify", "notify_committed", "wake_committed"]

logger = logging.getLogger("sqlalchemy_q4m.notify")

#: ``KILL QUERY ID`` of a query that already ended.
UNKNOWN_QUERY_ID = 1957
#: Not allowed to kill another user's query (no CONNECTION ADMIN / SUPER): wakes do nothing.
NOT_OWNER = (1095, 1979)
_PROCESSLIST = table(
    "PROCESSLIST",
    column("QUERY_ID"),
    column("COMMAND"),
    column("INFO"),
    schema="information_schema",
)


# -- the producer side ---------------------------------------------------------------------


def notify(bind: Engine | Connection | Session, *targets: Any, jobs: int = 1) -> int:
    """Wake consumers waiting (``listen``) on the queues of ``targets``; call it AFTER the
    transaction that enqueued ``jobs`` jobs committed (a wake before the commit is lost).

    Wakes ``jobs + 1`` waiters at most (one spare: a woken consumer may lose the race for the
    job to a busy one) and returns how many it woke; 0 without waiters, or on a server other
    than MariaDB.  An Engine or a Session runs it on a connection of its own from the
    engine; a Connection runs it on itself, which must not be in a transaction (its
    uncommitted jobs would be invisible to the woken consumers): commit first.
    """
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise Q4MError(f"jobs must be a positive integer, not {jobs!r}")
    subs = subscriptions(targets)
    if isinstance(bind, Session):
        if bind.in_transaction():
            raise Q4MError("notify() after the commit: the Session is still in a transaction")
        engine = bind.get_bind(mapper=subs[0].target if subs[0].is_orm else None)
        bind = engine if isinstance(engine, Engine) else engine.engine
    if isinstance(bind, Engine):
        with bind.connect() as conn:  # connected: the dialect knows MariaDB from MySQL
            if not listening_supported(conn.dialect):
                return 0
            return _wake(conn, subs, jobs + 1)
    if not isinstance(bind, Connection):
        raise Q4MError(f"bind must be an Engine, a Connection or a Session, not {bind!r}")
    if bind.in_transaction():
        raise Q4MError("notify() after the commit: the Connection is still in a transaction")
    if not listening_supported(bind.dialect):
        return 0
    try:
        return _wake(bind, subs, jobs + 1)
    finally:
        if bind.in_transaction():
            bind.rollback()


def notify_committed(bind: Engine | Connection | Session, *targets: Any, jobs: int = 1) -> int:
    """:func:`notify` for a producer whose jobs are committed already, without its
    ``PROCESSLIST`` scan when no process listens (:func:`wake_committed`); a database error
    while waking is logged, not raised (raising would look like a failed enqueue, and retrying
    it would enqueue the jobs twice); listening consumers then take them within ``listen``."""
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise Q4MError(f"jobs must be a positive integer, not {jobs!r}")
    subs = subscriptions(targets)
    try:
        if isinstance(bind, Connection):
            if bind.in_transaction():
                raise Q4MError(
                    "notify() after the commit: the Connection is still in a transaction"
                )
            return wake_committed(bind, subs, jobs)
        if isinstance(bind, Session):
            if bind.in_transaction():
                raise Q4MError("notify() after the commit: the Session is still in a transaction")
            got = bind.get_bind(mapper=subs[0].target if subs[0].is_orm else None)
            bind = got if isinstance(got, Engine) else got.engine
        if not isinstance(bind, Engine):
            raise Q4MError(f"bind must be an Engine, a Connection or a Session, not {bind!r}")
        if nobody_listens(bind.dialect, subs):
            return 0
        with bind.connect() as conn:
            return wake_committed(conn, subs, jobs)
    except DBAPIError as err:
        logger.warning(
            "notify: %d committed job(s) wait for the consumers' listen timeout: waking "
            "them failed: %s",
            jobs,
            err,
        )
        return 0


def wake_committed(conn: Connection, subs: Sequence[Subscription], jobs: int) -> int:
    """Wake waiters on ``subs`` for ``jobs`` jobs committed on ``conn`` (out of a transaction);
    how many were woken.  Sends nothing when no process listens: whether one does is asked
    of the server (one ``IS_USED_LOCK`` statement, see
    :class:`~sqlalchemy_q4m.backends.listeners.Anchor`) at most every
    :data:`~sqlalchemy_q4m.backends.listeners.LISTENERS_RECHECK` seconds per engine; when
    one does, it is :func:`notify`'s scan.
    ``conn`` is left out of a transaction (rolled back when anything was sent, the look-up
    included: a caller's next statement must not find it in a transaction and take it for
    its own, which would leave the caller's next jobs uncommitted)."""
    if not listening_supported(conn.dialect):
        return 0
    try:
        if not listeners_present(conn, subs):
            return 0
        return _wake(conn, subs, jobs + 1)
    finally:
        if conn.in_transaction():
            conn.rollback()


def _wake(conn: Connection, subs: Sequence[Subscription], wanted: int) -> int:
    info = _PROCESSLIST.c.INFO
    patterns = [info.like(like_pattern(sub, conn.dialect), escape="!") for sub in subs]
    find = select(_PROCESSLIST.c.QUERY_ID).where(_PROCESSLIST.c.COMMAND == "Query", or_(*patterns))
    ids = [int(qid) for qid in conn.execute(find).scalars()]
    random.shuffle(ids)
    woken = 0
    for qid in ids:
        if woken >= wanted:
            break
        try:
            conn.execute(text(f"KILL QUERY ID {int(qid)}"))
        except OperationalError as err:
            code = error_code(err)
            if code == UNKNOWN_QUERY_ID:  # it ended meanwhile: the next one
                continue
            if code in NOT_OWNER:
                logger.debug("notify: no privilege to wake other users' consumers: %s", err)
                break
            raise
        woken += 1
    return woken
