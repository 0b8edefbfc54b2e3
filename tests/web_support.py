"""Helpers for the dashboard tests: a private database, the dashboard under a real Uvicorn
server in a thread, jobs and dead letters to look at."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection
from sqlalchemy import Engine
from sqlalchemy import Table
from sqlalchemy import create_engine
from sqlalchemy import text
from sqlalchemy.engine import URL

from sqlalchemy_q4m.types import new_job_id
from sqlalchemy_q4m.worker.deadletter import bury
from sqlalchemy_q4m.worker.deadletter import dead_letter_table
from sqlalchemy_q4m.worker.deadletter import ensure_dead_letter_table

XSS = "<script>document.title='pwned'</script><img src=x onerror=alert(1)>"


def private_database(server: URL, name: str) -> Iterator[Engine]:
    """A fresh database ``name`` on ``server``, dropped at the end."""
    admin = create_engine(server._replace(database=None))
    with admin.begin() as conn:
        conn.execute(text(f"DROP DATABASE IF EXISTS {name}"))
        conn.execute(text(f"CREATE DATABASE {name}"))
    engine = create_engine(server._replace(database=name))
    try:
        yield engine
    finally:
        engine.dispose()
        with admin.begin() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS {name}"))
        admin.dispose()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def running(app: Any) -> Iterator[str]:
    """Serve ``app`` with Uvicorn on a free loopback port; yields its base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise AssertionError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def dead(conn: Connection) -> Table:
    table = dead_letter_table()
    ensure_dead_letter_table(conn, table)
    return table


def add_dead_letter(engine: Engine, queue: str, values: dict[str, Any], error: str) -> None:
    with engine.begin() as conn:
        bury(
            conn,
            dead(conn),
            queue=queue,
            values={"id": new_job_id(), **values},
            error=error,
            traceback=f"Traceback (most recent call last):\n  ...\nRuntimeError: {error}",
            attempts=3,
        )
