"""The ``with`` / ``async with`` protocol shared by the standalone profilers."""

from __future__ import annotations

from types import TracebackType
from typing import Any, TypeVar

P = TypeVar("P", bound="ProfilerContext")


class ProfilerContext:
    """Start on enter, stop on exit (unless already stopped, e.g. by ``max_duration``).

    Subclasses provide ``start()``, ``stop()`` and a ``running`` property.
    """

    running: Any

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self: P) -> P:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.running:
            self.stop()

    async def __aenter__(self: P) -> P:
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.running:
            self.stop()
