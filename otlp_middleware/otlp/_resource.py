"""The OTLP Resource and InstrumentationScope that every exported profile carries.

Resource attributes, lowest precedence first (a later source overrides an earlier one):

1. detected: ``process.pid``, ``process.runtime.name/version/description``, ``host.name``,
   and ``service.name = unknown_service:python``;
2. ``OTEL_RESOURCE_ATTRIBUTES`` (``key1=value1,key2=value2``, values percent-decoded);
3. ``resource_attributes`` given in configuration;
4. ``OTEL_SERVICE_NAME``;
5. ``service_name`` given in configuration.

Per the OpenTelemetry SDK specification (resource/sdk.md), ``OTEL_SERVICE_NAME`` wins over a
``service.name`` inside ``OTEL_RESOURCE_ATTRIBUTES``; explicit configuration wins over both, as
everywhere in this library. ``service.name`` is always a plain string (Grafana Pyroscope
requires it). ``process.pid`` is read when the resource is built, so a forked worker reports
its own pid.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import socket
import sys
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field

from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource

from ._attributes import AttributeValue, PlainValue

logger = logging.getLogger(__name__)

ENV_SERVICE_NAME = "OTEL_SERVICE_NAME"
ENV_RESOURCE_ATTRIBUTES = "OTEL_RESOURCE_ATTRIBUTES"
DEFAULT_SERVICE_NAME = "unknown_service:python"
SCOPE_NAME = "otlp_middleware"

_RESOURCE_PREFIXES = ("service.", "deployment.environment")


def is_resource_key(key: str) -> bool:
    """True for attribute keys that describe the service, not one profile.

    ``service.*`` and ``deployment.environment*`` given to ``ProfileBuilder.attribute`` are
    moved to the Resource, where receivers look for them.
    """
    return key.startswith(_RESOURCE_PREFIXES)


@functools.cache
def library_version() -> str:
    """This package's version, as installed (``unknown`` when running from a bare checkout).

    Read once: every OTLP request names it, and reading the installed metadata takes about
    a millisecond (files read and parsed).
    """
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("otlp-middleware")
    except PackageNotFoundError:
        return "unknown"


def instrumentation_scope() -> InstrumentationScope:
    """The scope of every profile this library produces: ``otlp_middleware`` and its version."""
    return InstrumentationScope(name=SCOPE_NAME, version=library_version())


def parse_resource_attributes(raw: str) -> dict[str, str]:
    """Parse an ``OTEL_RESOURCE_ATTRIBUTES`` value; on any malformed entry warn and return {}.

    The specification asks to discard the whole value when it cannot be decoded
    (https://opentelemetry.io/docs/specs/otel/resource/sdk/#specifying-resource-information-via-an-environment-variable).
    """
    result: dict[str, str] = {}
    for item in raw.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            logger.warning(
                "ignoring %s: entry %r is not key=value", ENV_RESOURCE_ATTRIBUTES, item.strip()
            )
            return {}
        try:
            result[key] = urllib.parse.unquote(value.strip(), errors="strict")
        except UnicodeDecodeError:
            logger.warning(
                "ignoring %s: entry for %r is not valid UTF-8", ENV_RESOURCE_ATTRIBUTES, key
            )
            return {}
    return result


def _detected() -> dict[str, AttributeValue]:
    impl = sys.implementation
    return {
        "service.name": AttributeValue.string(DEFAULT_SERVICE_NAME),
        "process.pid": AttributeValue.int(os.getpid()),
        "process.runtime.name": AttributeValue.string(impl.name),
        "process.runtime.version": AttributeValue.string(platform.python_version()),
        "process.runtime.description": AttributeValue.string(sys.version),
        "host.name": AttributeValue.string(socket.gethostname()),
    }


@dataclass(frozen=True)
class ResourceConfig:
    """The configured part of the Resource, resolved once (environment read at creation).

    ``build()`` adds the detected attributes each time, so the pid is always current.
    """

    attributes: Mapping[str, AttributeValue] = field(default_factory=dict)

    @classmethod
    def resolve(
        cls,
        service_name: str | None = None,
        resource_attributes: Mapping[str, AttributeValue | PlainValue] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> ResourceConfig:
        """Merge environment and explicit settings following the precedence in the module doc."""
        env = os.environ if environ is None else environ
        attrs: dict[str, AttributeValue] = {
            k: AttributeValue.string(v)
            for k, v in parse_resource_attributes(env.get(ENV_RESOURCE_ATTRIBUTES, "")).items()
        }
        for k, v in (resource_attributes or {}).items():
            attrs[k] = AttributeValue.from_python(v)
        env_service = env.get(ENV_SERVICE_NAME, "").strip()
        if env_service:
            attrs["service.name"] = AttributeValue.string(env_service)
        if service_name:
            attrs["service.name"] = AttributeValue.string(service_name)
        if "service.name" in attrs and attrs["service.name"].kind != "string":
            attrs["service.name"] = AttributeValue.string(str(attrs["service.name"].to_python()))
        return cls(attrs)

    def build(self, extra: Mapping[str, AttributeValue] | None = None) -> Resource:
        """The Resource message: detected < configured < ``extra`` (per-profile overrides)."""
        merged = _detected()
        merged.update(self.attributes)
        if extra:
            merged.update(extra)
        return Resource(
            attributes=[KeyValue(key=k, value=v.to_proto()) for k, v in sorted(merged.items())]
        )
