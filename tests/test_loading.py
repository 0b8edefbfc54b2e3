"""How claimed rows become jobs (``sqlalchemy_q4m.backends.loading``): instances built from the
driver's row, the ORM for what that cannot reproduce, and the per-job statements sent on the DBAPI
cursor only when nothing observes statements."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any
from typing import ClassVar

import pytest
from sqlalchemy import Column
from sqlalchemy import Engine
from sqlalchemy import Integer
from sqlalchemy import MetaData
from sqlalchemy import String
from sqlalchemy import Table
from sqlalchemy import Text
from sqlalchemy import create_engine
from sqlalchemy import event
from sqlalchemy import func
from sqlalchemy import inspect
from sqlalchemy import select
from sqlalchemy import text
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import URL
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.orm import Mapped
from sqlalchemy.orm import Session
from sqlalchemy.orm import column_property
from sqlalchemy.orm import deferred
from sqlalchemy.orm import mapped_column
from sqlalchemy.orm import reconstructor
from sqlalchemy.orm import relationship
from sqlalchemy.pool import NullPool

from sqlalchemy_q4m import QueueMixin
from sqlalchemy_q4m import queue_session
from sqlalchemy_q4m import queue_table
from sqlalchemy_q4m.backends.driver import DriverSQL
from sqlalchemy_q4m.backends.driver import driver_level
from sqlalchemy_q4m.backends.loading import Loader
from sqlalchemy_q4m.backends.loading import claim_statement
from sqlalchemy_q4m.backends.loading import loader_for
from sqlalchemy_q4m.backends.loading import plain_mapping
from sqlalchemy_q4m.exc import ConnectionLost
from sqlalchemy_q4m.exc import QueueTableError
from sqlalchemy_q4m.schema.functions import subscriptions


class Base(DeclarativeBase):
    pass


class PlainJob(QueueMixin, Base):
    __tablename__ = "ld_plain_jobs"
    command: Mapped[str] = mapped_column(Text)
    n: Mapped[int] = mapped_column(Integer, default=0)


class ReconstructedJob(QueueMixin, Base):
    """``@reconstructor`` runs on load: the ORM must load these."""

    __tablename__ = "ld_reconstructed_jobs"
    command: Mapped[str] = mapped_column(Text)

    @reconstructor
    def _loaded(self) -> None:
        self.loaded_by_orm = True


class DeferredJob(QueueMixin, Base):
    __tablename__ = "ld_deferred_jobs"
    command: Mapped[str] = mapped_column(Text)
    body: Mapped[str] = deferred(mapped_column(Text))


class ExpressionJob(QueueMixin, Base):
    __tablename__ = "ld_expression_jobs"
    command: Mapped[str] = mapped_column(Text)
    shout: Mapped[str] = column_property(func.upper(Column("command", Text)))


class Owner(Base):
    __tablename__ = "ld_owners"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)


class RelatedJob(QueueMixin, Base):
    __tablename__ = "ld_related_jobs"
    owner_id: Mapped[int] = mapped_column(Integer)  # no foreign key on a queue table
    owner: Mapped[Owner] = relationship(primaryjoin="foreign(RelatedJob.owner_id) == Owner.id")


class InheritedBase(QueueMixin, Base):
    __tablename__ = "ld_inherited_jobs"
    kind: Mapped[str] = mapped_column(String(16))
    __mapper_args__: ClassVar[dict[str, Any]] = {
        "polymorphic_on": "kind",
        "polymorphic_identity": "base",
    }


class InheritedChild(InheritedBase):
    __mapper_args__: ClassVar[dict[str, Any]] = {"polymorphic_identity": "child"}


core_jobs = queue_table("ld_core_jobs", MetaData(), Column("payload", Text))


# -- unit: which mappings are built directly, the compiled SQL ---------------------------------


@pytest.mark.unit
@pytest.mark.parametrize(
    ("model", "plain"),
    [
        (PlainJob, True),
        (ReconstructedJob, False),
        (DeferredJob, False),
        (ExpressionJob, False),
        (InheritedBase, False),
        (InheritedChild, False),
    ],
)
def test_plain_mapping(model: Any, plain: bool) -> None:
    assert plain_mapping(inspect(model), model.__table__) is plain


@pytest.mark.unit
def test_a_load_listener_makes_the_orm_load() -> None:
    class Listened(QueueMixin, Base):
        __tablename__ = "ld_listened_jobs"
        command: Mapped[str] = mapped_column(Text)

    assert plain_mapping(inspect(Listened), Listened.__table__)

    def on_load(target: Any, context: Any) -> None:
        pass

    event.listen(Listened, "load", on_load)
    try:
        assert not plain_mapping(inspect(Listened), Listened.__table__)
    finally:
        event.remove(Listened, "load", on_load)


@pytest.mark.unit
def test_driver_sql_is_compiled_once_with_named_parameters() -> None:
    dialect = mysql.dialect(paramstyle="pyformat")
    (sub,) = subscriptions([PlainJob])
    stmt = claim_statement(sub, 1, loader_for(sub, dialect).columns)
    sql = DriverSQL.compile(stmt, dialect)
    assert " ".join(sql.sql.split()) == (
        "SELECT ld_plain_jobs.id, ld_plain_jobs.command, ld_plain_jobs.n FROM ld_plain_jobs "
        "ORDER BY ld_plain_jobs.id LIMIT %(param_1)s FOR UPDATE SKIP LOCKED"
    )
    assert sql.positions is None and sql.params({}) == {"param_1": 1}
    assert sql.params({"param_1": 50}) == {"param_1": 50}


@pytest.mark.unit
def test_driver_sql_positional_paramstyle() -> None:
    dialect = mysql.dialect()  # paramstyle "format"
    (sub,) = subscriptions([PlainJob])
    sql = DriverSQL.compile(claim_statement(sub, 3, loader_for(sub, dialect).columns), dialect)
    assert sql.positions == ("param_1",) and sql.params({}) == (3,)


@pytest.mark.unit
def test_the_batch_delete_gets_one_parameter_set_per_key_in_either_paramstyle() -> None:
    (sub,) = subscriptions([PlainJob])
    keys = [(b"k" * 16,), (b"j" * 16,)]
    named = loader_for(sub, mysql.dialect(paramstyle="pyformat"))._compile_delete()
    assert named.sql == "DELETE FROM ld_plain_jobs WHERE ld_plain_jobs.id = %(q4m_key_0)s"
    assert named.params_many(["q4m_key_0"], keys) == [
        {"q4m_key_0": b"k" * 16},
        {"q4m_key_0": b"j" * 16},
    ]
    positional = loader_for(sub, mysql.dialect())._compile_delete()  # paramstyle "format"
    assert positional.sql == "DELETE FROM ld_plain_jobs WHERE ld_plain_jobs.id = %s"
    assert positional.params_many(["q4m_key_0"], keys) == keys


@pytest.mark.unit
def test_params_many_follows_the_statements_parameter_order() -> None:
    # a key of two columns: each parameter set in the order the SQL names them
    positional = DriverSQL("DELETE FROM t WHERE b = %s AND a = %s", ("b", "a"), {})
    assert positional.params_many(["a", "b"], [(1, 2), (3, 4)]) == [(2, 1), (4, 3)]
    named = DriverSQL("DELETE FROM t WHERE b = %(b)s AND a = %(a)s", None, {})
    assert named.params_many(["a", "b"], [(1, 2)]) == [{"a": 1, "b": 2}]


@pytest.mark.unit
def test_a_table_without_a_job_id_has_no_delete() -> None:
    keyless = Table("ld_keyless", MetaData(), Column("n", Integer))  # a legacy Q4M table
    with pytest.raises(QueueTableError, match="no job id to delete by"):
        Loader(keyless, keyless, mysql.dialect())._compile_delete()


@pytest.mark.unit
def test_one_loader_per_dialect_and_target() -> None:
    (sub,) = subscriptions([PlainJob])
    first, second = mysql.dialect(), mysql.dialect()
    assert loader_for(sub, first) is loader_for(sub, first)
    assert loader_for(sub, first) is not loader_for(sub, second)


# -- integration: the jobs built, on the real server --------------------------------------------


@pytest.fixture(scope="module")
def tables(engine: Engine) -> Iterator[Engine]:
    Base.metadata.create_all(engine)
    core_jobs.metadata.create_all(engine)
    yield engine
    core_jobs.metadata.drop_all(engine)
    Base.metadata.drop_all(engine)


@pytest.fixture
def db(tables: Engine) -> Engine:
    with tables.begin() as conn:
        for table in [*reversed(Base.metadata.sorted_tables), core_jobs]:
            conn.execute(table.delete())
    return tables


def put(engine: Engine, *jobs: Any) -> None:
    with Session(engine) as session:
        session.add_all(jobs)
        session.commit()


def left(engine: Engine, table: Any) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


@pytest.mark.integration
def test_a_direct_instance_is_clean_typed_and_persistent_in_the_session(db: Engine) -> None:
    put(db, PlainJob(command="echo", n=7))
    with db.connect() as conn, queue_session(PlainJob, bind=conn, timeout=1) as qs_job:
        assert isinstance(qs_job, PlainJob)
        assert isinstance(qs_job.id, uuid.UUID) and qs_job.command == "echo" and qs_job.n == 7
        state = inspect(qs_job)
        assert state.detached and state.key == inspect(PlainJob).identity_key_from_instance(qs_job)
        assert not state.modified
    assert left(db, PlainJob) == 0


@pytest.mark.integration
def test_the_session_is_made_on_demand_and_holds_the_job(db: Engine) -> None:
    put(db, PlainJob(command="a"))
    with db.connect() as conn:
        qs = queue_session(PlainJob, bind=conn, timeout=1)
        with qs as job:
            assert qs._orm is None  # nothing made it yet
            session = qs.session
            assert job in session and inspect(job).persistent
            assert session.get(PlainJob, job.id) is job  # no SELECT: the identity map has it
            session.add(Owner(id=1))
        assert left(db, PlainJob) == 0 and left(db, Owner) == 1  # committed together


@pytest.mark.integration
@pytest.mark.parametrize("model", [ReconstructedJob, DeferredJob, ExpressionJob])
def test_mappings_the_orm_must_load(db: Engine, model: Any) -> None:
    values: dict[str, Any] = {"command": "x"}
    if model is DeferredJob:
        values["body"] = "long"
    put(db, model(**values))
    with db.connect() as conn, queue_session(model, bind=conn, timeout=1) as job:
        assert isinstance(job, model) and job.command == "x"
        if model is ReconstructedJob:
            assert job.loaded_by_orm
        if model is DeferredJob:
            assert "body" not in inspect(job).dict and job.body == "long"  # loaded on access
        if model is ExpressionJob:
            assert job.shout == "X"
    assert left(db, model) == 0


@pytest.mark.integration
def test_a_relationship_loads_through_the_session(db: Engine) -> None:
    put(db, Owner(id=5))
    put(db, RelatedJob(owner_id=5))
    with db.connect() as conn, queue_session(RelatedJob, bind=conn, timeout=1) as job:
        assert job.owner.id == 5
    assert left(db, RelatedJob) == 0


@pytest.mark.integration
def test_polymorphic_jobs_load_as_their_class(db: Engine) -> None:
    put(db, InheritedChild())
    with db.connect() as conn, queue_session(InheritedBase, bind=conn, timeout=1) as job:
        assert type(job) is InheritedChild
    assert left(db, InheritedBase) == 0


@pytest.mark.integration
def test_core_rows_are_processed(db: Engine) -> None:
    with db.begin() as conn:
        conn.execute(core_jobs.insert().values(payload="p"))
    with db.connect() as conn, queue_session(core_jobs, bind=conn, timeout=1) as row:
        assert row.payload == "p" and isinstance(row.id, uuid.UUID)
    assert left(db, core_jobs) == 0


# -- the DBAPI path and what observes statements ----------------------------------------------


@pytest.mark.integration
def test_driver_level_only_when_nothing_observes_statements(db_url: URL) -> None:
    engine = create_engine(db_url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            assert driver_level(conn)

            def seen(*args: Any) -> None:
                pass

            event.listen(engine, "before_cursor_execute", seen)
            assert not driver_level(conn)
            event.remove(engine, "before_cursor_execute", seen)
            assert driver_level(conn)
        echoing = create_engine(db_url, poolclass=NullPool, echo=True)
        with echoing.connect() as conn:
            assert not driver_level(conn)
        echoing.dispose()
    finally:
        engine.dispose()


@pytest.mark.integration
def test_listeners_see_the_claim_and_the_completion(db: Engine, db_url: URL) -> None:
    put(db, PlainJob(command="watched"))
    engine = create_engine(db_url, poolclass=NullPool)
    statements: list[str] = []

    @event.listens_for(engine, "before_cursor_execute")
    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(" ".join(statement.split()[:3]))

    try:
        with engine.connect() as conn:
            statements.clear()
            with queue_session(PlainJob, bind=conn, timeout=1) as job:
                assert job.command == "watched"
        assert "SELECT ld_plain_jobs.id, ld_plain_jobs.command," in statements
        assert "DELETE FROM ld_plain_jobs" in statements
    finally:
        engine.dispose()
    assert left(db, PlainJob) == 0


@pytest.mark.integration
def test_driver_level_errors_are_sqlalchemy_errors(db: Engine) -> None:
    (sub,) = subscriptions([PlainJob])
    bad = DriverSQL("SELECT no_such_column FROM ld_plain_jobs", None, {})
    with db.connect() as conn:
        assert driver_level(conn)
        with pytest.raises(OperationalError) as caught:  # what PyMySQL raises for 1054
            bad.run(conn, {})
        assert caught.value.orig is not None and caught.value.orig.args[0] == 1054
        assert conn.in_transaction()  # begun as executing would have
        conn.rollback()
        assert loader_for(sub, conn.dialect).claim(conn, sub, 1, lambda: Session(conn)) == []


@pytest.mark.integration
def test_a_killed_connection_is_invalidated_and_reported_lost(db: Engine, db_url: URL) -> None:
    engine = create_engine(db_url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            with queue_session(PlainJob, bind=conn, timeout=0) as nothing:
                assert nothing is None  # the backend is known: the next call only claims
            put(db, PlainJob(command="a"))
            conn_id = conn.execute(text("SELECT CONNECTION_ID()")).scalar_one()
            conn.rollback()
            with db.connect() as killer:
                killer.execute(text(f"KILL {int(conn_id)}"))
            with pytest.raises(ConnectionLost), queue_session(PlainJob, bind=conn, timeout=1):
                pass  # pragma: no cover - the claim fails
            assert conn.invalidated
    finally:
        engine.dispose()
    assert left(db, PlainJob) == 1  # nothing was lost


# -- a Session bind: the job built from the driver's row, as the ORM's load would give it ------


@pytest.mark.integration
def test_a_session_bind_gets_a_persistent_job_built_from_the_row(db: Engine) -> None:
    put(db, PlainJob(command="built", n=3))
    with Session(db) as session, queue_session(PlainJob, bind=session, timeout=1) as job:
        assert job.command == "built" and job.n == 3
        state = inspect(job)
        assert state.persistent and job in session and not state.modified
        assert session.get(PlainJob, job.id) is job
    assert left(db, PlainJob) == 0


@pytest.mark.integration
def test_a_session_bind_returns_the_instance_its_identity_map_holds(db: Engine) -> None:
    put(db, PlainJob(command="held"))
    with Session(db) as session:
        held = session.scalars(select(PlainJob)).one()
        session.commit()  # expire_on_commit: the next access refreshes it
        with queue_session(PlainJob, bind=session, timeout=1) as job:
            assert job is held and job.command == "held"
    assert left(db, PlainJob) == 0


@pytest.mark.integration
def test_a_session_bind_with_an_orm_execute_listener_loads_through_the_orm(
    db: Engine,
) -> None:
    put(db, PlainJob(command="a"), PlainJob(command="b"))
    with Session(db) as session:
        executed: list[Any] = []

        def seen(state: Any) -> None:
            executed.append(state)

        event.listen(session, "do_orm_execute", seen)
        with queue_session(PlainJob, bind=session, timeout=1) as job:
            assert job.command == "a"
        assert len(executed) == 1  # the claim went through the ORM: the listener saw it
    assert left(db, PlainJob) == 1
