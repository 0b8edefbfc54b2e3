"""A fake DBAPI module that answers like a MariaDB server with the Q4M engine.

It answers as the real engine does; ``tests/test_q4m_contract.py`` runs the same tests against
both, so the two cannot drift.  It is close enough to drive the real
:func:`sqlalchemy_q4m.queue_session` through ``create_engine("mysql+pymysql://...",
module=FakeQ4M())`` and to check the native call sequence without a server:

* ``queue_wait('t1'[, 't2:cond' ...][, timeout])`` returns the 1-based index of the table a row
  came from, 0 on timeout (owner mode is entered all the same), NULL for an unknown, non-QUEUE
  or other database's table (``'db.t'`` works for the current database ``test`` only), a bad
  condition or a condition on a column the engine cannot read; it blocks up to ``timeout``;
* conditions follow the engine's grammar and arithmetic (:class:`_Parser`): a backquoted column
  is matched by prefix, ``div``/``mod`` only in lower case, no ``/``, C's ``%`` and ``div``,
  SQL's NULLs except that ``NULL AND TRUE`` is 0; integer and DATE columns only;
* the owner sees only its row (other queue tables look empty); others see unowned rows, a plain
  ``COUNT(*)`` counts every row and one with ``WHERE`` only the unowned ones; the owner may
  ``DELETE`` its row (and a ``queue_end()`` after that removes the next row, as the engine does);
* ``queue_wait`` while owning deletes the owned row first; ``queue_end()`` deletes it and leaves
  owner mode; ``queue_abort()`` returns it and is error 1123 when not in owner mode;
* a closed connection returns its row; COMMIT/ROLLBACK act on non-QUEUE tables only;
* keys, indexes and AUTO_INCREMENT in ``CREATE TABLE ... ENGINE=QUEUE`` fail with 1069 / 1164,
  UPDATE with 1031; ``queue_rowid`` rises per table; ``queue_stats``, ``queue_compact`` and
  ``queue_set_srcid`` (``'a'`` drops a relayed row seen before, ``'w'`` resets) exist.

Every statement is recorded in :attr:`FakeQ4M.log`; what the spec says a client must never do
(``queue_wait`` while owning, anything but leaving owner mode after a timeout) is recorded in
:attr:`FakeQ4M.violations`.
"""

from __future__ import annotations

import datetime as dt
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
#: What a MariaDB Q4M table can test in a condition: integers and DATE (NEWDATE); DATETIME,
#: TIMESTAMP and TIME are MariaDB's new binary formats, which the engine cannot read.
_CONDITION_TYPES = (*_INT_TYPES, "DATE")
_NAME = r"`?([A-Za-z_][A-Za-z0-9_$]*)`?"


@dataclass
class Table:
    name: str
    columns: list[str]
    condition_columns: list[str]
    queue: bool
    rows: list[dict[str, Any]] = field(default_factory=list)
    rowids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    sources: dict[int, int] = field(default_factory=dict)
    stats: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(
            (
                "rows_written",
                "rows_removed",
                "wait_immediate",
                "wait_delayed",
                "wait_timeout",
                "restored_by_abort",
                "restored_by_close",
                "bytes_total",
                "bytes_removed",
            ),
            0,
        )
    )


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
                [c for c, t in columns.items() if t.upper().split("(")[0] in _CONDITION_TYPES],
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
        row["_seq"] = next(table.rowids) if table.queue else next(self._seq)
        row["_owner"] = None
        table.rows.append(row)
        table.stats["rows_written"] += 1
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

    def _return_owned(self, conn: FakeConnection, why: str = "abort") -> None:
        if conn.owned is not None:
            conn.owned[1]["_owner"] = None
            conn.owned[0].stats[f"restored_by_{why}"] += 1
            self.cond.notify_all()
        conn.owned = None
        conn.owner_mode = False

    def _delete_owned(self, conn: FakeConnection) -> None:
        if conn.owned is not None:
            table, row = conn.owned
            if row in table.rows:
                table.rows.remove(row)
            else:  # the owner DELETEd it: the engine's queue_end() removes the next row
                later = [r for r in table.rows if r["_seq"] > row["_seq"] and not r["_owner"]]
                if later:
                    table.rows.remove(later[0])
            table.stats["rows_removed"] += 1
        conn.owned = None
        conn.owner_mode = False


class FakeConnection:
    def __init__(self, server: FakeQ4M, conn_id: int) -> None:
        self.server = server
        self.id = conn_id
        self.closed = False
        self.owner_mode = False
        self.owned: tuple[Table, dict[str, Any]] | None = None
        self.autocommit_mode = False
        #: what ROLLBACK undoes on non-QUEUE tables: ("insert" | "delete", table, row)
        self.undo: list[tuple[str, Table, dict[str, Any]]] = []
        self.srcid: tuple[int, str, int] | None = None

    def autocommit(self, value: bool) -> None:
        self.autocommit_mode = bool(value)

    def get_autocommit(self) -> bool:
        return self.autocommit_mode

    def cursor(self) -> FakeCursor:
        if self.closed:
            raise InterfaceError(0, "connection already closed")
        return FakeCursor(self)

    def commit(self) -> None:
        with self.server.cond:
            self._check_open()
            self.server._record(self, "commit", "COMMIT")
            self.undo.clear()

    def rollback(self) -> None:
        with self.server.cond:
            self._check_open()
            self.server._record(self, "rollback", "ROLLBACK")
            self._rollback_locked()

    def _rollback_locked(self) -> None:
        """Undo this transaction's writes to non-QUEUE tables (QUEUE rows stay)."""
        for action, table, row in reversed(self.undo):
            if action == "insert" and row in table.rows:
                table.rows.remove(row)
            elif action == "delete":
                table.rows.append(row)
        self.undo.clear()

    def close(self) -> None:
        with self.server.cond:
            if not self.closed:
                self.server.log.append(Entry(self.id, "close", "CLOSE"))
            self._close_locked()

    def _close_locked(self) -> None:
        self._rollback_locked()
        self.server._return_owned(self, "close")
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
        if parameters is not None:
            statement = _interpolated(statement)
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
        m = re.fullmatch(r"SELECT (queue_\w+)\((.*)\)(?: AS (\w+))?", sql, re.IGNORECASE)
        if m:
            name, label = m.group(1).lower(), m.group(3) or sql[len("SELECT ") :]
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
        elif re.fullmatch(r"DELETE FROM " + _NAME + r"(?: WHERE .*)?", sql, re.IGNORECASE):
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
        elif upper.startswith("ROLLBACK"):
            self.conn._rollback_locked()
        elif upper.startswith(("COMMIT", "BEGIN", "START TRANSACTION")):
            self.conn.undo.clear()  # BEGIN commits what was open, as MySQL does
        elif upper.startswith("SET "):
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
        """``DELETE FROM t [WHERE col <op> n]``: removes the matching rows this connection
        sees (the owner its own row only; others never an owned row)."""
        m = re.fullmatch(r"DELETE FROM " + _NAME + r"(?: WHERE (.*))?", sql, re.IGNORECASE)
        assert m is not None
        self.server._record(self.conn, "other", sql)
        table = self.server.tables.get(m.group(1))
        if table is None:
            raise ProgrammingError(1146, f"Table '{m.group(1)}' doesn't exist")
        test = _sql_where(m.group(2)) if m.group(2) else (lambda row: True)
        gone = [r for r in self._visible(table) if test(r)]
        table.rows = [r for r in table.rows if not any(r is g for g in gone)]
        if table.queue:
            table.stats["rows_removed"] += len(gone)
        elif not self.conn.autocommit_mode:
            self.conn.undo.extend(("delete", table, r) for r in gone)
        self.rowcount = len(gone)

    def _visible(self, table: Table) -> list[dict[str, Any]]:
        conn = self.conn
        if table.queue and conn.owner_mode:
            owned = conn.owned[1] if conn.owned is not None and conn.owned[0] is table else None
            return [owned] if owned is not None and owned in table.rows else []
        if table.queue:
            return [r for r in table.rows if r["_owner"] is None]
        return list(table.rows)

    def _insert(self, sql: str, params: tuple[Any, ...]) -> None:
        m = re.fullmatch(r"INSERT INTO " + _NAME + r" \((.*?)\) VALUES \((.*)\)", sql, re.I)
        if not m or m.group(1) not in self.server.tables:
            self.server._record(self.conn, "other", sql)
            raise ProgrammingError(1146, f"fake Q4M: no table for {sql!r}")
        table = self.server.tables[m.group(1)]
        self.server._record(self.conn, "insert", f"INSERT {table.name}")
        columns = [c.strip().strip("`") for c in m.group(2).split(",")]
        if table.queue and self.conn.srcid is not None:
            source, mode, rowid = self.conn.srcid
            self.conn.srcid = None
            if mode == "a" and rowid <= table.sources.get(source, 0):
                self.rowcount = 1  # a relayed row seen before: dropped without a word
                return
            table.sources[source] = rowid
        self.server._insert(table, dict(zip(columns, params, strict=True)))
        if not table.queue and not self.conn.autocommit_mode:
            self.conn.undo.append(("insert", table, table.rows[-1]))
        self.rowcount = 1

    def _select(self, sql: str) -> None:
        m = re.fullmatch(r"SELECT (.*?) FROM " + _NAME + r"(?: AS \w+)?(?: WHERE (.*))?", sql, re.I)
        if not m or m.group(2) not in self.server.tables:
            self.server._record(self.conn, "other", sql)
            raise ProgrammingError(1146, f"fake Q4M: cannot answer {sql!r}")
        table = self.server.tables[m.group(2)]
        self.server._record(self.conn, "select", f"SELECT {table.name}")
        items = [i.strip() for i in m.group(1).split(",")]
        conn = self.conn
        visible = self._visible(table)
        if m.group(3):
            test = _sql_where(m.group(3))
            visible = [r for r in visible if test(r)]
        if len(items) == 1 and items[0].lower().startswith("count(*)"):
            # a plain COUNT(*) from a non-owner counts owned rows too; with WHERE it does not
            counted = visible if conn.owner_mode or m.group(3) else table.rows
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
        if name == "queue_compact":
            return 1 if len(args) == 1 and self._queue_table(args[0]) is not None else None
        if name == "queue_stats":
            table = self._queue_table(args[0]) if len(args) == 1 else None
            if table is None:
                return None
            return "".join(f"{k}: {v}\n" for k, v in table.stats.items()).encode()
        if name == "queue_set_srcid":
            source, mode, rowid = args
            if not (0 <= int(source) <= 63 and mode in ("a", "w")):
                return None
            conn.srcid = (int(source), mode, int(rowid))
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

    def _queue_table(self, spec: Any) -> Table | None:
        """``'table'`` or ``'db.table'`` (the current database ``test`` only), if a QUEUE table."""
        if not isinstance(spec, str):
            return None
        database, _, name = spec.rpartition(".")
        table = self.server.tables.get(name)
        if database not in ("", "test") or table is None or not table.queue:
            return None
        return table

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
            table = self._queue_table(table_name)
            if table is None:
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
    """A function call's arguments: ``%s`` placeholders (from ``params``), string literals
    (quoted as MariaDB reads them: ``''`` and backslash escapes) and integers."""
    values, it = [], iter(params)
    for m in re.finditer(r"\s*('(?:[^'\\]|''|\\.)*'|[^,]+?)\s*(?:,|$)", text):
        raw = m.group(1)
        if raw == "%s":
            values.append(next(it))
        elif raw.startswith("'"):
            values.append(re.sub(r"''|\\(.)", lambda e: e.group(1) or "'", raw[1:-1]))
        else:
            values.append(int(raw))
    return values


def _interpolated(statement: str) -> str:
    """What a pyformat driver sends when it is given parameters: ``%%`` becomes ``%``
    (placeholders are left for :func:`_arguments` and the statement parsers)."""
    return re.sub(r"%(%|s)", lambda m: "%" if m.group(1) == "%" else m.group(0), statement)


_INT_MIN, _INT_MAX = -(2**63), 2**63 - 1
_RESERVED = ("or", "xor", "and", "not", "is", "true", "false", "null", "div", "mod")


def _wrap(value: int) -> int:
    """A C ``long long``: two's complement, 64 bits."""
    return (value + 2**63) % 2**64 - 2**63


def _truthy(v: int | None) -> bool:
    return v is not None and v != 0


def _c_div(x: int, y: int) -> int:
    q = abs(x) // abs(y)
    return _wrap(q if (x < 0) == (y < 0) else -q)


def _binary(fn: Any) -> Any:
    """Q4M's ``binary_op``: NULL if either side is NULL."""
    return lambda x, y: None if x is None or y is None else fn(x, y)


_OPS: dict[str, Any] = {
    "=": _binary(lambda x, y: int(x == y)),
    "!=": _binary(lambda x, y: int(x != y)),
    "<": _binary(lambda x, y: int(x < y)),
    "<=": _binary(lambda x, y: int(x <= y)),
    ">": _binary(lambda x, y: int(x > y)),
    ">=": _binary(lambda x, y: int(x >= y)),
    "+": _binary(lambda x, y: _wrap(x + y)),
    "-": _binary(lambda x, y: _wrap(x - y)),
    "*": _binary(lambda x, y: _wrap(x * y)),
    "div": _binary(lambda x, y: None if y == 0 else _c_div(x, y)),
    "%": _binary(lambda x, y: None if y == 0 else _wrap(x - _c_div(x, y) * y)),
    "|": _binary(lambda x, y: _wrap(x | y)),
    "&": _binary(lambda x, y: _wrap(x & y)),
    "^": _binary(lambda x, y: _wrap(x ^ y)),
    "<<": _binary(lambda x, y: _wrap(x << (y & 63))),
    ">>": _binary(lambda x, y: x >> (y & 63)),
    "xor": _binary(lambda x, y: int((x == 0) ^ (y == 0))),
    # OR follows SQL; AND is NULL only when both sides are (NULL AND 1 is 0, not NULL)
    "or": lambda x, y: 1 if _truthy(x) or _truthy(y) else (None if None in (x, y) else 0),
    "and": lambda x, y: None if x is None and y is None else int(_truthy(x) and _truthy(y)),
    "pow": _binary(lambda x, y: _wrap(int(x**y)) if y >= 0 else 0),
}
_UNARY: dict[str, Any] = {
    "neg": lambda x: None if x is None else _wrap(-x),
    "inv": lambda x: None if x is None else _wrap(~x),
    "not": lambda x: None if x is None else int(x == 0),
    "is true": lambda x: int(_truthy(x)),
    "is not true": lambda x: int(not _truthy(x)),
    "is false": lambda x: int(x == 0),
    "is not false": lambda x: int(x != 0),
    "is null": lambda x: int(x is None),
    "is not null": lambda x: int(x is not None),
}


class _Parser:
    """Q4M's condition grammar (``queue_cond.cc``): a PEG over characters, keywords with no
    word boundary, ``div``/``mod`` in lower case only, no ``/``; a backquoted column is the
    first condition column whose first ``len(name)`` characters equal the name, case-
    insensitively; a bare one is the longest lower-case column name the text starts with,
    numbered among the non-reserved names only (as the engine's symbol table does)."""

    def __init__(self, text: str, columns: list[str]) -> None:
        self.text, self.columns, self.pos = text, columns, 0
        plain = [c for c in columns if c.lower() not in _RESERVED]
        self.idents = {name: columns[i] for i, name in enumerate(plain)}

    def parse(self) -> Any:
        node = self.or_expr()
        self.skip()
        return node if node is not None and self.pos == len(self.text) else None

    # -- lexing -----------------------------------------------------------------------------

    def skip(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def lit(self, word: str, lower: bool = False) -> bool:
        self.skip()
        chunk = self.text[self.pos : self.pos + len(word)]
        if (chunk.lower() if lower else chunk) == word:
            self.pos += len(word)
            return True
        return False

    def attempt(self, fn: Any) -> Any:
        saved = self.pos
        result = fn()
        if result is None:
            self.pos = saved
        return result

    # -- grammar ----------------------------------------------------------------------------

    def chain(self, sub: Any, ops: list[tuple[str, bool, str]]) -> Any:
        left = sub()
        if left is None:
            return None
        while True:
            for word, lower, op in ops:
                saved = self.pos
                if self.lit(word, lower):
                    right = sub()
                    if right is not None:
                        left = ("bin", op, left, right)
                        break
                self.pos = saved
            else:
                return left

    def or_expr(self) -> Any:
        return self.chain(self.xor_expr, [("||", False, "or"), ("or", True, "or")])

    def xor_expr(self) -> Any:
        return self.chain(self.and_expr, [("xor", True, "xor")])

    def and_expr(self) -> Any:
        return self.chain(self.not_expr, [("&&", False, "and"), ("and", True, "and")])

    def not_expr(self) -> Any:
        def negated() -> Any:
            if not self.lit("not", True):
                return None
            inner = self.rel_expr()
            return None if inner is None else ("un", "not", inner)

        return self.attempt(negated) or self.attempt(self.rel_expr)

    def rel_expr(self) -> Any:
        left = self.bitor_expr()
        if left is None:
            return None
        while True:
            saved = self.pos
            for op in ("=", "!=", "<=", "<", ">=", ">"):
                if self.lit(op):
                    right = self.bitor_expr()
                    if right is not None:
                        left = ("bin", op, left, right)
                        break
                self.pos = saved
            else:
                test = self.is_test()
                if test is None:
                    self.pos = saved
                    return left
                left = ("un", test, left)

    def is_test(self) -> str | None:
        if not self.lit("is", True):
            return None
        negate = " not" if self.lit("not", True) else ""
        for word in ("true", "false", "null"):
            if self.lit(word, True):
                return f"is{negate} {word}"
        return None

    def bitor_expr(self) -> Any:
        return self.chain(self.bitand_expr, [("|", False, "|")])

    def bitand_expr(self) -> Any:
        return self.chain(self.shift_expr, [("&", False, "&")])

    def shift_expr(self) -> Any:
        return self.chain(self.add_expr, [("<<", False, "<<"), (">>", False, ">>")])

    def add_expr(self) -> Any:
        return self.chain(self.mul_expr, [("+", False, "+"), ("-", False, "-")])

    def mul_expr(self) -> Any:
        ops = [("*", False, "*"), ("div", False, "div"), ("%", False, "%"), ("mod", False, "%")]
        return self.chain(self.bitxor_expr, ops)

    def bitxor_expr(self) -> Any:
        return self.chain(self.unary_expr, [("^", False, "^")])

    def number(self, prefix: str, digits: str, base: int, most: int) -> Any:
        if prefix and not self.lit(prefix):
            return None
        self.skip()
        start = self.pos
        while (
            self.pos < len(self.text)
            and self.text[self.pos].lower() in digits
            and self.pos - start < most
        ):
            self.pos += 1
        if self.pos == start or int(self.text[start : self.pos], base) > _INT_MAX:
            return None
        return ("const", int(self.text[start : self.pos], base))

    def unary_expr(self) -> Any:
        hexdigits, octal, decimal = "0123456789abcdef", "01234567", "0123456789"
        alternatives = [
            lambda: self.number("0x", hexdigits, 16, 16),
            lambda: self.number("0", octal, 8, 22),
            lambda: self.number("", decimal, 10, 19),
            lambda: self.prefixed("-", "neg"),
            lambda: self.prefixed("~", "inv"),
            self.parenthesised,
            self.power,
            lambda: ("const", None) if self.lit("null", True) else None,
            self.quoted,
            self.ident,
        ]
        for alternative in alternatives:
            node = self.attempt(alternative)
            if node is not None:
                return node
        return None

    def prefixed(self, sign: str, op: str) -> Any:
        if not self.lit(sign):
            return None
        inner = self.unary_expr()
        return None if inner is None else ("un", op, inner)

    def parenthesised(self) -> Any:
        if not self.lit("("):
            return None
        inner = self.or_expr()
        return inner if inner is not None and self.lit(")") else None

    def power(self) -> Any:
        if not self.lit("pow("):
            return None
        base = self.or_expr()
        if base is None or not self.lit(","):
            return None
        exponent = self.or_expr()
        return ("bin", "pow", base, exponent) if exponent is not None and self.lit(")") else None

    def quoted(self) -> Any:
        if not self.lit("`"):
            return None
        end = self.text.find("`", self.pos)
        if end < 0:
            return None
        name, self.pos = self.text[self.pos : end], end + 1
        for column in self.columns:
            if column[: len(name)].lower() == name.lower():
                return ("col", column)
        raise _BadCondition(name)  # the engine flags the whole condition as an error

    def ident(self) -> Any:
        self.skip()
        rest = self.text[self.pos :].lower()
        matches = [n for n in self.idents if rest.startswith(n)]
        if not matches:
            return None
        name = max(matches, key=len)
        self.pos += len(name)
        return ("col", self.idents[name])


class _BadCondition(Exception):
    pass


def _evaluate(node: Any, row: dict[str, Any]) -> int | None:
    kind = node[0]
    if kind == "const":
        return node[1]  # type: ignore[no-any-return]
    if kind == "col":
        return row[node[1]]  # type: ignore[no-any-return]
    if kind == "un":
        return _UNARY[node[1]](_evaluate(node[2], row))  # type: ignore[no-any-return]
    return _OPS[node[1]](_evaluate(node[2], row), _evaluate(node[3], row))  # type: ignore[no-any-return]


def _compile_condition(condition: str, table: Table) -> Any:
    """Q4M's condition language as a predicate on a row, or None where Q4M answers NULL."""
    try:
        node = _Parser(condition, table.condition_columns).parse()
    except _BadCondition:
        return None
    if node is None:
        return None
    return lambda row: _truthy(_evaluate(node, {c: _cond_value(row[c]) for c in row}))


def _cond_value(value: Any) -> Any:
    """What the engine reads: integers as they are, a DATE as MariaDB packs it."""
    if isinstance(value, str) and re.fullmatch(r"\d{4}-\d\d-\d\d", value):
        value = dt.date.fromisoformat(value)
    if isinstance(value, dt.date):
        return value.year * 512 + value.month * 32 + value.day
    if isinstance(value, bool):
        return int(value)
    return value


_SQL_WHERE = re.compile(r"\s*`?([A-Za-z_][A-Za-z0-9_$]*)`?\s*(=|!=|<>|<=|>=|<|>)\s*(-?\d+)\s*$")


def _sql_where(where: str) -> Any:
    """The ``WHERE col <op> integer`` a test may use, with SQL's NULL (never true)."""
    m = _SQL_WHERE.match(where)
    if not m:
        raise ProgrammingError(1064, f"fake Q4M does not implement WHERE {where!r}")
    column, op, value = m.group(1), {"<>": "!="}.get(m.group(2), m.group(2)), int(m.group(3))
    return lambda row: _truthy(_OPS[op](row.get(column), value))
