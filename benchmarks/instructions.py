"""``python -m benchmarks.instructions [--url URL] [--jobs N] [--only TEXT ...]``: the client
instructions per job of each path of :mod:`benchmarks.cpu` and of its raw loop, counted by
valgrind's callgrind.

CPU time per job moves by 10-20% from one run to the next on a machine whose cores the server
and other work share, more than most changes to the library's per-job code would move it.
An instruction count does not: the client's user-space instructions per job repeat within
about 1% from one run to the next, whatever else the machine does.  Each path runs in a child
process under ``valgrind --tool=callgrind`` twice, draining a queue the parent
filled beforehand with ``N`` jobs, then with ``5 N``; the difference divided by ``4 N`` is the
instructions per job, the child's start (imports, connecting, the warm-up) cancelled out.
``PYTHONHASHSEED`` is fixed so that both children hash alike.  What is not counted: the
kernel's work (the socket calls, the same for every loop sending the same statements) and the
server's.  The ratio to the raw loop of the same group is client work only; where the client's
CPU sets the pace (Q4M, many threads under the GIL) a throughput ratio follows it.

Needs ``valgrind`` on the PATH (Debian: ``apt-get install valgrind``); each child takes about
half a minute (valgrind runs Python about 50 times slower).  Works in a database of its own on
the server of ``--url``, dropped at the end.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from sqlalchemy.engine import URL
from sqlalchemy.engine import make_url

from .common import TABLE
from .common import bench_database
from .common import default_url
from .common import fill
from .common import server_backend
from .cpu import Path
from .cpu import paths

#: What callgrind prints of the instructions it counted (on stderr, at the child's exit).
COLLECTED = re.compile(r"Collected : (\d+)")

#: Each child drains ``N`` jobs, then ``SCALE * N``.
SCALE = 5

#: A child's tail of stderr shown when it fails.
TAIL = 3000

Counter = Callable[[URL, tuple[int, int], int], int]


def _groups(native: bool) -> list[list[Path]]:
    return paths(native, 200)


def _child(url: str, group: int, index: int) -> int:
    """In the child: drain the queue with path ``index`` of ``group``; print how many."""
    target = make_url(url)
    native = server_backend(target) == "native"
    _, make = _groups(native)[group][index]
    loop = make(target)
    try:
        done = loop.consume()
    finally:
        loop.close()
    print(f"drained {done}")
    return 0


def valgrind_count(url: URL, where: tuple[int, int], expected: int) -> int:
    """The instructions a child counted draining the queue with the path at ``where``."""
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    command = [
        "valgrind",
        "--tool=callgrind",
        "--callgrind-out-file=/dev/null",
        sys.executable,
        "-m",
        "benchmarks.instructions",
        "--child",
        url.render_as_string(hide_password=False),
        str(where[0]),
        str(where[1]),
    ]
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    drained = re.search(r"drained (\d+)", done.stdout)
    collected = COLLECTED.search(done.stderr)
    if done.returncode != 0 or drained is None or collected is None:
        raise RuntimeError(f"child {where} failed:\n{done.stdout}\n{done.stderr[-TAIL:]}")
    if int(drained.group(1)) != expected:
        raise RuntimeError(f"child {where} drained {drained.group(1)} of {expected} jobs")
    return int(collected.group(1))


def per_job(url: URL, where: tuple[int, int], jobs: int, table: str, count: Counter) -> float:
    """Instructions per job of the path at ``where``: two children, ``jobs`` and
    ``SCALE * jobs`` jobs, the difference divided by the difference in jobs."""
    totals = []
    for n in (jobs, SCALE * jobs):
        fill(url, n, table)
        totals.append(count(url, where, n))
    return (totals[1] - totals[0]) / ((SCALE - 1) * jobs)


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--child"]:
        return _child(argv[1], int(argv[2]), int(argv[3]))
    parser = argparse.ArgumentParser(prog="python -m benchmarks.instructions", description=__doc__)
    parser.add_argument("--url", default=default_url())
    parser.add_argument("--jobs", type=int, default=100, help="N: the smaller drain")
    parser.add_argument(
        "--only",
        nargs="*",
        default=[],
        help="only the paths whose name contains one of these (the raw loops always run)",
    )
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None:
        parser.error("valgrind is not installed (Debian: apt-get install valgrind)")
    with bench_database(args.url) as (url, native):
        print(f"backend: {'native' if native else 'portable'}; instructions per job (callgrind)")
        for g, group in enumerate(_groups(native)):
            chosen = [
                i
                for i, (name, _) in enumerate(group)
                if i == 0 or not args.only or any(text in name for text in args.only)
            ]
            if len(chosen) == 1 and args.only:
                continue
            print()
            raw = None
            for i in chosen:
                name, make = group[i]
                table: Any = getattr(make, "table", TABLE)
                count = per_job(url, (g, i), args.jobs, table, valgrind_count)
                raw = raw or count
                print(f"{name:58} {count:10,.0f} instructions/job  {count / raw:5.2f} x raw")
                sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
