"""Checks on input, made on the client before anything is sent.

* :func:`check_seconds`: the one check for every number of seconds the library and the
  command line take (``timeout``, ``poll_interval``, ``listen``, ``delay``, worker options):
  NaN, infinity and negatives are refused with :class:`~sqlalchemy_q4m.exc.OptionError`.
* :func:`column_check`: what a column accepts, by its SQLAlchemy type.  The Q4M engine is not
  transactional, so MariaDB's strict mode only rejects a bad value in the first row of a
  statement; later rows get the value coerced (``'oops'`` becomes ``0``, a long string is cut)
  with a warning.  :func:`~sqlalchemy_q4m.enqueue` therefore checks every value itself, on both
  backends, so a model behaves the same everywhere and bad input enqueues nothing.
"""

from __future__ import annotations

import datetime
import decimal
import json
import math
import re
import uuid
from collections.abc import Callable
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Column
from sqlalchemy.dialects import mysql
from sqlalchemy.types import JSON
from sqlalchemy.types import BigInteger
from sqlalchemy.types import Boolean
from sqlalchemy.types import Date
from sqlalchemy.types import DateTime
from sqlalchemy.types import Double
from sqlalchemy.types import Enum
from sqlalchemy.types import Float
from sqlalchemy.types import Integer
from sqlalchemy.types import Numeric
from sqlalchemy.types import SmallInteger
from sqlalchemy.types import String
from sqlalchemy.types import Time
from sqlalchemy.types import TypeEngine
from sqlalchemy.types import Uuid
from sqlalchemy.types import _Binary

from ..exc import OptionError

__all__ = ["ColumnCheck", "check_seconds", "column_check", "max_bytes"]


def check_seconds(
    name: str, value: Any, *, positive: bool = False, optional: bool = False
) -> float | None:
    """``value`` as a number of seconds: a finite real number >= 0 (> 0 with ``positive``;
    None too with ``optional``); anything else raises :class:`OptionError` naming ``name``."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | decimal.Decimal):
        raise OptionError(f"{name} is a number of seconds, not {value!r:.60}")
    number = float(value)
    if not math.isfinite(number):
        raise OptionError(f"{name} must be a finite number of seconds, not {value!r}")
    if number < 0 or (positive and number == 0):
        raise OptionError(f"{name} must be {'>' if positive else '>='} 0 seconds, not {value!r}")
    return number


# -- what a column accepts ---------------------------------------------------------------------


class BadValue(ValueError):
    """One value a column does not accept; ``args[0]`` says why."""


@dataclass(frozen=True)
class ColumnCheck:
    """How the values of one column are checked: ``fast`` is a whole-list test for the common
    case (all values of the ``plain`` types and in range); ``convert`` checks one value and
    returns it, or the value the column should get (``"42"`` for an integer column is 42)."""

    column: Column[Any]
    plain: frozenset[type]
    fast: Callable[[list[Any]], bool] | None
    convert: Callable[[Any], Any]
    accepts_none: bool

    def check(self, values: list[Any]) -> tuple[int, str] | dict[int, Any]:
        """The first bad value's index and reason, else the changed values by index."""
        if self.fast is not None and set(map(type, values)) <= self.plain and self.fast(values):
            return {}
        changed: dict[int, Any] = {}
        convert = self.convert
        for index, value in enumerate(values):
            if value is None:
                if not self.accepts_none:
                    return index, f"{self.column.name!r} is NOT NULL, not None"
                continue
            try:
                new = convert(value)
            except BadValue as err:
                return index, f"{self.column.name!r} ({_type_name(self.column)}) {err.args[0]}"
            if new is not value:
                changed[index] = new
        return changed


def _type_name(column: Column[Any]) -> str:
    try:
        return str(column.type.compile(dialect=mysql.dialect()))
    except Exception:
        return type(column.type).__name__


def column_check(column: Column[Any]) -> ColumnCheck | None:
    """How ``column``'s values are checked, or None for a type this module does not know
    (a ``TypeDecorator``: its own bind processing judges the value)."""
    type_ = column.type
    spec = _spec(type_)
    if spec is None:
        return None
    plain, fast, convert = spec
    accepts_none = column.nullable or (isinstance(type_, JSON) and not type_.none_as_null)
    return ColumnCheck(column, frozenset(plain), fast, convert, bool(accepts_none))


_Spec = tuple[Sequence[type], Callable[[list[Any]], bool] | None, Callable[[Any], Any]]


def _spec(type_: TypeEngine[Any]) -> _Spec | None:
    if isinstance(type_, Boolean):
        return (bool,), _true, _boolean
    if isinstance(type_, Integer):
        return _integer(type_)
    if isinstance(type_, Float):
        return _float(type_)
    if isinstance(type_, Numeric):
        return _decimal(type_)
    if isinstance(type_, Enum):
        return _enum(type_)
    if isinstance(type_, mysql.SET):
        return None
    if isinstance(type_, String):
        return _string(type_)
    if isinstance(type_, _Binary):
        return _binary(type_)
    if isinstance(type_, DateTime):
        return (datetime.datetime,), _true, _datetime
    if isinstance(type_, Date):
        return (datetime.date,), _true, _date
    if isinstance(type_, Time):
        return (datetime.time, datetime.timedelta), _true, _time
    if isinstance(type_, JSON):
        return (), None, _json
    if isinstance(type_, Uuid):
        return _uuid(type_)
    return None


def _true(values: list[Any]) -> bool:
    return True


def _what(value: Any) -> str:
    return f"not {value!r:.60}"


def _boolean(value: Any) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise BadValue(f"takes true or false, {_what(value)}")


#: Bits of MySQL's integer types, by the SQLAlchemy types that render them.
_INT_BITS: tuple[tuple[type, int], ...] = (
    (mysql.TINYINT, 8),
    (SmallInteger, 16),
    (mysql.MEDIUMINT, 24),
    (BigInteger, 64),
    (Integer, 32),
)
_INTEGRAL = re.compile(r"[+-]?[0-9]+")


def _integer(type_: Integer) -> _Spec:
    bits = next(b for cls, b in _INT_BITS if isinstance(type_, cls))
    if getattr(type_, "unsigned", False):
        low, high = 0, 2**bits - 1
    else:
        low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1

    def fast(values: list[Any]) -> bool:
        return bool(low <= min(values) and max(values) <= high)

    def convert(value: Any) -> Any:
        if isinstance(value, int):  # bool too: MySQL's BOOL is TINYINT(1)
            number = value
        elif isinstance(value, str) and _INTEGRAL.fullmatch(value):
            number = int(value)  # JSON input may carry a big number as digits
        elif isinstance(value, float | decimal.Decimal) and _finite_integral(value):
            number = int(value)
        else:
            raise BadValue(f"takes an integer, {_what(value)}")
        if not low <= number <= high:
            raise BadValue(f"takes an integer from {low} to {high}, {_what(value)}")
        return number

    return (int, bool), fast, convert


def _finite_integral(value: float | decimal.Decimal) -> bool:
    return math.isfinite(value) and value == int(value)


_FLOAT_MAX = 3.402823466e38  # MySQL FLOAT (single precision)


def _float(type_: Float[Any]) -> _Spec:
    precision = getattr(type_, "precision", None)
    single = not isinstance(type_, Double | mysql.DOUBLE | mysql.REAL) and (
        precision is None or precision <= 24
    )
    limit = _FLOAT_MAX if single else math.inf

    def fast(values: list[Any]) -> bool:
        try:
            if limit == math.inf:
                return all(map(math.isfinite, values))
            return all(-limit <= v <= limit and math.isfinite(v) for v in values)
        except OverflowError:  # an int too big for a float
            return False

    def convert(value: Any) -> Any:
        number = value
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                raise BadValue(f"takes a number, {_what(value)}") from None
        elif isinstance(value, bool) or not isinstance(value, int | float | decimal.Decimal):
            raise BadValue(f"takes a number, {_what(value)}")
        try:
            finite = math.isfinite(number) and -limit <= float(number) <= limit
        except OverflowError:
            finite = False
        if not finite:
            raise BadValue(f"takes a finite number within its range, {_what(value)}")
        return number

    return (float, int), fast, convert


def _decimal(type_: Numeric[Any]) -> _Spec:
    precision = type_.precision if type_.precision is not None else 10  # MySQL's defaults
    scale = type_.scale if type_.scale is not None else 0
    bound = decimal.Decimal(10) ** (precision - scale)

    def convert(value: Any) -> Any:
        try:
            if isinstance(value, bool) or not isinstance(
                value, int | float | decimal.Decimal | str
            ):
                raise decimal.InvalidOperation
            number = decimal.Decimal(value.strip() if isinstance(value, str) else value)
        except (decimal.InvalidOperation, ValueError):
            raise BadValue(f"takes a decimal number, {_what(value)}") from None
        if not number.is_finite():
            raise BadValue(f"takes a finite number, {_what(value)}")
        with decimal.localcontext() as context:
            context.prec = max(precision, 28) + 2
            rounded = round(number, scale)
        if abs(rounded) >= bound:
            raise BadValue(f"takes a number below {bound} in magnitude, {_what(value)}")
        return number if isinstance(value, str) else value

    return (), None, convert


def _enum(type_: Enum) -> _Spec:
    names = frozenset(type_.enums)
    enum_class = type_.enum_class

    def fast(values: list[Any]) -> bool:
        return names.issuperset(values)

    def convert(value: Any) -> Any:
        if (isinstance(value, str) and value in names) or (
            enum_class is not None and isinstance(value, enum_class)
        ):
            return value
        raise BadValue(f"takes one of {', '.join(map(repr, sorted(names)))}, {_what(value)}")

    return (str,), fast, convert


#: Byte limits of MySQL's TEXT and BLOB types without a length.
_LOB_BYTES: tuple[tuple[type, int], ...] = (
    (mysql.TINYTEXT, 255),
    (mysql.MEDIUMTEXT, 2**24 - 1),
    (mysql.LONGTEXT, 2**32 - 1),
    (mysql.TINYBLOB, 255),
    (mysql.MEDIUMBLOB, 2**24 - 1),
    (mysql.LONGBLOB, 2**32 - 1),
)


def _lob_bytes(type_: TypeEngine[Any]) -> int:
    return next((n for cls, n in _LOB_BYTES if isinstance(type_, cls)), 2**16 - 1)


def max_bytes(type_: TypeEngine[Any]) -> int | None:
    """The most bytes one value of a text or binary type holds on MySQL (4 per character
    of a ``VARCHAR(n)``), or None when the type is not one of those."""
    if isinstance(type_, Enum | mysql.SET):
        return None
    if isinstance(type_, String):
        return type_.length * 4 if type_.length is not None else _lob_bytes(type_)
    if isinstance(type_, _Binary):
        return type_.length if type_.length is not None else _lob_bytes(type_)
    return None


def _string(type_: String) -> _Spec:
    chars: int | None = type_.length  # VARCHAR(n), CHAR(n), TEXT(n): characters
    nbytes = _lob_bytes(type_) if chars is None else None

    def fast(values: list[Any]) -> bool:
        if not all(map(str.isascii, values)):
            return False  # each is encoded by convert(): lone surrogates, byte length
        longest = max(map(len, values))
        return longest <= chars if chars is not None else longest <= (nbytes or 0)

    def convert(value: Any) -> Any:
        if not isinstance(value, str):
            raise BadValue(f"takes a string, {_what(value)}")
        try:
            size = len(value.encode("utf-8"))
        except UnicodeEncodeError as err:
            raise BadValue(f"takes valid Unicode, not a string with {err.reason}") from None
        if chars is not None and len(value) > chars:
            raise BadValue(f"takes at most {chars} characters, not {len(value)}")
        if nbytes is not None and size > nbytes:
            raise BadValue(f"takes at most {nbytes} bytes, not {size}")
        return value

    return (str,), fast, convert


def _binary(type_: _Binary) -> _Spec:
    limit: int = type_.length if type_.length is not None else _lob_bytes(type_)

    def fast(values: list[Any]) -> bool:
        return max(map(len, values)) <= limit

    def convert(value: Any) -> Any:
        if not isinstance(value, bytes | bytearray | memoryview):
            raise BadValue(f"takes bytes, {_what(value)}")
        if len(value) > limit:
            raise BadValue(f"takes at most {limit} bytes, not {len(value)}")
        return value

    return (bytes,), fast, convert


def _iso(parse: Callable[[str], Any], what: str, value: Any) -> Any:
    if isinstance(value, str):
        try:
            return parse(value)
        except ValueError:
            pass
    raise BadValue(f"takes {what} (or its ISO 8601 text), {_what(value)}")


def _datetime(value: Any) -> Any:
    if isinstance(value, datetime.datetime):
        return value
    return _iso(datetime.datetime.fromisoformat, "a datetime", value)


def _date(value: Any) -> Any:
    if isinstance(value, datetime.date) and not isinstance(value, datetime.datetime):
        return value
    return _iso(datetime.date.fromisoformat, "a date", value)


def _time(value: Any) -> Any:
    if isinstance(value, datetime.time | datetime.timedelta):
        return value
    return _iso(datetime.time.fromisoformat, "a time", value)


def _json(value: Any) -> Any:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise BadValue(f"takes a JSON value, not {value!r:.60} ({err})") from None
    return value


def _uuid(type_: Uuid[Any]) -> _Spec:
    as_uuid = type_.as_uuid

    def convert(value: Any) -> Any:
        if isinstance(value, uuid.UUID):
            return value if as_uuid else str(value)
        if isinstance(value, str):
            try:
                parsed = uuid.UUID(value)
            except ValueError:
                pass
            else:
                return parsed if as_uuid else value
        raise BadValue(f"takes a UUID, {_what(value)}")

    return (uuid.UUID,) if as_uuid else (), _true if as_uuid else None, convert
