"""What the scenarios share: their sizes (:class:`Settings`), the report's rows and targets,
alternating measures and draining the queue with one kind of consumer."""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from dataclasses import field
from dataclasses import replace
from typing import Any

import pymysql
from sqlalchemy.engine import URL

from .common import TABLE
from .common import fill
from .common import remaining
from .common import run_parallel

#: Every throughput row's target: the library at least this fraction of the raw loop.
RATIO = 0.85


@dataclass
class Settings:
    """How big each scenario is; ``quick()`` is the CI smoke size."""

    enqueue_jobs: int = 20_000
    enqueue_single_jobs: int = 1_000
    #: One-job-per-call rows sit near their target and the machine is shared: more repeats.
    single_repeats: int = 5
    consume_jobs: int = 5_000
    concurrency: tuple[int, ...] = (1, 2, 4, 8)
    repeats: int = 3
    #: Consume ratios sit near their target and the machine is shared: more repeats.
    consume_repeats: int = 5
    latency_samples: int = 200
    latency_gap: float = 0.1
    idle_seconds: float = 10.0
    rss_jobs: int = 2_000
    batch_jobs: int = 30_000
    batch_size: int = 200
    batch_workers: tuple[tuple[str, int], ...] = tuple(
        (kind, n) for kind in ("thread", "process") for n in (1, 2, 4, 8)
    )
    #: ``native`` on a Q4M server (``ENGINE=QUEUE``), else ``portable``: set by ``__main__``
    #: from what the server has, as ``queue_session`` detects it.
    backend: str = "portable"

    @property
    def native(self) -> bool:
        return self.backend == "native"

    def for_native(self) -> Settings:
        """Sizes for a Q4M server, where a durable ``queue_end()`` per job makes one
        consumer several times slower than on InnoDB here: fewer jobs per consume run and
        fewer repeats, so the whole native run stays near ten minutes.  A native batch holds
        one job (a Q4M connection owns one row), so batched runs are consume-sized."""
        return replace(
            self,
            backend="native",
            consume_jobs=min(self.consume_jobs, 2_000),
            consume_repeats=min(self.consume_repeats, 3),
            batch_jobs=min(self.batch_jobs, self.consume_jobs, 2_000),
        )

    @classmethod
    def tiny(cls) -> Settings:
        """Every row, with almost no work: the test suite's smoke run."""
        return cls(
            enqueue_jobs=200,
            enqueue_single_jobs=20,
            single_repeats=1,
            consume_jobs=40,
            repeats=1,
            consume_repeats=1,
            latency_samples=5,
            latency_gap=0.05,
            idle_seconds=0.5,
            rss_jobs=40,
            batch_jobs=400,
            batch_size=50,
            batch_workers=(("thread", 1), ("process", 2)),
        )

    @classmethod
    def quick(cls) -> Settings:
        """Every row, small: under a minute per backend on an idle 2-core machine (CI)."""
        return cls(
            enqueue_jobs=2_000,
            enqueue_single_jobs=100,
            single_repeats=1,
            consume_jobs=200,
            repeats=1,
            consume_repeats=1,
            latency_samples=15,
            latency_gap=0.05,
            idle_seconds=1.0,
            rss_jobs=300,
            batch_jobs=1_500,
        )


@dataclass
class Row:
    """One line of the report: the library's figure, the baseline's, their ratio, the
    target and whether this run met it."""

    section: str
    scenario: str
    library: float
    raw: float
    unit: str
    target: str = ""
    met: bool | None = None
    note: str = ""
    higher_is_better: bool = True

    @property
    def ratio(self) -> float:
        return self.library / self.raw if self.raw else 0.0


def rate_row(section: str, scenario: str, library: float, raw: float, note: str = "") -> Row:
    """A throughput row against the raw loop of the same run: target ratio >= 0.85."""
    met = raw > 0 and library / raw >= RATIO
    return Row(section, scenario, library, raw, "jobs/s", f">= {RATIO}", met, note)


def statements_row(scenario: str, library: float, raw: float, note: str = "") -> Row:
    """Commands sent per job, counted at the driver: target the raw loop's count."""
    return Row(
        "statements",
        scenario,
        library,
        raw,
        "per job",
        "= raw",
        abs(library - raw) < 0.05,
        note,
        higher_is_better=False,
    )


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


Progress = Callable[[str], None]


def label(kind: str, n: int) -> str:
    plural = {"thread": "threads", "process": "processes", "task": "tasks"}[kind]
    return f"{n} {kind if n == 1 else plural}"


def alternate(repeats: int, *measures: Callable[[], float]) -> list[float]:
    """Run the measures alternately ``repeats`` times; keep each one's best rate (the run
    least disturbed by anything else on the machine)."""
    best = [0.0] * len(measures)
    for _ in range(repeats):
        for i, measure in enumerate(measures):
            best[i] = max(best[i], measure())
    return best


def drain(url: URL, count: int, kind: str, workers: int, factory: Any, *args: Any) -> float:
    """Fill the queue with ``count`` jobs, drain it with ``workers`` consumers made by
    ``factory`` in threads or processes, check every job was done once: jobs/s."""
    table = getattr(factory, "table", TABLE)  # the retry rows' loops: their own table
    fill(url, count, table)
    run = run_parallel(kind, workers, factory, url, *args)
    left = remaining(url, table)
    if left or run.jobs != count:
        raise RuntimeError(
            f"{factory.__name__} x{workers} {kind}: {run.jobs} of {count} jobs done, "
            f"{left} left in the queue"
        )
    return run.rate


def commands_per_job(url: URL, count: int, loop: Any, *args: Any) -> float:
    """Commands (queries, COMMIT, ROLLBACK) one consumer sends per job, counted at the
    driver while ``loop`` drains ``count`` jobs, less what it sends to find an empty queue
    (measured on its own): the marginal cost of a job."""
    tail = _commands(url, 0, loop, *args)
    return (_commands(url, count, loop, *args) - tail) / count


def _commands(url: URL, count: int, loop: Any, *args: Any) -> int:
    fill(url, count, getattr(loop, "table", TABLE))
    worker = loop(url, *args)
    try:
        with counting() as sent:
            done = worker.consume()
    finally:
        worker.close()
    if done != count:
        raise RuntimeError(f"{loop.__name__}: {done} of {count} jobs done")
    return sent[0]


@contextmanager
def counting() -> Iterator[list[int]]:
    """Count every command PyMySQL sends (queries, COMMIT, ROLLBACK, ping) inside the block:
    ``with counting() as sent: ...`` then ``sent[0]``."""
    sent = [0]
    original = pymysql.connections.Connection._execute_command

    def count(self: Any, command: int, sql: Any) -> Any:
        sent[0] += 1
        return original(self, command, sql)

    pymysql.connections.Connection._execute_command = count
    try:
        yield sent
    finally:
        pymysql.connections.Connection._execute_command = original
