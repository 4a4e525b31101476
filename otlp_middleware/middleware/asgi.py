"""``ProfilingMiddleware``: pure ASGI middleware profiling sampled HTTP requests.

Pure ASGI (never Starlette's ``BaseHTTPMiddleware``, which breaks contextvar propagation):
non-HTTP scopes (lifespan, websocket) pass through, ``send`` is wrapped only to
read the status and to notice the last body chunk, and responses stream unchanged.

The lifespan scope passes through too, except that the profiles still queued are exported
when the app reports its shutdown complete.

A sampled request owns the frames below this middleware's own coroutine frame: samples of
the event loop's thread belong to the request whose frame is on the sampled stack, so
concurrent requests on one loop never share samples. Work the request offloads to threads
(``def`` endpoints, ``asyncio.to_thread``, ``run_in_executor``) stays attributed to it.
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

    def __init__(self, app: ASGIApp, *, profiler: RequestProfiler | None = None, **options: Any):
        self.app = app
        self.profiler = profiler if profiler is not None else build_request_profiler(**options)
        if self.profiler.cpu is not None:
            ENGINE.register_root_code(ProfilingMiddleware.__call__.__code__, watcher="watcher")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Every request: decide; a sampled one at its leanest (it runs for each of them).

        This coroutine's frame is the request's root. The engine knows its code and the local
        that holds the request's watcher (registered in ``__init__``), so on the native
        tier, from the second request on, one C call (``Engine.watch_request``) makes the
        watcher, which is at once ``send`` (it notes the status, and ends the request at the
        last body chunk) and the request's CPU scope, registered nowhere; one C call
        (``Engine.finish_request``) ends it; and only a request that took a sample gets a
        scope object, handed on to have its record built on the engine's collector thread.
        Cold caches make every Python call and object here cost microseconds under load,
        so these calls are inline. Elsewhere ``_call_with_handle`` does the work through a
        ``RequestHandle``.
        """
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                send = self._flushing_at_shutdown(send)
            await self.app(scope, receive, send)
            return
        profiler = self.profiler
        lean = profiler.always_lean
        if lean is not None and not ROUTE_DECORATORS["in_use"]:
            # Every request not excluded is profiled (``AlwaysSample``): nothing to decide but
            # the excluded paths, then to count, inline as ``should_profile`` and
            # ``AlwaysSample.should_sample`` would.
            if profiler.exclude_paths:
                path = scope.get("path", "")
                match = profiler._exclude_match
                if (
                    path in profiler._exclude_exact
                    or path.startswith(profiler._exclude_prefixes)
                    or (match is not None and match(path) is not None)
                ):
                    profiler._requests += 1
                    await self.app(scope, receive, send)
                    return
            next(profiler._sampler._count)  # type: ignore[attr-defined]
            decided = False
        else:
            method = scope.get("method", "GET")
            headers = partial(_headers, scope) if profiler.sampler.needs_request else None
            sampled = profiler.should_profile(method, scope.get("path", ""), headers=headers)
            if ROUTE_DECORATORS["in_use"]:
                await self._call_with_slot(scope, receive, send, method, sampled)
                return
            if not sampled:
                await self.app(scope, receive, send)
                return
            # A request that needs only on-CPU samples (``lean_root``) takes the lean path.
            lean = profiler.lean_root
            decided = True  # ``should_profile`` counted the request
        # The lean path: a watcher made in one call into the extension; None (then the general
        # path) where that does not apply, as for a server's first profiled request (the
        # sampler does not run yet).
        watcher = None
        if lean is not None:
            try:
                watcher = ENGINE.watch_request(send, lean[0], lean[1], lean[2])
            except Exception:
                profiler._fault("opening a request's profile")
        if watcher is None:
            if not decided:
                profiler._requests += 1  # and ``begin`` counts it sampled
            await self._call_with_handle(scope, receive, send, scope.get("method", "GET"))
            return
        if decided:
            profiler._sampled += 1
        else:
            profiler._lean += 1  # a request, sampled: one count for both (see ``stats``)
        # Registered nowhere: while ``watcher`` (this local, the slot the handler reads) is
        # open, samples taken below this frame are this request's. Work it offloads to
        # threads finds it there too (``_offload.request_scope``). No contextvar: uvicorn's
        # keep-alive timer, made as the response ends, keeps a copy of the context for
        # seconds, and with it every request's objects for the garbage collector.
        root_path = scope.get("root_path", "")  # a mount adds to it: the route's prefix
        error: BaseException | None = None
        try:
            await self.app(scope, receive, watcher)
        except BaseException as exc:
            error = exc
            raise
        finally:
            # One C call ends the request; True if no sample is its own, as for about 9 in
            # 10 requests at 99 Hz. Else its record is built on the collector thread.
            try:
                if ENGINE.finish_request(watcher):
                    profiler._empty += 1
                else:  # the context now: the collector reads the OpenTelemetry span from it
                    context = copy_context()
                    route = _route_or_none(scope, root_path)  # not the scope: it can go
                    method = scope.get("method", "GET")
                    finish = partial(_finish_lean, profiler, method, route, error, context)
                    ENGINE.release_request(watcher, finish)
            except Exception:
                profiler._fault("closing a request's profile")

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
