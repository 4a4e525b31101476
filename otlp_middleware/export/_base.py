"""The exporter contract shared by the batching processor and every sink."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from ..types import ProfileRecord


@dataclass(frozen=True)
class ExportResult:
    """What one export call achieved.

    ``exported`` profiles were accepted, ``rejected`` were refused by the receiver (a partial
    success), ``retries`` counts the extra attempts made. ``success`` is False when the batch
    was lost (after retries, or on a non-retryable error).
    """

    success: bool
    exported: int = 0
    rejected: int = 0
    retries: int = 0
    error_message: str = ""


@runtime_checkable
class Exporter(Protocol):
    """A sink for closed profile records. Called only from the background export thread.

    ``export`` may block (network, disk) but must honour its own timeouts; ``shutdown``
    releases resources and must return within ``timeout`` seconds.
    """

    def export(self, records: Sequence[ProfileRecord]) -> ExportResult: ...

    def shutdown(self, timeout: float = 10.0) -> None: ...
