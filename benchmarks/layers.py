"""The library's consume path taken apart, for :mod:`benchmarks.cpu`: loops that stop below
``queue_session``, so that the client CPU each layer adds over the raw loop can be told apart.

* :class:`StatementLoop`: the library's own compiled statements (the claim or the Q4M owner's
  ``SELECT``, the completion) run as ``queue_session`` runs them
  (:class:`~sqlalchemy_q4m.backends.driver.DriverSQL` on the connection's kept DBAPI cursor;
  on the portable backend in a transaction begun and committed on the driver, as a consumer on
  an Engine's connection or the worker's does), the fetched rows left as the driver returns
  them.
* :class:`JobObjectLoop`: the same, with each row made the job a user gets (the columns' result
  processors, then a mapped instance) by the backend's
  :class:`~sqlalchemy_q4m.backends.loading.Loader`.

* :class:`GuardedLoop`: the same, with what a queue session keeps per job for its guarantees
  and nothing else: the one-owner record on the connection (its engine watched, so each
  COMMIT dispatches the ownership watch's ``commit`` event) and the unique-key look-ups after
  the claim (Q4M) and the end.

* :class:`SessionFloorLoop` (portable only): :class:`JobObjectLoop` in an ORM ``Session``'s
  transaction, as a ``Session`` bind claims: what SQLAlchemy's ``Session`` itself charges per
  job (its transaction begun on the connection, the job added to it and taken out, its commit),
  the floor of the ``queue_session(bind=Session(engine))`` row.

What ``queue_session`` adds on top of :class:`GuardedLoop` (its object and lifecycle, the bind
and backend resolution, the backend dispatch, the error translation, the end and release
steps) is then the difference with the ``queue_session(bind=connection)`` row, and the
worker's own part the difference between that row and the worker's.  These loops are no API:
they skip every check a queue session makes, and use the library's internals.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import bindparam
from sqlalchemy import delete
from sqlalchemy.engine import URL
from sqlalchemy.orm import Session

from sqlalchemy_q4m.backends.base import autocommit_for_queue
from sqlalchemy_q4m.backends.base import give_up_connection
from sqlalchemy_q4m.backends.base import take_connection
from sqlalchemy_q4m.backends.driver import OWNER_KEY
from sqlalchemy_q4m.backends.driver import DriverSQL
from sqlalchemy_q4m.backends.loading import claim_statement
from sqlalchemy_q4m.backends.loading import loader_for
from sqlalchemy_q4m.backends.native import _sql
from sqlalchemy_q4m.backends.native import wait_sql
from sqlalchemy_q4m.backends.unique_keys import claimed
from sqlalchemy_q4m.backends.unique_keys import ended
from sqlalchemy_q4m.backends.unique_keys import key_ended
from sqlalchemy_q4m.schema.functions import subscriptions

from .common import BenchJob
from .common import library_engine
from .common import server_backend

__all__ = ["GuardedLoop", "JobObjectLoop", "SessionFloorLoop", "StatementLoop"]


class StatementLoop:
    """The library's per-job statements through ``DriverSQL.run``, rows not converted."""

    #: Build each job as ``queue_session`` does (:class:`JobObjectLoop`).
    build_jobs = False
    #: Read by the library's statements when they begin a transaction (the loop is the
    #: connection's owner): on the portable backend they leave it to the driver, as a queue
    #: session on a connection nobody else holds does, and the loop commits it there.
    driver_begins = False
    driver_transaction = False

    def __init__(self, url: URL) -> None:
        self.engine = library_engine(url)
        self.native = server_backend(url) == "native"
        conn = self.engine.connect()
        if self.native:
            autocommit_for_queue(conn)  # as a Q4M consumer's connection is
        else:
            conn = conn.execution_options(isolation_level="READ COMMITTED")
            self.driver_begins = True
            conn.info[OWNER_KEY] = self  # GuardedLoop records itself again per job
        self.conn = conn
        self.subs = subscriptions((BenchJob,), None)
        sub = self.subs[0]
        self.loader = loader = loader_for(sub, conn.dialect)
        dialect = conn.dialect
        if self.native:
            self.wait = wait_sql(dialect, self.subs, 0)
            self.end = _sql(dialect, "end")
            self.select = DriverSQL.compile(loader._owned, dialect)
        else:
            stmt = claim_statement(sub, 1, loader.columns)
            self.select = DriverSQL.compile(stmt, dialect)
            where = loader.key_columns[0] == bindparam("key", None)
            self.delete = DriverSQL.compile(delete(loader.table).where(where), dialect)

    def consume(self) -> int:
        return self._native() if self.native else self._portable()

    def _job(self, fetched: Any) -> Any:
        """The job made from the fetched row (or the row itself); its key."""
        rows = self.loader.rows.fetched(fetched)[:1]
        if not rows:
            return None
        if not self.build_jobs:
            return rows[0], (rows[0][0],)
        return self.loader._jobs(self.loader._driver_jobs(rows), rows)[0]

    def _native(self) -> int:
        conn, done = self.conn, 0
        wait, end, select = self.wait, self.end, self.select
        while True:
            _description, rows = wait.run(conn, {}, True)
            if not rows[0][0]:
                end.run(conn, {}, True)
                return done
            if self._job(select.run(conn, {}, True)) is None:
                raise RuntimeError("the owner sees no row")
            end.run(conn, {}, True)
            done += 1

    def _portable(self) -> int:
        conn, done = self.conn, 0
        claim, remove = self.select, self.delete
        while True:
            found = self._job(claim.run(conn, {}, True))
            if found is None:
                self._end(commit=False)
                return done
            remove.run(conn, {"key": found[1][0]}, True)
            self._end(commit=True)
            done += 1

    def _end(self, *, commit: bool) -> None:
        """Commit or roll back the job's transaction where it was begun: on the driver (see
        ``driver_begins``), or SQLAlchemy's."""
        conn = self.conn
        ender: Any = conn
        if not conn.in_transaction():
            if not self.driver_transaction:
                return
            ender = conn.connection.dbapi_connection
        self.driver_transaction = False
        if commit:
            ender.commit()
        else:
            ender.rollback()

    def close(self) -> None:
        self.conn.info.pop(OWNER_KEY, None)
        self.conn.close()
        self.engine.dispose()


class JobObjectLoop(StatementLoop):
    """:class:`StatementLoop`, each row made the job ``queue_session`` yields."""

    build_jobs = True


class GuardedLoop(JobObjectLoop):
    """:class:`JobObjectLoop` with the per-job guarantees of a queue session (see the module
    docstring): the owner record taken before the claim and given up after the end, the key
    look-ups.  Its own owner: a caller's COMMIT inside a job would be reported to it."""

    def released(self, what: str) -> None:
        """The watch reports a COMMIT while this loop owns the job: its own (ignored)."""

    def _native(self) -> int:
        conn, done, table = self.conn, 0, self.loader.table
        wait, end, select = self.wait, self.end, self.select
        while True:
            info = take_connection(conn, self)
            _description, rows = wait.run(conn, {}, True)
            if not rows[0][0]:
                end.run(conn, {}, True)
                give_up_connection(info, self)
                return done
            found = self._job(select.run(conn, {}, True))
            if found is None:
                raise RuntimeError("the owner sees no row")
            claimed(conn, table, found[1])
            end.run(conn, {}, True)
            ended(conn, table, found[1])
            if conn.in_transaction():  # a key look-up began one: as a queue session ends it
                conn.commit()
            give_up_connection(info, self)
            done += 1

    def _portable(self) -> int:
        conn, done, table = self.conn, 0, self.loader.table
        claim, remove = self.select, self.delete
        while True:
            info = take_connection(conn, self)
            found = self._job(claim.run(conn, {}, True))
            if found is None:
                self._end(commit=False)
                give_up_connection(info, self)
                return done
            remove.run(conn, {"key": found[1][0]}, True)
            key_ended(conn, table, found[1])
            self._end(commit=True)
            give_up_connection(info, self)
            done += 1


class SessionFloorLoop(JobObjectLoop):
    """:class:`JobObjectLoop` in the transaction of an ORM ``Session(engine)`` kept by the
    consumer, as ``queue_session(bind=session)`` claims on the portable backend: the Session's
    transaction begun on the loop's connection, each job added to the Session (persistent),
    the DELETE, the job taken out of the Session, and the Session committed.  No guarantee of
    a queue session: only what SQLAlchemy's ``Session`` charges per job.  Portable only (on
    Q4M a ``Session`` bind owns its job on a connection of its own, outside the Session)."""

    def __init__(self, url: URL) -> None:
        super().__init__(url)
        if self.native:
            super().close()  # the connection and engine just made
            raise ValueError("SessionFloorLoop is the portable Session bind's floor")
        self.orm = Session(self.engine)

    def _portable(self) -> int:
        conn, orm, done = self.conn, self.orm, 0
        claim, remove = self.select, self.delete
        while True:
            orm.connection(bind_arguments={"bind": conn})  # the Session's transaction on it
            found = self._job(claim.run(conn, {}, True))
            if found is None:
                orm.rollback()
                return done
            job, key = found
            orm.add(job)
            remove.run(conn, {"key": key[0]}, True)
            orm.expunge(job)
            orm.commit()
            done += 1

    def close(self) -> None:
        self.orm.close()
        super().close()
