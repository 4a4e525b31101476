"""``PRIVATE_HEAP``: the profiler's background threads allocate outside pymalloc.

``with PRIVATE_HEAP:`` around a background thread's work (the collector's drains, the
exporter's windows) makes that thread's Python objects come from the C allocator instead of
CPython's small-object pools, which the app's threads keep to themselves: the records built
there then leave the app's pools as they were (see ``_native/private_heap.c``). Without the
extension, or where pymalloc is not the allocator in use (``PYTHONMALLOC``, ``-X dev``,
tracemalloc, the heap profiler's hook), it does nothing.

One thing shows it: ``sys.getallocatedblocks()`` counts low. pymalloc counts the blocks it
hands to the C allocator itself, and uncounts every such block it frees, ours among them
(which it never counted), so while the profiler runs that figure drifts down by one for each
object these threads made and freed. Leak hunts that compare it (``regrtest -R``) should run
without profiling.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

try:
    from ._private_heap import after_fork, enter, exit, pause, resume, stats
except ImportError:  # not built: no compiler, not Linux

    def enter() -> bool:
        return False

    def exit() -> None:
        pass

    def after_fork() -> None:
        pass

    def pause() -> int:
        return 0

    def resume(depth: int, /) -> None:
        pass

    def stats() -> dict[str, Any]:
        return {
            "usable": False,
            "installed": False,
            "marked": False,
            "inside": 0,
            "routed": 0,
            "enters": 0,
            "installs": 0,
        }


class _PrivateHeap:
    """A context manager (reentrant, per thread) around ``enter()`` and ``exit()``."""

    __slots__ = ()

    def __enter__(self) -> None:
        enter()

    def __exit__(self, *exc: object) -> None:
        exit()


PRIVATE_HEAP = _PrivateHeap()


@contextlib.contextmanager
def outside_private_heap() -> Iterator[None]:
    """Leave ``PRIVATE_HEAP`` for a while (a blocking wait: a network round trip, a back-off
    sleep): the app's threads allocate through no wrapper meanwhile."""
    depth = pause()
    try:
        yield
    finally:
        resume(depth)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=after_fork)

__all__ = [
    "PRIVATE_HEAP",
    "after_fork",
    "enter",
    "exit",
    "outside_private_heap",
    "pause",
    "resume",
    "stats",
]
