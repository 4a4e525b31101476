"""Settings: sources and their precedence, OTEL_* parsing, validation, secrets, docs table."""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import logging
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from otlp_middleware.config import (
    OTLP_MIDDLEWARE_SETTINGS_MODULE,
    Settings,
    describe,
    render_markdown_table,
)
from otlp_middleware.errors import ConfigurationError
from otlp_middleware.profiling.sampling import (
    AlwaysSample,
    NeverSample,
    RateSampler,
    RequestInfo,
    RuleSampler,
)

_counter = itertools.count()

MakeModule = Callable[[str], dict[str, str]]


@pytest.fixture
def settings_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[MakeModule]:
    """Write a settings module into tmp_path (on sys.path); returns an environ naming it."""
    monkeypatch.syspath_prepend(str(tmp_path))
    names: list[str] = []

    def make(source: str) -> dict[str, str]:
        name = f"otlp_test_settings_{next(_counter)}"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        names.append(name)
        return {OTLP_MIDDLEWARE_SETTINGS_MODULE: name}

    yield make
    for name in names:
        sys.modules.pop(name, None)


# --- defaults and precedence ------------------------------------------------------------------


def test_defaults_without_any_source() -> None:
    settings = Settings.load(environ={})
    assert settings == Settings()
    assert settings.enabled is True
    assert settings.sampler == "always"
    assert settings.cpu_frequency == 99.0
    assert settings.memory_sampling_rate == 524_288
    assert settings.endpoint is None
    assert settings.timeout == 10.0
    assert settings.compression == "gzip"
    assert settings.output_dir == "profiles"
    assert "/health*" in settings.exclude_paths
    assert dict(settings.headers) == {}
    assert settings.max_export_batch_size <= settings.max_queue_size


def test_each_source_overrides_the_ones_below(settings_module: MakeModule) -> None:
    environ = {"OTLP_MIDDLEWARE_CPU_FREQUENCY": "11"}
    assert Settings.load(environ=environ).cpu_frequency == 11.0

    environ |= settings_module("CPU_FREQUENCY = 12\n")
    assert Settings.load(environ=environ).cpu_frequency == 12.0

    framework = {"CPU_FREQUENCY": 13}
    assert Settings.load(environ=environ, framework_settings=framework).cpu_frequency == 13.0

    loaded = Settings.load(environ=environ, framework_settings=framework, cpu_frequency=14)
    assert loaded.cpu_frequency == 14.0


def test_framework_settings_and_module_are_merged_framework_winning(
    settings_module: MakeModule,
) -> None:
    environ = settings_module("SAMPLER = 'never'\nCPU_FREQUENCY = 50\n")
    settings = Settings.load(environ=environ, framework_settings={"SAMPLER": "rate:10"})
    assert settings.sampler == "rate:10"  # in both: the framework's mapping wins
    assert settings.cpu_frequency == 50.0  # only in the module: still read


def test_keyword_none_means_not_given() -> None:
    environ = {"OTEL_EXPORTER_OTLP_PROFILES_ENDPOINT": "http://collector:4318/p"}
    settings = Settings.load(environ=environ, endpoint=None, sampler=None)
    assert settings.endpoint == "http://collector:4318/p"
    assert settings.sampler == "always"


def test_none_in_framework_settings_is_an_explicit_value() -> None:
    environ = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}
    assert Settings.load(environ=environ, framework_settings={"ENDPOINT": None}).endpoint is None
    with pytest.raises(ConfigurationError, match="CPU"):
        Settings.load(environ={}, framework_settings={"CPU": None})


def test_settings_are_hashable_and_comparable() -> None:
    assert hash(Settings()) == hash(Settings.load(environ={}))
    assert Settings(headers={"a": "1"}) != Settings()


def test_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTLP_MIDDLEWARE_MEMORY", "true")
    assert Settings.load().memory is True


def test_empty_environment_value_counts_as_unset() -> None:
    environ = {"OTLP_MIDDLEWARE_TIMEOUT": "", "OTEL_EXPORTER_OTLP_TIMEOUT": "2000"}
    assert Settings.load(environ=environ).timeout == 2.0


# Every option must appear here, with a valid text value and its parsed form: adding an option
# without teaching this test about it fails test_every_option_has_a_working_env_variable.
ENV_EXAMPLES: dict[str, tuple[str, object]] = {
    "ENABLED": ("false", False),
    "SAMPLER": ("rate:100", "rate:100"),
    "ROUTES": ("GET /api/*=never,/admin%2C*=rate:5", {"GET /api/*": "never", "/admin,*": "rate:5"}),
    "EXCLUDE_PATHS": ("/up, /status*", ("/up", "/status*")),
    "CPU": ("0", False),
    "CPU_FREQUENCY": ("199.5", 199.5),
    "INCLUDE_SYSTEM_CALLS": ("yes", True),
    "MEMORY": ("ON", True),
    "MEMORY_SAMPLING_RATE": ("1024", 1024),
    "MAX_STACK_DEPTH": ("64", 64),
    "ENDPOINT": ("https://example.com/otlp", "https://example.com/otlp"),
    "HEADERS": ("x-scope-orgid=tenant%201", {"x-scope-orgid": "tenant 1"}),
    "API_KEY": ("k3y", "k3y"),
    "TIMEOUT": ("2.5", 2.5),
    "COMPRESSION": ("NONE", "none"),
    "OUTPUT_DIR": ("/tmp/p", "/tmp/p"),
    "AGGREGATE": ("true", True),
    "PROFILE_PER_REQUEST": ("true", True),
    "SERVICE_NAME": ("shop", "shop"),
    "RESOURCE_ATTRIBUTES": ("deployment.environment=prod", {"deployment.environment": "prod"}),
    "MAX_QUEUE_SIZE": ("4096", 4096),
    "MAX_EXPORT_BATCH_SIZE": ("100", 100),
    "SCHEDULE_DELAY": ("0.5", 0.5),
    "EXPORT_TIMEOUT": ("60", 60.0),
}


def test_every_option_is_in_the_env_examples() -> None:
    assert {row.name for row in describe()} == set(ENV_EXAMPLES)


@pytest.mark.parametrize("name", sorted(ENV_EXAMPLES))
def test_every_option_has_a_working_env_variable(name: str) -> None:
    text, expected = ENV_EXAMPLES[name]
    value = getattr(Settings.load(environ={f"OTLP_MIDDLEWARE_{name}": text}), name.lower())
    assert (dict(value) if hasattr(value, "items") else value) == expected


# --- OTEL_* variables -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, "http://c:4318/v1development/profiles"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/"}, "http://c:4318/v1development/profiles"),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "https://gw/otlp"},
            "https://gw/otlp/v1development/profiles",
        ),
        ({"OTEL_EXPORTER_OTLP_PROFILES_ENDPOINT": "http://c:4040/custom"}, "http://c:4040/custom"),
        (
            {
                "OTEL_EXPORTER_OTLP_PROFILES_ENDPOINT": "http://specific/x",
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://generic",
            },
            "http://specific/x",
        ),
        (
            {
                "OTLP_MIDDLEWARE_ENDPOINT": "http://ours/p",
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://g",
            },
            "http://ours/p",
        ),
    ],
)
def test_endpoint_from_environment(environ: dict[str, str], expected: str) -> None:
    assert Settings.load(environ=environ).endpoint == expected


def test_otel_timeouts_are_milliseconds_ours_are_seconds() -> None:
    assert Settings.load(environ={"OTEL_EXPORTER_OTLP_TIMEOUT": "2500"}).timeout == 2.5
    both = {"OTEL_EXPORTER_OTLP_PROFILES_TIMEOUT": "500", "OTEL_EXPORTER_OTLP_TIMEOUT": "9000"}
    assert Settings.load(environ=both).timeout == 0.5
    ours = {"OTLP_MIDDLEWARE_TIMEOUT": "3", "OTEL_EXPORTER_OTLP_TIMEOUT": "9000"}
    assert Settings.load(environ=ours).timeout == 3.0


def test_otel_headers_are_percent_decoded_and_trimmed() -> None:
    environ = {"OTEL_EXPORTER_OTLP_HEADERS": " Authorization = Basic%20dTpw , x-list=a%2Cb%3Dc,"}
    headers = Settings.load(environ=environ).headers
    assert dict(headers) == {"Authorization": "Basic dTpw", "x-list": "a,b=c"}


def test_profiles_headers_win_over_generic_headers() -> None:
    environ = {
        "OTEL_EXPORTER_OTLP_PROFILES_HEADERS": "a=profiles",
        "OTEL_EXPORTER_OTLP_HEADERS": "a=generic,b=2",
    }
    assert dict(Settings.load(environ=environ).headers) == {"a": "profiles"}


def test_otel_compression_service_name_and_resource_attributes() -> None:
    environ = {
        "OTEL_EXPORTER_OTLP_COMPRESSION": "none",
        "OTEL_SERVICE_NAME": "checkout",
        "OTEL_RESOURCE_ATTRIBUTES": "service.name=ignored,team=pay%20ments",
    }
    settings = Settings.load(environ=environ)
    assert settings.compression == "none"
    assert settings.service_name == "checkout"
    assert settings.resolved_service_name == "checkout"
    assert dict(settings.resource_attributes) == {"service.name": "ignored", "team": "pay ments"}


def test_resolved_service_name_fallbacks() -> None:
    from_resource = Settings(resource_attributes={"service.name": "from-resource"})
    assert from_resource.resolved_service_name == "from-resource"
    assert Settings().resolved_service_name == "unknown_service:python"


# --- invalid environment values: warn and fall back ---------------------------------------


def test_invalid_env_value_warns_and_falls_back_to_default(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="otlp_middleware.config")
    settings = Settings.load(environ={"OTEL_EXPORTER_OTLP_TIMEOUT": "soon"})
    assert settings.timeout == 10.0
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert "OTEL_EXPORTER_OTLP_TIMEOUT" in record.getMessage()
    assert "'soon'" in record.getMessage()


def test_invalid_env_value_falls_back_to_the_next_variable(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="otlp_middleware.config")
    environ = {
        "OTLP_MIDDLEWARE_TIMEOUT": "-1",
        "OTEL_EXPORTER_OTLP_PROFILES_TIMEOUT": "0",
        "OTEL_EXPORTER_OTLP_TIMEOUT": "1500",
    }
    assert Settings.load(environ=environ).timeout == 1.5
    assert [r.args[0] for r in caplog.records] == [  # type: ignore[index]
        "OTLP_MIDDLEWARE_TIMEOUT",
        "OTEL_EXPORTER_OTLP_PROFILES_TIMEOUT",
    ]


@pytest.mark.parametrize(
    ("variable", "text", "attribute"),
    [
        ("OTLP_MIDDLEWARE_ENABLED", "maybe", "enabled"),
        ("OTLP_MIDDLEWARE_SAMPLER", "sometimes", "sampler"),
        ("OTLP_MIDDLEWARE_ROUTES", "/api/*=rate:0", "routes"),
        ("OTLP_MIDDLEWARE_CPU_FREQUENCY", "nan", "cpu_frequency"),
        ("OTLP_MIDDLEWARE_MEMORY_SAMPLING_RATE", "1.5", "memory_sampling_rate"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4318", "endpoint"),
        ("OTEL_EXPORTER_OTLP_COMPRESSION", "zstd", "compression"),
        ("OTEL_RESOURCE_ATTRIBUTES", "team=a,broken", "resource_attributes"),
    ],
)
def test_invalid_env_values_fall_back_to_defaults(
    variable: str, text: str, attribute: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="otlp_middleware.config")
    loaded = Settings.load(environ={variable: text})
    assert getattr(loaded, attribute) == getattr(Settings(), attribute)
    assert len(caplog.records) == 1
    assert variable in caplog.records[0].getMessage()


def test_invalid_secret_env_value_is_not_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="otlp_middleware.config")
    settings = Settings.load(environ={"OTEL_EXPORTER_OTLP_HEADERS": "Bearer s3cr3t-token"})
    assert dict(settings.headers) == {}
    assert "OTEL_EXPORTER_OTLP_HEADERS" in caplog.text
    assert "s3cr3t" not in caplog.text


def test_default_batch_size_shrinks_to_a_smaller_queue(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="otlp_middleware.config")
    assert Settings(max_queue_size=100).max_export_batch_size == 100
    from_env = Settings.load(environ={"OTLP_MIDDLEWARE_MAX_QUEUE_SIZE": "100"})
    assert from_env.max_export_batch_size == 100
    assert caplog.records == []


def test_batch_larger_than_queue_from_env_warns_and_clamps(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="otlp_middleware.config")
    environ = {"OTLP_MIDDLEWARE_MAX_EXPORT_BATCH_SIZE": "5000"}
    assert Settings.load(environ=environ).max_export_batch_size == 2048
    assert "MAX_EXPORT_BATCH_SIZE=5000" in caplog.text


def test_batch_larger_than_queue_explicit_raises() -> None:
    with pytest.raises(ConfigurationError, match="MAX_QUEUE_SIZE"):
        Settings.load(environ={}, max_queue_size=10, max_export_batch_size=20)
    with pytest.raises(ConfigurationError, match=r"MAX_QUEUE_SIZE \(100\)"):
        Settings.load(
            environ={"OTLP_MIDDLEWARE_MAX_QUEUE_SIZE": "100"},
            framework_settings={"MAX_EXPORT_BATCH_SIZE": 200},
        )
    with pytest.raises(ConfigurationError, match="max_queue_size"):
        Settings(max_queue_size=10, max_export_batch_size=20)


# --- explicit sources: unknown keys and bad values raise ----------------------------------


def test_unknown_keyword_raises_with_hint() -> None:
    with pytest.raises(ConfigurationError, match="did you mean cpu_frequency") as info:
        Settings.load(environ={}, cpu_frequncy=199)
    assert info.value.field == "cpu_frequncy"
    assert info.value.value == 199


@pytest.mark.parametrize("key", ["SAMPLRE", "sampler"])
def test_unknown_framework_key_raises_with_hint(key: str) -> None:
    with pytest.raises(ConfigurationError, match="did you mean SAMPLER") as info:
        Settings.load(environ={}, framework_settings={key: "always"})
    assert info.value.field == key


def test_unknown_key_without_close_match_lists_known_names() -> None:
    with pytest.raises(ConfigurationError, match=r"known: .*CPU_FREQUENCY"):
        Settings.load(environ={}, framework_settings={"XYZZY": 1})


def test_framework_settings_must_be_a_mapping() -> None:
    with pytest.raises(ConfigurationError, match="mapping"):
        Settings.load(environ={}, framework_settings=["SAMPLER"])  # type: ignore[arg-type]


def test_module_unknown_upper_case_name_raises_lower_case_ignored(
    settings_module: MakeModule,
) -> None:
    environ = settings_module("import os\nhelper = 1\n_PRIVATE = 2\nSAMPLRE = 'never'\n")
    with pytest.raises(ConfigurationError, match="did you mean SAMPLER") as info:
        Settings.load(environ=environ)
    assert info.value.field == "SAMPLRE"

    environ = settings_module("import os\nhelper = 1\n_PRIVATE = 2\nSAMPLER = 'never'\n")
    assert Settings.load(environ=environ).sampler == "never"


def test_module_that_cannot_be_imported_raises(settings_module: MakeModule) -> None:
    with pytest.raises(ConfigurationError) as info:
        Settings.load(environ={OTLP_MIDDLEWARE_SETTINGS_MODULE: "no_such_module_for_otlp"})
    assert info.value.field == OTLP_MIDDLEWARE_SETTINGS_MODULE
    assert info.value.value == "no_such_module_for_otlp"

    broken = settings_module("raise RuntimeError('boom')\n")
    with pytest.raises(ConfigurationError, match="boom"):
        Settings.load(environ=broken)


BAD_VALUES: list[tuple[str, object, str]] = [
    ("enabled", "perhaps", "bool"),
    ("sampler", "sometimes", "rate:"),
    ("sampler", 42, "SamplingStrategy"),
    ("routes", {"/api/*": "rate:0"}, "integer >= 1"),
    ("routes", ["/api/*"], "mapping"),
    ("routes", {"GET, /api/*": "always"}, "methods must be non-empty"),
    ("exclude_paths", [""], "glob"),
    ("exclude_paths", 5, "list"),
    ("cpu", 1, "bool"),
    ("cpu_frequency", 0, "> 0 and <= 10000"),
    ("cpu_frequency", 20_000, "> 0 and <= 10000"),
    ("cpu_frequency", True, "number"),
    ("memory_sampling_rate", 0, ">= 1"),
    ("memory_sampling_rate", 2.5, "integer"),
    ("endpoint", "localhost:4318", "http:// or https://"),
    ("headers", "novalue", "mapping"),
    ("headers", {" ": "v"}, "non-empty string keys"),
    ("timeout", -1, "> 0"),
    ("timeout", float("inf"), "> 0"),
    ("compression", "zstd", "'gzip', 'none'"),
    ("output_dir", "  ", "non-empty"),
    ("resource_attributes", {"a": [1]}, "str, bool, int or float"),
    ("max_queue_size", "many", "integer"),
    ("schedule_delay", "soon", "seconds"),
]


@pytest.mark.parametrize(("attribute", "value", "allowed"), BAD_VALUES)
@pytest.mark.parametrize("source", ["keyword", "framework", "module"])
def test_bad_explicit_value_raises_naming_key_value_and_allowed(
    attribute: str, value: object, allowed: str, source: str, settings_module: MakeModule
) -> None:
    name = attribute.upper()
    environ: dict[str, str] = {}
    kwargs: dict[str, Any] = {}
    if source == "keyword":
        kwargs[attribute] = value
    elif source == "framework":
        kwargs["framework_settings"] = {name: value}
    else:
        literal = "float('inf')" if value == float("inf") else repr(value)
        environ = settings_module(f"{name} = {literal}\n")
    with pytest.raises(ConfigurationError) as info:
        Settings.load(environ=environ, **kwargs)
    error = info.value
    assert isinstance(error, ValueError)
    assert error.field == (attribute if source == "keyword" else name)
    if attribute == "headers":  # header values are secrets: names stay, values are hidden
        hidden = {k: "***" for k in value} if isinstance(value, dict) else "***"
        assert error.value == hidden
    else:
        assert error.value == value
    assert allowed in error.allowed
    assert error.field in str(error)


def test_bad_value_in_a_lower_explicit_source_raises_even_when_overridden() -> None:
    with pytest.raises(ConfigurationError, match="framework settings"):
        Settings.load(environ={}, framework_settings={"CPU_FREQUENCY": -1}, cpu_frequency=99)


def test_env_is_not_consulted_for_an_explicitly_set_option(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="otlp_middleware.config")
    settings = Settings.load(environ={"OTLP_MIDDLEWARE_CPU": "maybe"}, cpu=False)
    assert settings.cpu is False
    assert caplog.records == []


def test_direct_construction_validates() -> None:
    with pytest.raises(ConfigurationError, match="cpu_frequency"):
        Settings(cpu_frequency=0)


# --- typed, normalised, frozen ----------------------------------------------------------------


def test_values_are_normalised() -> None:
    settings = Settings.load(
        environ={},
        exclude_paths=["/a", " /b "],
        timeout=datetime.timedelta(milliseconds=1500),
        cpu_frequency=199,
        compression=" GZIP ",
        output_dir=Path("/tmp/out"),
        headers="a=1,b=2",
    )
    assert settings.exclude_paths == ("/a", "/b")
    assert settings.timeout == 1.5
    assert isinstance(settings.cpu_frequency, float)
    assert settings.compression == "gzip"
    assert settings.output_dir == "/tmp/out"
    assert dict(settings.headers) == {"a": "1", "b": "2"}


def test_settings_are_read_only() -> None:
    settings = Settings.load(environ={}, headers={"a": "1"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.cpu = False  # type: ignore[misc]
    with pytest.raises(TypeError):
        settings.headers["a"] = "2"  # type: ignore[index]
    source = {"a": "1"}
    copied = Settings.load(environ={}, headers=source)
    source["a"] = "changed"
    assert copied.headers["a"] == "1"


def test_replace_keeps_validating() -> None:
    settings = Settings()
    assert dataclasses.replace(settings, cpu=False).cpu is False
    with pytest.raises(ConfigurationError):
        dataclasses.replace(settings, timeout=0)


# --- secrets ----------------------------------------------------------------------------------


def test_repr_hides_api_key_header_values_and_url_password() -> None:
    settings = Settings.load(
        environ={"OTEL_EXPORTER_OTLP_HEADERS": "Authorization=Bearer%20hdr-secret,x-tenant=t1"},
        api_key="key-secret",
        endpoint="https://user:url-secret@collector:4318/v1development/profiles",
    )
    for text in (repr(settings), str(settings)):
        assert "key-secret" not in text
        assert "hdr-secret" not in text
        assert "url-secret" not in text
        assert "Authorization" in text  # the names stay visible
        assert "https://user:***@collector:4318/v1development/profiles" in text
    assert settings.api_key == "key-secret"  # the values themselves are intact


def test_errors_hide_secret_values() -> None:
    with pytest.raises(ConfigurationError) as info:
        Settings.load(environ={}, headers={"Authorization": b"bytes-secret"})
    assert "bytes-secret" not in str(info.value)
    with pytest.raises(ConfigurationError) as info:
        Settings.load(environ={}, framework_settings={"API_KEYS": "misspelt-secret"})
    assert "misspelt-secret" not in str(info.value)
    assert "did you mean API_KEY" in str(info.value)


def test_export_headers_add_bearer_unless_authorization_given() -> None:
    assert Settings(api_key="k").export_headers() == {"Authorization": "Bearer k"}
    given = Settings(api_key="k", headers={"authorization": "Basic x"})
    assert given.export_headers() == {"authorization": "Basic x"}
    assert Settings().export_headers() == {}


# --- samplers ---------------------------------------------------------------------------------


def test_sampler_spec_is_stored_and_built() -> None:
    settings = Settings.load(environ={}, sampler=" rate:10 ")
    assert settings.sampler == "rate:10"
    strategy = settings.build_sampler()
    assert isinstance(strategy, RateSampler)
    assert strategy is not settings.build_sampler()  # each call builds a fresh strategy


def test_sampler_instance_is_kept() -> None:
    never = NeverSample()
    settings = Settings.load(environ={}, sampler=never)
    assert settings.sampler is never
    assert settings.build_sampler() is never


def test_routes_build_a_rule_sampler_with_sampler_as_default() -> None:
    settings = Settings.load(
        environ={"OTLP_MIDDLEWARE_ROUTES": "GET /api/*=never"}, framework_settings={}
    )
    strategy = settings.build_sampler()
    assert isinstance(strategy, RuleSampler)
    assert isinstance(strategy.default, AlwaysSample)
    assert strategy.should_sample(RequestInfo("GET", "/api/x")) is False
    assert strategy.should_sample(RequestInfo("POST", "/api/x")) is True
    assert strategy.should_sample(RequestInfo("GET", "/other")) is True


# --- documentation ----------------------------------------------------------------------------


def test_describe_covers_every_field_with_env_default_and_doc() -> None:
    rows = describe()
    assert [r.attribute for r in rows] == [f.name for f in dataclasses.fields(Settings)]
    for row in rows:
        assert row.name == row.attribute.upper()
        assert row.env[0] == f"OTLP_MIDDLEWARE_{row.name}"
        assert row.doc and row.kind and row.default
    timeout = next(r for r in rows if r.name == "TIMEOUT")
    assert timeout.default == "10.0"
    assert "OTEL_EXPORTER_OTLP_TIMEOUT (milliseconds)" in timeout.env


def test_markdown_table_has_one_row_per_option() -> None:
    table = render_markdown_table()
    lines = table.splitlines()
    assert len(lines) == 2 + len(describe())
    assert all(line.startswith("| ") and line.endswith(" |") for line in lines[2:])
    assert "`OTEL_EXPORTER_OTLP_ENDPOINT (base URL, /v1development/profiles appended)`" in table
