"""sqlalchemy-q4m: reliable job queues on MySQL and MariaDB, the SQLAlchemy way.

Queue tables are ORM models (:class:`QueueMixin`) or Core tables (:func:`queue_table`);
:func:`queue_session` owns one job at a time on a pinned connection, on Q4M's
``ENGINE=QUEUE`` (native) or on InnoDB with ``SKIP LOCKED`` (portable); :func:`queue_consumer`
takes one job after another on one connection set up once.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version

from .backends.notify import notify
from .consumer.batch import QueueBatch
from .consumer.batch import queue_batch
from .consumer.consuming import QueueConsumer
from .consumer.entry import queue_consumer
from .consumer.entry import queue_session
from .consumer.entry import queue_sessionmaker
from .consumer.session import QueueSession
from .exc import Q4MError
from .exc import QueueAbort
from .producer.cron import Schedule
from .producer.enqueue import enqueue
from .producer.schedule import Scheduler
from .producer.unique import Unique
from .schema.ddl import QueueMixin
from .schema.ddl import is_queue_table
from .schema.ddl import job_id_column
from .schema.ddl import queue_table
from .schema.functions import queue_abort
from .schema.functions import queue_compact
from .schema.functions import queue_end
from .schema.functions import queue_rowid
from .schema.functions import queue_set_srcid
from .schema.functions import queue_stats
from .schema.functions import queue_wait
from .schema.retry import PriorityMixin
from .schema.retry import RetryMixin
from .schema.retry import ScheduledMixin
from .server import detect_backend
from .server import use_backend
from .types import JobId
from .types import new_job_id
from .worker.job import Job
from .worker.policy import RetryPolicy

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
    "QueueConsumer",
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
    "queue_consumer",
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
