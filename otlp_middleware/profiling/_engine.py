"""The process-wide CPU sampling machinery: scopes, tiers, and the samples they collect.

A *scope* says what to profile: a thread (sync code) or a root frame on one thread (an asyncio
task's coroutine; a sample belongs to it only if that frame is on the sampled stack). Any
number of scopes may be open at once, nested or in parallel; each receives only its samples.

Samples are taken by one of three tiers, chosen per thread and reported per sample:

``signal``
    ``setitimer(ITIMER_PROF)`` delivers SIGPROF; Python runs the handler on the main thread at
    the next bytecode boundary, with the interrupted frame. Exact for the main thread, which
    is where uvicorn's event loop and gunicorn's sync workers serve requests. Armed only while
    a main-thread scope is open; the remaining countdown is kept across disarm/re-arm, so
    requests shorter than the period are still sampled in proportion to their CPU time.
``native``
    (optional C extension) a CPU-time timer per thread whose handler copies the interrupted
    thread's own stack: exact on every thread.
``thread``
    a sampler thread that reads ``sys._current_frames()``. It runs only when it holds the GIL,
    so for CPU-bound code it sees the sampled thread at GIL-release points: lower accuracy,
    used where the other tiers cannot run (non-main threads without the extension, or when
    signals are unavailable or SIGPROF is taken by the application).

CPU weight: a SIGPROF sample stands for the main thread's CPU time since the previous tick
(read from its CPU clock, capped at the period), so a tick that other threads earned while the
main thread idled weighs ~0 and is dropped. Threads sampled by the sampler thread have a
*scoped CPU clock* (their CPU clock counted only while inside a scope); each sample is weighted
by how far it advanced, so CPU totals telescope to the exact scoped CPU time. Off-CPU (wall)
samples, for scopes with ``include_system_calls``, are taken by the sampler thread: a blocked
thread sits at its blocking call, which is exactly what ``sys._current_frames()`` shows.

Nothing runs while no scope is open: no timer, no sampler thread. After ``fork()`` the child
starts with a clean engine (``os.register_at_fork``).
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import random
import signal
import sys
import threading
import time
import weakref
from collections.abc import Callable
from types import FrameType
from typing import Any

from ..config import OTLP_MIDDLEWARE_CPU_SAMPLER
from ..types import CpuSample
from ._frames import FRAMES, capture_stack, truncate, truncated_marker

logger = logging.getLogger(__name__)

DEFAULT_MAX_DEPTH = 128

_HAS_SIGPROF = hasattr(signal, "SIGPROF") and hasattr(signal, "setitimer")
_random = random.Random().random

METHODS = ("auto", "native", "signal", "thread")
NATIVE_CAPACITY = 8192  # samples the native ring holds between drains
COLLECT_INTERVAL = 0.25  # seconds between drains of the native ring while scopes are open


def _load_native() -> Any:
    """The native sampler module, or None where it was not built or cannot load."""
    try:
        from . import _cpu_native
    except ImportError as exc:
        logger.debug("otlp_middleware: native CPU sampler unavailable: %s", exc)
        return None
    return _cpu_native


def _method_from_environ() -> str:
    value = os.environ.get(OTLP_MIDDLEWARE_CPU_SAMPLER, "auto").strip().lower() or "auto"
    if value not in METHODS:
        logger.warning(
            "otlp_middleware: %s=%r is not one of %s; using auto",
            OTLP_MIDDLEWARE_CPU_SAMPLER,
            value,
            ", ".join(METHODS),
        )
        return "auto"
    return value


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


_errors = RateLimitedLog(logger)


class Scope:
    """One open profiling scope and the samples it collected.

    Created by ``ENGINE.open_thread_scope`` / ``ENGINE.open_frame_scope``; closed with
    ``ENGINE.close(scope)``. ``samples`` is a deque appended from the sampling tiers (an
    atomic operation, safe from a signal handler).
    """

    __slots__ = (
        "__weakref__",
        "closed_ns",
        "deadline_ns",
        "include_system_calls",
        "max_depth",
        "methods",
        "native_tier",
        "opened_mono_ns",
        "opened_ns",
        "period_ns",
        "root_frame",
        "samples",
        "signal_tier",
        "swept",
        "thread_id",
    )

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
        self.root_frame = root_frame
        self.period_ns = period_ns
        self.include_system_calls = include_system_calls
        self.max_depth = max_depth
        self.samples: collections.deque[CpuSample] = collections.deque()
        self.methods: dict[str, int] = {}
        self.opened_ns = time.time_ns()
        self.opened_mono_ns = time.monotonic_ns()
        self.deadline_ns = self.opened_mono_ns + max_duration_ns if max_duration_ns else None
        self.closed_ns: int | None = None
        self.native_tier = False  # sampled by the native tier (set by the engine)
        self.signal_tier = False  # sampled by the SIGPROF tier (set by the engine)
        self.swept = False  # sampled by the sampler thread (CPU or off-CPU wall time)

    def record(self, sample: CpuSample, method: str) -> None:
        if self.closed_ns is not None:
            return
        if self.deadline_ns is not None and time.monotonic_ns() > self.deadline_ns:
            return
        self.samples.append(sample)
        self.methods[method] = self.methods.get(method, 0) + 1

    @property
    def duration_ns(self) -> int:
        end = self.closed_ns if self.closed_ns is not None else time.time_ns()
        d = end - self.opened_ns
        if self.deadline_ns is not None:
            d = min(d, self.deadline_ns - self.opened_mono_ns)
        return max(d, 0)


class _ThreadClock:
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


class _ThreadEntry:
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


def _thread_cpu_clock() -> int | None:
    try:
        return time.pthread_getcpuclockid(threading.get_ident())
    except (AttributeError, OSError):
        return None


class Engine:
    """Owns every open scope and the tiers that sample them. One per process: ``ENGINE``."""

    def __init__(self) -> None:
        self._method = _method_from_environ()
        self._native_module = _load_native()
        if self._method == "native" and self._native_module is None:
            logger.warning(
                "otlp_middleware: %s=native but the native sampler is not built; falling back",
                OTLP_MIDDLEWARE_CPU_SAMPLER,
            )
        self._init_state()
        self.clock: Callable[[], int] = time.time_ns
        if hasattr(os, "register_at_fork"):
            ref = weakref.WeakMethod(self._after_fork_in_child)

            def _child() -> None:
                method = ref()
                if method is not None:
                    method()

            os.register_at_fork(after_in_child=_child)

    def _init_state(self) -> None:
        self._lock = threading.Lock()
        # tid -> _ThreadEntry; replaced wholesale under _lock, read lock-free by the tiers.
        self._entries: dict[int, _ThreadEntry] = {}
        self._clocks: dict[int, _ThreadClock] = {}
        self._main_tid = threading.main_thread().ident
        self._open = 0
        self._timer_armed = False
        self._timer_period_ns = 0
        self._timer_interval_ns = 0  # the (jittered) countdown armed last
        self._timer_remaining = 0.0
        self._handler_installed = False
        self._handler_checked = 0.0
        self._signal_periods: dict[int, int] = {}
        self._sweep_periods: dict[int, int] = {}
        self._signal_refused: str | None = None
        self._in_handler = False
        self._sweeper: _Sweeper | None = None
        # --- native tier
        self._native: Any = self._native_module if self._method in ("auto", "native") else None
        self._native_periods: dict[int, int] = {}
        self._native_hz = 0.0
        self._tokens: dict[int, tuple[int, str, tuple[Scope, ...]]] = {}
        self._retired_tokens: list[int] = []
        self._thread_tokens: dict[int, int] = {}  # tid -> current token of its thread scopes
        self._root_tokens: dict[int, int] = {}  # id(root frame) -> current token
        self._token_counter = itertools.count(1)
        self._collector: _Collector | None = None

    # ------------------------------------------------------------------ introspection
    @property
    def open_scopes(self) -> int:
        return self._open

    @property
    def sampler_thread_running(self) -> bool:
        return self._sweeper is not None

    @property
    def timer_armed(self) -> bool:
        return self._timer_armed

    @property
    def method(self) -> str:
        """The configured tier preference: auto, native, signal or thread."""
        return self._method

    @property
    def native_available(self) -> bool:
        return self._native_module is not None

    def set_method(self, method: str) -> None:
        """Choose the sampling tier (``auto``, ``native``, ``signal``, ``thread``).

        Only while no scope is open; for troubleshooting, tests and benchmarks.
        """
        if method not in METHODS:
            raise ValueError(f"method={method!r}: must be one of {', '.join(METHODS)}")
        with self._lock:
            if self._open:
                raise RuntimeError("set_method(): scopes are open")
            self._method = method
            self._native = self._native_module if method in ("auto", "native") else None

    def method_for(self, tid: int) -> str:
        """The tier that samples CPU on thread ``tid`` right now."""
        if self._native is not None:
            return "native"
        if self._method == "thread":
            return "thread"
        if tid == self._main_tid and _HAS_SIGPROF and self._signal_refused is None:
            return "signal"
        return "thread"

    # ------------------------------------------------------------------ scopes
    def open_thread_scope(
        self,
        *,
        period_ns: int,
        include_system_calls: bool = False,
        max_duration_ns: int | None = None,
        max_depth: int = DEFAULT_MAX_DEPTH,
    ) -> Scope:
        """Profile the calling thread until ``close``."""
        scope = Scope(
            thread_id=threading.get_ident(),
            root_frame=None,
            period_ns=period_ns,
            include_system_calls=include_system_calls,
            max_duration_ns=max_duration_ns,
            max_depth=max_depth,
        )
        self._add(scope)
        return scope

    def open_child_scope(self, parent: Scope) -> Scope:
        """Profile the calling thread on behalf of ``parent`` (work offloaded to a thread).

        The child shares the parent's sample store and settings, so its samples land in
        the parent's profile; close it when the offloaded call returns.
        """
        scope = Scope(
            thread_id=threading.get_ident(),
            root_frame=None,
            period_ns=parent.period_ns,
            include_system_calls=parent.include_system_calls,
            max_duration_ns=None,
            max_depth=parent.max_depth,
        )
        scope.samples = parent.samples
        scope.methods = parent.methods
        scope.deadline_ns = parent.deadline_ns
        self._add(scope)
        return scope

    def open_frame_scope(
        self,
        root_frame: FrameType,
        *,
        period_ns: int,
        include_system_calls: bool = False,
        max_duration_ns: int | None = None,
        max_depth: int = DEFAULT_MAX_DEPTH,
    ) -> Scope:
        """Profile whatever runs below ``root_frame`` on the calling thread (asyncio tasks)."""
        scope = Scope(
            thread_id=threading.get_ident(),
            root_frame=root_frame,
            period_ns=period_ns,
            include_system_calls=include_system_calls,
            max_duration_ns=max_duration_ns,
            max_depth=max_depth,
        )
        self._add(scope)
        return scope

    def _add(self, scope: Scope) -> None:
        tid = scope.thread_id
        with self._lock:
            entries = self._entries
            old = entries.get(tid)
            if old is None:
                entry = _ThreadEntry(tid, threading.current_thread().name, (), {})
                if tid != self._main_tid or tid not in self._clocks:
                    # A fresh clock: thread idents are reused after a thread ends, and a
                    # reused ident must not inherit a dead thread's CPU clock.
                    self._clocks[tid] = _ThreadClock(_thread_cpu_clock())
            else:
                entry = _ThreadEntry(tid, old.name, old.thread_scopes, old.roots)
            if scope.root_frame is None:
                entry.thread_scopes = (*entry.thread_scopes, scope)
            else:
                key = id(scope.root_frame)
                roots = dict(entry.roots)
                roots[key] = (*roots.get(key, ()), scope)
                entry.roots = roots
            entries = entries.copy()
            entries[tid] = entry
            self._entries = entries
            self._open += 1
            self._assign_tier(scope)

    def close(self, scope: Scope) -> None:
        """Stop collecting for ``scope``. Idempotent; safe after fork (a no-op there)."""
        closed_ns = time.time_ns()
        with self._lock:
            self._remove(scope)  # drains the native ring into the scope first
        if scope.closed_ns is None:
            scope.closed_ns = closed_ns

    def _remove(self, scope: Scope) -> None:
        tid = scope.thread_id
        old = self._entries.get(tid)
        if old is None:
            return
        if scope.root_frame is None:
            if scope not in old.thread_scopes:
                return
            thread_scopes = tuple(s for s in old.thread_scopes if s is not scope)
            roots = old.roots
        else:
            key = id(scope.root_frame)
            group = old.roots.get(key, ())
            if scope not in group:
                return
            roots = dict(old.roots)
            rest = tuple(s for s in group if s is not scope)
            if rest:
                roots[key] = rest
            else:
                del roots[key]
            thread_scopes = old.thread_scopes
        root = scope.root_frame
        scope.root_frame = None  # do not keep the coroutine's frame alive
        entries = self._entries.copy()
        if thread_scopes or roots:
            entries[tid] = _ThreadEntry(tid, old.name, thread_scopes, roots)
        else:
            del entries[tid]
            if tid == self._main_tid:
                self._clocks[tid].stop()
            else:
                self._clocks.pop(tid, None)
        self._entries = entries
        self._open -= 1
        if scope.native_tier:
            self._release_native(scope, root)
        self._release_tier(scope)

    # ------------------------------------------------------------------ tiers
    def _signal_usable(self) -> bool:
        return self._handler_installed and self._signal_refused is None

    def _assign_tier(self, scope: Scope) -> None:
        """Route a new scope to its tiers; arm the timer / start the sampler thread if needed.

        Called with ``_lock`` held. Per-tier period counts (period -> open scopes) make this
        O(1) in the number of open scopes: it runs on the request path.
        """
        if self._native is not None and self._assign_native(scope):
            scope.native_tier = True
            scope.swept = scope.include_system_calls
            if scope.swept:
                clock = self._clocks[scope.thread_id]
                if clock.open_since is None:
                    clock.start()
                self._add_swept(scope)
            return
        scope.signal_tier = (
            self._method != "thread"
            and scope.thread_id == self._main_tid
            and self._ensure_handler()
        )
        if scope.signal_tier:
            periods = self._signal_periods
            periods[scope.period_ns] = periods.get(scope.period_ns, 0) + 1
            period = min(periods) if len(periods) > 1 else scope.period_ns
            if not self._timer_armed or period != self._timer_period_ns:
                self._arm_timer(period)
        scope.swept = not scope.signal_tier or scope.include_system_calls
        if not scope.signal_tier:
            # The sampler thread weighs samples by the thread's scoped CPU clock.
            clock = self._clocks[scope.thread_id]
            if clock.open_since is None:
                clock.start()
        if scope.swept:
            self._add_swept(scope)

    def _add_swept(self, scope: Scope) -> None:
        periods = self._sweep_periods
        periods[scope.period_ns] = periods.get(scope.period_ns, 0) + 1
        period = min(periods)
        if self._sweeper is None:
            self._sweeper = _Sweeper(self, period)
            self._sweeper.start()
        else:
            self._sweeper.period_ns = period

    # ------------------------------------------------------------------ native tier
    def _assign_native(self, scope: Scope) -> bool:
        """Register ``scope`` with the native sampler; False if it cannot take it."""
        native = self._native
        periods = self._native_periods
        periods[scope.period_ns] = periods.get(scope.period_ns, 0) + 1
        hz = 1e9 / min(periods)
        try:
            if not native.is_started():
                native.start(hz, NATIVE_CAPACITY)
                self._native_hz = hz
            elif hz != self._native_hz:
                native.set_frequency(hz)
                self._native_hz = hz
            tid = scope.thread_id
            if scope.root_frame is not None:
                self._register_root(tid, id(scope.root_frame), scope.root_frame)
                # A root scope needs the thread armed, not a new thread token.
                if tid not in self._thread_tokens and threading.get_ident() == tid:
                    self._rearm_thread(tid)
            elif threading.get_ident() == tid:
                self._rearm_thread(tid)
        except RuntimeError as exc:  # e.g. the signal is taken by the application
            _decrement(periods, scope.period_ns)
            logger.warning("otlp_middleware: native CPU sampler unusable (%s); falling back", exc)
            self._native = None
            return False
        if self._collector is None:
            self._collector = _Collector(self)
        self._collector.wake()
        return True

    def _new_token(self, tid: int, scopes: tuple[Scope, ...]) -> int:
        token = next(self._token_counter)
        entry = self._entries.get(tid)
        self._tokens[token] = (tid, entry.name if entry else "", scopes)
        return token

    def _retire(self, token: int | None) -> None:
        # Samples already in the ring may carry the old token: forget it after the next drain.
        if token is not None:
            self._retired_tokens.append(token)

    def _rearm_thread(self, tid: int) -> None:
        entry = self._entries.get(tid)
        if entry is None:
            self._native.disarm_thread()
            self._retire(self._thread_tokens.pop(tid, None))
            return
        token = self._new_token(tid, entry.thread_scopes)
        self._native.arm_thread(token)
        self._retire(self._thread_tokens.get(tid))
        self._thread_tokens[tid] = token

    def _register_root(self, tid: int, key: int, frame: FrameType | None) -> None:
        entry = self._entries.get(tid)
        group = entry.roots.get(key, ()) if entry is not None else ()
        old = self._root_tokens.pop(key, None)
        if group:
            token = self._new_token(tid, group)
            self._native.add_root(frame if frame is not None else group[0].root_frame, token)
            self._root_tokens[key] = token
        elif frame is not None:
            self._native.remove_root(frame)
        self._retire(old)

    def _release_native(self, scope: Scope, root: FrameType | None) -> None:
        self.collect()  # take the closing scope's samples while its tokens are known
        tid = scope.thread_id
        if root is not None:
            self._register_root(tid, id(root), root)
        if threading.get_ident() == tid and (root is None or tid not in self._entries):
            self._rearm_thread(tid)
        _decrement(self._native_periods, scope.period_ns)
        if self._native_periods and 1e9 / min(self._native_periods) != self._native_hz:
            self._native_hz = 1e9 / min(self._native_periods)
            self._native.set_frequency(self._native_hz)

    def collect(self) -> None:
        """Move the native sampler's recorded samples into their scopes (needs the GIL)."""
        native = self._native
        if native is None or not native.is_started():
            return
        samples = native.drain()
        if samples:
            tokens = self._tokens
            intern = FRAMES.intern
            max_native_depth = native.MAX_DEPTH
            for thread_token, root_tokens, _native_tid, cpu_ns, ts, frames in samples:
                owner = tokens.get(thread_token)
                groups = [owner] if owner is not None and owner[2] else []
                for rt in root_tokens:
                    g = tokens.get(rt)
                    if g is not None:
                        groups.append(g)
                if not groups:
                    continue
                stack = tuple(intern(n, f, first, line) for n, f, first, line in frames)
                if len(stack) >= max_native_depth:
                    stack += (truncated_marker(1),)
                tid, name = groups[0][0], groups[0][1]
                sample = CpuSample(stack, tid, name, cpu_ns, cpu_ns, ts)
                for _, _, scopes in groups:
                    for s in scopes:
                        if len(stack) > s.max_depth:
                            s.record(sample._replace(stack=truncate(stack, s.max_depth)), "native")
                        else:
                            s.record(sample, "native")
        if self._retired_tokens:
            retired, self._retired_tokens = self._retired_tokens, []
            for token in retired:
                self._tokens.pop(token, None)

    def _release_tier(self, scope: Scope) -> None:
        if scope.signal_tier:
            periods = self._signal_periods
            _decrement(periods, scope.period_ns)
            if not periods:
                if self._timer_armed:
                    self._disarm_timer()
            elif min(periods) != self._timer_period_ns:
                self._arm_timer(min(periods))
        if scope.swept:
            periods = self._sweep_periods
            _decrement(periods, scope.period_ns)
            if not periods:
                if self._sweeper is not None:
                    self._sweeper.stop()
                    self._sweeper = None
            elif self._sweeper is not None:
                self._sweeper.period_ns = min(periods)

    def _ensure_handler(self) -> bool:
        """True if our SIGPROF handler is in place (installing it if possible)."""
        if not _HAS_SIGPROF:
            return False
        if self._handler_installed:
            # Re-check at most once a second that the application did not replace it.
            now = time.monotonic()
            if now - self._handler_checked < 1.0:
                return True
            self._handler_checked = now
            if signal.getsignal(signal.SIGPROF) == self._on_sigprof:
                return True
            self._handler_installed = False
        return self._install_handler()

    def _install_handler(self) -> bool:
        if threading.current_thread() is not threading.main_thread():
            return False  # signal.signal() works only on the main thread; retried later
        try:
            current = signal.getsignal(signal.SIGPROF)
            if current not in (signal.SIG_DFL, signal.SIG_IGN, None):
                return self._refuse(f"SIGPROF already has a handler ({current!r})")
            delay, _ = signal.getitimer(signal.ITIMER_PROF)
            if delay:
                return self._refuse("ITIMER_PROF is already armed by someone else")
            signal.signal(signal.SIGPROF, self._on_sigprof)
            # Restart interrupted system calls instead of failing them with EINTR.
            signal.siginterrupt(signal.SIGPROF, False)
        except (ValueError, OSError) as exc:  # not the main interpreter, ...
            return self._refuse(f"signals unavailable: {exc}")
        self._handler_installed = True
        self._signal_refused = None
        return True

    def _refuse(self, reason: str) -> bool:
        # Checked again at the next scope opened on the main thread; logged once per reason.
        if reason != self._signal_refused:
            logger.warning(
                "otlp_middleware: not using SIGPROF: %s. The main thread's CPU samples come "
                "from a sampler thread, which places CPU-bound code at GIL-release points.",
                reason,
            )
        self._signal_refused = reason
        return False

    def _arm_timer(self, period_ns: int) -> None:
        interval = period_ns / 1e9
        first = self._timer_remaining if self._timer_remaining > 0 else interval
        first = min(first, interval)
        signal.setitimer(signal.ITIMER_PROF, first, interval)
        self._timer_interval_ns = max(round(first * 1e9), period_ns)
        self._timer_armed = True
        self._timer_period_ns = period_ns

    def _disarm_timer(self) -> None:
        # Keep the countdown: the next request continues it, so short requests are sampled.
        remaining, _ = signal.setitimer(signal.ITIMER_PROF, 0, 0)
        self._timer_remaining = remaining
        self._timer_armed = False

    def uninstall(self) -> None:
        """Restore SIGPROF's default disposition (only when no scope is open).

        Called at interpreter exit and by tests; a later scope installs the handler again.
        """
        with self._lock:
            if self._open:
                return
            if self._collector is not None:
                self._collector.stop()
                self._collector = None
            if self._native is not None and self._native.is_started():
                self._native.stop()
                self._tokens.clear()
                self._thread_tokens.clear()
                self._root_tokens.clear()
                self._retired_tokens.clear()
            if self._handler_installed and threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGPROF, signal.SIG_DFL)
                self._handler_installed = False

    def _on_sigprof(self, signum: int, frame: FrameType | None) -> None:
        if self._in_handler:
            return
        self._in_handler = True
        try:
            tid = self._main_tid
            entry = self._entries.get(tid) if tid is not None else None
            if entry is None or frame is None:
                return
            clock = self._clocks.get(entry.tid)
            if clock is None:
                return
            # The timer counts the process's CPU time while a main-thread scope is open. The
            # sample stands for the main thread's share: its CPU since the previous tick,
            # capped at the period (it may include time between requests). A tick earned by
            # other threads while the main thread idled weighs ~0 and is dropped.
            raw = clock.raw()
            period = self._timer_period_ns
            elapsed = raw - clock.tick_mark
            clock.tick_mark = raw
            delta = min(elapsed, 2 * period)
            if self._timer_armed:
                # Jitter the next expiry (mean = the period) so sampling cannot phase-lock
                # with periodic work and put every sample in the same function. CPU timers
                # fire on the kernel's tick, so expiries come late; the lateness is taken off
                # the next countdown to keep the mean rate at the configured frequency.
                late = max(elapsed - self._timer_interval_ns, 0)
                target = round(period * (0.5 + _random()))
                self._timer_interval_ns = max(target - late, period // 10)
                signal.setitimer(signal.ITIMER_PROF, self._timer_interval_ns / 1e9, period / 1e9)
            if delta <= self._timer_period_ns // 50:
                return
            self._dispatch(entry, frame, delta, delta, "signal")
        except Exception:
            _errors.exception("otlp_middleware: sampling failed in the SIGPROF handler")
        finally:
            self._in_handler = False

    def _dispatch(
        self, entry: _ThreadEntry, frame: FrameType, cpu_ns: int, wall_ns: int, method: str
    ) -> None:
        scopes_by_root = entry.roots
        depth = max(s.max_depth for s in entry.scopes)
        stack, matched = capture_stack(frame, depth, scopes_by_root or None)
        sample = CpuSample(stack, entry.tid, entry.name, cpu_ns, wall_ns, self.clock())
        for s in entry.thread_scopes:
            s.record(sample, method)
        for group in matched:
            for s in group:
                s.record(sample, method)

    def _sweep(self, own_tid: int, elapsed_ns: int) -> None:
        """One tick of the sampler thread (runs with the GIL, in the sweeper thread)."""
        entries = self._entries
        if not entries:
            return
        frames = sys._current_frames()
        for tid, entry in entries.items():
            if tid == own_tid:
                continue
            frame = frames.get(tid)
            clock = self._clocks.get(tid)
            if frame is None or clock is None:
                continue
            scopes = entry.scopes
            # CPU samples only for scopes no exact tier covers (they would count twice).
            cpu_scopes = [s for s in scopes if not s.native_tier and not s.signal_tier]
            if cpu_scopes:
                delta = clock.take_delta()
                if delta > 0:
                    self._dispatch_to(entry, frame, delta, delta, cpu_scopes)
            wall_scopes = [s for s in scopes if s.include_system_calls]
            if wall_scopes:
                raw = clock.raw()
                busy = raw - clock.raw_wall_mark
                clock.raw_wall_mark = raw
                if busy < elapsed_ns // 2:  # mostly off-CPU since the last tick
                    self._dispatch_to(entry, frame, 0, elapsed_ns, wall_scopes)

    def _dispatch_to(
        self,
        entry: _ThreadEntry,
        frame: FrameType,
        cpu_ns: int,
        wall_ns: int,
        scopes: list[Scope],
    ) -> None:
        """Record one sampler-thread sample into those of ``scopes`` that own the stack."""
        depth = max(s.max_depth for s in scopes)
        stack, matched = capture_stack(frame, depth, entry.roots or None)
        sample = CpuSample(stack, entry.tid, entry.name, cpu_ns, wall_ns, self.clock())
        owners = {id(s) for s in entry.thread_scopes}
        for group in matched:
            owners.update(id(s) for s in group)
        for s in scopes:
            if id(s) in owners:
                s.record(sample, "thread")

    # ------------------------------------------------------------------ fork
    def _after_fork_in_child(self) -> None:
        sweeper = self._sweeper
        collector = self._collector
        self._init_state()
        if sweeper is not None:
            sweeper.forget()
        if collector is not None:
            collector.forget()
        if self._native_module is not None:
            self._native_module._after_fork_child()
        # The SIGPROF handler is inherited; interval timers are not (POSIX).
        self._handler_installed = _HAS_SIGPROF and signal.getsignal(signal.SIGPROF) == getattr(
            self, "_on_sigprof", None
        )


class _Sweeper:
    """The sampler thread: wakes every period while it is needed, never otherwise."""

    def __init__(self, engine: Engine, period_ns: int) -> None:
        self._engine = engine
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
                _errors.exception("otlp_middleware: the sampler thread failed")
            last = now


def _decrement(counts: dict[int, int], key: int) -> None:
    left = counts.get(key, 0) - 1
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)


class _Collector:
    """Drains the native sampler's ring every ``COLLECT_INTERVAL`` while native scopes are open.

    One thread, created with the first native scope. While no native scope is open it blocks
    on an event (no wake-ups); closing scopes drain the ring themselves, so short requests
    never wait for it.
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._active = threading.Event()
        self._stopped = False
        self._thread = threading.Thread(
            target=self._run, name="otlp-middleware-collector", daemon=True
        )
        self._thread.start()

    def wake(self) -> None:
        if not self._active.is_set():
            self._active.set()

    def stop(self) -> None:
        self._stopped = True
        self._active.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=1.0)

    def forget(self) -> None:
        self._stopped = True

    def _run(self) -> None:
        engine = self._engine
        while True:
            self._active.wait()
            if self._stopped:
                return
            time.sleep(COLLECT_INTERVAL)
            if self._stopped:
                return
            with engine._lock:
                try:
                    engine.collect()
                except Exception:
                    _errors.exception("otlp_middleware: draining native samples failed")
                if not engine._native_periods:
                    self._active.clear()


ENGINE = Engine()
"""The process-wide engine."""
