"""Keep work that a request offloads to a thread attributed to that request.

The request's CPU scope is found where the call is handed over (``request_scope()``): a
request the ASGI adapter took at its leanest is the lean call running on the calling thread
(its scope is made from its request watcher, so the request path sets no contextvar); any
other travels in a contextvar (``CURRENT_SCOPE``). Where an async request hands a call to a
worker thread, the call is wrapped so that the worker thread is registered under a child
scope of the request for exactly the duration of that call:

- ``anyio.to_thread.run_sync``: Starlette's and FastAPI's ``def`` endpoints and
  ``run_in_threadpool``;
- ``asyncio``'s ``loop.run_in_executor`` (pure-Python event loops), which also carries
  ``asyncio.to_thread``.

The wrappers are installed once (``install()``, idempotent) by the middleware and cost one
contextvar read and one dictionary check per offloaded call when no request is being
profiled. Event loops written in
C or Cython (uvloop) do not route through ``run_in_executor`` in Python; their offloaded calls
are not attributed.
"""

from __future__ import annotations

import contextvars
import functools
import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from ._engine import ENGINE
from ._scope import Scope

logger = logging.getLogger(__name__)

T = TypeVar("T")

CURRENT_SCOPE: contextvars.ContextVar[Scope | None] = contextvars.ContextVar(
    "otlp_middleware_cpu_scope", default=None
)
"""The CPU scope of the request being served in this context, if it is profiled."""


def request_scope() -> Scope | None:
    """The CPU scope of the request being served where this is called, if it is profiled.

    The contextvar, else the scope (``Engine.request_scope``) of the open request watcher
    of the innermost lean call running on this thread (``Engine.running_request``).
    """
    scope = CURRENT_SCOPE.get()
    if scope is None and ENGINE.open_watchers():
        watcher = ENGINE.running_request()
        if watcher is not None:
            scope = ENGINE.request_scope(watcher)
    return scope


_installed = False
_install_lock = threading.Lock()


def attributed(scope: Scope, fn: Callable[..., T]) -> Callable[..., T]:
    """``fn`` wrapped to run under a child scope of ``scope`` on whatever thread calls it."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> T:
        if scope.closed_ns is not None:
            return fn(*args, **kwargs)
        child = ENGINE.open_child_scope(scope)
        try:
            return fn(*args, **kwargs)
        finally:
            ENGINE.close(child)

    return run


def _wrap_anyio() -> None:
    try:
        import anyio.to_thread
    except ImportError:
        return
    original = anyio.to_thread.run_sync
    if getattr(original, "__otlp_middleware__", False):
        return

    @functools.wraps(original)
    async def run_sync(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        scope = request_scope()
        if scope is not None:
            func = attributed(scope, func)
        return await original(func, *args, **kwargs)

    run_sync.__otlp_middleware__ = True  # type: ignore[attr-defined]
    setattr(anyio.to_thread, "run_sync", run_sync)  # noqa: B010


def _wrap_asyncio() -> None:
    import asyncio.base_events

    cls = asyncio.base_events.BaseEventLoop
    original = cls.run_in_executor
    if getattr(original, "__otlp_middleware__", False):
        return

    @functools.wraps(original)
    def run_in_executor(self: Any, executor: Any, func: Callable[..., Any], *args: Any) -> Any:
        scope = request_scope()
        if scope is not None:
            func = attributed(scope, func)
        return original(self, executor, func, *args)

    run_in_executor.__otlp_middleware__ = True  # type: ignore[attr-defined]
    setattr(cls, "run_in_executor", run_in_executor)  # noqa: B010


def install() -> None:
    """Install the offload wrappers (once per process)."""
    global _installed
    with _install_lock:
        if _installed:
            return
        _wrap_asyncio()
        _wrap_anyio()
        _installed = True
