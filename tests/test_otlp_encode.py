"""OTLP encoding: every rule of the v1.10.0 layout and every Pyroscope requirement.

Requests are serialized and decoded again with the official opentelemetry-proto classes, then
``check_request`` asserts the dictionary and profile invariants (REFERENCE.md) on the decoded
message. Other test modules reuse ``check_request`` and ``make_record``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import pytest
from opentelemetry import trace
from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2 import (
    ExportProfilesServiceRequest,
)
from opentelemetry.proto.profiles.v1development.profiles_pb2 import Profile
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from otlp_middleware.otlp import (
    AttributeValue,
    ProfileBuilder,
    ResourceConfig,
    count_profiles,
    encode_profiles,
    generate_profile_id,
)
from otlp_middleware.pprof import Profile as PprofProfile
from otlp_middleware.pprof import cpu_profile
from otlp_middleware.profiling._frames import FRAMES
from otlp_middleware.types import CpuSample, HeapSample, ProfileRecord, SpanLink

CPU_PERIOD = 10_101_010
HEAP_PERIOD = 512 * 1024
LINK_A = SpanLink(bytes(range(1, 17)), bytes(range(1, 9)))
LINK_B = SpanLink(bytes(range(17, 33)), bytes(range(9, 17)))
RESOURCE = ResourceConfig.resolve(environ={})


def stack(*names: str) -> tuple[int, ...]:
    """Frame ids for ``names`` (leaf first), each its own function in app.py."""
    return tuple(FRAMES.intern(n, "app.py", 10 * i + 1, 10 * i + 2) for i, n in enumerate(names))


def make_record(
    *,
    link: SpanLink | None = LINK_A,
    route: str = "/items/{id}",
    start: int = 1_000_000,
    duration: int = 5_000_000,
    cpu: Sequence[tuple[tuple[int, ...], int]] = ((("handler", "main"), 1),),
    heap: int = 0,
    thread: tuple[int, str] = (7, "worker-1"),
) -> ProfileRecord:
    """A request record: ``cpu`` lists (stack names, how many samples of that stack)."""
    cpu_samples = [
        CpuSample(stack(*names), thread[0], thread[1], 9_000_000, 10_000_000, start + 1)
        for names, n in cpu
        for _ in range(n)
    ]
    heap_samples = [
        HeapSample(stack("alloc", "handler"), thread[0], thread[1], 3, 3000, 1, 1000)
    ] * heap
    return ProfileRecord(
        profile_id=generate_profile_id(),
        start_time_ns=start,
        duration_ns=duration,
        cpu_samples=cpu_samples,
        cpu_period_ns=CPU_PERIOD,
        heap_samples=heap_samples,
        heap_period_bytes=HEAP_PERIOD,
        link=link,
        attributes={
            "http.route": route,
            "http.request.method": "GET",
            "http.response.status_code": 200,
        },
    )


def round_trip(request: ExportProfilesServiceRequest) -> ExportProfilesServiceRequest:
    return ExportProfilesServiceRequest.FromString(request.SerializeToString())


def profiles_of(request: ExportProfilesServiceRequest) -> list[Profile]:
    return [p for rp in request.resource_profiles for sp in rp.scope_profiles for p in sp.profiles]


def string(request: ExportProfilesServiceRequest, index: int) -> str:
    return str(request.dictionary.string_table[index])


def sample_type(request: ExportProfilesServiceRequest, profile: Profile) -> tuple[str, str]:
    return (
        string(request, profile.sample_type.type_strindex),
        string(request, profile.sample_type.unit_strindex),
    )


def by_type(request: ExportProfilesServiceRequest) -> dict[tuple[str, str], list[Profile]]:
    result: dict[tuple[str, str], list[Profile]] = {}
    for p in profiles_of(request):
        result.setdefault(sample_type(request, p), []).append(p)
    return result


def attrs(request: ExportProfilesServiceRequest, indices: Sequence[int]) -> dict[str, object]:
    out: dict[str, object] = {}
    for i in indices:
        kv = request.dictionary.attribute_table[i]
        value = AttributeValue.from_proto(kv.value)
        assert value is not None
        out[string(request, kv.key_strindex)] = value.to_python()
    return out


def check_request(request: ExportProfilesServiceRequest, *, python_frames: bool = True) -> None:
    """Assert every dictionary and profile rule on a decoded request."""
    d = request.dictionary
    tables = {
        "mapping": d.mapping_table,
        "location": d.location_table,
        "function": d.function_table,
        "link": d.link_table,
        "attribute": d.attribute_table,
        "stack": d.stack_table,
    }
    # Zero value at index 0 of every table.
    assert d.string_table[0] == ""
    for name, table in tables.items():
        assert len(table) >= 1, f"{name}_table lacks its zero entry"
        assert table[0].ByteSize() == 0, f"{name}_table[0] is not the zero value"
    # No duplicates.
    assert len(set(d.string_table)) == len(d.string_table), "duplicate strings"
    for name, table in tables.items():
        encoded = [m.SerializeToString(deterministic=True) for m in table]
        assert len(set(encoded)) == len(encoded), f"duplicate entries in {name}_table"

    used: dict[str, set[int]] = {name: set() for name in [*tables, "string"]}

    def attr_refs(indices: Sequence[int]) -> None:
        keys = []
        for i in indices:
            assert 0 < i < len(d.attribute_table)
            used["attribute"].add(i)
            keys.append(d.attribute_table[i].key_strindex)
        assert len(keys) == len(set(keys)), "attribute_indices with a repeated key"

    for rp in request.resource_profiles:
        service = [a for a in rp.resource.attributes if a.key == "service.name"]
        assert len(service) == 1 and service[0].value.WhichOneof("value") == "string_value"
        assert service[0].value.string_value
        for sp in rp.scope_profiles:
            assert sp.scope.name == "otlp_middleware"
            for p in sp.profiles:
                assert p.HasField("sample_type") and p.HasField("period_type")
                used["string"].update(
                    (
                        p.sample_type.type_strindex,
                        p.sample_type.unit_strindex,
                        p.period_type.type_strindex,
                        p.period_type.unit_strindex,
                    )
                )
                assert string(request, p.period_type.type_strindex), "empty period_type"
                assert p.period > 0, "Pyroscope rejects period 0"
                assert len(p.profile_id) == 16 and any(p.profile_id)
                assert bool(p.original_payload) == bool(p.original_payload_format)
                attr_refs(p.attribute_indices)
                for s in p.samples:
                    assert len(s.values) == 1, "exactly one value per sample"
                    assert not s.timestamps_unix_nano or len(s.timestamps_unix_nano) == 1
                    assert 0 < s.stack_index < len(d.stack_table)
                    assert 0 <= s.link_index < len(d.link_table)
                    used["stack"].add(s.stack_index)
                    used["link"].add(s.link_index)
                    attr_refs(s.attribute_indices)
    for st in d.stack_table:
        for li in st.location_indices:
            assert 0 < li < len(d.location_table)
            used["location"].add(li)
    for i, loc in enumerate(d.location_table[1:], start=1):
        assert 0 <= loc.mapping_index < len(d.mapping_table)
        used["mapping"].add(loc.mapping_index)
        attr_refs(loc.attribute_indices)
        for ln in loc.lines:
            assert 0 < ln.function_index < len(d.function_table)
            used["function"].add(ln.function_index)
        if python_frames:
            assert loc.mapping_index == 0, f"location {i}: Python frames use mapping 0"
            assert attrs(request, loc.attribute_indices) == {"profile.frame.type": "cpython"}
    for m in d.mapping_table[1:]:
        used["string"].add(m.filename_strindex)
    for f in d.function_table[1:]:
        used["string"].update((f.name_strindex, f.system_name_strindex, f.filename_strindex))
    for kv in d.attribute_table[1:]:
        used["string"].update((kv.key_strindex, kv.unit_strindex))
    # No orphans: every entry but the zero one is referenced.
    for name in tables:
        expected = set(range(1, len(tables[name])))
        assert expected <= used[name], f"orphans in {name}_table: {expected - used[name]}"
    assert set(range(1, len(d.string_table))) <= used["string"], "orphan strings"


# -- ProfileRecord, merged -------------------------------------------------------------------


def test_merged_records_keep_each_request_link_and_attributes() -> None:
    a = make_record(link=LINK_A, route="/a", start=1_000, duration=500, cpu=[(("h", "m"), 2)])
    b = make_record(link=LINK_B, route="/b", start=2_000, duration=800, cpu=[(("h", "m"), 1)])
    request = round_trip(encode_profiles([a, b], resource=RESOURCE))
    check_request(request)
    types = by_type(request)
    assert set(types) == {("samples", "count"), ("cpu", "nanoseconds"), ("wall", "nanoseconds")}
    assert len(request.resource_profiles) == 1
    for profiles in types.values():
        assert len(profiles) == 1  # one Profile per sample type for the whole batch
        p = profiles[0]
        assert (p.time_unix_nano, p.duration_nano) == (1_000, 1_800)  # the batch's window
        assert (string(request, p.period_type.type_strindex), p.period) == ("cpu", CPU_PERIOD)
        assert string(request, p.period_type.unit_strindex) == "nanoseconds"
        # Same stack, two spans: two samples, never merged.
        assert len(p.samples) == 2
        assert len({s.stack_index for s in p.samples}) == 1
    samples = {
        request.dictionary.link_table[s.link_index].trace_id: s
        for s in types[("samples", "count")][0].samples
    }
    assert samples[LINK_A.trace_id].values[0] == 2
    assert samples[LINK_B.trace_id].values[0] == 1
    assert request.dictionary.link_table[samples[LINK_A.trace_id].link_index].span_id == (
        LINK_A.span_id
    )
    assert attrs(request, samples[LINK_A.trace_id].attribute_indices) == {
        "http.route": "/a",
        "http.request.method": "GET",
        "thread.id": 7,
        "thread.name": "worker-1",
    }
    assert attrs(request, samples[LINK_B.trace_id].attribute_indices)["http.route"] == "/b"
    cpu = types[("cpu", "nanoseconds")][0]
    assert sorted(s.values[0] for s in cpu.samples) == [9_000_000, 18_000_000]
    # High-cardinality or per-response attributes stay off the samples.
    assert "http.response.status_code" not in request.dictionary.string_table


def test_identical_samples_of_one_request_are_summed_and_stacks_shared() -> None:
    rec = make_record(cpu=[(("h", "m"), 3), (("g", "m"), 1)])
    request = round_trip(encode_profiles([rec, make_record(cpu=[(("h", "m"), 1)])]))
    check_request(request)
    p = by_type(request)[("samples", "count")][0]
    assert sorted(s.values[0] for s in p.samples) == [1, 4]
    assert len(request.dictionary.stack_table) == 3  # zero + two distinct stacks
    names = [string(request, f.name_strindex) for f in request.dictionary.function_table[1:]]
    assert sorted(names) == ["g", "h", "m"]
    leaf_first = request.dictionary.stack_table[p.samples[0].stack_index].location_indices
    first_fn = request.dictionary.location_table[leaf_first[0]].lines[0].function_index
    assert string(request, request.dictionary.function_table[first_fn].name_strindex) in "hg"


def test_heap_samples_use_space_bytes_period() -> None:
    rec = make_record(cpu=[], heap=2)
    request = round_trip(encode_profiles([rec]))
    check_request(request)
    types = by_type(request)
    assert set(types) == {
        ("alloc_objects", "count"),
        ("alloc_space", "bytes"),
        ("inuse_objects", "count"),
        ("inuse_space", "bytes"),
    }
    for (name, _), (p,) in types.items():
        assert string(request, p.period_type.type_strindex) == "space"
        assert string(request, p.period_type.unit_strindex) == "bytes"
        assert p.period == HEAP_PERIOD
        expected = {
            "alloc_objects": 6,
            "alloc_space": 6000,
            "inuse_objects": 2,
            "inuse_space": 2000,
        }
        assert [s.values[0] for s in p.samples] == [expected[name]]


def test_cpu_and_heap_in_one_batch_share_one_dictionary() -> None:
    request = round_trip(encode_profiles([make_record(heap=1), make_record(link=LINK_B)]))
    check_request(request)
    assert count_profiles(request) == 7
    assert len(request.dictionary.link_table) == 3


def test_records_without_samples_are_skipped() -> None:
    empty = make_record(cpu=[])
    assert count_profiles(encode_profiles([empty])) == 0
    assert not encode_profiles([empty]).resource_profiles
    request = round_trip(encode_profiles([empty, make_record(link=None)]))
    check_request(request)
    assert count_profiles(request) == 3
    assert all(s.link_index == 0 for p in profiles_of(request) for s in p.samples)
    assert len(request.dictionary.link_table) == 1


def test_per_request_mode_keeps_one_profile_per_record() -> None:
    a, b = make_record(route="/a"), make_record(route="/b", link=LINK_B)
    request = round_trip(encode_profiles([a, b], merge=False))
    check_request(request)
    profiles = profiles_of(request)
    assert len(profiles) == 6
    assert Counter(p.profile_id for p in profiles) == {a.profile_id: 3, b.profile_id: 3}
    for p in profiles:
        record = a if p.profile_id == a.profile_id else b
        assert attrs(request, p.attribute_indices) == dict(record.attributes)
        (s,) = p.samples
        assert request.dictionary.link_table[s.link_index].trace_id == record.link.trace_id  # type: ignore[union-attr]


def test_attribute_values_equal_in_python_stay_apart() -> None:
    """True == 1 == 1.0 in Python, yet they are three attribute values (the encoder memoises
    attributes by value); an unhashable value (a list) is encoded as well."""
    records = []
    for value in (True, 1, 1.0, ["a", "b"], True):
        rec = make_record(route="/a")
        rec.attributes["flag"] = value  # type: ignore[index]
        records.append(rec)
    request = round_trip(encode_profiles(records, merge=False))
    check_request(request)
    seen = [
        attrs(request, p.attribute_indices)["flag"] for p in by_type(request)[("samples", "count")]
    ]
    assert [(type(v), v) for v in seen] == [
        (bool, True),
        (int, 1),
        (float, 1.0),
        (list, ["a", "b"]),
        (bool, True),
    ]


def test_merged_profiles_of_one_batch_share_a_fresh_profile_id() -> None:
    rec = make_record()
    first = profiles_of(encode_profiles([rec]))
    second = profiles_of(encode_profiles([rec]))
    assert len({p.profile_id for p in first}) == 1
    assert first[0].profile_id not in (rec.profile_id, second[0].profile_id)


def test_trace_id_of_an_incoming_traceparent_lands_in_the_link_table() -> None:
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    ctx = TraceContextTextMapPropagator().extract({"traceparent": traceparent})
    span_context = trace.get_current_span(ctx).get_span_context()
    link = SpanLink(
        span_context.trace_id.to_bytes(16, "big"), span_context.span_id.to_bytes(8, "big")
    )
    request = round_trip(encode_profiles([make_record(link=link)]))
    check_request(request)
    assert [lk.trace_id.hex() for lk in request.dictionary.link_table[1:]] == [
        "4bf92f3577b34da6a3ce929d0e0e4736"
    ]
    assert request.dictionary.link_table[1].span_id.hex() == "00f067aa0ba902b7"


# -- BuiltProfile --------------------------------------------------------------------------


def pprof_with_labels(labels: dict[str, str | int] | None = None):  # type: ignore[no-untyped-def]
    samples = [
        CpuSample(stack("h", "m"), 3, "MainThread", 5_000_000, 6_000_000, 10),
        CpuSample(stack("g", "m"), 3, "MainThread", 7_000_000, 8_000_000, 20),
    ]
    return cpu_profile(
        samples, period_ns=CPU_PERIOD, time_nanos=1_000, duration_nanos=2_000, labels=labels
    )


def test_built_profile_is_sent_as_built() -> None:
    built = (
        ProfileBuilder(generate_profile_id())
        .attribute("service.name", AttributeValue.string("checkout"))
        .attribute("deployment.environment.name", "production")
        .attribute("team", "payments")
        .attribute("build", 42)
        .link_to_span(LINK_B.trace_id_hex, LINK_B.span_id)
        .build(pprof_with_labels({"http.route": "/pay"}))
    )
    request = round_trip(encode_profiles([built], resource=RESOURCE))
    check_request(request)
    profiles = profiles_of(request)
    assert [sample_type(request, p) for p in profiles] == [
        ("samples", "count"),
        ("cpu", "nanoseconds"),
        ("wall", "nanoseconds"),
    ]
    resource = {a.key: a.value for a in request.resource_profiles[0].resource.attributes}
    assert resource["service.name"].string_value == "checkout"
    assert resource["deployment.environment.name"].string_value == "production"
    assert "team" not in resource
    for p in profiles:
        assert p.profile_id == built.profile_id
        assert (p.time_unix_nano, p.duration_nano, p.period) == (1_000, 2_000, CPU_PERIOD)
        assert attrs(request, p.attribute_indices) == {"team": "payments", "build": 42}
        assert len(p.samples) == 2
        for s in p.samples:
            assert request.dictionary.link_table[s.link_index].trace_id == LINK_B.trace_id
            assert attrs(request, s.attribute_indices) == {
                "thread.id": 3,
                "thread.name": "MainThread",
                "http.route": "/pay",
            }
    cpu = by_type(request)[("cpu", "nanoseconds")][0]
    assert sorted(s.values[0] for s in cpu.samples) == [5_000_000, 7_000_000]
    assert not any(p.original_payload for p in profiles)


def test_trace_and_span_labels_become_the_sample_link() -> None:
    labels: dict[str, str | int] = {"trace_id": LINK_A.trace_id_hex, "span_id": LINK_A.span_id_hex}
    built = ProfileBuilder(generate_profile_id()).build(pprof_with_labels(labels))
    request = round_trip(encode_profiles([built]))
    check_request(request)
    for p in profiles_of(request):
        for s in p.samples:
            link = request.dictionary.link_table[s.link_index]
            assert (link.trace_id, link.span_id) == (LINK_A.trace_id, LINK_A.span_id)
            assert set(attrs(request, s.attribute_indices)) == {"thread.id", "thread.name"}


def test_original_payload_is_optional() -> None:
    built = ProfileBuilder(generate_profile_id()).build(pprof_with_labels())
    request = round_trip(encode_profiles([built], include_original_payload=True))
    check_request(request)
    for p in profiles_of(request):
        assert p.original_payload_format == "pprof"
        assert p.original_payload == built.pprof_bytes()


def test_records_and_built_profiles_mix_in_one_request() -> None:
    built = (
        ProfileBuilder(generate_profile_id())
        .attribute("service.name", "other")
        .build(pprof_with_labels())
    )
    request = round_trip(
        encode_profiles([make_record(), built, make_record(link=LINK_B)], resource=RESOURCE)
    )
    check_request(request)
    services = sorted(
        a.value.string_value
        for rp in request.resource_profiles
        for a in rp.resource.attributes
        if a.key == "service.name"
    )
    assert services == ["other", "unknown_service:python"]
    assert count_profiles(request) == 6
    # "h" and "m" are shared by both inputs: one function entry each.
    names = [string(request, f.name_strindex) for f in request.dictionary.function_table[1:]]
    assert len(names) == len(set(names))


def test_resource_carries_process_and_runtime_attributes() -> None:
    resource = ResourceConfig.resolve(service_name="svc", environ={})
    request = round_trip(encode_profiles([make_record()], resource=resource))
    attributes = {a.key: a.value for a in request.resource_profiles[0].resource.attributes}
    assert attributes["service.name"].string_value == "svc"
    assert attributes["process.pid"].int_value > 0
    assert attributes["process.runtime.name"].string_value == "cpython"
    for key in ("process.runtime.version", "process.runtime.description", "host.name"):
        assert attributes[key].string_value
    scope = request.resource_profiles[0].scope_profiles[0].scope
    assert scope.name == "otlp_middleware" and scope.version


def test_encoding_an_unknown_type_is_a_clear_error() -> None:
    with pytest.raises(TypeError, match="ProfileRecord or BuiltProfile"):
        encode_profiles(["not a profile"])  # type: ignore[list-item]


def test_heap_samples_with_nothing_to_report_send_nothing() -> None:
    rec = make_record(cpu=[], heap=1)
    rec.heap_samples = [
        rec.heap_samples[0]._replace(alloc_objects=0, alloc_bytes=0, inuse_bytes=0, inuse_objects=0)
    ]
    request = encode_profiles([rec, make_record()])
    check_request(round_trip(request))
    assert count_profiles(request) == 3
    assert "alloc" not in request.dictionary.string_table


def test_native_frames_mappings_inline_lines_and_units_survive() -> None:
    st = ["", "alloc", "bytes", "memcpy", "printf", "libc.so.6", "size", "kilobytes"]
    p = PprofProfile(string_table=st)  # a hand-made, Go-style pprof without period_type
    p.sample_type.add(type=1, unit=2)
    p.mapping.add(id=1, memory_start=0x1000, memory_limit=0x9000, filename=5)
    p.function.add(id=1, name=3, system_name=3)
    p.function.add(id=2, name=4, system_name=4)
    loc = p.location.add(id=1, mapping_id=1, address=0x1234)
    loc.line.add(function_id=1, line=10)
    loc.line.add(function_id=2, line=20)
    sample = p.sample.add(location_id=[1], value=[4096])
    sample.label.add(key=6, num=4, num_unit=7)
    built = ProfileBuilder(generate_profile_id(), frame_type="native").build(p)
    request = round_trip(encode_profiles([built]))
    check_request(request, python_frames=False)
    d = request.dictionary
    (profile,) = profiles_of(request)
    # No period_type in the pprof: the sample type stands in (Pyroscope needs one), period 1.
    assert string(request, profile.period_type.type_strindex) == "alloc"
    assert profile.period == 1
    (s,) = profile.samples
    (location_index,) = d.stack_table[s.stack_index].location_indices
    location = d.location_table[location_index]
    assert location.address == 0x1234
    mapping = d.mapping_table[location.mapping_index]
    assert (mapping.memory_start, mapping.memory_limit) == (0x1000, 0x9000)
    assert string(request, mapping.filename_strindex) == "libc.so.6"
    names = [
        string(request, d.function_table[ln.function_index].name_strindex) for ln in location.lines
    ]
    assert names == ["memcpy", "printf"]
    assert attrs(request, location.attribute_indices) == {"profile.frame.type": "native"}
    (size,) = s.attribute_indices
    assert string(request, d.attribute_table[size].unit_strindex) == "kilobytes"


def test_a_pprof_without_sample_types_sends_nothing() -> None:
    built = (
        ProfileBuilder(generate_profile_id())
        .attribute("k", "v")
        .build(PprofProfile(string_table=[""]))
    )
    request = encode_profiles([built])
    assert count_profiles(request) == 0
    check_request(round_trip(request))
    assert list(request.dictionary.string_table) == [""]
