"""A job class with a schedule, for the ``q4m worker`` / ``q4m scheduler`` tests (its table
and schedule name come from the environment)."""

from __future__ import annotations

import datetime as dt
import os
from typing import Any

from sqlalchemy_q4m import Job


class Ticker(Job):
    table_name = os.environ.get("SCHED_TABLE", "ticker_jobs")
    schedule = dt.timedelta(seconds=1)
    schedule_name = os.environ.get("SCHED_NAME", "ticker")
    wait_timeout = 0.5

    def schedule_payload(self, tick: dt.datetime) -> dict[str, Any]:
        return {"tick": int(tick.timestamp())}

    def execute(self, job: Any) -> None:
        with open(os.environ["SCHED_LOG"], "a") as log:
            log.write(f"{job.tick}\n")


class NotScheduled(Job):
    table_name = "not_scheduled_jobs"
