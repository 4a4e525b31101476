"""Typed attribute values for OTLP profiles.

OTLP attributes carry an ``AnyValue``: a string, a bool, a 64-bit int, a double, bytes, or an
array of those. ``AttributeValue`` is that value on the Python side: immutable, hashable (so the
encoder can deduplicate the shared attribute table by value) and checked when it is made, so a
bad value fails where it is written rather than deep inside the background exporter.

    AttributeValue.string("checkout")
    AttributeValue.int(3)
    AttributeValue.array(["a", "b"])          # elements may be plain values
    AttributeValue.from_python(0.25)          # -> AttributeValue.double(0.25)

Plain Python values map as: ``str`` -> string, ``bool`` -> bool, ``int`` -> int,
``float`` -> double, ``bytes``/``bytearray`` -> bytes, ``list``/``tuple`` -> array.
"""

from __future__ import annotations

import builtins
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue

AttributeKind = Literal["string", "int", "double", "bool", "bytes", "array"]

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1
_PROTO_FIELD = {
    "string": "string_value",
    "int": "int_value",
    "double": "double_value",
    "bool": "bool_value",
    "bytes": "bytes_value",
}

PlainValue = (
    str
    | builtins.bool
    | builtins.int
    | float
    | builtins.bytes
    | bytearray
    | list[Any]
    | tuple[Any, ...]
)
"""What ``AttributeValue.from_python`` accepts (lists and tuples of these, too)."""


def _type_error(what: str, value: object) -> TypeError:
    return TypeError(
        f"attribute value {value!r} of type {type(value).__name__} is not a valid {what}; "
        "use str, int, float, bool, bytes, a list/tuple of them, or an AttributeValue"
    )


@dataclass(frozen=True)
class AttributeValue:
    """One OTLP attribute value, typed. Build it with a constructor, not ``__init__``.

    ``kind`` names the ``AnyValue`` field the value goes to; ``value`` is the Python value
    (a tuple of ``AttributeValue`` for arrays). Equal values compare and hash equal, which the
    encoder relies on to share one attribute-table entry.
    """

    kind: AttributeKind
    value: str | builtins.int | float | builtins.bool | builtins.bytes | tuple[AttributeValue, ...]

    @classmethod
    def string(cls, value: str) -> AttributeValue:
        """A string value."""
        if not isinstance(value, str):
            raise _type_error("string", value)
        return cls("string", value)

    @classmethod
    def int(cls, value: builtins.int) -> AttributeValue:
        """A signed 64-bit integer (bools are refused: use ``AttributeValue.bool``)."""
        if isinstance(value, builtins.bool) or not isinstance(value, builtins.int):
            raise _type_error("int", value)
        if not _INT64_MIN <= value <= _INT64_MAX:
            raise ValueError(f"attribute int {value} does not fit in a signed 64-bit integer")
        return cls("int", value)

    @classmethod
    def double(cls, value: float | builtins.int) -> AttributeValue:
        """A double. Ints are widened; NaN and infinities are allowed (AnyValue holds them)."""
        if isinstance(value, builtins.bool) or not isinstance(value, (float, builtins.int)):
            raise _type_error("double", value)
        return cls("double", float(value))

    @classmethod
    def bool(cls, value: builtins.bool) -> AttributeValue:
        """A boolean."""
        if not isinstance(value, builtins.bool):
            raise _type_error("bool", value)
        return cls("bool", value)

    @classmethod
    def bytes(cls, value: builtins.bytes | bytearray | memoryview) -> AttributeValue:
        """Raw bytes (``bytearray`` and ``memoryview`` are copied to ``bytes``)."""
        if not isinstance(value, (builtins.bytes, bytearray, memoryview)):
            raise _type_error("bytes", value)
        return cls("bytes", builtins.bytes(value))

    @classmethod
    def array(cls, values: Iterable[AttributeValue | PlainValue]) -> AttributeValue:
        """An array; each element is an ``AttributeValue`` or a plain value."""
        if isinstance(values, (str, builtins.bytes, bytearray)) or not isinstance(values, Iterable):
            raise _type_error("array", values)
        return cls("array", tuple(cls.from_python(v) for v in values))

    @classmethod
    def from_python(cls, value: AttributeValue | PlainValue) -> AttributeValue:
        """Wrap a plain Python value (an ``AttributeValue`` is returned unchanged)."""
        if isinstance(value, AttributeValue):
            return value
        # bool before int: bool is a subclass of int.
        if isinstance(value, builtins.bool):
            return cls.bool(value)
        if isinstance(value, str):
            return cls.string(value)
        if isinstance(value, builtins.int):
            return cls.int(value)
        if isinstance(value, float):
            return cls.double(value)
        if isinstance(value, (builtins.bytes, bytearray, memoryview)):
            return cls.bytes(value)
        if isinstance(value, (list, tuple)):
            return cls.array(value)
        raise _type_error("attribute value", value)

    def to_python(self) -> object:
        """The plain Python value (arrays become lists)."""
        if isinstance(self.value, tuple):
            return [v.to_python() for v in self.value]
        return self.value

    def to_proto(self) -> AnyValue:
        """The OTLP ``AnyValue`` message."""
        v = self.value
        if isinstance(v, tuple):
            return AnyValue(array_value=ArrayValue(values=[e.to_proto() for e in v]))
        field: dict[str, Any] = {_PROTO_FIELD[self.kind]: v}
        return AnyValue(**field)

    @classmethod
    def from_proto(cls, any_value: AnyValue) -> AttributeValue | None:
        """Read an ``AnyValue`` back; None for an unset value or a kvlist (not supported)."""
        which = any_value.WhichOneof("value")
        if which == "string_value":
            return cls("string", any_value.string_value)
        if which == "int_value":
            return cls("int", any_value.int_value)
        if which == "double_value":
            return cls("double", any_value.double_value)
        if which == "bool_value":
            return cls("bool", any_value.bool_value)
        if which == "bytes_value":
            return cls("bytes", any_value.bytes_value)
        if which == "array_value":
            items = [cls.from_proto(e) for e in any_value.array_value.values]
            return cls("array", tuple(i for i in items if i is not None))
        return None

    def __repr__(self) -> str:
        return f"AttributeValue.{self.kind}({self.to_python()!r})"
