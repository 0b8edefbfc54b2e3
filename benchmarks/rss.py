"""Worker memory: a fresh interpreter drains the queue with 4 threads and prints its RSS.

``python -m benchmarks.rss library|raw|runtime URL`` prints one JSON object
``{"jobs": n, "peak_kb": VmHWM, "rss_kb": VmRSS}``; run as a subprocess so nothing of the
benchmark driver is counted.
"""

from __future__ import annotations

import json
import sys
import threading
from typing import Any

from sqlalchemy import make_url

from .workers import RawLoop
from .workers import RuntimeLoop
from .workers import SessionLoop

THREADS = 4


def _status() -> dict[str, int]:
    values: dict[str, int] = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                values[key] = int(rest.split()[0])
    return values


def main(argv: list[str]) -> int:
    kind, url = argv[0], make_url(argv[1])
    engine: Any = None
    if kind != "raw":
        from .common import library_engine

        engine = library_engine(url, pool=THREADS)
    loop_class: Any = {"library": SessionLoop, "raw": RawLoop, "runtime": RuntimeLoop}[kind]
    loops = [loop_class(url, engine) for _ in range(THREADS)]
    counts = [0] * THREADS

    def drain(i: int) -> None:
        counts[i] = loops[i].consume()

    threads = [threading.Thread(target=drain, args=(i,)) for i in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    status = _status()
    for loop in loops:
        loop.close()
    print(json.dumps({"jobs": sum(counts), "peak_kb": status["VmHWM"], "rss_kb": status["VmRSS"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
