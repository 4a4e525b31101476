"""The native tier: per-thread CPU-time timers from the ``_cpu_native`` C extension.

``NativeTier`` is mixed into ``Engine``: it registers scopes with the extension (a token per
thread's set of thread scopes, a token per async root frame), and ``collect`` moves the samples
the signal handlers recorded into the scopes the tokens name. Tokens that were replaced stay
known until the next drain, because samples already in the ring may carry them.

The request path is the hot case, kept lean in three steps:

- a thread stays armed between its scopes (token 0: the handler drops samples that belong to
  no scope), so a request costs no timer system call;
- an async root scope that only this tier samples stays out of the per-thread snapshots the
  other tiers read (``_native_roots``);
- the ASGI middleware's requests are *lean calls* (``lean_path``): one object per request,
  made in one call into the extension, that runs the app's awaitable and is on its thread's
  list of running lean calls while it does, where the handler finds it and tags the samples
  with its unique tag, so a request registers nothing; only one that took samples gets a
  scope, made on the collector thread (``request_scope``, ``release_request``).
"""

from __future__ import annotations

import collections
import functools
import itertools
import logging
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from ..types import CpuSample
from ._frames import FRAMES, truncate, truncated_marker
from ._scope import CodeScope, RateLimitedLog, Scope, ThreadEntry, decrement
from ._workers import NATIVE_CAPACITY, Collector

logger = logging.getLogger(__name__)


def load_native() -> Any:
    """The native sampler module, or None where it was not built or cannot load."""
    try:
        from . import _cpu_native
    except ImportError as exc:
        logger.debug("otlp_middleware: native CPU sampler unavailable: %s", exc)
        return None
    return _cpu_native


# Root tags of request watchers (the extension's WATCH_TAG), far below every other token.
WATCH_TAGS_BELOW = -(1 << 62)
# Running requests whose samples ``collect`` holds until their scope is released.
MAX_PENDING_REQUESTS = 4096


def _needs_extension(*args: Any) -> Any:
    # The code-scope calls exist only with the extension: without it ``open_code_scope``
    # returns None, so no caller ever reaches these.
    raise RuntimeError("code scopes need the native sampler extension")


def _no_request() -> None:
    return None  # without the extension there are no lean calls


class NativeTier:
    """Engine methods of the native tier (state is initialised by ``init_native_state``)."""

    _entries: dict[int, ThreadEntry]
    _native: Any
    _native_module: Any
    _lock: threading.Lock
    _collector: Collector | None
    errors: RateLimitedLog
    release_request: Callable[[Any, Callable[[Any, Scope], None]], None]
    """``release_request(watcher, finish)``: end a request watcher whose request took samples,
    and hand it to the collector, which makes its scope (``request_scope``), gives it its
    samples, then calls ``finish(watcher, scope)`` on the collector thread. The extension's
    ``release_request``: the request path makes no scope object."""
    running_request: Callable[[], Any]
    """``running_request()``: the open request watcher of the innermost lean call
    (``lean_path``) running on this thread, or None: the request being served where it is
    called, as the signal handler attributes samples."""

    def init_native_state(self, module: Any) -> None:
        self._native = module
        real = self._native_module
        self.running_request = real.running_request if real is not None else _no_request
        # A request watcher's tag -> (stack, cpu_ns, timestamp_ns) of the samples drained while
        # its request ran and had no scope yet: its scope takes them when it is released.
        self._pending: dict[int, list[tuple[tuple[int, ...], int, int]]] = {}
        self._native_periods: dict[int, int] = {}
        self._native_period = 0  # the period the sampler runs at (0: not started)
        self._tokens: dict[int, tuple[int, str, tuple[Scope, ...]]] = {}
        self._retired_tokens: list[int] = []
        self._thread_tokens: dict[int, int] = {}  # tid -> current token of its thread scopes
        self._root_tokens: dict[int, int] = {}  # id(root frame) -> current token
        # id(root frame) -> the lean root scopes on it (see ``_add_native_root``)
        self._native_roots: dict[int, tuple[Scope, ...]] = {}
        # a running request watcher's tag -> its scope, made while it runs for work it
        # offloads to other threads (``request_scope``); changed without the engine lock
        # (single dict operations)
        self._code_roots: dict[int, Scope] = {}
        self._code_opens_seen = 0  # the extension's code_opens() when the collector last looked
        self._last_drained = 0  # samples the last drain took (the collector paces itself)
        # Request watchers released by their request (``release_request``) whose samples the
        # next drain may still hold, then the scopes collected whose ``finish`` is due.
        self._released: collections.deque[Any] = collections.deque()
        self._finished: collections.deque[Scope] = collections.deque()
        self.release_request = (
            functools.partial(real.release_request, self._released)
            if real is not None
            else _needs_extension
        )
        self._thread_names: dict[int, str] = {}
        # (name, filename, first_line, line) -> FRAMES id, for the frames the ring hands out
        self._frame_ids: dict[tuple[str, str, int, int], int] = {}
        self._token_counter = itertools.count(1)
        self._collector = None
        self._sync_lean()

    def _sync_lean(self) -> None:
        """Let ``lean_path`` calls apply while the native tier is in use, and only then."""
        real = self._native_module
        if real is not None:
            real.set_lean(self._native is not None)

    def new_code_opens(self) -> bool:
        """Whether request watchers were made since the last call (they keep the sampler
        running)."""
        real = self._native_module
        opens = real.code_opens() if real is not None else 0
        new, self._code_opens_seen = opens != self._code_opens_seen, opens
        return new

    def _assign_native(self, scope: Scope) -> bool:
        """Register ``scope`` with the native sampler; False if it cannot take it."""
        native = self._native
        periods = self._native_periods
        periods[scope.period_ns] = periods.get(scope.period_ns, 0) + 1
        try:
            self._native_schedule()
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
            self._native_unusable(exc)
            return False
        self._wake_collector()
        return True

    def lean_path(
        self,
        period_ns: int,
        max_depth: int,
        max_duration_ns: int | None,
        *,
        exact: frozenset[str] | None = None,
        prefixes: tuple[str, ...] | None = None,
        match: Callable[[str], Any] | None = None,
        sampler: Any = None,
    ) -> Any:
        """The ASGI request path at its leanest for requests sampled at ``period_ns``, or
        None where the native sampler is unavailable.

        The extension's ``LeanPath``: called as ``(app, scope, receive, send, on_end,
        decided)`` for a request to profile, it makes the request's watcher, calls
        ``app(scope, receive, watcher)`` and returns the watcher as the awaitable that runs
        the app. While the app's awaitable runs, its thread's samples carry the watcher's
        tag (no frame or registration of its own). It ends the request when the app's
        awaitable is done: one that took no sample is counted (``empty``); one that did
        goes to ``on_end(watcher, scope, root_path, error)``, which hands it on
        (``release_request``). It returns None, for the caller's general path, until the
        sampler runs at ``period_ns`` on the calling thread (as for a server's first
        profiled request).

        With ``decided`` False it decides too: a path in ``exact``, starting with one of
        ``prefixes`` or matched by ``match`` is not profiled (it returns
        ``app(scope, receive, send)``, counted ``excluded``), and every other request is
        counted on ``sampler`` as ``AlwaysSample.should_sample`` would (its ``_count``). It
        counts its calls (``always``: undecided, profiled; ``decided``) and ``empty``.
        """
        native = self._native_module
        if native is None:
            return None
        return native.LeanPath(
            period_ns,
            max_depth,
            max_duration_ns,
            exact=exact,
            prefixes=prefixes,
            match=match,
            sampler=sampler,
        )

    def request_scope(self, watcher: Any) -> Scope:
        """The ``CodeScope`` of a request watcher, made on first use.

        For a request that took samples (its record is built from this scope), or whose work
        runs on other threads too (``_offload.request_scope``): while the request runs, the
        scope is registered under the watcher's tag, so ``collect`` hands it the samples
        straight away; those drained before are pending until the scope is released.
        """
        scope = watcher.scope
        if scope is not None:
            return scope  # type: ignore[no-any-return]
        scope = CodeScope.__new__(CodeScope)
        scope.thread_id = watcher.thread_id
        scope.period_ns = watcher.period_ns
        scope.max_depth = watcher.max_depth
        scope.opened_ns = watcher.opened_ns
        scope.deadline_ns = watcher.deadline_ns
        scope.root_key = watcher.tag
        # no mark (-1): never "quiet", an end sets closed_ns only
        watcher.scope = scope
        closed = watcher.closed_ns
        if closed is not None:
            scope.closed_ns = closed
        else:
            self._code_roots[scope.root_key] = scope
        return scope

    def open_watchers(self) -> int:
        """Request watchers (``lean_path`` calls) whose requests have not ended."""
        real = self._native_module
        return real.open_watchers() if real is not None else 0

    def _add_native_root(self, scope: Scope) -> bool:
        """An async root scope only the native tier samples, kept out of the snapshots.

        Called with the engine lock held, for a scope opened on its own thread without
        off-CPU sampling. No other tier reads it, so it stays out of ``_entries`` (no snapshot
        copies, no thread clock): it lives in ``_native_roots`` behind a root token. False if
        the native sampler cannot take it (the caller falls back).
        """
        root = scope.root_frame
        assert root is not None
        native = self._native
        periods = self._native_periods
        period = scope.period_ns
        periods[period] = periods.get(period, 0) + 1
        key = id(root)
        roots = self._native_roots
        group = roots.get(key)
        try:
            if len(periods) > 1 or period != self._native_period or not native.is_started():
                self._native_schedule()
            if group is None and key not in self._root_tokens:
                # The usual case: the only scope on this frame gets a token of its own.
                token = next(self._token_counter)
                armed = native.add_root(root, token)
                self._tokens[token] = (scope.thread_id, threading.current_thread().name, (scope,))
                self._root_tokens[key] = token
                roots[key] = (scope,)
            else:
                roots[key] = (*group, scope) if group else (scope,)
                self._register_root(scope.thread_id, key, root)
                armed = native.thread_armed()
            if not armed:
                self._rearm_thread(scope.thread_id)
        except RuntimeError as exc:
            decrement(periods, period)
            if group:
                roots[key] = group
            else:
                roots.pop(key, None)
            self._native_unusable(exc)
            return False
        scope.native_tier = True
        collector = self._collector
        if collector is None or not collector.active:
            self._wake_collector()
        return True

    def _remove_native_root(self, scope: Scope) -> bool:
        """Close a scope ``_add_native_root`` took (lock held); False if it is not one."""
        root = scope.root_frame
        if root is None:
            return False
        key = id(root)
        roots = self._native_roots
        group = roots.get(key, ())
        if scope not in group:
            return False
        scope.root_frame = None  # do not keep the coroutine's frame alive
        tid = scope.thread_id
        entry = self._entries.get(tid)
        if len(group) == 1 and (entry is None or key not in entry.roots):
            # The usual case: nothing else on this frame. Its samples are on this thread's
            # ring entries already (the frame runs on this thread only), so after this drain
            # no sample can carry the token: it goes at once.
            del roots[key]
            token = self._root_tokens.pop(key)
            self._native_module.remove_root(root)
            self.collect()
            self._tokens.pop(token, None)
        else:
            rest = tuple(s for s in group if s is not scope)
            if rest:
                roots[key] = rest
            else:
                del roots[key]
            self._register_root(tid, key, root)
            # Then take the closing scope's samples; replaced tokens stay known for this drain.
            self.collect()
        self._release_period(scope.period_ns)
        return True

    def close_code_scope(self, scope: Scope) -> None:
        """Close a request's code scope (``request_scope``) at once (idempotent).

        If no sample at all was published since it opened (``mark`` unchanged), none can be
        its own; otherwise the ring is drained now, while the scope is still registered, so
        the scope has its samples when this returns. (The ASGI request path instead ends its
        request watcher, and with it the scope, and hands it to the collector.)
        """
        if scope.closed_ns is not None:
            return
        changed = self._native_module.mark() != scope.mark
        if changed:
            with self._lock:
                self.collect()
        scope.closed_ns = time.time_ns()
        scope.quiet = not changed
        self.drop_code_scope(scope)

    def drop_code_scope(self, scope: Scope) -> None:
        """Forget an ended code scope without collecting for it (it has no samples)."""
        code_roots = self._code_roots
        if code_roots.get(scope.root_key) is scope:
            del code_roots[scope.root_key]

    def flush_code_scopes(self) -> None:
        """Collect now and finish every released code scope (``force_flush``, exit)."""
        if self._released or self._finished:
            with self._lock:
                self.collect()
            self.run_finished()

    def run_finished(self) -> None:
        """Call the ``finish`` of the released code scopes collected so far (no lock held)."""
        finished = self._finished
        while finished:
            try:
                scope = finished.popleft()
            except IndexError:  # another thread took the last one
                return
            finish, scope.finish = scope.finish, None
            if finish is not None:
                try:
                    finish(scope)
                except Exception:
                    self.errors.exception("otlp_middleware: finishing a request's profile failed")

    def _released_scope(self, tag: int, closing: dict[int, Scope]) -> Scope | None:
        """The scope of the released request watcher ``tag`` names, if it was released.

        A tag is the request's alone, and the handler tags a sample only while its watcher
        is open: no time to compare (which a step of the wall clock would upset).
        """
        scope = closing.get(tag)
        if scope is not None:
            return scope
        # released after this collect began (its samples may already be in this drain); a
        # copy of the deque: the request path appends to it meanwhile
        for w in tuple(self._released):
            if w.root_key == tag:
                return self.request_scope(w)
        return None

    def _released_request(self, watcher: Any) -> Scope:
        """The scope of a request watcher ``release_request`` handed on, its ``finish`` set."""
        scope = self.request_scope(watcher)
        code_roots = self._code_roots
        if code_roots.get(scope.root_key) is scope:  # made while it ran (work on threads)
            del code_roots[scope.root_key]
        finish = watcher.finish
        scope.finish = functools.partial(finish, watcher) if finish is not None else None
        return scope

    def _native_schedule(self) -> None:
        """Start the native sampler, or retune it, for the shortest period of its scopes."""
        periods = self._native_periods
        period = min(periods) if len(periods) > 1 else next(iter(periods))
        native = self._native
        if not native.is_started():
            native.start(1e9 / period, NATIVE_CAPACITY)
        elif period != self._native_period:
            native.set_frequency(1e9 / period)
        self._native_period = period

    def _release_period(self, period: int) -> None:
        periods = self._native_periods
        decrement(periods, period)
        # Retune only when the shortest period may have changed (not for the usual single
        # period still in use, nor when the last scope closed).
        if len(periods) > 1 or (periods and period not in periods):
            shortest = min(periods)
            if shortest != self._native_period:
                self._native_period = shortest
                self._native_module.set_frequency(1e9 / shortest)

    def _native_unusable(self, exc: Exception) -> None:
        logger.warning("otlp_middleware: native CPU sampler unusable (%s); falling back", exc)
        self._native = None
        self._sync_lean()

    def _wake_collector(self) -> None:
        collector = self._collector
        if collector is None:
            self._collector = Collector(self)  # type: ignore[arg-type]
            self._collector.wake()
        elif not collector.active:
            collector.wake()

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
            if old != 0 or not self._native_module.thread_armed():
                self._native_module.arm_thread(0)
                self._thread_tokens[tid] = 0
                self._retire(old)
            return
        token = self._new_token(tid, entry.thread_scopes)
        self._native_module.arm_thread(token)
        self._retire(self._thread_tokens.get(tid))
        self._thread_tokens[tid] = token

    def _register_root(self, tid: int, key: int, frame: FrameType | None) -> None:
        # Re-register the root frame's token for every scope now open on it (or remove it).
        entry = self._entries.get(tid)
        group = entry.roots.get(key, ()) if entry is not None else ()
        lean = self._native_roots.get(key)
        if lean:
            group += lean
        old = self._root_tokens.pop(key, None)
        native = self._native_module
        if group:
            token = self._new_token(tid, group)
            native.add_root(frame if frame is not None else group[0].root_frame, token)
            self._root_tokens[key] = token
        elif frame is not None:
            native.remove_root(frame)
        self._retire(old)

    def _release_native(self, scope: Scope, root: FrameType | None) -> None:
        tid = scope.thread_id
        if root is not None:
            self._register_root(tid, id(root), root)
        if threading.get_ident() == tid and (root is None or tid not in self._entries):
            self._rearm_thread(tid)
        # Then take the closing scope's samples: after re-pointing the thread's token, so the
        # engine's own work here is not sampled into the request; replaced tokens stay known
        # for this drain.
        self.collect()
        self._release_period(scope.period_ns)

    def teardown_native(self) -> None:
        """Stop the native sampler: delete every timer, restore the signal disposition.

        Called with the engine lock held, only while no native scope is open; the next
        scope starts it again.
        """
        native = self._native_module
        if native is None or not native.is_started() or self._native_periods:
            return
        self.collect()
        if (
            self._code_roots
            or self._released
            or native.open_watchers()
            or native.code_opens() != self._code_opens_seen
        ):
            return  # code scopes and request watchers open without the lock: they keep it
        native.stop()
        self._native_period = 0
        self._tokens.clear()
        self._thread_tokens.clear()
        self._root_tokens.clear()
        self._retired_tokens.clear()
        self._native_roots.clear()
        self._frame_ids.clear()
        self._thread_names.clear()

    def _intern_frames(self, frames: tuple[tuple[str, str, int, int], ...]) -> tuple[int, ...]:
        # The extension hands out one cached tuple per (function, line): the frame ids are
        # cached by those tuples, so a sample's stack is a dict lookup per frame.
        frame_ids = self._frame_ids
        out = []
        for f in frames:
            fid = frame_ids.get(f)
            if fid is None:
                fid = frame_ids[f] = FRAMES.intern(*f)
            out.append(fid)
        return tuple(out)

    def _thread_name(self, tid: int) -> str:
        """The name of the thread ``tid`` (cached until the sampler is torn down)."""
        name = self._thread_names.get(tid)
        if name is None:
            name = next((t.name for t in threading.enumerate() if t.ident == tid), "")
            self._thread_names[tid] = name
        return name

    def collect(self) -> None:
        """Move the native sampler's recorded samples into their scopes (needs the GIL)."""
        native = self._native_module
        if native is None:
            return
        released = self._released
        # Released before this drain, so all their samples are in it (a thread's samples are
        # published before its scope ends): finished after it.
        closing = [self._released_request(released.popleft()) for _ in range(len(released))]
        closing_by_key = {scope.root_key: scope for scope in closing}  # a tag per request
        samples = native.drain()  # empty when not started
        self._last_drained = len(samples)
        if samples:
            tokens = self._tokens
            frame_ids = self._frame_ids
            max_native_depth = native.MAX_DEPTH
            code_roots = self._code_roots
            pending = self._pending
            for thread_token, root_tokens, _native_tid, cpu_ns, ts, frames in samples:
                owner = tokens.get(thread_token)
                groups = [owner] if owner is not None and owner[2] else []
                code_scopes: list[Scope] = []
                waiting: list[int] = []
                for rt in root_tokens:
                    if rt > 0:
                        g = tokens.get(rt)
                        if g is not None:
                            groups.append(g)
                    else:
                        c = code_roots.get(rt)  # a running request's (made for its threads)
                        if c is None:
                            c = self._released_scope(rt, closing_by_key)
                        if c is not None:
                            code_scopes.append(c)
                        elif rt < WATCH_TAGS_BELOW:  # a running request without a scope yet
                            waiting.append(rt)
                if not groups and not code_scopes:
                    if waiting:
                        try:
                            stack = tuple(map(frame_ids.__getitem__, frames))
                        except KeyError:
                            stack = self._intern_frames(frames)
                        if len(stack) >= max_native_depth:
                            stack += (truncated_marker(1),)
                        for rt in waiting:
                            pending.setdefault(rt, []).append((stack, cpu_ns, ts))
                    continue
                try:  # every frame seen before (the common case): one pass in C
                    stack = tuple(map(frame_ids.__getitem__, frames))
                except KeyError:
                    stack = self._intern_frames(frames)
                if len(stack) >= max_native_depth:
                    stack += (truncated_marker(1),)
                if groups:
                    tid, name = groups[0][0], groups[0][1]
                else:
                    tid = code_scopes[0].thread_id
                    name = self._thread_name(tid)  # cached: a dict lookup
                sample = CpuSample(stack, tid, name, cpu_ns, cpu_ns, ts)
                for s in code_scopes:  # matched by time above: an ended one takes it too
                    if len(stack) > s.max_depth:
                        s.take(sample._replace(stack=truncate(stack, s.max_depth)), "native")
                    else:
                        s.take(sample, "native")
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
        if self._pending:
            self._take_pending(closing)
        if closing:
            self._finished.extend(closing)

    def _take_pending(self, closing: list[Scope]) -> None:
        """Give the released request scopes their samples drained while they ran.

        Every request with pending samples releases its scope when it ends, so nothing is
        left behind; a bound on the requests held guards against one that never does.
        """
        pending = self._pending
        for scope in closing:
            got = pending.pop(scope.root_key, None)
            if not got:
                continue
            tid = scope.thread_id
            name = self._thread_name(tid)
            for stack, cpu_ns, ts in got:
                if len(stack) > scope.max_depth:
                    stack = truncate(stack, scope.max_depth)
                scope.take(CpuSample(stack, tid, name, cpu_ns, cpu_ns, ts), "native")
        while len(pending) > MAX_PENDING_REQUESTS:
            del pending[next(iter(pending))]  # the oldest: its request never ended
