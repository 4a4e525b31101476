"""Interned frames and stack capture: the internal sample store's vocabulary.

A stack is a tuple of small ints, leaf first. Each int names a ``FrameInfo`` (function, file,
line) in the process-wide ``FRAMES`` table. Interning keeps a sample a few machine words, so the
sampling path stays cheap and identical stacks compare by tuple equality.

Keys: Python-level sampling interns by ``(code object, line)``, which costs one dict lookup per
frame; native samplers intern by ``(name, filename, first line, line)`` strings. Two keys may
name the same source location: the pprof builder merges by content, so that is harmless.
"""

from __future__ import annotations

import itertools
from types import CodeType, FrameType
from typing import Any, NamedTuple


class FrameInfo(NamedTuple):
    """One source location: a function (qualified name, file, first line) at a line."""

    name: str
    filename: str
    start_line: int
    line: int


TRUNCATED_NAME = "<truncated>"
"""Function name of the marker frame that stands for frames cut off a too-deep stack."""


def _qualname(code: CodeType) -> str:
    # co_qualname exists from 3.11; 3.10 has only the bare name.
    return getattr(code, "co_qualname", code.co_name)


class FrameTable:
    """Maps sampling-time keys to dense frame ids and ids back to ``FrameInfo``.

    Safe to call from a Python signal handler that interrupts another call on the same thread,
    and from several threads: ids come from ``itertools.count`` (atomic under the GIL) and the
    info is stored before the key is published, so an id is never visible without its info.
    A race can give one location two ids; consumers merge by content.
    """

    def __init__(self) -> None:
        self._ids: dict[Any, int] = {}
        self._infos: dict[int, FrameInfo] = {}
        self._next = itertools.count(1)

    def intern_code(self, code: CodeType, line: int | None) -> int:
        key = (code, line)
        fid = self._ids.get(key)
        if fid is None:
            fid = next(self._next)
            self._infos[fid] = FrameInfo(
                _qualname(code), code.co_filename, code.co_firstlineno, line or 0
            )
            self._ids[key] = fid
        return fid

    def intern(self, name: str, filename: str, start_line: int, line: int) -> int:
        key = (name, filename, start_line, line)
        fid = self._ids.get(key)
        if fid is None:
            fid = next(self._next)
            self._infos[fid] = FrameInfo(name, filename, start_line, line)
            self._ids[key] = fid
        return fid

    def info(self, frame_id: int) -> FrameInfo:
        return self._infos[frame_id]

    def __len__(self) -> int:
        return len(self._infos)


FRAMES = FrameTable()
"""The process-wide frame table shared by every sampler."""


def truncated_marker(dropped: int) -> int:
    """Frame id of the marker that replaces ``dropped`` root-side frames of a deep stack."""
    return FRAMES.intern(TRUNCATED_NAME, "", 0, 0)


def truncate(stack: tuple[int, ...], max_depth: int) -> tuple[int, ...]:
    """Keep the ``max_depth`` leaf-most frames of ``stack`` and a marker for the rest."""
    if len(stack) <= max_depth:
        return stack
    return (*stack[:max_depth], truncated_marker(len(stack) - max_depth))


def capture_stack(
    frame: FrameType | None, max_depth: int, roots: dict[int, Any] | None = None
) -> tuple[tuple[int, ...], list[Any]]:
    """Walk ``frame`` to the thread's root; return (stack leaf first, matched root entries).

    ``roots`` maps ``id(frame)`` of registered root frames (async scopes) to an entry; every
    root met on the way is returned, so the caller knows which async scopes own the sample.
    The stack keeps the ``max_depth`` leaf-most frames and ends with a marker frame if any
    were cut.
    """
    ids: list[int] = []
    matched: list[Any] = []
    intern = FRAMES.intern_code
    depth = 0
    while frame is not None:
        if depth < max_depth:
            ids.append(intern(frame.f_code, frame.f_lineno))
        if roots:
            entry = roots.get(id(frame))
            if entry is not None:
                matched.append(entry)
        frame = frame.f_back
        depth += 1
    if depth > max_depth:
        ids.append(truncated_marker(depth - max_depth))
    return tuple(ids), matched
