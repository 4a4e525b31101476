"""The standalone CPU profiler: ``CpuProfiler``, ``profile_sync`` and ``profile_async``.

A ``CpuProfiler`` profiles what its caller runs: started inside an asyncio task it profiles
that task (samples whose stack holds the task's root coroutine frame), otherwise the calling
thread. Other threads and other tasks on the same loop are not included, so profilers running
side by side never see each other's work.
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from types import FrameType
from typing import Any, TypeVar

from ..errors import ConfigurationError, ProfilerStateError
from ..pprof import Profile, cpu_profile
from ..types import CpuSample
from ._engine import ENGINE
from ._lifecycle import ProfilerContext
from ._scope import DEFAULT_MAX_DEPTH, Scope

T = TypeVar("T")

MAX_FREQUENCY = 10_000.0
"""Above this the sampling cost dominates the program; refused as a configuration error."""


def _seconds(field_name: str, value: float | timedelta | None) -> float | None:
    if value is None:
        return None
    seconds = value.total_seconds() if isinstance(value, timedelta) else value
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or math.isnan(seconds):
        raise ConfigurationError(field_name, value, "must be seconds (float or timedelta) or None")
    if seconds <= 0:
        raise ConfigurationError(field_name, value, "must be > 0 seconds, or None for no limit")
    return float(seconds)


@dataclass(frozen=True)
class CpuProfilerConfig:
    """How a CPU profiler samples.

    Parameters:
        sampling_frequency: samples per CPU-second of the profiled code, in Hz (default 99,
            a prime, so sampling does not beat with periodic work). At most 10000.
        max_duration: stop collecting after this long (seconds or ``timedelta``); ``None``
            means until ``stop()``.
        include_system_calls: also record off-CPU time (sleeping, waiting on I/O or locks) as
            wall-clock samples; by default only on-CPU samples are kept.
        max_stack_depth: deeper stacks keep their leaf-most frames and a ``<truncated>``
            marker frame.

    Example::

        CpuProfilerConfig(sampling_frequency=199, max_duration=10)
    """

    sampling_frequency: float = 99.0
    max_duration: float | timedelta | None = 30.0
    include_system_calls: bool = False
    max_stack_depth: int = DEFAULT_MAX_DEPTH
    _max_duration_s: float | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        hz = self.sampling_frequency
        if isinstance(hz, bool) or not isinstance(hz, (int, float)) or math.isnan(hz):
            raise ConfigurationError("sampling_frequency", hz, "must be a number of Hz")
        if not 0 < hz <= MAX_FREQUENCY:
            raise ConfigurationError(
                "sampling_frequency", hz, f"must be > 0 and <= {MAX_FREQUENCY:g} Hz"
            )
        object.__setattr__(self, "_max_duration_s", _seconds("max_duration", self.max_duration))
        if not isinstance(self.include_system_calls, bool):
            raise ConfigurationError(
                "include_system_calls", self.include_system_calls, "must be True or False"
            )
        depth = self.max_stack_depth
        if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= 4096:
            raise ConfigurationError("max_stack_depth", depth, "must be an int in 1..4096")

    @property
    def period_ns(self) -> int:
        """The sampling period in nanoseconds of CPU time (1e9 / frequency)."""
        return round(1e9 / self.sampling_frequency)

    @property
    def max_duration_seconds(self) -> float | None:
        return self._max_duration_s


@dataclass(frozen=True)
class CpuProfilerStats:
    """What a profiler run collected.

    ``methods`` counts samples per sampling tier (``signal``, ``native``, ``thread``; see
    ``otlp_middleware.profiling._engine``): ``thread`` samples of CPU-bound code are placed at
    GIL-release points and are the least accurate.
    """

    sample_count: int
    duration: float  # seconds the profiler ran
    cpu_time: float  # seconds of CPU the samples stand for
    sampling_frequency: float
    methods: dict[str, int]
    method: str  # the tier sampling the profiled thread's CPU

    def actual_sampling_rate(self) -> float:
        """Samples per CPU-second observed (compare with ``sampling_frequency``)."""
        return self.sample_count / self.cpu_time if self.cpu_time > 0 else 0.0


def _task_root_frame() -> FrameType | None:
    """The root coroutine frame of the asyncio task running on this thread, if any."""
    try:
        task = asyncio.current_task()
    except RuntimeError:
        return None
    if task is None:
        return None
    frame: FrameType | None = getattr(task.get_coro(), "cr_frame", None)
    return frame


def open_cpu_scope(config: CpuProfilerConfig, root_frame: FrameType | None = None) -> Scope:
    """Open an engine scope for ``config``: below ``root_frame`` if given, else this thread."""
    max_s = config.max_duration_seconds
    max_ns = round(max_s * 1e9) if max_s else None
    if root_frame is None:
        return ENGINE.open_thread_scope(
            period_ns=config.period_ns,
            include_system_calls=config.include_system_calls,
            max_duration_ns=max_ns,
            max_depth=config.max_stack_depth,
        )
    return ENGINE.open_frame_scope(
        root_frame,
        period_ns=config.period_ns,
        include_system_calls=config.include_system_calls,
        max_duration_ns=max_ns,
        max_depth=config.max_stack_depth,
    )


class CpuProfiler(ProfilerContext):
    """Samples the CPU use of the code its caller runs and renders it as pprof.

    Example::

        profiler = CpuProfiler(CpuProfilerConfig(sampling_frequency=99))
        profiler.start()
        do_work()
        profiler.stop()
        profile = profiler.generate_profile()    # perftools.profiles.Profile
        print(profiler.get_stats().sample_count)

    Also a context manager (``with`` / ``async with``). Errors: ``start()`` while running,
    ``stop()`` before ``start()`` and ``generate_profile()`` while running raise
    ``ProfilerStateError``. A profiler can be started again after ``stop()``; each run
    replaces the previous samples.
    """

    def __init__(self, config: CpuProfilerConfig | None = None) -> None:
        self.config = config or CpuProfilerConfig()
        self._scope: Scope | None = None
        self._running = False
        self._root: FrameType | None = None

    @property
    def running(self) -> bool:
        return self._running

    def start(self, *, root_frame: FrameType | None = None) -> None:
        """Start sampling the current asyncio task (or ``root_frame``), else this thread."""
        if self._running:
            raise ProfilerStateError("CpuProfiler.start(): already running; call stop() first")
        self._open(root_frame if root_frame is not None else _task_root_frame())

    def _open(self, root: FrameType | None) -> None:
        self._scope = open_cpu_scope(self.config, root)
        self._running = True

    def stop(self) -> None:
        """Stop sampling. The samples stay available to ``generate_profile()``."""
        if not self._running or self._scope is None:
            raise ProfilerStateError("CpuProfiler.stop(): not running; call start() first")
        ENGINE.close(self._scope)
        self._running = False

    @property
    def samples(self) -> list[CpuSample]:
        """The raw samples of the last (or current) run."""
        return list(self._scope.samples) if self._scope is not None else []

    def generate_profile(self) -> Profile:
        """The last run as a pprof Profile (samples/count, cpu/ns, wall/ns; period cpu/ns)."""
        if self._running:
            raise ProfilerStateError("CpuProfiler.generate_profile(): stop() the profiler first")
        if self._scope is None:
            raise ProfilerStateError("CpuProfiler.generate_profile(): the profiler never ran")
        return cpu_profile(
            self._scope.samples,
            period_ns=self.config.period_ns,
            time_nanos=self._scope.opened_ns,
            duration_nanos=self._scope.duration_ns,
        )

    def get_stats(self) -> CpuProfilerStats:
        scope = self._scope
        if scope is None:
            return CpuProfilerStats(
                0,
                0.0,
                0.0,
                self.config.sampling_frequency,
                {},
                ENGINE.method_for(threading.get_ident()),
            )
        samples = list(scope.samples)
        return CpuProfilerStats(
            sample_count=sum(1 for s in samples if s.cpu_ns),
            duration=scope.duration_ns / 1e9,
            cpu_time=sum(s.cpu_ns for s in samples) / 1e9,
            sampling_frequency=self.config.sampling_frequency,
            methods=dict(scope.methods),
            # the tier that took most samples; before any, the one that would take them
            method=max(scope.methods, key=scope.methods.__getitem__)
            if scope.methods
            else ENGINE.method_for(scope.thread_id),
        )


def profile_sync(
    fn: Callable[..., T], *args: Any, config: CpuProfilerConfig | None = None, **kwargs: Any
) -> tuple[T, Profile]:
    """Run ``fn(*args, **kwargs)`` on this thread under a CpuProfiler; return (result, profile).

    If ``fn`` raises, the exception propagates and the profile is discarded.
    """
    profiler = CpuProfiler(config)
    # fn runs synchronously on this thread (blocking any event loop here): profile the thread.
    profiler._open(None)
    try:
        result = fn(*args, **kwargs)
    finally:
        profiler.stop()
    return result, profiler.generate_profile()


async def _await(aw: Awaitable[T]) -> T:
    return await aw


async def profile_async(
    aw: Awaitable[T], config: CpuProfilerConfig | None = None
) -> tuple[T, Profile]:
    """Await ``aw`` under a CpuProfiler that sees only ``aw``'s own frames.

    Other tasks that run on the loop meanwhile are not included::

        result, profile = await profile_async(expensive_computation(), CpuProfilerConfig())
    """
    wrapper = _await(aw)
    root: FrameType = wrapper.cr_frame  # type: ignore[attr-defined]
    profiler = CpuProfiler(config)
    profiler.start(root_frame=root)
    try:
        result = await wrapper
    finally:
        profiler.stop()
    return result, profiler.generate_profile()
