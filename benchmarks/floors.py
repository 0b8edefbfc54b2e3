"""``python -m benchmarks.floors [--url URL] [--jobs N] [--repeats R] [--consumers 1,2,8]
[--kind thread|process] [--only sync|asyncio]``: the throughput each layer under a consumer
path reaches against the raw loop in the same run, so that a path's ratio can be read against
what no implementation of it could beat on this machine.

One-job consumers (threads or processes), each layer of :mod:`benchmarks.layers` in turn: the
library's statements alone, then with the job built from the row (what every path yields),
then with the per-job guarantees (owner record, ownership watch, key look-ups), then
``queue_session(bind=connection)`` itself; on the portable backend also SQLAlchemy's
``Session`` alone (the ``Session`` bind's floor).  Then, per installed asyncio driver, the raw
loop, the same statements through SQLAlchemy's greenlet bridge (two crossings per job) built up
part by part (awaited on the pool's driver connections; crossing into a kept greenlet; a
new greenlet per crossing; SQLAlchemy's DBAPI adapter: the bridge itself), and
``async_queue_session(bind=AsyncConnection)``, at the same numbers of tasks in one event loop.
Best of ``R`` alternating drains of ``N`` jobs.  Works in a database of its own on the server
of ``--url``, dropped at the end.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from .asyncio_bench import AsyncDrain
from .asyncio_bench import drivers
from .common import bench_database
from .common import bench_parser
from .layers import GuardedLoop
from .layers import JobObjectLoop
from .layers import SessionFloorLoop
from .layers import StatementLoop
from .report import alternate
from .report import drain
from .workers import RawLoop
from .workers import RawNativeLoop
from .workers import SessionLoop

#: (name, factory, extra arguments) of each side; the raw loop first.
Side = tuple[str, Callable[..., Any], tuple[Any, ...]]


def sync_sides(native: bool) -> list[Side]:
    sides: list[Side] = [
        ("raw loop", RawNativeLoop if native else RawLoop, ()),
        ("statements", StatementLoop, ()),
        ("+ job", JobObjectLoop, ()),
        ("+ guarantees", GuardedLoop, ()),
        ("queue_session", SessionLoop, ()),
    ]
    if not native:
        sides.append(("Session alone", SessionFloorLoop, ()))
    return sides


def async_sides(driver: str, native: bool, tasks: int) -> list[Side]:
    return [
        (f"{driver} raw", AsyncDrain, (driver, "raw", tasks, native)),
        ("driver_connection", AsyncDrain, (driver, "driver", tasks, native)),
        ("+ kept greenlet", AsyncDrain, (driver, "reused", tasks, native)),
        ("+ greenlet_spawn", AsyncDrain, (driver, "unadapted", tasks, native)),
        ("+ adapter = bridge", AsyncDrain, (driver, "bridge", tasks, native)),
        ("queue_session", AsyncDrain, (driver, "connection", tasks, native)),
    ]


def _line(url: Any, jobs: int, repeats: int, kind: str, workers: int, sides: list[Side]) -> str:
    rates = alternate(
        repeats,
        *(
            lambda factory=factory, args=args: drain(url, jobs, kind, workers, factory, *args)
            for _, factory, args in sides
        ),
    )
    cells = [
        f"{name} {rate:7,.0f} ({rate / rates[0]:.2f})"
        for (name, _, _), rate in zip(sides, rates, strict=True)
    ]
    return " | ".join(cells)


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser("python -m benchmarks.floors", __doc__, 4_000)
    parser.add_argument("--consumers", default="1,2,8", help="comma-separated counts")
    parser.add_argument("--kind", choices=("thread", "process"), default="thread")
    parser.add_argument(
        "--only", choices=("sync", "asyncio"), help="the sync layers or the asyncio floors alone"
    )
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.consumers.split(",")]
    with bench_database(args.url) as (url, native):
        print(
            f"backend: {'native' if native else 'portable'}; jobs/s (x raw), best of {args.repeats}"
        )
        if args.only != "asyncio":
            for n in counts:
                line = _line(url, args.jobs, args.repeats, args.kind, n, sync_sides(native))
                print(f"{n} {args.kind}(s): {line}", flush=True)
        if args.only == "sync":
            return 0
        for driver in drivers():
            for n in counts:
                line = _line(
                    url, args.jobs, args.repeats, "thread", 1, async_sides(driver, native, n)
                )
                print(f"{n} task(s): {line}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
