"""sqlalchemy-q4m: reliable job queues on MySQL and MariaDB, the SQLAlchemy way.

Queue tables are ORM models (:class:`QueueMixin`) or Core tables (:func:`queue_table`);
:func:`queue_session` owns one job at a time on a pinned connection, on Q4M's
``ENGINE=QUEUE`` (native) or on InnoDB with ``SKIP LOCKED`` (portable).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version

from .batch import QueueBatch
from .batch import queue_batch
from .ddl import QueueMixin
from .ddl import is_queue_table
from .ddl import job_id_column
from .ddl import queue_table
from .enqueue import enqueue
from .exc import Q4MError
from .exc import QueueAbort
from .functions import queue_abort
from .functions import queue_compact
from .functions import queue_end
from .functions import queue_rowid
from .functions import queue_set_srcid
from .functions import queue_stats
from .functions import queue_wait
from .notify import notify
from .retry import PriorityMixin
from .retry import RetryMixin
from .retry import RetryPolicy
from .retry import ScheduledMixin
from .schedule import Schedule
from .schedule import Scheduler
from .server import detect_backend
from .server import use_backend
from .session import QueueSession
from .session import queue_session
from .session import queue_sessionmaker
from .types import JobId
from .types import new_job_id
from .unique import Unique
from .worker import Job

try:
    __version__ = version("sqlalchemy-q4m")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "Job",
    "JobId",
    "PriorityMixin",
    "Q4MError",
    "QueueAbort",
    "QueueBatch",
    "QueueMixin",
    "QueueSession",
    "RetryMixin",
    "RetryPolicy",
    "Schedule",
    "ScheduledMixin",
    "Scheduler",
    "Unique",
    "__version__",
    "detect_backend",
    "enqueue",
    "is_queue_table",
    "job_id_column",
    "new_job_id",
    "notify",
    "queue_abort",
    "queue_batch",
    "queue_compact",
    "queue_end",
    "queue_rowid",
    "queue_session",
    "queue_sessionmaker",
    "queue_set_srcid",
    "queue_stats",
    "queue_table",
    "queue_wait",
    "use_backend",
]
