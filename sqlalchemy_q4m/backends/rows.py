"""Driver rows made what a query would return, for :mod:`~sqlalchemy_q4m.backends.loading`:
each column's result processor applied (:class:`RowConverter`), a row one fails on kept
aside as an :class:`Unloadable` (the worker buries it instead of failing every claim of the
queue's head), and a Core table's Rows built from the converted values (:func:`core_rows`).
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Column
from sqlalchemy import Table
from sqlalchemy.engine import Dialect
from sqlalchemy.engine.result import IteratorResult
from sqlalchemy.engine.result import SimpleResultMetaData

from ..exc import UnloadableJob
from .driver import Fetched

__all__ = ["Key", "RowConverter", "Unloadable", "core_rows", "row_metadata"]

Key = tuple[Any, ...]  # the job's primary key as the driver sends it (after bind processing)


@dataclass
class Unloadable:
    """A claimed (or, on Q4M, owned) row that cannot be loaded as a job: a result processor
    failed on it.  It holds the row as the driver returned it, so the worker can move it to
    the dead letters and remove it; :class:`~sqlalchemy_q4m.consumer.session.QueueSession` and
    :func:`~sqlalchemy_q4m.queue_batch` raise :class:`~sqlalchemy_q4m.exc.UnloadableJob`."""

    table: Table
    values: dict[str, Any]
    key: Key
    error: BaseException
    details: str

    def exception(self) -> UnloadableJob:
        return UnloadableJob(
            f"a row of {self.table.name!r} cannot be loaded ({type(self.error).__name__}: "
            f"{self.error}); its values as read: {self.values!r}"
        )


class RowConverter:
    """Driver rows of a loader's columns made what a query would return: each column's
    result processor applied, a row one fails on kept aside as :class:`Unloadable`."""

    def __init__(
        self, table: Table, columns: Sequence[Any], key_at: Sequence[int], dialect: Dialect
    ) -> None:
        self.table, self.columns, self.key_at, self.dialect = table, columns, key_at, dialect
        #: (column index, result processor) of each column that has one; None until the
        #: first rows tell the types the driver reports.
        self._processors: list[tuple[int, Callable[[Any], Any]]] | None = None

    def fetched(self, fetched: Fetched) -> Sequence[Sequence[Any]]:
        """The driver rows fetched; on first use, the columns' result processors are looked
        up for the types the driver reports."""
        description, rows = fetched
        if self._processors is None:
            codes = [d[1] for d in description or ()]
            if len(codes) != len(self.columns):  # pragma: no cover - we wrote the SELECT
                codes = [None] * len(self.columns)
            processors = [
                c.type.dialect_impl(self.dialect).result_processor(self.dialect, code)
                for c, code in zip(self.columns, codes, strict=True)
            ]
            self._processors = [(i, p) for i, p in enumerate(processors) if p is not None]
        return rows

    def convert(self, raw: Sequence[Sequence[Any]]) -> list[Sequence[Any] | Unloadable]:
        """:meth:`apply`, except that a row a result processor fails on (a malformed job id,
        a value its column type cannot read) becomes an :class:`Unloadable` holding it as
        the driver returned it, instead of failing every claim of the queue's head."""
        try:
            return self.apply(raw)
        except Exception:
            pass
        out: list[Sequence[Any] | Unloadable] = []
        for row in raw:
            try:
                out.append(self.apply([row])[0])
            except Exception as err:
                key = tuple([row[j] for j in self.key_at])
                values = {c.name: v for c, v in zip(self.columns, row, strict=True)}
                details = "".join(traceback.format_exception(err))
                out.append(Unloadable(self.table, values, key, err, details))
        return out

    def apply(self, raw: Sequence[Sequence[Any]]) -> list[Sequence[Any] | Unloadable]:
        """The rows with each column's result processor applied (a new list per row; only
        the columns that have one are visited: often the job id alone).  Typed as
        :meth:`convert` returns, which returns it as it is; it holds no ``Unloadable``."""
        procs = self._processors
        assert procs is not None
        out: list[Sequence[Any] | Unloadable]
        if not procs:
            out = list(raw)
            return out
        out = []
        for r in raw:
            row = list(r)
            for i, process in procs:
                value = row[i]
                if value is not None:
                    row[i] = process(value)
            out.append(row)
        return out


def row_metadata(columns: Sequence[Column[Any]]) -> SimpleResultMetaData | None:
    """How to make the Rows ``Connection.execute(select(*columns))`` returns from converted
    values: each value under its column's name, the column itself and its key, as the
    cursor result's keys are; None when names and keys overlap (left to SQLAlchemy)."""
    names = [c.name for c in columns]
    extra = [(c,) if c.key == c.name else (c, c.key) for c in columns]
    keys = [*names, *(c.key for c in columns if c.key != c.name)]
    if len(set(keys)) != len(keys):
        return None
    return SimpleResultMetaData(names, extra=extra)


def core_rows(
    meta: SimpleResultMetaData, values: Sequence[Sequence[Any] | Unloadable]
) -> list[Sequence[Any] | Unloadable]:
    """``values`` (converted) as Rows of ``meta``; an :class:`Unloadable` stays as it is."""
    plain = [v for v in values if not isinstance(v, Unloadable)]
    rows: Iterator[Any] = iter(IteratorResult(meta, iter([tuple(v) for v in plain])).all())
    return [v if isinstance(v, Unloadable) else next(rows) for v in values]
