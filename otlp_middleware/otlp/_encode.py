"""Encode profiles as one OTLP ``ExportProfilesServiceRequest`` (OTLP v1.10.0 layout).

Contract (each rule from the profiles proto, opentelemetry-proto tag v1.10.0, or from what
Grafana Pyroscope requires; see REFERENCE.md):

- One request holds ONE ``ProfilesDictionary`` shared by every profile in it. Each table
  holds its zero value at index 0 (``string_table[0] == ""``), has no duplicates (entries are
  interned by value) and no orphans (an entry is added only when something references it).
- One OTLP ``Profile`` per sample type, with ``period_type`` and a nonzero ``period``; each
  sample has exactly one value, a ``stack_index``, a ``link_index`` (0 = no span) and
  ``attribute_indices`` with unique keys. Samples of different spans are never merged.
- Locations of Python frames carry ``profile.frame.type = "cpython"`` and mapping index 0.

Two inputs, freely mixed in one batch:

``ProfileRecord`` (the middleware's closed request scopes). By default the batch's records
are merged: per sample type (samples/count, cpu/nanoseconds, wall/nanoseconds for CPU;
alloc_objects/count, alloc_space/bytes, inuse_objects/count, inuse_space/bytes for heap) one
Profile covers the batch's time window, and every sample keeps its own request's span link,
its low-cardinality request attributes (``http.route``, ``http.request.method``) and
``thread.id``/``thread.name``. With ``merge=False`` each record becomes its own Profiles
(its ``profile_id``, all its attributes on the Profile). Records without samples are skipped;
zero-valued samples are dropped.

``BuiltProfile`` (from ``ProfileBuilder``), sent as built: one Profile per pprof sample type,
pprof labels become sample attributes (a ``trace_id`` + ``span_id`` label pair becomes the
sample's link), the builder's link goes on every other sample, resource-level builder
attributes go to the Resource (one ``ResourceProfiles`` per distinct set).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2 import (
    ExportProfilesServiceRequest,
)
from opentelemetry.proto.profiles.v1development.profiles_pb2 import (
    Function,
    KeyValueAndUnit,
    Line,
    Link,
    Location,
    Profile,
    ProfilesDictionary,
    ResourceProfiles,
    ScopeProfiles,
    Stack,
    ValueType,
)
from opentelemetry.proto.profiles.v1development.profiles_pb2 import (
    Mapping as OtlpMapping,
)

from ..profiling._frames import FRAMES
from ..types import CpuSample, HeapSample, ProfileRecord, SpanLink, new_profile_id
from ._attributes import AttributeValue
from ._builder import DEFAULT_FRAME_TYPE, BuiltProfile
from ._resource import ResourceConfig, instrumentation_scope

Exportable = ProfileRecord | BuiltProfile
"""What the encoder (and the exporter) accept."""

DEFAULT_SAMPLE_ATTRIBUTE_KEYS: tuple[str, ...] = ("http.route", "http.request.method")
"""Request attributes copied onto every sample: low cardinality, so safe as series labels."""

FRAME_TYPE_KEY = "profile.frame.type"

_PPROF_LABEL_KEYS = {"thread_id": "thread.id", "thread_name": "thread.name"}
"""pprof label names (this library's pprof builder) -> OpenTelemetry semantic conventions."""
ORIGINAL_PAYLOAD_FORMAT = "pprof"

# (type, unit, value of one sample)
_CPU_TYPES: tuple[tuple[str, str, Callable[[CpuSample], int]], ...] = (
    ("samples", "count", lambda s: 1),
    ("cpu", "nanoseconds", lambda s: s.cpu_ns),
    ("wall", "nanoseconds", lambda s: s.wall_ns),
)
_HEAP_TYPES: tuple[tuple[str, str, Callable[[HeapSample], int]], ...] = (
    ("alloc_objects", "count", lambda s: s.alloc_objects),
    ("alloc_space", "bytes", lambda s: s.alloc_bytes),
    ("inuse_objects", "count", lambda s: s.inuse_objects),
    ("inuse_space", "bytes", lambda s: s.inuse_bytes),
)
_CPU_PERIOD_TYPE = ("cpu", "nanoseconds")
_HEAP_PERIOD_TYPE = ("space", "bytes")

_AttrKey = tuple[int, AttributeValue | None, int]
_SampleKey = tuple[int, int, tuple[int, ...]]


class _Dictionary:
    """The shared tables, interned by value; zero entries pre-seeded at index 0."""

    def __init__(self) -> None:
        self.strings: dict[str, int] = {"": 0}
        self.mappings: dict[tuple[int, int, int, int], int] = {(0, 0, 0, 0): 0}
        self.functions: dict[tuple[int, int, int, int], int] = {(0, 0, 0, 0): 0}
        self.locations: dict[tuple[int, int, tuple[tuple[int, int], ...], tuple[int, ...]], int]
        self.locations = {(0, 0, (), ()): 0}
        self.stacks: dict[tuple[int, ...], int] = {(): 0}
        self.links: dict[tuple[bytes, bytes], int] = {(b"", b""): 0}
        self.attributes: dict[_AttrKey, int] = {(0, None, 0): 0}

    @staticmethod
    def _intern(table: dict[object, int], key: object) -> int:
        idx = table.get(key)
        if idx is None:
            idx = table[key] = len(table)
        return idx

    def string(self, s: str) -> int:
        return self._intern(self.strings, s)  # type: ignore[arg-type]

    def value_type(self, type_: str, unit: str) -> ValueType:
        return ValueType(type_strindex=self.string(type_), unit_strindex=self.string(unit))

    def attribute(self, key: str, value: AttributeValue, unit: str = "") -> int:
        k = (self.string(key), value, self.string(unit) if unit else 0)
        return self._intern(self.attributes, k)  # type: ignore[arg-type]

    def mapping(self, start: int, limit: int, offset: int, filename: str) -> int:
        k = (start, limit, offset, self.string(filename) if filename else 0)
        return self._intern(self.mappings, k)  # type: ignore[arg-type]

    def function(self, name: str, filename: str, start_line: int, system_name: str = "") -> int:
        k = (self.string(name), self.string(system_name), self.string(filename), start_line)
        return self._intern(self.functions, k)  # type: ignore[arg-type]

    def location(
        self,
        lines: tuple[tuple[int, int], ...],
        mapping: int = 0,
        address: int = 0,
        attributes: tuple[int, ...] = (),
    ) -> int:
        return self._intern(self.locations, (mapping, address, lines, attributes))  # type: ignore[arg-type]

    def stack(self, location_indices: tuple[int, ...]) -> int:
        return self._intern(self.stacks, location_indices)  # type: ignore[arg-type]

    def link(self, link: SpanLink | None) -> int:
        if link is None:
            return 0
        return self._intern(self.links, (link.trace_id, link.span_id))  # type: ignore[arg-type]

    def to_proto(self) -> ProfilesDictionary:
        # dicts keep insertion order, and index == insertion position.
        return ProfilesDictionary(
            string_table=list(self.strings),
            mapping_table=[
                OtlpMapping(memory_start=s, memory_limit=lim, file_offset=off, filename_strindex=fn)
                for s, lim, off, fn in self.mappings
            ],
            function_table=[
                Function(
                    name_strindex=n, system_name_strindex=sn, filename_strindex=fn, start_line=sl
                )
                for n, sn, fn, sl in self.functions
            ],
            location_table=[
                Location(
                    mapping_index=m,
                    address=a,
                    lines=[Line(function_index=f, line=ln) for f, ln in lines],
                    attribute_indices=attrs,
                )
                for m, a, lines, attrs in self.locations
            ],
            stack_table=[Stack(location_indices=s) for s in self.stacks],
            link_table=[Link(trace_id=t, span_id=s) if t else Link() for t, s in self.links],
            attribute_table=[
                KeyValueAndUnit(key_strindex=k, value=v.to_proto(), unit_strindex=u)
                if v is not None
                else KeyValueAndUnit()
                for k, v, u in self.attributes
            ],
        )


@dataclass
class _ProfileAcc:
    """One OTLP Profile being assembled; samples summed by (stack, link, attributes)."""

    sample_type: tuple[str, str]
    period_type: tuple[str, str]
    period: int
    profile_id: bytes
    start_ns: int
    end_ns: int
    attribute_indices: tuple[int, ...] = ()
    original_payload: bytes = b""
    samples: dict[_SampleKey, int] = field(default_factory=dict)

    def add(self, key: _SampleKey, value: int) -> None:
        self.samples[key] = self.samples.get(key, 0) + value

    def to_proto(self, d: _Dictionary) -> Profile:
        profile = Profile(
            sample_type=d.value_type(*self.sample_type),
            period_type=d.value_type(*self.period_type),
            # Pyroscope rejects period 0; a missing period means "each sample counts once".
            period=self.period if self.period > 0 else 1,
            time_unix_nano=max(self.start_ns, 0),
            duration_nano=max(self.end_ns - self.start_ns, 0),
            profile_id=self.profile_id,
            attribute_indices=self.attribute_indices,
        )
        add = profile.samples.add  # in place: faster than Sample objects appended
        for (s, lk, attrs), v in self.samples.items():
            add(stack_index=s, link_index=lk, attribute_indices=attrs, values=(v,))
        if self.original_payload:
            profile.original_payload_format = ORIGINAL_PAYLOAD_FORMAT
            profile.original_payload = self.original_payload
        return profile


class _Encoder:
    def __init__(self, sample_attribute_keys: Sequence[str]) -> None:
        self.d = _Dictionary()
        self.sample_attribute_keys = tuple(sample_attribute_keys)
        self._frame_locations: dict[int, int] = {}
        self._stacks: dict[tuple[int, ...], int] = {}
        self._threads: dict[tuple[int, str], tuple[int, int]] = {}
        self._cpython_attr: int | None = None
        self._attribute_memo: dict[tuple[str, type, object], int] = {}

    # -- ProfileRecord -------------------------------------------------------------------

    def _frame_type_attr(self, frame_type: str) -> int:
        if frame_type == DEFAULT_FRAME_TYPE:
            if self._cpython_attr is None:
                self._cpython_attr = self.d.attribute(
                    FRAME_TYPE_KEY, AttributeValue.string(DEFAULT_FRAME_TYPE)
                )
            return self._cpython_attr
        return self.d.attribute(FRAME_TYPE_KEY, AttributeValue.string(frame_type))

    def _record_stack(self, stack: tuple[int, ...]) -> int:
        idx = self._stacks.get(stack)
        if idx is None:
            try:  # every frame seen before (the common case): one pass in C
                locs = tuple(map(self._frame_locations.__getitem__, stack))
            except KeyError:
                locs = tuple(self._frame_location(frame_id) for frame_id in stack)
            idx = self._stacks[stack] = self.d.stack(locs)
        return idx

    def _frame_location(self, frame_id: int) -> int:
        loc = self._frame_locations.get(frame_id)
        if loc is None:
            info = FRAMES.info(frame_id)
            fn = self.d.function(info.name, info.filename, info.start_line)
            loc = self.d.location(
                ((fn, info.line),), attributes=(self._frame_type_attr(DEFAULT_FRAME_TYPE),)
            )
            self._frame_locations[frame_id] = loc
        return loc

    def _thread_attrs(self, thread_id: int, thread_name: str) -> tuple[int, ...]:
        key = (thread_id, thread_name)
        pair = self._threads.get(key)
        if pair is None:
            pair = self._threads[key] = (
                self.d.attribute("thread.id", AttributeValue.int(thread_id)),
                self.d.attribute("thread.name", AttributeValue.string(thread_name)),
            )
        return pair if thread_name else pair[:1]

    def _attribute(self, key: str, value: Any) -> int:
        """The index of attribute ``key=value`` (a Python value), memoised per value."""
        memo_key = (key, value.__class__, value)  # the class: True and 1 are different values
        try:
            idx = self._attribute_memo.get(memo_key)
        except TypeError:  # unhashable (a list): not memoised
            return self.d.attribute(key, AttributeValue.from_python(value))
        if idx is None:
            idx = self.d.attribute(key, AttributeValue.from_python(value))
            self._attribute_memo[memo_key] = idx
        return idx

    def add_record(
        self, rec: ProfileRecord, accs: dict[object, _ProfileAcc], merge: bool, batch_id: bytes
    ) -> None:
        # Runs for every exported request (most with one or two samples): the sums and the
        # span's widening are inline, and the attributes memoised.
        heap: Sequence[HeapSample] = rec.heap_samples
        if heap:
            heap = [h for h in heap if h.alloc_objects or h.alloc_bytes or h.inuse_bytes]
        if not rec.cpu_samples and not heap:
            return  # intern nothing for a record that sends nothing
        link = self.d.link(rec.link)
        attributes = rec.attributes
        request_attrs = tuple(
            self._attribute(k, attributes[k]) for k in self.sample_attribute_keys if k in attributes
        )
        profile_attrs: tuple[int, ...] = ()
        if not merge:
            profile_attrs = tuple(self._attribute(k, v) for k, v in sorted(attributes.items()))
        start_ns = rec.start_time_ns
        end_ns = start_ns + rec.duration_ns
        for samples, types, period, period_type in (
            (rec.cpu_samples, _CPU_TYPES, rec.cpu_period_ns, _CPU_PERIOD_TYPE),
            (heap, _HEAP_TYPES, rec.heap_period_bytes, _HEAP_PERIOD_TYPE),
        ):
            if not samples:
                continue
            keys = [
                (
                    self._record_stack(s.stack),
                    link,
                    request_attrs + self._thread_attrs(s.thread_id, s.thread_name),
                )
                for s in samples
            ]
            for type_, unit, value_of in types:
                group = (type_, unit, period) if merge else (type_, unit, period, id(rec))
                acc = accs.get(group)
                if acc is None:
                    acc = accs[group] = _ProfileAcc(
                        sample_type=(type_, unit),
                        period_type=period_type,
                        period=period,
                        profile_id=batch_id if merge else rec.profile_id,
                        start_ns=start_ns,
                        end_ns=end_ns,
                        attribute_indices=profile_attrs,
                    )
                else:  # acc.widen, inline
                    if start_ns < acc.start_ns:
                        acc.start_ns = start_ns
                    if end_ns > acc.end_ns:
                        acc.end_ns = end_ns
                sums = acc.samples
                for key, sample in zip(keys, samples, strict=True):
                    v = value_of(sample)  # type: ignore[arg-type]
                    if v:
                        sums[key] = sums.get(key, 0) + v

    # -- BuiltProfile --------------------------------------------------------------------

    def add_built(self, bp: BuiltProfile, include_original_payload: bool) -> list[_ProfileAcc]:
        p = bp.pprof
        if not p.sample_type:
            return []  # no value to send (and nothing interned: no orphans)
        st = list(p.string_table)

        def s(i: int) -> str:
            return st[i] if 0 <= i < len(st) else ""

        functions = {f.id: f for f in p.function}
        mappings = {m.id: m for m in p.mapping}
        locations = {loc.id: loc for loc in p.location}
        loc_cache: dict[int, int] = {}

        def location(loc_id: int) -> int:
            idx = loc_cache.get(loc_id)
            if idx is None:
                loc = locations.get(loc_id)
                if loc is None:
                    raise ValueError(f"pprof sample references unknown location id {loc_id}")
                lines = []
                for ln in loc.line:
                    f = functions.get(ln.function_id)
                    fn = (
                        self.d.function(s(f.name), s(f.filename), f.start_line, s(f.system_name))
                        if f is not None
                        else 0
                    )
                    lines.append((fn, ln.line))
                mapping = 0
                m = mappings.get(loc.mapping_id)
                if m is not None and (m.memory_limit or m.filename):
                    mapping = self.d.mapping(
                        m.memory_start, m.memory_limit, m.file_offset, s(m.filename)
                    )
                frame_attrs = (self._frame_type_attr(bp.frame_type),) if bp.frame_type else ()
                idx = loc_cache[loc_id] = self.d.location(
                    tuple(lines), mapping, loc.address, frame_attrs
                )
            return idx

        keys: list[_SampleKey] = []
        for sample in p.sample:
            stack = self.d.stack(tuple(location(i) for i in sample.location_id))
            # Decide the link first: intern only what the sample ends up referencing.
            raw: dict[str, tuple[AttributeValue, str]] = {}
            for lb in sample.label:
                name = s(lb.key)
                name = _PPROF_LABEL_KEYS.get(name, name)
                if lb.str:
                    raw[name] = (AttributeValue.string(s(lb.str)), "")
                else:
                    raw[name] = (AttributeValue.int(lb.num), s(lb.num_unit))
            link_ids = _label_link(raw)
            if link_ids is not None:
                del raw["trace_id"], raw["span_id"]
                link = self.d.link(link_ids)
            else:
                link = self.d.link(bp.link)
            labels = tuple(self.d.attribute(k, v, unit) for k, (v, unit) in raw.items())
            keys.append((stack, link, labels))

        profile_attrs = tuple(self.d.attribute(k, v) for k, v in sorted(bp.attributes.items()))
        payload = bp.pprof_bytes() if include_original_payload else b""
        period_type = (s(p.period_type.type), s(p.period_type.unit))
        start = p.time_nanos
        accs = []
        for j, vt in enumerate(p.sample_type):
            sample_type = (s(vt.type), s(vt.unit))
            acc = _ProfileAcc(
                sample_type=sample_type,
                # Pyroscope names the profile after period_type: never leave it empty.
                period_type=period_type if period_type[0] else sample_type,
                period=p.period,
                profile_id=bp.profile_id,
                start_ns=start,
                end_ns=start + p.duration_nanos,
                attribute_indices=profile_attrs,
                original_payload=payload,
            )
            for key, sample in zip(keys, p.sample, strict=True):
                acc.add(key, sample.value[j] if j < len(sample.value) else 0)
            accs.append(acc)
        return accs


def _label_link(labels: dict[str, tuple[AttributeValue, str]]) -> SpanLink | None:
    """A span link from ``trace_id`` + ``span_id`` hex string labels, if both are valid."""
    trace, span = labels.get("trace_id"), labels.get("span_id")
    if trace is None or span is None or trace[0].kind != "string" or span[0].kind != "string":
        return None
    try:
        return SpanLink.from_hex(str(trace[0].value), str(span[0].value))
    except ValueError:
        return None  # not ids after all: they stay plain attributes


def encode_profiles(
    items: Iterable[Exportable],
    *,
    resource: ResourceConfig | None = None,
    merge: bool = True,
    include_original_payload: bool = False,
    sample_attribute_keys: Sequence[str] = DEFAULT_SAMPLE_ATTRIBUTE_KEYS,
) -> ExportProfilesServiceRequest:
    """Encode a batch of ``ProfileRecord`` and ``BuiltProfile`` as one request.

    Parameters:
        items: the batch; records without samples are skipped.
        resource: the configured Resource (default: from the environment alone).
        merge: merge the batch's records per sample type (True) or keep one Profile per
            record and sample type (False). BuiltProfiles are never merged.
        include_original_payload: attach each BuiltProfile's pprof bytes as
            ``original_payload`` (format "pprof"). Off by default: it doubles the size.
        sample_attribute_keys: request attributes copied onto each record's samples.

    Example::

        request = encode_profiles(records)
        body = request.SerializeToString()
    """
    resource = resource if resource is not None else ResourceConfig.resolve()
    enc = _Encoder(sample_attribute_keys)
    # resource-attribute set -> profiles; records use the base resource (key: empty set)
    groups: dict[frozenset[tuple[str, AttributeValue]], list[_ProfileAcc]] = {}
    record_accs: dict[object, _ProfileAcc] = {}
    batch_id = new_profile_id()
    for item in items:
        if isinstance(item, ProfileRecord):
            if not item.is_empty:
                enc.add_record(item, record_accs, merge, batch_id)
        elif isinstance(item, BuiltProfile):
            key = frozenset(item.resource_attributes.items())
            groups.setdefault(key, []).extend(enc.add_built(item, include_original_payload))
        else:
            raise TypeError(
                f"cannot encode {type(item).__name__}: expected ProfileRecord or BuiltProfile"
            )
    return _request(enc, groups, record_accs, resource)


def _request(
    enc: _Encoder,
    groups: dict[frozenset[tuple[str, AttributeValue]], list[_ProfileAcc]],
    record_accs: dict[object, _ProfileAcc],
    resource: ResourceConfig,
) -> ExportProfilesServiceRequest:
    """The request of the profiles ``enc`` assembled: per resource, then its dictionary."""
    if record_accs:
        # A type whose every value was zero (say inuse_space) has nothing to say: skip it.
        groups.setdefault(frozenset(), [])[:0] = [a for a in record_accs.values() if a.samples]
    request = ExportProfilesServiceRequest()
    scope = instrumentation_scope()
    for key, accs in groups.items():
        if not accs:
            continue
        request.resource_profiles.append(
            ResourceProfiles(
                resource=resource.build(dict(key)),
                scope_profiles=[
                    ScopeProfiles(scope=scope, profiles=[a.to_proto(enc.d) for a in accs])
                ],
            )
        )
    request.dictionary.CopyFrom(enc.d.to_proto())
    return request


class RecordWindow:
    """``ProfileRecord``s merged into one request's profiles as they are added.

    ``encode_profiles(records)`` (merge mode) encodes a batch at once, so the records of a
    whole export window wait as Python objects until it runs; a window instead merges each
    record as it comes (``add``) and the record can go. What the window keeps is what its
    profiles share (the dictionary, and one sum per distinct stack, link and attributes),
    which stops growing once the app's code paths have been seen, except for each request's
    span link. ``request()`` is then what ``encode_profiles`` would have made of the records.

    Example::

        window = RecordWindow()
        for record in records:
            window.add(record)
        body = window.request(resource).SerializeToString()
    """

    def __init__(self, sample_attribute_keys: Sequence[str] = DEFAULT_SAMPLE_ATTRIBUTE_KEYS):
        self._enc = _Encoder(sample_attribute_keys)
        self._accs: dict[object, _ProfileAcc] = {}
        self._batch_id = new_profile_id()
        self.records = 0  # records with samples added
        self.samples = 0  # their samples (a bound on the request's size: see estimated_bytes)

    def add(self, record: ProfileRecord) -> bool:
        """Merge ``record`` in; False (nothing added) for a record without samples."""
        if record.is_empty:
            return False
        self._enc.add_record(record, self._accs, True, self._batch_id)
        self.records += 1
        self.samples += len(record.cpu_samples) + len(record.heap_samples)
        return True

    def estimated_bytes(self, max_stack_depth: int = 128) -> int:
        """An upper estimate of the encoded request: each sample as if its stack were new.

        A sample takes some 30 bytes in its profiles (indices and values, in each of the
        three sample types); a new stack at most ``max_stack_depth`` locations with their
        functions and names; a record's span link some 40.
        """
        return 4096 + self.records * 40 + self.samples * (90 + 48 * max_stack_depth)

    def request(self, resource: ResourceConfig | None = None) -> ExportProfilesServiceRequest:
        """The window's records as one request (the window must not be added to after)."""
        resource = resource if resource is not None else ResourceConfig.resolve()
        return _request(self._enc, {}, self._accs, resource)


def count_profiles(request: ExportProfilesServiceRequest) -> int:
    """The number of OTLP Profile messages in a request (what partial_success counts)."""
    return sum(len(sp.profiles) for rp in request.resource_profiles for sp in rp.scope_profiles)
