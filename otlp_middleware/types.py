"""Plain data types shared by every layer: samples, span links and profile records.

These are the internal sample store. Samplers produce ``CpuSample`` / ``HeapSample`` whose
``stack`` is a tuple of frame ids (leaf first) in ``otlp_middleware.profiling._frames.FRAMES``;
a closed scope becomes a ``ProfileRecord``; the background exporter renders records as pprof
(``otlp_middleware.pprof``) or OTLP (``otlp_middleware.otlp``). Nothing here imports another
module of the package, so every layer may use it.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

AttributeScalar = str | bool | int | float | bytes
"""A value of a profile or sample attribute."""


class CpuSample(NamedTuple):
    """One CPU/wall sample: where a thread was and how much time that spot stands for."""

    stack: tuple[int, ...]
    thread_id: int
    thread_name: str
    cpu_ns: int
    wall_ns: int
    timestamp_ns: int  # Unix time of the sample


class HeapSample(NamedTuple):
    """One sampled allocation site, with values already scaled to estimated totals."""

    stack: tuple[int, ...]
    thread_id: int
    thread_name: str
    alloc_objects: int
    alloc_bytes: int
    inuse_objects: int
    inuse_bytes: int


@dataclass(frozen=True)
class SpanLink:
    """The OpenTelemetry span a profile (or sample) belongs to."""

    trace_id: bytes  # 16 bytes
    span_id: bytes  # 8 bytes

    def __post_init__(self) -> None:
        if len(self.trace_id) != 16 or len(self.span_id) != 8:
            raise ValueError("SpanLink needs a 16-byte trace_id and an 8-byte span_id")

    @property
    def trace_id_hex(self) -> str:
        return self.trace_id.hex()

    @property
    def span_id_hex(self) -> str:
        return self.span_id.hex()

    @classmethod
    def from_hex(cls, trace_id: str, span_id: str) -> SpanLink:
        return cls(bytes.fromhex(trace_id), bytes.fromhex(span_id))


_getrandbits = random.getrandbits


def new_profile_id() -> bytes:
    """16 random bytes, never all zero (OTLP treats all-zero ids as invalid).

    Like OpenTelemetry's own trace and span ids, these come from ``random`` (reseeded in a
    forked child), not the OS: an id only has to be unique, and ``os.urandom`` is a system
    call made once per exported request.
    """
    while True:
        value = _getrandbits(128)
        if value:
            return value.to_bytes(16, "big")


@dataclass
class ProfileRecord:
    """Everything one closed scope (a request, or a standalone profiler run) collected.

    ``attributes`` are the low-cardinality request attributes (http.route,
    http.request.method, http.response.status_code, error.type, ...). Rendering to pprof or
    OTLP happens later, off the request path.
    """

    profile_id: bytes
    start_time_ns: int
    duration_ns: int
    cpu_samples: Sequence[CpuSample] = ()
    cpu_period_ns: int = 0
    heap_samples: Sequence[HeapSample] = ()
    heap_period_bytes: int = 0
    link: SpanLink | None = None
    attributes: Mapping[str, AttributeScalar] = field(default_factory=dict)

    @property
    def is_empty(self) -> bool:
        return not self.cpu_samples and not self.heap_samples
