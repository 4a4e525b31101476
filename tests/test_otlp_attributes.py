"""AttributeValue, ProfileBuilder and the Resource: typed values, clear errors, precedence."""

from __future__ import annotations

import gzip
import logging
import math

import pytest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from otlp_middleware.otlp import AttributeValue, ProfileBuilder, ResourceConfig, generate_profile_id
from otlp_middleware.otlp._resource import parse_resource_attributes
from otlp_middleware.pprof import Profile

# -- AttributeValue --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "field", "expected"),
    [
        (AttributeValue.string("a"), "string_value", "a"),
        (AttributeValue.int(-(2**63)), "int_value", -(2**63)),
        (AttributeValue.double(1.5), "double_value", 1.5),
        (AttributeValue.double(2), "double_value", 2.0),
        (AttributeValue.bool(False), "bool_value", False),
        (AttributeValue.bytes(bytearray(b"\x00\x01")), "bytes_value", b"\x00\x01"),
    ],
)
def test_typed_constructors_fill_the_matching_any_value_field(
    value: AttributeValue, field: str, expected: object
) -> None:
    proto = AnyValue.FromString(value.to_proto().SerializeToString())
    assert proto.WhichOneof("value") == field
    assert getattr(proto, field) == expected
    assert AttributeValue.from_proto(proto) == value


def test_arrays_nest_and_accept_plain_elements() -> None:
    value = AttributeValue.array(["a", 1, [True, 2.5], AttributeValue.bytes(b"x")])
    proto = value.to_proto()
    assert [v.WhichOneof("value") for v in proto.array_value.values] == [
        "string_value",
        "int_value",
        "array_value",
        "bytes_value",
    ]
    assert value.to_python() == ["a", 1, [True, 2.5], b"x"]
    assert AttributeValue.from_proto(proto) == value


@pytest.mark.parametrize(
    ("plain", "kind"),
    [
        ("s", "string"),
        (True, "bool"),
        (3, "int"),
        (0.5, "double"),
        (b"b", "bytes"),
        ((1,), "array"),
    ],
)
def test_from_python_maps_plain_values(plain: object, kind: str) -> None:
    assert AttributeValue.from_python(plain).kind == kind  # type: ignore[arg-type]


def test_from_python_keeps_bool_apart_from_int() -> None:
    assert AttributeValue.from_python(True) != AttributeValue.from_python(1)
    assert AttributeValue.from_python(True).to_proto().WhichOneof("value") == "bool_value"


@pytest.mark.parametrize("bad", [None, {"a": 1}, object(), {1, 2}])
def test_unsupported_types_raise_a_clear_type_error(bad: object) -> None:
    with pytest.raises(TypeError, match=type(bad).__name__) as info:
        AttributeValue.from_python(bad)  # type: ignore[arg-type]
    assert "use str, int, float, bool, bytes" in str(info.value)


@pytest.mark.parametrize(
    ("constructor", "bad"),
    [
        (AttributeValue.string, 1),
        (AttributeValue.int, True),
        (AttributeValue.int, 1.0),
        (AttributeValue.double, "1"),
        (AttributeValue.bool, 1),
        (AttributeValue.bytes, "x"),
        (AttributeValue.array, "abc"),
        (AttributeValue.array, [None]),
    ],
)
def test_typed_constructors_refuse_other_types(constructor: object, bad: object) -> None:
    with pytest.raises(TypeError):
        constructor(bad)  # type: ignore[operator]


def test_int_must_fit_64_bits() -> None:
    AttributeValue.int(2**63 - 1)
    with pytest.raises(ValueError, match="64-bit"):
        AttributeValue.int(2**63)


def test_values_are_hashable_and_compare_by_value() -> None:
    table = {AttributeValue.string("x"): 1, AttributeValue.array([1, "a"]): 2}
    assert table[AttributeValue.from_python("x")] == 1
    assert table[AttributeValue.from_python([1, "a"])] == 2
    assert AttributeValue.double(1.0) != AttributeValue.int(1)
    assert math.isnan(AttributeValue.double(math.nan).to_proto().double_value)
    assert repr(AttributeValue.int(3)) == "AttributeValue.int(3)"


# -- ProfileBuilder ------------------------------------------------------------------------


def test_generate_profile_id_is_16_random_non_zero_bytes() -> None:
    ids = {generate_profile_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(len(i) == 16 and any(i) for i in ids)


def small_pprof() -> Profile:
    p = Profile(string_table=["", "cpu", "nanoseconds"])
    p.sample_type.add(type=1, unit=2)
    return p


def test_builder_splits_resource_and_profile_attributes_and_links_span() -> None:
    built = (
        ProfileBuilder(generate_profile_id())
        .attribute("service.name", AttributeValue.string("my-service"))
        .attribute("service.version", "1.2")
        .attribute("deployment.environment", "production")
        .attribute("environment", "production")
        .attributes({"shard": 3})
        .link_to_span("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331")
        .build(small_pprof())
    )
    assert set(built.resource_attributes) == {
        "service.name",
        "service.version",
        "deployment.environment",
    }
    assert built.attributes == {
        "environment": AttributeValue.string("production"),
        "shard": AttributeValue.int(3),
    }
    assert built.link is not None
    assert built.link.trace_id_hex == "0af7651916cd43dd8448eb211c80319c"
    assert built.link.span_id == bytes.fromhex("b7ad6b7169203331")


def test_builder_accepts_bytes_ids_and_pprof_bytes_gzip_or_not() -> None:
    pprof = small_pprof()
    raw = pprof.SerializeToString()
    builder = ProfileBuilder(bytes(range(1, 17))).link_to_span(b"\x01" * 16, b"\x02" * 8)
    assert builder.build(raw).pprof == pprof
    assert builder.build(gzip.compress(raw)).pprof == pprof


def test_built_profile_holds_a_private_copy() -> None:
    pprof = small_pprof()
    built = ProfileBuilder(generate_profile_id()).build(pprof)
    pprof.period = 99
    assert built.pprof.period == 0
    assert "pprof" not in repr(built)


@pytest.mark.parametrize(
    ("trace_id", "span_id", "error"),
    [
        ("00" * 16, "01" * 8, ValueError),
        ("zz" * 16, "01" * 8, ValueError),
        (b"\x01" * 15, b"\x01" * 8, ValueError),
        (b"\x01" * 16, b"\x01" * 9, ValueError),
        (123, b"\x01" * 8, TypeError),
    ],
)
def test_bad_span_ids_are_refused(trace_id: object, span_id: object, error: type) -> None:
    with pytest.raises(error):
        ProfileBuilder(generate_profile_id()).link_to_span(trace_id, span_id)  # type: ignore[arg-type]


def test_bad_profile_id_and_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="all zero"):
        ProfileBuilder(bytes(16))
    builder = ProfileBuilder(generate_profile_id())
    with pytest.raises(TypeError):
        builder.attribute("", "x")
    with pytest.raises(TypeError, match="dict"):
        builder.attribute("k", {"no": "dicts"})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="pprof Profile"):
        builder.build("not a profile")  # type: ignore[arg-type]


# -- Resource ------------------------------------------------------------------------------


def service_name(config: ResourceConfig) -> str:
    attrs = {a.key: a.value for a in config.build().attributes}
    return str(attrs["service.name"].string_value)


def test_service_name_precedence() -> None:
    assert service_name(ResourceConfig.resolve(environ={})) == "unknown_service:python"
    env = {"OTEL_RESOURCE_ATTRIBUTES": "service.name=from-attrs"}
    assert service_name(ResourceConfig.resolve(environ=env)) == "from-attrs"
    env["OTEL_SERVICE_NAME"] = "from-env"
    assert service_name(ResourceConfig.resolve(environ=env)) == "from-env"
    assert service_name(ResourceConfig.resolve(service_name="explicit", environ=env)) == "explicit"


def test_resource_attributes_from_environment_and_configuration() -> None:
    config = ResourceConfig.resolve(
        resource_attributes={"team": "web", "replicas": 3},
        environ={"OTEL_RESOURCE_ATTRIBUTES": "team=env,region=eu%2Dwest, zone = a "},
    )
    attrs = {a.key: a.value for a in config.build().attributes}
    assert attrs["team"].string_value == "web"
    assert attrs["replicas"].int_value == 3
    assert attrs["region"].string_value == "eu-west"
    assert attrs["zone"].string_value == "a"


def test_malformed_resource_attributes_are_discarded_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING):
        assert parse_resource_attributes("a=1,broken,b=2") == {}
    assert "OTEL_RESOURCE_ATTRIBUTES" in caplog.text


def test_extra_attributes_override_the_configured_resource() -> None:
    config = ResourceConfig.resolve(service_name="base", environ={})
    resource = config.build({"service.name": AttributeValue.string("other")})
    assert [a.value.string_value for a in resource.attributes if a.key == "service.name"] == [
        "other"
    ]
