"""Configuration: one typed, validated, frozen :class:`Settings` that owns every option.

This module is the only place that knows option names, environment variables, defaults, units
and parsing. Everything else receives a :class:`Settings` and reads typed attributes; public
durations are float seconds everywhere (the OpenTelemetry variables in milliseconds are
converted here and nowhere else).

Sources, highest precedence first (:meth:`Settings.load`):

1. keyword arguments, by attribute name: ``Settings.load(cpu_frequency=199)``. ``None`` means
   "not given", so adapters can forward their keyword defaults unchanged;
2. the framework's settings mapping with UPPER-case keys (Django ``settings.OTLP_MIDDLEWARE``,
   Flask ``app.config["OTLP_MIDDLEWARE"]``; the adapters pass it in), then the module named by
   ``OTLP_MIDDLEWARE_SETTINGS_MODULE`` (its UPPER-case attributes, like a Django settings
   module). When both exist, both are read and a key in the framework mapping wins over the
   same key in the module. There ``None`` is a value: ``"ENDPOINT": None`` writes files
   even when OTEL_EXPORTER_OTLP_ENDPOINT is set. The module is dedicated to otlp-middleware:
   every public UPPER-case name in it must be an option;
3. the environment: ``OTLP_MIDDLEWARE_<NAME>`` for every option, then the standard OTEL_*
   variables (the signal-specific ``OTEL_EXPORTER_OTLP_PROFILES_*`` before the generic form);
4. the defaults below.

Explicit sources (1 and 2) are validated strictly: an unknown key or a bad value raises one
:class:`~otlp_middleware.errors.ConfigurationError` naming the key, the value and what is
allowed, even when a higher source overrides it. A bad environment value logs a warning and
falls back to the next source, as the OpenTelemetry specification asks
(https://opentelemetry.io/docs/specs/otel/configuration/sdk-environment-variables/); an empty
variable counts as unset.

Example::

    settings = Settings.load(framework_settings={"SAMPLER": "rate:100"}, cpu_frequency=199)
    settings.cpu_frequency      # 199.0
    for row in describe():      # every option, for docs/configuration.md
        print(row.name, row.env, row.default, row.doc)
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import importlib
import logging
import math
import os
import types
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from otlp_middleware.errors import ConfigurationError

if TYPE_CHECKING:  # for annotations only: sampling is a layer above config
    from otlp_middleware.profiling.sampling import SamplingStrategy

logger = logging.getLogger(__name__)

__all__ = [
    "ENV_PREFIX",
    "OTEL_EXPORTER_OTLP_COMPRESSION",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_HEADERS",
    "OTEL_EXPORTER_OTLP_PROFILES_COMPRESSION",
    "OTEL_EXPORTER_OTLP_PROFILES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROFILES_HEADERS",
    "OTEL_EXPORTER_OTLP_PROFILES_TIMEOUT",
    "OTEL_EXPORTER_OTLP_TIMEOUT",
    "OTEL_RESOURCE_ATTRIBUTES",
    "OTEL_SERVICE_NAME",
    "OTLP_MIDDLEWARE_CPU_SAMPLER",
    "OTLP_MIDDLEWARE_SETTINGS_MODULE",
    "PROFILES_PATH",
    "OptionInfo",
    "Settings",
    "describe",
    "render_markdown_table",
]

# --- Environment variable names -------------------------------------------------------------

#: Prefix of the library's own variables: ``OTLP_MIDDLEWARE_<NAME>`` exists for every option.
ENV_PREFIX = "OTLP_MIDDLEWARE_"
#: Which CPU sampling tier to use: ``auto`` (default: native when built, else signal on the
#: main thread and a sampler thread elsewhere), ``native``, ``signal`` or ``thread``. Read once
#: at import by the sampling engine; meant for troubleshooting and benchmarks.
OTLP_MIDDLEWARE_CPU_SAMPLER = "OTLP_MIDDLEWARE_CPU_SAMPLER"
#: Dotted name of a module whose UPPER-case attributes are settings (like Django's).
OTLP_MIDDLEWARE_SETTINGS_MODULE = "OTLP_MIDDLEWARE_SETTINGS_MODULE"
#: Base URL of an OTLP/HTTP receiver; :data:`PROFILES_PATH` is appended.
OTEL_EXPORTER_OTLP_ENDPOINT = "OTEL_EXPORTER_OTLP_ENDPOINT"
#: Full URL for profiles, used as given.
OTEL_EXPORTER_OTLP_PROFILES_ENDPOINT = "OTEL_EXPORTER_OTLP_PROFILES_ENDPOINT"
#: Headers as ``key=value,key2=value2``, keys and values percent-decoded (W3C Baggage form).
OTEL_EXPORTER_OTLP_HEADERS = "OTEL_EXPORTER_OTLP_HEADERS"
OTEL_EXPORTER_OTLP_PROFILES_HEADERS = "OTEL_EXPORTER_OTLP_PROFILES_HEADERS"
#: Export timeout in MILLISECONDS (the OpenTelemetry unit); converted to seconds here.
OTEL_EXPORTER_OTLP_TIMEOUT = "OTEL_EXPORTER_OTLP_TIMEOUT"
OTEL_EXPORTER_OTLP_PROFILES_TIMEOUT = "OTEL_EXPORTER_OTLP_PROFILES_TIMEOUT"
#: ``gzip`` or ``none``.
OTEL_EXPORTER_OTLP_COMPRESSION = "OTEL_EXPORTER_OTLP_COMPRESSION"
OTEL_EXPORTER_OTLP_PROFILES_COMPRESSION = "OTEL_EXPORTER_OTLP_PROFILES_COMPRESSION"
#: ``service.name`` of the resource; wins over a service.name in OTEL_RESOURCE_ATTRIBUTES.
OTEL_SERVICE_NAME = "OTEL_SERVICE_NAME"
#: Resource attributes as ``key=value,...``, percent-decoded.
OTEL_RESOURCE_ATTRIBUTES = "OTEL_RESOURCE_ATTRIBUTES"

#: Path appended to OTEL_EXPORTER_OTLP_ENDPOINT (OTLP/HTTP profiles, development signal).
PROFILES_PATH = "/v1development/profiles"

_REDACTED = "***"
_T = TypeVar("_T")
_T_co = TypeVar("_T_co", covariant=True)


# --- One parser per type ----------------------------------------------------------------------


class _Invalid(Exception):
    """Raised by a parser: ``allowed`` says what the value may be."""

    def __init__(self, allowed: str) -> None:
        super().__init__(allowed)
        self.allowed = allowed


class _Parser(Protocol[_T_co]):
    @property
    def kind(self) -> str:
        """A short description of the type, for the docs table."""

    def __call__(self, value: object) -> _T_co: ...


_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})


@dataclass(frozen=True)
class _Bool:
    kind: str = "bool"

    def __call__(self, value: object) -> bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise _Invalid("must be a bool (in text: true/false, 1/0, yes/no, on/off)")


def _bounds_text(minimum: float | None, maximum: float | None, *, exclusive_min: bool) -> str:
    parts = []
    if minimum is not None:
        parts.append(f"{'>' if exclusive_min else '>='} {minimum:g}")
    if maximum is not None:
        parts.append(f"<= {maximum:g}")
    return " and ".join(parts)


def _check_bounds(
    number: float, minimum: float | None, maximum: float | None, *, exclusive_min: bool
) -> bool:
    if minimum is not None and (number <= minimum if exclusive_min else number < minimum):
        return False
    return maximum is None or number <= maximum


@dataclass(frozen=True)
class _Int:
    minimum: int | None = None
    maximum: int | None = None
    unit: str = ""

    @property
    def kind(self) -> str:
        return f"int {self.unit}".strip() + f" ({self._range()})"

    def _range(self) -> str:
        return _bounds_text(self.minimum, self.maximum, exclusive_min=False)

    def __call__(self, value: object) -> int:
        allowed = f"must be an integer {self._range()}"
        number: int
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        elif isinstance(value, str):
            try:
                number = int(value.strip())
            except ValueError:
                raise _Invalid(allowed) from None
        else:
            raise _Invalid(allowed)
        if not _check_bounds(number, self.minimum, self.maximum, exclusive_min=False):
            raise _Invalid(allowed)
        return number


@dataclass(frozen=True)
class _Float:
    """A finite number; with ``unit="seconds"`` a ``datetime.timedelta`` is accepted too."""

    minimum: float | None = None
    maximum: float | None = None
    exclusive_min: bool = False
    unit: str = "seconds"

    @property
    def kind(self) -> str:
        return f"float {self.unit} ({self._range()})"

    def _range(self) -> str:
        return _bounds_text(self.minimum, self.maximum, exclusive_min=self.exclusive_min)

    def __call__(self, value: object) -> float:
        allowed = f"must be a number of {self.unit} {self._range()}"
        number: float
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, datetime.timedelta) and self.unit == "seconds":
            number = value.total_seconds()
        elif isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                raise _Invalid(allowed) from None
        else:
            raise _Invalid(allowed)
        if not math.isfinite(number) or not _check_bounds(
            number, self.minimum, self.maximum, exclusive_min=self.exclusive_min
        ):
            raise _Invalid(allowed)
        return number


@dataclass(frozen=True)
class _Str:
    """A non-empty string (surrounding blanks removed); ``optional`` also allows ``None``."""

    optional: bool = False
    choices: tuple[str, ...] = ()  # case-insensitive; stored lower-case
    url: bool = False  # an http(s) URL with a host

    @property
    def kind(self) -> str:
        base = (
            " | ".join(repr(c) for c in self.choices)
            if self.choices
            else ("http(s) URL" if self.url else "str")
        )
        return f"{base} | None" if self.optional else base

    def __call__(self, value: object) -> str | None:
        if value is None and self.optional:
            return None
        if self.choices:
            allowed = "must be one of " + ", ".join(repr(c) for c in self.choices)
        elif self.url:
            allowed = "must be an http:// or https:// URL with a host"
        else:
            allowed = "must be a non-empty string"
        if self.optional:
            allowed += " (or None)"
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if not isinstance(value, str) or not value.strip():
            raise _Invalid(allowed)
        text = value.strip()
        if self.choices:
            if text.lower() not in self.choices:
                raise _Invalid(allowed)
            return text.lower()
        if self.url:
            parts = urllib.parse.urlsplit(text)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise _Invalid(allowed)
        return text


@dataclass(frozen=True)
class _Globs:
    """Globs as a list/tuple of strings or one comma-separated string; stored as a tuple."""

    kind: str = "list of globs"

    def __call__(self, value: object) -> tuple[str, ...]:
        allowed = "must be a list of non-empty glob strings (or one comma-separated string)"
        items: Iterable[object]
        if isinstance(value, str):
            items = [part for part in value.split(",") if part.strip()]
        elif isinstance(value, (list, tuple, set, frozenset)):
            items = value
        else:
            raise _Invalid(allowed)
        globs = []
        for item in items:
            if not isinstance(item, str) or not item.strip():
                raise _Invalid(allowed)
            globs.append(item.strip())
        return tuple(globs)


def _split_pairs(text: str) -> dict[str, str]:
    """Parse ``k=v,k2=v2`` with percent-decoding, as OTEL_EXPORTER_OTLP_HEADERS and
    OTEL_RESOURCE_ATTRIBUTES are written (W3C Baggage form). Any malformed entry invalidates
    the whole value, as the spec asks for OTEL_RESOURCE_ATTRIBUTES."""
    pairs: dict[str, str] = {}
    for entry in text.split(","):
        if not entry.strip():
            continue
        key, sep, val = entry.partition("=")
        key = urllib.parse.unquote(key).strip()
        if not sep or not key:
            raise ValueError(entry)
        pairs[key] = urllib.parse.unquote(val).strip()
    return pairs


@dataclass(frozen=True)
class _Mapping:
    """A mapping with non-empty string keys, or its text form ``k=v,k2=v2`` (percent-decoded).

    Values are checked by ``values``; the result is a read-only mapping in the given order.
    """

    values: Callable[[object], object]
    value_kind: str

    @property
    def kind(self) -> str:
        return f"mapping str -> {self.value_kind}"

    def __call__(self, value: object) -> Mapping[str, Any]:
        allowed = (
            f"must be a mapping of non-empty string keys to {self.value_kind} "
            "(or text 'key=value,key2=value2', percent-encoded)"
        )
        source: Mapping[Any, Any]
        if isinstance(value, str):
            try:
                source = _split_pairs(value)
            except ValueError:
                raise _Invalid(allowed) from None
        elif isinstance(value, Mapping):
            source = value
        else:
            raise _Invalid(allowed)
        result: dict[str, object] = {}
        for key, item in source.items():
            if not isinstance(key, str) or not key.strip():
                raise _Invalid(allowed)
            try:
                result[key.strip()] = self.values(item)
            except _Invalid as exc:
                raise _Invalid(f"entry {key!r}: {exc.allowed}") from None
        return types.MappingProxyType(result)


def _str_value(value: object) -> str:
    if not isinstance(value, str):
        raise _Invalid("must be a string")
    return value


def _attribute_value(value: object) -> str | bool | int | float:
    if not isinstance(value, (str, bool, int, float)):
        raise _Invalid("must be a str, bool, int or float")
    return value


@dataclass(frozen=True)
class _Sampler:
    """A sampler spec string (``always``, ``never``, ``probabilistic:0.1``, ``rate:100``,
    ``adaptive:50``, ``parentbased:<spec>``, a dotted class path) or a SamplingStrategy.

    Checked with ``otlp_middleware.profiling.sampling.parse_sampler``, imported lazily: config
    sits below the sampling layer and never imports it at module import time. A spec is stored
    as the (stripped) string, an instance as is, a SamplingStrategy subclass as its instance.
    """

    kind: str = "sampler spec | SamplingStrategy"

    def __call__(self, value: object) -> str | SamplingStrategy:
        from otlp_middleware.profiling.sampling import parse_sampler

        try:
            strategy = parse_sampler(value)  # type: ignore[arg-type]  # it checks the type
        except ConfigurationError as exc:
            raise _Invalid(exc.allowed) from None
        return value.strip() if isinstance(value, str) else strategy


@dataclass(frozen=True)
class _Routes:
    """A route table ``{glob: sampler}`` (a glob may start with methods: ``"GET,HEAD /api/*"``),
    or its text form ``glob=spec,glob2=spec2``; checked by building a ``RuleSampler``."""

    kind: str = "mapping glob -> sampler spec"

    def __call__(self, value: object) -> Mapping[str, str | SamplingStrategy]:
        from otlp_middleware.profiling.sampling import RuleSampler

        routes = _Mapping(_Sampler(), "sampler spec")(value)
        try:
            RuleSampler(routes)
        except ConfigurationError as exc:
            raise _Invalid(f"{exc.allowed} (rule {exc.value!r})") from None
        return routes


# --- Environment conversions (applied before the type parser) -----------------------------


def _millis_to_seconds(raw: str) -> object:
    try:
        millis = float(raw)
    except ValueError:
        raise _Invalid("must be a number of milliseconds > 0") from None
    return millis / 1000.0


def _append_profiles_path(raw: str) -> object:
    return raw.rstrip("/") + PROFILES_PATH


@dataclass(frozen=True)
class _EnvVar:
    name: str
    convert: Callable[[str], object] | None = None  # e.g. milliseconds -> seconds
    note: str = ""


def _option(
    default: _T,
    parser: _Parser[Any],
    doc: str,
    *,
    otel: tuple[_EnvVar, ...] = (),
    secret: bool = False,
) -> _T:
    """Declare one option: its default, its type parser, a one-line doc and extra env vars."""
    metadata = {"parser": parser, "doc": doc, "otel": otel, "secret": secret}
    if isinstance(default, Mapping):
        frozen = types.MappingProxyType(dict(default))
        # Mappings are unhashable: leave them out of __hash__ (they still take part in ==).
        return field(  # type: ignore[return-value]
            default_factory=lambda: frozen, metadata=metadata, hash=False
        )
    return field(default=default, metadata=metadata)


_SAMPLER = _Sampler()
_BOOL = _Bool()
_SECONDS = _Float(minimum=0.0, exclusive_min=True)
_SIZE = _Int(minimum=1)
_DEFAULT_BATCH_SIZE = 512
_HEADERS = _Mapping(_str_value, "str")


@dataclass(frozen=True, repr=False)
class Settings:
    """Every option of otlp-middleware, typed, validated and read-only.

    Build it with :meth:`load` (which merges keyword arguments, framework settings, the
    settings module, the environment and defaults); constructing it directly validates the
    given values too, without reading any other source. Mappings are read-only, lists are
    tuples. ``repr()`` hides the API key, every header value and URL passwords.

    Example::

        settings = Settings.load(sampler="rate:100", exclude_paths=["/health*"])
        strategy = settings.build_sampler()
    """

    enabled: bool = _option(True, _BOOL, "Master switch: False passes every request through.")
    # RUF009: _option() returns dataclasses.field(), evaluated once at class creation.
    sampler: str | SamplingStrategy = _option(  # noqa: RUF009
        "always",
        _SAMPLER,
        "Which requests to profile: a spec ('always', 'never', 'probabilistic:0.1', "
        "'rate:100', 'adaptive:50', dotted class path) or a SamplingStrategy instance.",
    )
    routes: Mapping[str, str | SamplingStrategy] = _option(
        {},
        _Routes(),
        "Per-route samplers: route/path glob -> sampler spec, first match wins; "
        "SAMPLER applies to the rest.",
    )
    exclude_paths: tuple[str, ...] = _option(
        ("/health*", "/livez", "/readyz", "/metrics", "/favicon.ico"),
        _Globs(),
        "Path globs never profiled (health checks, metrics scrapes, favicon).",
    )
    cpu: bool = _option(True, _BOOL, "Collect CPU samples for profiled requests.")
    cpu_frequency: float = _option(
        99.0,
        _Float(minimum=0.0, exclusive_min=True, maximum=10_000.0, unit="Hz"),
        "CPU sampling frequency in Hz (99 avoids lock-step with 100 Hz timers).",
    )
    include_system_calls: bool = _option(
        False, _BOOL, "Also record off-CPU (wall-clock) samples: time spent waiting."
    )
    memory: bool = _option(
        False, _BOOL, "Collect sampled heap allocations (once the memory profiler lands)."
    )
    memory_sampling_rate: int = _option(
        524_288,
        _Int(minimum=1, unit="bytes"),
        "Mean bytes allocated between two heap samples.",
    )
    max_stack_depth: int = _option(
        128,
        _Int(minimum=1, maximum=4096, unit="frames"),
        "Deeper stacks are truncated with a marker frame.",
    )
    endpoint: str | None = _option(
        None,
        _Str(optional=True, url=True),
        "OTLP/HTTP profiles URL, used as given; None writes pprof files to OUTPUT_DIR.",
        otel=(
            _EnvVar(OTEL_EXPORTER_OTLP_PROFILES_ENDPOINT, note="used as given"),
            _EnvVar(
                OTEL_EXPORTER_OTLP_ENDPOINT,
                _append_profiles_path,
                note=f"base URL, {PROFILES_PATH} appended",
            ),
        ),
    )
    headers: Mapping[str, str] = _option(
        {},
        _HEADERS,
        "Extra HTTP headers for export (values are hidden in repr and logs).",
        otel=(_EnvVar(OTEL_EXPORTER_OTLP_PROFILES_HEADERS), _EnvVar(OTEL_EXPORTER_OTLP_HEADERS)),
        secret=True,
    )
    api_key: str | None = _option(
        None,
        _Str(optional=True),
        "Sent as 'Authorization: Bearer <key>' unless HEADERS set Authorization.",
        secret=True,
    )
    timeout: float = _option(
        10.0,
        _SECONDS,
        "Seconds to wait for one export HTTP request.",
        otel=(
            _EnvVar(OTEL_EXPORTER_OTLP_PROFILES_TIMEOUT, _millis_to_seconds, note="milliseconds"),
            _EnvVar(OTEL_EXPORTER_OTLP_TIMEOUT, _millis_to_seconds, note="milliseconds"),
        ),
    )
    compression: str = _option(
        "gzip",
        _Str(choices=("gzip", "none")),
        "Compression of export request bodies.",
        otel=(
            _EnvVar(OTEL_EXPORTER_OTLP_PROFILES_COMPRESSION),
            _EnvVar(OTEL_EXPORTER_OTLP_COMPRESSION),
        ),
    )
    output_dir: str = _option(
        "profiles", _Str(), "Folder for pprof files when no ENDPOINT is configured."
    )
    aggregate: bool = _option(
        False,
        _BOOL,
        "File export: merge requests into one pprof per time window instead of one per request.",
    )
    profile_per_request: bool = _option(
        False,
        _BOOL,
        "OTLP export: one Profile per request (own profile id) instead of merged per batch.",
    )
    service_name: str | None = _option(
        None,
        _Str(optional=True),
        "Resource service.name (else service.name of RESOURCE_ATTRIBUTES, else "
        "unknown_service:python).",
        otel=(_EnvVar(OTEL_SERVICE_NAME),),
    )
    resource_attributes: Mapping[str, str | bool | int | float] = _option(
        {},
        _Mapping(_attribute_value, "str | bool | int | float"),
        "Extra resource attributes of exported profiles.",
        otel=(_EnvVar(OTEL_RESOURCE_ATTRIBUTES),),
    )
    max_queue_size: int = _option(
        2048, _SIZE, "Profiles waiting for export; when full, new ones are dropped and counted."
    )
    max_export_batch_size: int = _option(
        _DEFAULT_BATCH_SIZE,
        _SIZE,
        "Most profiles sent in one export; the default shrinks to MAX_QUEUE_SIZE if smaller.",
    )
    schedule_delay: float = _option(
        5.0, _SECONDS, "Seconds between two exports of the background batching thread."
    )
    export_timeout: float = _option(
        30.0, _SECONDS, "Seconds one export may take overall, retries included."
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            try:
                parsed = f.metadata["parser"](value)
            except _Invalid as exc:
                raise ConfigurationError(f.name, _shown(f.name, value), exc.allowed) from None
            object.__setattr__(self, f.name, parsed)
        if self.max_export_batch_size > self.max_queue_size:
            if self.max_export_batch_size != _DEFAULT_BATCH_SIZE:
                raise ConfigurationError(
                    "max_export_batch_size",
                    self.max_export_batch_size,
                    f"must be <= max_queue_size ({self.max_queue_size})",
                )
            # The default batch size shrinks to fit a small queue.
            object.__setattr__(self, "max_export_batch_size", self.max_queue_size)

    # -- loading -------------------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        *,
        framework_settings: Mapping[str, Any] | None = None,
        environ: Mapping[str, str] | None = None,
        **overrides: Any,
    ) -> Settings:
        """Merge every source (see the module docstring) into validated settings.

        :param framework_settings: the framework's settings mapping, UPPER-case keys
            (Django ``settings.OTLP_MIDDLEWARE``, Flask ``app.config["OTLP_MIDDLEWARE"]``).
        :param environ: the environment to read; ``os.environ`` by default.
        :param overrides: options by attribute name (``cpu_frequency=199``); ``None`` values
            are ignored, so a caller can forward its own keyword defaults.
        :raises ConfigurationError: an unknown key, a bad explicit value, or a settings
            module that cannot be imported.
        """
        env: Mapping[str, str] = os.environ if environ is None else environ
        by_attr = {f.name: f for f in dataclasses.fields(cls)}
        by_name = {name.upper(): name for name in by_attr}

        explicit: list[tuple[str, Mapping[str, Any]]] = []  # (source description, attr->value)
        given = {k: v for k, v in overrides.items() if v is not None}
        explicit.append(("keyword arguments", _known(given, set(by_attr), "keyword argument")))
        if framework_settings is not None:
            if not isinstance(framework_settings, Mapping):
                raise ConfigurationError(
                    "OTLP_MIDDLEWARE",
                    framework_settings,
                    "framework settings must be a mapping of UPPER-case option names",
                )
            known = _known(framework_settings, set(by_name), "framework setting")
            explicit.append(("framework settings", {by_name[k]: v for k, v in known.items()}))
        module_name = env.get(OTLP_MIDDLEWARE_SETTINGS_MODULE, "").strip()
        if module_name:
            known = _known(_module_settings(module_name), set(by_name), "settings module entry")
            explicit.append(
                (f"settings module {module_name!r}", {by_name[k]: v for k, v in known.items()})
            )

        values: dict[str, Any] = {}
        origin: dict[str, str] = {}
        for attr, f in by_attr.items():
            for description, source in explicit:
                if attr in source:
                    # Validate every explicit value, even one a higher source overrides.
                    parsed = _parse_explicit(f, source[attr], description)
                    if attr not in values:
                        values[attr], origin[attr] = parsed, description
            if attr not in values:
                found = _from_environment(f, env)
                if found is not None:
                    values[attr], origin[attr] = found

        queue = values.get("max_queue_size", by_attr["max_queue_size"].default)
        batch = values.get("max_export_batch_size", _DEFAULT_BATCH_SIZE)
        if batch > queue and batch != _DEFAULT_BATCH_SIZE:
            if origin["max_export_batch_size"] != "env":
                raise ConfigurationError(
                    "MAX_EXPORT_BATCH_SIZE", batch, f"must be <= MAX_QUEUE_SIZE ({queue})"
                )
            logger.warning(
                "MAX_EXPORT_BATCH_SIZE=%d from the environment exceeds MAX_QUEUE_SIZE=%d; using %d",
                batch,
                queue,
                queue,
            )
            values["max_export_batch_size"] = queue
        return cls(**values)

    # -- derived values ------------------------------------------------------------------------

    def build_sampler(self) -> SamplingStrategy:
        """A new sampling strategy as these settings describe it.

        SAMPLER goes through ``parse_sampler`` (an instance is returned as is); with ROUTES set,
        the result is ``RuleSampler(ROUTES, default=SAMPLER)``: the first matching route glob
        decides, SAMPLER decides the rest.

        ::

            Settings.load(routes={"/api/*": "rate:10"}, sampler="never").build_sampler()
        """
        from otlp_middleware.profiling.sampling import RuleSampler, parse_sampler

        default = parse_sampler(self.sampler)
        if not self.routes:
            return default
        return RuleSampler(self.routes, default=default)

    @property
    def resolved_service_name(self) -> str:
        """SERVICE_NAME, else ``service.name`` of RESOURCE_ATTRIBUTES, else the OTel fallback."""
        if self.service_name:
            return self.service_name
        from_resource = self.resource_attributes.get("service.name")
        if isinstance(from_resource, str) and from_resource:
            return from_resource
        return "unknown_service:python"

    def export_headers(self) -> dict[str, str]:
        """HEADERS plus ``Authorization: Bearer <API_KEY>`` unless HEADERS set Authorization."""
        headers = dict(self.headers)
        if self.api_key and not any(k.lower() == "authorization" for k in headers):
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{f.name}={_shown(f.name, getattr(self, f.name))!r}" for f in dataclasses.fields(self)
        )
        return f"Settings({shown})"

    __str__ = __repr__


# --- Loading helpers --------------------------------------------------------------------------


def _shown(attr: str, value: object) -> object:
    """``value`` as it may appear in a repr, an error or a log line: secrets hidden."""
    if attr == "api_key":
        return None if value is None else _REDACTED
    if attr == "headers":
        if isinstance(value, Mapping):
            return {k: _REDACTED for k in value}
        return _REDACTED
    if attr == "endpoint" and isinstance(value, str):
        parts = urllib.parse.urlsplit(value)
        if parts.password is not None:
            netloc = f"{parts.username}:{_REDACTED}@{parts.hostname}" + (
                f":{parts.port}" if parts.port else ""
            )
            return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    if isinstance(value, types.MappingProxyType):
        return dict(value)
    return value


def _known(source: Mapping[Any, Any], names: set[str], what: str) -> dict[str, Any]:
    """``source`` if every key is an option name; else ConfigurationError with a hint."""
    for key, value in source.items():
        if key not in names:
            matches = difflib.get_close_matches(str(key).upper(), [n.upper() for n in names], 1)
            if matches:
                hint = next(n for n in names if n.upper() == matches[0])
                allowed = f"unknown {what}; did you mean {hint}?"
            else:
                allowed = f"unknown {what}; known: {', '.join(sorted(names))}"
            raise ConfigurationError(str(key), _REDACTED if _looks_secret(key) else value, allowed)
    return dict(source)


def _looks_secret(key: object) -> bool:
    text = str(key).lower()
    return any(word in text for word in ("key", "header", "token", "secret", "password"))


def _module_settings(name: str) -> dict[str, Any]:
    """The UPPER-case attributes of module ``name`` (imported modules excluded)."""
    try:
        module = importlib.import_module(name)
    except Exception as exc:
        raise ConfigurationError(
            OTLP_MIDDLEWARE_SETTINGS_MODULE,
            name,
            f"must name an importable module ({type(exc).__name__}: {exc})",
        ) from exc
    return {
        key: value
        for key, value in vars(module).items()
        if key.isupper() and not key.startswith("_") and not isinstance(value, types.ModuleType)
    }


def _parse_explicit(f: dataclasses.Field[Any], value: object, description: str) -> object:
    try:
        return f.metadata["parser"](value)
    except _Invalid as exc:
        key = f.name if description == "keyword arguments" else f.name.upper()
        raise ConfigurationError(
            key, _shown(f.name, value), f"{exc.allowed} (in {description})"
        ) from None


def _from_environment(f: dataclasses.Field[Any], env: Mapping[str, str]) -> tuple[Any, str] | None:
    """The first valid value among the option's variables; invalid ones warn and fall back."""
    candidates = (_EnvVar(ENV_PREFIX + f.name.upper()), *f.metadata["otel"])
    for var in candidates:
        raw = env.get(var.name, "").strip()
        if not raw:  # the OTel spec: an empty value is the same as unset
            continue
        try:
            converted = var.convert(raw) if var.convert is not None else raw
            return f.metadata["parser"](converted), "env"
        except _Invalid as exc:
            logger.warning(
                "Ignoring invalid environment variable %s=%r: %s; falling back to the next source",
                var.name,
                _REDACTED if f.metadata["secret"] else raw,
                exc.allowed,
            )
    return None


# --- Documentation --------------------------------------------------------------------------


@dataclass(frozen=True)
class OptionInfo:
    """One row of the configuration reference: see :func:`describe`."""

    name: str  # in framework settings and the settings module
    attribute: str  # on Settings and as a keyword argument
    env: tuple[str, ...]  # environment variables, highest precedence first
    default: str
    kind: str
    doc: str


def describe() -> tuple[OptionInfo, ...]:
    """Every option in declaration order, for the docs (see :func:`render_markdown_table`)."""
    rows = []
    for f in dataclasses.fields(Settings):
        default = f.default
        if f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        env = [ENV_PREFIX + f.name.upper()]
        env += [f"{v.name} ({v.note})" if v.note else v.name for v in f.metadata["otel"]]
        rows.append(
            OptionInfo(
                name=f.name.upper(),
                attribute=f.name,
                env=tuple(env),
                default=repr(_shown(f.name, default)),
                kind=f.metadata["parser"].kind,
                doc=f.metadata["doc"],
            )
        )
    return tuple(rows)


def render_markdown_table() -> str:
    """A Markdown table of :func:`describe`, ready for docs/configuration.md."""
    lines = [
        "| Setting | Keyword | Environment | Type | Default | Description |",
        "|---|---|---|---|---|---|",
    ]
    for row in describe():
        cells = (
            f"`{row.name}`",
            f"`{row.attribute}`",
            "<br>".join(f"`{e}`" for e in row.env),
            row.kind,
            f"`{row.default}`",
            row.doc,
        )
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"
