"""``python -m benchmarks.instructions``: instructions per job are the difference between two
drains of a different size (the child's start cancels out), and each child drains exactly the
queue the parent filled, with the path it names, on both servers.  valgrind itself is not run
here (a child under it takes half a minute)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import URL

import benchmarks.instructions as instructions
from benchmarks.common import bench_database
from benchmarks.common import fill
from benchmarks.common import remaining
from benchmarks.cpu import paths

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.unit
def test_per_job_is_the_difference_of_two_drains(monkeypatch: pytest.MonkeyPatch) -> None:
    filled: list[tuple[int, str]] = []
    monkeypatch.setattr(instructions, "fill", lambda url, n, table: filled.append((n, table)))

    def count(url: Any, where: tuple[int, int], n: int) -> int:
        assert where == (1, 2) and filled[-1][0] == n  # the queue filled for this child
        return 5_000_000 + 700_000 * n  # the child's start, then each job

    per_job = instructions.per_job(URL.create("mysql"), (1, 2), 100, "t", count)
    assert per_job == 700_000
    assert filled == [(100, "t"), (instructions.SCALE * 100, "t")]


def _drain_in_child(url: URL, group: int, index: int, jobs: int) -> str:
    fill(url, jobs, getattr(paths(False, 200)[group][index][1], "table", "q4m_bench_jobs"))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.instructions",
            "--child",
            url.render_as_string(hide_password=False),
            str(group),
            str(index),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(params=["portable", pytest.param("native", marks=pytest.mark.native)])
def server(request: pytest.FixtureRequest, server_url: URL) -> URL:
    if request.param == "native":
        q4m: URL = request.getfixturevalue("q4m_url")
        return q4m._replace(database=None)
    return server_url


@pytest.mark.integration
def test_each_child_drains_the_filled_queue(server: URL) -> None:
    with bench_database(server.render_as_string(hide_password=False)) as (url, native):
        group = paths(native, 200)[1]  # the raw loop, each queue_session bind, the worker
        for index, (name, _) in enumerate(group):
            if name.startswith("  its floor"):
                continue
            assert _drain_in_child(url, 1, index, 7).split() == ["drained", "7"], name
            assert remaining(url) == 0, name
