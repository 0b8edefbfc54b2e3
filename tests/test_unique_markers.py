"""Which queues pay for unique keys: only those with a marker (written by the first keyed
enqueue into the queue), on both backends.  The first keyed enqueue waits until no consumer
still believes the queue keyless, so a consumer whose "no keys here" was fresh at that moment
still does the key's bookkeeping (no duplicate job, the key moved on retry and deleted at the
end); without the wait it would not.  A marker is no key: not counted by ``count_keys`` or
``q4m stats``.  The statements per job of a keyless queue beside keyed ones are counted in
``tests/test_statement_counts.py``."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Column
from sqlalchemy import Engine
from sqlalchemy import Integer
from sqlalchemy import MetaData
from sqlalchemy import Table
from sqlalchemy import create_engine
from sqlalchemy import delete
from sqlalchemy import func
from sqlalchemy import select
from sqlalchemy.pool import NullPool

from sqlalchemy_q4m import enqueue
from sqlalchemy_q4m import queue_session
from sqlalchemy_q4m import queue_table
from sqlalchemy_q4m.backends import unique_keys
from sqlalchemy_q4m.backends.unique_keys import KEYS
from sqlalchemy_q4m.backends.unique_keys import MARKER
from sqlalchemy_q4m.backends.unique_keys import count_keys
from sqlalchemy_q4m.ops.queues import queue_counts
from sqlalchemy_q4m.producer.unique import Unique
from sqlalchemy_q4m.schema.retry import retry_columns
from sqlalchemy_q4m.worker.deadletter import dead_letter_table
from sqlalchemy_q4m.worker.job import Job

pytestmark = pytest.mark.integration

#: The shortened memo and wait of these tests (the defaults: 5 s and 6 s).
TTL, WAIT = 1.0, 1.5


@pytest.fixture(params=["portable", pytest.param("native", marks=pytest.mark.native)])
def setup(request: pytest.FixtureRequest, engine: Engine) -> Iterator[tuple[Engine, Table]]:
    """(the producer's engine, a fresh queue table with retry columns)."""
    if request.param == "portable":
        eng = engine
    else:
        eng = create_engine(os.environ["Q4M_TEST_URL"], poolclass=NullPool)
    name = f"tum_{uuid.uuid4().hex[:8]}"
    metadata = MetaData()
    table = queue_table(
        name, metadata, Column("account", Integer, nullable=False), *retry_columns()
    )
    metadata.create_all(eng)
    try:
        yield eng, table
    finally:
        table.drop(eng)
        with eng.begin() as conn:
            conn.execute(delete(KEYS).where(KEYS.c.queue == name))
        if eng is not engine:
            eng.dispose()


@pytest.fixture
def consumer(setup: tuple[Engine, Table]) -> Iterator[Engine]:
    """Another engine on the same database: its memo is its own, as another process's is."""
    eng = create_engine(setup[0].url, poolclass=NullPool)
    yield eng
    eng.dispose()


def short(monkeypatch: pytest.MonkeyPatch, ttl: float, wait: float) -> None:
    monkeypatch.setattr(unique_keys, "ABSENT_TTL", ttl)
    monkeypatch.setattr(unique_keys, "FIRST_KEY_WAIT", wait)


def key_of(row: Any) -> str:
    return f"acct:{row['account']}"


def one(engine: Engine, table: Table, account: int = 7) -> Unique:
    (result,) = enqueue(engine, table, [{"account": account}], unique_key=key_of)
    return result


def jobs_in(engine: Engine, table: Table) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar() or 0)


def keys_of(engine: Engine, table: Table) -> int:
    with engine.connect() as conn:
        return count_keys(conn, table.name)


def believe_keyless(consumer: Engine, table: Table, producer: Engine) -> float:
    """Make ``consumer`` look the queue up and find no keys (it ends a keyless job); when."""
    enqueue(producer, table, [{"account": 1}])
    with queue_session(table, bind=consumer, timeout=5) as job:
        assert job is not None and job.account == 1
    return time.monotonic()


def first_keyed(producer: Engine, table: Table, since: float) -> Unique:
    """The first keyed enqueue into the queue, while the consumer's "no keys" is fresh."""
    assert time.monotonic() - since < unique_keys.ABSENT_TTL / 2
    started = time.monotonic()
    first = one(producer, table)
    assert first.enqueued
    assert time.monotonic() - started >= unique_keys.FIRST_KEY_WAIT
    return first


def test_a_consumer_that_believed_the_queue_keyless_still_keeps_the_key(
    setup: tuple[Engine, Table], consumer: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    producer, table = setup
    short(monkeypatch, TTL, WAIT)
    first = first_keyed(producer, table, believe_keyless(consumer, table, producer))
    with queue_session(table, bind=consumer, timeout=5) as job:
        assert job is not None and job.account == 7
        # running: on Q4M invisible to others, so only its GET_LOCK keeps the key held
        running = one(producer, table)
        assert (running.enqueued, running.job_id) == (False, first.job_id)
    assert jobs_in(producer, table) == 0
    assert keys_of(producer, table) == 0, "the key was deleted with its job"
    assert one(producer, table).enqueued


class FailingTwice(Job):
    max_attempts = 3
    retry_base = 60.0
    wait_timeout = 2.0

    def execute(self, job: Any) -> None:
        raise RuntimeError("boom")


def test_a_worker_that_believed_the_queue_keyless_moves_the_key_on_retry(
    setup: tuple[Engine, Table], consumer: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    producer, table = setup
    short(monkeypatch, TTL, WAIT)
    dead_name = f"tumdead_{uuid.uuid4().hex[:8]}"
    worker = FailingTwice(consumer, model=table, dead_letter_table=dead_name)
    try:
        enqueue(producer, table, [{"account": 1}])
        assert worker.run_once()  # connects, looks the queue up (no keys), retries in 60 s
        first = first_keyed(producer, table, time.monotonic())
        assert worker.run_once()  # the keyed job: retried as a copy, which holds the key
        held = one(producer, table)
        assert not held.enqueued and held.job_id != first.job_id
        assert keys_of(producer, table) == 1
    finally:
        worker.close()
        dead_letter_table(dead_name).drop(producer, checkfirst=True)


def test_without_the_wait_such_a_consumer_would_leave_the_key_behind(
    setup: tuple[Engine, Table], consumer: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the wait is for: a first keyed enqueue that did not wait for stale memos."""
    producer, table = setup
    short(monkeypatch, 60.0, 0.0)
    believe_keyless(consumer, table, producer)
    assert one(producer, table).enqueued
    with queue_session(table, bind=consumer, timeout=5) as job:
        assert job is not None and job.account == 7
    assert jobs_in(producer, table) == 0
    assert keys_of(producer, table) == 1, "ended without its key's bookkeeping"


def test_later_keyed_enqueues_wait_only_for_a_young_marker(
    setup: tuple[Engine, Table], consumer: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another engine (process) finding the marker waits out only the rest of the wait; once
    the marker is older than the wait, nobody waits."""
    producer, table = setup
    short(monkeypatch, TTL, WAIT)
    assert one(producer, table).enqueued  # marks and waits
    started = time.monotonic()
    assert enqueue(consumer, table, [{"account": 8}], unique_key=key_of)[0].enqueued
    assert enqueue(producer, table, [{"account": 9}], unique_key=key_of)[0].enqueued
    assert time.monotonic() - started < WAIT


def test_a_marker_is_not_a_key(
    setup: tuple[Engine, Table], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``count_keys`` and ``q4m stats`` (``queue_counts``) count keys, not the marker."""
    producer, table = setup
    short(monkeypatch, TTL, WAIT)
    with producer.connect() as conn:
        assert count_keys(conn, table.name) == 0
    unique_keys.mark_queue(producer, table.name)  # what a first keyed enqueue does first
    with producer.connect() as conn:
        markers = select(func.count()).where(
            KEYS.c.queue == table.name, KEYS.c.unique_key == MARKER
        )
        assert conn.execute(markers).scalar() == 1
        assert count_keys(conn, table.name) == 0
        assert queue_counts(conn, table, "q4m_dead_letters")["unique_keys"] == 0
    assert one(producer, table).enqueued
    assert one(producer, table, account=8).enqueued
    with producer.connect() as conn:
        assert count_keys(conn, table.name) == 2
        assert queue_counts(conn, table, "q4m_dead_letters")["unique_keys"] == 2


@pytest.mark.unit
def test_the_first_keyed_enqueue_outwaits_every_memo() -> None:
    assert unique_keys.FIRST_KEY_WAIT > unique_keys.ABSENT_TTL
