"""The ASGI middleware's lean call: what servers see, and the awaitable protocol it keeps.

``ProfilingMiddleware.__call__`` is a plain function: it returns the app's own awaitable for a
request not profiled, and for a profiled one (from the second request on, when the sampler
runs) the extension's lean call, which runs the app's awaitable step by step. These tests
hold it to what a coroutine in its place would do: values, exceptions, cancellation,
``close()``, awaitables that are not coroutines, being dropped unawaited; and to what
servers check before they serve an app (that it is an ASGI 3 app).
"""

from __future__ import annotations

import asyncio
import collections.abc
import gc
import inspect
import warnings
from collections.abc import Generator
from typing import Any

import pytest

from otlp_middleware.middleware import ProfilingMiddleware
from otlp_middleware.profiling._engine import ENGINE

from . import workloads
from .test_middleware import KeepingExporter, asgi_get, make, names

needs_lean = pytest.mark.skipif(
    not ENGINE.native_available or ENGINE.method not in ("auto", "native"),
    reason="the lean call runs on the native tier",
)

SCOPE = {"type": "http", "method": "GET", "path": "/x", "headers": [], "root_path": ""}


async def receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def send(message: dict[str, Any]) -> None:
    pass


async def ok(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture(autouse=True)
def no_route_decorators(monkeypatch: pytest.MonkeyPatch) -> None:
    from otlp_middleware.middleware._core import ROUTE_DECORATORS

    monkeypatch.setitem(ROUTE_DECORATORS, "in_use", False)  # other test modules apply some


def lean(mw: ProfilingMiddleware, scope: dict[str, Any] | None = None) -> Any:
    """``mw``'s awaitable for a request, checked to be a lean call."""
    call = mw(dict(scope or SCOPE), receive, send)
    assert type(call).__name__ == "SendWatcher", type(call)
    return call


def test_servers_take_it_for_an_asgi3_app() -> None:
    """uvicorn, hypercorn and asgiref read ``app.__call__`` and ask whether it is a coroutine
    function; the class's ``__call__`` is a plain function, the instance answers for it."""
    mw = ProfilingMiddleware(ok, sampler="never")
    assert not inspect.iscoroutinefunction(ProfilingMiddleware.__call__)
    assert inspect.iscoroutinefunction(mw.__call__)  # hypercorn's is_asgi, 3.14's asyncio
    assert asyncio.iscoroutinefunction(mw.__call__)  # uvicorn's before 3.14, asgiref's
    uvicorn = pytest.importorskip("uvicorn")
    config = uvicorn.Config(mw, log_level="warning")
    config.load()
    assert config.interface == "asgi3"
    asgiref = pytest.importorskip("asgiref.compatibility")
    assert asgiref.guarantee_single_callable(mw) is mw
    sent = asyncio.run(asgi_get(mw.__call__, "/via-the-coroutine"))  # it serves, too
    assert sent[-1]["body"] == b"ok"
    mw.profiler.shutdown(5)


def test_a_request_not_profiled_gets_the_apps_own_awaitable() -> None:
    mw = make(ok, KeepingExporter(), sampler="never")
    call = mw(dict(SCOPE), receive, send)
    assert inspect.iscoroutine(call) and call.cr_code is ok.__code__  # no layer of ours
    asyncio.run(call)
    excluded = make(ok, KeepingExporter(), exclude_paths=["/health"])
    asyncio.run(asgi_get(excluded, "/warm"))
    call = excluded({**SCOPE, "path": "/health"}, receive, send)
    assert inspect.iscoroutine(call) and call.cr_code is ok.__code__
    asyncio.run(call)
    stats = excluded.profiler.stats()
    assert (stats.requests, stats.sampled) == (2, 1)
    mw.profiler.shutdown(5)
    excluded.profiler.shutdown(5)


@needs_lean
def test_the_lean_call_returns_raises_and_ends_as_a_coroutine_would() -> None:
    seen: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> Any:
        seen.append(ENGINE.running_request())
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await asyncio.sleep(0)
        await send({"type": "http.response.body", "body": b"ok"})
        if scope["path"] == "/raise":
            raise LookupError("the app's own")
        return "value"

    mw = make(app, KeepingExporter())

    async def main() -> None:
        await asgi_get(mw, "/warm")  # the first request starts and arms the sampler
        call = lean(mw)
        assert asyncio.iscoroutine(call)  # asyncio takes it for one (create_task, gather)
        assert isinstance(call, collections.abc.Coroutine)
        assert await asyncio.create_task(call) == "value"  # what the app returns comes through
        assert seen[-1] is call and call.status == 201 and not call.open
        assert ENGINE.running_request() is None  # only while the app's awaitable runs
        with pytest.raises(RuntimeError, match="reuse"):
            await call
        error = None
        try:
            await lean(mw, {**SCOPE, "path": "/raise"})
        except LookupError as exc:
            error = exc
        assert error is not None and error.args == ("the app's own",)
        assert error.__traceback__ is not None
        assert any(f.name == "app" for f in __import__("traceback").extract_tb(error.__traceback__))

    asyncio.run(main())
    assert ENGINE.open_watchers() == 0
    stats = mw.profiler.stats()
    assert (stats.requests, stats.sampled) == (3, 3)
    mw.profiler.shutdown(5)


@needs_lean
def test_a_cancelled_or_closed_lean_call_ends_its_request() -> None:
    cleaned: list[str] = []

    async def slow(scope: Any, receive: Any, send: Any) -> None:
        try:
            await asyncio.sleep(30)
        finally:
            cleaned.append(scope["path"])

    mw = make(slow, KeepingExporter())

    async def outer(call: Any) -> None:
        await call

    async def main() -> None:
        warm = asyncio.ensure_future(asgi_get(mw, "/warm"))
        await asyncio.sleep(0.05)
        warm.cancel()
        with pytest.raises(asyncio.CancelledError):
            await warm
        task = asyncio.ensure_future(lean(mw, {**SCOPE, "path": "/cancelled"}))
        await asyncio.sleep(0.05)
        assert ENGINE.open_watchers() == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert cleaned[-1] == "/cancelled" and ENGINE.open_watchers() == 0
        # closed while suspended, as a server's task is when it is dropped
        coro = outer(lean(mw, {**SCOPE, "path": "/closed"}))
        coro.send(None)
        assert ENGINE.open_watchers() == 1
        coro.close()
        assert cleaned[-1] == "/closed" and ENGINE.open_watchers() == 0
        # and dropped while suspended: finalised the same way
        coro = outer(lean(mw, {**SCOPE, "path": "/dropped"}))
        coro.send(None)
        del coro
        gc.collect()
        assert cleaned[-1] == "/dropped" and ENGINE.open_watchers() == 0

    asyncio.run(main())
    mw.profiler.shutdown(5)


class Handmade:
    """An awaitable that is not a coroutine: ``__await__`` is a generator."""

    def __init__(self, send: Any) -> None:
        self.send = send

    def __await__(self) -> Generator[Any, None, str]:
        yield from self.send({"type": "http.response.start", "status": 204}).__await__()
        yield from asyncio.sleep(0).__await__()
        yield from self.send({"type": "http.response.body", "body": b""}).__await__()
        return "handmade"


@needs_lean
def test_apps_returning_other_awaitables_or_failing_at_once() -> None:
    def handmade_app(scope: Any, receive: Any, send: Any) -> Handmade:
        return Handmade(send)

    def broken_app(scope: Any, receive: Any, send: Any) -> Any:
        raise TypeError("wrong signature, say")

    def not_awaitable_app(scope: Any, receive: Any, send: Any) -> Any:
        return 42

    mw = make(handmade_app, KeepingExporter())

    async def main() -> None:
        await asgi_get(mw, "/warm")
        call = lean(mw)
        assert await call == "handmade" and call.status == 204
        mw.app = broken_app
        with pytest.raises(TypeError, match="wrong signature"):
            mw(dict(SCOPE), receive, send)  # raised where the app was called
        mw.app = not_awaitable_app
        with pytest.raises(TypeError, match="can't be used in 'await' expression"):
            mw(dict(SCOPE), receive, send)

    asyncio.run(main())
    assert ENGINE.open_watchers() == 0
    mw.profiler.shutdown(5)


@needs_lean
def test_a_lean_call_never_awaited_ends_its_request() -> None:
    mw = make(ok, KeepingExporter())

    async def main() -> None:
        await asgi_get(mw, "/warm")
        call = lean(mw)
        assert ENGINE.open_watchers() == 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the app's coroutine: never run
            del call
            gc.collect()
        assert ENGINE.open_watchers() == 0

    asyncio.run(main())
    mw.profiler.shutdown(5)


@needs_lean
def test_nested_middlewares_both_profile_the_request() -> None:
    """An app mounted under another profiled app: each middleware's lean call runs on the
    thread while the inner one does, so the samples belong to both requests."""
    inner_exporter, outer_exporter = KeepingExporter(), KeepingExporter()

    async def burn(scope: Any, receive: Any, send: Any) -> None:
        workloads.hot_function(0.15)
        await ok(scope, receive, send)

    inner = make(burn, inner_exporter)
    outer = make(inner, outer_exporter)

    async def main() -> None:
        await asgi_get(outer, "/warm")
        call = lean(outer)
        await call

    asyncio.run(main())
    inner.profiler.shutdown(5)
    outer.profiler.shutdown(5)
    assert ENGINE.open_watchers() == 0
    for exporter in (inner_exporter, outer_exporter):
        assert exporter.records and all("hot_function" in names(r) for r in exporter.records)
