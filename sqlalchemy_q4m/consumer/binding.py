"""The connection a queue session owns its job on: chosen from the ``bind``, put in the
consumer's mode, given an ORM session, and handed back.

:class:`Pin` is the half of :class:`~sqlalchemy_q4m.consumer.session.QueueSession` that knows
about binds (see that module's docstring for what each kind of bind means); the other half
runs the job's life (:mod:`~sqlalchemy_q4m.consumer.lifecycle`) on the connection pinned here.
"""

from __future__ import annotations

from abc import ABC
from abc import abstractmethod
from collections.abc import Callable
from typing import Any
from typing import Literal
from typing import TypeVar

from sqlalchemy import Connection
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from ..backends import Backend
from ..backends import get_backend
from ..backends import pinned as keeping
from ..backends.base import autocommit_for_queue
from ..backends.base import check_free
from ..backends.base import check_info_free
from ..backends.base import give_up_connection
from ..backends.base import raise_if_lost
from ..backends.base import record_owner
from ..backends.base import translate_errors
from ..backends.driver import driver_commit
from ..backends.driver import driver_level
from ..backends.driver import driver_rollback
from ..backends.driver import on_driver
from ..backends.driver import quiet_transactions
from ..exc import NotOwner
from ..exc import Q4MError
from ..schema.functions import Subscription
from ..server import BackendName
from ..server import backend_for_dialect
from ..server import check_server
from ..server import detect_backend
from ..server import validate_backend_name

__all__ = [
    "SYNC_BINDS",
    "BackendChoice",
    "Bind",
    "Pin",
    "backend_choice",
    "bound_factory",
    "check_bind",
    "resolve_backend",
]

Bind = Engine | Connection | Session
BackendChoice = Literal["native", "portable", "auto"] | None
S = TypeVar("S")


def bound_factory(make: Callable[..., S], bind: Any, **defaults: Any) -> Callable[..., S]:
    """``make(*targets, bind=bind, **options)`` with ``defaults`` under the options given: what
    both sessionmakers (sync and asyncio) return."""

    def factory(*targets: Any, **kw: Any) -> S:
        return make(*targets, bind=bind, **{**defaults, **kw})

    return factory


#: The blocking binds (a tuple: ``isinstance`` with a ``|`` union builds the union per call).
SYNC_BINDS = (Engine, Connection, Session)


def check_bind(bind: object) -> None:
    """Refuse a ``bind`` that is not an Engine, a Connection or a Session."""
    if not isinstance(bind, SYNC_BINDS):
        raise Q4MError(f"bind must be an Engine, a Connection or a Session, not {bind!r}")


def backend_choice(backend: BackendChoice) -> BackendName | None:
    """The backend asked for (None: detect it); an unknown name is refused at once."""
    return None if backend in (None, "auto") else validate_backend_name(str(backend))


def resolve_backend(
    probe: Engine | Connection, name: BackendName | None, *, remembered: bool = True
) -> BackendName:
    """The backend to use on ``probe``: ``name`` (checked against the server), else the one
    detected (on an Engine, with ``remembered``, one detected before for its dialect, else by
    a probe connection)."""
    if name is not None:
        check_server(probe.dialect, name)
        return name
    if isinstance(probe, Connection):
        return detect_backend(probe)
    known = backend_for_dialect(probe.dialect) if remembered else None
    if known is not None:  # detected before: no probe connection
        check_server(probe.dialect, known)
        return known
    with probe.connect() as conn:
        return detect_backend(conn)


class Pin(ABC):
    """Which connection owns the job and in which transaction; see the module docstring.

    The base of the queue session: one object, so that the backends and the connection's
    owner record see one holder, written in two modules by concern.  Long because it is the
    one place that decides, for every bind, which connection owns the job and which
    transaction holds it (the caller's, one it begins on SQLAlchemy's Connection or on the
    driver, a kept connection's), and those decisions read each other's state."""

    # The state of one queue session's pinning, as class-level defaults: a queue session is
    # made per job, and each attribute set in ``__init__`` would cost it a store.
    backend: Backend | None = None
    _conn: Connection | None = None  # checked out by us: closed (or kept) by us
    _keep: int | None = None  # kept for the engine's next queue session (generation)
    _pinned: Connection | None = None  # runs queue_wait/queue_end (ours or the caller's)
    _orm: Session | None = None  # made on first use, or the caller's
    _own_orm = False
    _user_session: Session | None = None  # committed before queue_end (native)
    _began = False
    _read_committed = False  # SET TRANSACTION before each transaction we begin
    _owner_info: dict[Any, Any] | None = None  # the pinned connection's info
    #: Nothing observes statements on the pinned connection (``driver_level``): asked once
    #: per job, when it is pinned.
    unobserved: bool | None = None
    #: A transaction this queue session begins is begun and ended on the driver, unseen by
    #: SQLAlchemy's Connection (see :func:`~sqlalchemy_q4m.backends.driver._begun`): the
    #: portable backend, statements unobserved, no transaction listener but the library's.
    driver_begins = False
    #: Such a transaction is open (set by the first statement that begins it).
    driver_transaction = False
    #: A Connection bind nobody else uses (the worker's own): its transactions may be begun
    #: on the driver, as those of a connection pinned from an Engine.  Not a caller's
    #: Connection, whose ``commit()`` SQLAlchemy must see (the ownership watch).
    private_connection = False

    def __init__(self, bind: Bind, backend: BackendChoice, subs: tuple[Subscription, ...]) -> None:
        self.subscriptions = subs
        self.bind = bind
        self._backend_name = backend_choice(backend)

    @property
    def connection(self) -> Connection:
        """The pinned connection that owns the job.  A transaction begun on the driver is
        handed to SQLAlchemy here (``begin()``: no statement), so that what the caller does
        with the connection, a ``commit()`` included, is SQLAlchemy's and watched."""
        pinned = self._pinned
        if pinned is None:
            raise NotOwner("the queue session has not started, or is finished")
        if self.driver_transaction and not pinned.in_transaction():
            pinned.begin()
        return pinned

    @property
    def in_session(self) -> bool:
        """True when the jobs load in the caller's own Session (a Session bind)."""
        return self._orm is not None and not self._own_orm

    def _setup(self) -> Backend:
        """Pin the connection: refused (before any statement is sent) when it already owns
        a job, and on the portable backend when the caller's open transaction would take gap
        locks; recorded as owned by this queue session."""
        bind = self.bind
        info: dict[Any, Any] | None = None  # a Connection bind's, looked up once
        if isinstance(bind, Session):
            sub = self.subscriptions[0]
            engine_or_conn = bind.get_bind(mapper=sub.target if sub.is_orm else None)
            if isinstance(engine_or_conn, Connection):
                check_free(engine_or_conn)
            name = resolve_backend(engine_or_conn, self._backend_name)
            if name == "portable":
                backend = get_backend(name)
                began = not bind.in_transaction()
                if began:
                    conn = self._session_connection(bind, engine_or_conn)
                else:
                    conn = bind.connection()
                    check_free(conn)
                    backend.check_open_transaction(conn)
                self.backend = backend
                self._orm, self._began, self._pinned = bind, began, conn
            else:
                self._user_session = bind
                self._pin(engine_or_conn, name)
        else:
            if isinstance(bind, Connection):
                info = bind.info  # for the refusal before any statement, and the owner record
                check_info_free(info)
            self._pin(bind, resolve_backend(bind, self._backend_name))
        pinned = self._pinned
        assert pinned is not None
        return self._ready(pinned.info if info is None else info)

    def _ready(self, info: dict[Any, Any]) -> Backend:
        """The pinned connection, whose ``info`` is given, is recorded as owned by this queue
        session (refused if another owns a job on it) and, where a claim needs it, its
        transaction prepared: the per-job part of :meth:`_setup`."""
        pinned, backend = self._pinned, self.backend
        assert backend is not None and pinned is not None
        self._owner_info = record_owner(info, self, pinned.engine)
        unobserved = self.unobserved = driver_level(pinned)
        self.driver_begins = (
            unobserved
            and backend.name == "portable"
            and (self._conn is not None or self.private_connection)
            and quiet_transactions(pinned)
        )
        if self._read_committed:
            try:
                self._begin_claim()
            except BaseException:
                self._release(broken=True)
                raise
        return backend

    @abstractmethod
    def released(self, what: str) -> None:
        """The caller ``what`` the transaction holding the job (see
        :class:`~sqlalchemy_q4m.backends.base.Owner`)."""

    def _begin_claim(self) -> None:
        """``SET TRANSACTION`` for the transaction a claim is about to begin (portable)."""
        assert self.backend is not None and self._pinned is not None
        with translate_errors("beginning a claim"):
            self.backend.begin_claim(self._pinned)

    def _session_connection(self, orm: Session, bind: Engine | Connection | None) -> Connection:
        """The caller's Session's connection for a claim in a transaction we begin: one kept
        for its engine (already READ COMMITTED; ``bind`` None: the one we have), else a
        checkout of the Session's own in READ COMMITTED."""
        if self._conn is None and isinstance(bind, Engine) and keeping.keeps(bind):
            self._kept_connection(bind, "portable")
        if self._conn is None:
            return orm.connection(execution_options={"isolation_level": "READ COMMITTED"})
        try:
            return orm.connection(bind_arguments={"bind": self._conn})
        except BaseException:
            conn, self._conn, self._keep = self._conn, None, None
            conn.close()  # back to the pool, not kept: its state is unknown
            raise

    def _kept_connection(self, engine: Engine, name: BackendName) -> Connection:
        """A consumer connection of ``engine`` in ``name``'s mode: one kept from an earlier
        queue session (see :mod:`~sqlalchemy_q4m.backends.pinned`) or a new checkout."""
        conn, generation = keeping.take(engine)
        if conn is None:
            conn = engine.connect()
            try:
                with translate_errors("preparing the consumer's connection"):
                    keep = keeping.prepare(conn, name)
            except BaseException:
                conn.close()
                raise
            if not keep:
                generation = None
        self._conn, self._keep = conn, generation
        return conn

    def _pin(self, bind: Engine | Connection, name: BackendName) -> None:
        backend = get_backend(name)
        if isinstance(bind, Engine):
            conn = self._kept_connection(bind, name)
            began = True
        else:
            conn = bind
            began = self._join(conn, backend)
        self.backend = backend
        self._pinned = conn
        self._began = began

    def _join(self, conn: Connection, backend: Backend) -> bool:
        """Whether the claim on ``conn`` (the caller's) begins a transaction of its own: if
        not, the caller's open one must be able to hold it; if so, on the portable backend
        whether it needs ``SET TRANSACTION`` first, and on Q4M the connection goes to the
        driver's autocommit (once per DBAPI connection: no COMMIT per job)."""
        began = not conn.in_transaction()
        self._read_committed = False
        if not began:
            backend.check_open_transaction(conn)  # on Q4M: refused (no transactions)
        elif backend.name == "portable":
            self._read_committed = backend.sets_isolation(conn)
        else:
            try:
                autocommit_for_queue(conn)
            except DBAPIError as err:
                raise_if_lost(err, "preparing the consumer's connection")
                raise
        return began

    def _new_orm_session(self, conn: Connection) -> Session:
        """The ORM session of the job on the pinned connection, made on first use (the
        asyncio queue session makes it the sync half of an ``AsyncSession``)."""
        return Session(**self._orm_options())

    def _orm_options(self) -> dict[str, Any]:
        """It joins the connection's transaction: its own when this queue session began it
        (so its commit and rollback are the transaction's), else the caller's, which it
        never commits."""
        mode = "control_fully" if self._began else "conservative_savepoint"
        return {
            "bind": self._pinned,
            "expire_on_commit": False,
            "autoflush": True,
            "join_transaction_mode": mode,
        }

    def _finish_transaction(self, *, commit: bool, returning: bool = False) -> None:
        """Commit or roll back what this queue session began (nothing the caller began,
        except that ``returning`` a job on the portable backend rolls back the transaction
        holding its row lock, whoever began it)."""
        portable = self.backend is not None and self.backend.name == "portable"
        if not (self._began or (returning and portable)):
            return
        orm = self._orm
        if orm is not None and not self._own_orm:  # the caller's Session held the claim
            if orm.in_transaction():
                if commit:
                    orm.commit()
                else:
                    orm.rollback()
            return
        conn = self._pinned
        if conn is None:
            return
        if conn.in_transaction():  # SQLAlchemy's (begun by it, or by the job's statements)
            self.driver_transaction = False
            if commit:
                conn.commit()
            else:
                conn.rollback()
        elif self.driver_transaction:  # begun on the driver (see ``driver_begins``)
            if not conn.invalidated and not conn.closed:
                if commit:
                    on_driver(conn, "COMMIT", driver_commit)
                else:
                    on_driver(conn, "ROLLBACK", driver_rollback)
            self.driver_transaction = False

    def _release(self, *, broken: bool = False) -> None:
        """Hand the connection back.  If we might still own a row (``broken``), the pinned
        connection is invalidated (closed): the server then returns the row, and no pool
        ever holds a connection in owner mode.  A transaction this queue session began on
        the caller's Connection is then rolled back too (the server's is gone with the
        connection): the Connection reconnects on its next use instead of refusing every
        statement until the caller rolls back a transaction that was never theirs."""
        give_up_connection(self._owner_info, self)
        self._owner_info = None
        self.driver_transaction = False  # ended above, or gone with the invalidated connection
        pinned, orm = self._pinned, self._orm
        if broken and pinned is not None and not pinned.invalidated and not pinned.closed:
            pinned.invalidate()
        try:
            if orm is not None and not self._own_orm and broken:
                orm.rollback()  # the caller's session: its transaction held the claim
            elif (
                broken
                and self._began
                and self._conn is None
                and pinned is not None
                and not pinned.closed
                and pinned.in_transaction()
            ):
                pinned.rollback()  # the caller's Connection, our transaction
            if orm is not None and self._own_orm:
                orm.close()
        except DBAPIError:  # pragma: no cover - the connection is gone already
            pass
        finally:
            self._unpin(broken)

    def _unpin(self, broken: bool) -> None:
        """Let go of the pinned connection: one we checked out is kept for the engine's next
        queue session (clean) or closed (``broken``: invalidated already)."""
        conn, keep = self._conn, self._keep
        self._conn = self._pinned = self._keep = None
        if conn is not None:
            if keep is not None and not broken:
                keeping.give_back(conn.engine, conn, keep)
            else:
                conn.close()
