"""Client-side checks (no server): seconds options and job values by column type."""

from __future__ import annotations

import datetime
import decimal
import enum
import math
import uuid
from typing import Any

import pytest
from sqlalchemy import JSON
from sqlalchemy import BigInteger
from sqlalchemy import Boolean
from sqlalchemy import Column
from sqlalchemy import Date
from sqlalchemy import DateTime
from sqlalchemy import Double
from sqlalchemy import Enum
from sqlalchemy import Float
from sqlalchemy import Integer
from sqlalchemy import LargeBinary
from sqlalchemy import Numeric
from sqlalchemy import SmallInteger
from sqlalchemy import String
from sqlalchemy import Text
from sqlalchemy import Time
from sqlalchemy import Uuid
from sqlalchemy.dialects import mysql

from sqlalchemy_q4m.exc import OptionError
from sqlalchemy_q4m.schema.checks import check_seconds
from sqlalchemy_q4m.schema.checks import column_check

pytestmark = pytest.mark.unit


class Color(enum.Enum):
    red = 1
    blue = 2


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, -1, -0.5, "1", None, True])
def test_seconds_refuse_nan_infinity_negatives_and_non_numbers(value: Any) -> None:
    with pytest.raises(OptionError, match="timeout"):
        check_seconds("timeout", value)


def test_seconds_accept_finite_numbers() -> None:
    assert check_seconds("t", 0) == 0.0
    assert check_seconds("t", 1.5) == 1.5
    assert check_seconds("t", decimal.Decimal("2")) == 2.0
    assert check_seconds("t", None, optional=True) is None
    with pytest.raises(OptionError, match="> 0"):
        check_seconds("t", 0, positive=True)


def run(type_: Any, values: list[Any], nullable: bool = True) -> Any:
    check = column_check(Column("c", type_, nullable=nullable))
    assert check is not None
    return check.check(values)


GOOD: list[tuple[Any, Any, Any]] = [
    # (type, value, the value the column gets)
    (Integer(), 5, 5),
    (Integer(), True, True),  # MySQL's BOOL is TINYINT(1)
    (Integer(), "42", 42),  # JSON input may carry digits
    (Integer(), "-7", -7),
    (Integer(), 3.0, 3),
    (Integer(), 2**31 - 1, 2**31 - 1),
    (BigInteger(), 2**63 - 1, 2**63 - 1),
    (mysql.INTEGER(unsigned=True), 2**32 - 1, 2**32 - 1),
    (Boolean(), False, False),
    (Boolean(), 1, True),
    (String(5), "héllo", "héllo"),
    (Text(), "x" * 65535, "x" * 65535),
    (Numeric(5, 2), "123.45", decimal.Decimal("123.45")),
    (Numeric(5, 2), decimal.Decimal("999.99"), decimal.Decimal("999.99")),
    (Numeric(5, 2), 12, 12),
    (Float(), 1.5, 1.5),
    (Double(), 1e300, 1e300),
    (DateTime(), "2026-01-02T03:04:05", datetime.datetime(2026, 1, 2, 3, 4, 5)),
    (DateTime(), datetime.datetime(2026, 1, 2), datetime.datetime(2026, 1, 2)),
    (Date(), "2026-01-02", datetime.date(2026, 1, 2)),
    (Time(), "03:04:05", datetime.time(3, 4, 5)),
    (LargeBinary(), b"\x00\xff", b"\x00\xff"),
    (Enum("a", "b"), "b", "b"),
    (Enum(Color), Color.red, Color.red),
    (Enum(Color), "blue", "blue"),
    (JSON(), {"a": [1, 2]}, {"a": [1, 2]}),
    (
        Uuid(),
        "12345678-1234-5678-1234-567812345678",
        uuid.UUID(int=0x12345678123456781234567812345678),
    ),
]


@pytest.mark.parametrize(("type_", "value", "stored"), GOOD)
def test_values_a_column_takes(type_: Any, value: Any, stored: Any) -> None:
    result = run(type_, [None, value])
    assert isinstance(result, dict), result
    assert result.get(1, value) == stored
    assert type(result.get(1, value)) is type(stored)


BAD: list[tuple[Any, Any, str]] = [
    (Integer(), "oops", "takes an integer"),
    (Integer(), 1.5, "takes an integer"),
    (Integer(), 2**31, "from -2147483648 to 2147483647"),
    (SmallInteger(), 40000, "from -32768 to 32767"),
    (mysql.TINYINT(), 200, "from -128 to 127"),
    (mysql.INTEGER(unsigned=True), -1, "from 0 to"),
    (Integer(), [1], "takes an integer"),
    (Boolean(), 2, "takes true or false"),
    (Boolean(), "yes", "takes true or false"),
    (String(5), 5, "takes a string"),
    (String(5), "toolong", "at most 5 characters"),
    (String(5), "\ud800", "valid Unicode"),
    (Text(), "é" * 40000, "at most 65535 bytes"),
    (Numeric(5, 2), "1000", "below 1000"),
    (Numeric(5, 2), "999.999", "below 1000"),  # rounds to 1000.00
    (Numeric(5, 2), "nan", "finite"),
    (Numeric(5, 2), "x", "decimal number"),
    (Float(), math.nan, "finite"),
    (Float(), 1e39, "finite number within its range"),
    (Double(), math.inf, "finite"),
    (Float(), "oops", "takes a number"),
    (DateTime(), "yesterday", "takes a datetime"),
    (DateTime(), 1700000000, "takes a datetime"),
    (Date(), datetime.datetime(2026, 1, 2, 3, 4), "takes a date"),
    (Time(), "25:00", "takes a time"),
    (LargeBinary(), "text", "takes bytes"),
    (LargeBinary(length=3), b"abcd", "at most 3 bytes"),
    (mysql.VARBINARY(2), b"abc", "at most 2 bytes"),
    (Enum("a", "b"), "c", "takes one of 'a', 'b'"),
    (Enum(Color), Color, "takes one of"),
    (JSON(), {"a": math.nan}, "takes a JSON value"),
    (JSON(), {1, 2}, "takes a JSON value"),
    (Uuid(), "not-a-uuid", "takes a UUID"),
]


@pytest.mark.parametrize(("type_", "value", "reason"), BAD)
def test_values_a_column_refuses_name_the_column_and_why(
    type_: Any, value: Any, reason: str
) -> None:
    result = run(type_, [None, value, None])
    assert isinstance(result, tuple), result
    index, message = result
    assert index == 1
    assert message.startswith("'c' ")
    assert reason in message


def test_none_for_a_not_null_column() -> None:
    assert run(Integer(), [1, None], nullable=False) == (1, "'c' is NOT NULL, not None")


def test_the_first_bad_value_is_named() -> None:
    values: list[Any] = list(range(100))
    values[70] = "x"
    values[90] = "y"
    assert run(Integer(), values)[0] == 70


def test_unknown_types_are_left_to_their_bind_processing() -> None:
    from sqlalchemy.types import TypeDecorator

    class Custom(TypeDecorator[Any]):
        impl = Integer
        cache_ok = True

    assert column_check(Column("c", Custom())) is None
    assert column_check(Column("c", mysql.SET("a", "b"))) is None


def test_json_none_is_json_null_unless_none_as_null() -> None:
    assert run(JSON(), [None], nullable=False) == {}
    assert isinstance(run(JSON(none_as_null=True), [None], nullable=False), tuple)
