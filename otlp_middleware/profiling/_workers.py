"""The engine's helper threads: the sampler thread and the native-ring collector.

Both exist only while the engine needs them and never wake up otherwise.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

from ._bell import Bell
from ._heap import PRIVATE_HEAP
from ._scope import RateLimitedLog

if TYPE_CHECKING:
    from ._engine import Engine

NATIVE_CAPACITY = 8192  # samples the native ring holds between drains

COLLECT_INTERVAL = 0.25  # seconds between drains of the native ring while scopes are open
BUSY_COLLECT_INTERVAL = 0.1  # ... after a drain that found the ring a quarter full or more
IDLE_TEARDOWN = 1.0  # seconds without native scopes before the native sampler is torn down


class Sweeper:
    """The sampler thread: wakes every period while it is needed, never otherwise."""

    def __init__(self, engine: Engine, period_ns: int) -> None:
        self._engine = engine
        self._errors = engine.errors
        self.period_ns = period_ns
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="otlp-middleware-sampler", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=1.0)

    def forget(self) -> None:
        """After fork: the thread does not exist in the child; nothing to join."""
        self._stop.set()

    def _run(self) -> None:
        own = threading.get_ident()
        last = time.monotonic_ns()
        while not self._stop.wait(self.period_ns / 1e9):
            now = time.monotonic_ns()
            try:
                self._engine._sweep(own, now - last)
            except Exception:
                self._errors.exception("otlp_middleware: the sampler thread failed")
            last = now


class Collector:
    """Drains the native sampler's ring every ``COLLECT_INTERVAL`` while native scopes are open.

    One thread, created with the first native scope. It also builds the records of the
    request scopes the ASGI path released (``Engine.release_request``). Each wake-up costs
    this thread over 100 us of CPU with cold caches (the GIL taken back, the drain, the
    records), yet once a second instead of four times did not pay (0.9996 [95% CI
    0.9963-1.0045] of the throughput, side by side) and made a process that exits while the
    sampler runs crash at exit in some 2% of runs (``test_native_engine``'s crash probe,
    four at once on two CPUs, Python 3.12: 4 of about 230, against none of 160 at 0.25 s),
    a fault not understood yet. (Before the records were made in the private heap, larger
    batches also cost the app more: 0.25 s against 1 s kept 1.0029 [1.0007-1.0060].) A ring
    found a quarter full shortens the next wait to ``BUSY_COLLECT_INTERVAL``. Closing thread
    scopes drain the ring themselves, so short requests never wait for it. Once no native scope
    has been open for ``IDLE_TEARDOWN`` seconds it tears the native sampler down (timers
    deleted, signal disposition restored) and blocks on an event: no wake-ups until the next
    scope. The grace period spares back-to-back requests a teardown and set-up each. Its
    drains and records are made in ``PRIVATE_HEAP``: out of the app's allocator pools.
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._errors: RateLimitedLog = engine.errors
        self._active = Bell()
        self.active = False  # mirrors _active; read and written under the engine lock
        self._stopped = False
        # Rung only by stop(): the waits between drains end early for it. Both waits take
        # the GIL back by a handoff (``_bell``), as the drain that follows needs it at once.
        self._stop_bell = Bell()
        self._thread = threading.Thread(
            target=self._run, name="otlp-middleware-collector", daemon=True
        )
        self._thread.start()

    def wake(self) -> None:
        """Start draining (called with the engine lock held)."""
        self.active = True
        self._active.set()

    def stop(self) -> None:
        self._stopped = True
        self._stop_bell.set()
        self._active.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=1.0)

    def forget(self) -> None:
        self._stopped = True

    def _run(self) -> None:
        engine = self._engine
        idle_since: float | None = None
        while True:
            self._active.wait()
            if self._stopped:
                return
            busy = engine._last_drained >= NATIVE_CAPACITY // 4
            self._stop_bell.wait(BUSY_COLLECT_INTERVAL if busy else COLLECT_INTERVAL)
            if self._stopped:
                return
            with PRIVATE_HEAP, engine._lock:
                try:
                    engine.collect()
                    if (
                        engine._native_periods
                        or engine._code_roots
                        or engine.open_watchers()
                        or engine.new_code_opens()
                    ):
                        idle_since = None
                    elif idle_since is None:
                        idle_since = time.monotonic()
                    elif time.monotonic() - idle_since >= IDLE_TEARDOWN:
                        engine.teardown_native()
                        idle_since = None
                        self.active = False
                        self._active.clear()
                except Exception:
                    self._errors.exception("otlp_middleware: draining native samples failed")
            with PRIVATE_HEAP:
                engine.run_finished()  # the released request scopes' records, without the lock
