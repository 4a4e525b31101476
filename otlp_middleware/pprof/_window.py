"""``PprofWindow``: the aggregate pprof of one export window, built as its records arrive.

``merged_profiles`` renders a batch of records at once, so the records of a whole window
(seconds of traffic) wait in memory as Python objects until it runs. A window instead adds
each record's samples to its profiles as the record comes (``add``); the records can go at
once. What stays in Python objects for the window is what its profiles share (strings,
functions, locations, stacks, the sums of the samples of requests without a span), which
stops growing once the app's code paths have been seen. Many small objects held for seconds
and then freed together reorder CPython's allocator pools and slow the app's own
allocations; measured in ``docs/deployment.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ..types import ProfileRecord
from ._builder import PprofBuilder, add_cpu_samples, add_heap_samples, cpu_builder, heap_builder
from ._records import record_labels
from .profile_pb2 import Profile

# a kind of sample: name, the record's samples of it, their period, builder, adder
_Kind = tuple[str, Sequence[Any], int, Callable[..., PprofBuilder], Callable[..., None]]


class PprofWindow:
    """Records merged into one pprof per kind (``cpu``, ``heap``) as they are added.

    Every sample keeps its request's labels, as in ``merged_profiles``. Samples of requests
    with a span (their trace and span ids are labels) are written into the profile message as
    they come, unmerged (pprof readers add them up); the others merge as in
    ``merged_profiles``, by stack and labels.

    Example::

        window = PprofWindow()
        for record in records:
            window.add(record)
        profiles = window.take()  # {"cpu": Profile, ...}; the window starts afresh
    """

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        # per kind ("cpu", "heap"): its builder, and how many records added to it
        self._builders: dict[str, tuple[PprofBuilder, list[int]]] = {}
        self.records = 0  # records with samples added since the last take()
        self.start_ns = 0  # the earliest start among them
        self._end_ns = 0

    def add(self, record: ProfileRecord) -> bool:
        """Add ``record``'s samples; False (nothing added) for a record without any."""
        if record.is_empty:
            return False
        labels = record_labels(record)
        # A request's trace and span ids make its samples its own: they are written out at
        # once; without them, samples of many requests merge and only their keys are kept.
        unique = record.link is not None
        kinds: tuple[_Kind, ...] = (
            ("cpu", record.cpu_samples, record.cpu_period_ns, cpu_builder, add_cpu_samples),
            ("heap", record.heap_samples, record.heap_period_bytes, heap_builder, add_heap_samples),
        )
        for kind, samples, period, make, add in kinds:
            if not samples:
                continue
            entry = self._builders.get(kind)
            if entry is None:
                entry = self._builders[kind] = (make(period, stream=True), [0])
            else:
                entry[0].widen_period(period)
            add(entry[0], samples, labels, unique=unique)
            entry[1][0] += 1
        start, end = record.start_time_ns, record.start_time_ns + record.duration_ns
        if not self.records or start < self.start_ns:
            self.start_ns = start
        if end > self._end_ns:
            self._end_ns = end
        self.records += 1
        return True

    def take(self) -> dict[str, Profile]:
        """The window's profiles (``{}`` if nothing was added); the window starts afresh."""
        out: dict[str, Profile] = {}
        start, duration = self.start_ns, max(self._end_ns - self.start_ns, 0)
        for kind, (b, n) in self._builders.items():
            b.comment(f"requests={n[0]}")
            out[kind] = b.build(time_nanos=start, duration_nanos=duration)
        self._reset()
        return out
