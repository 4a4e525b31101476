"""FastAPI with ``app.add_middleware(ProfilingMiddleware)``: in-process through
``httpx.ASGITransport`` and under uvicorn, configured by the environment alone.

Every endpoint burns CPU in a function of its own name; a profile must carry its own
endpoint's function and no other, the route template (``APIRouter`` prefixes and the mount
prefix of a sub-application included), the method and the status code. Decorated endpoints
keep FastAPI's validation and OpenAPI schema.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest

from otlp_middleware import middleware
from otlp_middleware.contrib import fastapi as contrib_fastapi
from otlp_middleware.export import BatchProcessor
from otlp_middleware.middleware import RequestProfiler
from otlp_middleware.profiling import CpuProfilerConfig
from otlp_middleware.profiling.sampling import AlwaysSample, NeverSample, SamplingStrategy
from otlp_middleware.types import ProfileRecord
from tests.apps.fastapi_app import create_app

from .servers import free_port, serve
from .test_middleware import KeepingExporter, names
from .test_middleware_servers import comments, functions, labels, load_profiles, send_concurrently

WORK = {"item_work", "sync_work", "order_work", "thing_work", "forced_work", "skipped_work"}

Requests = Callable[[httpx.AsyncClient], Awaitable[None]]


def profiled(sampler: SamplingStrategy, requests: Requests) -> dict[str, list[ProfileRecord]]:
    """Run ``requests`` against the app with an in-memory exporter; records by route."""
    exporter = KeepingExporter()
    profiler = RequestProfiler(
        sampler=sampler,
        processor=BatchProcessor(exporter, schedule_delay=0.05),
        cpu=CpuProfilerConfig(),
    )
    app = create_app(profiler=profiler)

    async def main() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            await requests(client)

    try:
        asyncio.run(main())
    finally:
        profiler.shutdown(5)
    out: dict[str, list[ProfileRecord]] = {}
    for record in exporter.records:
        out.setdefault(str(record.attributes.get("http.route")), []).append(record)
    return out


def only_own(record: ProfileRecord, own: str) -> None:
    seen = names(record) & WORK
    assert seen == {own}, f"{record.attributes.get('http.route')}: {seen}"


def test_is_the_pure_asgi_middleware() -> None:
    assert contrib_fastapi.ProfilingMiddleware is middleware.ProfilingMiddleware


def test_route_templates_with_router_prefix_and_mounted_app() -> None:
    async def requests(client: httpx.AsyncClient) -> None:
        assert (await client.get("/items/5?ms=60")).json() == {"item": 5}
        r = await client.get("/sync/abc?ms=60")
        assert r.status_code == 201 and r.json() == {"sync": "abc"}
        assert (await client.get("/api/orders/3?ms=60")).json() == {"order": 3}
        assert (await client.get("/sub/things/4?ms=60")).json() == {"thing": 4}

    records = profiled(AlwaysSample(), requests)
    assert set(records) == {
        "/items/{item_id}",
        "/sync/{name}",
        "/api/orders/{pk}",
        "/sub/things/{tid}",
    }
    only_own(records["/items/{item_id}"][0], "item_work")
    (sync,) = records["/sync/{name}"]
    only_own(sync, "sync_work")  # the `def` endpoint ran in the thread pool: still attributed
    assert sync.attributes["http.response.status_code"] == 201
    assert sync.attributes["http.request.method"] == "GET"
    only_own(records["/api/orders/{pk}"][0], "order_work")
    only_own(records["/sub/things/{tid}"][0], "thing_work")


# -- per-route decorators --------------------------------------------------------------------


def test_profile_route_forces_endpoints_when_the_sampler_says_never() -> None:
    async def requests(client: httpx.AsyncClient) -> None:
        for path in ("/forced/1?ms=60", "/forced-sync/2?ms=60", "/plain/3", "/skipped/4"):
            assert (await client.get(path)).status_code == 200

    records = profiled(NeverSample(), requests)
    assert set(records) == {"/forced/{n}", "/forced-sync/{n}"}
    for record in (*records["/forced/{n}"], *records["/forced-sync/{n}"]):
        only_own(record, "forced_work")
        assert record.attributes["http.response.status_code"] == 200
    assert records["/forced/{n}"][0].attributes["team"] == "checkout"


def test_skip_profiling_wins_over_sampler_always() -> None:
    async def requests(client: httpx.AsyncClient) -> None:
        for path in ("/skipped/1?ms=60", "/skipped-sync/2?ms=60", "/plain/3?ms=60"):
            assert (await client.get(path)).status_code == 200

    assert set(profiled(AlwaysSample(), requests)) == {"/plain/{n}"}


def test_decorated_endpoints_validate_and_document_like_plain_ones() -> None:
    results: dict[str, Any] = {}

    async def requests(client: httpx.AsyncClient) -> None:
        for name in ("forced", "forced-sync", "plain"):
            bad_path = await client.get(f"/{name}/abc")
            bad_query = await client.get(f"/{name}/1?q=x")
            good = await client.get(f"/{name}/1?q=7&ms=1")
            results[name] = (
                bad_path.status_code,
                bad_path.json(),
                bad_query.status_code,
                bad_query.json(),
                good.json(),
            )
        results["openapi"] = (await client.get("/openapi.json")).json()

    profiled(NeverSample(), requests)
    plain = results["plain"]
    assert plain[0] == 422 and plain[2] == 422 and plain[4] == {"n": 1, "q": 7}
    assert results["forced"] == plain
    assert results["forced-sync"] == plain
    paths = results["openapi"]["paths"]
    parameters = paths["/plain/{n}"]["get"]["parameters"]
    assert [p["name"] for p in parameters] == ["n", "q", "ms"]
    assert paths["/forced/{n}"]["get"]["parameters"] == parameters
    assert paths["/forced-sync/{n}"]["get"]["parameters"] == parameters


# -- uvicorn -----------------------------------------------------------------------------------


@pytest.mark.server
def test_uvicorn_with_no_middleware_arguments(tmp_path: Any) -> None:
    out = str(tmp_path)
    port = free_port()
    argv = [
        "uvicorn",
        "tests.apps.fastapi_app:server_app",
        "--factory",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    env = {
        "OTLP_MIDDLEWARE_SAMPLER": "always",
        "OTLP_MIDDLEWARE_OUTPUT_DIR": out,
        "OTLP_MIDDLEWARE_SCHEDULE_DELAY": "0.2",
        "OTLP_MIDDLEWARE_EXCLUDE_PATHS": "/health",
    }
    paths = ["/items/1", "/sync/a", "/api/orders/2", "/sub/things/3"] * 6
    with serve(argv, port, env, ready_path="/health") as base:
        sent = send_concurrently(base, paths, workers=6)
    expect = {
        "/items/1": ("item_work", "/items/{item_id}", "200"),
        "/sync/a": ("sync_work", "/sync/{name}", "201"),
        "/api/orders/2": ("order_work", "/api/orders/{pk}", "200"),
        "/sub/things/3": ("thing_work", "/sub/things/{tid}", "200"),
    }
    profiles = load_profiles(out)
    assert len(profiles) >= len(paths) // 2, "most 30 ms requests at 99 Hz yield samples"
    routes = set()
    for name, p in profiles.items():
        (trace_id,) = labels(p)["trace_id"]
        assert trace_id in sent, f"{name}: trace id {trace_id} was not sent"
        own, route, status = expect[sent[trace_id]]
        assert functions(p) & WORK == {own}, (name, sent[trace_id], functions(p) & WORK)
        c = comments(p)
        assert c["http.route"] == route and c["trace_id"] == trace_id
        assert c["http.request.method"] == "GET" and c["http.response.status_code"] == status
        routes.add(route)
    assert routes == {route for _, route, _ in expect.values()}
