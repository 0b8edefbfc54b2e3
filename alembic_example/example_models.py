"""The example project's models: two queues (the seed's ``shell_jobs`` and ``ruby_jobs``) and
one ordinary InnoDB table, the log workers write when they finish a job."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import ClassVar

from sqlalchemy import DateTime
from sqlalchemy import Integer
from sqlalchemy import String
from sqlalchemy import Text
from sqlalchemy import func
from sqlalchemy import text
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.orm import Mapped
from sqlalchemy.orm import mapped_column

from sqlalchemy_q4m import JobId
from sqlalchemy_q4m import QueueMixin


class Base(DeclarativeBase):
    """Declarative base of the example: ``Base.metadata`` is what autogenerate compares."""


class ShellJob(QueueMixin, Base):
    """A shell command to run (``ENGINE=QUEUE`` on Q4M, the portable layout elsewhere)."""

    __tablename__ = "shell_jobs"

    command: Mapped[str] = mapped_column(Text)
    # Added by migration 0002: Q4M can subscribe on it, e.g. 'shell_jobs:priority>=5'.
    priority: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))


class RubyJob(QueueMixin, Base):
    """A Ruby snippet to run."""

    __tablename__ = "ruby_jobs"

    command: Mapped[str] = mapped_column(Text)


class JobLog(Base):
    """An ordinary InnoDB table: one row per finished job."""

    __tablename__ = "job_log"
    __table_args__: ClassVar[dict[str, str]] = {
        "mysql_engine": "InnoDB",
        "mariadb_engine": "InnoDB",
    }

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    queue: Mapped[str] = mapped_column(String(64), index=True)
    job_id: Mapped[uuid.UUID] = mapped_column(JobId())
    outcome: Mapped[str] = mapped_column(String(16))
    finished_at: Mapped[datetime] = mapped_column(DateTime, server_default=func.now())
