"""``enqueue()``: the bulk producer.

Unit tests pin the argument checks (all made before the database is touched) and the
compiled INSERT and driver parameters; integration tests run it on the real server with the
three kinds of bind, defaults, delays, instances, listeners, rollback, and consume what it
enqueued.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Column
from sqlalchemy import Engine
from sqlalchemy import Integer
from sqlalchemy import MetaData
from sqlalchemy import Numeric
from sqlalchemy import String
from sqlalchemy import Table
from sqlalchemy import Text
from sqlalchemy import create_engine
from sqlalchemy import event
from sqlalchemy import func
from sqlalchemy import select
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import URL
from sqlalchemy.exc import ProgrammingError
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.orm import Mapped
from sqlalchemy.orm import Session
from sqlalchemy.orm import mapped_column
from sqlalchemy.pool import NullPool

from sqlalchemy_q4m import QueueMixin
from sqlalchemy_q4m import RetryMixin
from sqlalchemy_q4m import enqueue
from sqlalchemy_q4m import queue_session
from sqlalchemy_q4m import queue_table
from sqlalchemy_q4m.backends.driver import DriverSQL
from sqlalchemy_q4m.exc import Q4MError
from sqlalchemy_q4m.exc import SubscriptionError
from sqlalchemy_q4m.producer.rows import group_rows
from sqlalchemy_q4m.producer.rows import shape_for
from sqlalchemy_q4m.producer.statements import _params
from sqlalchemy_q4m.producer.statements import _positional
from sqlalchemy_q4m.producer.statements import plan_for
from sqlalchemy_q4m.schema.retry import due_condition


class Base(DeclarativeBase):
    pass


def _next_serial(context: Any) -> str:
    """A context-taking default: derived from the row's other values."""
    return "for " + context.get_current_parameters()["command"]


class EqJob(QueueMixin, Base):
    __tablename__ = "eq_shell_jobs"
    command: Mapped[str] = mapped_column(Text)
    label: Mapped[str] = mapped_column("label_col", String(32), default="plain")
    note: Mapped[str | None] = mapped_column(Text)
    origin: Mapped[str] = mapped_column(String(32), default=lambda: "made")
    serial: Mapped[str] = mapped_column(String(64), default=_next_serial)
    weight: Mapped[int] = mapped_column(Integer, server_default="7")


class EqRetryJob(RetryMixin, QueueMixin, Base):
    __tablename__ = "eq_retry_jobs"
    command: Mapped[str] = mapped_column(Text)


class NotQueue(Base):
    __tablename__ = "eq_plain"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)


core_md = MetaData()
core_jobs = queue_table(
    "eq_core_jobs", core_md, Column("payload", String(64)), Column("size", Integer, default=1)
)

#: An engine that would fail on its first connection: the unit tests prove nothing connects.
UNREACHABLE = "mysql+pymysql://nobody@127.0.0.1:1/none"


@pytest.fixture
def offline() -> Iterator[Engine]:
    engine = create_engine(UNREACHABLE, poolclass=NullPool)
    yield engine
    engine.dispose()


# -- unit: argument checks, before any connection ------------------------------------------


@pytest.mark.unit
def test_empty_rows_touch_nothing(offline: Engine) -> None:
    assert enqueue(offline, EqJob, []) == []
    assert enqueue(offline, core_jobs, iter(())) == []


@pytest.mark.unit
@pytest.mark.parametrize("target", [NotQueue, NotQueue.__table__, "eq_shell_jobs", 42])
def test_a_target_must_be_a_queue(offline: Engine, target: Any) -> None:
    with pytest.raises(SubscriptionError):
        enqueue(offline, target, [{"command": "ls"}])


@pytest.mark.unit
def test_unknown_keys_name_the_row_and_key(offline: Engine) -> None:
    rows = [{"command": "ls"}, {"command": "pwd", "nope": 1}]
    with pytest.raises(Q4MError, match=r"row 2: 'eq_shell_jobs' has no column 'nope'"):
        enqueue(offline, EqJob, rows)
    # the column name is not the attribute name: a model's rows use attribute names
    with pytest.raises(Q4MError, match=r"row 1: .*'label_col'"):
        enqueue(offline, EqJob, [{"command": "ls", "label_col": "x"}])
    with pytest.raises(Q4MError, match=r"row 1: .*'command'"):
        enqueue(offline, core_jobs, [{"command": "ls"}])


@pytest.mark.unit
def test_ids_are_made_by_the_library(offline: Engine) -> None:
    with pytest.raises(Q4MError, match=r"row 3: 'id' is the job id"):
        enqueue(offline, EqJob, [{"command": "a"}, {"command": "b"}, {"command": "c", "id": 1}])
    with pytest.raises(Q4MError, match=r"row 1: 'id' is the job id"):
        enqueue(offline, EqJob, [EqJob(command="a", id=uuid.uuid4())])


@pytest.mark.unit
def test_delay_needs_run_at(offline: Engine) -> None:
    with pytest.raises(Q4MError, match="delay needs a 'run_at' column"):
        enqueue(offline, EqJob, [{"command": "ls"}], delay=30)
    with pytest.raises(Q4MError, match="delay needs a 'run_at' column"):
        enqueue(offline, EqJob, [], delay=30)  # checked even with nothing to insert
    with pytest.raises(Q4MError, match=r"row 1: give 'run_at' or delay, not both"):
        enqueue(offline, EqRetryJob, [{"command": "ls", "run_at": 5}], delay=30)
    with pytest.raises(Q4MError, match="delay is a number of seconds"):
        enqueue(offline, EqRetryJob, [{"command": "ls"}], delay="soon")  # type: ignore[arg-type]


@pytest.mark.unit
def test_rows_are_mappings_or_instances(offline: Engine) -> None:
    with pytest.raises(Q4MError, match=r"row 2: a job is a EqJob or a mapping"):
        enqueue(offline, EqJob, [{"command": "ls"}, ("ls",)])
    with pytest.raises(Q4MError, match=r"row 1: a job is a mapping"):
        enqueue(offline, core_jobs, [EqJob(command="ls")])
    with pytest.raises(Q4MError, match=r"row 1: a job is a EqJob"):
        enqueue(offline, EqJob, [EqRetryJob(command="ls")])


@pytest.mark.unit
def test_a_missing_not_null_column_without_default_is_refused(offline: Engine) -> None:
    # command is NOT NULL (Mapped[str]) with no default; weight has a server default
    with pytest.raises(Q4MError, match=r"row 2: no value for 'command', which is NOT NULL"):
        enqueue(offline, EqJob, [{"command": "ls"}, {"note": "x"}])


@pytest.mark.unit
def test_bind_and_chunk_size_are_checked(offline: Engine) -> None:
    with pytest.raises(Q4MError, match="needs an Engine, a Connection or a Session"):
        enqueue("mysql://", EqJob, [{"command": "ls"}])  # type: ignore[arg-type]
    with pytest.raises(Q4MError, match="chunk_size must be an integer >= 1"):
        enqueue(offline, EqJob, [{"command": "ls"}], chunk_size=0)


# -- unit: the compiled INSERT and the driver's parameters ---------------------------------


def _plan(target: Any, rows: list[Any], dialect: Any, delayed: bool = False) -> Any:
    shape = shape_for(target, target if isinstance(target, Table) else target.__table__)
    (group,) = group_rows(shape, rows, delayed)
    return plan_for(shape, group, delayed, dialect), group


@pytest.mark.unit
def test_pymysql_gets_one_positional_insert_and_tuples() -> None:
    dialect = create_engine(UNREACHABLE).dialect
    rows = [{"command": "ls", "note": None}, {"command": "pwd", "note": "n"}]
    plan, group = _plan(EqJob, rows, dialect)
    assert plan.sql.sql == (
        "INSERT INTO eq_shell_jobs (id, command, label_col, note, origin, serial) "
        "VALUES (%s, %s, %s, %s, %s, %s)"
    )
    assert plan.sql.positions == ("id", "command", "label_col", "note", "origin", "serial")
    ids: list[uuid.UUID] = []
    params = _params(plan, group.rows, None, ids)
    assert [p[1:] for p in params] == [
        ("ls", "plain", None, "made", "for ls"),
        ("pwd", "plain", "n", "made", "for pwd"),
    ]
    assert [p[0] for p in params] == [i.bytes for i in ids]  # the JobId bind processor
    assert ids == sorted(ids) and len(set(ids)) == 2


@pytest.mark.unit
def test_named_paramstyle_gets_dicts() -> None:
    dialect = mysql.dialect(paramstyle="pyformat")
    dialect.driver = "otherdriver"  # a driver that takes only its declared paramstyle
    plan, group = _plan(core_jobs, [{"payload": "p"}], dialect)
    assert plan.sql.sql == (
        "INSERT INTO eq_core_jobs (id, payload, size) VALUES (%(id)s, %(payload)s, %(size)s)"
    )
    assert plan.sql.positions is None
    ids: list[uuid.UUID] = []
    (params,) = _params(plan, group.rows, None, ids)
    assert params == {"id": ids[0].bytes, "payload": "p", "size": 1}


@pytest.mark.unit
def test_delay_sets_run_at_in_the_insert() -> None:
    dialect = create_engine(UNREACHABLE).dialect
    plan, group = _plan(EqRetryJob, [{"command": "x"}], dialect, delayed=True)
    assert plan.sql.positions == ("id", "command", "attempts", "run_at")
    (params,) = _params(plan, group.rows, 1234, [])
    assert params[1:] == ("x", 0, 1234)


@pytest.mark.unit
def test_the_key_set_picks_the_insert() -> None:
    """Missing columns without a Python default are left out: the server's default applies."""
    dialect = create_engine(UNREACHABLE).dialect
    plan, _ = _plan(EqJob, [{"command": "ls", "weight": 3}], dialect)
    assert "weight" in plan.sql.sql and "note" not in plan.sql.sql
    shape = shape_for(EqJob, EqJob.__table__)
    groups = group_rows(
        shape, [{"command": "a"}, {"command": "b"}, {"command": "c", "note": "n"}], False
    )
    assert [(g.first, len(g.rows)) for g in groups] == [(1, 2), (3, 1)]


@pytest.mark.unit
def test_percent_signs_survive_the_positional_form() -> None:
    sql = DriverSQL("INSERT INTO t (a, b) VALUES (%(a)s, '100%%'), (%%(b)s)", None, {})
    converted = _positional(sql, create_engine(UNREACHABLE).dialect)
    assert converted.sql == "INSERT INTO t (a, b) VALUES (%s, '100%%'), (%%(b)s)"
    assert converted.positions == ("a",)


typed_md = MetaData()
typed_jobs = queue_table(
    "eq_typed_jobs",
    typed_md,
    Column("n", Integer, nullable=False),
    Column("s", String(5)),
    Column("amount", Numeric(5, 2)),
    Column("body", mysql.LONGTEXT),
)


def _grouped(shape: Any, rows: Any) -> Any:
    """``group_rows`` as (keys, first, rows, large) per group, or the error's type and text."""
    try:
        return [(g.keys, g.first, g.rows, g.large) for g in group_rows(shape, rows, False)]
    except Exception as err:
        return type(err), str(err), getattr(err, "row", None), getattr(err, "column", None)


@pytest.mark.unit
@pytest.mark.parametrize(
    "row",
    [
        {"n": 1},
        {"n": 1, "s": "abc", "amount": 1.5},
        {"n": "42", "amount": "1.25"},  # converted, in a copy of the row
        {"n": True},
        {"n": 2**31},
        {"n": None},
        {"n": "oops"},
        {"n": 1, "s": "toolong"},
        {"n": 1, "s": 7},
        {"n": 1, "s": "\ud800"},
        {"n": 1, "s": "é"},
        {"n": 1, "amount": "12345"},
        {"n": 1, "amount": float("nan")},
        {"n": 1, "body": "x" * 300_000},  # measured against max_allowed_packet
        {"n": 1, "body": None},
        {"n": 1, "nope": 2},
        {"s": "a"},
        {"n": 1, "id": uuid.uuid4()},
        ("n", 1),
    ],
)
def test_one_row_is_checked_as_in_a_batch(row: Any) -> None:
    """``enqueue(bind, target, [row])`` takes a shorter way through ``group_rows``: the same
    groups (values converted alike, large rows noted alike) or the same error."""
    shape = shape_for(typed_jobs, typed_jobs)
    one = _grouped(shape, [row])
    assert one == _grouped(shape, iter([row]))  # an iterator takes the general way
    if isinstance(one, list) and row == {"n": "42", "amount": "1.25"}:
        assert one[0][2][0] is not row and one[0][2][0]["n"] == 42


@pytest.mark.unit
def test_a_row_giving_no_column_gets_the_id_alone() -> None:
    """A plain plan whose statement holds the id and nothing else (every other column left
    to the server) used to fail making the parameters (an empty ``itemgetter``)."""
    md = MetaData()
    bare = queue_table("eq_bare_jobs", md, Column("note", String(8)))
    dialect = create_engine(UNREACHABLE).dialect
    for rows in ([{}], [{}, {}]):
        plan, group = _plan(bare, rows, dialect)
        assert plan.sql.positions == ("id",)
        ids: list[uuid.UUID] = []
        assert _params(plan, group.rows, None, ids) == [(i.bytes,) for i in ids]
        assert len(ids) == len(rows)


# -- integration ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tables(engine: Engine) -> Iterator[Engine]:
    Base.metadata.create_all(engine)
    core_md.create_all(engine)
    yield engine
    Base.metadata.drop_all(engine)
    core_md.drop_all(engine)


@pytest.fixture
def db(tables: Engine) -> Iterator[Engine]:
    def clean() -> None:
        with tables.begin() as conn:
            for table in [*Base.metadata.sorted_tables, core_jobs]:
                conn.execute(table.delete())

    clean()
    yield tables
    clean()


def _count(engine: Engine, target: Any = EqJob) -> int:
    with engine.connect() as conn:
        return int(conn.scalar(select(func.count()).select_from(target)) or 0)


@pytest.mark.integration
def test_engine_bind_commits_and_returns_ids_in_row_order(db: Engine) -> None:
    rows = [{"command": f"job {i}"} for i in range(2500)]  # three chunks
    ids = enqueue(db, EqJob, rows)
    assert len(ids) == 2500 and len(set(ids)) == 2500
    assert ids == sorted(ids)  # time-ordered UUIDv7s, in row order
    with db.connect() as conn:
        stored = dict(conn.execute(select(EqJob.id, EqJob.command)).all())
    assert [stored[i] for i in ids] == [r["command"] for r in rows]


@pytest.mark.integration
def test_defaults_and_server_defaults(db: Engine) -> None:
    (plain, given) = enqueue(
        db, EqJob, [{"command": "a"}, {"command": "b", "label": "L", "note": "n", "weight": 1}]
    )
    with Session(db) as session:
        first, second = session.get_one(EqJob, plain), session.get_one(EqJob, given)
        assert (first.label, first.note, first.origin, first.serial, first.weight) == (
            "plain",
            None,
            "made",
            "for a",
            7,
        )
        assert (second.label, second.note, second.weight) == ("L", "n", 1)


@pytest.mark.integration
def test_connection_bind_runs_in_the_callers_transaction(db: Engine) -> None:
    with db.connect() as conn:
        ids = enqueue(conn, EqJob, [{"command": "a"}, {"command": "b"}])
        assert conn.in_transaction()  # autobegun; the caller commits
        assert _count(db) == 0
        conn.commit()
        assert _count(db) == 2
        with queue_session(EqJob, bind=conn, timeout=1) as job:
            assert job is not None and job.id == ids[0] and job.command == "a"
        with queue_session(EqJob, bind=conn, timeout=1) as job:
            assert job is not None and job.id == ids[1]
    assert _count(db) == 0


@pytest.mark.integration
def test_session_bind_commit_and_rollback(db: Engine) -> None:
    with Session(db) as session:
        enqueue(session, EqJob, [{"command": "undone"}])
        session.rollback()
    assert _count(db) == 0
    with Session(db) as session:
        session.add(EqRetryJob(command="with it"))
        (job_id,) = enqueue(session, EqJob, [{"command": "kept"}])
        session.commit()
    assert _count(db) == 1 and _count(db, EqRetryJob) == 1
    with db.connect() as conn, queue_session(EqJob, bind=conn, timeout=1) as job:
        assert job is not None and job.id == job_id and job.command == "kept"


@pytest.mark.integration
def test_instances_as_rows(db: Engine) -> None:
    jobs = [EqJob(command="x", note="from an instance"), EqJob(command="y", label="own")]
    ids = enqueue(db, EqJob, [*jobs, {"command": "z"}])
    assert all(job.id is None for job in jobs)  # the instances are left as they were
    with db.connect() as conn:
        got = conn.execute(select(EqJob.command, EqJob.label, EqJob.note).order_by(EqJob.id))
        assert got.all() == [
            ("x", "plain", "from an instance"),
            ("y", "own", None),
            ("z", "plain", None),
        ]
    assert ids == sorted(ids)


@pytest.mark.integration
def test_delay_sets_run_at(db: Engine) -> None:
    before = int(time.time())
    (later,) = enqueue(db, EqRetryJob, [{"command": "later"}], delay=30)
    (now,) = enqueue(db, EqRetryJob, [{"command": "now"}])
    with db.connect() as conn:
        run_at = dict(conn.execute(select(EqRetryJob.id, EqRetryJob.run_at)).all())
        assert before + 30 <= run_at[later] <= int(time.time()) + 30
        assert run_at[now] == 0
        conn.commit()  # the claim begins its own transaction (an open REPEATABLE READ is refused)
        due = due_condition(EqRetryJob.__table__)
        with queue_session(EqRetryJob, bind=conn, where=due, timeout=0.5) as job:
            assert job is not None and job.id == now
        with queue_session(EqRetryJob, bind=conn, where=due, timeout=0.2) as job:
            assert job is None  # not due for 30 seconds


@pytest.mark.integration
def test_core_table_and_mixed_key_sets_keep_row_order(db: Engine) -> None:
    rows = [{"payload": "a"}, {"payload": "b", "size": 5}, {"payload": "c"}, {"size": 9}]
    ids = enqueue(db, core_jobs, rows, chunk_size=1)
    with db.connect() as conn:
        got = conn.execute(select(core_jobs.c.id, core_jobs.c.payload, core_jobs.c.size))
        assert sorted(got.all()) == [
            (ids[0], "a", 1),
            (ids[1], "b", 5),
            (ids[2], "c", 1),
            (ids[3], None, 9),
        ]
        conn.commit()  # each claim begins its own transaction (open REPEATABLE READ: refused)
        taken = []
        for _ in rows:
            with queue_session(core_jobs, bind=conn, timeout=1) as row:
                assert row is not None
                taken.append(row.id)
    assert taken == ids  # FIFO is row order


@pytest.mark.integration
def test_listeners_see_the_insert(db_url: URL, tables: Engine) -> None:
    engine = create_engine(db_url, poolclass=NullPool)
    seen: list[tuple[str, bool, int]] = []

    @event.listens_for(engine, "before_cursor_execute")
    def _seen(conn: Any, cursor: Any, sql: str, params: Any, context: Any, many: bool) -> None:
        if sql.startswith("INSERT"):
            seen.append((sql, many, len(params)))

    try:
        ids = enqueue(engine, core_jobs, [{"payload": str(i)} for i in range(5)], chunk_size=3)
        assert [(many, n) for _, many, n in seen] == [(True, 3), (True, 2)]
        assert seen[0][0].startswith("INSERT INTO eq_core_jobs (id, payload, size)")
        assert _count(engine, core_jobs) == 5 and len(ids) == 5
    finally:
        with engine.begin() as conn:
            conn.execute(core_jobs.delete())
        engine.dispose()


@pytest.mark.integration
@pytest.mark.parametrize("observed", [False, True])
def test_database_errors_are_sqlalchemy_errors(db_url: URL, observed: bool) -> None:
    engine = create_engine(db_url, poolclass=NullPool)
    missing = queue_table("eq_never_created", MetaData(), Column("payload", String(8)))
    if observed:
        event.listen(engine, "before_cursor_execute", lambda *args: None)
    try:
        with engine.connect() as conn:
            with pytest.raises(ProgrammingError, match="eq_never_created"):
                enqueue(conn, missing, [{"payload": "x"}])
            assert not conn.invalidated
            conn.rollback()
            assert conn.scalar(select(1)) == 1  # the connection is still usable
    finally:
        engine.dispose()


@pytest.mark.integration
def test_cli_enqueue_rows_leaves_missing_columns_to_the_server(db: Engine) -> None:
    """``q4m enqueue`` goes through enqueue(): a row without ``weight`` gets the server's
    default (it was once sent as NULL), and each batch is committed."""
    from sqlalchemy_q4m.ops import enqueue_rows
    from sqlalchemy_q4m.schema.reflect import reflect_queue_table

    with db.connect() as conn:
        table = reflect_queue_table(conn, "eq_shell_jobs")
        rows = [
            {"command": "a", "label_col": "l", "origin": "o", "serial": "s"},
            {"command": "b", "label_col": "l", "origin": "o", "serial": "s", "weight": 2},
        ]
        assert enqueue_rows(conn, table, rows, batch_size=1) == 2
        assert not conn.in_transaction()
    with db.connect() as conn:
        got = conn.execute(select(EqJob.command, EqJob.weight).order_by(EqJob.id)).all()
    assert got == [("a", 7), ("b", 2)]
