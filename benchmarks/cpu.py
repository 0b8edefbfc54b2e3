"""``python -m benchmarks.cpu [--url URL] [--jobs N] [--repeats R] [--top K]``: where
one consumer's client CPU goes, per job, for each library path and its raw loop.

Client CPU (``time.process_time()``, and user CPU alone) per job, each loop draining ``N``
jobs in this thread, alternating, best of ``R``: unlike throughput it hardly moves when other
work shares the cores.  The first group takes the one-consumer path apart
(:mod:`benchmarks.layers`): the library's statements alone, then with the job built from the
row, then the queue session, then the worker, each row adding one layer.  Each asyncio group
does the same for SQLAlchemy's greenlet bridge (:data:`SIDE_NAMES`): the raw loop's statements
awaited on the driver's connection, then crossing into a kept greenlet, into a new one per
crossing, and through the DBAPI adapter, before the library's asyncio paths.  Then, for each
library path, the functions that cost the most own time per job under cProfile timed by
``process_time`` (CPU only: waiting for the server is not counted; the profiler inflates
every call about alike, so compare the rows, not the absolute µs).
Works in a database of its own on the server of ``--url``, dropped at the end.
"""

from __future__ import annotations

import cProfile
import pstats
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy.engine import URL

from .asyncio_bench import AsyncDrain
from .asyncio_bench import drivers
from .common import TABLE
from .common import bench_database
from .common import bench_parser
from .common import fill
from .layers import GuardedLoop
from .layers import JobObjectLoop
from .layers import SessionFloorLoop
from .layers import StatementLoop
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

#: The asyncio groups' floor sides, in the order they are listed, and how each is named.
SIDE_NAMES = {
    "driver": "raw SQL awaited on SQLAlchemy's driver_connection",
    "reused": "  + crossing into a kept greenlet (the library's cross)",
    "unadapted": "  + a new greenlet per crossing (greenlet_spawn)",
    "bridge": "  + SQLAlchemy's DBAPI adapter: the greenlet bridge alone",
}

#: (name, loop factory taking the URL) of each path, the raw baseline first in each group.
Path = tuple[str, Callable[[URL], Any]]


def paths(native: bool, size: int) -> list[list[Path]]:
    raw = RawNativeLoop if native else RawLoop
    raw_batch = RawNativeBatchLoop if native else RawBatchLoop
    # a portable Session bind claims in the Session's transaction: what that alone costs
    session_floor: list[Path] = (
        []
        if native
        else [("  its floor: SQLAlchemy's Session alone (layers.py)", SessionFloorLoop)]
    )
    groups: list[list[Path]] = [
        [
            ("raw one-job loop", raw),
            ("library statements only (layers.py)", StatementLoop),
            ("  + the job built from the row", JobObjectLoop),
            ("  + the per-job guarantees (owner record, watch, keys)", GuardedLoop),
            ("  + queue_session(bind=connection)", SessionLoop),
            ("  + the worker (Job.run_once)", RuntimeLoop),
        ],
        [
            ("raw one-job loop", raw),
            ("queue_session(bind=connection)", SessionLoop),
            ("queue_session(bind=engine)", EngineSessionLoop),
            ("queue_session(bind=Session(engine))", OrmSessionLoop),
            ("queue_consumer(bind=engine)", ConsumerLoop),
            *session_floor,
            ("queue_session(core_table, bind=connection)", CoreSessionLoop),
            ("worker Job.run_once", RuntimeLoop),
        ],
        [
            ("raw one-job loop, `run_at <= now`", RawNativeRetryLoop if native else RawRetryLoop),
            ("worker on a RetryMixin table", RetryRuntimeLoop),
        ],
        [
            (f"raw batched loop (size={size})", lambda url: raw_batch(url, size)),
            (f"queue_batch(size={size})", lambda url: BatchLoop(url, size)),
            (f"worker batch_size={size}", lambda url: BatchRuntimeLoop(url, size)),
        ],
    ]
    for driver in drivers():
        groups.append(
            [
                (
                    f"{driver}: {SIDE_NAMES.get(side, side)}",
                    lambda url, d=driver, side=side: AsyncDrain(url, d, side, 1, native),
                )
                for side in ("raw", *SIDE_NAMES, "connection", "engine", "consumer", "worker")
            ]
        )
    return groups


def _user_time() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_utime


def _cpu(
    url: URL, make: Callable[[URL], Any], jobs: int, profile: Any = None
) -> tuple[float, float]:
    """Client CPU seconds per job of one loop draining ``jobs`` jobs in this thread: all of
    it (``process_time``), and user CPU only (without the kernel's socket work, the same for
    every loop sending the same statements: what the library's own code adds shows best)."""
    fill(url, jobs, getattr(make, "table", TABLE))  # the retry loops: their own table
    loop = make(url)
    try:
        if profile is not None:
            profile.enable()
        start, user = time.process_time(), _user_time()
        done = loop.consume()
        cpu, user = time.process_time() - start, _user_time() - user
        if profile is not None:
            profile.disable()
    finally:
        loop.close()
    if done != jobs:
        raise RuntimeError(f"{done} of {jobs} jobs done")
    return cpu / jobs, user / jobs


#: Where a function's own time is counted: the first of these its file path contains.
PACKAGES = (
    ("sqlalchemy_q4m/", "sqlalchemy_q4m"),
    ("sqlalchemy/orm/", "sqlalchemy.orm"),
    ("sqlalchemy/engine/", "sqlalchemy.engine"),
    ("sqlalchemy/sql/", "sqlalchemy.sql"),
    ("sqlalchemy/ext/asyncio/", "sqlalchemy.ext.asyncio"),
    ("sqlalchemy/", "sqlalchemy (other)"),
    ("pymysql/", "driver"),
    ("aiomysql/", "driver"),
    ("asyncmy", "driver"),
    ("asyncio/", "asyncio"),
    ("benchmarks/", "benchmark loop"),
)


def _package(filename: str) -> str:
    for part, name in PACKAGES:
        if part in filename:
            return name
    return "builtins and C" if filename == "~" else "other"


def _top(profile: cProfile.Profile, jobs: int, top: int) -> list[str]:
    """Own CPU per job by package, then the costliest functions outside the driver."""
    stats: dict[Any, Any] = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    by_package: dict[str, float] = {}
    for (filename, _, _), (_, _, tottime, _, _) in stats.items():
        name = _package(filename)
        by_package[name] = by_package.get(name, 0.0) + tottime
    parts = sorted(by_package.items(), key=lambda item: -item[1])
    lines = ["    by package: " + ", ".join(f"{n} {t / jobs * 1e6:.0f}" for n, t in parts)]
    rows = sorted(stats.items(), key=lambda item: item[1][2], reverse=True)
    shown = 0
    for (filename, line, name), (_, calls, tottime, cumtime, _) in rows:
        if _package(filename) in ("driver", "builtins and C", "asyncio") or shown >= top:
            continue
        shown += 1
        where = filename.split("site-packages/")[-1].split("/wt/bench/")[-1]
        lines.append(
            f"    {tottime / jobs * 1e6:6.1f} own {cumtime / jobs * 1e6:7.1f} cum "
            f"{calls / jobs:5.1f}/job  {name} ({where}:{line})"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser("python -m benchmarks.cpu", __doc__, 1_000)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--size", type=int, default=200, help="batch size")
    args = parser.parse_args(argv)
    with bench_database(args.url) as (url, native):
        print(f"backend: {'native' if native else 'portable'}; {args.jobs} jobs per drain")
        for index, group in enumerate(paths(native, args.size)):
            best = [float("inf")] * len(group)
            user = [float("inf")] * len(group)
            for _ in range(args.repeats):
                for i, (_, make) in enumerate(group):
                    cpu, own = _cpu(url, make, args.jobs)
                    best[i], user[i] = min(best[i], cpu), min(user[i], own)
            print()
            for (name, _), cpu, own in zip(group, best, user, strict=True):
                print(
                    f"{name:48} {cpu * 1e6:7.1f} µs CPU/job  CPU {cpu / best[0]:5.2f} x raw"
                    f"   user {own * 1e6:6.1f} µs  {own / user[0]:5.2f} x raw"
                )
            if index == 0:  # the layers: their rows are profiled in the groups below
                continue
            for name, make in group:
                profile = cProfile.Profile(time.process_time)
                _cpu(url, make, args.jobs, profile)
                print(f"  {name}: own CPU µs per job under cProfile")
                print("\n".join(_top(profile, args.jobs, args.top)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
