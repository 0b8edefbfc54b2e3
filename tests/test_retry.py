"""Retry policy, decisions, payload encoding and job-class naming: no server needed."""

from __future__ import annotations

import datetime as dt
import decimal
import uuid

import pytest
from sqlalchemy import Column
from sqlalchemy import Integer
from sqlalchemy import MetaData
from sqlalchemy import Text
from sqlalchemy.dialects import mysql
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.orm import Mapped
from sqlalchemy.orm import mapped_column

from sqlalchemy_q4m import Job
from sqlalchemy_q4m import PriorityMixin
from sqlalchemy_q4m import QueueMixin
from sqlalchemy_q4m import RetryMixin
from sqlalchemy_q4m import RetryPolicy
from sqlalchemy_q4m.backends.portable import claim_statement
from sqlalchemy_q4m.exc import Q4MError
from sqlalchemy_q4m.exc import QueueTableError
from sqlalchemy_q4m.exc import SubscriptionError
from sqlalchemy_q4m.schema.functions import render_condition
from sqlalchemy_q4m.schema.functions import subscriptions
from sqlalchemy_q4m.schema.reflect import table_name_for
from sqlalchemy_q4m.schema.retry import due_condition
from sqlalchemy_q4m.schema.retry import retry_columns
from sqlalchemy_q4m.worker.deadletter import decode_payload
from sqlalchemy_q4m.worker.deadletter import encode_payload
from sqlalchemy_q4m.worker.policy import Bury
from sqlalchemy_q4m.worker.policy import Retry
from sqlalchemy_q4m.worker.policy import decide

pytestmark = pytest.mark.unit


class Base(DeclarativeBase):
    pass


class RetryRow(RetryMixin, PriorityMixin, QueueMixin, Base):
    __tablename__ = "unit_retry_rows"
    command: Mapped[str] = mapped_column(Text)


def test_delay_doubles_and_is_capped_without_jitter() -> None:
    policy = RetryPolicy(max_attempts=10, base=2, cap=20, jitter=0)
    assert [policy.delay(n) for n in range(0, 6)] == [0, 2, 4, 8, 16, 20]


def test_jitter_stays_within_its_bounds() -> None:
    policy = RetryPolicy(base=10, cap=1000, jitter=0.5)
    assert policy.delay(1, rand=lambda: 0.0) == 5
    assert policy.delay(1, rand=lambda: 0.999999) == 15
    assert policy.delay(3, rand=lambda: 0.5) == 40
    assert policy.delay(60, rand=lambda: 1.0) == 1000  # capped after jitter too


def test_decide_retries_until_max_attempts_then_buries() -> None:
    policy = RetryPolicy(max_attempts=3, base=4, jitter=0)
    first = decide(policy, 0, now=1000)
    assert first == Retry(attempts=1, run_at=1004, delay=4)
    second = decide(policy, 1, now=2000)
    assert second == Retry(attempts=2, run_at=2008, delay=8)
    assert decide(policy, 2, now=3000) == Bury(attempts=3)
    assert decide(policy, 0, now=1000, can_retry=False) == Bury(attempts=1)
    assert decide(RetryPolicy(max_attempts=1), 0) == Bury(attempts=1)


@pytest.mark.parametrize(
    "kwargs", [{"max_attempts": 0}, {"base": -1}, {"jitter": 1.5}, {"cap": -2}]
)
def test_bad_policies_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(Q4MError):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


def test_due_condition_is_a_q4m_condition() -> None:
    table = RetryRow.__table__
    condition = due_condition(table, now=1764360000.7)  # type: ignore[arg-type]
    assert condition is not None
    assert render_condition(condition, table) == "(`run_at` <= 1764360000)"  # type: ignore[arg-type]
    subs = subscriptions([RetryRow], condition)
    assert subs[0].q4m_spec() == "unit_retry_rows:(`run_at` <= 1764360000)"
    plain = MetaData()
    from sqlalchemy_q4m import queue_table

    assert due_condition(queue_table("unit_plain", plain, Column("n", Integer))) is None


def test_portable_claim_orders_by_priority_then_id() -> None:
    sub = subscriptions([RetryRow])[0]
    sql = str(claim_statement(sub).compile(dialect=mysql.dialect()))
    assert "ORDER BY unit_retry_rows.priority DESC, unit_retry_rows.id" in sql
    assert sql.endswith("FOR UPDATE SKIP LOCKED")


def test_mixin_columns_are_integers_with_server_defaults_and_come_last() -> None:
    table = RetryRow.__table__
    names = [c.name for c in table.columns]  # type: ignore[attr-defined]
    assert names[0] == "id" and names[1] == "command"
    assert set(names[2:]) == {"attempts", "run_at", "priority"}
    for column in retry_columns():
        assert column.server_default is not None and not column.nullable


@pytest.mark.parametrize(
    ("name", "table"),
    [
        ("ShellJob", "shell_jobs"),
        ("RubyJob", "ruby_jobs"),
        ("HTTPFetch", "http_fetches"),
        ("Entry", "entries"),
        ("Day", "days"),
        ("MailBox", "mail_boxes"),
    ],
)
def test_table_name_from_class_name(name: str, table: str) -> None:
    assert table_name_for(name) == table


def test_job_class_declarations_are_checked() -> None:
    class ShellJob(Job):
        pass

    class OrmJob(Job):
        model = RetryRow

    assert ShellJob.table_name is None and OrmJob.model is RetryRow
    with pytest.raises(QueueTableError):

        class BadName(Job):
            table_name = "shell jobs; DROP TABLE x"

    with pytest.raises(SubscriptionError):

        class NotAQueue(Job):
            model = int

    with pytest.raises(Q4MError, match="not both"):

        class Both(Job):
            model = RetryRow
            table_name = "x"


def test_job_options_are_checked() -> None:
    from sqlalchemy import create_engine

    engine = create_engine("mysql+pymysql://nobody@127.0.0.1:1/none")

    class ShellJob(Job):
        pass

    with pytest.raises(Q4MError, match="unknown job option"):
        ShellJob(engine, max_attempt=3)
    with pytest.raises(Q4MError):
        ShellJob(engine, max_attempts=0)
    with pytest.raises(Q4MError):
        ShellJob("mysql://x")  # type: ignore[arg-type]
    job = ShellJob(engine, max_attempts=7, table_name="other_jobs")
    assert job.policy.max_attempts == 7
    assert job.table_names() == ["other_jobs"]
    with pytest.raises(Q4MError, match="no job in hand"):
        job.session  # noqa: B018
    engine.dispose()


def test_payload_round_trip() -> None:
    values = {
        "command": "echo hi",
        "blob": b"\x00\xff",
        "when": dt.datetime(2026, 1, 2, 3, 4, 5),
        "amount": decimal.Decimal("1.50"),
        "ref": uuid.UUID(int=5),
        "n": 3,
        "none": None,
    }
    decoded = decode_payload(encode_payload(values))
    assert decoded["blob"] == b"\x00\xff"
    assert decoded["when"] == "2026-01-02T03:04:05"
    assert decoded["amount"] == "1.50"
    assert decoded["ref"] == str(uuid.UUID(int=5))
    assert decoded["n"] == 3 and decoded["none"] is None and decoded["command"] == "echo hi"
    with pytest.raises(Q4MError):
        decode_payload("[1, 2]")
