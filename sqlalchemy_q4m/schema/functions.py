"""Q4M's SQL functions as typed SQLAlchemy constructs, and the subscription builder.

Each function is a :class:`~sqlalchemy.sql.functions.GenericFunction`, so both a direct
import and ``func.queue_wait(...)`` give the same typed construct::

    >>> print(select(queue_wait("shell_jobs", 5)).compile(dialect=mysql.dialect()))
    SELECT queue_wait(%s, %s) AS queue_wait_1

A :class:`Subscription` is one table to wait on, optionally with a condition.  Conditions are
SQLAlchemy expressions; :func:`render_condition` turns the integer subset Q4M understands into
its ``'table:expr'`` syntax and refuses everything else before it reaches the server.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field
from typing import Any

from sqlalchemy import BigInteger
from sqlalchemy import Boolean
from sqlalchemy import Integer
from sqlalchemy import Table
from sqlalchemy import Text
from sqlalchemy import inspect
from sqlalchemy.engine import Dialect
from sqlalchemy.sql import operators
from sqlalchemy.sql.elements import AsBoolean
from sqlalchemy.sql.elements import BinaryExpression
from sqlalchemy.sql.elements import BindParameter
from sqlalchemy.sql.elements import BooleanClauseList
from sqlalchemy.sql.elements import ClauseElement
from sqlalchemy.sql.elements import ClauseList
from sqlalchemy.sql.elements import ColumnClause
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.elements import False_
from sqlalchemy.sql.elements import Grouping
from sqlalchemy.sql.elements import Null
from sqlalchemy.sql.elements import True_
from sqlalchemy.sql.elements import UnaryExpression
from sqlalchemy.sql.functions import GenericFunction

from ..exc import QueueTableError
from ..exc import SubscriptionError
from .ddl import is_queue_table
from .ddl import shadowing_columns
from .ddl import validate_name

__all__ = [
    "Subscription",
    "queue_abort",
    "queue_compact",
    "queue_end",
    "queue_rowid",
    "queue_set_srcid",
    "queue_stats",
    "queue_wait",
    "render_condition",
    "subscriptions",
]


class queue_wait(GenericFunction[int]):
    """``queue_wait('t1'[, 't2:expr' ...], timeout)``: own one row; 1-based table index, 0 on
    timeout, NULL on error.  Renders ``queue_wait(%s, %s)`` with bound arguments."""

    type = Integer()
    inherit_cache = True


class queue_end(GenericFunction[int]):
    """``queue_end()``: delete the owned row (if any) and leave owner mode."""

    type = Integer()
    inherit_cache = True


class queue_abort(GenericFunction[int]):
    """``queue_abort()``: return the owned row to the queue and leave owner mode."""

    type = Integer()
    inherit_cache = True


class queue_rowid(GenericFunction[int]):
    """``queue_rowid()``: the owned row's id, rising per table."""

    type = BigInteger()
    inherit_cache = True


class queue_set_srcid(GenericFunction[int]):
    """``queue_set_srcid(source, mode, rowid)``: tag later INSERTs for loss-free relaying."""

    type = Integer()
    inherit_cache = True


class queue_compact(GenericFunction[int]):
    """``queue_compact('tbl')``: force compaction of a queue table's log."""

    type = Integer()
    inherit_cache = True


class UdfText(Text):
    """Text returned by a Q4M function: the server sends it in the binary character set, so
    drivers hand back ``bytes``; this decodes them (the counters are ASCII)."""

    def result_processor(self, dialect: Dialect, coltype: object) -> Callable[[Any], Any]:
        def process(value: Any) -> Any:
            return value.decode("utf-8") if isinstance(value, bytes) else value

        return process


class queue_stats(GenericFunction[str]):
    """``queue_stats('tbl')``: the table's counters as text, one ``name: value`` a line
    (rows_written, rows_removed, wait_immediate, ...)."""

    type = UdfText()
    inherit_cache = True


_BINARY_OPS: dict[Callable[..., Any], str] = {
    operators.eq: "=",
    operators.ne: "!=",
    operators.lt: "<",
    operators.le: "<=",
    operators.gt: ">",
    operators.ge: ">=",
    operators.add: "+",
    operators.sub: "-",
    operators.mul: "*",
    operators.mod: "%",
    operators.bitwise_and_op: "&",
    operators.and_: "AND",
    operators.or_: "OR",
}
_IS_OPS: dict[Callable[..., Any], str] = {operators.is_: "IS", operators.is_not: "IS NOT"}
#: What both backends cannot agree on, refused with the reason.  MariaDB computes bitwise
#: operators as UNSIGNED BIGINT and Q4M as signed C integers, so on negative values they
#: disagree (``-8 >> 1``, ``~7``, ``-1 | 0``); ``&`` with a non-negative mask is safe.
_UNSIGNED = (
    "bitwise {op} is computed as UNSIGNED BIGINT by MariaDB but signed by Q4M, so the two "
    "backends would disagree on negative values; test bits with "
    "col.bitwise_and(<non-negative mask>)"
)
_REFUSED: dict[Callable[..., Any], str] = {
    operators.truediv: "true division '/' does not exist in Q4M conditions; use '//' (floor "
    "division) or compare multiplied values",
    operators.bitwise_or_op: _UNSIGNED,
    operators.bitwise_xor_op: _UNSIGNED,
    operators.bitwise_lshift_op: _UNSIGNED,
    operators.bitwise_rshift_op: _UNSIGNED,
    operators.bitwise_not_op: _UNSIGNED,
}
_UNARY_OPS: dict[Callable[..., Any], str] = {operators.neg: "-", operators.inv: "NOT "}
#: Q4M parses a literal as an unsigned 64-bit number and negates it, so -2**63 is not one.
_INT_LIMIT = 2**63 - 1
_SAFE = re.compile(r"^[A-Za-z0-9_$`=!<>&|^~%+*() -]*$")


def _fail(table: Table, message: str) -> SubscriptionError:
    return SubscriptionError(f"subscription on {table.name!r}: {message}")


def _render(element: ClauseElement, table: Table, truth: bool = False) -> str:
    """Render ``element``; ``truth`` is True where only its truth matters (the whole
    condition, and AND/OR operands there), False where NULL and FALSE must stay apart."""
    if isinstance(element, Grouping):
        return "(" + _render(element.element, table, truth) + ")"  # type: ignore[arg-type]
    if isinstance(element, BooleanClauseList | ClauseList):
        op = _BINARY_OPS.get(element.operator) if element.operator else None
        if op not in ("AND", "OR"):
            raise _fail(table, f"unsupported list operator {element.operator!r}")
        parts = [_render(clause, table, truth) for clause in element.clauses]
        if not parts:
            raise _fail(table, "empty AND/OR")
        if op == "AND" and not truth:
            return _and_3vl(parts)
        return "(" + f" {op} ".join(parts) + ")"
    if isinstance(element, BinaryExpression):
        return _render_binary(element, table)
    if isinstance(element, AsBoolean):  # a Boolean column used as a condition, or its NOT
        inner = _render(element.element, table)
        return inner if element.operator is operators.is_true else _not(inner, truth)
    if isinstance(element, UnaryExpression):
        if element.operator in _REFUSED:
            raise _fail(table, _REFUSED[element.operator].format(op="'~'"))
        op = _UNARY_OPS.get(element.operator) if element.operator else None
        if op is None or element.modifier is not None:
            raise _fail(table, f"unsupported unary construct {element!s}")
        inner = _render(element.element, table)
        return _not(inner, truth) if op == "NOT " else f"{op}({inner})"
    if isinstance(element, BindParameter):
        if element.required:  # bindparam("x") without a value would silently become NULL
            raise _fail(table, f"parameter {element.key!r} has no value")
        return _render_value(element.effective_value, table)
    if isinstance(element, Null):
        return "NULL"
    if isinstance(element, True_):
        return "1"
    if isinstance(element, False_):
        return "0"
    if isinstance(element, ColumnClause):
        return _render_column(element, table)
    raise _fail(
        table,
        f"{type(element).__name__} ({element!s}) cannot be expressed: Q4M conditions take "
        "integer columns, integer literals, arithmetic and comparisons only",
    )


def _not(inner: str, truth: bool) -> str:
    # Q4M's grammar takes NOT only before a comparison, not as an operand: wrap it there.
    return f"NOT ({inner})" if truth else f"(NOT ({inner}))"


def _and_3vl(parts: list[str]) -> str:
    """``a AND b`` where its NULL matters: Q4M's AND answers 0 for ``NULL AND TRUE`` (SQL: NULL),
    so ``NOT (a AND b)`` would own rows MariaDB does not; NOT and OR follow SQL, so spell it
    ``NOT (NOT a OR NOT b)``."""
    return "(NOT (" + " OR ".join(f"NOT ({p})" for p in parts) + "))"


def _render_binary(element: BinaryExpression[Any], table: Table) -> str:
    operator = element.operator
    if operator in _IS_OPS:
        word = {Null: "NULL", True_: "TRUE", False_: "FALSE"}.get(type(element.right))
        if word is None:
            raise _fail(table, "IS / IS NOT takes only NULL, TRUE or FALSE")
        return f"{_render(element.left, table)} {_IS_OPS[operator]} {word}"
    if operator in (operators.in_op, operators.not_in_op):
        return _render_in(element, table)
    if operator in _REFUSED:
        symbol = {operators.bitwise_or_op: "'|'", operators.bitwise_xor_op: "'^'"}.get(
            operator, "shift"
        )
        raise _fail(table, _REFUSED[operator].format(op=symbol))
    op = "div" if operator is operators.floordiv else _BINARY_OPS.get(operator)
    if op is None:
        name = getattr(operator, "__name__", repr(operator))
        raise _fail(table, f"operator {name!r} is not available in Q4M conditions")
    left, right = _render(element.left, table), _render(element.right, table)
    if op == "div":
        return _floordiv(left, right, element.right)
    if operator is operators.bitwise_and_op and not (
        _non_negative_literal(element.left) or _non_negative_literal(element.right)
    ):
        raise _fail(table, _REFUSED[operators.bitwise_or_op].format(op="'&' of two columns"))
    return f"({left} {op} {right})"


def _non_negative_literal(element: Any) -> bool:
    value = element.effective_value if isinstance(element, BindParameter) else None
    return isinstance(value, int) and value >= 0


def _floordiv(left: str, right: str, divisor: Any) -> str:
    """``a // b`` as MariaDB computes it for the portable backend (``FLOOR(a / b)``), with
    Q4M's ``div`` (lower case: ``DIV`` is not Q4M syntax), which truncates like C: subtract 1
    when the remainder is non-zero and its sign differs from the divisor's."""
    base = f"({left} div {right})"
    value = divisor.effective_value if isinstance(divisor, BindParameter) else None
    if isinstance(value, int) and not isinstance(value, bool):
        if value == 0:
            return base  # NULL, as FLOOR(a / 0) is
        sign = "<" if value > 0 else ">"
        return f"({base} - (({left} % {right}) {sign} 0))"
    return f"({base} - ((({left} % {right}) != 0) * ((({left} % {right}) < 0) != ({right} < 0))))"


def _render_in(element: BinaryExpression[Any], table: Table) -> str:
    right = element.right
    values = right.effective_value if isinstance(right, BindParameter) else None
    if not isinstance(values, list | tuple) or not values:
        raise _fail(table, "IN takes a non-empty list of integers")
    left = _render(element.left, table)
    alternatives = "(" + " OR ".join(f"{left} = {_render_value(v, table)}" for v in values) + ")"
    if element.operator is operators.in_op:
        return alternatives
    return f"(NOT {alternatives})"  # NOT and OR keep SQL's NULLs on Q4M; AND does not


def _render_value(value: Any, table: Table) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int) and -_INT_LIMIT <= value <= _INT_LIMIT:
        return str(value)
    raise _fail(
        table,
        f"literal {value!r} is not an integer between -(2**63 - 1) and 2**63 - 1 (Q4M compares "
        "64-bit integers only)",
    )


def _render_column(column: ColumnClause[Any], table: Table) -> str:
    owner = getattr(column, "table", None)
    if owner is not table:
        where = getattr(owner, "name", None) or "no table"
        raise _fail(table, f"column {column.name!r} belongs to {where!r}, not to {table.name!r}")
    try:
        validate_name(column.name, "column")
    except QueueTableError as err:
        raise _fail(table, str(err)) from None
    if not isinstance(column.type, Integer | Boolean):
        raise _fail(
            table,
            f"column {column.name!r} is {column.type!s}: Q4M conditions can only test "
            "integer columns",
        )
    shadows = shadowing_columns(table, column.name)
    if shadows:
        others = ", ".join(repr(c.name) for c in shadows)
        raise _fail(
            table,
            f"Q4M matches condition columns by prefix: a condition on {column.name!r} reads "
            f"{others} instead wherever that column comes first in the server's table; rename "
            f"{others} (or {column.name!r}) so that neither name starts with the other",
        )
    return f"`{column.name}`"


def render_condition(condition: ColumnElement[Any], table: Table) -> str:
    """Render ``condition`` in Q4M's condition syntax, or raise :class:`SubscriptionError`.

    ``ShellJob.priority >= 5`` renders ``(`priority` >= 5)``; string or float columns,
    functions, subqueries and columns of other tables are refused.
    """
    condition = _as_clause(condition)
    if not isinstance(condition, ClauseElement):
        raise _fail(table, f"condition must be a SQLAlchemy expression, not {condition!r}")
    rendered = _render(condition, table, truth=True)
    if not _SAFE.match(rendered):  # defence in depth: nothing but the grammar above
        raise _fail(table, f"refusing unexpected characters in {rendered!r}")
    return rendered


def _as_clause(condition: Any) -> Any:
    """An ORM attribute (``where=Job.urgent``) as the column expression it stands for."""
    clause_element = getattr(condition, "__clause_element__", None)
    return clause_element() if callable(clause_element) else condition


def _table_of(target: Any) -> Table:
    if isinstance(target, Table):
        table: Any = target
    else:
        try:
            mapper = inspect(target)
        except Exception:  # anything not inspectable is simply not a target
            mapper = None
        table = getattr(mapper, "local_table", None)
        if not isinstance(table, Table):
            raise SubscriptionError(
                f"{target!r} is neither a queue model (QueueMixin) nor a queue Table"
            )
    if not is_queue_table(table):
        raise SubscriptionError(
            f"table {table.name!r} is not a queue table: declare it with QueueMixin, "
            'queue_table() or mysql_engine="QUEUE"'
        )
    validate_name(table.name)
    if table.schema is not None:
        validate_name(table.schema, "schema")
    result: Table = table
    return result


@dataclass(frozen=True)
class Subscription:
    """One queue table to wait on: the model or table it yields, and an optional condition."""

    target: Any
    table: Table
    where: ColumnElement[bool] | None = None
    condition: str | None = field(default=None)

    @property
    def is_orm(self) -> bool:
        return not isinstance(self.target, Table)

    @property
    def name(self) -> str:
        """``table`` or ``db.table`` as Q4M expects it."""
        if self.table.schema:
            return f"{self.table.schema}.{self.table.name}"
        return self.table.name

    def q4m_spec(self) -> str:
        """The ``queue_wait`` argument: ``'table'`` or ``'table:condition'``."""
        if self.condition is None:
            return self.name
        return f"{self.name}:{self.condition}"


def subscriptions(
    targets: Sequence[Any],
    where: ColumnElement[bool] | Mapping[Any, ColumnElement[bool]] | None = None,
) -> tuple[Subscription, ...]:
    """Build validated subscriptions, earlier targets first.

    ``where`` is one expression (for the single target, or for the one target whose columns
    it uses) or a mapping ``{target: expression}``.  The result is memoized per tuple of
    targets, and with ``where`` per identity of its expressions (SQLAlchemy expressions do
    not change once built): a worker calling ``queue_session(Job)`` once per job validates
    its subscriptions once, not once per job, and one whose table has ``run_at`` once per
    second (its condition, ``run_at <= now``, is rebuilt each second), so the statements made
    from them are compiled as rarely.
    """
    if where is None:
        exprs: tuple[Any, ...] = ()
        key: tuple[Any, ...] = tuple(targets)
    else:
        mapping = isinstance(where, Mapping)
        exprs = tuple(where.values()) if mapping else (where,)
        key = (*targets, _SEP, *(where if mapping else ()), _SEP, *map(id, exprs))
    try:
        cached = _MEMO.get(key)
    except TypeError:  # an unhashable target: never valid, let the checks below say why
        return _subscriptions(targets, where)
    if cached is not None and (not exprs or all(map(operator.is_, cached[0], exprs))):
        return cached[1]
    built = _subscriptions(targets, where)
    if built:
        if len(_MEMO) >= _MEMO_SIZE:
            _MEMO.clear()
        _MEMO[key] = (exprs, built)
    return built


#: :func:`subscriptions` by targets (classes and Tables: few), and with ``where`` by the ids of
#: its expressions too: each kept with those expressions, so that an id is not reused while
#: it is cached.
_MEMO: dict[tuple[Any, ...], tuple[tuple[Any, ...], tuple[Subscription, ...]]] = {}
_MEMO_SIZE = 256
_SEP = object()  # in a key: no target is this


def _subscriptions(
    targets: Sequence[Any],
    where: ColumnElement[bool] | Mapping[Any, ColumnElement[bool]] | None,
) -> tuple[Subscription, ...]:
    if not targets:
        raise SubscriptionError("queue_session needs at least one queue model or table")
    tables = [_table_of(t) for t in targets]
    if len({(t.schema, t.name) for t in tables}) != len(tables):
        raise SubscriptionError("the same queue table is subscribed twice")
    conditions: dict[int, ColumnElement[bool]] = {}
    if isinstance(where, Mapping):
        for key, expr in where.items():
            table = _table_of(key)
            if table not in tables:
                raise SubscriptionError(f"where names {table.name!r}, which is not subscribed")
            conditions[tables.index(table)] = _as_clause(expr)
    elif where is not None:
        single: ColumnElement[bool] = _as_clause(where)
        if len(tables) == 1:
            conditions[0] = single
        else:
            owners = {c.table for c in _columns_in(single) if getattr(c, "table", None) is not None}
            matches = [i for i, t in enumerate(tables) if t in owners]
            if len(matches) != 1 or len(owners) != 1:
                raise SubscriptionError(
                    "with several queues, pass where={Model: condition, ...} or a condition "
                    "on exactly one of them"
                )
            conditions[matches[0]] = single
    return tuple(
        Subscription(
            target=target,
            table=table,
            where=conditions.get(i),
            condition=render_condition(conditions[i], table) if i in conditions else None,
        )
        for i, (target, table) in enumerate(zip(targets, tables, strict=True))
    )


def _columns_in(expr: ClauseElement) -> list[ColumnClause[Any]]:
    from sqlalchemy.sql.visitors import iterate

    return [e for e in iterate(expr) if isinstance(e, ColumnClause)]
