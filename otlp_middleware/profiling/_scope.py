"""Scopes and per-thread bookkeeping shared by the sampling tiers.

A ``Scope`` is what to profile and where its samples go; a ``ThreadEntry`` is the immutable
snapshot of the scopes open on one thread (replaced, never mutated, so signal handlers and
the sampler thread read it without locks); a ``ThreadClock`` is a thread's CPU clock counted
only while the thread is inside a scope.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from types import FrameType

from ..types import CpuSample

try:
    from ._cpu_native import ScopeCore
except ImportError:  # no extension: no code scope is ever made (no request watcher either)

    class ScopeCore:  # type: ignore[no-redef]
        """Stands in for the extension's C fields of a code scope where it is not built."""


DEFAULT_MAX_DEPTH = 128


class RateLimitedLog:
    """Log a repeated failure at most once per ``interval`` seconds, with a count."""

    def __init__(self, log: logging.Logger, interval: float = 60.0) -> None:
        self._log = log
        self._interval = interval
        self._last = -interval
        self.count = 0

    def exception(self, msg: str, *args: object) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self._last >= self._interval:
            self._last = now
            self._log.warning(msg + " (%d so far)", *args, self.count, exc_info=True)


class Scope:
    """One open profiling scope and the samples it collected.

    Created by ``ENGINE.open_thread_scope`` / ``ENGINE.open_frame_scope``; closed with
    ``ENGINE.close(scope)``. ``samples`` is a deque appended from the sampling tiers (an
    atomic operation, safe from a signal handler).

    One is made per profiled request, so it is cheap to make: no ``__slots__``, and what
    most scopes leave at its default is a class attribute, not set per instance.
    """

    closed_ns: int | None = None
    deadline_ns: int | None = None  # Unix time after which samples are not kept
    include_system_calls = False
    root_frame: FrameType | None = None
    native_tier = False  # sampled by the native tier (set by the engine)
    code_root = False  # a native root found by its code object (set by the engine)
    root_key = 0  # a code root's key in the engine's code roots (-id(frame))
    mark = -1  # a code root's reading of the extension's sample count when it opened
    quiet = False  # a code root: no sample at all was published between its open and end
    finish: Callable[[Scope], None] | None = None  # a released code root's (engine-called)
    signal_tier = False  # sampled by the SIGPROF tier (set by the engine)
    swept = False  # sampled by the sampler thread (CPU or off-CPU wall time)

    def __init__(
        self,
        *,
        thread_id: int,
        root_frame: FrameType | None,
        period_ns: int,
        include_system_calls: bool,
        max_duration_ns: int | None,
        max_depth: int,
    ) -> None:
        self.thread_id = thread_id
        if root_frame is not None:
            self.root_frame = root_frame
        self.period_ns = period_ns
        if include_system_calls:
            self.include_system_calls = True
        self.max_depth = max_depth
        self.samples: collections.deque[CpuSample] = collections.deque()
        self.methods: dict[str, int] = {}
        self.opened_ns = opened = time.time_ns()
        if max_duration_ns:
            self.deadline_ns = opened + max_duration_ns

    def record(self, sample: CpuSample, method: str) -> None:
        """Keep a sample taken now (while the scope is open)."""
        if self.closed_ns is not None:
            return
        self.take(sample, method)

    def take(self, sample: CpuSample, method: str) -> None:
        """Keep a sample its taker matched to this scope by time, even if it has closed."""
        if self.deadline_ns is not None and sample.timestamp_ns > self.deadline_ns:
            return
        self.samples.append(sample)
        self.methods[method] = self.methods.get(method, 0) + 1

    def sample_store(self) -> tuple[collections.deque[CpuSample], dict[str, int]]:
        """Where this scope's samples and their methods go (a child scope shares them)."""
        return self.samples, self.methods

    @property
    def duration_ns(self) -> int:
        end = self.closed_ns if self.closed_ns is not None else time.time_ns()
        if self.deadline_ns is not None:
            end = min(end, self.deadline_ns)
        return max(end - self.opened_ns, 0)


class CodeScope(ScopeCore, Scope):
    """The scope of an ASGI request's watcher (``Engine.request_scope``).

    Made without ``__init__``, only for a request that took samples or offloads work to
    threads. Its times, mark, ``quiet``, ``root_key`` and ``finish`` are C fields of the
    extension's ``ScopeCore``, not entries of the instance dict; ``samples`` and
    ``methods`` are empty placeholders of the class until the first ``take`` gives the
    scope its own.
    """

    native_tier = True
    code_root = True
    # Placeholders, never written: ``take`` replaces both before it keeps a sample (and the
    # deque, of length 0, would drop anything appended to it).
    samples: collections.deque[CpuSample] = collections.deque(maxlen=0)
    methods: dict[str, int] = {}

    def take(self, sample: CpuSample, method: str) -> None:
        if "samples" not in self.__dict__:
            self.sample_store()
        super().take(sample, method)

    def sample_store(self) -> tuple[collections.deque[CpuSample], dict[str, int]]:
        if "samples" not in self.__dict__:
            self.samples = collections.deque()
            self.methods = {}
        return self.samples, self.methods


class ThreadClock:
    """A thread's CPU clock counted only while the thread is inside a scope."""

    __slots__ = ("acc", "clock", "last_mark", "open_since", "raw_wall_mark", "tick_mark")

    def __init__(self, clock: int | None) -> None:
        self.clock = clock
        self.acc = 0
        self.open_since: int | None = None
        self.last_mark = 0
        self.raw_wall_mark = 0  # raw CPU reading at the previous off-CPU check
        self.tick_mark = 0  # raw CPU reading at the previous SIGPROF tick

    def raw(self) -> int:
        if self.clock is None:
            return 0
        try:
            return time.clock_gettime_ns(self.clock)
        except OSError:  # the thread is gone
            return 0

    def start(self) -> None:
        self.open_since = self.raw()

    def stop(self) -> None:
        if self.open_since is not None:
            self.acc += max(self.raw() - self.open_since, 0)
            self.open_since = None

    def take_delta(self) -> int:
        now = self.acc
        if self.open_since is not None:
            now += max(self.raw() - self.open_since, 0)
        delta = now - self.last_mark
        self.last_mark = now
        return delta


class ThreadEntry:
    """Immutable snapshot of what is open on one thread (replaced, never mutated)."""

    __slots__ = ("name", "roots", "thread_scopes", "tid")

    def __init__(
        self,
        tid: int,
        name: str,
        thread_scopes: tuple[Scope, ...],
        roots: dict[int, tuple[Scope, ...]],
    ) -> None:
        self.tid = tid
        self.name = name
        self.thread_scopes = thread_scopes
        self.roots = roots

    @property
    def scopes(self) -> tuple[Scope, ...]:
        out = self.thread_scopes
        for group in self.roots.values():
            out += group
        return out


def thread_cpu_clock() -> int | None:
    try:
        return time.pthread_getcpuclockid(threading.get_ident())
    except (AttributeError, OSError):
        return None


def decrement(counts: dict[int, int], key: int) -> None:
    left = counts.get(key, 0) - 1
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)
