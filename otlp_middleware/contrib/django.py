"""Django integration: ``ProfilingMiddleware`` for ``settings.MIDDLEWARE``.

The middleware is hybrid (``sync_capable`` and ``async_capable``, as Django documents at
https://docs.djangoproject.com/en/stable/topics/http/middleware/#asynchronous-support): under
WSGI, or below synchronous middleware, a request owns its thread; under ASGI it owns the
frames below the middleware's own coroutine, so concurrent requests on one event loop keep
their samples apart, and ``def`` views that Django runs in a worker thread stay attributed.

Configuration comes from ``settings.OTLP_MIDDLEWARE`` (a dict with UPPER-case keys, see
``otlp_middleware.config.Settings``), read once when Django builds its middleware chain, then
the settings module named by ``OTLP_MIDDLEWARE_SETTINGS_MODULE`` and the environment.

Each profile carries the route template from the URL resolver (``resolver_match.route``,
as OpenTelemetry's Django instrumentation reports ``http.route``), the method, the status
code and, when the view raised, ``error.type``. A streaming response (``StreamingHttpResponse``,
``FileResponse``) under WSGI stays profiled while the server iterates it and is finished when
Django closes it.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction

from ..middleware._core import RequestProfiler, RequestSlot
from ..middleware._factory import build_request_profiler

__all__ = ["SETTINGS_NAME", "ProfilingMiddleware"]

SETTINGS_NAME = "OTLP_MIDDLEWARE"
"""The Django setting holding the options: ``OTLP_MIDDLEWARE = {"SAMPLER": "rate:10"}``."""

_SLOT = "_otlp_middleware_slot"  # the request's slot, for process_exception

logger = logging.getLogger(__name__)

# Django ships no type information: requests and responses are typed as Any here.
Request = Any
Response = Any
GetResponse = Callable[[Request], Any]


def framework_settings() -> Mapping[str, Any] | None:
    """``settings.OTLP_MIDDLEWARE``, or None when the project does not define it."""
    from django.conf import settings  # type: ignore[import-untyped, unused-ignore]

    value = getattr(settings, SETTINGS_NAME, None)
    return value  # validated by Settings.load


def import_urlconf() -> None:
    """Import the project's URLconf, and with it the views, now rather than at first request.

    Each request asks whether any ``profile_route`` / ``skip_profiling`` exists before its URL
    is resolved, and Django imports the URLconf lazily at the first resolution: without this,
    the very first request to a decorated view would miss its decorator. Django's own system
    checks import the URLconf the same way. A broken URLconf is left for Django to report at
    the first request, exactly as without this middleware.
    """
    try:
        from django.urls import get_resolver  # type: ignore[import-untyped, unused-ignore]

        get_resolver().url_patterns  # noqa: B018  (a cached property: imports the URLconf)
    except Exception:
        logger.debug("otlp_middleware: URLconf not importable yet", exc_info=True)


def _headers(request: Request) -> Mapping[str, str]:
    return {str(k).lower(): str(v) for k, v in request.headers.items()}


def _route(request: Request) -> str | None:
    """The resolver's route template: ``items/<int:pk>/`` (``path``) or the regex of ``re_path``."""
    match = getattr(request, "resolver_match", None)
    route = getattr(match, "route", None) if match is not None else None
    return route if isinstance(route, str) and route else None


class ProfilingMiddleware:
    """Profiles sampled requests of a Django project, under WSGI and ASGI.

    Add it near the top of ``MIDDLEWARE`` (below security middleware that may reject a
    request early, so that the profile covers the other middleware and the view)::

        MIDDLEWARE = [
            "django.middleware.security.SecurityMiddleware",
            "otlp_middleware.contrib.django.ProfilingMiddleware",
            ...
        ]
        OTLP_MIDDLEWARE = {"SAMPLER": "probabilistic:0.1", "EXCLUDE_PATHS": ["/healthz"]}

    Parameters: ``get_response`` (given by Django); keyword ``options`` override the settings
    (any option of ``otlp_middleware.config.Settings`` by attribute name, an ``exporter``
    object, or a ready ``profiler``). Django passes none, so subclass to give objects that
    settings cannot hold::

        class MyProfilingMiddleware(ProfilingMiddleware):
            def __init__(self, get_response):
                super().__init__(get_response, exporter=MyExporter())

    Per-view control: ``otlp_middleware.profile_route`` and ``otlp_middleware.skip_profiling``
    on function views, and on class-based views (the class itself, or ``method_decorator``
    on ``dispatch``).
    """

    sync_capable = True
    async_capable = True

    def __init__(
        self,
        get_response: GetResponse,
        *,
        profiler: RequestProfiler | None = None,
        **options: Any,
    ) -> None:
        if get_response is None:
            raise ValueError("get_response must be provided.")
        self.get_response = get_response
        self.async_mode = iscoroutinefunction(get_response)
        if self.async_mode:
            # Django then awaits __call__; the switch to __acall__ happens inside it.
            markcoroutinefunction(self)
        if profiler is None:
            profiler = build_request_profiler(framework_settings=framework_settings(), **options)
        self.profiler = profiler
        import_urlconf()

    def __call__(self, request: Request) -> Response:
        if self.async_mode:
            return self.__acall__(request)
        profiler = self.profiler
        method = str(request.method or "GET")
        sampled = profiler.should_profile(
            method, request.path_info, headers=lambda: _headers(request)
        )
        handle = profiler.begin(method) if sampled else None
        slot = profiler.open_slot(method, handle)
        if slot is None:
            return self.get_response(request)
        setattr(request, _SLOT, slot)
        tokens = profiler.enter_slot(slot)
        try:
            response = self.get_response(request)
        except BaseException as exc:
            _failed(slot, exc)
            slot.finish(_route(request))
            raise
        finally:
            profiler.exit_slot(tokens)
        slot.status_code = response.status_code
        route = _route(request)
        if response.streaming and _finish_on_close(response, slot, route):
            return response
        slot.finish(route)
        return response

    async def __acall__(self, request: Request) -> Response:
        profiler = self.profiler
        method = str(request.method or "GET")
        sampled = profiler.should_profile(
            method, request.path_info, headers=lambda: _headers(request)
        )
        # This coroutine's frame is the request's root: samples of the event loop's thread
        # belong to the request whose root frame is on the sampled stack.
        handle = profiler.begin(method, root_frame=sys._getframe()) if sampled else None
        slot = profiler.open_slot(method, handle)
        get_response: Callable[[Request], Awaitable[Response]] = self.get_response
        if slot is None:
            return await get_response(request)
        setattr(request, _SLOT, slot)
        tokens = profiler.enter_slot(slot)
        try:
            response = await get_response(request)
            slot.status_code = response.status_code
        except BaseException as exc:
            _failed(slot, exc)
            raise
        finally:
            # A streaming body is iterated by Django's ASGI handler, outside this frame: its
            # samples cannot be told apart, so the profile ends with the middleware chain.
            slot.finish(_route(request))
            profiler.exit_slot(tokens)
        return response

    def process_exception(self, request: Request, exception: Exception) -> None:
        """Record ``error.type`` of a view's exception (Django then makes the 500 response)."""
        slot: RequestSlot | None = getattr(request, _SLOT, None)
        if slot is not None and slot.handle is not None:
            slot.handle.set_error(exception)


def _failed(slot: RequestSlot, exc: BaseException) -> None:
    if slot.handle is not None:
        slot.handle.set_error(exc)
    if slot.status_code is None:
        slot.status_code = 500


def _finish_on_close(response: Response, slot: RequestSlot, route: str | None) -> bool:
    """Finish the profile when Django closes ``response``; False if there is no such hook.

    ``HttpResponseBase.close()`` runs each callable of ``_resource_closers`` (Django's own
    hook for streamed files and iterators); WSGI servers call ``close()`` after the last chunk.
    """
    closers = getattr(response, "_resource_closers", None)
    if not isinstance(closers, list):
        return False
    closers.append(lambda: slot.finish(route))
    return True
