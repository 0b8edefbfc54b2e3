"""One contract for the real Q4M engine and its test double (``fake_q4m``).

Every behaviour the native backend relies on is asserted here at the DBAPI level, once against
the engine on ``Q4M_TEST_URL`` (marker ``native``) and once against :class:`fake_q4m.FakeQ4M`
(marker ``unit``), so the double cannot drift from the engine again.  The last part runs
``where=`` conditions through the library on both backends (Q4M and InnoDB SKIP LOCKED) and
checks that they own exactly the rows the condition asks for.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import uuid
from collections.abc import Callable
from collections.abc import Iterator
from dataclasses import dataclass
from dataclasses import field
from typing import Any

import pymysql
import pytest
from fake_q4m import FakeQ4M
from sqlalchemy import BigInteger
from sqlalchemy import Column
from sqlalchemy import Engine
from sqlalchemy import Integer
from sqlalchemy import MetaData
from sqlalchemy import Table
from sqlalchemy import and_
from sqlalchemy import create_engine
from sqlalchemy import delete
from sqlalchemy import func
from sqlalchemy import insert
from sqlalchemy import or_
from sqlalchemy import select
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.pool import NullPool
from sqlalchemy.sql.elements import ColumnElement

from sqlalchemy_q4m import queue_session
from sqlalchemy_q4m import queue_table
from sqlalchemy_q4m.exc import QueueTableError
from sqlalchemy_q4m.exc import SubscriptionError
from sqlalchemy_q4m.schema.retry import due_condition


@dataclass
class Server:
    """A DBAPI connection factory for the engine or the double, and its tables."""

    kind: str
    connect: Callable[[], Any]
    error: type[Exception]
    database: str
    tables: list[str] = field(default_factory=list)
    opened: list[Any] = field(default_factory=list)

    def open(self) -> Any:
        """A new connection, closed at the end of the test."""
        conn = self.connect()
        self.opened.append(conn)
        return conn

    def close_all(self) -> None:
        for conn in self.opened:
            with contextlib.suppress(Exception):  # already closed by the test
                conn.close()

    def table(self, columns: str, engine: str = "QUEUE") -> str:
        name = f"ct_{uuid.uuid4().hex[:10]}"
        conn = self.connect()
        try:
            run(conn, f"CREATE TABLE {name} ({columns}) ENGINE={engine}")
        finally:
            conn.close()
        self.tables.append(name)
        return name


def run(conn: Any, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    cur = conn.cursor()
    try:
        cur.execute(sql, args or None)
        return list(cur.fetchall())
    finally:
        cur.close()


def value(conn: Any, sql: str, *args: Any) -> Any:
    return run(conn, sql, *args)[0][0]


def error_code(server: Server, conn: Any, sql: str, *args: Any) -> int:
    with pytest.raises(server.error) as info:
        run(conn, sql, *args)
    code: int = info.value.args[0]
    return code


@pytest.fixture(
    params=[
        pytest.param("engine", marks=[pytest.mark.native, pytest.mark.integration]),
        pytest.param("double", marks=pytest.mark.unit),
    ]
)
def server(request: pytest.FixtureRequest) -> Iterator[Server]:
    if request.param == "double":
        fake = FakeQ4M()
        srv = Server("double", fake.connect, fake.Error, "test")
        yield srv
        srv.close_all()
        return
    url: URL = request.getfixturevalue("q4m_url")

    def connect() -> Any:
        return pymysql.connect(
            host=url.host or "127.0.0.1",
            port=url.port or 3306,
            user=url.username or "root",
            password=url.password or "",
            database=url.database,
        )

    srv = Server("engine", connect, pymysql.Error, url.database or "test")
    yield srv
    srv.close_all()  # an open transaction's metadata lock would block DROP TABLE
    conn = connect()
    try:
        for name in srv.tables:
            run(conn, f"DROP TABLE IF EXISTS {name}")
    finally:
        conn.close()


# -- tables --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("columns", "code"),
    [
        ("id INT PRIMARY KEY, n INT", 1069),
        ("id INT, n INT, INDEX (id)", 1069),
        ("id INT, n INT, UNIQUE (id)", 1069),
        ("id INT AUTO_INCREMENT, n INT", 1164),
    ],
)
def test_queue_tables_hold_no_keys(server: Server, columns: str, code: int) -> None:
    conn = server.open()
    name = f"ct_{uuid.uuid4().hex[:10]}"
    assert error_code(server, conn, f"CREATE TABLE {name} ({columns}) ENGINE=QUEUE") == code


def test_update_is_refused_and_rollback_keeps_queue_rows(server: Server) -> None:
    queue = server.table("n INT")
    inno = server.table("n INT", engine="InnoDB")
    conn, other = server.open(), server.open()
    run(conn, f"INSERT INTO {queue} (n) VALUES (%s)", 1)
    assert error_code(server, conn, f"UPDATE {queue} SET n = 2") == 1031
    run(conn, f"INSERT INTO {queue} (n) VALUES (%s)", 2)
    run(conn, f"INSERT INTO {inno} (n) VALUES (%s)", 2)
    conn.rollback()
    assert sorted(run(other, f"SELECT n FROM {queue}")) == [(1,), (2,)]  # no transactions
    assert run(other, f"SELECT n FROM {inno}") == []  # InnoDB on the same connection: undone
    run(conn, f"INSERT INTO {inno} (n) VALUES (%s)", 3)
    conn.commit()
    other.commit()  # a fresh snapshot for REPEATABLE READ
    assert run(other, f"SELECT n FROM {inno}") == [(3,)]


# -- functions -----------------------------------------------------------------------------


def test_functions_outside_owner_mode(server: Server) -> None:
    queue = server.table("n INT")
    conn = server.open()
    assert error_code(server, conn, "SELECT queue_abort()") == 1123
    assert error_code(server, conn, "SELECT queue_rowid()") == 1123
    assert error_code(server, conn, f"SELECT n FROM {queue} WHERE queue_wait('{queue}')") == 1123
    assert value(conn, "SELECT queue_end()") == 1  # harmless


def test_wait_answers(server: Server) -> None:
    first, second = server.table("n INT"), server.table("n INT")
    inno = server.table("n INT", engine="InnoDB")
    conn = server.open()
    assert value(conn, "SELECT queue_wait(%s, %s, %s)", first, second, 0) == 0
    run(conn, "SELECT queue_end()")
    run(conn, f"INSERT INTO {second} (n) VALUES (%s)", 2)
    assert value(conn, "SELECT queue_wait(%s, %s, %s)", first, second, 0) == 2
    run(conn, "SELECT queue_abort()")
    run(conn, f"INSERT INTO {first} (n) VALUES (%s)", 1)
    assert value(conn, "SELECT queue_wait(%s, %s, %s)", first, second, 0) == 1
    run(conn, "SELECT queue_abort()")
    assert value(conn, "SELECT queue_wait(%s)", first) == 1  # no timeout: the default one
    run(conn, "SELECT queue_abort()")
    assert value(conn, "SELECT queue_wait(%s, %s)", f"{server.database}.{first}", 0) == 1
    run(conn, "SELECT queue_abort()")
    for spec in ("ct_missing_table", inno, f"otherdb_{uuid.uuid4().hex[:6]}.{first}"):
        assert value(conn, "SELECT queue_wait(%s, %s)", spec, 0) is None, spec


def test_owner_mode_visibility(server: Server) -> None:
    queue, other_queue = server.table("n INT"), server.table("n INT")
    owner, other = server.open(), server.open()
    for n in (1, 2, 3):
        run(other, f"INSERT INTO {queue} (n) VALUES (%s)", n)
    run(other, f"INSERT INTO {other_queue} (n) VALUES (%s)", 9)
    assert value(owner, "SELECT queue_wait(%s, %s)", f"{queue}:`n` = 2", 0) == 1
    assert run(owner, f"SELECT n FROM {queue}") == [(2,)]
    assert value(owner, f"SELECT COUNT(*) FROM {queue}") == 1
    assert run(owner, f"SELECT n FROM {other_queue}") == []
    assert value(owner, f"SELECT COUNT(*) FROM {other_queue}") == 0
    assert sorted(run(other, f"SELECT n FROM {queue}")) == [(1,), (3,)]
    assert value(other, f"SELECT COUNT(*) FROM {queue}") == 3  # owned rows counted
    assert value(other, f"SELECT COUNT(*) FROM {queue} WHERE n = 2") == 0  # ... not with WHERE
    assert value(other, f"SELECT COUNT(*) FROM {queue} WHERE n > 0") == 2
    cur = other.cursor()
    cur.execute(f"DELETE FROM {queue} WHERE n = 2")  # not another connection's owned row
    assert cur.rowcount == 0
    run(owner, f"INSERT INTO {other_queue} (n) VALUES (%s)", 10)  # INSERT works while owning
    run(owner, "SELECT queue_end()")
    assert sorted(run(other, f"SELECT n FROM {queue}")) == [(1,), (3,)]
    assert sorted(run(other, f"SELECT n FROM {other_queue}")) == [(9,), (10,)]


@pytest.mark.parametrize("leave", ["queue_end", "queue_abort"])
def test_owner_delete_then_queue_end_removes_the_next_row(server: Server, leave: str) -> None:
    """The owner may DELETE its own row, but a queue_end() after that removes the row that
    follows it as well (an engine bug): a client must never DELETE the owned row."""
    queue = server.table("n INT")
    owner, other = server.open(), server.open()
    for n in (1, 2, 3):
        run(other, f"INSERT INTO {queue} (n) VALUES (%s)", n)
    assert value(owner, "SELECT queue_wait(%s, %s)", f"{queue}:`n` = 2", 0) == 1
    cur = owner.cursor()
    cur.execute(f"DELETE FROM {queue} WHERE n = 2")
    assert cur.rowcount == 1
    assert run(owner, f"SELECT n FROM {queue}") == []
    assert sorted(run(other, f"SELECT n FROM {queue}")) == [(1,), (3,)]
    assert value(owner, f"SELECT {leave}()") == 1
    left = [(1,)] if leave == "queue_end" else [(1,), (3,)]
    assert sorted(run(other, f"SELECT n FROM {queue}")) == left


def test_wait_while_owning_ends_the_row(server: Server) -> None:
    queue = server.table("n INT")
    conn, other = server.open(), server.open()
    for n in (1, 2):
        run(other, f"INSERT INTO {queue} (n) VALUES (%s)", n)
    assert value(conn, "SELECT queue_wait(%s, %s)", queue, 0) == 1
    assert run(conn, f"SELECT n FROM {queue}") == [(1,)]
    assert value(conn, "SELECT queue_wait(%s, %s)", queue, 0) == 1
    assert run(conn, f"SELECT n FROM {queue}") == [(2,)]
    run(conn, "SELECT queue_abort()")
    assert run(other, f"SELECT n FROM {queue}") == [(2,)]  # row 1 is gone


def test_timeout_enters_owner_mode(server: Server) -> None:
    queue = server.table("n INT")
    conn, other = server.open(), server.open()
    assert value(conn, "SELECT queue_wait(%s, %s)", f"{queue}:`n` > 5", 0) == 0
    run(other, f"INSERT INTO {queue} (n) VALUES (%s)", 1)
    assert value(conn, "SELECT queue_rowid()") is None  # owner mode, no row
    assert run(conn, f"SELECT n FROM {queue}") == []
    assert value(conn, "SELECT queue_abort()") == 1
    assert run(conn, f"SELECT n FROM {queue}") == [(1,)]
    assert error_code(server, conn, "SELECT queue_rowid()") == 1123


def test_disconnect_returns_the_row(server: Server) -> None:
    queue = server.table("n INT")
    conn, other = server.open(), server.open()
    run(other, f"INSERT INTO {queue} (n) VALUES (%s)", 1)
    assert value(conn, "SELECT queue_wait(%s, %s)", queue, 0) == 1
    assert value(other, "SELECT queue_wait(%s, %s)", queue, 0) == 0
    run(other, "SELECT queue_end()")
    conn.close()
    assert value(other, "SELECT queue_wait(%s, %s)", queue, 5) == 1
    assert run(other, f"SELECT n FROM {queue}") == [(1,)]


def test_rowid_stats_compact_and_srcid(server: Server) -> None:
    first, second = server.table("n INT"), server.table("n INT")
    conn, other = server.open(), server.open()
    for table in (first, second):
        for n in (1, 2):
            run(other, f"INSERT INTO {table} (n) VALUES (%s)", n)
    ids = []
    for table in (first, first, second):
        assert value(conn, "SELECT queue_wait(%s, %s)", table, 0) == 1
        ids.append(value(conn, "SELECT queue_rowid()"))
    run(conn, "SELECT queue_end()")
    assert ids[0] < ids[1] and ids[2] == ids[0]  # rises per table, from the same start
    stats = value(conn, "SELECT queue_stats(%s)", first)
    text = stats.decode() if isinstance(stats, bytes) else stats
    counters = dict(line.split(": ") for line in text.strip().splitlines())
    assert set(counters) == {
        "rows_written",
        "rows_removed",
        "wait_immediate",
        "wait_delayed",
        "wait_timeout",
        "restored_by_abort",
        "restored_by_close",
        "bytes_total",
        "bytes_removed",
    }
    assert counters["rows_written"] == "2"
    assert value(conn, "SELECT queue_compact(%s)", first) == 1
    assert value(conn, "SELECT queue_set_srcid(%s, %s, %s)", 1, "x", 100) is None
    assert value(conn, "SELECT queue_set_srcid(%s, %s, %s)", 64, "w", 100) is None
    relay = server.table("n INT")
    # mode 'a' drops a row whose id is not newer than the last from that source; 'w' resets
    for n, mode, rowid in [(1, "a", 101), (2, "a", 101), (3, "a", 102), (4, "w", 50), (5, "a", 50)]:
        assert value(conn, "SELECT queue_set_srcid(%s, %s, %s)", 1, mode, rowid) == 1
        cur = conn.cursor()
        assert cur.execute(f"INSERT INTO {relay} (n) VALUES (%s)", (n,)) == 1  # no error
    assert sorted(run(other, f"SELECT n FROM {relay}")) == [(1,), (3,), (4,)]


# -- conditions ----------------------------------------------------------------------------

#: (column declarations, rows, condition, the row owned first or None when none matches,
#: "NULL" when queue_wait answers NULL)
CONDITIONS: list[tuple[str, list[tuple[Any, ...]], str, Any]] = [
    # a backquoted name reads the first column it is a prefix of (here the earlier nx)
    ("nx INT, n INT", [(1, 9), (7, 1)], "`n` >= 5", (7, 1)),
    ("nx INT, n INT", [(1, 9), (7, 1)], "`N` >= 5", (7, 1)),
    ("n INT, nx INT", [(1, 9), (7, 1)], "`n` >= 5", (7, 1)),
    ("nx INT, n INT", [(1, 9), (7, 1)], "`nx` >= 5", (7, 1)),
    # a bare name reads exactly its column (the longest name the text starts with)
    ("nx INT, n INT", [(7, 1), (1, 9)], "n >= 5", (1, 9)),
    # only integer and DATE columns count: an earlier VARCHAR or DATETIME is skipped
    ("nx VARCHAR(5), n INT", [("a", 1), ("b", 7)], "`n` >= 5", ("b", 7)),
    ("nx DATETIME, n INT", [(None, 1), (None, 7)], "`n` >= 5", (None, 7)),
    ("nx DATE, n INT", [(None, 1), ("2020-01-02", 7)], "`n` > 0", ("2020-01-02", 7)),
    ("d DATE", [("2020-01-02",)], "`d` = 1034274", ("2020-01-02",)),
    ("s VARCHAR(5), n INT", [("a", 1)], "`s` IS NULL", "NULL"),
    ("t DATETIME, n INT", [(None, 1)], "`t` IS NULL", "NULL"),
    ("n INT", [(1,)], "`m` = 1", "NULL"),
    # operators
    ("n INT", [(-7,), (7,)], "(`n` % 2) = -1", (-7,)),
    ("n INT", [(-7,), (7,)], "(`n` mod 2) = -1", (-7,)),
    ("n INT", [(-7,), (7,)], "(`n` div 2) = -3", (-7,)),
    ("n INT", [(-7,)], "(`n` DIV 2) = -3", "NULL"),
    ("n INT", [(-7,)], "(`n` MOD 2) = -1", "NULL"),
    ("n INT", [(-7,)], "(`n` / 2) < 0", "NULL"),
    ("n INT", [(7,)], "(`n` div 0) IS NULL", (7,)),
    ("n INT", [(7,)], "(`n` % 0) IS NULL", (7,)),
    ("n INT", [(-7,)], "(`n` >> 1) = -4", (-7,)),
    ("n INT", [(7,)], "~(`n`) = -8", (7,)),
    ("n INT", [(3,), (17,)], "`n` = 0x11", (17,)),
    ("n INT", [(0,)], "`n` = 0", (0,)),
    ("n INT", [(1,)], "`n` > -9223372036854775807", (1,)),
    ("n INT", [(1,)], "`n` > -9223372036854775808", "NULL"),
    ("n INT", [(2,)], "`n` = 2 or `n` = 3", (2,)),
    ("n INT", [(2,)], "not `n` = 3", (2,)),
    ("n INT", [(2,)], "NOT (`n` = 3)", (2,)),
    # NULL: comparisons follow SQL; AND answers 0 (not NULL) for NULL AND TRUE
    ("n INT", [(None,), (4,)], "`n` != 5", (4,)),
    ("n INT", [(None,), (4,)], "NOT (`n` = 5)", (4,)),
    ("n INT", [(None,), (4,)], "`n` IS NULL", (None,)),
    ("x INT, y INT", [(1, None), (2, 2)], "NOT ((`x` = 1) AND (`y` = 1))", (1, None)),
    ("x INT, y INT", [(1, None)], "((`x` = 1) AND (`y` = 1)) IS NULL", None),
    ("x INT, y INT", [(1, None)], "((`x` = 1) OR (`y` = 1)) IS NOT NULL", (1, None)),
    ("x INT, y INT", [(2, None)], "((`x` = 1) OR (`y` = 1)) IS NULL", (2, None)),
    (
        "x INT, y INT",
        [(1, None), (2, 2)],
        "(NOT (NOT (`x` = 1) OR NOT (`y` = 1))) IS NULL",
        (1, None),
    ),
    ("x INT, y INT", [(1, None)], "(`x` = 1) XOR (`y` = 1)", None),
    ("b BOOL", [(0,), (1,)], "`b`", (1,)),
    ("b BOOL", [(0,), (1,)], "`b` IS FALSE", (0,)),
]


@pytest.mark.parametrize(("columns", "rows", "condition", "owned"), CONDITIONS)
def test_condition(
    server: Server, columns: str, rows: list[tuple[Any, ...]], condition: str, owned: Any
) -> None:
    queue = server.table(columns)
    names = [c.split()[0] for c in columns.split(", ")]
    conn, other = server.open(), server.open()
    for row in rows:
        marks = ", ".join(["%s"] * len(row))
        run(other, f"INSERT INTO {queue} ({', '.join(names)}) VALUES ({marks})", *row)
    got = value(conn, "SELECT queue_wait(%s, %s)", f"{queue}:{condition}", 0)
    if owned == "NULL":
        assert got is None
        return
    try:
        assert got == (0 if owned is None else 1)
        if owned is not None:
            (row,) = run(conn, f"SELECT {', '.join(names)} FROM {queue}")
            assert tuple(str(v) if isinstance(v, dt.date) else v for v in row) == owned
    finally:
        run(conn, "SELECT queue_abort()")


# -- where= through the library, on both backends -------------------------------------------

where_md = MetaData()
where_jobs = queue_table(
    f"ct_where_{uuid.uuid4().hex[:8]}",
    where_md,
    Column("tag", Integer, nullable=False),
    Column("x", Integer),
    Column("y", Integer),
)
X, Y = where_jobs.c.x, where_jobs.c.y
#: tag -> (x, y): negative values and NULLs, where C and SQL, Q4M and MariaDB could differ
ROWS = {1: (-7, 1), 2: (-6, None), 3: (-5, 0), 4: (None, 1), 5: (1, None), 6: (1, 1)}
ROWS |= {7: (4, 2), 8: (5, 3), 9: (7, -1)}

#: condition -> the tags SQL selects (checked against MariaDB itself as well)
WHERE: list[tuple[str, ColumnElement[bool], set[int]]] = [
    ("floordiv", X // 2 == -3, {2, 3}),  # FLOOR(-7 / 2) is -4; C's -7 div 2 is -3
    ("floordiv-ge", X // 2 >= 2, {7, 8, 9}),
    ("floordiv-negative", X // -2 == 3, {1, 2}),
    ("floordiv-column", X // Y == -7, {1, 9}),  # y = 0 or NULL: NULL
    ("mod", X % 2 == -1, {1, 3}),
    ("ne-null", X != 5, {1, 2, 3, 5, 6, 7, 9}),
    ("not-and-null", ~and_(X == 1, Y == 1), {1, 2, 3, 7, 8, 9}),  # NULL AND TRUE is NULL
    ("not-in", X.not_in([1, 5]), {1, 2, 3, 7, 9}),
    ("and-is-null", and_(X == 1, Y == 1).is_(None), {4, 5}),
    ("or-null", or_(X > 4, Y < 0), {8, 9}),
    ("arithmetic", X * 2 + Y > 5, {7, 8, 9}),
    ("mask", X.bitwise_and(4) != 0, {7, 8, 9}),
    ("is-null", X.is_(None), {4}),
    ("negated", ~(Y == 1), {3, 7, 8, 9}),
]


@pytest.fixture(scope="module")
def both_backends(q4m_url: URL, db_url: URL) -> Iterator[dict[str, Engine]]:
    engines = {
        "native": create_engine(q4m_url, poolclass=NullPool),
        "portable": create_engine(db_url, poolclass=NullPool),
    }
    for eng in engines.values():
        where_md.create_all(eng)
    yield engines
    for eng in engines.values():
        where_md.drop_all(eng)
        eng.dispose()


def refill(eng: Engine) -> None:
    with eng.begin() as conn:
        conn.execute(delete(where_jobs))
        conn.execute(insert(where_jobs), [{"tag": t, "x": x, "y": y} for t, (x, y) in ROWS.items()])


def claim_all(eng: Engine, backend: str, where: Any) -> set[int]:
    refill(eng)
    tags: set[int] = set()
    for _ in ROWS:
        with queue_session(where_jobs, where=where, bind=eng, timeout=0, backend=backend) as job:
            if job is None:
                break
            assert job.tag not in tags
            tags.add(job.tag)
    return tags


@pytest.mark.native
@pytest.mark.integration
@pytest.mark.parametrize(("where", "expected"), [w[1:] for w in WHERE], ids=[w[0] for w in WHERE])
def test_where_owns_the_same_rows_on_both_backends(
    both_backends: dict[str, Engine], where: ColumnElement[bool], expected: set[int]
) -> None:
    refill(both_backends["portable"])
    with both_backends["portable"].connect() as conn:  # the oracle: MariaDB's own WHERE
        assert set(conn.scalars(select(where_jobs.c.tag).where(where))) == expected
    assert claim_all(both_backends["portable"], "portable", where) == expected
    assert claim_all(both_backends["native"], "native", where) == expected


@pytest.fixture
def q4m(q4m_url: URL) -> Iterator[Engine]:
    eng = create_engine(q4m_url, poolclass=NullPool)
    yield eng
    eng.dispose()


def raw_queue_table(eng: Engine, columns: str) -> Table:
    """A QUEUE table made outside the library (or before this release), and its Table."""
    name = f"ct_raw_{uuid.uuid4().hex[:8]}"
    with eng.begin() as conn:
        conn.execute(text(f"CREATE TABLE {name} ({columns}) ENGINE=QUEUE"))
    return Table(name, MetaData(), autoload_with=eng, mysql_engine="QUEUE")


@pytest.mark.native
@pytest.mark.integration
@pytest.mark.parametrize(
    ("columns", "rows", "condition"),
    [
        ("nx INT, n INT", [(7, 1), (1, 9)], lambda t: t.c.n >= 5),
        ("priority_boost INT, priority INT", [(9, 1), (0, 7)], lambda t: t.c.priority >= 5),
        ("run_at_ms BIGINT, run_at BIGINT", [(2**42, 0)], lambda t: due_condition(t)),
    ],
    ids=["n-reads-nx", "priority-reads-priority_boost", "run_at-reads-run_at_ms"],
)
def test_a_prefix_shadowed_condition_is_refused_on_the_engine(
    q4m: Engine, columns: str, rows: list[tuple[int, int]], condition: Any
) -> None:
    """The engine resolves `n` to the earlier `nx`: without the check the session owned the
    row where nx >= 5 (and a worker's run_at <= now read run_at_ms, so due jobs never ran)."""
    table = raw_queue_table(q4m, columns)
    try:
        first, second = (c.name for c in table.columns)
        with q4m.begin() as conn:
            conn.execute(insert(table), [{first: a, second: b} for a, b in rows])
        with (
            pytest.raises(SubscriptionError, match=f"reads '{first}'"),
            queue_session(table, where=condition(table), bind=q4m, timeout=0) as job,
        ):
            pytest.fail(f"owned {job!r}")
        with q4m.connect() as conn:  # nothing was taken
            assert conn.scalar(select(func.count()).select_from(table)) == len(rows)
    finally:
        table.drop(q4m)


@pytest.mark.native
@pytest.mark.integration
def test_a_table_shadowing_a_library_column_is_not_created(q4m: Engine) -> None:
    md = MetaData()
    Table(
        f"ct_shadow_{uuid.uuid4().hex[:8]}",
        md,
        Column("run_at_ms", BigInteger),
        Column("run_at", BigInteger),
        mysql_engine="QUEUE",
    )
    with pytest.raises(QueueTableError, match="'run_at_ms' shadows 'run_at'"):
        md.create_all(q4m)
    with q4m.connect() as conn:
        assert not conn.dialect.has_table(conn, next(iter(md.tables)))
