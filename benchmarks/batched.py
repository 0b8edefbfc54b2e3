"""Batched consume: ``queue_batch`` and the worker's ``batch_size`` against the raw batched
loop issuing the same statements, alternating, in threads and processes.

Portable: one ``SELECT ... LIMIT n FOR UPDATE SKIP LOCKED``, one ``executemany`` of
``DELETE ... WHERE id = %s`` and one COMMIT per batch.  Native (Q4M): a connection owns one
row at a time, so a batch holds one job and its raw counterpart is the raw one-job loop
(``queue_wait``, the owner's ``SELECT``, ``queue_end()``).
"""

from __future__ import annotations

from sqlalchemy.engine import URL

from .report import Progress
from .report import Report
from .report import Settings
from .report import alternate
from .report import drain
from .report import label
from .report import rate_row
from .workers import BatchLoop
from .workers import BatchRuntimeLoop
from .workers import RawBatchLoop
from .workers import RawNativeBatchLoop


def batched(url: URL, s: Settings, report: Report, progress: Progress) -> None:
    raw_class = RawNativeBatchLoop if s.native else RawBatchLoop
    raw_name = "the raw one-job loop" if s.native else "the raw batched loop"
    for kind, n in s.batch_workers:
        progress(f"batched consume {n} {kind}(s)")
        raw, lib, worker = alternate(
            s.repeats,
            *(
                lambda n=n, kind=kind, loop=loop: drain(
                    url, s.batch_jobs, kind, n, loop, s.batch_size
                )
                for loop in (raw_class, BatchLoop, BatchRuntimeLoop)
            ),
        )
        where = label(kind, n)
        for name, rate in (
            (f"`queue_batch(size={s.batch_size})`", lib),
            (f"worker runtime, batch_size={s.batch_size}", worker),
        ):
            report.rows.append(
                rate_row("batched", f"{name}, {where}", rate, raw, note=f"vs {raw_name}")
            )
