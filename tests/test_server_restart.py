"""The database server restarts mid-run: workers log it, reconnect with backoff and finish.

Runs on a PRIVATE MariaDB server the test installs and starts itself (own datadir, port and
socket), so the shared server is never touched.  Skips when ``mariadbd`` is not installed.
"""

from __future__ import annotations

import collections
import shutil
import signal
import socket
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

pytestmark = pytest.mark.acceptance

MARIADBD = shutil.which("mariadbd") or shutil.which("mariadbd", path="/usr/sbin:/usr/local/sbin")
INSTALL_DB = shutil.which("mariadb-install-db")
TABLE = "tsr_jobs"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class PrivateServer:
    """A throw-away mariadbd: its own datadir, port and socket; started and stopped here."""

    base: Path
    port: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mysql+pymysql://root@127.0.0.1:{self.port}/restart_test"

    def install(self) -> None:
        assert INSTALL_DB is not None
        subprocess.run(
            [
                INSTALL_DB,
                "--no-defaults",
                f"--datadir={self.base / 'data'}",
                "--user=root",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )

    def start(self) -> None:
        assert MARIADBD is not None
        with (self.base / "mariadbd.log").open("ab") as log:
            self.process = subprocess.Popen(
                [
                    MARIADBD,
                    "--no-defaults",
                    f"--datadir={self.base / 'data'}",
                    f"--port={self.port}",
                    f"--socket={self.base / 'mysqld.sock'}",
                    f"--pid-file={self.base / 'mariadbd.pid'}",
                    "--bind-address=127.0.0.1",
                    "--user=root",
                    "--skip-grant-tables",
                    "--skip-log-bin",
                    "--innodb-buffer-pool-size=32M",
                    "--max-connections=50",
                ],
                stdout=log,
                stderr=log,
            )
        wait_for(self._answers, 60, "the private mariadbd to answer")

    def _answers(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            log = (self.base / "mariadbd.log").read_text(errors="replace")[-2000:]
            raise AssertionError(f"private mariadbd exited: {log}")
        engine = create_engine(self.url.rsplit("/", 1)[0], poolclass=NullPool)
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            return True
        except Exception:
            return False
        finally:
            engine.dispose()

    def crash(self) -> None:
        """SIGKILL the server: every connection drops, owned jobs go back with the crash."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(30)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateServer]:
    if MARIADBD is None or INSTALL_DB is None:
        pytest.skip("mariadbd / mariadb-install-db are not installed")
    base = tmp_path_factory.mktemp("private-mariadb")
    server = PrivateServer(base, _free_port())
    server.install()
    try:
        server.start()
        admin = create_engine(server.url.rsplit("/", 1)[0], poolclass=NullPool)
        with admin.begin() as conn:
            conn.execute(text("CREATE DATABASE restart_test"))
        admin.dispose()
        yield server
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_workers_survive_a_server_restart_and_every_job_completes(
    server: PrivateServer, tmp_path: Path
) -> None:
    engine = create_engine(server.url, poolclass=NullPool)
    table = number_table(engine, TABLE)
    lines = "".join(f'{{"n": {n}}}\n' for n in range(1, 301))
    assert run_q4m("enqueue", TABLE, "--url", server.url, input=lines).returncode == 0
    log, output = tmp_path / "jobs.log", tmp_path / "worker.out"
    env = q4m_env(WORKER_LOG=str(log), WORKER_TABLE=TABLE, WORKER_SLEEP="0.02")
    worker = start_q4m(
        "worker",
        "worker_jobs:RecordJob",
        "--url",
        server.url,
        "--concurrency",
        "2",
        "--burst",
        env=env,
        output=output,
    )
    try:
        wait_for(lambda: len(read_log(str(log))) >= 100, 90, "50 jobs before the restart")
        server.crash()
        time.sleep(1.5)  # the workers find the server gone and back off
        server.start()
        assert worker.wait(120) == 0
    finally:
        stop(worker)
    done = collections.Counter(n for e, n, _ in read_log(str(log)) if e == "done")
    assert set(done) == set(range(1, 301))  # every job completed
    assert sum(done.values()) - 300 <= 2  # at most the jobs in hand ran twice (at least once)
    assert count_rows(engine, table) == 0
    text_out = output.read_text()
    assert "database error" in text_out and "reconnecting in" in text_out
    assert "database is back" in text_out
    engine.dispose()
