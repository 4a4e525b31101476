"""Profilers and sampling strategies.

    from otlp_middleware.profiling import CpuProfiler, CpuProfilerConfig, profile_async, profile_sync
"""

from .cpu import CpuProfiler as CpuProfiler
from .cpu import CpuProfilerConfig as CpuProfilerConfig
from .cpu import CpuProfilerStats as CpuProfilerStats
from .cpu import profile_async as profile_async
from .cpu import profile_sync as profile_sync

__all__ = [
    "CpuProfiler",
    "CpuProfilerConfig",
    "CpuProfilerStats",
    "profile_async",
    "profile_sync",
]
