"""The profiling middleware: a sans-IO core and thin ASGI/WSGI adapters."""

from ._core import ProfilerStats as ProfilerStats
from ._core import RequestHandle as RequestHandle
from ._core import RequestProfiler as RequestProfiler
from ._core import RouteOptions as RouteOptions
from .asgi import ProfilingMiddleware as ProfilingMiddleware
from .wsgi import WSGIProfilingMiddleware as WSGIProfilingMiddleware

__all__ = [
    "ProfilerStats",
    "ProfilingMiddleware",
    "RequestHandle",
    "RequestProfiler",
    "RouteOptions",
    "WSGIProfilingMiddleware",
]
