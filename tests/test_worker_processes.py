"""Workers as subprocesses: many processes and threads, SIGTERM, a second SIGTERM, SIGKILL."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Column
from sqlalchemy import Engine
from sqlalchemy import Integer
from sqlalchemy import MetaData
from sqlalchemy import Table
from sqlalchemy import text
from sqlalchemy.engine import URL
from worker_jobs import read_log
from worker_support import count_rows
from worker_support import number_table
from worker_support import q4m_env
from worker_support import run_q4m
from worker_support import start_q4m
from worker_support import stop
from worker_support import wait_for

from sqlalchemy_q4m import queue_table

pytestmark = pytest.mark.acceptance

TABLE = "twp_jobs"


@pytest.fixture
def table(engine: Engine) -> Iterator[Table]:
    table = number_table(engine, TABLE)
    yield table
    table.drop(engine)


def url_of(db_url: URL) -> str:
    return db_url.render_as_string(hide_password=False)


def enqueue_numbers(db_url: URL, count: int) -> None:
    lines = "".join(f'{{"n": {n}}}\n' for n in range(1, count + 1))
    result = run_q4m("enqueue", TABLE, "--url", url_of(db_url), input=lines)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"enqueued {count} job(s) into {TABLE}"


def test_four_processes_of_two_threads_run_5000_jobs_exactly_once(
    db_url: URL, engine: Engine, table: Table, tmp_path: Path
) -> None:
    enqueue_numbers(db_url, 5000)
    log = tmp_path / "jobs.log"
    env = q4m_env(WORKER_LOG=str(log), WORKER_TABLE=TABLE, WORKER_WAIT_PIDS="4")
    args = ["worker", "worker_jobs:RecordJob", "--url", url_of(db_url), "--burst"]
    result = run_q4m(*args, "--processes", "4", "--concurrency", "2", env=env, timeout=200)
    assert result.returncode == 0, result.stderr[-3000:]
    done = collections.Counter(n for event, n, _ in read_log(str(log)) if event == "done")
    assert set(done) == set(range(1, 5001))
    assert set(done.values()) == {1}
    assert len({pid for _, _, pid in read_log(str(log))}) == 4
    assert count_rows(engine, table) == 0
    assert "stopped after" in result.stderr and "done 5000" in result.stderr


def _start_slow_workers(
    db_url: URL, tmp_path: Path, *extra: str
) -> tuple[subprocess.Popen[bytes], Path, Path]:
    log, output = tmp_path / "jobs.log", tmp_path / "worker.out"
    env = q4m_env(WORKER_LOG=str(log), WORKER_TABLE=TABLE, WORKER_SLEEP="1.5")
    process = start_q4m(
        "worker", "worker_jobs:RecordJob", "--url", url_of(db_url), *extra, env=env, output=output
    )
    return process, log, output


def test_first_sigterm_finishes_the_jobs_in_hand_and_takes_no_new_one(
    db_url: URL, engine: Engine, table: Table, tmp_path: Path
) -> None:
    enqueue_numbers(db_url, 20)
    process, log, output = _start_slow_workers(
        db_url, tmp_path, "--processes", "2", "--concurrency", "2"
    )

    def starts() -> int:
        return sum(1 for e, _, _ in read_log(str(log)) if e == "start")

    try:
        wait_for(lambda: starts() >= 4, 60, "four jobs to start")
        time.sleep(0.3)
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
        assert time.monotonic() - signalled < 10  # it did not go on with the queue
    finally:
        stop(process)
    events = read_log(str(log))
    started = [n for e, n, _ in events if e == "start"]
    finished = [n for e, n, _ in events if e == "done"]
    assert sorted(started) == sorted(finished)  # every job in hand was finished
    assert 4 <= len(started) <= 8  # at most one more round (a slow-starting process)
    assert count_rows(engine, table) == 20 - len(finished)
    text = output.read_text()
    assert "stopping, finishing" in text and "exit 0" in text


def test_a_second_sigterm_returns_the_jobs_in_hand(
    db_url: URL, engine: Engine, table: Table, tmp_path: Path
) -> None:
    enqueue_numbers(db_url, 10)
    process, log, output = _start_slow_workers(db_url, tmp_path, "--concurrency", "2")
    try:
        wait_for(lambda: len(read_log(str(log))) >= 2, 60, "two jobs to start")
        process.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 3
    finally:
        stop(process)
    events = read_log(str(log))
    assert [e for e, _, _ in events] == ["start", "start"]  # neither finished
    assert count_rows(engine, table) == 10  # both returned to the queue
    assert "returning twp_jobs" in output.read_text()


def test_a_job_whose_worker_is_sigkilled_runs_again_on_another_worker(
    db_url: URL, engine: Engine, table: Table, tmp_path: Path
) -> None:
    enqueue_numbers(db_url, 1)
    victim, log, _ = _start_slow_workers(db_url, tmp_path)
    other = None
    try:
        wait_for(lambda: read_log(str(log)), 60, "the job to start")
        env = q4m_env(WORKER_LOG=str(log), WORKER_TABLE=TABLE)
        other = start_q4m(
            "worker",
            "worker_jobs:RecordJob",
            "--url",
            url_of(db_url),
            "--burst",
            env=env,
            output=tmp_path / "other.out",
        )
        time.sleep(1.0)
        victim.send_signal(signal.SIGKILL)
        assert other.wait(60) == 0
    finally:
        stop(victim)
        if other is not None:
            stop(other)
    (start, done) = read_log(str(log))
    assert start[0] == "start" and done[0] == "done" and start[1] == done[1] == 1
    assert start[2] == victim.pid and done[2] != victim.pid
    assert count_rows(engine, table) == 0


def test_the_grace_period_ends_with_the_jobs_in_hand_returned(
    db_url: URL, engine: Engine, table: Table, tmp_path: Path
) -> None:
    enqueue_numbers(db_url, 3)
    log, output = tmp_path / "jobs.log", tmp_path / "worker.out"
    env = q4m_env(WORKER_LOG=str(log), WORKER_TABLE=TABLE, WORKER_SLEEP="30", Q4M_GRACE="0.5")
    process = start_q4m(
        "worker", "worker_jobs:RecordJob", "--url", url_of(db_url), env=env, output=output
    )
    try:
        wait_for(lambda: read_log(str(log)), 60, "a job to start")
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 3
        assert time.monotonic() - started < 10  # not the job's 30 seconds
    finally:
        stop(process)
    assert [e for e, _, _ in read_log(str(log))] == ["start"]
    assert count_rows(engine, table) == 3
    assert "grace period over" in output.read_text()


def test_a_killed_worker_process_is_restarted_and_its_job_runs_again(
    db_url: URL, engine: Engine, table: Table, tmp_path: Path
) -> None:
    enqueue_numbers(db_url, 6)
    log, output = tmp_path / "jobs.log", tmp_path / "worker.out"
    env = q4m_env(WORKER_LOG=str(log), WORKER_TABLE=TABLE, WORKER_SLEEP="0.5")
    args = ["worker", "worker_jobs:RecordJob", "--url", url_of(db_url), "--burst"]
    process = start_q4m(*args, "--processes", "2", env=env, output=output)
    try:
        (_, n, child) = wait_for(lambda: read_log(str(log)), 60, "a job to start")[0]
        assert child != process.pid  # a child process runs the job
        os.kill(child, signal.SIGKILL)
        assert process.wait(90) == 0
    finally:
        stop(process)
    events = read_log(str(log))
    done = collections.Counter(k for e, k, _ in events if e == "done")
    assert set(done) == set(range(1, 7)) and set(done.values()) == {1}
    assert [p for e, k, p in events if e == "done" and k == n] != [child]
    assert count_rows(engine, table) == 0
    assert "worker process" in output.read_text() and "restarting in" in output.read_text()


def test_a_listening_worker_waits_in_the_server_and_is_woken_by_q4m_enqueue(
    db_url: URL, engine: Engine, tmp_path: Path
) -> None:
    plain = queue_table("twp_listen_jobs", MetaData(), Column("n", Integer, nullable=False))
    plain.metadata.drop_all(engine)
    plain.metadata.create_all(engine)
    log, output = tmp_path / "jobs.log", tmp_path / "worker.out"
    env = q4m_env(WORKER_LOG=str(log), WORKER_TABLE=plain.name)
    process = start_q4m(
        "worker",
        "worker_jobs:RecordJob",
        "--url",
        url_of(db_url),
        "--listen",
        "5",
        env=env,
        output=output,
    )

    def waiting() -> bool:
        with engine.connect() as conn:
            infos = conn.execute(
                text("SELECT INFO FROM information_schema.PROCESSLIST WHERE INFO LIKE :tag"),
                {"tag": f"/* q4m:wait %{plain.name}%"},
            ).scalars()
            return any(infos)

    try:
        wait_for(waiting, 60, "the worker to wait in the server (GET_LOCK, tagged)")
        result = run_q4m("enqueue", plain.name, "--url", url_of(db_url), input='{"n": 7}\n')
        assert result.returncode == 0, result.stderr
        wait_for(lambda: ("done", 7) in [(e, n) for e, n, _ in read_log(str(log))], 5, "job 7")
        assert count_rows(engine, plain) == 0
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0, output.read_text()[-3000:]
    finally:
        stop(process)
        plain.metadata.drop_all(engine)
