"""Build an OTLP-ready profile from a pprof ``Profile``: the explicit, user-facing path.

The middleware hands the exporter ``ProfileRecord`` objects; code that already has a pprof
profile (from this library's pprof builder or any other tool) wraps it with ``ProfileBuilder``
to add a profile id, attributes and a span link, and exports the resulting ``BuiltProfile``::

    profile = (ProfileBuilder(generate_profile_id())
               .attribute("service.name", AttributeValue.string("my-service"))
               .attribute("environment", "production")     # plain values work too
               .link_to_span(trace_id, span_id)             # bytes or hex strings
               .build(pprof_profile))
    exporter.export_profile(profile)

A ``BuiltProfile`` is sent as built: one OTLP Profile per pprof sample type. Attributes whose
key is resource-level (``service.*``, ``deployment.environment*``) go to the OTLP Resource;
the others become the profile's attributes.
"""

from __future__ import annotations

import gzip
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..pprof.profile_pb2 import Profile as PprofProfile
from ..types import SpanLink, new_profile_id
from ._attributes import AttributeValue, PlainValue
from ._resource import is_resource_key

DEFAULT_FRAME_TYPE = "cpython"


def generate_profile_id() -> bytes:
    """16 random bytes, never all zero (OTLP treats an all-zero profile id as invalid)."""
    return new_profile_id()


def _id_bytes(value: bytes | str, size: int, what: str) -> bytes:
    if isinstance(value, str):
        try:
            raw = bytes.fromhex(value)
        except ValueError:
            raise ValueError(f"{what} {value!r} is not a hex string") from None
    elif isinstance(value, (bytes, bytearray)):
        raw = bytes(value)
    else:
        raise TypeError(f"{what} must be bytes or a hex string, not {type(value).__name__}")
    if len(raw) != size:
        raise ValueError(f"{what} must be {size} bytes ({2 * size} hex digits), got {len(raw)}")
    if not any(raw):
        raise ValueError(f"{what} must not be all zero")
    return raw


@dataclass(frozen=True)
class BuiltProfile:
    """A pprof profile ready for OTLP export, with its id, attributes and span link.

    Made by ``ProfileBuilder.build``; the pprof message is a private copy.
    ``frame_type`` is the ``profile.frame.type`` put on every location (None: none).
    """

    profile_id: bytes
    pprof: PprofProfile = field(repr=False)
    attributes: Mapping[str, AttributeValue] = field(default_factory=dict)
    resource_attributes: Mapping[str, AttributeValue] = field(default_factory=dict)
    link: SpanLink | None = None
    frame_type: str | None = DEFAULT_FRAME_TYPE

    @property
    def is_empty(self) -> bool:
        """True when the pprof holds no sample (such a profile is still sent as built)."""
        return not self.pprof.sample

    def pprof_bytes(self) -> bytes:
        """The serialized pprof (uncompressed), as sent in ``original_payload``."""
        return bytes(self.pprof.SerializeToString())


class ProfileBuilder:
    """Collects a profile id, attributes and a span link, then wraps a pprof profile.

    Parameters:
        profile_id: 16 bytes (or 32 hex digits), not all zero; ``generate_profile_id()``
            makes one.
        frame_type: the ``profile.frame.type`` of the pprof's frames ("cpython" by default,
            None to leave locations without it).

    Methods return the builder, so calls chain; ``build`` may be called more than once.
    """

    def __init__(self, profile_id: bytes | str, *, frame_type: str | None = DEFAULT_FRAME_TYPE):
        self._profile_id = _id_bytes(profile_id, 16, "profile_id")
        self._frame_type = frame_type
        self._attributes: dict[str, AttributeValue] = {}
        self._link: SpanLink | None = None

    def attribute(self, key: str, value: AttributeValue | PlainValue) -> ProfileBuilder:
        """Set one attribute (a later call with the same key replaces the value)."""
        if not isinstance(key, str) or not key:
            raise TypeError(f"attribute key must be a non-empty str, not {key!r}")
        self._attributes[key] = AttributeValue.from_python(value)
        return self

    def attributes(self, values: Mapping[str, AttributeValue | PlainValue]) -> ProfileBuilder:
        """Set several attributes at once."""
        for k, v in values.items():
            self.attribute(k, v)
        return self

    def link_to_span(self, trace_id: bytes | str, span_id: bytes | str) -> ProfileBuilder:
        """Link every sample to a span: 16-byte trace id and 8-byte span id, bytes or hex."""
        self._link = SpanLink(_id_bytes(trace_id, 16, "trace_id"), _id_bytes(span_id, 8, "span_id"))
        return self

    def build(self, pprof_profile: PprofProfile | bytes) -> BuiltProfile:
        """Wrap ``pprof_profile`` (a message, or its bytes, gzip-compressed or not)."""
        copy = PprofProfile()
        if isinstance(pprof_profile, (bytes, bytearray)):
            data = bytes(pprof_profile)
            if data[:2] == b"\x1f\x8b":
                data = gzip.decompress(data)
            copy.ParseFromString(data)
        elif isinstance(pprof_profile, PprofProfile):
            copy.CopyFrom(pprof_profile)
        else:
            raise TypeError(
                "build() needs a pprof Profile message or its bytes, "
                f"not {type(pprof_profile).__name__}"
            )
        resource = {k: v for k, v in self._attributes.items() if is_resource_key(k)}
        other = {k: v for k, v in self._attributes.items() if not is_resource_key(k)}
        return BuiltProfile(
            profile_id=self._profile_id,
            pprof=copy,
            attributes=other,
            resource_attributes=resource,
            link=self._link,
            frame_type=self._frame_type,
        )
