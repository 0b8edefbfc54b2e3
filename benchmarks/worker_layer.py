"""``python -m benchmarks.worker_layer [--backend portable|native] [--top K]``: the client CPU
the worker layer alone adds per job, without a server.

The worker's consumer (``Job.run_once``, and ``Consumer.run_once`` with ``batch_size = 200``)
runs over stand-ins for ``QueueConsumer`` (its queue sessions) and ``QueueBatch`` that hand out
one prepared job (a batch of 200) and end it without I/O, so what is timed is the worker's own
steps: the waits' options and conditions, ``_before_execute``, the ``JobRun``, ``settle``, the
log lines, the counters.  The stand-ins cost what the real ones cost outside their I/O only for
``subscriptions()`` (called when the condition changes, as ``QueueConsumer`` calls it).
``time.process_time`` per job, best of 7; a table without and one with ``run_at``
(``RetryMixin``: each wait has a condition).
Unlike ``benchmarks.cpu`` it hardly moves when other work shares the cores; it says nothing
about the consumer layer and the backends under the worker (see ``benchmarks.cpu`` for those).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from typing import Any
from typing import ClassVar

from sqlalchemy import String
from sqlalchemy import create_engine
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.orm import Mapped
from sqlalchemy.orm import mapped_column

import sqlalchemy_q4m.worker.consumer as consumer_module
from sqlalchemy_q4m import QueueMixin
from sqlalchemy_q4m import RetryMixin
from sqlalchemy_q4m.backends import get_backend
from sqlalchemy_q4m.schema.functions import subscriptions
from sqlalchemy_q4m.types import new_job_id
from sqlalchemy_q4m.worker import Consumer
from sqlalchemy_q4m.worker import Job
from sqlalchemy_q4m.worker.targets import resolve_targets

BATCH = 200


class Base(DeclarativeBase):
    pass


class PlainJob(QueueMixin, Base):
    __tablename__ = "worker_layer_plain"
    payload: Mapped[str] = mapped_column(String(64))


class TimedJob(QueueMixin, RetryMixin, Base):
    __tablename__ = "worker_layer_timed"
    payload: Mapped[str] = mapped_column(String(64))


class FakeConnection:
    invalidated = False
    closed = False


class FakeSession:
    """``QueueSession`` without I/O: ``wait`` hands out :attr:`item`, ``end`` ends it."""

    item: Any = None
    backend_name = "portable"

    def __init__(self, *targets: Any, bind: Any, where: Any = None, **options: Any) -> None:
        self.subscription = subscriptions(targets, where)[0]
        self.backend = get_backend(self.backend_name)  # type: ignore[arg-type]
        self.owning = False
        self.accept_unloadable = False

    def wait(self) -> Any:
        self.owning = True
        return FakeSession.item

    def end(self) -> None:
        self.owning = False

    def abort(self) -> None:
        self.owning = False

    def close(self) -> None:
        self.owning = False


class FakeConsumer:
    """``QueueConsumer`` without I/O: each ``take`` renews one :class:`FakeSession` (its
    subscriptions rebuilt only when the condition changes, as the real one does)."""

    def __init__(self, *targets: Any, bind: Any, **options: Any) -> None:
        self.targets, self.bind = targets, bind
        self.session = FakeSession(*targets, bind=bind)
        self.where: Any = None
        self.accept_unloadable = False

    def take(self, *, timeout: Any = None, where: Any = None) -> FakeSession:
        session = self.session
        if where is not self.where:
            session.subscription = subscriptions(self.targets, where)[0]
            self.where = where
        session.owning = False
        return session


class FakeBatch:
    """``QueueBatch`` without I/O: ``wait`` hands out :attr:`items`."""

    items: ClassVar[list[Any]] = []

    def __init__(
        self, *targets: Any, bind: Any, size: int, where: Any = None, **options: Any
    ) -> None:
        self.subscription = subscriptions(targets, where)[0]
        self.accept_unloadable = False
        self.pending: set[int] = set()

    def wait(self) -> list[Any]:
        self.pending = {id(item) for item in FakeBatch.items}
        return list(FakeBatch.items)

    def subscription_of(self, item: Any) -> Any:
        return self.subscription

    def holds(self, item: Any) -> bool:
        return id(item) in self.pending

    def end(self, item: Any) -> None:
        self.pending.discard(id(item))

    def abort(self, item: Any) -> None:
        self.pending.discard(id(item))

    def close(self) -> None:
        pass

    def give_back(self) -> None:
        pass


def consumer_for(model: Any, batch_size: int, backend: str) -> tuple[Job, Consumer]:
    """A job object of ``model`` and its consumer, ready as after ``connect()``."""

    class NoOpJob(Job):
        max_attempts = 1

        def execute(self, job: Any) -> None:
            return None

    NoOpJob.model = model
    engine = create_engine("mysql+pymysql://nobody@127.0.0.1:1/none")  # never connects
    job = NoOpJob(engine, batch_size=batch_size)
    consumer = job._get_consumer()
    conn: Any = FakeConnection()
    consumer._conn = conn
    consumer.connect = lambda: conn  # type: ignore[method-assign]
    consumer._backend = "native" if backend == "native" else "portable"
    consumer._serve(resolve_targets(consumer.jobs, conn))
    consumer._ready = True
    return job, consumer


def drain(model: Any, batch_size: int, backend: str, turns: int) -> tuple[Any, int]:
    """The loop to time (one call: ``turns`` turns) and the jobs it handles."""
    job, consumer = consumer_for(model, batch_size, backend)
    if batch_size > 1:
        FakeBatch.items = [model(id=new_job_id(), payload="x") for _ in range(batch_size)]

        def batches() -> None:
            for _ in range(turns):
                consumer.run_once(0)

        return batches, turns * batch_size
    FakeSession.item = model(id=new_job_id(), payload="x")

    def jobs() -> None:
        for _ in range(turns):
            job.run_once(0)

    return jobs, turns


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.worker_layer", description=__doc__)
    parser.add_argument("--backend", choices=("portable", "native"), default="portable")
    parser.add_argument("--top", type=int, default=0, help="cProfile rows per path (0: none)")
    args = parser.parse_args(argv)
    consumer_module.QueueConsumer = FakeConsumer  # type: ignore[misc,assignment]
    consumer_module.QueueBatch = FakeBatch  # type: ignore[misc,assignment]
    FakeSession.backend_name = args.backend
    rows = [("run_once", 1, 5000)]
    if args.backend == "portable":  # the native backend takes one job at a time
        rows.append((f"batch_size={BATCH}", BATCH, 25))
    print(f"backend: {args.backend}; worker layer only, no I/O")
    for name, size, turns in rows:
        for label, model in (("no run_at", PlainJob), ("run_at (RetryMixin)", TimedJob)):
            best = float("inf")
            for _ in range(7):
                loop, jobs = drain(model, size, args.backend, turns)
                start = time.process_time()
                loop()
                best = min(best, (time.process_time() - start) / jobs)
            print(f"{name:16} {label:20} {best * 1e6:6.2f} µs CPU/job")
            if args.top:
                loop, jobs = drain(model, size, args.backend, turns)
                profile = cProfile.Profile(time.process_time)
                profile.runcall(loop)
                pstats.Stats(profile).sort_stats("tottime").print_stats(args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
