"""Heap profiling: sampled allocations, attributed to the scope (request) that made them.

Two layers:

``open_memory_scope(config) -> MemoryScope``
    The cheap primitive the middleware calls on the request path. Opening a scope adds its id
    to a ``ContextVar`` in the *current* context and installs the allocator hook if it is the
    first open scope; ``MemoryScope.close()`` returns ``(heap samples, period in bytes)``,
    restores the ``ContextVar`` and removes the hook when the last scope closes.
``MemoryProfiler``
    A standalone profiler with the CPU profiler's lifecycle (start/stop/generate_profile/
    get_stats, ``with`` / ``async with``), rendering a pprof heap profile.

Attribution. The hook reads the ``ContextVar`` in the allocating thread, so an asyncio task
owns what it allocates (each task runs in its own context) and work offloaded with a copied
context (``asyncio.to_thread``, ``loop.run_in_executor`` via ``contextvars.copy_context``,
Starlette's threadpool) stays attributed. The variable holds the tuple of open scope ids of
that context: a scope opened inside another (a ``MemoryProfiler`` inside a profiled request)
appends its id, so an allocation counts in *both* the inner and the outer scope.

Backends. ``native`` is the C extension ``_memalloc`` (see ``_native/memalloc.c``): it
samples allocations of the MEM and OBJ allocator domains by bytes, with an exponentially
distributed gap of mean ``sampling_rate`` bytes, so each allocation of size ``s`` is sampled
with probability ``p = 1 - exp(-s/rate)``; a sample is weighted ``1/p`` objects and ``s/p``
bytes, an unbiased estimate of the true totals. Allocations freed before the scope closes
count in ``alloc_*`` but not in ``inuse_*``. A realloc counts as an allocation of its new
size. ``tracemalloc`` is the fallback where the extension is missing (or when asked for with
``MemoryProfilerConfig(backend="tracemalloc")``); it is slower and has weaker attribution, see
``_TracemallocEngine``.

Scopes with different configurations may be open at once: the hook samples at the smallest
open ``sampling_rate`` and each scope thins the samples down to its own rate, so its
estimates stay unbiased.
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import functools
import itertools
import linecache
import logging
import math
import os
import random
import threading
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from types import CodeType, ModuleType
from typing import Any

from .._frames import FRAMES, truncated_marker
from ..errors import ConfigurationError, ProfilerStateError
from ..pprof import Profile, heap_profile
from ..types import HeapSample
from ._lifecycle import ProfilerContext

logger = logging.getLogger(__name__)

_memalloc: ModuleType | None
try:
    from . import _memalloc
except ImportError:  # no compiler at install time, another interpreter, ...
    _memalloc = None

BACKENDS = ("auto", "native", "tracemalloc")
MAX_STACK_DEPTH = 512
"""Deepest stack a sample may keep (the C hook's limit)."""


def native_available() -> bool:
    """True if the sampling allocator extension is importable in this interpreter."""
    return _memalloc is not None


def _seconds(field_name: str, value: float | timedelta) -> float:
    seconds = value.total_seconds() if isinstance(value, timedelta) else value
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or math.isnan(seconds):
        raise ConfigurationError(field_name, value, "must be seconds (float or timedelta)")
    if seconds <= 0:
        raise ConfigurationError(field_name, value, "must be > 0 seconds")
    return float(seconds)


def _int_field(name: str, value: object, low: int, high: int, unit: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigurationError(name, value, f"must be an int in {low}..{high}{unit}")
    return value


@dataclass(frozen=True)
class MemoryProfilerConfig:
    """How allocations are sampled.

    Parameters:
        sampling_rate: mean number of allocated bytes between two samples (default 512 KiB,
            cheap enough for production). ``1`` records every allocation.
        min_allocation_size: allocations smaller than this many bytes are neither sampled
            nor counted: the estimates are then of allocations of at least this size (the
            pprof comments say so). Default 0: everything counts.
        max_duration: a ``MemoryProfiler`` stops recording by itself after this long
            (seconds or ``timedelta``). Scopes opened with ``open_memory_scope`` ignore it:
            their owner closes them.
        track_deallocations: match frees of sampled blocks, for the ``inuse_*`` values
            (else they are 0).
        max_stack_depth: deeper stacks keep their leaf-most frames and a ``<truncated>``
            marker frame (at most 512).
        backend: ``"auto"`` (the C extension if importable, else tracemalloc), ``"native"``
            (the extension, a ``ConfigurationError`` if it is missing) or ``"tracemalloc"``.

    Example::

        MemoryProfilerConfig(sampling_rate=524_288, min_allocation_size=1024, max_duration=30)
    """

    sampling_rate: int = 524_288
    min_allocation_size: int = 0
    max_duration: float | timedelta = 30.0
    track_deallocations: bool = True
    max_stack_depth: int = 64
    backend: str = "auto"
    _max_duration_s: float = field(init=False, repr=False, compare=False)
    # What the C hook needs, precomputed: scopes are opened on the request path.
    _hook_key: tuple[int, int, int, bool] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _int_field("sampling_rate", self.sampling_rate, 1, 1 << 40, " bytes")
        _int_field("min_allocation_size", self.min_allocation_size, 0, 1 << 40, " bytes")
        object.__setattr__(self, "_max_duration_s", _seconds("max_duration", self.max_duration))
        if not isinstance(self.track_deallocations, bool):
            raise ConfigurationError(
                "track_deallocations", self.track_deallocations, "must be True or False"
            )
        _int_field("max_stack_depth", self.max_stack_depth, 1, MAX_STACK_DEPTH)
        if self.backend not in BACKENDS:
            raise ConfigurationError("backend", self.backend, f"must be one of {BACKENDS}")
        if self.backend == "native" and _memalloc is None:
            raise ConfigurationError(
                "backend", self.backend, "the _memalloc extension is not built for this Python"
            )
        key = (
            self.sampling_rate,
            self.min_allocation_size,
            self.max_stack_depth,
            self.track_deallocations,
        )
        object.__setattr__(self, "_hook_key", key)

    @property
    def max_duration_seconds(self) -> float:
        return self._max_duration_s

    @property
    def resolved_backend(self) -> str:
        """The backend that runs: ``native`` or ``tracemalloc``."""
        if self.backend == "auto":
            return "native" if _memalloc is not None else "tracemalloc"
        return self.backend


# ---------------------------------------------------------------------------------- engines


_RawSample = tuple[int, int, int, int, int, tuple[int, ...], bool, tuple[int, ...]]


class _ScopeState:
    __slots__ = ("baseline", "closed", "config", "generation", "id", "raw", "result")

    def __init__(self, scope_id: int, config: MemoryProfilerConfig, generation: int) -> None:
        self.id = scope_id
        self.config = config
        self.generation = generation
        # native: (serial, ptr, size, rate, thread_id, stack, truncated, scope ids) per sample
        self.raw: list[_RawSample] = []
        self.baseline: dict[Any, list[int]] | None = None  # tracemalloc only
        self.closed = False
        self.result: list[HeapSample] = []


_SCOPES: contextvars.ContextVar[tuple[int, ...]] = contextvars.ContextVar(
    "otlp_middleware_memory_scopes", default=()
)
"""Ids of the memory scopes open in this context, outermost first (read by the C hook)."""


def _probability(size: int, rate: int) -> float:
    """Chance that an allocation of ``size`` bytes is sampled at a mean gap of ``rate``."""
    return 1.0 if rate <= 1 else -math.expm1(-size / rate)


def _thread_names() -> dict[int, str]:
    return {t.ident: t.name for t in threading.enumerate() if t.ident is not None}


class _NativeEngine:
    """Scope registry in front of the C hook: dispatches drained samples to open scopes."""

    backend = "native"

    def __init__(self, mod: ModuleType) -> None:
        self._mod = mod
        self._lock = threading.RLock()
        self._scopes: dict[int, _ScopeState] = {}
        # open scopes per hook key (rate, min size, depth, track)
        self._configs: dict[tuple[int, int, int, bool], int] = {}
        self._params: tuple[int, int, int, bool] | None = None
        self._ids = itertools.count(1)
        self._generation = 0
        self._rng = random.Random()
        self._shut_down = False
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._after_fork_in_child)
        atexit.register(self.shutdown)

    @property
    def open_scopes(self) -> int:
        return len(self._scopes)

    def open(self, config: MemoryProfilerConfig) -> _ScopeState:
        with self._lock:
            state = _ScopeState(next(self._ids), config, self._generation)
            if self._shut_down:  # the interpreter is exiting: never hook again
                state.closed = True
                return state
            self._scopes[state.id] = state
            key = config._hook_key
            n = self._configs.get(key, 0)
            self._configs[key] = n + 1
            if n == 0:
                self._reconfigure()
        return state

    def _reconfigure(self) -> None:
        # The hook serves every open scope: finest rate, smallest minimum, deepest stack.
        keys = list(self._configs)
        if not keys:
            self._params = None
            self._mod.uninstall()
            return
        params = (
            min(k[0] for k in keys),
            min(k[1] for k in keys),
            max(k[2] for k in keys),
            any(k[3] for k in keys),
        )
        if params != self._params:
            self._params = params
            self._mod.install(_SCOPES, *params)

    def _drain(self) -> None:
        raw = self._mod.drain()
        if not raw:
            return
        scopes = self._scopes
        intern = FRAMES.intern_code
        for serial, ptr, size, rate, tid, token, frames, truncated in raw:
            targets = [scopes[i] for i in token if i in scopes]
            if not targets:  # allocated in a context whose scopes have closed
                self._mod.untrack(ptr, serial)
                continue
            stack = tuple(intern(frames[k], frames[k + 1]) for k in range(0, len(frames), 2))
            sample = (serial, ptr, size, rate, tid, stack, truncated, token)
            for state in targets:
                state.raw.append(sample)

    def close(self, state: _ScopeState) -> list[HeapSample]:
        with self._lock:
            if state.closed:
                return state.result
            state.closed = True
            if state.generation != self._generation or self._shut_down:
                return state.result  # opened before a fork (the child starts clean) or exit
            self._drain()
            del self._scopes[state.id]
            raw, state.raw = state.raw, []
            track = state.config.track_deallocations and self._params is not None
            alive = [track and self._mod.is_alive(r[1], r[0]) for r in raw]
            # Keep the pointer table to the blocks an open scope may still report as in use:
            # every free probes it, so it must stay small (and cache-resident).
            scopes = self._scopes
            for r, live in zip(raw, alive, strict=True):
                if live and not any(i in scopes for i in r[7]):
                    self._mod.untrack(r[1], r[0])
            key = state.config._hook_key
            n = self._configs[key] - 1
            if n:
                self._configs[key] = n
            else:
                del self._configs[key]
                self._reconfigure()
            rng_random = self._rng.random
        state.result = _aggregate(state.config, raw, alive, rng_random)
        return state.result

    def stats(self) -> dict[str, Any]:
        return dict(self._mod.stats())

    def shutdown(self) -> None:
        """Remove the hook (atexit: nothing must sample while the interpreter finalizes)."""
        with self._lock:
            self._shut_down = True
            self._scopes.clear()
            self._configs.clear()
            self._params = None
            self._mod.uninstall()

    def _after_fork_in_child(self) -> None:
        self._lock = threading.RLock()
        self._scopes = {}
        self._configs = {}
        self._params = None
        self._generation += 1
        self._rng = random.Random()
        self._mod.reset_after_fork()


def _aggregate(
    config: MemoryProfilerConfig,
    raw: list[_RawSample],
    alive: list[bool],
    rng_random: Callable[[], float],
) -> list[HeapSample]:
    """Scale raw samples to estimates and sum them per (stack, thread)."""
    rate = config.sampling_rate
    min_size = config.min_allocation_size
    depth = config.max_stack_depth
    acc: dict[tuple[tuple[int, ...], int], list[float]] = {}
    for sample, live in zip(raw, alive, strict=True):
        _serial, _ptr, size, hook_rate, tid, stack, truncated, _token = sample
        if size < min_size:
            continue
        p = _probability(size, rate)
        if p <= 0.0:
            continue
        # Sampled at a finer rate for another scope: keep with probability p_ours / p_hook.
        if hook_rate < rate and rng_random() * _probability(size, hook_rate) >= p:
            continue
        if len(stack) > depth:
            stack = (*stack[:depth], truncated_marker(len(stack) - depth))
        elif truncated:
            stack = (*stack, truncated_marker(0))
        values = acc.get((stack, tid))
        if values is None:
            values = acc[(stack, tid)] = [0.0, 0.0, 0.0, 0.0]
        weight = 1.0 / p
        values[0] += weight
        values[1] += size * weight
        if live:
            values[2] += weight
            values[3] += size * weight
    if not acc:
        return []
    names = _thread_names()
    return [
        HeapSample(stack, tid, names.get(tid, ""), *(round(v) for v in values))
        for (stack, tid), values in acc.items()
    ]


@functools.lru_cache(maxsize=512)
def _line_owners(filename: str) -> dict[int, tuple[str, int]]:
    """Map each line of a source file to the innermost function (qualname, first line)."""
    source = "".join(linecache.getlines(filename))
    try:
        code = compile(source, filename, "exec", dont_inherit=True)
    except (SyntaxError, ValueError):
        return {}
    owners: dict[int, tuple[str, int]] = {}

    def walk(co: CodeType) -> None:
        name = getattr(co, "co_qualname", co.co_name)
        for _, _, line in co.co_lines():
            if line is not None:
                owners[line] = (name, co.co_firstlineno)
        for const in co.co_consts:
            if isinstance(const, CodeType):
                walk(const)  # nested code overrides its parent's lines

    walk(code)
    return owners


def _tm_stack(traceback: tracemalloc.Traceback, depth: int) -> tuple[int, ...]:
    ids = []
    for frame in traceback:  # leaf first
        name, first = _line_owners(frame.filename).get(frame.lineno, ("<unknown>", 0))
        ids.append(FRAMES.intern(name, frame.filename, first, frame.lineno))
    total = max(len(ids), traceback.total_nframe or 0)
    if total > depth:
        return (*ids[:depth], truncated_marker(total - depth))
    return tuple(ids)


class _TracemallocEngine:
    """Fallback on ``tracemalloc``: exact, slower, and attributed by time window only.

    A scope takes a snapshot when it opens and when it closes; its samples are the growth of
    live blocks per traceback between the two (blocks of at least ``min_allocation_size``).
    Limitations, stated plainly: tracemalloc records no thread or context, so concurrent scopes
    each see everything every thread allocated while they were open; blocks allocated and
    freed inside the scope are not seen, so ``alloc_*`` equals ``inuse_*`` (net growth, and
    ``inuse_*`` is 0 without ``track_deallocations``); ``thread_id`` is 0. tracemalloc records
    no function names: they are recovered from the source file. Values are exact counts.
    """

    backend = "tracemalloc"

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._open = 0
        self._started_tracing = False
        self._warned = False
        self._ids = itertools.count(1)

    @property
    def open_scopes(self) -> int:
        return self._open

    def _snapshot(self, min_size: int) -> dict[Any, list[int]]:
        snap = tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, __file__)]
        )
        growth: dict[Any, list[int]] = {}
        for trace in snap.traces:
            if trace.size >= min_size:
                v = growth.setdefault(trace.traceback, [0, 0])
                v[0] += 1
                v[1] += trace.size
        return growth

    def open(self, config: MemoryProfilerConfig) -> _ScopeState:
        with self._lock:
            if not self._warned:
                self._warned = True
                logger.warning(
                    "memory profiling uses the tracemalloc fallback: slower, and concurrent "
                    "scopes are not told apart (the _memalloc extension is not in use)"
                )
            state = _ScopeState(next(self._ids), config, 0)
            if not tracemalloc.is_tracing():
                tracemalloc.start(config.max_stack_depth)
                self._started_tracing = True
                state.baseline = {}
            else:
                state.baseline = self._snapshot(config.min_allocation_size)
            self._open += 1
        return state

    def close(self, state: _ScopeState) -> list[HeapSample]:
        with self._lock:
            if state.closed:
                return state.result
            state.closed = True
            config = state.config
            now = self._snapshot(config.min_allocation_size) if tracemalloc.is_tracing() else {}
            self._open -= 1
            if self._open == 0 and self._started_tracing:
                tracemalloc.stop()
                self._started_tracing = False
        base = state.baseline or {}
        acc: dict[tuple[int, ...], list[int]] = {}
        for tb, (count, size) in now.items():
            old = base.get(tb, (0, 0))
            dcount, dsize = count - old[0], size - old[1]
            if dcount > 0 and dsize > 0:
                v = acc.setdefault(_tm_stack(tb, config.max_stack_depth), [0, 0])
                v[0] += dcount
                v[1] += dsize
        inuse = config.track_deallocations
        state.result = [
            HeapSample(stack, 0, "", c, b, c if inuse else 0, b if inuse else 0)
            for stack, (c, b) in acc.items()
        ]
        return state.result

    def stats(self) -> dict[str, Any]:
        return {"tracing": tracemalloc.is_tracing()}


_NATIVE: _NativeEngine | None = _NativeEngine(_memalloc) if _memalloc is not None else None
_TRACEMALLOC = _TracemallocEngine()


def _engine(config: MemoryProfilerConfig) -> _NativeEngine | _TracemallocEngine:
    if config.resolved_backend == "native" and _NATIVE is not None:
        return _NATIVE
    return _TRACEMALLOC


# ---------------------------------------------------------------------------------- scopes


class MemoryScope:
    """One open memory scope; ``close()`` it in the context that opened it.

    Returned by ``open_memory_scope``. ``close()`` is idempotent: later calls return the
    same samples. Closing from another context (another task or thread) still ends the
    scope, but cannot restore the opener's ``ContextVar``: there the stale id is ignored.
    """

    __slots__ = ("_engine", "_state", "_token", "backend", "start_ns")

    def __init__(self, config: MemoryProfilerConfig) -> None:
        self._engine = _engine(config)
        self.backend: str = self._engine.backend
        self.start_ns = time.time_ns()
        self._state = self._engine.open(config)
        self._token: contextvars.Token[tuple[int, ...]] | None = _SCOPES.set(
            (*_SCOPES.get(), self._state.id)
        )

    @property
    def config(self) -> MemoryProfilerConfig:
        return self._state.config

    @property
    def closed(self) -> bool:
        return self._state.closed

    def close(self) -> tuple[list[HeapSample], int]:
        """End the scope: ``(samples per (stack, thread), period in bytes)``.

        The values of each ``HeapSample`` are already scaled to estimated totals.
        """
        token, self._token = self._token, None
        if token is not None:
            # Closed from another context: the id just goes stale in the opener's context.
            with contextlib.suppress(ValueError):
                _SCOPES.reset(token)
        samples = self._engine.close(self._state)
        return samples, self._state.config.sampling_rate


def open_memory_scope(config: MemoryProfilerConfig) -> MemoryScope:
    """Start attributing allocations made in the current context (and its copies) to a scope.

    Cheap (a registry insert and a ``ContextVar.set``; the hook is installed by the first
    open scope). Example::

        scope = open_memory_scope(MemoryProfilerConfig())
        try:
            handle_request()
        finally:
            heap_samples, period = scope.close()
    """
    return MemoryScope(config)


def open_scope_count() -> int:
    """Memory scopes open in this process, over both backends (for leak checks)."""
    native = _NATIVE.open_scopes if _NATIVE is not None else 0
    return native + _TRACEMALLOC.open_scopes


# ---------------------------------------------------------------------------------- profiler


@dataclass(frozen=True)
class MemoryProfilerStats:
    """What a memory profiler run collected.

    ``backend`` is ``"native"`` (the sampling allocator hook) or ``"tracemalloc"``.
    ``dropped`` counts samples the hook lost because its buffer was full (process-wide).
    """

    backend: str
    running: bool
    sample_count: int  # aggregated (stack, thread) samples
    allocated_bytes: int  # estimated bytes allocated (alloc_space)
    inuse_bytes: int  # estimated bytes still allocated at stop (inuse_space)
    duration: float  # seconds the profiler recorded
    sampling_rate: int
    dropped: int


class MemoryProfiler(ProfilerContext):
    """Samples the heap allocations of the code its caller runs; renders a pprof heap profile.

    Started in a thread it covers that thread's context; started inside an asyncio task it
    covers that task (and threads it offloads work to with a copied context). Other threads
    and tasks are not included. Recording stops by itself after ``config.max_duration``.

    Example::

        profiler = MemoryProfiler(MemoryProfilerConfig(sampling_rate=524_288))
        with profiler:
            work()
        write_profile(profiler.generate_profile(), "heap.pb.gz")
        # go tool pprof -sample_index=alloc_space -top heap.pb.gz
    """

    def __init__(self, config: MemoryProfilerConfig | None = None) -> None:
        self.config = config or MemoryProfilerConfig()
        self._lock = threading.Lock()
        self._scope: MemoryScope | None = None
        self._timer: threading.Timer | None = None
        self._done = threading.Event()
        self._done.set()
        self._samples: list[HeapSample] | None = None
        self._start_ns = 0
        self._end_ns = 0

    @property
    def running(self) -> bool:
        """True between ``start()`` and ``stop()``."""
        return self._scope is not None

    @property
    def backend(self) -> str:
        return self.config.resolved_backend

    def start(self) -> None:
        with self._lock:
            if self._scope is not None:
                raise ProfilerStateError(
                    "MemoryProfiler.start(): already running; call stop() first"
                )
            self._samples = None
            self._start_ns = time.time_ns()
            self._scope = open_memory_scope(self.config)
            self._done.clear()
            timer = threading.Timer(self.config.max_duration_seconds, self._expire)
            timer.name = "otlp-middleware-memory-max-duration"
            timer.daemon = True
            self._timer = timer
            timer.start()

    def _expire(self) -> None:
        with self._lock:
            scope = self._scope
            if scope is not None and not scope.closed:
                scope.close()  # from the timer thread: the opener's ContextVar is reset at stop()
                self._end_ns = time.time_ns()
                self._done.set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait until recording ends (``stop()`` or ``max_duration``); False on timeout."""
        return self._done.wait(timeout)

    def stop(self) -> None:
        with self._lock:
            scope, timer = self._scope, self._timer
            if scope is None:
                raise ProfilerStateError("MemoryProfiler.stop(): not running; call start() first")
            self._scope = self._timer = None
            if timer is not None:
                timer.cancel()
            was_recording = not scope.closed
            self._samples, _ = scope.close()
            if was_recording:
                self._end_ns = time.time_ns()
            self._done.set()
        if timer is not None and timer is not threading.current_thread():
            timer.join()

    @property
    def samples(self) -> list[HeapSample]:
        """The aggregated samples of the last run (empty before one finished)."""
        return list(self._samples or ())

    def generate_profile(self) -> Profile:
        """The last run as a pprof heap profile (alloc/inuse objects and space)."""
        if self._scope is not None:
            raise ProfilerStateError("MemoryProfiler.generate_profile(): stop() the profiler first")
        if self._samples is None:
            raise ProfilerStateError("MemoryProfiler.generate_profile(): the profiler never ran")
        attributes: dict[str, object] = {"memory.backend": self.backend}
        if self.config.min_allocation_size:
            attributes["min_allocation_size"] = (
                f"{self.config.min_allocation_size} bytes: smaller allocations are not counted"
            )
        return heap_profile(
            self._samples,
            period_bytes=self.config.sampling_rate,
            time_nanos=self._start_ns,
            duration_nanos=max(0, self._end_ns - self._start_ns),
            attributes=attributes,
        )

    def get_stats(self) -> MemoryProfilerStats:
        samples = self._samples or []
        end = time.time_ns() if self.running and not self._done.is_set() else self._end_ns
        dropped = 0
        if self.backend == "native" and _NATIVE is not None:
            dropped = int(_NATIVE.stats().get("dropped", 0))
        return MemoryProfilerStats(
            backend=self.backend,
            running=self.running,
            sample_count=len(samples),
            allocated_bytes=sum(s.alloc_bytes for s in samples),
            inuse_bytes=sum(s.inuse_bytes for s in samples),
            duration=max(0, end - self._start_ns) / 1e9 if self._start_ns else 0.0,
            sampling_rate=self.config.sampling_rate,
            dropped=dropped,
        )
