"""``WSGIProfilingMiddleware``: WSGI middleware profiling sampled requests.

A WSGI request owns its thread from the call until the response iterable is closed, so the
scope is the serving thread, closed in ``close()`` (PEP 3333 requires servers to call it).
``start_response`` is wrapped only to read the status; the body is passed through chunk by
chunk, so streaming responses stay streaming.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from types import TracebackType
from typing import Any

from ._core import RequestProfiler, RequestSlot
from ._factory import build_request_profiler

Environ = dict[str, Any]
ExcInfo = tuple[type[BaseException], BaseException, TracebackType]
StartResponse = Callable[..., Callable[[bytes], object]]
WSGIApp = Callable[[Environ, StartResponse], Iterable[bytes]]

ROUTE_ENVIRON_KEY = "otlp_middleware.route"
"""Framework adapters put the matched route template here (Flask's url rule, ...)."""

ERROR_ENVIRON_KEY = "otlp_middleware.error"
"""Framework adapters put an exception here that the framework turned into an error response
(Flask's ``got_request_exception``), so the profile still records ``error.type``."""


def _headers(environ: Environ) -> Mapping[str, str]:
    out = {
        key[5:].replace("_", "-").lower(): str(value)
        for key, value in environ.items()
        if key.startswith("HTTP_")
    }
    if "CONTENT_TYPE" in environ:
        out["content-type"] = str(environ["CONTENT_TYPE"])
    return out


class WSGIProfilingMiddleware:
    """Profiles sampled requests of any WSGI app (Flask, Django WSGI, bare WSGI, ...).

    Takes the same keyword options as ``ProfilingMiddleware``.

    Example::

        app.wsgi_app = WSGIProfilingMiddleware(app.wsgi_app, sampler="probabilistic:0.1")
    """

    def __init__(self, app: WSGIApp, *, profiler: RequestProfiler | None = None, **options: Any):
        self.app = app
        self.profiler = profiler if profiler is not None else build_request_profiler(**options)

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        profiler = self.profiler
        method = str(environ.get("REQUEST_METHOD", "GET"))
        path = str(environ.get("PATH_INFO", ""))
        sampled = profiler.should_profile(method, path, headers=lambda: _headers(environ))
        handle = profiler.begin(method) if sampled else None
        slot = profiler.open_slot(method, handle)
        if slot is None:
            return self.app(environ, start_response)
        tokens = profiler.enter_slot(slot)

        def done() -> None:
            error = environ.get(ERROR_ENVIRON_KEY)
            if isinstance(error, BaseException) and slot.handle is not None:
                slot.handle.set_error(error)
            slot.finish(environ.get(ROUTE_ENVIRON_KEY))
            profiler.exit_slot(tokens)

        def start_response_wrapper(
            status: str, headers: list[tuple[str, str]], exc_info: ExcInfo | None = None
        ) -> Callable[[bytes], object]:
            with contextlib.suppress(ValueError):
                slot.status_code = int(status.split(" ", 1)[0])
            if exc_info:
                return start_response(status, headers, exc_info)
            return start_response(status, headers)

        try:
            body = self.app(environ, start_response_wrapper)
        except BaseException as exc:
            _failed(slot, exc)
            done()
            raise
        return _ProfiledBody(body, slot, done)


def _failed(slot: RequestSlot, exc: BaseException) -> None:
    if slot.handle is not None:
        slot.handle.set_error(exc)
    if slot.status_code is None:
        slot.status_code = 500


class _ProfiledBody:
    """The app's response iterable, passed through; finishing the profile on ``close()``."""

    __slots__ = ("_body", "_done", "_slot")

    def __init__(self, body: Iterable[bytes], slot: RequestSlot, done: Callable[[], None]):
        self._body = body
        self._slot = slot
        self._done = done

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self._body
        except BaseException as exc:
            _failed(self._slot, exc)
            raise

    def close(self) -> None:
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            self._done()
