"""Prometheus metrics of real workers (``q4m worker --metrics-port``), one process and several
(the supervisor adds up its children), and ``q4m web`` on the command line."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlalchemy import insert
from sqlalchemy.engine import URL
from web_support import free_port
from web_support import private_database
from worker_support import number_table
from worker_support import q4m_command
from worker_support import q4m_env
from worker_support import run_q4m
from worker_support import start_q4m
from worker_support import stop
from worker_support import wait_for

httpx = pytest.importorskip("httpx")
pytest.importorskip("prometheus_client")

pytestmark = pytest.mark.acceptance

TABLE = "metric_jobs"


@pytest.fixture
def db(server_url: URL) -> Iterator[Engine]:
    yield from private_database(server_url, f"q4m_metrics_{os.getpid()}")


def scrape(port: int) -> str:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    except httpx.HTTPError:
        return ""


def value(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        match = re.match(rf"{name}\{{(.*)\}} (\S+)$", line)
        if match and all(f'{k}="{v}"' in match.group(1) for k, v in labels.items()):
            return float(match.group(2))
    raise AssertionError(f"no {name}{{{wanted}}} in:\n{text}")


@pytest.mark.parametrize("processes", ["1", "2"])
def test_worker_metrics_count_jobs_per_queue(db: Engine, tmp_path: Path, processes: str) -> None:
    table = number_table(db, TABLE)
    with db.begin() as conn:
        conn.execute(insert(table), [{"n": i} for i in range(10)])
    port = free_port()
    env = q4m_env(
        WORKER_TABLE=TABLE,
        WORKER_LOG=str(tmp_path / "log"),
        WORKER_FAILURES="-1",  # FlakyJob: n fails always ...
        WORKER_MAX_ATTEMPTS="2",
    )
    worker = start_q4m(
        "worker",
        "worker_jobs:FlakyJob",
        "--url",
        db.url.render_as_string(hide_password=False),
        "--processes",
        processes,
        "--concurrency",
        "2",
        "--metrics-port",
        str(port),
        env=env,
        output=tmp_path / "out",
    )
    try:

        def finished() -> str:
            text = scrape(port)
            try:
                dead = value(text, "q4m_worker_jobs_total", queue=TABLE, outcome="dead")
                held = value(text, "q4m_worker_jobs_in_hand", queue=TABLE)
            except AssertionError:
                return ""
            return text if dead == 10 and held == 0 else ""

        text = wait_for(finished, 90, "10 dead jobs in the metrics")
        assert value(text, "q4m_worker_jobs_total", queue=TABLE, outcome="retried") == 10
        assert value(text, "q4m_worker_jobs_total", queue=TABLE, outcome="failed") == 20
        assert value(text, "q4m_job_duration_seconds_count", queue=TABLE) == 20
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(60) == 0
    finally:
        stop(worker)
    assert "Address already in use" not in (tmp_path / "out").read_text()


def test_q4m_web_serves_and_refuses_a_public_address_without_credentials(
    db: Engine, tmp_path: Path
) -> None:
    number_table(db, TABLE)
    url = db.url.render_as_string(hide_password=False)
    refused = run_q4m("web", "--url", url, "--host", "0.0.0.0", "--port", "1")
    assert refused.returncode == 2
    assert "refusing to listen on 0.0.0.0 without --token" in refused.stderr
    port = free_port()
    log = (tmp_path / "web.out").open("wb")
    web = subprocess.Popen(
        q4m_command("web", "--url", url, "--port", str(port)),
        env=q4m_env(Q4M_WEB_TOKEN="a-token-from-the-env"),
        stdout=log,
        stderr=log,
    )
    try:
        page = wait_for(lambda: _get(f"http://127.0.0.1:{port}/login"), 30, "q4m web to answer")
        assert page.status_code == 200 and "Log in" in page.text
        home = httpx.get(
            f"http://127.0.0.1:{port}/",
            headers={"authorization": "Bearer a-token-from-the-env"},
        )
        assert home.status_code == 200 and TABLE in home.text
    finally:
        web.send_signal(signal.SIGINT)
        try:
            web.wait(30)
        finally:
            stop(web)  # type: ignore[arg-type]
            log.close()


def _get(url: str) -> httpx.Response | None:
    try:
        return httpx.get(url, timeout=5)
    except httpx.HTTPError:
        return None
