"""A fake DBAPI module that answers like a MySQL 8.0 server with the Q4M engine.

It behaves as the "Observed answers" table of ``docs/q4m.md`` says, closely enough to drive the
real :func:`sqlalchemy_q4m.queue_session` through ``create_engine("mysql+pymysql://...",
module=FakeQ4M())`` and to check the native call sequence without a server:

* ``queue_wait('t1'[, 't2:cond' ...][, timeout])`` returns the 1-based index of the table a row
  came from, 0 on timeout (owner mode is entered all the same), NULL for an unknown or non-QUEUE
  table, a bad condition or a condition on a non-integer column; it blocks up to ``timeout``;
* the owner sees only its row (other queue tables look empty); others see unowned rows, and
  ``COUNT(*)`` counts every row;
* ``queue_wait`` while owning deletes the owned row first; ``queue_end()`` deletes it and leaves
  owner mode; ``queue_abort()`` returns it and is error 1123 when not in owner mode;
* a closed connection returns its row; COMMIT/ROLLBACK change nothing (no transactions);
* keys, indexes and AUTO_INCREMENT in ``CREATE TABLE ... ENGINE=QUEUE`` fail with 1069 / 1164.

Every statement is recorded in :attr:`FakeQ4M.log`; what the spec says a client must never do
(``queue_wait`` while owning, anything but leaving owner mode after a timeout) is recorded in
:attr:`FakeQ4M.violations`.
"""

from __future__ import annotations

import itertools
import re
import threading
import time
from dataclasses import dataclass
from dataclasses import field
from typing import Any


class Warning(Exception):
    pass


class Error(Exception):
    pass


class InterfaceError(Error):
    pass


class DatabaseError(Error):
    pass


class DataError(DatabaseError):
    pass


class OperationalError(DatabaseError):
    pass


class IntegrityError(DatabaseError):
    pass


class InternalError(DatabaseError):
    pass


class ProgrammingError(DatabaseError):
    pass


class NotSupportedError(DatabaseError):
    pass


_INT_TYPES = ("INT", "INTEGER", "BIGINT", "SMALLINT", "TINYINT", "MEDIUMINT", "BOOL", "BOOLEAN")
_NAME = r"`?([A-Za-z_][A-Za-z0-9_$]*)`?"


@dataclass
class Table:
    name: str
    columns: list[str]
    int_columns: set[str]
    queue: bool
    rows: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Entry:
    """One recorded call: which connection, what kind, and a short readable form."""

    conn: int
    kind: str
    text: str


class FakeQ4M:
    """The DBAPI "module" and the server behind it in one object (pass it as ``module=``)."""

    paramstyle = "format"
    apilevel = "2.0"
    threadsafety = 1
    Warning = Warning
    Error = Error
    InterfaceError = InterfaceError
    DatabaseError = DatabaseError
    DataError = DataError
    OperationalError = OperationalError
    IntegrityError = IntegrityError
    InternalError = InternalError
    ProgrammingError = ProgrammingError
    NotSupportedError = NotSupportedError
    Binary = bytes

    def __init__(self, version: str = "8.0.28", queue_engine: bool = True) -> None:
        self.version = version
        self.queue_engine = queue_engine
        self.tables: dict[str, Table] = {}
        self.log: list[Entry] = []
        self.violations: list[str] = []
        self.connections: dict[int, FakeConnection] = {}
        self.cond = threading.Condition()
        self._ids = itertools.count(1)
        self._seq = itertools.count(1)
        self._failures: list[tuple[str, Exception]] = []

    # -- DBAPI ------------------------------------------------------------------------------

    def connect(self, *args: Any, **kwargs: Any) -> FakeConnection:
        with self.cond:
            conn = FakeConnection(self, next(self._ids))
            self.connections[conn.id] = conn
            return conn

    # -- test helpers -----------------------------------------------------------------------

    def fail_next(self, kind: str, error: Exception) -> None:
        """Make the next statement of ``kind`` (e.g. ``"end"``) raise ``error``; a disconnect
        error (2006/2013) also closes that connection, as a dead link would."""
        with self.cond:
            self._failures.append((kind, error))

    def add_table(self, name: str, columns: dict[str, str], queue: bool = True) -> Table:
        """Create a table directly (``columns``: name -> SQL type)."""
        with self.cond:
            table = Table(
                name,
                list(columns),
                {c for c, t in columns.items() if t.upper().split("(")[0] in _INT_TYPES},
                queue,
            )
            self.tables[name] = table
            return table

    def put(self, table: str, **values: Any) -> None:
        """Insert one row as another client would."""
        with self.cond:
            self._insert(self.tables[table], values)

    def rows(self, table: str) -> list[dict[str, Any]]:
        """Every row of ``table`` (owned or not), as stored."""
        with self.cond:
            return [
                {k: v for k, v in r.items() if not k.startswith("_")}
                for r in self.tables[table].rows
            ]

    def owner_of(self, table: str) -> list[int | None]:
        with self.cond:
            return [r["_owner"] for r in self.tables[table].rows]

    def trace(self, conn: int | None = None, kinds: tuple[str, ...] = ()) -> list[str]:
        """The readable log, for one connection and/or some kinds only."""
        with self.cond:
            return [
                e.text
                for e in self.log
                if (conn is None or e.conn == conn) and (not kinds or e.kind in kinds)
            ]

    def waiters(self) -> list[int]:
        """Connections that called ``queue_wait``, in order of their first call."""
        with self.cond:
            return list(dict.fromkeys(e.conn for e in self.log if e.kind == "wait"))

    # -- the server -------------------------------------------------------------------------

    def _insert(self, table: Table, values: dict[str, Any]) -> None:
        row = {c: values.get(c) for c in table.columns}
        row["_seq"] = next(self._seq)
        row["_owner"] = None
        table.rows.append(row)
        self.cond.notify_all()

    def _record(self, conn: FakeConnection, kind: str, text: str) -> None:
        self.log.append(Entry(conn.id, kind, text))
        if (
            conn.owner_mode
            and conn.owned is None
            and kind not in ("end", "abort", "commit", "rollback", "close")
        ):
            self.violations.append(
                f"connection {conn.id}: {text} after a queue_wait timeout, before leaving "
                "owner mode"
            )
        for i, (fail_kind, error) in enumerate(self._failures):
            if fail_kind == kind:
                del self._failures[i]
                if isinstance(error, OperationalError) and error.args[0] in (2006, 2013):
                    conn._close_locked()
                raise error

    def _return_owned(self, conn: FakeConnection) -> None:
        if conn.owned is not None:
            conn.owned[1]["_owner"] = None
            self.cond.notify_all()
        conn.owned = None
        conn.owner_mode = False

    def _delete_owned(self, conn: FakeConnection) -> None:
        if conn.owned is not None:
            table, row = conn.owned
            table.rows.remove(row)
        conn.owned = None
        conn.owner_mode = False


class FakeConnection:
    def __init__(self, server: FakeQ4M, conn_id: int) -> None:
        self.server = server
        self.id = conn_id
        self.closed = False
        self.owner_mode = False
        self.owned: tuple[Table, dict[str, Any]] | None = None

    def cursor(self) -> FakeCursor:
        if self.closed:
            raise InterfaceError(0, "connection already closed")
        return FakeCursor(self)

    def commit(self) -> None:
        with self.server.cond:
            self._check_open()
            self.server._record(self, "commit", "COMMIT")

    def rollback(self) -> None:
        with self.server.cond:
            self._check_open()
            self.server._record(self, "rollback", "ROLLBACK")

    def close(self) -> None:
        with self.server.cond:
            if not self.closed:
                self.server.log.append(Entry(self.id, "close", "CLOSE"))
            self._close_locked()

    def _close_locked(self) -> None:
        self.server._return_owned(self)
        self.closed = True

    def ping(self, reconnect: bool = False) -> None:
        self._check_open()

    def character_set_name(self) -> str:
        return "utf8mb4"

    def _check_open(self) -> None:
        if self.closed:
            raise OperationalError(2006, "MySQL server has gone away")


class FakeCursor:
    def __init__(self, conn: FakeConnection) -> None:
        self.conn = conn
        self.server = conn.server
        self.description: list[tuple[Any, ...]] | None = None
        self.rowcount = -1
        self.lastrowid = 0
        self._rows: list[tuple[Any, ...]] = []

    # -- DBAPI ------------------------------------------------------------------------------

    def execute(self, statement: str, parameters: Any = None) -> int:
        params = tuple(parameters or ())
        with self.server.cond:
            self.conn._check_open()
            self._execute(" ".join(statement.split()), params)
        return self.rowcount

    def executemany(self, statement: str, seq: Any) -> int:
        total = 0
        for params in seq:
            total += self.execute(statement, params)
        self.rowcount = total
        return total

    def fetchone(self) -> tuple[Any, ...] | None:
        return self._rows.pop(0) if self._rows else None

    def fetchmany(self, size: int = 1) -> list[tuple[Any, ...]]:
        rows, self._rows = self._rows[:size], self._rows[size:]
        return rows

    def fetchall(self) -> list[tuple[Any, ...]]:
        rows, self._rows = self._rows, []
        return rows

    def close(self) -> None:
        self._rows = []

    # -- statements -------------------------------------------------------------------------

    def _result(self, names: list[str], rows: list[tuple[Any, ...]]) -> None:
        self.description = [(n, 253, None, None, None, None, True) for n in names]
        self._rows = rows
        self.rowcount = len(rows)

    def _execute(self, sql: str, params: tuple[Any, ...]) -> None:
        server, conn = self.server, self.conn
        self.description, self._rows, self.rowcount = None, [], 0
        upper = sql.upper()
        m = re.fullmatch(r"SELECT (queue_\w+)\((.*)\) AS (\w+)", sql, re.IGNORECASE)
        if m:
            name, label = m.group(1).lower(), m.group(3)
            args = _arguments(m.group(2), params)
            text = f"{name}({', '.join(repr(a) for a in args)})"
            value = self._function(name, args, text)
            self._result([label], [(value,)])
            return
        if "QUEUE_" in upper:
            server._record(conn, "other", sql)
            raise OperationalError(
                1123,
                "Can't initialize function 'queue_wait'; as of MySQL 5.6, the function cannot "
                "be used within a WHERE clause",
            )
        if upper.startswith("INSERT INTO"):
            self._insert(sql, params)
        elif upper.startswith("SELECT") and " FROM " in upper and "INFORMATION_SCHEMA" not in upper:
            self._select(sql)
        elif upper.startswith("CREATE TABLE"):
            self._create(sql)
        elif re.fullmatch(r"DELETE FROM " + _NAME, sql, re.IGNORECASE):
            self._delete(sql)
        elif upper.startswith(("UPDATE", "DELETE")):
            server._record(conn, "other", sql)
            m = re.match(r"(?:UPDATE|DELETE FROM) " + _NAME, sql, re.IGNORECASE)
            table = server.tables.get(m.group(1)) if m else None
            if table is not None and table.queue and upper.startswith("UPDATE"):
                raise OperationalError(
                    1031,
                    f"Storage engine QUEUE of the table `{table.name}` doesn't have this option",
                )
            raise ProgrammingError(1064, f"fake Q4M does not implement {sql!r}")
        else:
            self._admin(sql, upper)

    def _admin(self, sql: str, upper: str) -> None:
        """Connection set-up and dialect initialisation statements."""
        self.server._record(self.conn, "other", sql)
        if upper == "SELECT VERSION()":
            self._result(["VERSION()"], [(self.server.version,)])
        elif upper.startswith("SHOW VARIABLES LIKE"):
            name = re.search(r"'(\w+)'", sql)
            values = {
                "sql_mode": "ONLY_FULL_GROUP_BY,STRICT_TRANS_TABLES",
                "lower_case_table_names": "0",
            }
            key = name.group(1) if name else ""
            self._result(["Variable_name", "Value"], [(key, values[key])] if key in values else [])
        elif upper.startswith("SELECT @@"):
            label = sql[len("SELECT ") :]
            value = (
                "REPEATABLE-READ"
                if "ISOLATION" in upper
                else ("test" if "DATABASE" in upper else 0)
            )
            self._result([label], [(value,)])
        elif upper == "SELECT DATABASE()":
            self._result(["DATABASE()"], [("test",)])
        elif "INFORMATION_SCHEMA.ENGINES" in upper:
            rows = [("YES",)] if self.server.queue_engine else []
            self._result(["SUPPORT"], rows)
        elif upper.startswith(("SET ", "ROLLBACK", "COMMIT", "BEGIN", "START TRANSACTION")):
            pass
        elif upper.startswith("DESCRIBE"):
            m = re.match(r"DESCRIBE (?:`?\w+`?\.)?" + _NAME, sql, re.IGNORECASE)
            if not m or m.group(1) not in self.server.tables:
                raise ProgrammingError(1146, f"Table '{m.group(1) if m else sql}' doesn't exist")
            table = self.server.tables[m.group(1)]
            self._result(["Field"], [(c,) for c in table.columns])
        elif upper.startswith("DROP TABLE"):
            m = re.match(r"DROP TABLE (?:IF EXISTS )?" + _NAME, sql, re.IGNORECASE)
            if m:
                self.server.tables.pop(m.group(1), None)
        else:
            raise ProgrammingError(1064, f"fake Q4M does not implement {sql!r}")

    def _create(self, sql: str) -> None:
        self.server._record(self.conn, "other", sql)
        m = re.match(r"CREATE TABLE (?:IF NOT EXISTS )?" + _NAME + r" \((.*)\)\s*(.*)$", sql, re.I)
        if not m:
            raise ProgrammingError(1064, f"fake Q4M cannot parse {sql!r}")
        name, body, options = m.groups()
        queue = "ENGINE=QUEUE" in options.upper().replace(" ", "")
        columns: dict[str, str] = {}
        for part in _split(body):
            words = part.split()
            head = words[0].upper()
            if head in ("PRIMARY", "UNIQUE", "INDEX", "KEY", "CONSTRAINT", "FOREIGN", "CHECK"):
                if queue:
                    raise OperationalError(1069, "Too many keys specified; max 0 keys allowed")
                continue
            if queue and ("PRIMARY KEY" in part.upper() or "UNIQUE" in part.upper()):
                raise OperationalError(1069, "Too many keys specified; max 0 keys allowed")
            if queue and "AUTO_INCREMENT" in part.upper():
                raise OperationalError(
                    1164, "Storage engine QUEUE doesn't support AUTO_INCREMENT columns"
                )
            columns[words[0].strip("`")] = words[1]
        self.server.add_table(name, columns, queue)

    def _delete(self, sql: str) -> None:
        """``DELETE FROM t`` (no WHERE): removes the rows this connection can see."""
        m = re.fullmatch(r"DELETE FROM " + _NAME, sql, re.IGNORECASE)
        assert m is not None
        self.server._record(self.conn, "other", sql)
        table = self.server.tables.get(m.group(1))
        if table is None:
            raise ProgrammingError(1146, f"Table '{m.group(1)}' doesn't exist")
        gone = [r for r in table.rows if r["_owner"] in (None, self.conn.id)]
        table.rows = [r for r in table.rows if r not in gone]
        if self.conn.owned is not None and self.conn.owned[1] in gone:
            self.conn.owned = None
        self.rowcount = len(gone)

    def _insert(self, sql: str, params: tuple[Any, ...]) -> None:
        m = re.fullmatch(r"INSERT INTO " + _NAME + r" \((.*?)\) VALUES \((.*)\)", sql, re.I)
        if not m or m.group(1) not in self.server.tables:
            self.server._record(self.conn, "other", sql)
            raise ProgrammingError(1146, f"fake Q4M: no table for {sql!r}")
        table = self.server.tables[m.group(1)]
        self.server._record(self.conn, "insert", f"INSERT {table.name}")
        columns = [c.strip().strip("`") for c in m.group(2).split(",")]
        self.server._insert(table, dict(zip(columns, params, strict=True)))
        self.rowcount = 1

    def _select(self, sql: str) -> None:
        m = re.fullmatch(r"SELECT (.*?) FROM " + _NAME + r"(?: AS \w+)?", sql, re.I)
        if not m or m.group(2) not in self.server.tables:
            self.server._record(self.conn, "other", sql)
            raise ProgrammingError(1146, f"fake Q4M: cannot answer {sql!r}")
        table = self.server.tables[m.group(2)]
        self.server._record(self.conn, "select", f"SELECT {table.name}")
        items = [i.strip() for i in m.group(1).split(",")]
        conn = self.conn
        if table.queue and conn.owner_mode:
            visible = [conn.owned[1]] if conn.owned is not None and conn.owned[0] is table else []
        elif table.queue:
            visible = [r for r in table.rows if r["_owner"] is None]
        else:
            visible = list(table.rows)
        if len(items) == 1 and items[0].lower().startswith("count(*)"):
            counted = visible if conn.owner_mode else table.rows
            label = items[0].split()[-1]
            self._result([label], [(len(counted),)])
            return
        names, labels = [], []
        for item in items:
            parts = item.split()
            names.append(parts[0].split(".")[-1].strip("`"))
            labels.append(parts[-1].split(".")[-1].strip("`"))
        self._result(labels, [tuple(r[n] for n in names) for r in visible])

    def _function(self, name: str, args: list[Any], text: str) -> Any:
        server, conn = self.server, self.conn
        kind = {"queue_wait": "wait", "queue_end": "end", "queue_abort": "abort"}.get(name, name)
        if name == "queue_wait":
            if conn.owner_mode:  # recorded before _record's own check, which would say less
                server.violations.append(
                    f"connection {conn.id}: {text} while "
                    + ("owning a row (it is silently ended)" if conn.owned else "in owner mode")
                )
                conn.owner_mode = conn.owned is not None  # avoid a second, duplicate report
            server._record(conn, kind, text)
            return self._wait(args)
        server._record(conn, kind, text)
        if name == "queue_end":
            server._delete_owned(conn)
            return 1
        if name in ("queue_abort", "queue_rowid"):
            if not conn.owner_mode:
                raise OperationalError(
                    1123, f"Can't initialize function '{name}'; {name}(): not in owner mode"
                )
            if name == "queue_rowid":
                return conn.owned[1]["_seq"] if conn.owned else None
            server._return_owned(conn)
            return 1
        raise ProgrammingError(1305, f"FUNCTION {name} does not exist")

    def _wait(self, args: list[Any]) -> int | None:
        server, conn = self.server, self.conn
        timeout = 60
        specs = list(args)
        if len(args) >= 2:
            timeout = int(specs.pop())
        if conn.owned is not None:  # silently ends the owned row
            server._delete_owned(conn)
        conn.owner_mode = False
        subscribed: list[tuple[Table, Any]] = []
        for spec in specs:
            if not isinstance(spec, str):
                return None
            table_name, _, condition = spec.partition(":")
            table = server.tables.get(table_name.split(".")[-1])
            if table is None or not table.queue:
                return None
            test = _compile_condition(condition, table) if condition else (lambda row: True)
            if test is None:
                return None
            subscribed.append((table, test))
        deadline = time.monotonic() + timeout
        while True:
            for index, (table, test) in enumerate(subscribed, 1):
                for row in table.rows:
                    if row["_owner"] is None and test(row):
                        row["_owner"] = conn.id
                        conn.owner_mode, conn.owned = True, (table, row)
                        return index
            left = deadline - time.monotonic()
            if left <= 0 or conn.closed:
                conn.owner_mode, conn.owned = True, None
                return 0
            server.cond.wait(left)


def _split(body: str) -> list[str]:
    """Split a CREATE TABLE body on top-level commas."""
    parts, depth, current = [], 0, ""
    for char in body:
        if char == "," and depth == 0:
            parts.append(current.strip())
            current = ""
            continue
        depth += {"(": 1, ")": -1}.get(char, 0)
        current += char
    if current.strip():
        parts.append(current.strip())
    return parts


def _arguments(text: str, params: tuple[Any, ...]) -> list[Any]:
    values, it = [], iter(params)
    for raw in [a.strip() for a in text.split(",")] if text.strip() else []:
        if raw == "%s":
            values.append(next(it))
        elif raw.startswith("'") and raw.endswith("'"):
            values.append(raw[1:-1])
        else:
            values.append(int(raw))
    return values


_TOKEN = re.compile(
    r"\s*(?:(`[A-Za-z_][A-Za-z0-9_$]*`)|([A-Za-z_][A-Za-z0-9_$]*)|(\d+)|"
    r"(<=|>=|!=|<>|<<|>>|[=<>+\-*/%&|^~()]))"
)
_WORDS = {"AND": " and ", "OR": " or ", "NOT": " not ", "DIV": "//", "MOD": "%", "NULL": "None"}
_SYMBOLS = {"=": "==", "<>": "!="}
_IS = {
    ("NULL",): " is None",
    ("NOT", "NULL"): " is not None",
    ("TRUE",): " not in (0, None)",
    ("NOT", "TRUE"): " in (0, None)",
    ("FALSE",): " == 0",
    ("NOT", "FALSE"): " != 0",
}


def _compile_condition(condition: str, table: Table) -> Any:
    """Q4M's condition language as a Python predicate, or None where Q4M answers NULL."""
    tokens: list[tuple[str, str]] = []
    pos = 0
    while pos < len(condition):
        m = _TOKEN.match(condition, pos)
        if not m:
            return None if condition[pos:].strip() else _predicate(tokens, table)
        kind = ("quoted", "word", "int", "op")[m.lastindex - 1]  # type: ignore[operator]
        tokens.append((kind, m.group(m.lastindex)))  # type: ignore[arg-type]
        pos = m.end()
    return _predicate(tokens, table)


def _predicate(tokens: list[tuple[str, str]], table: Table) -> Any:
    out: list[str] = []
    i = 0
    while i < len(tokens):
        kind, value = tokens[i]
        if kind == "word" and value.upper() == "IS":
            rest = tuple(v.upper() for _, v in tokens[i + 1 : i + 3])
            for words, python in _IS.items():
                if rest[: len(words)] == words:
                    out.append(python)
                    i += 1 + len(words)
                    break
            else:
                return None
            continue
        if kind == "quoted" or (kind == "word" and value.upper() not in _WORDS):
            column = value.strip("`")
            if column not in table.int_columns:
                return None  # unknown or non-integer column: queue_wait returns NULL
            out.append(f"_c[{column!r}]")
        elif kind == "word":
            out.append(_WORDS[value.upper()])
        else:
            out.append(_SYMBOLS.get(value, value))
        i += 1
    source = " ".join(out)
    try:
        code = compile(source, "<q4m condition>", "eval")
    except SyntaxError:
        return None

    def test(row: dict[str, Any]) -> bool:
        try:
            return bool(eval(code, {"__builtins__": {}}, {"_c": row}))
        except (TypeError, ZeroDivisionError):
            return False

    return test
