"""What a queue target accepts, for :func:`~sqlalchemy_q4m.enqueue`: its shape (row key ->
column, the job id and ``run_at`` columns), rows as mappings cut into groups of one key set,
every value checked against its column and every large row against ``max_allowed_packet``
before anything is sent."""

from __future__ import annotations

from collections.abc import Iterable
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field
from operator import itemgetter
from typing import Any

from sqlalchemy import Column
from sqlalchemy import Connection
from sqlalchemy import Table
from sqlalchemy import inspect
from sqlalchemy import literal_column
from sqlalchemy import select
from sqlalchemy.orm import Mapper
from sqlalchemy.orm.attributes import instance_state

from ..exc import Q4MError
from ..exc import RowError
from ..schema.checks import ColumnCheck
from ..schema.checks import column_check
from ..schema.checks import max_bytes
from ..schema.ddl import JOB_ID_INFO_KEY
from ..schema.retry import RUN_AT

__all__ = ["Group", "Shape", "check_sizes", "group_rows", "shape_for"]

# -- what a target accepts ---------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Shape:
    """What rows of one target may hold: row key -> column, and the special columns."""

    table: Table
    mapper: Mapper[Any] | None
    columns: dict[str, Column[Any]]  # by row key (attribute name or column name)
    id_key: str  # the row key of the job id column
    run_at: str | None  # the row key of run_at, when the table has one
    defaults: dict[str, Any]  # column key -> value the mapper implies (polymorphic identity)
    checks: dict[str, ColumnCheck | None]  # by row key: how its values are checked
    sized: frozenset[str]  # row keys whose values may be large (long text, blobs, unknown)
    #: key sets (and whether delayed) that passed :func:`_check_keys`: checked once each
    valid_keys: set[tuple[frozenset[str], bool]] = field(default_factory=set)


_SHAPES: dict[Any, Shape] = {}


def shape_for(target: Any, table: Table) -> Shape:
    shape = _SHAPES.get(target)
    if shape is not None and shape.table is table:
        return shape
    mapper: Mapper[Any] | None = None
    defaults: dict[str, Any] = {}
    if isinstance(target, Table):
        columns: dict[str, Column[Any]] = {c.name: c for c in table.columns}
    else:
        mapper = inspect(target)
        assert mapper is not None
        if mapper.persist_selectable is not table:
            raise Q4MError(f"{mapper.class_.__name__} is mapped to more than its queue table")
        columns = {}
        for prop in mapper.column_attrs:
            column = prop.columns[0]
            if len(prop.columns) == 1 and isinstance(column, Column) and column.table is table:
                columns[prop.key] = column
        identity = mapper.polymorphic_identity
        on = mapper.polymorphic_on
        if identity is not None and isinstance(on, Column) and on.table is table:
            defaults[on.key] = identity
    ids = [k for k, c in columns.items() if c.info.get(JOB_ID_INFO_KEY)]
    if len(ids) != 1:
        raise Q4MError(f"queue table {table.name!r} has no job id column made by the library")
    run_at = next((k for k, c in columns.items() if c.name == RUN_AT), None)
    checks = {k: column_check(c) for k, c in columns.items()}
    sized = frozenset(k for k, c in columns.items() if _may_be_large(c))
    shape = Shape(table, mapper, columns, ids[0], run_at, defaults, checks, sized)
    if len(_SHAPES) >= 256:
        _SHAPES.clear()
    _SHAPES[target] = shape
    return shape


def _may_be_large(column: Column[Any]) -> bool:
    """Whether one value of ``column`` may approach a server's ``max_allowed_packet``:
    MEDIUMTEXT, LONGBLOB and the like, and types this library does not know."""
    limit = max_bytes(column.type)
    return limit > _LARGE if limit is not None else column_check(column) is None


# -- rows to groups of one key set -----------------------------------------------------------


@dataclass
class Group:
    """Consecutive rows giving the same keys: one compiled INSERT serves them all."""

    keys: frozenset[str]
    first: int  # 1-based number of its first row, for error messages
    rows: list[Mapping[str, Any]]
    large: dict[int, int] | None = None  # row index -> bytes, for rows of more than _LARGE


def group_rows(shape: Shape, rows: Iterable[Any], delayed: bool) -> list[Group]:
    """Rows as mappings, validated and cut where their key set changes (row order kept)."""
    if type(rows) is list and len(rows) == 1:
        return [_one_group(shape, rows[0], delayed)]
    groups: list[Group] = []
    current: list[Mapping[str, Any]] = []
    keys: Any = None
    model = shape.mapper.class_ if shape.mapper is not None else None
    for number, row in enumerate(rows, 1):
        if row.__class__ is not dict and not isinstance(row, Mapping):
            if model is None or not isinstance(row, model):
                what = f"a {model.__name__} or a mapping" if model is not None else "a mapping"
                raise Q4MError(f"row {number}: a job is {what}, not {row!r:.60}")
            row = _instance_values(shape, row)
        if keys is None or row.keys() != keys:
            if groups:
                _check_values(shape, groups[-1])
            keys = frozenset(row.keys())
            if (keys, delayed) not in shape.valid_keys:  # refused sets raise: never kept
                _check_keys(shape, keys, number, delayed)
                if len(shape.valid_keys) < 64:
                    shape.valid_keys.add((keys, delayed))
            current = []
            groups.append(Group(keys, number, current))
        current.append(row)
    if groups:
        _check_values(shape, groups[-1])
    return groups


def _one_group(shape: Shape, row: Any, delayed: bool) -> Group:
    """:func:`group_rows` of one row (one job per call: the common case), with the same
    checks and errors in fewer steps."""
    if row.__class__ is not dict and not isinstance(row, Mapping):
        model = shape.mapper.class_ if shape.mapper is not None else None
        if model is None or not isinstance(row, model):
            what = f"a {model.__name__} or a mapping" if model is not None else "a mapping"
            raise Q4MError(f"row 1: a job is {what}, not {row!r:.60}")
        row = _instance_values(shape, row)
    keys = frozenset(row.keys())
    if (keys, delayed) not in shape.valid_keys:
        _check_keys(shape, keys, 1, delayed)
        if len(shape.valid_keys) < 64:
            shape.valid_keys.add((keys, delayed))
    group = Group(keys, 1, [row])
    checks = shape.checks
    sized = shape.sized
    for key in keys:  # what ColumnCheck.check tries first, on one value
        check = checks[key]
        if check is None and key not in sized:
            continue
        value = row[key]
        if (
            check is None
            or key in sized
            or check.fast is None
            or type(value) not in check.plain
            or not check.fast([value])
        ):
            _check_values(shape, group)  # a value to convert, refuse or measure: all of it
            break
    return group


def _instance_values(shape: Shape, obj: Any) -> dict[str, Any]:
    state = instance_state(obj).dict
    return {key: state[key] for key in shape.columns if key in state}


def _check_keys(shape: Shape, keys: frozenset[str], number: int, delayed: bool) -> None:
    unknown = sorted(k for k in keys if k not in shape.columns)
    if unknown:
        raise RowError(
            f"{shape.table.name!r} has no column {', '.join(map(repr, unknown))}",
            row=number,
            column=unknown[0],
        )
    if shape.id_key in keys:
        raise RowError(
            f"{shape.id_key!r} is the job id, made by the library", row=number, column=shape.id_key
        )
    if delayed and shape.run_at in keys:
        raise RowError(f"give {shape.run_at!r} or delay, not both", row=number, column=RUN_AT)
    given = {shape.columns[k] for k in keys}
    table = shape.table
    for column in table.columns:
        if column in given or column.default is not None or column.server_default is not None:
            continue
        if column.nullable or column.info.get(JOB_ID_INFO_KEY) or column.key in shape.defaults:
            continue
        if column is table.autoincrement_column or (delayed and column.name == RUN_AT):
            continue
        raise RowError(
            f"no value for {column.name!r}, which is NOT NULL without a default",
            row=number,
            column=column.name,
        )


def _check_values(shape: Shape, group: Group) -> None:
    """Every value of ``group`` against its column (first bad row wins); values a column
    takes in another form (``"42"`` for an integer) are replaced in copies of their rows."""
    rows = group.rows
    bad: tuple[int, str, str] | None = None
    changes: list[tuple[str, dict[int, Any]]] = []
    for key in group.keys:
        values = list(map(itemgetter(key), rows))
        check = shape.checks[key]
        if check is not None:
            result = check.check(values)
            if isinstance(result, tuple):
                if bad is None or result[0] < bad[0]:
                    bad = (result[0], result[1], shape.columns[key].name)
                continue
            if result:
                changes.append((key, result))
        if key in shape.sized:
            _note_large(group, values)
    if bad is not None:
        index, reason, name = bad
        raise RowError(reason, row=group.first + index, column=name)
    copies: dict[int, dict[str, Any]] = {}
    for key, changed in changes:
        for index, value in changed.items():
            copy = copies.get(index)
            if copy is None:
                copy = copies[index] = dict(rows[index])
                rows[index] = copy
            copy[key] = value


#: Rows whose text and bytes exceed this many bytes are measured against the server's
#: ``max_allowed_packet`` (at least 1 MiB on MariaDB and MySQL; 16 MiB or 64 MiB by default).
_LARGE = 512 * 1024


def _note_large(group: Group, values: list[Any]) -> None:
    for index, value in enumerate(values):
        if value.__class__ in (str, bytes, bytearray) and len(value) > _LARGE // 4:
            size = len(value.encode("utf-8", "replace")) if isinstance(value, str) else len(value)
            if group.large is None:
                group.large = {}
            group.large[index] = group.large.get(index, 0) + size


def check_sizes(conn: Connection, groups: list[Group]) -> None:
    """A row the server would refuse as too large (it drops the connection: "server has gone
    away") is a :class:`RowError` naming ``max_allowed_packet``, before anything is sent."""
    large = [(g.first + i, size) for g in groups if g.large for i, size in g.large.items()]
    large = [(number, size) for number, size in large if size > _LARGE]
    if not large:
        return
    limit = _max_allowed_packet(conn)
    for number, size in sorted(large):
        if size + _STATEMENT_SLACK > limit:
            raise RowError(
                f"about {size} bytes, more than the server's max_allowed_packet "
                f"({limit} bytes): send less per job, or raise max_allowed_packet",
                row=number,
            )


#: Bytes of a one-row INSERT besides its values (the statement text, quoting, escapes).
_STATEMENT_SLACK = 4096


def _max_allowed_packet(conn: Connection) -> int:
    value = conn.info.get("q4m_max_allowed_packet")
    if value is None:
        value = conn.info["q4m_max_allowed_packet"] = int(
            conn.scalar(select(literal_column("@@max_allowed_packet"))) or 0
        )
    return int(value)
