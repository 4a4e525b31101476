"""FastAPI and Starlette integration: the pure ASGI ``ProfilingMiddleware``.

FastAPI needs nothing of its own: the ASGI middleware reads the matched route from
``scope["route"]`` (FastAPI's ``APIRoute.path``, ``APIRouter`` prefixes included, with the
mount prefix of a mounted sub-application in front) and attributes ``def`` endpoints, which
FastAPI runs in its thread pool, to their request. With configuration in the settings module
(``OTLP_MIDDLEWARE_SETTINGS_MODULE``) or the environment, no argument is needed::

    from fastapi import FastAPI
    from otlp_middleware.contrib.fastapi import ProfilingMiddleware

    app = FastAPI()
    app.add_middleware(ProfilingMiddleware)                      # settings / environment
    app.add_middleware(ProfilingMiddleware, sampler="rate:10")   # or explicit options

``otlp_middleware.profile_route`` and ``skip_profiling`` keep an endpoint's signature, so
FastAPI's parameter parsing, validation and OpenAPI schema are unchanged.

This module imports no framework: it is the same class as
``otlp_middleware.ProfilingMiddleware``, here so that each framework has its own import path.
"""

from __future__ import annotations

from ..middleware.asgi import ProfilingMiddleware as ProfilingMiddleware

__all__ = ["ProfilingMiddleware"]
