"""The runtime's signal handlers only count: a handler runs between two bytecodes of the main
thread, which may hold a lock at that moment (the wake-up event's, logging's); a handler
taking that lock again would hang the worker for good, a second SIGTERM unheard."""

from __future__ import annotations

import signal
import threading
from typing import Any

import pytest

from sqlalchemy_q4m.worker.runtime import ProcessRuntime
from sqlalchemy_q4m.worker.runtime import Supervisor
from sqlalchemy_q4m.worker.runtime import WorkerConfig

pytestmark = pytest.mark.unit

CONFIG = WorkerConfig(specs=("worker_jobs:RecordJob",), url="mysql+pymysql://u@h/db")


def _handle_while_locked(handler: Any, lock: Any) -> bool:
    """Call ``handler`` (as the interpreter would, in the thread holding ``lock``); True if it
    returned."""
    done = threading.Event()

    def main_thread() -> None:
        with lock:  # e.g. inside Event.clear() or Event.wait() when the signal arrives
            handler(signal.SIGTERM)
        done.set()

    thread = threading.Thread(target=main_thread, daemon=True)
    thread.start()
    return done.wait(2.0)


def test_the_process_runtime_handler_takes_no_lock() -> None:
    runtime = ProcessRuntime(CONFIG, [])
    assert _handle_while_locked(runtime._on_signal, runtime._wake._cond)
    assert _handle_while_locked(runtime._on_signal, runtime._wake._cond)
    assert runtime._signals == 2  # the main loop stops, then forces, from the count


def test_the_supervisor_handler_takes_no_lock_and_cuts_its_pauses_short() -> None:
    supervisor = Supervisor(CONFIG)
    supervisor._on_signal(signal.SIGTERM)
    assert supervisor._signals == 1
    done = threading.Event()
    threading.Thread(target=lambda: (supervisor._pause(30.0), done.set()), daemon=True).start()
    assert done.wait(2.0)  # a signal waiting to be forwarded ends a restart backoff at once
