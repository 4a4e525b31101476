"""Exceptions raised by otlp-middleware.

Every error a user can cause with bad input derives from one of these, so an application can
catch ``OtlpMiddlewareError`` to handle all of them.
"""

from __future__ import annotations

from typing import Any


class OtlpMiddlewareError(Exception):
    """Base class of every error raised by otlp-middleware."""


class ConfigurationError(OtlpMiddlewareError, ValueError):
    """An invalid setting: names the setting, the value given and what is allowed.

    It is a ``ValueError`` so code that validates input generically keeps working::

        try:
            CpuProfilerConfig(sampling_frequency=0)
        except ValueError as exc:
            print(exc)   # sampling_frequency=0: must be > 0 and <= 10000 Hz
    """

    def __init__(self, field: str, value: Any, allowed: str) -> None:
        self.field = field
        self.value = value
        self.allowed = allowed
        super().__init__(f"{field}={value!r}: {allowed}")


class ProfilerStateError(OtlpMiddlewareError, RuntimeError):
    """A profiler method called in the wrong state (start twice, stop before start, ...)."""
