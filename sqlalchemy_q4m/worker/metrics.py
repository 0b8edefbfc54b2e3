"""Prometheus metrics (``pip install 'sqlalchemy-q4m[metrics]'``, ``prometheus_client``).

Workers (``q4m worker --metrics-port 9108``) count per queue the jobs done, failed, retried,
dead-lettered and lost (``q4m_worker_jobs_total{queue,outcome}``), time them
(``q4m_job_duration_seconds{queue}``, from the claim to the outcome) and show the jobs in hand
(``q4m_worker_jobs_in_hand{queue}``).  With ``--processes`` > 1 the supervisor serves the sum
of its children: they write to files in a private ``PROMETHEUS_MULTIPROC_DIR`` (the client's
multi-process mode), and the files of a child that died are dropped.

The dashboard's ``/metrics`` reads the database instead (:mod:`sqlalchemy_q4m.web.metrics`).
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Sequence
from typing import Any

from ..exc import Q4MError
from .registry import Holding

__all__ = ["SupervisorMetrics", "WorkerMetrics", "prometheus"]

logger = logging.getLogger("sqlalchemy_q4m.metrics")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: Histogram buckets of a job's duration, in seconds.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900)


def prometheus() -> Any:
    """The ``prometheus_client`` module, or a Q4MError naming the extra to install."""
    try:
        import prometheus_client
    except ImportError:
        raise Q4MError(
            "metrics need prometheus_client: pip install 'sqlalchemy-q4m[metrics]'"
        ) from None
    return prometheus_client


class WorkerMetrics:
    """The metrics of one worker process; served here unless a supervisor serves them."""

    def __init__(self, *, serve: tuple[str, int] | None) -> None:
        client = prometheus()
        self.registry = client.CollectorRegistry(auto_describe=True)
        multi = bool(os.environ.get(MULTIPROC_ENV))
        kw: dict[str, Any] = {"registry": self.registry}
        self.jobs = client.Counter(
            "q4m_worker_jobs",
            "Jobs handled by the workers, by queue and outcome "
            "(done, failed = retried + dead, retried, dead, aborted, lost)",
            ["queue", "outcome"],
            **kw,
        )
        self.duration = client.Histogram(
            "q4m_job_duration_seconds",
            "Seconds from a job's claim to its outcome",
            ["queue"],
            buckets=BUCKETS,
            **kw,
        )
        gauge_kw = {"multiprocess_mode": "livesum"} if multi else {}
        self.in_hand = client.Gauge(
            "q4m_worker_jobs_in_hand", "Jobs in the workers' hands", ["queue"], **kw, **gauge_kw
        )
        self._seen: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.server: Any = None
        if serve is not None:
            host, port = serve
            self.server, _ = client.start_http_server(port, host, registry=self.registry)

    @classmethod
    def for_process(cls, config: Any, *, child: bool = False) -> WorkerMetrics:
        """The metrics of a worker process run by ``config``: served on its port unless a
        supervisor serves the children's sum."""
        serve = None if child else (config.metrics_host, int(config.metrics_port))
        return cls(serve=serve)

    def observe(self, outcome: str, table: str | None, seconds: float | None) -> None:
        """The :class:`~sqlalchemy_q4m.worker.stats.Stats` hook: count and time one job."""
        queue = table or ""
        self.jobs.labels(queue, outcome).inc()
        if outcome in ("retried", "dead"):
            self.jobs.labels(queue, "failed").inc()
        if seconds is not None and outcome != "lost":
            self.duration.labels(queue).observe(max(0.0, seconds))

    def track_in_hand(
        self,
        holdings: Callable[[], Sequence[Holding]],
        queues: Callable[[], Sequence[str]],
        every: float = 1.0,
    ) -> None:
        """Keep ``q4m_worker_jobs_in_hand`` up to date (0 for each queue served) from a
        daemon thread."""

        def loop() -> None:
            while not self._stop.wait(every):
                self._seen.update(queues())
                self.update_in_hand(holdings())

        self._thread = threading.Thread(target=loop, name="q4m-metrics", daemon=True)
        self._thread.start()

    def update_in_hand(self, held: Sequence[Holding]) -> None:
        counts: dict[str, int] = {}
        for holding in held:
            counts[holding.table] = counts.get(holding.table, 0) + 1
        for queue in self._seen | set(counts):
            self.in_hand.labels(queue).set(counts.get(queue, 0))
        self._seen |= set(counts)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


class SupervisorMetrics:
    """The supervisor's side of the multi-process mode: a private directory for the
    children's files (set in the environment before they start) and the HTTP server that
    adds them up; files of dead children are dropped at each scrape."""

    def __init__(self, host: str, port: int) -> None:
        client = prometheus()
        from prometheus_client import multiprocess

        self.directory = tempfile.mkdtemp(prefix="q4m-metrics-")
        self._previous = os.environ.get(MULTIPROC_ENV)
        os.environ[MULTIPROC_ENV] = self.directory  # inherited by the spawned children
        directory = self.directory

        class _LiveOnly:
            def collect(self) -> Iterator[Any]:
                for path in glob.glob(os.path.join(directory, "gauge_livesum_*.db")):
                    pid = int(path.rsplit("_", 1)[1].split(".")[0])
                    if not _alive(pid):
                        multiprocess.mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]
                collector = multiprocess.MultiProcessCollector(None, path=directory)  # type: ignore[no-untyped-call]
                yield from collector.collect()  # type: ignore[no-untyped-call]

        self.registry = client.CollectorRegistry()
        self.registry.register(_LiveOnly())
        self.server, _ = client.start_http_server(port, host, registry=self.registry)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        if self._previous is None:
            os.environ.pop(MULTIPROC_ENV, None)
        else:
            os.environ[MULTIPROC_ENV] = self._previous
        shutil.rmtree(self.directory, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
