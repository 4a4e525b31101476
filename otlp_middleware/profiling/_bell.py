"""``Bell``: the ``threading.Event`` the library's background threads wait on.

With the ``_handoff`` extension, a background thread that wakes up gets the GIL handed over
by the main thread instead of waiting for it: under load a server's main thread releases
and retakes the GIL around every system call, and each release would wake the waiting
thread for nothing (a context switch each, hundreds per second; see ``gil_handoff.c``).
Without the extension (no compiler, another platform) it is ``threading.Event``.
"""

from __future__ import annotations

import threading

try:
    from ._handoff import Bell, stats
except ImportError:  # not built: no compiler, not Linux
    Bell = threading.Event  # type: ignore[assignment,misc]

    def stats() -> dict[str, int]:
        return {"handoffs": 0, "fallbacks": 0}


__all__ = ["Bell", "stats"]
