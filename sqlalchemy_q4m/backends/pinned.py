"""Consumer connections kept ready per engine, for ``bind=engine``.

A queue session bound to an :class:`~sqlalchemy.Engine` used to check a connection out of the
pool for every job: on the portable backend SQLAlchemy then set the session's isolation to READ
COMMITTED and back (``SET SESSION ...`` + ``COMMIT`` each way) and the pool rolled the
connection back on its return, six statements per job on top of the claim, the ``DELETE`` and
the ``COMMIT``; on Q4M the return cost a ``ROLLBACK``.  Instead, a connection a queue session
is done with (cleanly: not owning anything, no transaction open) is kept here, checked out and
already in the consumer's mode (READ COMMITTED, or on Q4M the driver's autocommit), and the
next queue session of the same engine takes it.  The user's own ``engine.connect()`` never
gets one of them, so their isolation level and transactions are untouched.

What stays bounded: at most as many connections are kept as the pool's ``size()`` (4 for a pool
without one), and only while the pool could still hand the caller's ``engine.connect()`` a
connection at once (one idle in it, or room to open one): a kept connection never makes the
caller wait for the pool.  One left unused for :data:`IDLE` seconds goes back to the pool (a
timer thread per engine returns it, while any are kept; the next take would too), which then
applies its ``pre_ping`` and ``recycle`` to a fresh checkout, as do all of them on
``engine.dispose()``.  Only a plain engine keeps connections: an
``engine.execution_options(...)`` copy (often made per call) checks out per job as before.  A
forked child never touches its parent's connections (their sockets are the parent's).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import weakref

from sqlalchemy import Connection
from sqlalchemy import Engine
from sqlalchemy import event
from sqlalchemy.pool import Pool

from ..server import BackendName
from .base import autocommit_for_queue
from .driver import dialect_cache
from .portable import READ_COMMITTED_LEVELS

__all__ = ["IDLE", "give_back", "keeps", "kept_connections", "prepare", "take"]

#: Seconds a kept connection may stay unused before it goes back to the pool.
IDLE = 1.0

_lock = threading.Lock()

#: This process's id, kept here: ``os.getpid()`` is a system call, and each job looks it up
#: twice (its take and its give-back).
_pid = os.getpid()


def _after_fork() -> None:
    global _lock, _pid
    _lock = threading.Lock()  # a lock held by another thread at fork time stays held
    _pid = os.getpid()


os.register_at_fork(after_in_child=_after_fork)


class _Kept:
    """The connections kept for one engine in one process."""

    __slots__ = ("__weakref__", "conns", "generation", "pid", "pool", "timer")

    def __init__(self, pool: Pool) -> None:
        self.conns: list[tuple[Connection, float]] = []
        self.generation = 0  # bumped by dispose(): connections taken before go to the pool
        self.pid = _pid
        self.pool = pool  # the engine's pool the connections came from
        self.timer: threading.Timer | None = None  # returns idle ones; set while any are kept


def _kept(engine: Engine) -> _Kept | None:
    """The kept connections of a plain ``engine`` in this process (None for a copy)."""
    if not keeps(engine):
        return None  # engine.execution_options(...): not kept (see the module docstring)
    per_pid = dialect_cache(engine.dialect, "pinned")
    pid = _pid
    kept: _Kept | None = per_pid.get(pid)
    if kept is None:
        with _lock:
            kept = per_pid.get(pid)
            if kept is None:
                kept = per_pid[pid] = _Kept(engine.pool)
                if not per_pid.get("hooked"):
                    per_pid["hooked"] = True
                    event.listen(engine, "engine_disposed", _disposed)
    return kept


def keeps(engine: Engine) -> bool:
    """Whether ``engine`` keeps consumer connections (a plain engine, not a copy)."""
    return not isinstance(getattr(engine, "_proxied", None), Engine)


def _disposed(engine: Engine) -> None:
    """``engine.dispose()``: this process's kept connections go back to the pool."""
    kept = dialect_cache(engine.dialect, "pinned").get(_pid)
    if kept is None:
        return
    with _lock:
        conns, kept.conns = kept.conns, []
        kept.generation += 1
        if kept.timer is not None:
            kept.timer.cancel()  # nothing left to return: its thread ends now
            kept.timer = None
        old, kept.pool = kept.pool, engine.pool  # dispose() has made a new pool already
    for conn, _since in conns:
        _close(conn)  # checked in to the pool they came from (its events see them) ...
    if old is not engine.pool:
        old.dispose()  # ... which closes them, as dispose() closed the others


def _close(conn: Connection) -> None:
    """Back to the pool (out of autocommit, its isolation reset by SQLAlchemy)."""
    with contextlib.suppress(Exception):  # a dead connection: the pool discards it
        conn.close()


def take(engine: Engine) -> tuple[Connection | None, int | None]:
    """A kept connection of ``engine`` (None: check one out and :func:`prepare` it) and the
    generation to give it back to (None: ``engine`` keeps none; close it)."""
    kept = _kept(engine)
    if kept is None:
        return None, None
    now = time.monotonic()
    stale: list[Connection] = []
    found: Connection | None = None
    with _lock:
        generation = kept.generation
        while kept.conns and found is None:
            conn, since = kept.conns.pop()  # the most recently used first
            if conn.closed or conn.invalidated or now - since > IDLE:
                stale.append(conn)
            else:
                found = conn
    for conn in stale:
        _close(conn)
    return found, generation


def prepare(conn: Connection, backend: BackendName) -> bool:
    """Put a fresh checkout in the consumer's mode; True when it can be kept afterwards
    (always, now)."""
    if backend == "portable":
        level = conn.get_execution_options().get("isolation_level")
        if level not in READ_COMMITTED_LEVELS:
            conn.execution_options(isolation_level="READ COMMITTED")  # reset by SQLAlchemy
        return True
    autocommit_for_queue(conn)  # else a transaction per job, as on a Connection bind
    return True


def give_back(engine: Engine, conn: Connection, generation: int) -> None:
    """Keep ``conn`` (idle, owning nothing, no transaction open) for the next queue session,
    or return it to the pool when enough are kept or the engine was disposed meanwhile."""
    kept = _kept(engine)
    if kept is None or conn.closed or conn.invalidated or conn.in_transaction():
        _close(conn)
        return
    pool = engine.pool
    size = getattr(pool, "size", None)
    limit = size() if callable(size) else 4
    with _lock:
        if generation == kept.generation and len(kept.conns) < max(1, limit) and _headroom(pool):
            kept.conns.append((conn, time.monotonic()))
            if kept.timer is None:
                kept.timer = _sweep_after(kept, IDLE)
            return
    _close(conn)


def _headroom(pool: Pool) -> bool:
    """Whether ``pool`` could give a connection at once besides the ones checked out (kept
    ones included): one is idle in it, or it may open another.  A pool that does not say
    (no ``checkedin()``: NullPool and the like) never makes anybody wait."""
    checkedin = getattr(pool, "checkedin", None)
    if not callable(checkedin) or checkedin() > 0:
        return True
    max_overflow = getattr(pool, "_max_overflow", -1)  # QueuePool's; -1: no limit
    overflow = getattr(pool, "overflow", None)
    if not isinstance(max_overflow, int) or max_overflow < 0 or not callable(overflow):
        return True
    return bool(overflow() < max_overflow)


def _sweep_after(kept: _Kept, delay: float) -> threading.Timer:
    """A daemon timer that returns ``kept``'s connections unused for :data:`IDLE` seconds to
    the pool, and starts the next one while any are kept (call with ``_lock`` held)."""
    timer = threading.Timer(delay, _sweep, (weakref.ref(kept),))  # keeps no engine alive
    timer.daemon = True
    timer.name = "sqlalchemy-q4m-kept-connections"
    timer.start()
    return timer


def _sweep(ref: weakref.ref[_Kept]) -> None:
    kept = ref()
    if kept is None or kept.pid != _pid:  # its engine is gone (or, never, a fork)
        return
    now = time.monotonic()
    with _lock:
        stale = [conn for conn, since in kept.conns if now - since >= IDLE]
        kept.conns = [(conn, since) for conn, since in kept.conns if now - since < IDLE]
        if kept.conns:
            oldest = min(since for _conn, since in kept.conns)
            kept.timer = _sweep_after(kept, max(0.05, IDLE - (now - oldest)))
        else:
            kept.timer = None
    for conn in stale:
        _close(conn)  # not in use: only the kept list held it


def kept_connections(engine: Engine) -> list[Connection]:
    """The connections kept for ``engine`` in this process (for tests and diagnostics)."""
    kept = _kept(engine)
    return [] if kept is None else [conn for conn, _since in kept.conns]
