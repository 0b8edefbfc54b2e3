"""``consumer/crossing.py``: :func:`cross` behaves as SQLAlchemy's ``greenlet_spawn`` (values,
errors, cancellation thrown in at the await, the caller's context, SQLAlchemy's ``await_only``
inside) while it reuses its greenlets: one per crossing in progress, none shared between two
crossings at once, none holding anything of a finished crossing, per thread."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import threading
import weakref
from typing import Any

import pytest
from greenlet import getcurrent
from sqlalchemy.util import await_only

from sqlalchemy_q4m.consumer import crossing
from sqlalchemy_q4m.consumer.crossing import cross

pytestmark = pytest.mark.unit


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_values_errors_and_await_only_inside() -> None:
    async def answer() -> int:
        await asyncio.sleep(0)
        return 42

    def sync_side(a: int, b: int) -> int:
        return a + b + await_only(answer())  # SQLAlchemy accepts the kept greenlet

    def fails() -> None:
        await_only(asyncio.sleep(0))
        raise LookupError("from the sync side")

    async def main() -> None:
        assert await cross(sync_side, 1, 2) == 45
        with pytest.raises(LookupError, match="from the sync side"):
            await cross(fails)
        assert await cross(sync_side, 0, 0) == 42  # the greenlet that raised serves again

    run(main())


def test_the_greenlet_is_kept_for_the_next_crossing() -> None:
    async def main() -> list[Any]:
        seen = []
        for _ in range(3):
            seen.append(await cross(getcurrent))
        return seen

    first, second, third = run(main())
    assert first is second is third
    assert first is not getcurrent()
    assert getattr(first, "__sqlalchemy_greenlet_provider__", False) is True


def test_concurrent_crossings_never_share_a_greenlet() -> None:
    """Twenty tasks, each crossing while the others are suspended in theirs: each crossing has
    a greenlet of its own for its whole length, and every one returns its own result."""
    in_use: set[int] = set()
    overlaps: list[int] = []

    def step(n: int) -> int:
        me = id(getcurrent())
        if me in in_use:
            overlaps.append(n)
        in_use.add(me)
        for _ in range(3):
            await_only(asyncio.sleep(0))  # the other tasks cross meanwhile
            assert id(getcurrent()) == me
        in_use.discard(me)
        return n * n

    async def task(n: int) -> list[int]:
        return [await cross(step, n) for _ in range(5)]

    async def main() -> list[list[int]]:
        return list(await asyncio.gather(*(task(n) for n in range(20))))

    results = run(main())
    assert results == [[n * n] * 5 for n in range(20)]
    assert overlaps == []
    assert 1 <= len(crossing._kept.free) <= crossing.KEPT


def test_at_most_kept_greenlets_stay() -> None:
    def step() -> None:
        await_only(asyncio.sleep(0.01))

    async def main() -> None:
        await asyncio.gather(*(cross(step) for _ in range(crossing.KEPT + 20)))

    run(main())
    assert len(crossing._kept.free) == crossing.KEPT


def test_a_cancellation_is_thrown_in_at_the_await_and_the_step_can_clean_up() -> None:
    """As with ``greenlet_spawn``: the sync side sees the cancellation at its ``await_only``,
    may still await its cleanup, and the crossing raises what it raised."""
    events: list[str] = []

    def step(ready: asyncio.Event) -> None:
        ready.set()
        try:
            await_only(asyncio.sleep(10))
        except asyncio.CancelledError:
            await_only(asyncio.sleep(0))  # cleanup that awaits, after the cancellation
            events.append("cleaned up")
            raise

    async def main() -> None:
        ready = asyncio.Event()
        task = asyncio.ensure_future(cross(step, ready))
        await ready.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await cross(lambda: "next") == "next"  # the greenlet serves again

    run(main())
    assert events == ["cleaned up"]


def test_the_sync_side_runs_in_the_callers_context_and_a_kept_greenlet_holds_none() -> None:
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")

    def read_and_set() -> str:
        seen = var.get()
        var.set("set in the greenlet")
        return seen

    async def task(value: str) -> tuple[str, str]:
        var.set(value)
        seen = await cross(read_and_set)
        return seen, var.get()

    async def main() -> list[tuple[str, str]]:
        return list(await asyncio.gather(task("a"), task("b")))

    assert run(main()) == [("a", "set in the greenlet"), ("b", "set in the greenlet")]
    assert all(kept.gr_context is None for kept in crossing._kept.free)


def test_nothing_of_a_finished_crossing_stays_referenced() -> None:
    class Job:
        pass

    class Failure(Exception):
        pass

    refs: list[weakref.ref[Any]] = []

    def made() -> Job:
        job = Job()
        refs.append(weakref.ref(job))
        return job

    def failed(job: Job) -> None:
        refs.append(weakref.ref(job))
        raise Failure(job)

    async def main() -> None:
        job = await cross(made)
        del job
        with pytest.raises(Failure):
            await cross(failed, Job())

    run(main())
    gc.collect()
    assert [ref() for ref in refs] == [None, None]
    assert crossing._kept.free  # kept, and holding neither


def test_each_thread_keeps_its_own() -> None:
    kept: dict[str, Any] = {}
    free_after: dict[str, list[Any]] = {}  # asserted here: a failed assert in a thread is lost

    def in_thread(name: str) -> None:
        async def main() -> Any:
            return await cross(getcurrent)

        kept[name] = run(main())
        free_after[name] = list(crossing._kept.free)

    threads = [threading.Thread(target=in_thread, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(kept) == {"a", "b"} and kept["a"] is not kept["b"]
    assert free_after == {"a": [kept["a"]], "b": [kept["b"]]}
    assert not any(g is kept["a"] or g is kept["b"] for g in crossing._kept.free)


def test_a_greenlet_of_another_parent_is_not_reused() -> None:
    """An event loop run inside another greenlet (its parent differs): a new one is made."""
    from greenlet import greenlet

    async def main() -> Any:
        return await cross(getcurrent)

    outer = run(main())
    inner = greenlet(lambda: run(main())).switch()
    assert inner is not outer
    assert inner.parent is not outer.parent


def test_a_finished_threads_greenlets_are_freed() -> None:
    """A thread that ran an event loop and ended leaves none of its kept greenlets behind
    (a program that runs ``asyncio.run`` in short-lived threads must not grow)."""

    def step() -> int:
        return int(await_only(asyncio.sleep(0, result=1)))

    seen: list[tuple[int, int]] = []  # (result, greenlets kept), asserted in this thread

    def in_thread() -> None:
        async def main() -> int:
            return sum(await asyncio.gather(*(cross(step) for _ in range(5))))

        seen.append((run(main()), len(crossing._kept.free)))

    for _ in range(20):
        thread = threading.Thread(target=in_thread)
        thread.start()
        thread.join()
    assert seen == [(5, 5)] * 20
    gc.collect()
    mine = {id(g) for g in crossing._kept.free}
    alive = [o for o in gc.get_objects() if isinstance(o, crossing._Crossing)]
    assert [o for o in alive if id(o) not in mine] == []
