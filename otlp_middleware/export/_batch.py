"""The background batching queue between the request path and every exporter.

``emit`` is O(1) and never blocks: it appends to a bounded deque (a full queue drops the
record and counts it) and wakes the export thread only when a full batch is waiting. The
thread, started lazily on the first emit, exports a batch every ``schedule_delay`` seconds or
as soon as ``max_export_batch_size`` records wait. An exporter that merges records as they
come (``streaming``: ``FileExporter(aggregate=True)``, the OTLP ``ProfileExporter``) is
handed them every ``ABSORB_INTERVAL`` instead, and writes its window at the cadence of a
batch: the records are not held for seconds (``PprofWindow`` says why that matters).
``force_flush(timeout)`` and ``shutdown(timeout)`` honour their deadlines. Pending records
are flushed at interpreter exit, and a forked child gets a fresh, empty queue and starts its
own thread when it first emits (``os.register_at_fork`` through a ``WeakMethod``, as
OpenTelemetry's BatchProcessor does).
"""

from __future__ import annotations

import atexit
import collections
import functools
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..profiling._bell import Bell
from ..profiling._heap import PRIVATE_HEAP
from ..profiling._scope import RateLimitedLog
from ..types import ProfileRecord
from ._base import Exporter, ExportResult

logger = logging.getLogger(__name__)

ABSORB_INTERVAL = 1.0
"""Seconds records wait at most before a streaming exporter absorbs them: once a second,
so the export thread wakes seldom (each wake-up costs it some 100 us of CPU with cold
caches, and the app's thread its caches)."""


@dataclass(frozen=True)
class BatchStats:
    """Counters of the queue: what was accepted, exported, dropped or failed."""

    queued: int  # waiting right now
    emitted: int
    exported: int
    dropped: int  # queue full
    failed: int  # exporter reported failure or raised
    rejected: int  # refused by the receiver (partial success)
    retried: int


class BatchProcessor:
    """Queue + background thread feeding ``exporter`` in batches.

    Parameters:
        exporter: the sink (``FileExporter``, ``ProfileExporter``, or your own ``Exporter``).
        max_queue_size: records kept waiting at most; more are dropped and counted.
        max_export_batch_size: records per ``exporter.export`` call.
        schedule_delay: seconds between exports when the queue is not full.
        export_timeout: seconds ``shutdown`` gives the exporter to finish.

    The background thread calls the exporter in ``PRIVATE_HEAP`` (``profiling._heap``): the
    windows and files it builds come from the C allocator, not the app's allocator pools.

    Example::

        processor = BatchProcessor(FileExporter("profiles"))
        processor.emit(record)          # from the request path: O(1), never blocks
        processor.shutdown(timeout=5)
    """

    def __init__(
        self,
        exporter: Exporter,
        *,
        max_queue_size: int = 2048,
        max_export_batch_size: int = 512,
        schedule_delay: float = 5.0,
        export_timeout: float = 30.0,
    ) -> None:
        if max_queue_size < 1 or max_export_batch_size < 1:
            raise ValueError("max_queue_size and max_export_batch_size must be >= 1")
        if max_export_batch_size > max_queue_size:
            max_export_batch_size = max_queue_size
        self.exporter = exporter
        self.max_queue_size = max_queue_size
        self.max_export_batch_size = max_export_batch_size
        self.schedule_delay = schedule_delay
        self.export_timeout = export_timeout
        # An exporter that absorbs records between exports (``absorb``, ``pending``).
        self._stream = bool(getattr(exporter, "streaming", False))
        self._init_state()
        ref = weakref.WeakMethod(self._at_fork_child)
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=lambda: _call(ref))
        # A hook of its own (a partial compares by identity), so shutdown can remove exactly it.
        self._atexit_hook = functools.partial(_call, weakref.WeakMethod(self._at_exit))
        atexit.register(self._atexit_hook)

    def _init_state(self) -> None:
        self._queue: collections.deque[ProfileRecord] = collections.deque()
        # The export thread's wake-up takes the GIL back by a handoff (``profiling._bell``).
        self._wake = Bell()
        self._flush_requests: list[threading.Event] = []
        self._lock = threading.Lock()  # thread start/stop and flush requests, never emit
        # An exporter that raises (say a full disk) fails every batch: one traceback a minute.
        self._export_errors = RateLimitedLog(logger)
        self._thread: threading.Thread | None = None
        self._shutdown = False
        self._emitted = 0
        self._dropped = 0
        self._exported = 0
        self._failed = 0
        self._rejected = 0
        self._retried = 0
        # Streaming: emit wakes the export thread while it is idle (nothing queued), and
        # when the window it is building is to be written.
        self._idle = False
        self._write_at = 0.0

    # ------------------------------------------------------------------ request path
    def emit(self, record: ProfileRecord) -> bool:
        """Queue ``record`` for export. O(1), never blocks; False if it was dropped."""
        if self._shutdown:
            self._dropped += 1
            return False
        if len(self._queue) >= self.max_queue_size:
            self._dropped += 1
            return False
        self._queue.append(record)
        self._emitted += 1
        if self._thread is None:
            self._start()
        elif len(self._queue) >= self.max_export_batch_size:
            self._wake.set()
        elif self._idle and self._stream:
            self._idle = False
            self._wake.set()
        return True

    def _start(self) -> None:
        with self._lock:
            if self._thread is None and not self._shutdown:
                self._thread = threading.Thread(
                    target=self._run, name="otlp-middleware-exporter", daemon=True
                )
                self._thread.start()

    # ------------------------------------------------------------------ background
    def _run(self) -> None:
        if self._stream:
            self._run_streaming()
            return
        while True:
            self._wake.wait(self.schedule_delay)
            self._wake.clear()
            # Taken before the drain, so whatever was emitted before they were asked for is
            # exported before they are answered (a later one rings again).
            waiters, stopping = self._take_flush_requests()
            with PRIVATE_HEAP:
                self._drain(deadline=None)
            for w in waiters:
                w.set()
            if stopping:
                return

    def _take_flush_requests(self) -> tuple[list[threading.Event], bool]:
        """The flushes asked for so far, and whether shutdown was."""
        with self._lock:
            waiters, self._flush_requests = self._flush_requests, []
            return waiters, self._shutdown

    def _run_streaming(self) -> None:
        """Hand the queued records over as they come, at most every ``ABSORB_INTERVAL``;
        write the window when it is due (``schedule_delay`` after its first record), full,
        or a flush asks for it. Sleeps until ``emit`` wakes it while nothing waits."""
        exporter: Any = self.exporter
        while True:
            waiters, stopping = self._take_flush_requests()  # before the work, as in _run
            with PRIVATE_HEAP:
                self._absorb()
                if waiters or stopping:
                    self._write_window(everything=True)
                elif (
                    time.monotonic() >= self._write_at
                    or exporter.pending >= self.max_export_batch_size
                    or getattr(exporter, "window_full", False)
                ):
                    self._write_window()
            for w in waiters:
                w.set()
            if stopping:
                return
            # Records that come meanwhile wait for the next hand-over (emit does not ring).
            if self._wake.wait(ABSORB_INTERVAL):
                self._wake.clear()
            if self._queue or self._flush_wanted():
                continue
            self._idle = True  # emit rings from here on
            if not self._queue:
                wait = self._write_at - time.monotonic() if exporter.pending else None
                if wait is None or wait > 0:
                    self._wake.wait(self.schedule_delay if wait is None else wait)
                self._wake.clear()
            self._idle = False

    def _flush_wanted(self) -> bool:
        with self._lock:
            return bool(self._flush_requests) or self._shutdown

    def _absorb(self) -> None:
        """Hand the queued records to the streaming exporter (they are then its to keep)."""
        queue = self._queue
        if not queue:
            return
        pending = self.exporter.pending  # type: ignore[attr-defined]
        if not pending:
            self._write_at = time.monotonic() + self.schedule_delay
        # no more than a batch's worth in one window
        room = max(self.max_export_batch_size - pending, 1)
        batch = [queue.popleft() for _ in range(min(room, len(queue)))]
        try:
            self.exporter.absorb(batch)  # type: ignore[attr-defined]
        except Exception:
            self._failed += len(batch)
            self._export_errors.exception(
                "otlp_middleware: exporter %r failed", type(self.exporter).__name__
            )

    def _write_window(self, everything: bool = False) -> None:
        """Write the window, with what came since; ``everything`` queued (a flush, the
        shutdown), in as many windows as it takes."""
        while True:
            self._absorb()
            pending = self.exporter.pending  # type: ignore[attr-defined]
            if pending:
                self._export([], pending)
            if not (everything and self._queue):
                return

    def _drain(self, deadline: float | None) -> None:
        if self._stream:  # absorbing is quick: all of it, in windows of a batch at most
            self._write_window(everything=True)
            return
        while self._queue:
            if deadline is not None and time.monotonic() >= deadline:
                return
            batch: list[ProfileRecord] = []
            while self._queue and len(batch) < self.max_export_batch_size:
                batch.append(self._queue.popleft())
            self._export(batch)

    def _export(self, batch: list[ProfileRecord], absorbed: int = 0) -> None:
        """Export ``batch`` (and the ``absorbed`` records the exporter holds for it)."""
        total = len(batch) + absorbed
        try:
            result = self.exporter.export(batch)
        except Exception:
            self._failed += total
            self._export_errors.exception(
                "otlp_middleware: exporter %r failed", type(self.exporter).__name__
            )
            return
        if not isinstance(result, ExportResult):
            self._exported += total
            return
        self._exported += result.exported
        self._rejected += result.rejected
        self._retried += result.retries
        if not result.success:
            self._failed += total - result.exported - result.rejected

    # ------------------------------------------------------------------ control
    def force_flush(self, timeout: float = 30.0) -> bool:
        """Export everything queued now; True if done within ``timeout`` seconds."""
        if self._thread is None or not self._thread.is_alive():
            if self._queue or self._pending():
                self._drain(deadline=time.monotonic() + timeout)
            return not self._queue and not self._pending()
        done = threading.Event()
        with self._lock:
            self._flush_requests.append(done)
        self._wake.set()
        return done.wait(timeout)

    def shutdown(self, timeout: float = 30.0) -> None:
        """Flush what is queued, stop the thread and shut the exporter down, within timeout."""
        deadline = time.monotonic() + timeout
        with self._lock:
            if self._shutdown:
                return
            self._shutdown = True
            thread = self._thread
        self._wake.set()
        if thread is not None and thread.is_alive():
            thread.join(max(deadline - time.monotonic(), 0))
        elif self._queue or self._pending():
            self._drain(deadline)
        left = len(self._queue)
        if thread is None or not thread.is_alive():
            left += self._pending()  # else the thread may still be writing them
        if left:
            self._dropped += left
            logger.warning(
                "otlp_middleware: %d profile(s) not exported before the shutdown deadline",
                left,
            )
            self._queue.clear()
            if self._stream and (thread is None or not thread.is_alive()):
                self.exporter.drop_pending()  # type: ignore[attr-defined]  # counted above
        try:
            self.exporter.shutdown(max(deadline - time.monotonic(), 0.0))
        except Exception:
            logger.exception("otlp_middleware: exporter shutdown failed")
        s = self.stats()
        logger.info(
            "otlp_middleware: exporter stopped: %d exported, %d dropped, %d failed, "
            "%d rejected, %d retries",
            s.exported,
            s.dropped,
            s.failed,
            s.rejected,
            s.retried,
        )
        atexit.unregister(self._atexit_hook)

    @property
    def is_shutdown(self) -> bool:
        return self._shutdown

    def _pending(self) -> int:
        """Records a streaming exporter has absorbed and not written yet."""
        return int(self.exporter.pending) if self._stream else 0  # type: ignore[attr-defined]

    def stats(self) -> BatchStats:
        return BatchStats(
            queued=len(self._queue) + self._pending(),
            emitted=self._emitted,
            exported=self._exported,
            dropped=self._dropped,
            failed=self._failed,
            rejected=self._rejected,
            retried=self._retried,
        )

    def _at_exit(self) -> None:
        if not self._shutdown:
            self.shutdown(timeout=self.export_timeout)

    def _at_fork_child(self) -> None:
        # The parent's thread does not exist here and its queue belongs to the parent, as
        # do the records a streaming exporter absorbed.
        self._init_state()
        if self._stream:
            self.exporter.drop_pending()  # type: ignore[attr-defined]


def _call(ref: Callable[[], Callable[[], None] | None]) -> None:
    method = ref()
    if method is not None:
        method()
