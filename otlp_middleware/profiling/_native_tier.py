"""The native tier: per-thread CPU-time timers from the ``_cpu_native`` C extension.

``NativeTier`` is mixed into ``Engine``: it registers scopes with the extension (a token per
thread's set of thread scopes, a token per async root frame), and ``collect`` moves the samples
the signal handlers recorded into the scopes the tokens name. Tokens that were replaced stay
known until the next drain, because samples already in the ring may carry them.
"""

from __future__ import annotations

import itertools
import logging
import threading
from types import FrameType
from typing import Any

from ..types import CpuSample
from ._frames import FRAMES, truncate, truncated_marker
from ._scope import Scope, ThreadEntry, decrement
from ._workers import Collector

logger = logging.getLogger(__name__)

NATIVE_CAPACITY = 8192  # samples the native ring holds between drains


def load_native() -> Any:
    """The native sampler module, or None where it was not built or cannot load."""
    try:
        from . import _cpu_native
    except ImportError as exc:
        logger.debug("otlp_middleware: native CPU sampler unavailable: %s", exc)
        return None
    return _cpu_native


class NativeTier:
    """Engine methods of the native tier (state is initialised by ``init_native_state``)."""

    _entries: dict[int, ThreadEntry]
    _native: Any
    _lock: threading.Lock
    _collector: Collector | None

    def init_native_state(self, module: Any) -> None:
        self._native = module
        self._native_periods: dict[int, int] = {}
        self._native_hz = 0.0
        self._tokens: dict[int, tuple[int, str, tuple[Scope, ...]]] = {}
        self._retired_tokens: list[int] = []
        self._thread_tokens: dict[int, int] = {}  # tid -> current token of its thread scopes
        self._root_tokens: dict[int, int] = {}  # id(root frame) -> current token
        self._token_counter = itertools.count(1)
        self._collector = None

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
                if threading.get_ident() == tid and not native.thread_armed():
                    self._rearm_thread(tid)
            elif threading.get_ident() == tid:
                self._rearm_thread(tid)
        except RuntimeError as exc:  # e.g. the signal is taken by the application
            decrement(periods, scope.period_ns)
            logger.warning("otlp_middleware: native CPU sampler unusable (%s); falling back", exc)
            self._native = None
            return False
        if self._collector is None:
            self._collector = Collector(self)  # type: ignore[arg-type]
        self._collector.wake()
        return True

    def _new_token(self, tid: int, scopes: tuple[Scope, ...]) -> int:
        token = next(self._token_counter)
        entry = self._entries.get(tid)
        self._tokens[token] = (tid, entry.name if entry else "", scopes)
        return token

    def _retire(self, token: int | None) -> None:
        # Samples already in the ring may carry the old token: forget it after the next drain.
        if token:
            self._retired_tokens.append(token)

    def _rearm_thread(self, tid: int) -> None:
        """Point the calling thread's timer at its current thread scopes.

        A thread without thread scopes stays armed with token 0 ("no thread scope"): the
        handler drops its samples unless an async root is on the stack. Not disarming spares
        every request two timer system calls; the timers go when the sampler is torn down
        after ``IDLE_TEARDOWN`` without scopes (or with their thread).
        """
        entry = self._entries.get(tid)
        if entry is None or not entry.thread_scopes:
            old = self._thread_tokens.get(tid)
            if old != 0 or not self._native.thread_armed():
                self._native.arm_thread(0)
                self._thread_tokens[tid] = 0
                self._retire(old)
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
        tid = scope.thread_id
        if root is not None:
            self._register_root(tid, id(root), root)
        if threading.get_ident() == tid and (root is None or tid not in self._entries):
            self._rearm_thread(tid)
        # Then take the closing scope's samples: after disarming, so the engine's own work
        # here is not sampled into the request; replaced tokens stay known for this drain.
        self.collect()
        decrement(self._native_periods, scope.period_ns)
        if self._native_periods and 1e9 / min(self._native_periods) != self._native_hz:
            self._native_hz = 1e9 / min(self._native_periods)
            self._native.set_frequency(self._native_hz)

    def teardown_native(self) -> None:
        """Stop the native sampler: delete every timer, restore the signal disposition.

        Called with the engine lock held, only while no native scope is open; the next
        scope starts it again.
        """
        native = self._native
        if native is None or not native.is_started() or self._native_periods:
            return
        self.collect()
        native.stop()
        self._native_hz = 0.0
        self._tokens.clear()
        self._thread_tokens.clear()
        self._root_tokens.clear()
        self._retired_tokens.clear()

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
