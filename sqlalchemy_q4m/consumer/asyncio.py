"""``async with queue_session(...)``: the queue session on SQLAlchemy's asyncio extension.

::

    engine = create_async_engine("mysql+asyncmy://root@127.0.0.1/test")
    async with queue_session(ShellJob, bind=engine, timeout=5) as job:
        if job is not None:
            await run(job.command)   # normal exit -> end; exception -> abort, re-raised;
                                     # QueueAbort -> abort, swallowed

The semantics are exactly those of :class:`~sqlalchemy_q4m.consumer.session.QueueSession` (the
top-level :func:`~sqlalchemy_q4m.queue_session` returns an :class:`AsyncQueueSession` when
``bind`` is an :class:`~sqlalchemy.ext.asyncio.AsyncEngine`,
:class:`~sqlalchemy.ext.asyncio.AsyncConnection` or
:class:`~sqlalchemy.ext.asyncio.AsyncSession`).  The sync queue session and the same backends
do the work through SQLAlchemy's greenlet bridge (what ``run_sync`` uses), crossing it once per
half of the block: pinning, claiming and loading the job on entry (up to the next pause), ending
or aborting it and releasing the connection on exit, each time in a greenlet kept from an
earlier crossing (:func:`~sqlalchemy_q4m.consumer.crossing.cross`); and both run the same
:class:`~sqlalchemy_q4m.consumer.lifecycle.Lifecycle`: this module only performs its steps
with awaits, so it polls on the same fixed schedule, sleeping with
:func:`asyncio.sleep` and never blocking the event loop (with ``listen`` it awaits the wait in
the server instead, like any query).  Q4M's ``queue_wait`` blocks in the server, which an async
driver awaits like any other query.

Cancellation: a task cancelled while it waits has its connection invalidated (closed), so a
row it may have just been given goes back to the queue; a task cancelled inside the block
aborts the job (``queue_abort()`` / ``ROLLBACK``) before the cancellation goes on.  Ending,
aborting and releasing run to completion even when cancelled meanwhile, and a connection is
never handed back to the pool while it may still own a row.  On Q4M the server does not end
a ``queue_wait`` whose client is gone (``KILL QUERY`` and ``KILL`` do not either): that
server thread waits on until its timeout (at most 60 s a call) or until a row arrives, which
it then owns, fails to send and returns to the queue as its connection closes
(``restored_by_close`` in ``queue_stats``), so the next waiter gets it a moment later.  The
event loop runs other tasks throughout a wait (tested with a ticker task on both drivers,
``tests/test_asyncio_native_q4m.py``).

Connections: on the native backend every waiting or owning task holds one connection for the
whole wait and job, so N concurrent consumers need a pool of at least N connections
(``pool_size=N``), plus whatever producers use, plus one briefly the first time the backend is
detected.  The portable backend holds one per task too, while claiming and while the job runs.

Drivers: ``mysql+asyncmy://`` and ``mysql+aiomysql://`` (``pip install
'sqlalchemy-q4m[asyncmy]'`` or ``[aiomysql]``).  aiomysql 0.3 cannot send bytes parameters
(every job id) with PyMySQL 1.2, so its extra pins ``PyMySQL<1.2``
(https://github.com/aio-libs/aiomysql/issues/1080).
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any
from typing import Generic
from typing import Literal
from typing import TypeVar

from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from ..backends import Backend
from ..exc import Q4MError
from .binding import bound_factory
from .crossing import cross
from .lifecycle import POLL_INTERVAL
from .lifecycle import Action
from .lifecycle import Step
from .lifecycle import Where
from .session import QueueSession

#: The public asyncio API (re-exported by :mod:`sqlalchemy_q4m.asyncio`); the worker also uses
#: :class:`GreenletQueueSession` and :func:`run_to_completion` from here.
__all__ = ["AsyncBind", "AsyncQueueSession", "async_queue_session", "async_queue_sessionmaker"]

T = TypeVar("T")
R = TypeVar("R")
AsyncBind = AsyncEngine | AsyncConnection | AsyncSession


async def run_to_completion(step: Callable[..., R], *args: Any) -> R:
    """Run ``step(*args)`` through SQLAlchemy's greenlet bridge (:func:`.crossing.cross`) in a
    task of its own that a cancellation of the caller cannot cut short; a cancellation
    received meanwhile is re-raised once it has finished (cleanup that stops halfway could hand
    a connection that still owns a row back to the pool).

    The task hands its outcome to the caller's own future itself, so the caller wakes in the
    loop iteration after the step ends (``asyncio.shield`` would take one more); a cancelled
    caller's future is cancelled, and the caller then waits for the task in a shield."""
    done: asyncio.Future[R] = asyncio.get_running_loop().create_future()
    task = asyncio.ensure_future(_step_task(done, step, args))
    try:
        return await done
    except asyncio.CancelledError:
        if task.done():  # the step ended (or the task was cancelled): nothing to wait for
            if done.done() and not done.cancelled():
                done.exception()  # seen: no "exception was never retrieved" at collection
            raise
        cancelled = sys.exc_info()[1]
    while True:
        try:
            result = await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.done():
                raise
        else:
            break
    assert cancelled is not None
    if result.error is not None:
        raise result.error
    raise cancelled


class _Outcome(Generic[R]):
    """What a step's task ended with: its value, or the error it raised."""

    __slots__ = ("error", "value")

    def __init__(self, value: R | None, error: BaseException | None) -> None:
        self.value, self.error = value, error


async def _step_task(
    done: asyncio.Future[R], step: Callable[..., R], args: tuple[Any, ...]
) -> _Outcome[R]:
    """The task of :func:`run_to_completion`: the step's outcome set on ``done`` (unless the
    caller was cancelled meanwhile) and returned (never raised: nobody may look)."""
    try:
        value = await cross(step, *args)
    except asyncio.CancelledError as err:  # the task itself was cancelled (loop shutdown)
        if not done.done():
            done.cancel()
        return _Outcome(None, err)
    except BaseException as err:
        if not done.done():
            done.set_exception(err)
        return _Outcome(None, err)
    if not done.done():
        done.set_result(value)
    return _Outcome(value, None)


class GreenletQueueSession(QueueSession[Any]):
    """The sync queue session an :class:`AsyncQueueSession` drives step by step, on the sync
    side of an async bind; its ORM session is the sync half of an :class:`AsyncSession`."""

    def __init__(self, *targets: Any, async_bind: AsyncBind, **options: Any) -> None:
        self.async_bind = async_bind
        self.async_session: AsyncSession | None = None
        super().__init__(*targets, bind=_sync_bind(async_bind), **options)

    def _new_orm_session(self, conn: Connection) -> Session:
        bind = self.async_bind
        aconn: AsyncConnection
        if isinstance(bind, AsyncConnection) and bind.sync_connection is conn:
            aconn = bind
        else:
            engine = bind if isinstance(bind, AsyncEngine) else AsyncEngine(conn.engine)
            aconn = AsyncConnection(engine, conn)
        options = {**self._orm_options(), "bind": aconn}
        self.async_session = AsyncSession(**options)
        return self.async_session.sync_session

    # -- the claim, one crossing of the greenlet bridge ---------------------------------------

    def first_steps(self) -> Action:
        """Pin the connection, then claim until the lifecycle asks for something else (a job
        owned, a pause, a listen, giving up): the usual wait crosses the bridge once."""
        return self.claims(self._start(self._setup()))

    def claims(self, action: Action) -> Action:
        """Perform the lifecycle's CLAIM steps from ``action`` on; the first other step."""
        backend = self.backend
        assert backend is not None
        while action.step is Step.CLAIM:
            action = self._attempt(backend, action.seconds)
        return action

    def listen_then_claim(self, seconds: float) -> Action:
        """One listen in the server, then the claims the lifecycle asks for after it."""
        self._listen(seconds)
        return self.claims(self.life.paused(time.monotonic()))

    def release_idle(self) -> None:
        """Cancelled between two claims: nothing is owned and the connection is idle, so it
        is rolled back and handed back rather than invalidated."""
        self._finish_transaction(commit=False)
        self._release()

    def release_broken(self) -> None:
        """After a failed or cancelled wait: invalidate the connection (so a row it may own
        goes back to the queue) and release everything, unless that is done already."""
        if not self.life.state.finished:
            self._release(broken=True)


def _first_steps(sync: GreenletQueueSession, then: Callable[[], None] | None) -> Action:
    """:meth:`GreenletQueueSession.first_steps`, then ``then()`` if a job is owned."""
    action = sync.first_steps()
    if then is not None and action.step is Step.OWN:
        then()
    return action


def _outcome(then: Callable[[Any], R], job: Any) -> Callable[[], R]:
    """``then(job)`` now; what it returned, or raised, when the result is called."""
    try:
        result = then(job)
    except BaseException as err:
        error = err

        def failed() -> R:
            raise error

        return failed
    return lambda: result


def _sync_bind(bind: Any) -> Any:
    if isinstance(bind, AsyncEngine):
        return bind.sync_engine
    if isinstance(bind, AsyncConnection):
        if bind.sync_connection is None:
            raise Q4MError("the AsyncConnection is not started: await engine.connect() first")
        return bind.sync_connection
    if isinstance(bind, AsyncSession):
        return bind.sync_session
    raise Q4MError(
        "bind must be an AsyncEngine, an AsyncConnection or an AsyncSession (or, for the sync "
        f"queue_session, an Engine, a Connection or a Session), not {bind!r}"
    )


class AsyncQueueSession(Generic[T]):
    """One job's lifetime on one pinned connection, awaited; see the module docstring.

    Use it with ``async with`` (which gives the job or None), or await :meth:`wait`, then
    :meth:`end` or :meth:`abort`, then :meth:`close`.
    """

    #: The sync queue session it drives (the asyncio queue consumer's renews itself per job).
    _sync_class: type[GreenletQueueSession] = GreenletQueueSession

    def __init__(
        self,
        *targets: Any,
        bind: AsyncBind,
        where: Where = None,
        timeout: float | None = 60.0,
        backend: Literal["native", "portable", "auto"] | None = None,
        poll_interval: float = POLL_INTERVAL,
        listen: float | None = None,
    ) -> None:
        self.bind = bind
        self._sync = self._sync_class(
            *targets,
            async_bind=bind,
            where=where,
            timeout=timeout,
            backend=backend,
            poll_interval=poll_interval,
            listen=listen,
        )
        self.subscriptions = self._sync.subscriptions
        self.timeout = timeout
        self.poll_interval = poll_interval
        #: As the sync session's: the wait in the server is awaited like any query.
        self.listen = listen

    # -- public API -------------------------------------------------------------------------

    @property
    def sync_session(self) -> GreenletQueueSession:
        """The sync queue session this one drives (as ``AsyncSession.sync_session``): its
        job, its settings (``accept_unloadable``) and its ORM session, for code that runs in
        the greenlet (``run_sync``, the asyncio worker's steps)."""
        return self._sync

    @property
    def job(self) -> T | None:
        """The owned job (a mapped instance or a Row), or None."""
        job: T | None = self._sync.job
        return job

    @property
    def subscription(self) -> Any:
        """The :class:`~sqlalchemy_q4m.schema.functions.Subscription` the job came from."""
        return self._sync.subscription

    @property
    def backend(self) -> Backend | None:
        """The backend in use, once :meth:`wait` has started."""
        return self._sync.backend

    @property
    def owning(self) -> bool:
        """True while this session owns a job."""
        return self._sync.owning

    @property
    def session(self) -> AsyncSession:
        """The :class:`AsyncSession` the job was loaded in (on the portable backend, writes
        made through it commit atomically with the job's removal)."""
        orm = self._sync.session
        if isinstance(self.bind, AsyncSession) and orm is self.bind.sync_session:
            return self.bind
        assert self._sync.async_session is not None
        return self._sync.async_session

    async def connection(self) -> AsyncConnection:
        """The pinned connection that owns the job."""
        return await self.session.connection()

    async def wait(self) -> T | None:
        """Wait up to ``timeout`` seconds for a job; return it (owned), or None on timeout.

        The awaiting driver of :class:`~sqlalchemy_q4m.consumer.lifecycle.Lifecycle`: the
        same steps as :meth:`QueueSession.wait`, their database calls in the greenlet (the
        pinning and the claims up to the next pause in one crossing of the bridge), each
        pause an :func:`asyncio.sleep`."""
        return await self._wait(None)

    async def wait_then(self, then: Callable[[T], R]) -> Callable[[], R] | None:
        """As :meth:`wait`, and once a job is owned, ``then(job)`` on the sync side in the same
        crossing of the greenlet bridge as the claim (the asyncio worker prepares the job
        there).  None when no job came in time; else a function that returns what ``then``
        returned, or raises what it raised (call it where the caller handles the errors of a
        job in hand: the job is owned either way).  ``then`` runs without the protection of
        :func:`run_to_completion`: it should send no statement."""
        box: list[Callable[[], R]] = []
        job = await self._wait(lambda: box.append(_outcome(then, self._sync.job)))
        if job is None:
            return None
        if not box:  # owned by a later step than the first crossing's
            box.append(await cross(_outcome, then, job))
        return box[0]

    async def _wait(self, then: Callable[[], None] | None) -> T | None:
        sync = self._sync
        life = sync.life
        life.check_idle()
        try:
            action = await cross(_first_steps, sync, then)
            while True:
                step = action.step
                if step is Step.OWN:
                    return self.job
                if step is Step.GIVE_UP:
                    break
                if step is Step.LISTEN:  # in the server
                    action = await cross(sync.listen_then_claim, action.seconds)
                else:
                    await self._pause(action.seconds)
                    action = life.paused(time.monotonic())
                    if action.step is Step.CLAIM:
                        action = await cross(sync.claims, action)
        except BaseException:
            # interrupted inside a database call: the connection's state is unknown
            await run_to_completion(sync.release_broken)
            raise
        await run_to_completion(sync._give_up)
        return None

    async def _pause(self, seconds: float) -> None:
        """Sleep between two portable claims; cancelled here, the connection owns nothing and
        is idle, so it is rolled back and returned to the pool rather than invalidated."""
        try:
            await asyncio.sleep(seconds)
        except BaseException:
            await run_to_completion(self._sync.release_idle)
            raise

    async def end(self) -> None:
        """Finish the job: it is removed from the queue (``queue_end()`` / DELETE + COMMIT)."""
        await run_to_completion(self._sync.end)

    async def abort(self) -> None:
        """Give the job back: it returns to the queue for the next consumer."""
        await run_to_completion(self._sync.abort)

    async def close(self) -> None:
        """Abort a job still owned and release the connection; safe to call twice."""
        await run_to_completion(self._sync.close)

    async def __aenter__(self) -> T | None:
        return await self._wait(None)  # wait(), one coroutine frame less on every resume

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        sync = self._sync
        return await run_to_completion(sync.__exit__, exc_type, exc, tb)


def async_queue_session(
    *targets: Any,
    bind: AsyncBind,
    where: Where = None,
    timeout: float | None = 60.0,
    backend: Literal["native", "portable", "auto"] | None = None,
    poll_interval: float = POLL_INTERVAL,
    listen: float | None = None,
) -> AsyncQueueSession[Any]:
    """Wait for a job of one of ``targets`` (earlier ones win) on a pinned async connection.

    Returns an :class:`AsyncQueueSession`; ``async with`` it to get the job (a mapped
    instance, or a Row for a Core table) or None when ``timeout`` seconds pass.  The
    top-level :func:`~sqlalchemy_q4m.queue_session` calls this for an async ``bind``.
    """
    return AsyncQueueSession(
        *targets,
        bind=bind,
        where=where,
        timeout=timeout,
        backend=backend,
        poll_interval=poll_interval,
        listen=listen,
    )


def async_queue_sessionmaker(
    bind: AsyncBind,
    *,
    timeout: float | None = 60.0,
    backend: Literal["native", "portable", "auto"] | None = None,
    poll_interval: float = POLL_INTERVAL,
    listen: float | None = None,
) -> Callable[..., AsyncQueueSession[Any]]:
    """A factory with ``bind`` and defaults fixed: ``QueueSession =
    async_queue_sessionmaker(async_engine)`` then ``async with QueueSession(ShellJob) as job:``."""
    _sync_bind(bind)  # a bad bind fails here, not at the first job
    return bound_factory(
        AsyncQueueSession,
        bind,
        timeout=timeout,
        backend=backend,
        poll_interval=poll_interval,
        listen=listen,
    )
