"""``ProfilingMiddleware``: pure ASGI middleware profiling sampled HTTP requests.

Pure ASGI (never Starlette's ``BaseHTTPMiddleware``, which breaks contextvar propagation):
non-HTTP scopes (lifespan, websocket) pass through, ``send`` is wrapped only to
read the status and to notice the last body chunk, and responses stream unchanged.

The lifespan scope passes through too, except that the profiles still queued are exported
when the app reports its shutdown complete.

A sampled request owns what runs while its app's awaitable runs: on the lean path (see
``ProfilingMiddleware.__call__``), samples of the event loop's thread belong to the request
whose lean call is stepping the app at that moment; on the general path, to the request whose
root coroutine frame is on the sampled stack. Concurrent requests on one loop never share
samples. Work the request offloads to threads (``def`` endpoints, ``asyncio.to_thread``,
``run_in_executor``) stays attributed to it.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from contextvars import Context, copy_context
from functools import partial
from typing import Any

from ..profiling import _offload
from ..profiling._engine import ENGINE
from ..profiling._heap import enter as heap_enter
from ..profiling._heap import exit as heap_exit
from ._core import ROUTE_DECORATORS, RequestHandle, RequestProfiler, RequestSlot
from ._factory import build_request_profiler

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def _headers(scope: Scope) -> Mapping[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}


def route_template(scope: Scope, root_path: str) -> str | None:
    """The matched route's template (Starlette/FastAPI set ``scope["route"]``), else None.

    Mounted sub-applications add their mount prefix to ``root_path``; it is kept in front of
    the inner route's template.
    """
    route = scope.get("route")
    path = getattr(route, "path", None) if route is not None else None
    if not isinstance(path, str):
        return None
    prefix = str(scope.get("root_path", ""))[len(root_path) :]
    return prefix + path


class ProfilingMiddleware:
    """Profiles sampled HTTP requests of any ASGI app (FastAPI, Starlette, Django ASGI, ...).

    Parameters: ``app``, then keyword options (see ``otlp_middleware.config.Settings``):
    ``sampler`` (a strategy or spec such as ``"probabilistic:0.1"``), ``cpu`` (True/False or
    a ``CpuProfilerConfig``), ``memory``, ``exporter`` (any ``Exporter``; default: OTLP when
    an endpoint is configured, else pprof files in ``./profiles``), ``exclude_paths`` (globs),
    ``enabled``, and the rest of the settings; or a ready ``profiler=RequestProfiler(...)``.

    Example::

        app = FastAPI()
        app.add_middleware(ProfilingMiddleware, sampler="rate:10")
    """

    # asgiref's mark of an ASGI 3 app (one callable taking scope, receive and send).
    _asgi_single_callable = True

    def __init__(self, app: ASGIApp, *, profiler: RequestProfiler | None = None, **options: Any):
        self.app = app
        self.profiler = profiler if profiler is not None else build_request_profiler(**options)
        self._on_end = self._lean_end  # made once: the extension calls it (see ``__call__``)
        # Servers tell an ASGI 3 app from an ASGI 2 one by reading ``app.__call__`` and asking
        # whether it is a coroutine function (uvicorn, hypercorn, asgiref). ``__call__`` is a
        # plain function returning the request's awaitable (it saves every request a
        # coroutine of its own), so this instance attribute answers for it: the coroutine
        # function ``_call``, which serves any scope the same. Calling the instance runs the
        # class's ``__call__``; reading ``app.__call__`` finds this.
        self.__call__ = self._call  # type: ignore[method-assign]

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        """Every request: decide, and return the awaitable that serves it.

        A request not profiled gets the app's own awaitable: no layer of ours is left in it.
        A profiled request that needs only on-CPU samples gets, from the second request on,
        a lean call (``RequestProfiler.lean_path``, made in one call into the extension): the
        request's watcher, which is at once the ``send`` the app is given (it notes the
        status, and ends the request at the last body chunk), the request's CPU scope
        (samples taken while it runs the app are its request's) and the awaitable that runs
        the app. It ends the request itself; only a request that took a sample reaches
        Python again (``_lean_end``), to have its record built on the engine's collector
        thread. Cold caches make every Python call and object here cost microseconds under
        load, so with ``AlwaysSample`` the decision (the excluded paths, its count) is made in
        that same call. Everything else, as other scope types and route decorators, goes
        through the coroutine ``_call``.
        """
        if scope["type"] != "http" or ROUTE_DECORATORS["in_use"]:
            return self._call(scope, receive, send)
        profiler = self.profiler
        lean = profiler.lean_path
        if profiler.lean_always and lean is not None:
            # Every request not excluded is profiled (``AlwaysSample``): the lean path checks
            # the excluded paths and counts the decision itself (``decided`` False).
            call = lean(self.app, scope, receive, send, self._on_end, False)
            if call is not None:
                return call  # type: ignore[no-any-return]
            lean = None  # it does not apply yet: the general path, deciding as any strategy
        method = scope.get("method", "GET")
        headers = partial(_headers, scope) if profiler.sampler.needs_request else None
        if not profiler.should_profile(method, scope.get("path", ""), headers=headers):
            return self.app(scope, receive, send)
        if lean is not None:
            call = lean(self.app, scope, receive, send, self._on_end, True)
            if call is not None:
                return call  # type: ignore[no-any-return]
        # the general path, also for a server's first profiled request (the sampler does not
        # run yet, so the lean call does not apply)
        return self._call_with_handle(scope, receive, send, method)

    async def _call(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The middleware as a coroutine function: what ``app.__call__`` reads as.

        Serves any scope: non-HTTP ones pass through (lifespan with the profiles flushed at
        shutdown), HTTP requests through the decision and the general path (``RequestHandle``)
        or, with route decorators in use, through the request's slot.
        """
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                send = self._flushing_at_shutdown(send)
            await self.app(scope, receive, send)
            return
        profiler = self.profiler
        method = scope.get("method", "GET")
        headers = partial(_headers, scope) if profiler.sampler.needs_request else None
        sampled = profiler.should_profile(method, scope.get("path", ""), headers=headers)
        if ROUTE_DECORATORS["in_use"]:
            await self._call_with_slot(scope, receive, send, method, sampled)
        elif sampled:
            await self._call_with_handle(scope, receive, send, method)
        else:
            await self.app(scope, receive, send)

    def _lean_end(
        self, watcher: Any, scope: Scope, root_path: str, error: BaseException | None
    ) -> None:
        """A lean call's request that took samples, as it ends (the extension calls this).

        Reads what the record needs while the request's context and scope are at hand: the
        context (the collector reads the OpenTelemetry span from it), the route, and hands
        the watcher on (``ENGINE.release_request``) to have the record built on the
        collector thread. What it makes waits for the collector, so it is made in the private
        heap (``profiling._heap``), out of the app's allocator pools. Never raises: a failure
        is logged and counted.
        """
        heap_enter()  # what waits for the collector: out of the app's pools
        try:
            context = copy_context()
            route = _route_or_none(scope, root_path)  # not the scope: it can go
            method = scope.get("method", "GET")
            finish = partial(_finish_lean, self.profiler, method, route, error, context)
            ENGINE.release_request(watcher, finish)
        except Exception:
            self.profiler._fault("closing a request's profile")
        finally:
            heap_exit()

    def _flushing_at_shutdown(self, send: Send) -> Send:
        """``send`` for the lifespan scope: flush the profiles before shutdown completes.

        Servers may end the process without running exit hooks (uvicorn re-raises the
        SIGTERM it handled), so the profiles of the last requests are exported when the
        app reports its shutdown complete, in a worker thread (the loop keeps running).
        """

        async def send_wrapper(message: Message) -> None:
            if message.get("type") in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                profiler = self.profiler
                timeout = profiler.processor.export_timeout
                try:
                    await asyncio.get_running_loop().run_in_executor(
                        None, profiler.force_flush, timeout
                    )
                except Exception:
                    logger.warning(
                        "otlp_middleware: flushing profiles at shutdown failed", exc_info=True
                    )
            await send(message)

        return send_wrapper

    async def _call_with_handle(
        self, scope: Scope, receive: Receive, send: Send, method: str
    ) -> None:
        """A sampled request through a ``RequestHandle``: memory profiling, other tiers."""
        profiler = self.profiler
        handle = profiler.begin(method, root_frame=sys._getframe())
        if handle is None:
            await self.app(scope, receive, send)
            return
        root_path = scope.get("root_path", "")
        handle.route_source = lambda: _route_or_none(scope, root_path)
        cpu = handle._cpu_scope
        token = _offload.CURRENT_SCOPE.set(cpu) if cpu is not None else None

        try:
            await self.app(scope, receive, _watch_send(send, handle, handle.close_scopes))
        except BaseException as exc:
            handle.set_error(exc)
            if handle.status_code is None:
                handle.status_code = 500
            raise
        finally:
            handle.finish()
            if token is not None:
                profiler.exit_context(token)

    async def _call_with_slot(
        self, scope: Scope, receive: Receive, send: Send, method: str, sampled: bool
    ) -> None:
        """The request path when route decorators are in use: they may start or skip it."""
        profiler = self.profiler
        handle = profiler.begin(method, root_frame=sys._getframe()) if sampled else None
        slot = profiler.open_slot(method, handle)
        assert slot is not None
        tokens = profiler.enter_slot(slot)
        try:
            await self._call_profiled(slot, scope, receive, send)
        finally:
            profiler.exit_slot(tokens)

    async def _call_profiled(
        self, slot: RequestSlot, scope: Scope, receive: Receive, send: Send
    ) -> None:
        root_path = str(scope.get("root_path", ""))
        send_wrapper = _watch_send(send, slot, lambda: _close(slot, scope, root_path))
        try:
            await self.app(scope, receive, send_wrapper)
        except BaseException as exc:
            if slot.handle is not None:
                slot.handle.set_error(exc)
            if slot.status_code is None:
                slot.status_code = 500
            raise
        finally:
            _close(slot, scope, root_path)


def _watch_send(
    send: Send, target: RequestHandle | RequestSlot, complete: Callable[[], None]
) -> Send:
    """``send``, noting the status on ``target`` and calling ``complete`` at the last body.

    The request closes when its response is complete: when the app hands over its last
    body chunk (background tasks that run after it are not the request, nor is the server's
    write of that chunk). Messages pass through unchanged (streams stream). A plain function
    returning ``send``'s awaitable: no coroutine of its own per message.
    """

    def send_wrapper(message: Message) -> Awaitable[None]:
        kind = message.get("type")
        if kind == "http.response.start":
            target.status_code = message.get("status")
        elif kind == "http.response.body" and not message.get("more_body", False):
            complete()
        return send(message)

    return send_wrapper


def _finish_lean(
    profiler: RequestProfiler,
    method: str,
    route: str | None,
    error: BaseException | None,
    context: Context,
    watcher: Any,
    cpu: Any,
) -> None:
    """The record of a lean request that took samples, on the engine's collector thread."""
    profiler._finish_root(method, watcher.status, error, route, context, cpu)


def _route_or_none(scope: Scope, root_path: str) -> str | None:
    try:
        return route_template(scope, str(root_path))
    except Exception:  # a route object we do not understand: no route attribute
        return None


def _close(slot: RequestSlot, scope: Scope, root_path: str) -> None:
    if slot.handle is None:
        return
    slot.finish(_route_or_none(scope, root_path))
