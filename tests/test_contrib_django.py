"""The Django middleware through Django's own stack: the test clients (sync handler and async
handler), gunicorn (WSGI) and uvicorn (ASGI), with the project in ``tests/apps/django_project``.

Every view burns CPU in a function of its own name; a profile must carry its own view's
function and no other, the resolver's route template, the method and the status code.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import django
import httpx
import pytest
from django.conf import settings
from opentelemetry.sdk.trace import TracerProvider

if not settings.configured:  # Django's settings are process-wide: configure them once
    from tests.apps.django_project import settings as project_settings

    settings.configure(
        **{
            name: getattr(project_settings, name)
            for name in dir(project_settings)
            if name.isupper()
        }
    )
    django.setup()

from asgiref.sync import iscoroutinefunction
from django.test import AsyncClient, Client, override_settings

from otlp_middleware.contrib.django import ProfilingMiddleware
from otlp_middleware.errors import ConfigurationError
from otlp_middleware.pprof import Profile
from otlp_middleware.profiling.sampling import NeverSample
from otlp_middleware.types import ProfileRecord
from tests.apps.django_project.middleware import PATH, KeepingProfilingMiddleware

from .servers import free_port, serve
from .test_middleware import names
from .test_middleware_servers import (
    comments,
    functions,
    labels,
    load_profiles,
    send_concurrently,
)

WORK = {
    "item_work",
    "async_work",
    "order_work",
    "legacy_work",
    "boom_work",
    "stream_work",
    "cbv_work",
    "forced_work",
    "skipped_work",
}


def profiled(sampler: str, requests: Callable[[], None]) -> dict[str, list[ProfileRecord]]:
    """Run ``requests`` with the real middleware (in-memory exporter); records by route."""
    KeepingProfilingMiddleware.instances.clear()
    try:
        with override_settings(
            MIDDLEWARE=[PATH, "django.middleware.common.CommonMiddleware"],
            OTLP_MIDDLEWARE={"SAMPLER": sampler},
        ):
            requests()
    finally:
        for mw in KeepingProfilingMiddleware.instances:
            mw.profiler.shutdown(5)
    out: dict[str, list[ProfileRecord]] = {}
    for mw in KeepingProfilingMiddleware.instances:
        for record in mw.exporter.records:
            out.setdefault(str(record.attributes.get("http.route")), []).append(record)
    return out


def only_own(record: ProfileRecord, own: str) -> None:
    seen = names(record) & WORK
    assert seen == {own}, f"{record.attributes.get('http.route')}: {seen}"


def test_sync_views_through_the_test_client() -> None:
    def requests() -> None:
        client = Client()
        assert client.get("/items/7/?ms=60").content == b"item 7"
        assert client.post("/api/orders/3/?ms=60").content == b"order 3"
        assert client.get("/legacy/2024/?ms=60").status_code == 200
        assert client.get("/cbv/?ms=60").content == b"cbv"

    records = profiled("always", requests)
    assert set(records) == {
        "items/<int:pk>/",
        "api/orders/<int:pk>/",
        "^legacy/(?P<year>[0-9]{4})/$",
        "cbv/",
    }
    (item,) = records["items/<int:pk>/"]
    only_own(item, "item_work")
    assert item.attributes["http.request.method"] == "GET"
    assert item.attributes["http.response.status_code"] == 200
    (order,) = records["api/orders/<int:pk>/"]
    only_own(order, "order_work")
    assert order.attributes["http.request.method"] == "POST"
    only_own(records["^legacy/(?P<year>[0-9]{4})/$"][0], "legacy_work")
    only_own(records["cbv/"][0], "cbv_work")


def test_async_views_and_sync_views_under_the_async_handler() -> None:
    async def main() -> None:
        client = AsyncClient()
        r = await client.get("/async/abc/?ms=60")
        assert r.status_code == 201 and r.content == b"async abc"
        # A sync view under the async handler runs in a worker thread: still attributed.
        assert (await client.get("/items/9/?ms=60")).content == b"item 9"
        assert (await client.get("/async-cbv/?ms=60")).content == b"async-cbv"

    records = profiled("always", lambda: asyncio.run(main()))
    (async_item,) = records["async/<slug:name>/"]
    only_own(async_item, "async_work")
    assert async_item.attributes["http.response.status_code"] == 201
    only_own(records["items/<int:pk>/"][0], "item_work")
    only_own(records["async-cbv/"][0], "async_work")


def test_view_exception_records_error_type_and_500() -> None:
    def requests() -> None:
        response = Client(raise_request_exception=False).get("/boom/?ms=60")
        assert response.status_code == 500

        async def main() -> None:
            response = await AsyncClient(raise_request_exception=False).get("/boom/?ms=60")
            assert response.status_code == 500

        asyncio.run(main())

    records = profiled("always", requests)
    assert len(records["boom/"]) == 2  # sync handler, async handler
    for record in records["boom/"]:
        only_own(record, "boom_work")
        assert record.attributes["error.type"] == "RuntimeError"
        assert record.attributes["http.response.status_code"] == 500


def test_streaming_response_is_profiled_until_closed() -> None:
    emitted: list[int] = []

    def requests() -> None:
        response = Client().get("/stream/?ms=100")
        assert response.streaming
        (mw,) = KeepingProfilingMiddleware.instances
        emitted.append(mw.profiler.stats().profiles_emitted)
        # The test client closes the response after the last chunk, as a WSGI server does.
        body = b"".join(response.streaming_content)
        assert body == b"".join(f"chunk{i}\n".encode() for i in range(5))
        emitted.append(mw.profiler.stats().profiles_emitted)

    records = profiled("always", requests)
    assert emitted == [0, 1], "the profile is finished when the response is closed"
    (record,) = records["stream/"]
    only_own(record, "stream_work")
    assert record.attributes["http.response.status_code"] == 200


def test_profile_carries_the_active_span() -> None:
    tracer = TracerProvider().get_tracer("test")
    spans: list[Any] = []

    def requests() -> None:
        with tracer.start_as_current_span("server") as span:
            Client().get("/items/1/?ms=60")
            spans.append(span.get_span_context())

    (record,) = profiled("always", requests)["items/<int:pk>/"]
    assert record.link is not None
    assert record.link.trace_id == spans[0].trace_id.to_bytes(16, "big")
    assert record.link.span_id == spans[0].span_id.to_bytes(8, "big")


def test_settings_read_once_at_construction_and_validated() -> None:
    def sync_view(request: Any) -> Any:
        return None

    async def async_view(request: Any) -> Any:
        return None

    with override_settings(OTLP_MIDDLEWARE={"SAMPLER": "never", "EXCLUDE_PATHS": ["/x/*"]}):
        sync_mw = ProfilingMiddleware(sync_view)
        async_mw = ProfilingMiddleware(async_view)
    try:
        assert isinstance(sync_mw.profiler.sampler, NeverSample)
        assert sync_mw.profiler.exclude_paths == ("/x/*",)
        assert not iscoroutinefunction(sync_mw)
        assert iscoroutinefunction(async_mw), "async mode when Django hands an async chain"
        assert ProfilingMiddleware.sync_capable and ProfilingMiddleware.async_capable
    finally:
        sync_mw.profiler.shutdown(1)
        async_mw.profiler.shutdown(1)
    with (
        override_settings(OTLP_MIDDLEWARE={"SAMPLRE": "always"}),
        pytest.raises(ConfigurationError, match="SAMPLRE"),
    ):
        ProfilingMiddleware(sync_view)


def test_not_sampled_and_excluded_requests_pass_through() -> None:
    def requests() -> None:
        client = Client()
        assert client.get("/items/2/?ms=30").content == b"item 2"

    assert profiled("never", requests) == {}


# -- per-route decorators --------------------------------------------------------------------


def test_profile_route_forces_function_and_class_based_views() -> None:
    def requests() -> None:
        client = Client()
        for path in ("/forced/", "/forced-cbv/", "/forced-class/", "/items/4/"):
            assert client.get(path + "?ms=60").status_code == 200

        async def main() -> None:
            assert (await AsyncClient().get("/forced-async/?ms=60")).content == b"forced-async"

        asyncio.run(main())

    records = profiled("never", requests)
    assert set(records) == {"forced/", "forced-cbv/", "forced-class/", "forced-async/"}
    for route, (record,) in records.items():
        only_own(record, "forced_work")
        assert record.attributes["http.response.status_code"] == 200, route
    assert records["forced/"][0].attributes["team"] == "checkout"


def test_skip_profiling_on_function_and_class_based_views() -> None:
    def requests() -> None:
        client = Client()
        for path in ("/skipped/", "/skipped-cbv/", "/skipped-class/", "/items/5/"):
            assert client.get(path + "?ms=60").status_code == 200

        async def main() -> None:
            r = await AsyncClient().get("/skipped-async/?ms=60")
            assert r.content == b"skipped-async"

        asyncio.run(main())

    records = profiled("always", requests)
    assert set(records) == {"items/<int:pk>/"}


# -- real servers ------------------------------------------------------------------------------


@pytest.fixture
def output_dir(tmp_path: Any) -> Iterator[str]:
    yield str(tmp_path)


def check_server_profiles(
    profiles: dict[str, Profile], sent: dict[str, str], expect: dict[str, tuple[str, str, str]]
) -> set[str]:
    """Each profile: a trace id we sent, its view's function only, its route and status."""
    assert len(profiles) >= len(sent) // 2, "most 30 ms requests at 99 Hz yield samples"
    routes = set()
    for name, p in profiles.items():
        (trace_id,) = labels(p)["trace_id"]
        assert trace_id in sent, f"{name}: trace id {trace_id} was not sent"
        own, route, status = expect[sent[trace_id].split("/")[1]]
        assert functions(p) & WORK == {own}, (name, sent[trace_id], functions(p) & WORK)
        c = comments(p)
        assert c["http.route"] == route and c["trace_id"] == trace_id
        assert c["http.request.method"] == "GET"
        assert c["http.response.status_code"] == status
        routes.add(route)
    return routes


@pytest.mark.server
def test_gunicorn_wsgi(output_dir: str) -> None:
    port = free_port()
    argv = [
        "gunicorn",
        "tests.apps.django_project.wsgi:application",
        "--bind",
        f"127.0.0.1:{port}",
        "--worker-class",
        "gthread",
        "--threads",
        "4",
        "--log-level",
        "warning",
    ]
    paths = ["/items/1/?ms=30", "/api/orders/2/?ms=30", "/cbv/?ms=30"] * 8
    with serve(argv, port, {"TEST_OUTPUT_DIR": output_dir}, ready_path="/health/") as base:
        sent = send_concurrently(base, paths, workers=6)
        with httpx.stream("GET", base + "/stream/?ms=50", timeout=10) as r:
            assert b"".join(r.iter_raw()).count(b"chunk") == 5
        assert httpx.get(base + "/boom/?ms=20", timeout=10).status_code == 500
    profiles = load_profiles(output_dir)
    by_route: dict[str, list[dict[str, str]]] = {}
    for p in profiles.values():
        by_route.setdefault(comments(p).get("http.route", ""), []).append(comments(p))
    (stream,) = by_route.pop("stream/")
    assert stream["http.response.status_code"] == "200"
    (boom,) = by_route.pop("boom/")
    assert boom["error.type"] == "RuntimeError" and boom["http.response.status_code"] == "500"
    concurrent = {
        name: p
        for name, p in profiles.items()
        if comments(p)["http.route"] not in ("stream/", "boom/")
    }
    routes = check_server_profiles(
        concurrent,
        sent,
        {
            "items": ("item_work", "items/<int:pk>/", "200"),
            "api": ("order_work", "api/orders/<int:pk>/", "200"),
            "cbv": ("cbv_work", "cbv/", "200"),
        },
    )
    assert routes == {"items/<int:pk>/", "api/orders/<int:pk>/", "cbv/"}


@pytest.mark.server
def test_uvicorn_asgi(output_dir: str) -> None:
    port = free_port()
    argv = [
        "uvicorn",
        "tests.apps.django_project.asgi:application",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    paths = ["/async/a/?ms=30", "/items/1/?ms=30"] * 10
    with serve(argv, port, {"TEST_OUTPUT_DIR": output_dir}, ready_path="/health/") as base:
        sent = send_concurrently(base, paths, workers=6)
    routes = check_server_profiles(
        load_profiles(output_dir),
        sent,
        {
            "async": ("async_work", "async/<slug:name>/", "201"),
            "items": ("item_work", "items/<int:pk>/", "200"),
        },
    )
    assert routes == {"async/<slug:name>/", "items/<int:pk>/"}
