"""Operations: the queries about queues, jobs, dead letters and workers, in one place.

The ``q4m`` command line, the demo and the web dashboard all read and change queues through
these functions, on both backends.  Two kinds of counts:

* :func:`queue_counts` is exact (``q4m stats``): it reads every row of the queue, which is
  fine for a command run now and then, not for a page refreshed every few seconds.
* :func:`overview` is cheap enough for every refresh on big queues: the row count is exact on
  Q4M (the engine keeps it: ``COUNT(*)`` costs nothing) and on InnoDB while the table's
  estimate (``information_schema.TABLES.TABLE_ROWS``) is below ``exact_limit``; above it the
  estimate is shown as such.  Delayed jobs are counted only below ``exact_limit`` (a scan:
  ``run_at`` has no index); the jobs in hand come from the worker registry; the oldest job's
  age from its UUIDv7 id (``MIN(id)`` on the InnoDB primary key, the head of the queue on Q4M).

Table names that come from outside (a web page, the command line) are checked against the
queue tables of the database (:func:`queue_table_names`) before anything is reflected.

By subject: :mod:`.tables` (which tables are queues), :mod:`.queues` (counts),
:mod:`.jobs` (the jobs of a queue, enqueueing rows), :mod:`.dead` (dead letters),
:mod:`.workers` (the worker registry, throughput).
"""

from __future__ import annotations

from .dead import check_dead_queue
from .dead import dead_counts
from .dead import dead_letter
from .dead import dead_letters
from .dead import purge_dead_letters
from .dead import retry_dead_letters
from .jobs import JOB_STATES
from .jobs import JobPage
from .jobs import enqueue_rows
from .jobs import get_job
from .jobs import job_age
from .jobs import job_id_text
from .jobs import list_jobs
from .queues import QueueSummary
from .queues import overview
from .queues import parse_q4m_stats
from .queues import queue_counts
from .tables import check_queue_name
from .tables import foreign_queue_tables
from .tables import queue_table_names
from .tables import queue_table_rows
from .workers import WorkerInfo
from .workers import prune_lost_workers
from .workers import throughput
from .workers import workers

__all__ = [
    "JOB_STATES",
    "JobPage",
    "QueueSummary",
    "WorkerInfo",
    "check_dead_queue",
    "check_queue_name",
    "dead_counts",
    "dead_letter",
    "dead_letters",
    "enqueue_rows",
    "foreign_queue_tables",
    "get_job",
    "job_age",
    "job_id_text",
    "list_jobs",
    "overview",
    "parse_q4m_stats",
    "prune_lost_workers",
    "purge_dead_letters",
    "queue_counts",
    "queue_table_names",
    "queue_table_rows",
    "retry_dead_letters",
    "throughput",
    "workers",
]
