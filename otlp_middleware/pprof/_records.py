"""Render closed ``ProfileRecord``s as pprof: one profile per request, or one per window.

Every sample is labelled with who it belongs to: ``thread_id``, ``thread_name``, the
request's ``trace_id`` / ``span_id`` (hex, when a span was active) and its low-cardinality
attributes ``http.route`` and ``http.request.method``, so a merged window can still be sliced
(``go tool pprof -tagfocus http.route=/x``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ..types import ProfileRecord
from ._builder import CPU_SAMPLE_TYPES, HEAP_SAMPLE_TYPES, LabelValue, PprofBuilder
from .profile_pb2 import Profile

SAMPLE_LABEL_ATTRIBUTES = ("http.route", "http.request.method")
"""Request attributes copied onto every sample (keep this list low-cardinality)."""


def record_labels(record: ProfileRecord) -> dict[str, LabelValue]:
    labels: dict[str, LabelValue] = {}
    if record.link is not None:
        labels["trace_id"] = record.link.trace_id_hex
        labels["span_id"] = record.link.span_id_hex
    for key in SAMPLE_LABEL_ATTRIBUTES:
        value = record.attributes.get(key)
        if value is not None:
            labels[key] = str(value)
    return labels


def _comments(b: PprofBuilder, record: ProfileRecord) -> None:
    b.comment(f"profile.id={record.profile_id.hex()}")
    if record.link is not None:
        b.comment(f"trace_id={record.link.trace_id_hex}")
        b.comment(f"span_id={record.link.span_id_hex}")
    for key, value in record.attributes.items():
        text = value.hex() if isinstance(value, bytes) else value
        b.comment(f"{key}={text}")


def _add_cpu(b: PprofBuilder, record: ProfileRecord, labels: Mapping[str, LabelValue]) -> None:
    for s in record.cpu_samples:
        lab: dict[str, LabelValue] = {"thread_id": s.thread_id, "thread_name": s.thread_name}
        lab.update(labels)
        b.add(s.stack, (1, s.cpu_ns, s.wall_ns), lab)


def _add_heap(b: PprofBuilder, record: ProfileRecord, labels: Mapping[str, LabelValue]) -> None:
    for h in record.heap_samples:
        lab: dict[str, LabelValue] = {"thread_id": h.thread_id, "thread_name": h.thread_name}
        lab.update(labels)
        b.add(h.stack, (h.alloc_objects, h.alloc_bytes, h.inuse_objects, h.inuse_bytes), lab)


def _cpu_builder(period_ns: int) -> PprofBuilder:
    return PprofBuilder(
        CPU_SAMPLE_TYPES, ("cpu", "nanoseconds"), period_ns, default_sample_type="cpu"
    )


def _heap_builder(period_bytes: int) -> PprofBuilder:
    return PprofBuilder(
        HEAP_SAMPLE_TYPES, ("space", "bytes"), period_bytes, default_sample_type="inuse_space"
    )


def record_profiles(record: ProfileRecord) -> dict[str, Profile]:
    """One request as pprof: ``{"cpu": ..., "heap": ...}`` for the kinds it has samples of."""
    labels = record_labels(record)
    out: dict[str, Profile] = {}
    if record.cpu_samples:
        b = _cpu_builder(record.cpu_period_ns)
        _add_cpu(b, record, labels)
        _comments(b, record)
        out["cpu"] = b.build(time_nanos=record.start_time_ns, duration_nanos=record.duration_ns)
    if record.heap_samples:
        b = _heap_builder(record.heap_period_bytes)
        _add_heap(b, record, labels)
        _comments(b, record)
        out["heap"] = b.build(time_nanos=record.start_time_ns, duration_nanos=record.duration_ns)
    return out


def merged_profiles(records: Sequence[ProfileRecord]) -> dict[str, Profile]:
    """Many requests as one pprof per kind, covering their time window.

    Samples keep their request's labels, so identical stacks of different requests (spans)
    stay separate samples.
    """
    out: dict[str, Profile] = {}
    window = [r for r in records if not r.is_empty]
    if not window:
        return out
    start = min(r.start_time_ns for r in window)
    end = max(r.start_time_ns + r.duration_ns for r in window)
    cpu = [r for r in window if r.cpu_samples]
    if cpu:
        b = _cpu_builder(max(r.cpu_period_ns for r in cpu))
        for r in cpu:
            _add_cpu(b, r, record_labels(r))
        b.comment(f"requests={len(cpu)}")
        out["cpu"] = b.build(time_nanos=start, duration_nanos=end - start)
    heap = [r for r in window if r.heap_samples]
    if heap:
        b = _heap_builder(max(r.heap_period_bytes for r in heap))
        for r in heap:
            _add_heap(b, r, record_labels(r))
        b.comment(f"requests={len(heap)}")
        out["heap"] = b.build(time_nanos=start, duration_nanos=end - start)
    return out
