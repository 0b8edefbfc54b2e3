"""SIGINT/SIGTERM handling for a worker run: handlers installed for the run, restored after.

The runtime counts the signals: the first one asks for a graceful stop (finish the jobs in
hand, take no new one), the second for a forced one (return the jobs in hand and exit).
Handlers only record the signal and call back; the work happens in the runtime's main loop.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

__all__ = ["STOP_SIGNALS", "on_stop_signals"]

logger = logging.getLogger("sqlalchemy_q4m.signals")

STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def on_stop_signals(callback: Callable[[int], None]) -> Iterator[None]:
    """Call ``callback(signum)`` on SIGINT/SIGTERM inside the block, then restore the previous
    handlers.  Outside the main thread (where Python cannot install handlers) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous: dict[signal.Signals, Any] = {}

    def handler(signum: int, frame: FrameType | None) -> None:
        callback(signum)

    for sig in STOP_SIGNALS:
        previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
