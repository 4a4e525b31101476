"""otlp-middleware: per-request CPU and heap profiling for Python web apps.

Add one middleware; sampled requests get CPU (and, when enabled, heap) samples of exactly
their own work, tagged with their OpenTelemetry span, exported as OTLP profiles to a collector
or written as pprof files::

    from otlp_middleware import ProfilingMiddleware
    app.add_middleware(ProfilingMiddleware, sampler="probabilistic:0.1")

Framework integrations live in ``otlp_middleware.contrib`` (django, flask, fastapi); the
standalone profilers in ``otlp_middleware.profiling``.
"""

from ._decorators import profile_route as profile_route
from ._decorators import skip_profiling as skip_profiling
from ._version import __version__ as __version__
from .config import Settings as Settings
from .errors import ConfigurationError as ConfigurationError
from .errors import OtlpMiddlewareError as OtlpMiddlewareError
from .errors import ProfilerStateError as ProfilerStateError
from .export import BatchProcessor as BatchProcessor
from .export import ExportResult as ExportResult
from .export import FileExporter as FileExporter
from .export._otlp_http import ProfileExporter as ProfileExporter
from .export._otlp_http import ProfileExporterConfig as ProfileExporterConfig
from .middleware import ProfilingMiddleware as ProfilingMiddleware
from .middleware import RequestProfiler as RequestProfiler
from .middleware import WSGIProfilingMiddleware as WSGIProfilingMiddleware
from .otlp import AttributeValue as AttributeValue
from .otlp import ProfileBuilder as ProfileBuilder
from .otlp import generate_profile_id as generate_profile_id
from .profiling import CpuProfiler as CpuProfiler
from .profiling import CpuProfilerConfig as CpuProfilerConfig
from .profiling import MemoryProfiler as MemoryProfiler
from .profiling import MemoryProfilerConfig as MemoryProfilerConfig
from .profiling import profile_async as profile_async
from .profiling import profile_sync as profile_sync
from .profiling.sampling import AdaptiveSampler as AdaptiveSampler
from .profiling.sampling import AlwaysSample as AlwaysSample
from .profiling.sampling import NeverSample as NeverSample
from .profiling.sampling import ParentBasedSampler as ParentBasedSampler
from .profiling.sampling import ProbabilisticSampler as ProbabilisticSampler
from .profiling.sampling import RateSampler as RateSampler
from .profiling.sampling import RequestInfo as RequestInfo
from .profiling.sampling import RuleSampler as RuleSampler
from .profiling.sampling import SamplingStats as SamplingStats
from .profiling.sampling import SamplingStrategy as SamplingStrategy

__all__ = [
    "AdaptiveSampler",
    "AlwaysSample",
    "AttributeValue",
    "BatchProcessor",
    "ConfigurationError",
    "CpuProfiler",
    "CpuProfilerConfig",
    "ExportResult",
    "FileExporter",
    "MemoryProfiler",
    "MemoryProfilerConfig",
    "NeverSample",
    "OtlpMiddlewareError",
    "ParentBasedSampler",
    "ProbabilisticSampler",
    "ProfileBuilder",
    "ProfileExporter",
    "ProfileExporterConfig",
    "ProfilerStateError",
    "ProfilingMiddleware",
    "RateSampler",
    "RequestInfo",
    "RequestProfiler",
    "RuleSampler",
    "SamplingStats",
    "SamplingStrategy",
    "Settings",
    "WSGIProfilingMiddleware",
    "__version__",
    "generate_profile_id",
    "profile_async",
    "profile_route",
    "profile_sync",
    "skip_profiling",
]
