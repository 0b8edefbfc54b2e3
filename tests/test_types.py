"""The job id type and generator: what they accept and return, and that the fast paths
(:func:`new_job_id` building the UUID directly, :meth:`JobId.bind_processor` as one plain
function, random bytes read in chunks) keep the behaviour of the plain ones."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import threading
import uuid
from types import SimpleNamespace
from typing import Any

import pymysql
import pytest
from sqlalchemy import insert
from sqlalchemy import select
from sqlalchemy.dialects import mysql
from sqlalchemy.dialects.mysql import pymysql as mysql_pymysql
from sqlalchemy.dialects.mysql.base import MySQLDialect
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.orm import Mapped
from sqlalchemy.orm import Session
from sqlalchemy.orm import mapped_column

from sqlalchemy_q4m import JobId
from sqlalchemy_q4m import QueueMixin
from sqlalchemy_q4m import new_job_id


class Base(DeclarativeBase):
    pass


class TypedJob(QueueMixin, Base):
    __tablename__ = "types_jobs"
    payload: Mapped[str] = mapped_column(mysql.VARCHAR(32))


def _tail(job_id: uuid.UUID) -> int:
    """The 62 random bits of a UUIDv7 made by :func:`new_job_id`."""
    return job_id.int & 0x3FFF_FFFF_FFFF_FFFF


# -- new_job_id ------------------------------------------------------------------------------


@pytest.mark.unit
def test_new_job_id_is_an_ordinary_uuid7() -> None:
    job_id = new_job_id()
    same = uuid.UUID(int=job_id.int)
    assert type(job_id) is uuid.UUID
    assert job_id == same and hash(job_id) == hash(same) and str(job_id) == str(same)
    assert job_id.version == 7 and job_id.variant == uuid.RFC_4122
    assert job_id.is_safe is uuid.SafeUUID.unknown
    assert pickle.loads(pickle.dumps(job_id)) == job_id
    assert uuid.UUID(bytes=job_id.bytes) == job_id


@pytest.mark.unit
def test_new_job_id_spans_many_random_chunks() -> None:
    """Far more ids than one chunk of random bytes holds: unique, increasing, random tails."""
    ids = [new_job_id() for _ in range(5_000)]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert len({_tail(i) for i in ids}) == len(ids)


@pytest.mark.unit
def test_new_job_id_from_threads_is_unique_and_increasing_per_thread() -> None:
    made: list[list[uuid.UUID]] = []

    def make() -> None:
        made.append([new_job_id() for _ in range(2_000)])

    threads = [threading.Thread(target=make) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(ids == sorted(ids) for ids in made)
    every = [i for ids in made for i in ids]
    assert len(set(every)) == len(every)


def _child_ids(out: Any) -> None:
    out.put([new_job_id() for _ in range(3)])


@pytest.mark.unit
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_does_not_reuse_the_parents_random_bytes() -> None:
    new_job_id()  # the parent now holds unread random bytes
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    child = ctx.Process(target=_child_ids, args=(out,))
    child.start()
    from_child = out.get(timeout=30)
    child.join(timeout=30)
    from_parent = [new_job_id() for _ in range(3)]
    assert child.exitcode == 0
    assert not {_tail(i) for i in from_child} & {_tail(i) for i in from_parent}


# -- JobId bind and result processing --------------------------------------------------------


class _SubUUID(uuid.UUID):
    pass


def _accepted(job_id: uuid.UUID) -> list[Any]:
    return [
        job_id,
        _SubUUID(int=job_id.int),
        job_id.bytes,
        bytearray(job_id.bytes),
        str(job_id),
        job_id.hex,
    ]


@pytest.mark.unit
def test_bind_processor_accepts_uuid_bytes_and_strings() -> None:
    job_id = new_job_id()
    dialect = mysql_pymysql.dialect(dbapi=pymysql)
    process = JobId().bind_processor(dialect)
    assert process is not None
    for value in _accepted(job_id):
        bound = process(value)
        assert type(bound) is bytes and bound == job_id.bytes, value
        assert JobId().process_bind_param(value, dialect) == job_id.bytes
    assert process(None) is None
    with pytest.raises(ValueError):
        process("not a uuid")
    with pytest.raises(ValueError):
        process(b"short")


@pytest.mark.unit
def test_bind_processor_keeps_a_dbapi_binary_wrapper() -> None:
    """A DBAPI whose ``Binary`` wraps bytes still gets its wrapper, as with the impl's own
    processor; one that returns plain bytes is skipped."""

    class Wrapped(bytes):
        pass

    job_id = new_job_id()
    wrapping = MySQLDialect()
    wrapping.dbapi = SimpleNamespace(Binary=Wrapped)  # type: ignore[assignment]
    process = JobId().bind_processor(wrapping)
    assert process is not None
    bound = process(job_id)
    assert type(bound) is Wrapped and bound == job_id.bytes
    assert process(None) is None

    no_dbapi = JobId().bind_processor(mysql.dialect())
    assert no_dbapi is not None and no_dbapi(job_id) == job_id.bytes


@pytest.mark.unit
def test_result_processing_returns_uuid() -> None:
    job_id = new_job_id()
    dialect = mysql_pymysql.dialect(dbapi=pymysql)
    process = JobId().result_processor(dialect, None)
    assert process is not None
    assert process(job_id.bytes) == job_id and isinstance(process(job_id.bytes), uuid.UUID)
    assert process(bytearray(job_id.bytes)) == job_id
    assert process(None) is None


# -- on the real server ----------------------------------------------------------------------


@pytest.mark.integration
def test_ids_round_trip_through_bulk_and_unit_of_work_inserts(engine: Engine) -> None:
    Base.metadata.create_all(engine)
    try:
        given = new_job_id()
        with Session(engine) as s:
            s.execute(insert(TypedJob), [{"payload": f"bulk {i}"} for i in range(500)])
            s.execute(insert(TypedJob), [{"id": str(given), "payload": "given"}])
            added = TypedJob(payload="added")
            s.add(added)
            s.commit()
            assert isinstance(added.id, uuid.UUID) and added.id.version == 7
            rows = s.execute(select(TypedJob.id, TypedJob.payload)).all()
        ids = {payload: job_id for job_id, payload in rows}
        assert len(rows) == 502 and all(type(i) is uuid.UUID for i in ids.values())
        assert ids["given"] == given and ids["added"] == added.id
        bulk = [ids[f"bulk {i}"] for i in range(500)]
        assert bulk == sorted(bulk)
    finally:
        Base.metadata.drop_all(engine)
