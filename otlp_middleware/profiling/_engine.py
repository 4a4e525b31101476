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

CPU weight: a native sample carries the CPU its thread used since its previous sample; a
SIGPROF sample stands for the main thread's CPU time since the previous tick (read from its
CPU clock, capped at twice the period), so a tick that other threads earned while the main
thread idled weighs ~0 and is dropped. Threads sampled by the sampler thread have a *scoped CPU
clock* (their CPU clock counted only while inside a scope) and each sample is weighted by how
far it advanced, so CPU totals add up to the scoped CPU time up to the last tick (the CPU after
it, before the scope closed, is not attributed). Both timers are jittered (mean = the period) so
sampling cannot phase-lock with periodic work. Off-CPU (wall) samples, for scopes with
``include_system_calls``, are taken by the sampler thread: a blocked thread sits at its
blocking call, which is exactly what ``sys._current_frames()`` shows.

Nothing runs for long while no scope is open: the SIGPROF timer is disarmed and the sampler
thread stops with the last scope. A thread the native tier sampled stays armed between its
scopes (its samples outside any scope are dropped in the signal handler), which spares each
request two timer system calls; the native sampler and its collector are torn down, every
timer deleted, after a second without scopes. After ``fork()`` the child starts with a clean
engine (``os.register_at_fork``).

The request path (``open_root_scope`` and ``close`` of an async root scope on the native
tier) is kept lean: such a scope is kept out of the per-thread snapshots the other tiers
read; the ASGI middleware's lean calls (``lean_path``) take no lock and make no token at all
(``_native_tier.py``).
"""

from __future__ import annotations

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
from ._frames import capture_stack
from ._native_tier import NativeTier, load_native
from ._scope import (
    DEFAULT_MAX_DEPTH,
    RateLimitedLog,
    Scope,
    ThreadClock,
    ThreadEntry,
    decrement,
    thread_cpu_clock,
)
from ._workers import Sweeper

logger = logging.getLogger(__name__)

_HAS_SIGPROF = hasattr(signal, "SIGPROF") and hasattr(signal, "setitimer")
_random = random.Random().random

METHODS = ("auto", "native", "signal", "thread")
_LOAD: Any = object()  # Engine(): load the native extension


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


class Engine(NativeTier):
    """Owns every open scope and the tiers that sample them. One per process: ``ENGINE``."""

    def __init__(self, native_module: Any = _LOAD) -> None:
        """``native_module``: the native sampler extension (default: the built one, if any).

        A seam for tests; the process has one engine, ``ENGINE``.
        """
        self._method = _method_from_environ()
        self._native_module = load_native() if native_module is _LOAD else native_module
        if self._method == "native" and self._native_module is None:
            logger.warning(
                "otlp_middleware: %s=native but the native sampler is not built; falling back",
                OTLP_MIDDLEWARE_CPU_SAMPLER,
            )
        self.errors = RateLimitedLog(logger)
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
        # tid -> ThreadEntry; replaced wholesale under _lock, read lock-free by the tiers.
        self._entries: dict[int, ThreadEntry] = {}
        self._clocks: dict[int, ThreadClock] = {}
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
        self._sweeper: Sweeper | None = None
        self.init_native_state(self._native_module if self._method in ("auto", "native") else None)

    # ------------------------------------------------------------------ introspection
    @property
    def open_scopes(self) -> int:
        return self._open + len(self._code_roots) + self.open_watchers()

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
            if self.open_scopes:
                raise RuntimeError("set_method(): scopes are open")
            self._method = method
            self._native = self._native_module if method in ("auto", "native") else None
            self._sync_lean()

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
        return self._open_scope(None, period_ns, include_system_calls, max_duration_ns, max_depth)

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
        with self._lock:  # the collector gives a code scope its store under the lock too
            scope.samples, scope.methods = parent.sample_store()
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
        return self._open_scope(
            root_frame, period_ns, include_system_calls, max_duration_ns, max_depth
        )

    def open_root_scope(
        self, root_frame: FrameType, period_ns: int, max_depth: int, max_duration_ns: int | None
    ) -> Scope:
        """``open_frame_scope`` without off-CPU sampling, positional: the request path's call."""
        return self._open_scope(root_frame, period_ns, False, max_duration_ns, max_depth)

    def _open_scope(
        self,
        root_frame: FrameType | None,
        period_ns: int,
        include_system_calls: bool,
        max_duration_ns: int | None,
        max_depth: int,
    ) -> Scope:
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
            if (
                scope.root_frame is not None
                and self._native is not None
                and not scope.include_system_calls
                and self._add_native_root(scope)
            ):
                self._open += 1
                return
            entries = self._entries
            old = entries.get(tid)
            if old is None:
                entry = ThreadEntry(tid, threading.current_thread().name, (), {})
                if tid != self._main_tid or tid not in self._clocks:
                    # A fresh clock: thread idents are reused after a thread ends, and a
                    # reused ident must not inherit a dead thread's CPU clock.
                    self._clocks[tid] = ThreadClock(thread_cpu_clock())
            else:
                entry = ThreadEntry(tid, old.name, old.thread_scopes, old.roots)
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
        if scope.code_root:
            self.close_code_scope(scope)
            return
        closed_ns = time.time_ns()
        with self._lock:
            self._remove(scope)  # drains the native ring into the scope first
        if scope.closed_ns is None:
            scope.closed_ns = closed_ns

    def _remove(self, scope: Scope) -> None:
        if scope.native_tier and not scope.swept and self._remove_native_root(scope):
            self._open -= 1
            return
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
            entries[tid] = ThreadEntry(tid, old.name, thread_scopes, roots)
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
            self._sweeper = Sweeper(self, period)
            self._sweeper.start()
        else:
            self._sweeper.period_ns = period

    def _release_tier(self, scope: Scope) -> None:
        if scope.signal_tier:
            periods = self._signal_periods
            decrement(periods, scope.period_ns)
            if not periods:
                if self._timer_armed:
                    self._disarm_timer()
            elif min(periods) != self._timer_period_ns:
                self._arm_timer(min(periods))
        if scope.swept:
            periods = self._sweep_periods
            decrement(periods, scope.period_ns)
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
        """Remove the idle machinery: collector thread, native sampler, SIGPROF handler.

        Only while no scope is open (otherwise a no-op). For tests and embedders that want
        a pristine process; a later scope sets everything up again.
        """
        with self._lock:
            if self.open_scopes:
                return
            collector, self._collector = self._collector, None
        if collector is not None:
            collector.stop()  # outside the lock: the collector takes it to drain
        self.flush_code_scopes()
        with self._lock:
            if self.open_scopes:
                return
            self.new_code_opens()  # those opened so far are closed (no open scope): done with
            self.teardown_native()
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
            self.errors.exception("otlp_middleware: sampling failed in the SIGPROF handler")
        finally:
            self._in_handler = False

    def _dispatch(
        self, entry: ThreadEntry, frame: FrameType, cpu_ns: int, wall_ns: int, method: str
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
        entry: ThreadEntry,
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


ENGINE = Engine()
"""The process-wide engine."""
