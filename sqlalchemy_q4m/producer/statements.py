"""The ``INSERT`` of :func:`~sqlalchemy_q4m.enqueue`: compiled once per table, key set and
dialect (a :class:`Plan`), and each row made into the driver's parameters directly."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from collections.abc import Mapping
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

from sqlalchemy import Column
from sqlalchemy import Connection
from sqlalchemy import bindparam
from sqlalchemy import insert
from sqlalchemy.engine import Dialect

from ..backends.driver import DriverSQL
from ..backends.driver import dialect_cache
from ..exc import Q4MError
from ..exc import RowError
from ..types import new_job_id
from .rows import Group
from .rows import Shape

__all__ = ["Plan", "plan_for", "prepare", "send"]

# -- one compiled INSERT per table, column set and dialect -----------------------------------


class _RowContext:
    """What a context-taking column default sees: the row's parameters so far (column
    keys, values before bind processing), as SQLAlchemy's execution context offers them."""

    __slots__ = ("current_column", "current_parameters")

    def __init__(self) -> None:
        self.current_parameters: dict[str, Any] = {}
        self.current_column: Column[Any] | None = None

    def get_current_parameters(self, isolate_multiinsert_groups: bool = True) -> dict[str, Any]:
        return self.current_parameters


Processor = Callable[[Any], Any]
_Call = tuple[str, Column[Any], Callable[[Any], Any], Processor | None]


@dataclass(frozen=True)
class Plan:
    """The INSERT for one key set, and how a row becomes its parameters."""

    sql: DriverSQL
    renames: dict[str, str] | None  # row key -> column key, when some differ
    constants: dict[str, Any]  # column key -> default, bind-processed
    raw_constants: dict[str, Any]  # the same, as the Python values
    calls: tuple[_Call, ...]  # columns whose default is a callable
    processors: tuple[tuple[str, Processor], ...]  # given columns with a bind processor
    id_key: str  # column key of the job id
    id_bind: Processor | None
    run_at: tuple[str, Processor | None] | None  # column key of run_at, when delayed
    plain: bool  # the rows give every other column, as the driver takes them
    #: for a ``plain`` plan with positional parameters: where the id goes, and a row -> the
    #: tuple of its other values in statement order
    id_at: int = 0
    rest: Callable[[Mapping[str, Any]], tuple[Any, ...]] | None = None


def plan_for(shape: Shape, group: Group, delayed: bool, dialect: Dialect) -> Plan:
    per_dialect: dict[Any, Plan] = dialect_cache(dialect, "plans")
    cache_key = (shape, group.keys, delayed)
    plan = per_dialect.get(cache_key)
    if plan is None:
        if len(per_dialect) >= 1024:
            per_dialect.clear()
        plan = per_dialect[cache_key] = _build_plan(shape, group, delayed, dialect)
    return plan


#: Drivers whose ``pyformat`` also takes ``%s`` with a tuple: a tuple per row is cheaper to
#: build and cheaper for the driver to escape than a dict.
_FORMAT_TOO = frozenset({"pymysql", "mysqldb"})
_PARAM_TOKEN = re.compile(r"%%|%\((\w+)\)s")


def _positional(sql: DriverSQL, dialect: Dialect) -> DriverSQL:
    """``sql`` with ``%s`` placeholders and their order, when the driver takes them."""
    if sql.positions is not None or dialect.driver not in _FORMAT_TOO:
        return sql
    if dialect.paramstyle != "pyformat":  # pragma: no cover - those drivers' default
        return sql
    names: list[str] = []

    def placeholder(match: re.Match[str]) -> str:
        if match.group(1) is None:
            return match.group(0)  # a literal percent sign, escaped the same in both styles
        names.append(match.group(1))
        return "%s"

    text = _PARAM_TOKEN.sub(placeholder, sql.sql)
    return DriverSQL(text, tuple(names), sql.defaults)


def _bind_processor(column: Column[Any], dialect: Dialect) -> Processor | None:
    processor: Processor | None = column.type.dialect_impl(dialect).bind_processor(dialect)
    return processor


def _build_plan(shape: Shape, group: Group, delayed: bool, dialect: Dialect) -> Plan:
    table = shape.table
    given = {shape.columns[k] for k in group.keys}
    id_column = shape.columns[shape.id_key]
    run_at = shape.columns[shape.run_at] if delayed and shape.run_at is not None else None
    inserted = given | {id_column} | ({run_at} if run_at is not None else set())
    implied = {
        c: v
        for c in table.columns
        if (v := shape.defaults.get(c.key)) is not None and c not in given
    }
    values: dict[Any, Any] = {c: bindparam(c.key, None) for c in (*inserted, *implied)}
    sql = _positional(DriverSQL.compile(insert(table).values(values), dialect), dialect)
    names = set(sql.positions if sql.positions is not None else sql.defaults)
    raw_constants: dict[str, Any] = {}
    constants: dict[str, Any] = {}
    calls: list[_Call] = []
    for column in table.columns:
        if column.key not in names or column in inserted:
            continue
        processor = _bind_processor(column, dialect)
        default: Any = column.default
        if column in implied:
            value = implied[column]
        elif default is not None and default.is_callable:
            calls.append((column.key, column, default.arg, processor))
            continue
        elif default is not None and default.is_scalar:
            value = default.arg
        else:  # pragma: no cover - SQLAlchemy added a parameter we have no value for
            raise Q4MError(f"cannot enqueue into {table.name!r}: {column.name!r} has no value")
        raw_constants[column.key] = value
        constants[column.key] = value if processor is None else processor(value)
    renames = {k: shape.columns[k].key for k in group.keys if k != shape.columns[k].key}
    processors = tuple((c.key, p) for c in given if (p := _bind_processor(c, dialect)) is not None)
    plain = not (renames or constants or calls or processors or run_at is not None)
    id_at, rest = 0, None
    if plain and sql.positions is not None:
        id_at = sql.positions.index(id_column.key)
        rest = _picker(sql.positions[:id_at] + sql.positions[id_at + 1 :])
    return Plan(
        sql=sql,
        renames=renames or None,
        constants=constants,
        raw_constants=raw_constants,
        calls=tuple(calls),
        processors=processors,
        id_key=id_column.key,
        id_bind=_bind_processor(id_column, dialect),
        run_at=None if run_at is None else (run_at.key, _bind_processor(run_at, dialect)),
        plain=plain,
        id_at=id_at,
        rest=rest,
    )


# -- rows to parameters, and out ---------------------------------------------------------------


def send(
    conn: Connection,
    shape: Shape,
    groups: list[Group],
    run_at: int | None,
    chunk_size: int,
) -> list[uuid.UUID]:
    ids, chunks = prepare(conn.dialect, shape, groups, run_at, chunk_size)
    for plan, params in chunks:
        plan.sql.run_many(conn, params)
    return ids


def prepare(
    dialect: Dialect,
    shape: Shape,
    groups: list[Group],
    run_at: int | None,
    chunk_size: int,
) -> tuple[list[uuid.UUID], list[tuple[Plan, list[Any]]]]:
    """The new job ids and each chunk's plan and parameters: every row's parameters are
    made before anything is sent (a failing default sends nothing)."""
    ids: list[uuid.UUID] = []
    chunks: list[tuple[Plan, list[Any]]] = []
    for group in groups:
        plan = plan_for(shape, group, run_at is not None, dialect)
        rows = group.rows
        if len(rows) <= chunk_size:  # one chunk (one job per call, say): no copy of it
            chunks.append((plan, _params(plan, rows, run_at, ids, group.first)))
            continue
        for start in range(0, len(rows), chunk_size):
            chunk = rows[start : start + chunk_size]
            chunks.append((plan, _params(plan, chunk, run_at, ids, group.first + start)))
    return ids, chunks


def _params(
    plan: Plan,
    rows: list[Mapping[str, Any]],
    run_at: int | None,
    ids: list[uuid.UUID],
    first: int = 1,
) -> list[Any]:
    """The driver's parameters for ``rows`` (the first is row number ``first``), in the
    statement's paramstyle; the new job ids are appended to ``ids``.  A value a bind
    processor or a column default refuses is a :class:`RowError`."""
    if plan.rest is not None and run_at is None:
        return _plain_params(plan, plan.rest, rows, ids)
    positions = plan.sql.positions
    constants, raw_constants = plan.constants, plan.raw_constants
    if plan.run_at is not None:
        key, processor = plan.run_at
        constants = {**constants, key: run_at if processor is None else processor(run_at)}
        raw_constants = {**raw_constants, key: run_at}
    renames = plan.renames
    calls = plan.calls
    processors = plan.processors
    id_key = plan.id_key
    id_bind = plan.id_bind
    context = _RowContext() if calls else None
    new_id = new_job_id
    add_id = ids.append
    pick = None if positions is None else _picker(positions)
    out: list[Any] = []
    key = ""
    try:
        for row in rows:
            if renames is not None:
                row = {renames.get(k, k): v for k, v in row.items()}
            params = {**constants, **row}
            for key, processor in processors:
                params[key] = processor(params[key])
            if context is not None:
                raw = context.current_parameters = {**raw_constants, **row}
                for key, column, call, processor in calls:
                    context.current_column = column
                    value = raw[key] = call(context)
                    params[key] = value if processor is None else processor(value)
            job_id = new_id()
            add_id(job_id)
            params[id_key] = job_id if id_bind is None else id_bind(job_id)
            out.append(params if pick is None else pick(params))
    except Exception as err:
        raise RowError(
            f"{key!r}: {type(err).__name__}: {err}", row=first + len(out), column=key or None
        ) from err
    return out


def _plain_params(
    plan: Plan,
    rest: Callable[[Mapping[str, Any]], tuple[Any, ...]],
    rows: list[Mapping[str, Any]],
    ids: list[uuid.UUID],
) -> list[Any]:
    """:func:`_params` when each row gives every column but the id, as is: the common case,
    and the one that costs least (no dict per row)."""
    id_at = plan.id_at
    id_bind = plan.id_bind or _same
    new_id = new_job_id
    add_id = ids.append
    if len(rows) == 1:  # one job per call
        job_id = new_id()
        add_id(job_id)
        values = rest(rows[0])
        if id_at == 0:
            return [(id_bind(job_id), *values)]
        return [(*values[:id_at], id_bind(job_id), *values[id_at:])]
    out: list[tuple[Any, ...]] = []
    add = out.append
    if id_at == 0:
        for row in rows:
            job_id = new_id()
            add_id(job_id)
            add((id_bind(job_id), *rest(row)))
    else:
        for row in rows:
            job_id = new_id()
            add_id(job_id)
            values = rest(row)
            add((*values[:id_at], id_bind(job_id), *values[id_at:]))
    return out


def _same(value: Any) -> Any:
    return value


def _picker(names: tuple[str, ...]) -> Callable[[Mapping[str, Any]], tuple[Any, ...]]:
    """``params`` -> the tuple of its values at ``names``, in order."""
    if not names:
        return lambda params: ()
    if len(names) == 1:
        (name,) = names
        return lambda params: (params[name],)
    return itemgetter(*names)
