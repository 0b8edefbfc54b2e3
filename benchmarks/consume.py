"""Consume, one job at a time: every documented bind and the worker against the raw loop of
the same backend, alternating, at 1, 2, 4 and 8 threads and processes; and the commands each
sends per job, against the raw loop's."""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine import URL

from .report import Progress
from .report import Report
from .report import Settings
from .report import alternate
from .report import commands_per_job
from .report import drain
from .report import label
from .report import rate_row
from .report import statements_row
from .workers import BatchLoop
from .workers import BatchRuntimeLoop
from .workers import ConsumerLoop
from .workers import CoreSessionLoop
from .workers import EngineSessionLoop
from .workers import OrmSessionLoop
from .workers import RawBatchLoop
from .workers import RawLoop
from .workers import RawNativeBatchLoop
from .workers import RawNativeLoop
from .workers import RawNativeRetryLoop
from .workers import RawRetryLoop
from .workers import RetryRuntimeLoop
from .workers import RuntimeLoop
from .workers import SessionLoop

#: The library consumers of the consume rows, on both backends: (loop, how the row names it).
CONSUMERS: tuple[tuple[Any, str], ...] = (
    (SessionLoop, "`queue_session(bind=connection)`"),
    (EngineSessionLoop, "`queue_session(bind=engine)`"),
    (OrmSessionLoop, "`queue_session(bind=Session(engine))`"),
    (ConsumerLoop, "`queue_consumer(bind=engine)`, `take()` per job"),
    (RuntimeLoop, "worker runtime `Job.run_once`"),
)

#: Measured at one thread only: the Core table's Rows instead of ORM instances.
CORE = (CoreSessionLoop, "`queue_session(core_table, bind=connection)` (yields Rows)")

#: The worker on a ``RetryMixin`` table (its waits have the condition ``run_at <= now``),
#: against a raw loop claiming with the same condition, on a table of its own.
RETRY = (RetryRuntimeLoop, "worker runtime on a `RetryMixin` table (`run_at <= now`)")


def raw_loop(s: Settings) -> Any:
    """The raw one-job loop of the backend: SKIP LOCKED + DELETE + COMMIT, or Q4M's
    ``queue_wait``/owner ``SELECT``/``queue_end`` with autocommit."""
    return RawNativeLoop if s.native else RawLoop


def raw_retry_loop(s: Settings) -> Any:
    """:func:`raw_loop` on the retry table, with the condition ``run_at <= now``."""
    return RawNativeRetryLoop if s.native else RawRetryLoop


def consume(url: URL, s: Settings, report: Report, progress: Progress) -> None:
    raw_class = raw_loop(s)
    progress("commands per job")
    statements(url, s, report)
    for kind in ("thread", "process"):
        for n in s.concurrency:
            progress(f"consume {n} {kind}(s)")
            consumers = [*CONSUMERS, CORE] if (kind, n) == ("thread", 1) else [*CONSUMERS]
            loops = [raw_class, *(loop for loop, _ in consumers)]
            rates = alternate(
                s.consume_repeats,
                *(
                    lambda n=n, kind=kind, loop=loop: drain(url, s.consume_jobs, kind, n, loop)
                    for loop in loops
                ),
            )
            for (_, name), rate in zip(consumers, rates[1:], strict=True):
                report.rows.append(rate_row("consume", f"{name}, {label(kind, n)}", rate, rates[0]))
            raw_rate, rate = alternate(
                s.consume_repeats,
                *(
                    lambda n=n, kind=kind, loop=loop: drain(url, s.consume_jobs, kind, n, loop)
                    for loop in (raw_retry_loop(s), RETRY[0])
                ),
            )
            report.rows.append(
                rate_row(
                    "consume",
                    f"{RETRY[1]}, {label(kind, n)}",
                    rate,
                    raw_rate,
                    note="vs the raw loop claiming with the same condition",
                )
            )


def statements(url: URL, s: Settings, report: Report) -> None:
    """What each consumer sends per job, counted at the driver: the round trips behind the
    ratios, which must be the raw loop's."""
    count = min(s.consume_jobs, 500)
    raw_class = raw_loop(s)
    raw = commands_per_job(url, count, raw_class)
    for loop, name in (*CONSUMERS, CORE):
        report.rows.append(
            statements_row(
                f"commands sent per job, {name}, 1 thread",
                commands_per_job(url, count, loop),
                raw,
            )
        )
    report.rows.append(
        statements_row(
            f"commands sent per job, {RETRY[1]}, 1 thread",
            commands_per_job(url, count, RETRY[0]),
            commands_per_job(url, count, raw_retry_loop(s)),
            note="vs the raw loop claiming with the same condition",
        )
    )
    size = s.batch_size
    batch_raw = commands_per_job(url, count, RawNativeBatchLoop if s.native else RawBatchLoop, size)
    what = "the raw one-job loop (a Q4M batch holds one job)" if s.native else "the raw batch"
    for loop, name in (
        (BatchLoop, f"`queue_batch(size={size})`"),
        (BatchRuntimeLoop, f"worker runtime, batch_size={size}"),
    ):
        report.rows.append(
            statements_row(
                f"commands sent per job, {name}, 1 thread",
                commands_per_job(url, count, loop, size),
                batch_raw,
                note=f"vs {what}",
            )
        )
