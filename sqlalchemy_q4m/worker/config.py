"""What a worker run is given and how it reports: :class:`WorkerConfig`, the job classes
loaded from ``module:Class`` specs (in one place, :func:`load_job_class`), the workers' engine,
the log lines, the status line and the exit codes:

* :data:`EXIT_OK` (stopped cleanly, or queue drained in burst mode), :data:`EXIT_ERROR` (a
  worker crashed), :data:`EXIT_USAGE` (bad input, from the CLI), :data:`EXIT_FORCED` (forced
  stop: jobs in hand were returned to the queue).

The thread/process supervisor is :mod:`sqlalchemy_q4m.worker.runtime`, its asyncio twin
:mod:`sqlalchemy_q4m.worker.asyncio_runtime`.
"""

from __future__ import annotations

import importlib
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field
from typing import Any
from typing import TextIO

from sqlalchemy import Engine
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.exc import NoSuchModuleError

from ..exc import Q4MError
from .job import Job
from .policy import OUTCOMES

__all__ = [
    "EXIT_ERROR",
    "EXIT_FORCED",
    "EXIT_OK",
    "EXIT_USAGE",
    "StatusLine",
    "WorkerConfig",
    "load_job_class",
    "load_scheduled_classes",
    "make_engine",
    "preflight_classes",
    "safe_url",
    "setup_logging",
]

logger = logging.getLogger("sqlalchemy_q4m.runtime")

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_FORCED = 3

LOG_FORMAT = "%(asctime)s %(levelname)s [%(processName)s/%(threadName)s] %(message)s"


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a worker process needs; picklable, so child processes get a copy."""

    specs: tuple[str, ...]
    url: str
    concurrency: int = 1
    processes: int = 1
    grace: float | None = 30.0
    burst: bool = False
    job_options: tuple[tuple[str, Any], ...] = ()
    log_level: str = "INFO"
    status: bool = False
    progress_every: float = 10.0
    sys_path: tuple[str, ...] = field(default_factory=tuple)
    #: Seconds between two heartbeats in the worker registry (0: not registered).
    heartbeat: float = 5.0
    #: Serve Prometheus metrics on this port (None: no metrics).
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        if not self.specs:
            raise Q4MError("name at least one job class (module:Class)")
        if self.concurrency < 1:
            raise Q4MError(f"concurrency must be >= 1, not {self.concurrency}")
        if self.processes < 1:
            raise Q4MError(f"processes must be >= 1, not {self.processes}")
        if self.grace is not None and self.grace < 0:
            raise Q4MError(f"grace must be >= 0 seconds, not {self.grace}")


def load_job_class(spec: str) -> type[Job]:
    """Import ``module:Class`` (or ``module.Class``) and check that it is a :class:`Job`."""
    module_name, sep, attr = spec.partition(":")
    if not sep:
        module_name, _, attr = spec.rpartition(".")
    if not module_name or not attr:
        raise Q4MError(f"job class {spec!r}: write it as module:Class")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise Q4MError(f"job class {spec!r}: cannot import {module_name!r}: {err}") from None
    except Exception as err:
        raise Q4MError(f"job class {spec!r}: importing {module_name!r} failed: {err!r}") from None
    obj: Any = module
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise Q4MError(f"job class {spec!r}: {module_name!r} has no {attr!r}")
    if not (isinstance(obj, type) and issubclass(obj, Job)):
        raise Q4MError(f"job class {spec!r}: {obj!r} is not a sqlalchemy_q4m.Job subclass")
    return obj


def make_engine(url: str, concurrency: int = 1) -> Engine:
    """An engine for workers: one pooled connection per thread, checked before use."""
    try:
        parsed = make_url(url)
        return create_engine(
            parsed,
            pool_size=concurrency,
            max_overflow=concurrency + 2,
            pool_pre_ping=True,
            pool_recycle=3600,
        )
    except (ArgumentError, NoSuchModuleError, ValueError) as err:
        raise Q4MError(f"bad database URL {safe_url(url)}: {err}") from None


def setup_logging(level: str, stream: TextIO | None = None, *, clear_line: bool = False) -> None:
    """Plain log lines on stderr (the job's table and id are in each job's message);
    ``clear_line`` first erases a live status line so a log line never lands inside it."""
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "q4m_handler", False):  # ours from an earlier call: replaced
            root.removeHandler(old)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.q4m_handler = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter(("\r\033[K" if clear_line else "") + LOG_FORMAT))
    root.addHandler(handler)
    root.setLevel(level.upper())


def safe_url(url: str) -> str:
    """``url`` with its password hidden, for messages (``<unparsable URL>`` if it is not one)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparsable URL>"


class StatusLine:
    """Counters and rate, rendered on one line (a TTY) or as a periodic log line."""

    def __init__(self, label: str, stream: TextIO | None, every: float) -> None:
        self.label = label
        self.stream = stream
        self.every = every
        self.started = time.monotonic()
        self._last_time = self.started
        self._last_done = 0
        self._last_log = self.started
        self.rate = 0.0

    def update(self, counts: dict[str, int], in_hand: int) -> None:
        now = time.monotonic()
        if now - self._last_time >= 1.0:
            done = counts.get("done", 0)
            self.rate = (done - self._last_done) / (now - self._last_time)
            self._last_time, self._last_done = now, done
        text = self.render(counts, in_hand)
        if self.stream is not None:
            self.stream.write("\r\033[K" + text)
            self.stream.flush()
        elif self.every > 0 and now - self._last_log >= self.every:
            self._last_log = now
            logger.info("progress: %s", text)

    def render(self, counts: dict[str, int], in_hand: int) -> str:
        parts = [f"{name} {counts.get(name, 0)}" for name in OUTCOMES]
        return (
            f"[{self.label}] " + "  ".join(parts) + f"  in hand {in_hand}  {self.rate:.1f} jobs/s"
        )

    def finish(self) -> None:
        if self.stream is not None:
            self.stream.write("\n")
            self.stream.flush()


def load_scheduled_classes(specs: Sequence[str]) -> list[type[Job]]:
    """``module:Class`` specs, or modules: every Job class defined in a module that has a
    ``schedule``.  A Q4MError when nothing has one."""
    classes: list[type[Job]] = []
    for spec in specs:
        module = None
        if ":" not in spec:
            try:
                module = importlib.import_module(spec)
            except ImportError:
                module = None
        if module is None:
            classes.append(load_job_class(spec))
            continue
        found = [
            obj
            for obj in vars(module).values()
            if isinstance(obj, type)
            and issubclass(obj, Job)
            and obj.__module__ == module.__name__
            and getattr(obj, "schedule", None) is not None
        ]
        if not found:
            raise Q4MError(f"module {spec!r} has no Job class with a schedule")
        classes.extend(found)
    if not any(getattr(cls, "schedule", None) is not None for cls in classes):
        raise Q4MError("none of these job classes has a schedule")
    return classes


def preflight_classes(config: WorkerConfig) -> list[type[Job]]:
    """Just load the classes (a child process: the supervisor checked the database)."""
    for path in config.sys_path:
        if path not in sys.path:
            sys.path.insert(0, path)
    return [load_job_class(spec) for spec in config.specs]
