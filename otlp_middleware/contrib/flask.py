"""Flask integration: the ``OtlpProfiling`` extension.

It wraps ``app.wsgi_app`` in ``WSGIProfilingMiddleware`` (a request owns its thread until the
server closes the response, so streamed bodies stay profiled) and tells it the matched URL
rule (``/items/<int:item_id>``, blueprint prefixes included) as the route template.
Configuration comes from ``app.config["OTLP_MIDDLEWARE"]`` (a dict with UPPER-case keys, see
``otlp_middleware.config.Settings``), then the settings module named by
``OTLP_MIDDLEWARE_SETTINGS_MODULE`` and the environment; keyword options win over all.
"""

from __future__ import annotations

import weakref
from typing import Any

from flask import Flask, got_request_exception, request

from ..middleware._core import RequestProfiler
from ..middleware._factory import build_request_profiler
from ..middleware.wsgi import ERROR_ENVIRON_KEY, ROUTE_ENVIRON_KEY, WSGIProfilingMiddleware

__all__ = ["CONFIG_KEY", "EXTENSION_NAME", "OtlpProfiling"]

CONFIG_KEY = "OTLP_MIDDLEWARE"
"""The ``app.config`` key holding the options: ``app.config["OTLP_MIDDLEWARE"] = {...}``."""

EXTENSION_NAME = "otlp_middleware"
"""The extension's key in ``app.extensions``."""


def _record_route() -> None:
    rule = request.url_rule
    if rule is not None:
        request.environ[ROUTE_ENVIRON_KEY] = rule.rule


def _record_error(sender: Flask, exception: BaseException, **extra: Any) -> None:
    # Flask turns the exception into a 500 response: the WSGI layer never sees it raised.
    request.environ[ERROR_ENVIRON_KEY] = exception


class OtlpProfiling:
    """Profiles sampled requests of a Flask app.

    Parameters: ``app`` (or call ``init_app`` later, for the application factory pattern);
    keyword ``options`` override ``app.config["OTLP_MIDDLEWARE"]`` (any option of
    ``otlp_middleware.config.Settings`` by attribute name, an ``exporter`` object), or pass a
    ready ``profiler``.

    Example::

        app = Flask(__name__)
        app.config["OTLP_MIDDLEWARE"] = {"SAMPLER": "rate:10", "EXCLUDE_PATHS": ["/healthz"]}
        profiling = OtlpProfiling(app)

        # or, with an application factory
        profiling = OtlpProfiling()
        def create_app():
            app = Flask(__name__)
            profiling.init_app(app)
            return app

    ``profiling.profiler`` is the ``RequestProfiler`` of the app last initialised (``stats()``,
    ``force_flush()``, ``shutdown()``); each app gets its own, also found as
    ``app.extensions["otlp_middleware"].profiler_for(app)``.
    """

    def __init__(
        self, app: Flask | None = None, *, profiler: RequestProfiler | None = None, **options: Any
    ) -> None:
        self._given_profiler = profiler
        self._options = options
        self._profilers: weakref.WeakKeyDictionary[Flask, RequestProfiler] = (
            weakref.WeakKeyDictionary()
        )
        self.profiler: RequestProfiler | None = None
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Wrap ``app.wsgi_app`` and register the route hook. Once per app."""
        if EXTENSION_NAME in app.extensions:
            raise RuntimeError(f"{app!r} already has otlp_middleware's OtlpProfiling")
        profiler = self._given_profiler
        if profiler is None:
            profiler = build_request_profiler(
                framework_settings=app.config.get(CONFIG_KEY), **self._options
            )
        app.wsgi_app = WSGIProfilingMiddleware(  # type: ignore[method-assign]
            app.wsgi_app, profiler=profiler
        )
        app.before_request(_record_route)
        got_request_exception.connect(_record_error, app)
        app.extensions[EXTENSION_NAME] = self
        self._profilers[app] = profiler
        self.profiler = profiler

    def profiler_for(self, app: Flask) -> RequestProfiler:
        """The ``RequestProfiler`` serving ``app``."""
        try:
            return self._profilers[app]
        except KeyError:
            raise LookupError(f"init_app was not called for {app!r}") from None
