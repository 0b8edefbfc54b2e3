"""Engines the library has used die with their last reference; disposing one closes its
listen anchor (issue 11 item 14).

The library keeps per-engine state (compiled claims and INSERTs, the detected backend, the
listen anchor connection); none of it may outlive the engine, and ``engine.dispose()`` must
close the anchor connection on the server.
"""

from __future__ import annotations

import asyncio
import gc
import time
import weakref
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Column
from sqlalchemy import Engine
from sqlalchemy import Integer
from sqlalchemy import MetaData
from sqlalchemy import String
from sqlalchemy import create_engine
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.orm import Mapped
from sqlalchemy.orm import mapped_column
from sqlalchemy.pool import NullPool
from sqlalchemy.types import TypeDecorator

from sqlalchemy_q4m import Job
from sqlalchemy_q4m import QueueMixin
from sqlalchemy_q4m import enqueue
from sqlalchemy_q4m import notify
from sqlalchemy_q4m import queue_batch
from sqlalchemy_q4m import queue_session
from sqlalchemy_q4m import queue_table
from sqlalchemy_q4m.backends.listeners import anchor_for

pytestmark = pytest.mark.integration

ENGINES = 50


class Upper(TypeDecorator[str]):
    """A TypeDecorator: its bind processor closes over the dialect it was made for."""

    impl = String(50)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> Any:
        return None if value is None else str(value).upper()

    def process_result_value(self, value: Any, dialect: Any) -> Any:
        return value


class Base(DeclarativeBase):
    pass


class LtJob(QueueMixin, Base):
    __tablename__ = "lt_jobs"
    word: Mapped[str] = mapped_column(Upper)


class LtWorker(Job):
    model = LtJob

    def execute(self, job: Any) -> None:
        assert job.word == "C"


meta = MetaData()
lt_core = queue_table("lt_core", meta, Column("n", Integer))


@pytest.fixture(scope="module")
def tables(db_url: URL) -> Iterator[None]:
    eng = create_engine(db_url, poolclass=NullPool)
    Base.metadata.create_all(eng)
    meta.create_all(eng)
    try:
        yield
    finally:
        Base.metadata.drop_all(eng)
        meta.drop_all(eng)
        eng.dispose()


def use(eng: Engine) -> int:
    """Everything that keeps per-engine state; the anchor connection's id."""
    enqueue(eng, LtJob, [{"word": "a"}, {"word": "b"}])
    enqueue(eng, lt_core, [{"n": 1}, {"n": 2}])
    with queue_session(LtJob, bind=eng, timeout=5) as job:
        assert job is not None and job.word in ("A", "B")
    with queue_session(lt_core, bind=eng, timeout=5) as row:
        assert row is not None
    with queue_batch(LtJob, lt_core, bind=eng, size=10, timeout=5) as batch:
        for item in batch:
            with batch.handle(item):
                pass
    enqueue(eng, LtJob, [{"word": "c"}])
    worker = LtWorker(eng)
    assert worker.run_once(5)
    worker.close()
    # An idle listening consumer makes the anchor; notify finds nobody waiting.
    with queue_session(lt_core, bind=eng, timeout=0.2, listen=0.1) as none:
        assert none is None
    assert notify(eng, lt_core) == 0
    return anchor_for(eng).thread_id


def still_open(url: URL, ids: set[int], within: float = 5.0) -> set[int]:
    """Which of the connection ``ids`` the server still lists after at most ``within``
    seconds (a closed connection leaves PROCESSLIST a moment after its socket closes)."""
    eng = create_engine(url, poolclass=NullPool)
    deadline = time.monotonic() + within
    try:
        while True:
            with eng.connect() as conn:
                listed = set(conn.scalars(text("SELECT ID FROM information_schema.PROCESSLIST")))
            open_ = ids & listed
            if not open_ or time.monotonic() > deadline:
                return open_
            time.sleep(0.1)
    finally:
        eng.dispose()


def test_disposed_engines_are_collected_and_their_anchors_closed(db_url: URL, tables: None) -> None:
    refs: list[weakref.ref[Engine]] = []
    dialects: list[weakref.ref[Any]] = []  # what the per-engine caches are kept on
    anchors: set[int] = set()
    for _ in range(ENGINES):
        eng = create_engine(db_url, pool_size=2)
        anchors.add(use(eng))
        refs.append(weakref.ref(eng))
        dialects.append(weakref.ref(eng.dialect))
        eng.dispose()
        del eng
    assert len(anchors) == ENGINES, "one anchor per engine"
    alive = still_open(db_url, anchors)
    assert not alive, f"{len(alive)} of {ENGINES} anchor connections outlived dispose()"
    gc.collect()
    survivors = [r for r in refs if r() is not None]
    assert not survivors, f"{len(survivors)} of {ENGINES} disposed engines stayed in memory"
    kept = [r for r in dialects if r() is not None]
    assert not kept, f"{len(kept)} of {ENGINES} disposed engines' dialects stayed in memory"


def test_dispose_closes_the_anchor_and_the_engine_listens_again(db_url: URL, tables: None) -> None:
    """An engine is usable after dispose(): its next listening consumer makes a new anchor,
    closed by the next dispose()."""
    eng = create_engine(db_url, pool_size=2)
    try:
        first = use(eng)
        eng.dispose()
        assert not still_open(db_url, {first})
        second = use(eng)
        assert second != first
        assert still_open(db_url, {second}, within=0) == {second}
    finally:
        eng.dispose()
    assert not still_open(db_url, {second})


@pytest.mark.parametrize("driver", ["aiomysql", "asyncmy"])
def test_an_async_engines_dispose_closes_its_anchor(db_url: URL, tables: None, driver: str) -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    async def main() -> int:
        eng = create_async_engine(db_url.set(drivername=f"mysql+{driver}"))
        try:
            async with queue_session(lt_core, bind=eng, timeout=0.2, listen=0.1) as none:
                assert none is None
            return anchor_for(eng.sync_engine).thread_id
        finally:
            await eng.dispose()

    anchor = asyncio.run(main())
    assert not still_open(db_url, {anchor})
