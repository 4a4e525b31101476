"""``PRIVATE_HEAP`` (``otlp_middleware.profiling._private_heap``): the profiler's background
threads allocate outside pymalloc, and every other thread keeps it as it was.

Checked by what pymalloc itself counts (``sys.getallocatedblocks()``, its blocks in use), not
by timing: objects made inside come from the C allocator, objects made by any other thread
meanwhile from pymalloc, and the allocator is back as it was once no thread is inside. (That
count drops for each object made inside and freed, as pymalloc uncounts a block it did not
make: see ``_heap``. So made inside, the objects leave it lower, not higher.)
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import threading
import tracemalloc
from typing import Any

import pytest

try:
    from otlp_middleware.profiling import _private_heap
except ImportError:  # not built: no compiler, not Linux
    pytest.skip("otlp_middleware.profiling._private_heap is not built", allow_module_level=True)

from otlp_middleware.profiling import _heap
from otlp_middleware.profiling._engine import ENGINE
from otlp_middleware.profiling._heap import PRIVATE_HEAP

from . import workloads
from .test_lean_call import needs_lean
from .test_middleware import KeepingExporter, asgi_get, make

N = 20_000

if not _heap.stats()["usable"]:  # PYTHONMALLOC=debug, -X dev, tracemalloc at start-up
    pytest.skip("pymalloc is not the allocator in use", allow_module_level=True)


def blocks_for(make_objects: Any) -> tuple[int, Any]:
    """pymalloc blocks in use after ``make_objects()`` minus before, and what it made."""
    gc.collect()
    before = sys.getallocatedblocks()
    made = make_objects()
    return sys.getallocatedblocks() - before, made


def tuples() -> list[tuple[int, str]]:
    return [(i + 1_000_000, f"x{i}") for i in range(N)]  # 3 objects each, none cached


def test_the_module_is_the_extension() -> None:
    assert _heap.enter is _private_heap.enter
    assert _heap.stats()["usable"] is True


def test_without_the_extension_it_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    monkeypatch.setitem(sys.modules, "otlp_middleware.profiling._private_heap", None)
    try:
        fallback = importlib.reload(_heap)
        with fallback.PRIVATE_HEAP, fallback.outside_private_heap():
            assert fallback.enter() is False
            assert fallback.stats()["usable"] is False
        grew, _made = blocks_for(tuples)
        assert grew >= 3 * N
    finally:
        monkeypatch.undo()
        importlib.reload(_heap)
    assert _heap.enter is _private_heap.enter


def test_objects_made_inside_come_from_the_c_allocator() -> None:
    outside, kept = blocks_for(tuples)
    assert outside >= 3 * N  # the control: pymalloc serves them
    del kept
    routed = _heap.stats()["routed"]

    def inside() -> list[tuple[int, str]]:
        with PRIVATE_HEAP:
            assert _heap.stats()["installed"] and _heap.stats()["marked"]
            return tuples()

    grew, made = blocks_for(inside)
    assert grew < N // 10, grew  # the list and its 60 000 objects: none in pymalloc
    assert _heap.stats()["routed"] - routed >= 3 * N
    stats = _heap.stats()
    assert not stats["installed"] and not stats["marked"] and stats["inside"] == 0
    # Made there, used and freed here: pymalloc frees the blocks that are not its own.
    assert made[N - 1] == (N - 1 + 1_000_000, f"x{N - 1}")
    made.append((1, "y"))
    del made
    gc.collect()


def test_other_threads_keep_pymalloc_meanwhile() -> None:
    inside, leave = threading.Event(), threading.Event()
    kept: list[Any] = []

    def background() -> None:
        with PRIVATE_HEAP:
            kept.append(tuples())  # freed later, on the main thread
            inside.set()
            leave.wait(10)  # the GIL is released here: the main thread runs, wrapped

    t = threading.Thread(target=background)
    t.start()
    try:
        assert inside.wait(10)
        assert _heap.stats()["installed"] and not _heap.stats()["marked"]
        routed = _heap.stats()["routed"]
        grew, made = blocks_for(tuples)
        assert grew >= 3 * N  # this thread's objects: pymalloc's
        assert _heap.stats()["routed"] == routed
        del made
    finally:
        leave.set()
        t.join(10)
    assert not _heap.stats()["installed"]
    kept.clear()


def test_nested_use_lasts_to_the_outermost_exit() -> None:
    with PRIVATE_HEAP:
        with PRIVATE_HEAP:
            pass
        assert _heap.stats()["marked"]
        grew, _made = blocks_for(tuples)
        assert grew < N // 10
    assert not _heap.stats()["marked"] and not _heap.stats()["installed"]
    _heap.exit()  # an exit too many does nothing
    assert _heap.stats()["inside"] == 0


def test_a_pause_lets_the_app_allocate_unwrapped_and_resumes() -> None:
    from otlp_middleware.profiling._heap import outside_private_heap

    with outside_private_heap():  # outside: nothing to pause
        assert not _heap.stats()["installed"]
    with PRIVATE_HEAP, PRIVATE_HEAP:
        with outside_private_heap():
            stats = _heap.stats()
            assert not stats["marked"] and not stats["installed"] and stats["inside"] == 0
            grew, _made = blocks_for(tuples)
            assert grew >= 3 * N
        assert _heap.stats()["marked"] and _heap.stats()["installed"]
        grew, _made = blocks_for(tuples)
        assert grew < N // 10
    assert _heap.stats()["marked"] is False  # both levels came back, and both left
    assert not _heap.stats()["installed"]
    with pytest.raises(ValueError):
        _heap.resume(-1)


def test_it_stays_out_of_the_way_of_tracemalloc() -> None:
    tracemalloc.start()
    try:
        assert _heap.enter() is False  # another hook is on the allocator: nothing changes
        assert not _heap.stats()["installed"] and not _heap.stats()["marked"]
        _heap.exit()
    finally:
        tracemalloc.stop()
    # tracemalloc started while a thread is inside wraps the wrapper: it stays in the chain,
    # forwarding, until it is on top again
    with PRIVATE_HEAP:
        tracemalloc.start()
        try:
            made = tuples()
            snapshot = tracemalloc.take_snapshot()
            assert snapshot.traces  # tracemalloc sees the objects made under it
        finally:
            with PRIVATE_HEAP:
                pass
            assert _heap.stats()["installed"]  # not on top: still there
            tracemalloc.stop()
    assert not _heap.stats()["installed"]  # on top again at the last exit: gone
    del made


def test_it_stays_out_of_the_way_of_the_heap_profiler() -> None:
    from otlp_middleware.profiling import MemoryProfiler

    profiler = MemoryProfiler()
    with profiler:
        if profiler.get_stats().backend != "native":
            pytest.skip("the heap profiler's extension is not built")
        assert _heap.enter() is False
        assert not _heap.stats()["installed"]
    assert _heap.enter() is True
    _heap.exit()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork")
def test_a_forked_child_forgets_the_threads_inside() -> None:
    inside, leave = threading.Event(), threading.Event()

    def background() -> None:
        with PRIVATE_HEAP:
            inside.set()
            leave.wait(10)

    t = threading.Thread(target=background)
    t.start()
    try:
        assert inside.wait(10)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: the background thread does not exist here
            stats = _heap.stats()
            ok = stats["inside"] == 0 and not stats["installed"] and not stats["marked"]
            grew, _ = blocks_for(tuples)
            os.write(w, b"ok" if ok and grew >= 3 * N else repr((stats, grew)).encode())
            os._exit(0)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            answer = f.read()
        os.waitpid(pid, 0)
        assert answer == b"ok"
        assert _heap.stats()["installed"]  # the parent's thread is still inside
    finally:
        leave.set()
        t.join(10)
    assert not _heap.stats()["installed"]


def test_the_collector_and_exporter_build_records_in_it() -> None:
    """A profiled request's samples and record are made on the collector thread and
    exported on the exporter thread, both inside."""
    enters = _heap.stats()["enters"]
    exporter = KeepingExporter()
    mw = make(cpu_app, exporter)
    asyncio.run(asgi_get(mw, "/a"))  # the first request starts the sampler
    asyncio.run(asgi_get(mw, "/b"))
    mw.profiler.shutdown(5)
    assert any(r.cpu_samples for r in exporter.records)
    assert _heap.stats()["enters"] > enters
    workloads.wait_until(lambda: not _heap.stats()["installed"], timeout=5)
    assert _heap.stats()["inside"] == 0


async def cpu_app(scope: Any, receive: Any, send: Any) -> None:
    workloads.hot_function(0.05)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


@needs_lean
def test_a_request_hands_its_samples_on_from_the_private_heap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The lean ASGI path's end of a request that took samples (``_lean_end``) makes what
    waits for the collector (the request's context, its ``finish``) in the private heap."""
    from otlp_middleware.middleware._core import ROUTE_DECORATORS

    monkeypatch.setitem(ROUTE_DECORATORS, "in_use", False)  # other test modules apply some
    seen: list[dict[str, Any]] = []
    release = ENGINE.release_request

    def spy(watcher: Any, finish: Any) -> None:
        seen.append(_heap.stats())
        release(watcher, finish)

    monkeypatch.setattr(ENGINE, "release_request", spy)
    exporter = KeepingExporter()
    mw = make(cpu_app, exporter)
    for path in ("/a", "/b", "/c"):
        asyncio.run(asgi_get(mw, path))
    mw.profiler.shutdown(5)
    assert len(seen) >= 2  # the first request takes the general path
    assert all(s["marked"] and s["installed"] for s in seen), seen
    assert not _heap.stats()["marked"]
