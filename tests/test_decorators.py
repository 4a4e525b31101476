"""profile_route / skip_profiling on Starlette endpoints, sync and async, through the ASGI
middleware, and on a plain WSGI view."""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from otlp_middleware._decorators import profile_route, skip_profiling
from otlp_middleware.middleware import ProfilingMiddleware, WSGIProfilingMiddleware
from otlp_middleware.profiling import CpuProfilerConfig

from . import workloads
from .test_middleware import KeepingExporter, names


@profile_route()
async def forced_async(request: Request) -> PlainTextResponse:
    workloads.hot_function(0.05)
    return PlainTextResponse("forced")


@profile_route(attributes={"team": "payments"})
def forced_sync(request: Request) -> PlainTextResponse:
    workloads.cold_function(0.05)
    return PlainTextResponse("forced-sync")


@skip_profiling
async def skipped_async(request: Request) -> PlainTextResponse:
    workloads.hot_function(0.05)
    return PlainTextResponse("skipped")


@skip_profiling()
def skipped_sync(request: Request) -> PlainTextResponse:
    workloads.hot_function(0.05)
    return PlainTextResponse("skipped-sync")


@profile_route(sampler="never")
async def route_sampler_never(request: Request) -> PlainTextResponse:
    workloads.hot_function(0.05)
    return PlainTextResponse("never")


@profile_route(cpu=False)
async def no_cpu(request: Request) -> PlainTextResponse:
    workloads.hot_function(0.05)
    return PlainTextResponse("no-cpu")


async def plain(request: Request) -> PlainTextResponse:
    workloads.hot_function(0.05)
    return PlainTextResponse("plain")


ROUTES = [
    Route("/forced", forced_async),
    Route("/forced-sync", forced_sync),
    Route("/skipped", skipped_async),
    Route("/skipped-sync", skipped_sync),
    Route("/route-never", route_sampler_never),
    Route("/no-cpu", no_cpu),
    Route("/plain", plain),
]


def run(sampler: str, paths: list[str]) -> dict[str, Any]:
    exporter = KeepingExporter()
    mw = ProfilingMiddleware(Starlette(routes=ROUTES), sampler=sampler, exporter=exporter)

    async def main() -> None:
        transport = httpx.ASGITransport(app=mw)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            for path in paths:
                r = await client.get(path)
                assert r.status_code == 200

    asyncio.run(main())
    mw.profiler.shutdown(5)
    return {str(r.attributes.get("http.route")): r for r in exporter.records}


def test_profile_route_forces_profiling_when_global_sampler_says_never() -> None:
    records = run("never", ["/forced", "/forced-sync", "/plain", "/skipped"])
    assert set(records) == {"/forced", "/forced-sync"}
    assert "hot_function" in names(records["/forced"])
    sync = records["/forced-sync"]
    assert "cold_function" in names(sync)
    assert sync.attributes["team"] == "payments"
    assert sync.attributes["http.response.status_code"] == 200
    assert sync.attributes["http.request.method"] == "GET"


def test_skip_profiling_wins_over_global_always() -> None:
    records = run("always", ["/skipped", "/skipped-sync", "/route-never", "/plain", "/no-cpu"])
    assert set(records) == {"/plain"}, "skipped, route-sampled-never and cpu=False export nothing"


def test_decorators_keep_signatures_and_names() -> None:
    assert forced_async.__name__ == "forced_async"
    assert inspect.iscoroutinefunction(forced_async)
    assert not inspect.iscoroutinefunction(forced_sync)
    assert list(inspect.signature(forced_sync).parameters) == ["request"]


def test_decorated_view_outside_middleware_just_runs() -> None:
    async def main() -> Any:
        return await forced_async(None)  # type: ignore[arg-type]

    assert asyncio.run(main()).body == b"forced"


def test_decorating_a_class_wraps_dispatch() -> None:
    @skip_profiling
    class View:
        def dispatch(self, request: Any) -> str:
            return "ok"

    assert View().dispatch(None) == "ok"
    assert hasattr(View.dispatch, "__wrapped__")
    with pytest.raises(TypeError):
        profile_route()(42)  # type: ignore[arg-type]


def test_wsgi_forced_view_with_its_own_cpu_config() -> None:
    exporter = KeepingExporter()

    @profile_route(cpu=CpuProfilerConfig(sampling_frequency=199))
    def view(environ: Any, start_response: Any) -> Any:
        workloads.hot_function(0.1)
        start_response("200 OK", [])
        return [b"ok"]

    mw = WSGIProfilingMiddleware(view, sampler="never", exporter=exporter)
    body = mw({"REQUEST_METHOD": "POST", "PATH_INFO": "/v"}, lambda s, h, e=None: None)
    assert list(body) == [b"ok"]
    body.close()  # type: ignore[attr-defined]
    mw.profiler.shutdown(5)
    (record,) = exporter.records
    assert record.cpu_period_ns == round(1e9 / 199)
    assert record.attributes["http.request.method"] == "POST"
    assert record.attributes["http.response.status_code"] == 200
