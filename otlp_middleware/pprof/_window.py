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

from ..types import ProfileRecord
from ._builder import PprofBuilder, add_cpu_samples, add_heap_samples, cpu_builder, heap_builder
from ._records import record_labels
from .profile_pb2 import Profile


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
        self._cpu: PprofBuilder | None = None
        self._heap: PprofBuilder | None = None
        self._cpu_records = 0
        self._heap_records = 0
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
        if record.cpu_samples:
            b = self._cpu
            if b is None:
                b = self._cpu = cpu_builder(record.cpu_period_ns, stream=True)
            else:
                b.widen_period(record.cpu_period_ns)
            add_cpu_samples(b, record.cpu_samples, labels, unique=unique)
            self._cpu_records += 1
        if record.heap_samples:
            b = self._heap
            if b is None:
                b = self._heap = heap_builder(record.heap_period_bytes, stream=True)
            else:
                b.widen_period(record.heap_period_bytes)
            add_heap_samples(b, record.heap_samples, labels, unique=unique)
            self._heap_records += 1
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
        for kind, b, n in (
            ("cpu", self._cpu, self._cpu_records),
            ("heap", self._heap, self._heap_records),
        ):
            if b is not None:
                b.comment(f"requests={n}")
                out[kind] = b.build(time_nanos=start, duration_nanos=duration)
        self._reset()
        return out
