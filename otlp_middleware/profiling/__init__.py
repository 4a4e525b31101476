"""Profilers and sampling strategies.

    from otlp_middleware.profiling import CpuProfiler, CpuProfilerConfig, profile_async
    from otlp_middleware.profiling import profile_sync
    from otlp_middleware.profiling import MemoryProfiler, MemoryProfilerConfig

The exporter-side names of the seed API (``ProfileExporter``, ``ProfileExporterConfig``,
``ProfileBuilder``, ``generate_profile_id``, ``AttributeValue``) are importable from here too;
they live in upper layers and are loaded on first access.
"""

from typing import Any as _Any

from .cpu import CpuProfiler as CpuProfiler
from .cpu import CpuProfilerConfig as CpuProfilerConfig
from .cpu import CpuProfilerStats as CpuProfilerStats
from .cpu import profile_async as profile_async
from .cpu import profile_sync as profile_sync
from .memory import MemoryProfiler as MemoryProfiler
from .memory import MemoryProfilerConfig as MemoryProfilerConfig
from .sampling import AdaptiveSampler as AdaptiveSampler
from .sampling import AlwaysSample as AlwaysSample
from .sampling import NeverSample as NeverSample
from .sampling import ParentBasedSampler as ParentBasedSampler
from .sampling import ProbabilisticSampler as ProbabilisticSampler
from .sampling import RateSampler as RateSampler
from .sampling import RequestInfo as RequestInfo
from .sampling import RuleSampler as RuleSampler
from .sampling import SamplingStats as SamplingStats
from .sampling import SamplingStrategy as SamplingStrategy

_UPPER_LAYER = {
    "ProfileExporter": "otlp_middleware.export._otlp_http",
    "ProfileExporterConfig": "otlp_middleware.export._otlp_http",
    "ProfileBuilder": "otlp_middleware.otlp",
    "generate_profile_id": "otlp_middleware.otlp",
    "AttributeValue": "otlp_middleware.otlp",
}


def __getattr__(name: str) -> _Any:
    # Lazy, so this layer never imports the exporters at import time (no cycles).
    module = _UPPER_LAYER.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = [
    "AdaptiveSampler",
    "AlwaysSample",
    "AttributeValue",
    "CpuProfiler",
    "CpuProfilerConfig",
    "CpuProfilerStats",
    "MemoryProfiler",
    "MemoryProfilerConfig",
    "NeverSample",
    "ParentBasedSampler",
    "ProbabilisticSampler",
    "ProfileBuilder",
    "ProfileExporter",
    "ProfileExporterConfig",
    "RateSampler",
    "RequestInfo",
    "RuleSampler",
    "SamplingStats",
    "SamplingStrategy",
    "generate_profile_id",
    "profile_async",
    "profile_sync",
]
