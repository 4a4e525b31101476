"""Render closed ``ProfileRecord``s as pprof: one profile per request, or one per window.

Every sample is labelled with who it belongs to: ``thread_id``, ``thread_name``, the
request's ``trace_id`` / ``span_id`` (hex, when a span was active) and its low-cardinality
attributes ``http.route`` and ``http.request.method``, so a merged window can still be sliced
(``go tool pprof -tagfocus http.route=/x``).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..types import ProfileRecord
from ._builder import (
    LabelValue,
    PprofBuilder,
    add_cpu_samples,
    add_heap_samples,
    cpu_builder,
    heap_builder,
)
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


def record_profiles(record: ProfileRecord) -> dict[str, Profile]:
    """One request as pprof: ``{"cpu": ..., "heap": ...}`` for the kinds it has samples of."""
    labels = record_labels(record)
    out: dict[str, Profile] = {}
    if record.cpu_samples:
        b = cpu_builder(record.cpu_period_ns)
        add_cpu_samples(b, record.cpu_samples, labels)
        _comments(b, record)
        out["cpu"] = b.build(time_nanos=record.start_time_ns, duration_nanos=record.duration_ns)
    if record.heap_samples:
        b = heap_builder(record.heap_period_bytes)
        add_heap_samples(b, record.heap_samples, labels)
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
        b = cpu_builder(max(r.cpu_period_ns for r in cpu))
        for r in cpu:
            add_cpu_samples(b, r.cpu_samples, record_labels(r))
        b.comment(f"requests={len(cpu)}")
        out["cpu"] = b.build(time_nanos=start, duration_nanos=end - start)
    heap = [r for r in window if r.heap_samples]
    if heap:
        b = heap_builder(max(r.heap_period_bytes for r in heap))
        for r in heap:
            add_heap_samples(b, r.heap_samples, record_labels(r))
        b.comment(f"requests={len(heap)}")
        out["heap"] = b.build(time_nanos=start, duration_nanos=end - start)
    return out
