"""Worker memory: a fresh interpreter drains the queue with 4 threads and prints its RSS.

``python -m benchmarks.rss library|raw|raw-native|runtime URL`` prints one JSON object
``{"jobs": n, "peak_kb": VmHWM, "rss_kb": VmRSS}``; run as a subprocess so nothing of the
benchmark driver is counted.  The raw worker imports PyMySQL only (no SQLAlchemy), so the
difference is what the library and its dependencies cost.
"""

from __future__ import annotations

import json
import sys
import threading
from typing import Any
from urllib.parse import unquote
from urllib.parse import urlsplit

THREADS = 4
TABLE = "q4m_bench_jobs"  # benchmarks.common.TABLE, not imported: it would load SQLAlchemy


def _status() -> dict[str, int]:
    values: dict[str, int] = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                values[key] = int(rest.split()[0])
    return values


class _PlainRawLoop:
    """The raw claim/complete loop with nothing but PyMySQL imported."""

    def __init__(self, url: str) -> None:
        import pymysql

        self.errors = pymysql.err
        parts = urlsplit(url)
        self.conn = pymysql.connect(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or 3306,
            user=unquote(parts.username or "root"),
            password=unquote(parts.password or ""),
            database=parts.path.lstrip("/") or None,
        )
        with self.conn.cursor() as cur:
            cur.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")

    def consume(self) -> int:
        done = 0
        with self.conn.cursor() as cur:
            while True:
                cur.execute(f"SELECT id FROM {TABLE} ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED")
                row = cur.fetchone()
                if row is None:
                    self.conn.rollback()
                    return done
                try:
                    cur.execute(f"DELETE FROM {TABLE} WHERE id = %s", (row[0],))
                except self.errors.OperationalError as err:
                    if err.args[0] != 1213:  # a deadlock victim: the job returns
                        raise
                    self.conn.rollback()
                    continue
                self.conn.commit()
                done += 1

    def close(self) -> None:
        self.conn.close()


class _PlainRawNativeLoop(_PlainRawLoop):
    """Q4M's raw loop (autocommit on): ``queue_wait``, the owner's ``SELECT``, ``queue_end()``."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.conn.autocommit(True)

    def consume(self) -> int:
        done = 0
        with self.conn.cursor() as cur:
            while True:
                cur.execute(f"SELECT queue_wait('{TABLE}', 0)")
                (got,) = cur.fetchone()
                if not got:
                    cur.execute("SELECT queue_end()")
                    return done
                cur.execute(f"SELECT id FROM {TABLE}")
                cur.fetchone()
                cur.execute("SELECT queue_end()")
                done += 1


def main(argv: list[str]) -> int:
    kind, url = argv[0], argv[1]
    loops: list[Any]
    if kind in ("raw", "raw-native"):
        raw_class = _PlainRawNativeLoop if kind == "raw-native" else _PlainRawLoop
        loops = [raw_class(url) for _ in range(THREADS)]
    else:
        from sqlalchemy import make_url

        from .common import library_engine
        from .workers import RuntimeLoop
        from .workers import SessionLoop

        engine = library_engine(make_url(url), pool=THREADS)
        loop_class: Any = {"library": SessionLoop, "runtime": RuntimeLoop}[kind]
        loops = [loop_class(make_url(url), engine) for _ in range(THREADS)]
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
