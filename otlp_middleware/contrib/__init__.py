"""Framework integrations, one module per framework, each imported only when asked for.

- ``otlp_middleware.contrib.django``: ``ProfilingMiddleware`` for ``settings.MIDDLEWARE``;
- ``otlp_middleware.contrib.flask``: the ``OtlpProfiling`` extension;
- ``otlp_middleware.contrib.fastapi``: ``ProfilingMiddleware`` for ``app.add_middleware``.

This package imports nothing, so ``import otlp_middleware`` never needs a framework installed.
"""
