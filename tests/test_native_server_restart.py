"""The Q4M server is SIGKILLed mid-run: workers reconnect, every job completes, none is lost.

The native twin of ``test_server_restart.py``.  It runs on a PRIVATE Q4M instance started with
the q4m-lab kit (``up.sh`` with its own directory and port; ``Q4M_RESTART_LAB_DIR`` /
``Q4M_RESTART_LAB_PORT``, default ``/tmp/session-lab`` and 3327), killed with SIGKILL through
its own pid file and started again on the same data directory with the kit's server options;
the shared Q4M server is never touched.  Skips without the kit or ``mariadbd``.
"""

from __future__ import annotations

import collections
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import create_engine
from sqlalchemy import text
from sqlalchemy.pool import NullPool
from worker_jobs import read_log
from worker_support import count_rows
from worker_support import number_table
from worker_support import q4m_env
from worker_support import run_q4m
from worker_support import start_q4m
from worker_support import stop
from worker_support import wait_for

pytestmark = [pytest.mark.acceptance, pytest.mark.native]

KIT = Path(os.environ.get("Q4M_LAB_KIT", "/work/shared/q4m-lab"))
LAB = Path(os.environ.get("Q4M_RESTART_LAB_DIR", "/tmp/session-lab"))
PORT = int(os.environ.get("Q4M_RESTART_LAB_PORT", "3327"))
MARIADBD = shutil.which("mariadbd") or shutil.which("mariadbd", path="/usr/sbin:/usr/local/sbin")
TABLE = "nsr_jobs"
JOBS = 300


@dataclass
class PrivateQ4M:
    """A q4m-lab instance of this test's own: started by ``up.sh``, killed and restarted
    here, stopped through its pid file."""

    lab: Path
    port: int
    restarted: subprocess.Popen[bytes] | None = None  # the server start() started

    @property
    def url(self) -> str:
        return f"mysql+pymysql://root@127.0.0.1:{self.port}/test"

    def up(self) -> None:
        env = {**os.environ, "Q4M_LAB_DIR": str(self.lab), "Q4M_LAB_PORT": str(self.port)}
        done = subprocess.run(
            ["bash", str(KIT / "up.sh")], env=env, capture_output=True, text=True, timeout=180
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.strip().endswith(self.url)

    def pid(self) -> int | None:
        try:
            return int((self.lab / "mysqld.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def _alive(self) -> bool:
        pid = self.pid()
        if pid is None:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

    def crash(self) -> None:
        """SIGKILL the server: every connection drops, owned rows come back at restart."""
        pid = self.pid()
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not self._alive(), 30, "the killed server to exit")

    def start(self) -> None:
        """Start the server again on the same data directory, as ``up.sh`` starts it (up.sh
        itself would make a fresh directory when no server runs)."""
        assert MARIADBD is not None
        (self.lab / "mysqld.pid").unlink(missing_ok=True)
        user = ["--user=root"] if os.getuid() == 0 else []
        with (self.lab / "mysqld.out").open("ab") as out:
            self.restarted = subprocess.Popen(
                [
                    MARIADBD,
                    "--no-defaults",
                    *user,
                    "--basedir=/usr",
                    f"--datadir={self.lab / 'data'}",
                    f"--tmpdir={self.lab / 'tmp'}",
                    f"--plugin-dir={self.lab / 'plugin'}",
                    "--plugin-load-add=ha_queue.so",
                    f"--port={self.port}",
                    "--bind-address=127.0.0.1",
                    "--skip-name-resolve",
                    f"--socket={self.lab / 'mysqld.sock'}",
                    f"--pid-file={self.lab / 'mysqld.pid'}",
                    f"--log-error={self.lab / 'mysqld.err'}",
                    "--character-set-server=utf8mb4",
                    "--collation-server=utf8mb4_general_ci",
                    "--innodb-buffer-pool-size=64M",
                    "--max-connections=300",
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
        wait_for(self._answers, 90, "the restarted Q4M server to answer")

    def _answers(self) -> bool:
        engine = create_engine(self.url, poolclass=NullPool)
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            return True
        except Exception:
            return False
        finally:
            engine.dispose()

    def stop(self) -> None:
        """SIGTERM through the pid file (the kit's own way), SIGKILL if it does not go."""
        pid = self.pid()
        if pid is None or not self._alive():
            return
        os.kill(pid, signal.SIGTERM)
        try:
            wait_for(lambda: not self._alive(), 60, "the private Q4M server to stop")
        except AssertionError:  # pragma: no cover - a hung server
            os.kill(pid, signal.SIGKILL)
        finally:
            if self.restarted is not None:
                self.restarted.wait(60)  # reap it


@pytest.fixture(scope="module")
def q4m_server() -> Iterator[PrivateQ4M]:
    if MARIADBD is None or not (KIT / "up.sh").exists():
        pytest.skip("the q4m-lab kit or mariadbd is not installed")
    if LAB.exists() and not (LAB / ".q4m-lab").exists():
        pytest.skip(f"{LAB} exists and is not a q4m-lab directory")
    server = PrivateQ4M(LAB, PORT)
    server.up()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(LAB, ignore_errors=True)


def test_native_workers_survive_a_server_kill_and_every_job_completes(
    q4m_server: PrivateQ4M, tmp_path: Path
) -> None:
    engine = create_engine(q4m_server.url, poolclass=NullPool)
    table = number_table(engine, TABLE)
    lines = "".join(f'{{"n": {n}}}\n' for n in range(1, JOBS + 1))
    assert run_q4m("enqueue", TABLE, "--url", q4m_server.url, input=lines).returncode == 0
    assert count_rows(engine, table) == JOBS
    log, output = tmp_path / "jobs.log", tmp_path / "worker.out"
    env = q4m_env(WORKER_LOG=str(log), WORKER_TABLE=TABLE, WORKER_SLEEP="0.02")
    worker = start_q4m(
        "worker",
        "worker_jobs:RecordJob",
        "--url",
        q4m_server.url,
        "--concurrency",
        "2",
        "--processes",
        "2",
        "--burst",
        env=env,
        output=output,
    )
    try:
        wait_for(lambda: len(read_log(str(log))) >= 100, 90, "50 jobs before the kill")
        q4m_server.crash()
        time.sleep(1.5)  # the workers find the server gone and back off
        q4m_server.start()
        assert worker.wait(180) == 0, output.read_text()[-3000:]
    finally:
        stop(worker)
    done = collections.Counter(n for e, n, _ in read_log(str(log)) if e == "done")
    assert set(done) == set(range(1, JOBS + 1))  # none lost: every job completed
    doubled = sum(done.values()) - JOBS
    assert doubled <= 8, done.most_common(10)  # at most the jobs in hand (4 workers) twice
    assert count_rows(engine, table) == 0
    text_out = output.read_text()
    assert "database error" in text_out and "reconnecting in" in text_out
    engine.dispose()
