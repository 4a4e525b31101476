"""Render the internal sample store as pprof ``Profile`` messages.

``PprofBuilder`` is the one place that knows pprof's tables: it interns strings (entry 0 is
""), deduplicates functions by (name, file, first line) and locations by (function, line), and
merges samples with identical stacks and labels. ``cpu_profile`` and ``heap_profile`` apply the
Go runtime conventions that ``go tool pprof`` and other readers expect (see REFERENCE.md).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from .._frames import FRAMES, FrameTable
from ..types import CpuSample, HeapSample
from .profile_pb2 import Function, Label, Line, Location, Profile, Sample, ValueType

LabelValue = str | int

CPU_SAMPLE_TYPES = (("samples", "count"), ("cpu", "nanoseconds"), ("wall", "nanoseconds"))
HEAP_SAMPLE_TYPES = (
    ("alloc_objects", "count"),
    ("alloc_space", "bytes"),
    ("inuse_objects", "count"),
    ("inuse_space", "bytes"),
)


class PprofBuilder:
    """Accumulates samples (stacks of frame ids + values + labels) into one pprof Profile.

    ``stream=True`` writes each sample added with ``unique=True`` (labels no other sample
    has, such as a request's trace id) into the profile message at once, instead of keeping
    it in Python objects to merge: this suits a builder that stays open for a whole export
    window (see ``PprofWindow``). Other samples are merged as usual; their keys stop growing
    once the app's code paths have been seen.

    Example::

        b = PprofBuilder([("cpu", "nanoseconds")], ("cpu", "nanoseconds"), 10_101_010)
        b.add(stack, [10_101_010], {"thread_name": "MainThread"})
        profile = b.build(time_nanos=t0, duration_nanos=d)
    """

    def __init__(
        self,
        sample_types: Sequence[tuple[str, str]],
        period_type: tuple[str, str],
        period: int,
        *,
        frames: FrameTable = FRAMES,
        default_sample_type: str | None = None,
        stream: bool = False,
    ) -> None:
        self._frames = frames
        self._stream = stream
        self._profile = Profile()
        self._strings: dict[str, int] = {}
        self.string("")
        for type_, unit in sample_types:
            self._profile.sample_type.append(
                ValueType(type=self.string(type_), unit=self.string(unit))
            )
        self._profile.period_type.CopyFrom(
            ValueType(type=self.string(period_type[0]), unit=self.string(period_type[1]))
        )
        self._profile.period = period
        if default_sample_type:
            self._profile.default_sample_type = self.string(default_sample_type)
        self._n_values = len(sample_types)
        self._functions: dict[tuple[str, str, int], int] = {}
        self._locations_by_frame: dict[int, int] = {}
        self._locations_by_content: dict[tuple[int, int], int] = {}
        self._locations_by_stack: dict[tuple[int, ...], tuple[int, ...]] = {}
        # (location ids, sorted label items) -> accumulated values
        self._samples: dict[
            tuple[tuple[int, ...], tuple[tuple[str, LabelValue], ...]], list[int]
        ] = {}

    def string(self, s: str) -> int:
        idx = self._strings.get(s)
        if idx is None:
            idx = len(self._profile.string_table)
            self._profile.string_table.append(s)
            self._strings[s] = idx
        return idx

    def _location(self, frame_id: int) -> int:
        loc = self._locations_by_frame.get(frame_id)
        if loc is not None:
            return loc
        info = self._frames.info(frame_id)
        fkey = (info.name, info.filename, info.start_line)
        fid = self._functions.get(fkey)
        if fid is None:
            fid = len(self._functions) + 1
            self._functions[fkey] = fid
            self._profile.function.append(
                Function(
                    id=fid,
                    name=self.string(info.name),
                    system_name=self.string(info.name),
                    filename=self.string(info.filename),
                    start_line=info.start_line,
                )
            )
        ckey = (fid, info.line)
        loc = self._locations_by_content.get(ckey)
        if loc is None:
            loc = len(self._locations_by_content) + 1
            self._locations_by_content[ckey] = loc
            # mapping_id 0: interpreted Python code has no binary mapping.
            self._profile.location.append(
                Location(id=loc, line=[Line(function_id=fid, line=info.line)])
            )
        self._locations_by_frame[frame_id] = loc
        return loc

    def add(
        self,
        stack: Sequence[int],
        values: Sequence[int],
        labels: Mapping[str, LabelValue] | None = None,
        *,
        unique: bool = False,
    ) -> None:
        """Add one sample; identical stacks with identical labels are summed.

        ``unique``: the labels are this sample's request's own (a trace id): a streaming
        builder writes it out at once, as there is nothing to merge it with.
        """
        if len(values) != self._n_values:
            raise ValueError(f"expected {self._n_values} values, got {len(values)}")
        frames = stack if isinstance(stack, tuple) else tuple(stack)
        locs = self._locations_by_stack.get(frames)
        if locs is None:  # stacks repeat: each is resolved once
            locs = self._locations_by_stack[frames] = tuple(self._location(f) for f in frames)
        if unique and self._stream:
            sample = self._profile.sample.add(location_id=locs, value=values)
            if labels:
                string = self.string
                for k, v in labels.items():
                    if isinstance(v, str):
                        sample.label.add(key=string(k), str=string(v))
                    else:
                        sample.label.add(key=string(k), num=v)
            return
        key = (locs, tuple(sorted(labels.items())) if labels else ())
        acc = self._samples.get(key)
        if acc is None:
            self._samples[key] = list(values)
        else:
            for i, v in enumerate(values):
                acc[i] += v

    def widen_period(self, period: int) -> None:
        """Make the profile's period ``period`` if that is longer (a window's largest)."""
        if period > self._profile.period:
            self._profile.period = period

    def comment(self, text: str) -> None:
        self._profile.comment.append(self.string(text))

    def build(self, *, time_nanos: int, duration_nanos: int) -> Profile:
        """Return the finished Profile (the builder must not be used afterwards)."""
        p = self._profile
        p.time_nanos = time_nanos
        p.duration_nanos = duration_nanos
        for (locs, labels), values in self._samples.items():
            s = Sample(location_id=locs, value=values)
            for key, value in labels:
                if isinstance(value, str):
                    s.label.append(Label(key=self.string(key), str=self.string(value)))
                else:
                    s.label.append(Label(key=self.string(key), num=value))
            p.sample.append(s)
        return p


def _comments(builder: PprofBuilder, attributes: Mapping[str, object] | None) -> None:
    # Request attributes as "key=value" comments: `go tool pprof -comments` shows them.
    for key, value in (attributes or {}).items():
        builder.comment(f"{key}={value}")


def cpu_builder(
    period_ns: int, frames: FrameTable = FRAMES, *, stream: bool = False
) -> PprofBuilder:
    """A builder for CPU profiles: samples/count, cpu/ns, wall/ns; period cpu/ns."""
    return PprofBuilder(
        CPU_SAMPLE_TYPES,
        ("cpu", "nanoseconds"),
        period_ns,
        frames=frames,
        default_sample_type="cpu",
        stream=stream,
    )


def heap_builder(
    period_bytes: int, frames: FrameTable = FRAMES, *, stream: bool = False
) -> PprofBuilder:
    """A builder for heap profiles: the four Go heap sample types; period space/bytes."""
    return PprofBuilder(
        HEAP_SAMPLE_TYPES,
        ("space", "bytes"),
        period_bytes,
        frames=frames,
        default_sample_type="inuse_space",
        stream=stream,
    )


def add_cpu_samples(
    b: PprofBuilder,
    samples: Iterable[CpuSample],
    labels: Mapping[str, LabelValue],
    *,
    unique: bool = False,
) -> None:
    """Add CPU samples labelled with their thread and ``labels`` (trace, route, ...).

    ``unique``: ``labels`` are the request's own (see ``PprofBuilder.add``).
    """
    for s in samples:
        lab: dict[str, LabelValue] = {"thread_id": s.thread_id, "thread_name": s.thread_name}
        lab.update(labels)
        b.add(s.stack, (1 if s.cpu_ns or s.wall_ns else 0, s.cpu_ns, s.wall_ns), lab, unique=unique)


def add_heap_samples(
    b: PprofBuilder,
    samples: Iterable[HeapSample],
    labels: Mapping[str, LabelValue],
    *,
    unique: bool = False,
) -> None:
    """Add heap samples labelled with their thread and ``labels`` (see ``add_cpu_samples``)."""
    for h in samples:
        lab: dict[str, LabelValue] = {"thread_id": h.thread_id, "thread_name": h.thread_name}
        lab.update(labels)
        b.add(
            h.stack,
            (h.alloc_objects, h.alloc_bytes, h.inuse_objects, h.inuse_bytes),
            lab,
            unique=unique,
        )


def cpu_profile(
    samples: Iterable[CpuSample],
    *,
    period_ns: int,
    time_nanos: int,
    duration_nanos: int,
    labels: Mapping[str, LabelValue] | None = None,
    attributes: Mapping[str, object] | None = None,
    frames: FrameTable = FRAMES,
) -> Profile:
    """A CPU profile: samples/count, cpu/nanoseconds, wall/nanoseconds; period cpu/ns.

    Each sample is labelled with its ``thread_id`` (num) and ``thread_name`` (str), plus
    ``labels`` (e.g. trace_id, span_id, http.route); ``attributes`` become comments.
    """
    b = cpu_builder(period_ns, frames)
    add_cpu_samples(b, samples, labels or {})
    _comments(b, attributes)
    return b.build(time_nanos=time_nanos, duration_nanos=duration_nanos)


def heap_profile(
    samples: Iterable[HeapSample],
    *,
    period_bytes: int,
    time_nanos: int,
    duration_nanos: int,
    labels: Mapping[str, LabelValue] | None = None,
    attributes: Mapping[str, object] | None = None,
    frames: FrameTable = FRAMES,
) -> Profile:
    """A heap profile with the four Go heap sample types; period space/bytes."""
    b = heap_builder(period_bytes, frames)
    add_heap_samples(b, samples, labels or {})
    _comments(b, attributes)
    return b.build(time_nanos=time_nanos, duration_nanos=duration_nanos)
