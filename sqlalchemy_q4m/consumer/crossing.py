"""The asyncio queue session's way into its sync half: :func:`cross`, SQLAlchemy's
``greenlet_spawn`` with the greenlet kept for the next crossing.

The asyncio queue session runs the sync one in a greenlet, as SQLAlchemy's asyncio extension
runs the sync ORM: ``greenlet_spawn(fn)`` starts ``fn`` in a new greenlet, and each
``await_only(awaitable)`` inside it switches back to the event loop's greenlet, which awaits
the awaitable and switches in again with its outcome.  A queue session crosses twice per job
(the claim; the end).  Measured with ``python -m benchmarks.cpu``, the raw loop's statements
crossing into a new greenlet per half of a job cost 22-54 µs more client CPU per job than
crossing into one kept greenlet (``benchmarks/NOTES.md``, "The greenlet bridge taken apart"),
though ``python -m benchmarks.instructions`` counts the same instructions for both (so the
difference, if not noise, is a new greenlet's fresh memory: cache misses, page faults).  So
:func:`cross` keeps the greenlets it made, one per crossing in progress at a time, in a list
per thread, and runs the next ``fn`` in one of them; everything else is ``greenlet_spawn``'s:
``fn`` runs in the caller's :mod:`contextvars` context, an error (a cancellation included)
raised while awaiting is thrown into ``fn`` at its ``await_only``, and what ``fn`` returns or
raises is the crossing's.

SQLAlchemy's ``await_only`` accepts a greenlet that carries ``__sqlalchemy_greenlet_provider__
= True``, the duck-typed protocol it documents for third-party greenlet providers (since
SQLAlchemy 2.0.31, the package's minimum).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any
from typing import TypeVar

from sqlalchemy.util import greenlet_spawn

try:
    from greenlet import GreenletExit  # type: ignore[import-untyped]  # SQLAlchemy[asyncio]'s
    from greenlet import getcurrent
    from greenlet import greenlet
except ImportError:  # pragma: no cover - SQLAlchemy without its asyncio extra: cross() leaves
    greenlet = object  # the crossing to greenlet_spawn, which says what is missing

__all__ = ["cross"]

R = TypeVar("R")

#: Kept greenlets per thread, at most this many (the crossings in progress at once, at peak).
KEPT = 64


class _Done:
    """What a crossing greenlet hands back when ``fn`` is over: its value or its error."""

    __slots__ = ("error", "value")

    def __init__(self, value: Any, error: BaseException | None) -> None:
        self.value, self.error = value, error


class _Crossing(greenlet):  # type: ignore[misc]
    """A greenlet that runs one ``fn`` per crossing, for as many crossings as it is kept."""

    __sqlalchemy_greenlet_provider__ = True  # SQLAlchemy's await_only() may switch out of it

    def __init__(self, parent: Any) -> None:
        # a function, not a bound method: nothing refers back to the greenlet from its run
        super().__init__(_serve, parent)


def _serve(fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    """The body of a :class:`_Crossing`: run ``fn(*args)``, hand back what came of it, wait
    for the next crossing; forever, until the greenlet is collected."""
    parent = getcurrent().parent
    while True:
        try:
            done = _Done(fn(*args), None)
        except GreenletExit:  # collected while suspended in fn: end, as greenlet_spawn's
            raise
        except BaseException as err:
            done = _Done(None, err)
        del fn, args  # nothing of this crossing stays referenced while kept (``done`` is
        fn, args = parent.switch(done)  # emptied by cross())


class _Kept(threading.local):
    def __init__(self) -> None:
        self.free: list[_Crossing] = []


_kept = _Kept()


async def cross(fn: Callable[..., R], *args: Any) -> R:
    """``await greenlet_spawn(fn, *args)``, in a greenlet kept from an earlier crossing of
    this thread when one is free (see the module docstring)."""
    if greenlet is object:  # pragma: no cover - no greenlet installed
        return await greenlet_spawn(fn, *args)
    current = getcurrent()
    free = _kept.free
    crossing = free.pop() if free else None
    if crossing is None or crossing.parent is not current:
        crossing = _Crossing(current)  # (one whose parent is another greenlet is dropped)
    crossing.gr_context = current.gr_context
    result = crossing.switch(fn, args)
    while not isinstance(result, _Done):  # an awaitable, from await_only() in fn
        try:
            sent = await result
        except BaseException:
            result = crossing.throw(*sys.exc_info())
        else:
            result = crossing.switch(sent)
    # back at the top of its loop: kept, holding nothing of this crossing (nor the context)
    crossing.gr_context = None
    if len(free) < KEPT:
        free.append(crossing)
    value: R = result.value
    error, result.value, result.error = result.error, None, None
    if error is not None:
        raise error
    return value
