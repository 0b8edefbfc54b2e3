"""Q4M's SQL functions as typed constructs, and subscriptions: what they compile to, and what
is refused before anything reaches a server."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import BigInteger
from sqlalchemy import Boolean
from sqlalchemy import Column
from sqlalchemy import Date
from sqlalchemy import DateTime
from sqlalchemy import Engine
from sqlalchemy import Float
from sqlalchemy import Integer
from sqlalchemy import MetaData
from sqlalchemy import Numeric
from sqlalchemy import SmallInteger
from sqlalchemy import String
from sqlalchemy import Table
from sqlalchemy import Text
from sqlalchemy import and_
from sqlalchemy import bindparam
from sqlalchemy import cast
from sqlalchemy import create_engine
from sqlalchemy import func
from sqlalchemy import literal
from sqlalchemy import literal_column
from sqlalchemy import not_
from sqlalchemy import null
from sqlalchemy import or_
from sqlalchemy import select
from sqlalchemy import text
from sqlalchemy import true
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.orm import Mapped
from sqlalchemy.orm import mapped_column
from sqlalchemy.schema import CreateTable
from sqlalchemy.sql.elements import ColumnElement

from sqlalchemy_q4m import PriorityMixin
from sqlalchemy_q4m import QueueMixin
from sqlalchemy_q4m import RetryMixin
from sqlalchemy_q4m import queue_abort
from sqlalchemy_q4m import queue_compact
from sqlalchemy_q4m import queue_consumer
from sqlalchemy_q4m import queue_end
from sqlalchemy_q4m import queue_rowid
from sqlalchemy_q4m import queue_session
from sqlalchemy_q4m import queue_set_srcid
from sqlalchemy_q4m import queue_stats
from sqlalchemy_q4m import queue_table
from sqlalchemy_q4m import queue_wait
from sqlalchemy_q4m.asyncio import AsyncQueueConsumer
from sqlalchemy_q4m.backends.native import wait_arguments
from sqlalchemy_q4m.backends.portable import claim_statement
from sqlalchemy_q4m.exc import Q4MError
from sqlalchemy_q4m.exc import QueueTableError
from sqlalchemy_q4m.exc import SubscriptionError
from sqlalchemy_q4m.schema.ddl import queue_table_problems
from sqlalchemy_q4m.schema.functions import render_condition
from sqlalchemy_q4m.schema.functions import subscriptions
from sqlalchemy_q4m.schema.retry import due_condition
from sqlalchemy_q4m.schema.retry import retry_columns
from sqlalchemy_q4m.schema.retry import run_at_column

pytestmark = pytest.mark.unit


def dialect(name: str) -> Dialect:
    return create_engine(f"{name}+pymysql://").dialect


DIALECTS = ("mysql", "mariadb")


class Base(DeclarativeBase):
    pass


class ShellJob(QueueMixin, Base):
    __tablename__ = "fn_shell_jobs"
    command: Mapped[str] = mapped_column(Text)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    scheduled_at: Mapped[int] = mapped_column(BigInteger, default=0)
    urgent: Mapped[bool] = mapped_column(Boolean, default=False)
    tries: Mapped[int] = mapped_column(SmallInteger, default=0)
    weight: Mapped[float] = mapped_column(Float, default=0)
    cost: Mapped[Any] = mapped_column(Numeric(10, 2), default=0)
    created: Mapped[Any] = mapped_column(DateTime, nullable=True)
    name: Mapped[str] = mapped_column(String(20), default="")


class RubyJob(QueueMixin, Base):
    __tablename__ = "fn_ruby_jobs"
    script: Mapped[str] = mapped_column(Text)
    priority: Mapped[int] = mapped_column(Integer, default=0)


md = MetaData()
core_jobs = queue_table("fn_core_jobs", md, Column("n", Integer))
plain = Table("fn_plain", md, Column("id", Integer, primary_key=True), Column("n", Integer))
T: Table = ShellJob.__table__  # type: ignore[assignment]
S = ShellJob


# -- the functions ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", DIALECTS)
@pytest.mark.parametrize(
    ("construct", "sql", "params"),
    [
        (queue_wait("jobs", 5), "queue_wait(%s, %s)", ["jobs", 5]),
        (queue_wait("a", "b:(`p` > 1)", 3), "queue_wait(%s, %s, %s)", ["a", "b:(`p` > 1)", 3]),
        (queue_end(), "queue_end()", []),
        (queue_abort(), "queue_abort()", []),
        (queue_rowid(), "queue_rowid()", []),
        (queue_set_srcid(1, "w", 100), "queue_set_srcid(%s, %s, %s)", [1, "w", 100]),
        (queue_compact("jobs"), "queue_compact(%s)", ["jobs"]),
        (queue_stats("jobs"), "queue_stats(%s)", ["jobs"]),
    ],
)
def test_functions_compile(name: str, construct: Any, sql: str, params: list[Any]) -> None:
    """Each function is its own ``SELECT`` with bound arguments (rendered for the format
    paramstyle of the mysqlclient/PyMySQL drivers)."""
    d = dialect(name)
    d.paramstyle = "format"
    d.positional = True
    compiled = select(construct).compile(dialect=d)
    label = f"{type(construct).__name__}_1"
    assert str(compiled) == f"SELECT {sql} AS {label}"
    assert [compiled.params[key] for key in compiled.positiontup or ()] == params
    assert select(construct)._generate_cache_key() is not None  # inherit_cache is set


def test_functions_via_func_and_types() -> None:
    for name, cls, type_ in [
        ("queue_wait", queue_wait, Integer),
        ("queue_end", queue_end, Integer),
        ("queue_abort", queue_abort, Integer),
        ("queue_rowid", queue_rowid, BigInteger),
        ("queue_set_srcid", queue_set_srcid, Integer),
        ("queue_compact", queue_compact, Integer),
        ("queue_stats", queue_stats, Text),
    ]:
        made = getattr(func, name)()
        assert isinstance(made, cls)
        assert isinstance(made.type, type_)


def test_literal_rendering_quotes_the_subscription() -> None:
    stmt = select(queue_wait("jobs:(`priority` >= 5)", "o'ther", 1))
    out = str(stmt.compile(dialect=dialect("mysql"), compile_kwargs={"literal_binds": True}))
    assert out.startswith("SELECT queue_wait('jobs:(`priority` >= 5)', 'o")
    assert "'o'ther'" not in out  # the quote is escaped


# -- subscriptions: what compiles ------------------------------------------------------------


ACCEPTED: list[tuple[ColumnElement[Any], str]] = [
    (S.priority >= 5, "(`priority` >= 5)"),
    (
        (S.priority >= 5) & (S.scheduled_at <= 1764360000),
        "((`priority` >= 5) AND (`scheduled_at` <= 1764360000))",
    ),
    (or_(S.priority == 1, S.priority == 2), "((`priority` = 1) OR (`priority` = 2))"),
    (not_(S.priority > 1), "(`priority` <= 1)"),
    (S.priority != 3, "(`priority` != 3)"),
    ((S.priority + 1) * 2 > S.tries - 3, "((((`priority` + 1)) * 2) > (`tries` - 3))"),
    # floor division as MariaDB's FLOOR(a / b): Q4M's lower-case div truncates like C
    (S.priority // 2 > 1, "(((`priority` div 2) - ((`priority` % 2) < 0)) > 1)"),
    (S.priority // -2 > 1, "(((`priority` div -2) - ((`priority` % -2) > 0)) > 1)"),
    (S.priority // 0 > 1, "((`priority` div 0) > 1)"),
    (
        S.priority // S.tries > 1,
        "(((`priority` div `tries`) - (((`priority` % `tries`) != 0) * "
        "(((`priority` % `tries`) < 0) != (`tries` < 0)))) > 1)",
    ),
    (S.priority % 3 == 0, "((`priority` % 3) = 0)"),
    (S.priority.bitwise_and(4) != 0, "((`priority` & 4) != 0)"),
    (S.priority.bitwise_and(0) == 0, "((`priority` & 0) = 0)"),
    (-S.priority < 0, "(-(`priority`) < 0)"),
    (S.priority.is_(None), "`priority` IS NULL"),
    (S.priority == None, "`priority` IS NULL"),  # noqa: E711 - SQLAlchemy's IS NULL spelling
    (S.priority.is_not(None), "`priority` IS NOT NULL"),
    (S.urgent.is_(True), "`urgent` IS TRUE"),
    (S.urgent, "`urgent`"),
    (~S.urgent, "NOT (`urgent`)"),
    (S.urgent == True, "(`urgent` = 1)"),  # noqa: E712
    (S.priority.in_([1, 2, 3]), "(`priority` = 1 OR `priority` = 2 OR `priority` = 3)"),
    (S.priority.not_in([1, 2]), "(NOT (`priority` = 1 OR `priority` = 2))"),
    # where NULL and FALSE differ, AND is spelt with NOT and OR (Q4M: NULL AND 1 is 0)
    (
        ~and_(S.priority == 1, S.tries == 1),
        "NOT (((NOT (NOT ((`priority` = 1)) OR NOT ((`tries` = 1))))))",
    ),
    (
        and_(S.priority == 1, S.tries == 1).is_(None),
        "((NOT (NOT ((`priority` = 1)) OR NOT ((`tries` = 1))))) IS NULL",
    ),
    (
        or_(S.urgent, and_(S.priority == 1, S.tries == 1)),
        "(`urgent` OR ((`priority` = 1) AND (`tries` = 1)))",
    ),
    (~S.urgent == 0, "((NOT (`urgent`)) = 0)"),
    (S.priority > 0x10, "(`priority` > 16)"),
    (S.priority > -(2**63 - 1), f"(`priority` > {-(2**63 - 1)})"),
    (S.priority > bindparam("p", 7), "(`priority` > 7)"),
    (true(), "1"),
    (S.priority.is_(null()) == 1, "((`priority` IS NULL) = 1)"),
]


@pytest.mark.parametrize(("expr", "rendered"), ACCEPTED, ids=[r for _, r in ACCEPTED])
def test_integer_conditions_compile_to_q4m(expr: ColumnElement[Any], rendered: str) -> None:
    assert render_condition(expr, T) == rendered


def test_subscription_spec_strings() -> None:
    (sub,) = subscriptions([ShellJob], ShellJob.priority >= 5)
    assert sub.q4m_spec() == "fn_shell_jobs:(`priority` >= 5)"
    assert sub.is_orm and sub.table is T
    (plain_sub,) = subscriptions([core_jobs])
    assert plain_sub.q4m_spec() == "fn_core_jobs" and not plain_sub.is_orm
    elsewhere = queue_table("fn_elsewhere", MetaData(), Column("n", Integer), schema="other_db")
    (remote,) = subscriptions([elsewhere], elsewhere.c.n > 1)
    assert remote.q4m_spec() == "other_db.fn_elsewhere:(`n` > 1)"


def test_several_targets_and_where() -> None:
    subs = subscriptions([ShellJob, RubyJob], RubyJob.priority > 2)
    assert [s.q4m_spec() for s in subs] == ["fn_shell_jobs", "fn_ruby_jobs:(`priority` > 2)"]
    subs = subscriptions(
        [ShellJob, RubyJob], {ShellJob: ShellJob.priority > 1, RubyJob: RubyJob.priority < 9}
    )
    assert [s.q4m_spec() for s in subs] == [
        "fn_shell_jobs:(`priority` > 1)",
        "fn_ruby_jobs:(`priority` < 9)",
    ]
    assert wait_arguments(subs, 2.2) == [
        "fn_shell_jobs:(`priority` > 1)",
        "fn_ruby_jobs:(`priority` < 9)",
        3,
    ]
    subs = subscriptions([RubyJob, ShellJob], ShellJob.urgent)  # an ORM attribute as condition
    assert [s.q4m_spec() for s in subs] == ["fn_ruby_jobs", "fn_shell_jobs:`urgent`"]
    assert wait_arguments(subs, 3600)[-1] == 60
    assert wait_arguments(subs, 0)[-1] == 0


@pytest.mark.parametrize(
    ("targets", "where", "message"),
    [
        ([], None, "at least one"),
        ([ShellJob, ShellJob], None, "twice"),
        ([plain], None, "not a queue table"),
        ([object()], None, "neither a queue model"),
        ([ShellJob, RubyJob], (ShellJob.priority > 1) & (RubyJob.priority > 1), "several queues"),
        ([ShellJob, RubyJob], literal_column("1") == 1, "several queues"),
        ([ShellJob], {RubyJob: RubyJob.priority > 1}, "not subscribed"),
    ],
)
def test_bad_subscriptions(targets: list[Any], where: Any, message: str) -> None:
    with pytest.raises(SubscriptionError, match=message):
        subscriptions(targets, where)


# -- subscriptions: what is refused ----------------------------------------------------------

other = RubyJob.__table__

REJECTED: list[tuple[Any, str]] = [
    (S.name == "x", "column 'name' is VARCHAR"),
    (S.command == "x", "column 'command' is TEXT"),
    (S.weight > 1, "column 'weight' is FLOAT"),
    (S.cost > 1, "column 'cost' is NUMERIC"),
    (S.created.is_(None), "column 'created' is DATETIME"),
    (S.priority > 1.5, "literal 1.5"),
    (S.priority == "5", "literal '5'"),
    (S.priority == "1) OR (1=1", "literal"),
    (S.priority > 2**64, "not an integer between"),
    (S.priority > -(2**63), "not an integer between"),
    (S.priority / 2 > 1, "true division"),
    (S.priority.bitwise_or(1) > 0, "bitwise '\\|' is computed as UNSIGNED"),
    (S.priority.bitwise_xor(1) > 0, "bitwise '\\^'"),
    (S.priority.bitwise_lshift(2) > 1, "bitwise shift"),
    (S.priority.bitwise_rshift(2) > 1, "bitwise shift"),
    (S.priority.bitwise_not() < 0, "bitwise '~'"),
    (S.priority.bitwise_and(S.tries) != 0, "'&' of two columns"),
    (S.priority.bitwise_and(-1) != 0, "'&' of two columns"),
    (func.abs(S.priority) > 1, "cannot be expressed"),
    (func.pow(S.priority, 2) > 1, "cannot be expressed"),
    (cast(S.name, Integer) > 1, "cannot be expressed"),
    (S.priority > select(RubyJob.priority).scalar_subquery(), "cannot be expressed"),
    (S.priority.in_(select(RubyJob.priority)), "IN takes"),
    (S.priority.in_([]), "IN takes"),
    (RubyJob.priority > 1, "belongs to 'fn_ruby_jobs'"),
    (text("priority > 1"), "cannot be expressed"),
    (literal_column("priority") > 1, "belongs to 'no table'"),
    (literal("x") == S.priority, "literal 'x'"),
    (S.priority.between(1, 3), "between"),
    (S.priority.op("&")(4) != 0, "custom_op"),
    (S.priority > bindparam("p"), "has no value"),
    ("priority > 1", "must be a SQLAlchemy expression"),
    (None, "must be a SQLAlchemy expression"),
]


@pytest.mark.parametrize(("expr", "message"), REJECTED, ids=[str(i) for i in range(len(REJECTED))])
def test_conditions_q4m_cannot_express_are_refused(expr: Any, message: str) -> None:
    with pytest.raises(SubscriptionError, match="fn_shell_jobs") as err:
        render_condition(expr, T)
    assert err.match(message)


@pytest.fixture
def unreachable() -> Engine:
    """An engine that fails the test if anything tries to connect."""

    def connect() -> Any:
        raise AssertionError("a refused subscription reached the server")

    return create_engine("mysql+pymysql://", creator=connect)


@pytest.mark.parametrize("backend", ["native", "portable", None])
@pytest.mark.parametrize(("expr", "message"), REJECTED[:6] + REJECTED[9:11] + REJECTED[15:17])
def test_refused_before_reaching_the_server(
    unreachable: Engine, backend: Any, expr: Any, message: str
) -> None:
    with pytest.raises(SubscriptionError):
        queue_session(ShellJob, bind=unreachable, where=expr, backend=backend)


# -- names: validated and quoted, on both backends --------------------------------------------


@pytest.mark.parametrize("backend", ["native", "portable"])
@pytest.mark.parametrize(
    "make",
    [
        lambda: Table(
            "fn`; DROP TABLE x; --", MetaData(), Column("n", Integer), mysql_engine="QUEUE"
        ),
        lambda: Table("fn:n>0", MetaData(), Column("n", Integer), mysql_engine="QUEUE"),
        lambda: Table(
            "fn_jobs", MetaData(), Column("n", Integer), schema="db'; --", mysql_engine="QUEUE"
        ),
        lambda: Table("fn jobs", MetaData(), Column("n", Integer), mariadb_engine="QUEUE"),
    ],
    ids=["backquote", "colon", "schema", "space"],
)
def test_injection_in_table_names_is_refused(unreachable: Engine, backend: Any, make: Any) -> None:
    table = make()
    with pytest.raises(QueueTableError, match="invalid"):
        queue_session(table, bind=unreachable, backend=backend)


@pytest.mark.parametrize("backend", ["native", "portable"])
@pytest.mark.parametrize("column", ["n`) OR (1", "n n", "n'", "n:x", "n;"])
def test_injection_in_column_names_is_refused(
    unreachable: Engine, backend: Any, column: str
) -> None:
    table = Table(
        "fn_inj", MetaData(), Column("id", Integer), Column(column, Integer), mysql_engine="QUEUE"
    )
    with pytest.raises(SubscriptionError, match="invalid column name"):
        queue_session(table, bind=unreachable, where=table.c[column] > 1, backend=backend)


@pytest.mark.parametrize("name", DIALECTS)
def test_portable_claim_statement_quotes_names(name: str) -> None:
    """Reserved words are valid queue names: SQLAlchemy quotes them on the portable backend,
    and Q4M's condition takes backquoted columns."""
    table = queue_table("order", MetaData(), Column("select", Integer))
    (sub,) = subscriptions([table], table.c.select >= 5)
    assert sub.q4m_spec() == "order:(`select` >= 5)"
    sql = " ".join(str(claim_statement(sub).compile(dialect=dialect(name))).split())
    assert sql == (
        "SELECT `order`.id, `order`.`select` FROM `order` WHERE `order`.`select` >= "
        "%(select_1)s ORDER BY `order`.id LIMIT %(param_1)s FOR UPDATE SKIP LOCKED"
    )


@pytest.mark.parametrize("name", DIALECTS)
def test_portable_claim_statement_for_orm(name: str) -> None:
    (sub,) = subscriptions([ShellJob], ShellJob.priority >= 5)
    sql = " ".join(str(claim_statement(sub, limit=3).compile(dialect=dialect(name))).split())
    assert sql.startswith("SELECT fn_shell_jobs.id, fn_shell_jobs.command, ")
    assert sql.endswith(
        "FROM fn_shell_jobs WHERE fn_shell_jobs.priority >= %(priority_1)s "
        "ORDER BY fn_shell_jobs.id LIMIT %(param_1)s FOR UPDATE SKIP LOCKED"
    )


def test_bad_session_arguments(unreachable: Engine) -> None:
    with pytest.raises(Q4MError, match="bind"):
        queue_session(ShellJob, bind="mysql://")  # type: ignore[arg-type]
    with pytest.raises(Q4MError, match="timeout"):
        queue_session(ShellJob, bind=unreachable, timeout=-1)
    with pytest.raises(Q4MError, match="poll_interval"):
        queue_session(ShellJob, bind=unreachable, poll_interval=0)
    with pytest.raises(Q4MError, match="backend"):
        queue_session(ShellJob, bind=unreachable, backend="innodb")  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["sync", "asyncio"])
def test_bad_consumer_arguments(unreachable: Engine, kind: str) -> None:
    """``queue_consumer`` refuses what ``queue_session`` refuses, on both kinds of bind, and a
    take refuses a bad timeout or condition, before anything reaches the server."""
    bind: Any = unreachable
    if kind == "asyncio":

        async def connect() -> Any:
            raise AssertionError("a refused argument reached the server")

        bind = create_async_engine("mysql+aiomysql://", async_creator=connect)
        assert isinstance(queue_consumer(ShellJob, bind=bind), AsyncQueueConsumer)
    with pytest.raises(Q4MError, match="bind"):
        queue_consumer(ShellJob, bind="mysql://")  # type: ignore[call-overload]
    with pytest.raises(Q4MError, match="timeout"):
        queue_consumer(ShellJob, bind=bind, timeout=-1)
    with pytest.raises(Q4MError, match="poll_interval"):
        queue_consumer(ShellJob, bind=bind, poll_interval=0)
    with pytest.raises(Q4MError, match="backend"):
        queue_consumer(ShellJob, bind=bind, backend="innodb")
    expr, _ = REJECTED[0]
    with pytest.raises(SubscriptionError):
        queue_consumer(ShellJob, bind=bind, where=expr, backend="native")
    consumer = queue_consumer(ShellJob, bind=bind, backend="native")
    with pytest.raises(Q4MError, match="timeout"):
        consumer.take(timeout=-1)
    with pytest.raises(SubscriptionError):
        consumer.take(where=expr)


# -- Q4M matches condition columns by prefix ---------------------------------------------------


def test_a_condition_never_reads_a_column_its_name_is_a_prefix_of() -> None:
    md = MetaData()
    jobs = queue_table(
        "fn_prefixed",
        md,
        Column("nx", Integer),
        Column("N", Integer),
        Column("name", String(10)),  # not condition-capable: no shadow
        Column("m_at", Date),
        Column("m", Integer),
        Column("p", Integer),
        Column("px_later", Integer),
    )
    with pytest.raises(SubscriptionError, match=r"'N' reads 'nx'.*rename 'nx' \(or 'N'\)"):
        render_condition(jobs.c.N >= 5, jobs)
    with pytest.raises(SubscriptionError, match="'m' reads 'm_at'"):  # a DATE column counts
        render_condition(jobs.c.m == 1, jobs)
    # declared later in the model does not help: ALTER TABLE ADD COLUMN appends on the server
    with pytest.raises(SubscriptionError, match="'p' reads 'px_later'"):
        render_condition(jobs.c.p == 1, jobs)
    assert render_condition(jobs.c.nx >= 5, jobs) == "(`nx` >= 5)"


@pytest.mark.parametrize(
    ("mixins", "column"),
    [
        ((RetryMixin,), mapped_column("run_at_ms", BigInteger, default=0)),
        ((RetryMixin,), mapped_column("attempts2", Integer, default=0)),
        ((PriorityMixin,), mapped_column("priority_boost", Integer, default=0)),
        ((PriorityMixin,), mapped_column("Priority_Day", Date, nullable=True)),
    ],
)
def test_a_model_cannot_shadow_the_library_columns(mixins: tuple[type, ...], column: Any) -> None:
    class LocalBase(DeclarativeBase):
        pass

    name = column.column.name
    with pytest.raises(QueueTableError, match=f"column '{name}' shadows"):
        type("Shadowed", (QueueMixin, *mixins, LocalBase), {"__tablename__": "fn_sh", "x": column})


def test_core_tables_cannot_shadow_the_library_columns() -> None:
    with pytest.raises(QueueTableError, match="'run_at_ms' shadows 'run_at'"):
        queue_table("fn_sh1", MetaData(), Column("run_at_ms", BigInteger), *retry_columns())
    # a VARCHAR cannot be read by a condition: no shadow
    fine = queue_table("fn_sh2", MetaData(), Column("run_at_text", String(9)), *retry_columns())
    assert queue_table_problems(fine) == []
    # a table declared with mysql_engine="QUEUE" is checked when it is created
    plain_queue = Table(
        "fn_sh3",
        MetaData(),
        Column("run_at_ms", BigInteger),
        run_at_column(),
        mysql_engine="QUEUE",
    )
    assert queue_table_problems(plain_queue) == [
        "column 'run_at_ms' shadows 'run_at' in Q4M conditions (Q4M matches condition columns "
        "by prefix, so a condition on 'run_at' would read 'run_at_ms'): rename 'run_at_ms' so "
        "that it does not start with 'run_at'"
    ]
    with pytest.raises(QueueTableError, match="shadows 'run_at'"):
        str(CreateTable(plain_queue).compile(dialect=dialect("mariadb")))
    with pytest.raises(SubscriptionError, match="'run_at' reads 'run_at_ms'"):
        subscriptions([plain_queue], due_condition(plain_queue, now=100))
