"""The Flask extension through Flask's test client and under gunicorn (gthread).

Every view burns CPU in a function of its own name; a profile must carry its own view's
function and no other, the matched URL rule, the method and the status code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest
from flask import Flask
from flask.testing import FlaskClient
from opentelemetry.sdk.trace import TracerProvider

from otlp_middleware.contrib.flask import OtlpProfiling
from otlp_middleware.errors import ConfigurationError
from otlp_middleware.profiling.sampling import NeverSample
from otlp_middleware.types import ProfileRecord
from tests.apps.flask_app import create_app

from .servers import free_port, serve
from .test_middleware import KeepingExporter, names
from .test_middleware_servers import comments, functions, labels, load_profiles, send_concurrently

WORK = {"item_work", "order_work", "stream_work", "boom_work", "forced_work", "skipped_work"}


def profiled(
    requests: Callable[[FlaskClient], None], config: dict[str, Any] | None = None, **options: Any
) -> dict[str, list[ProfileRecord]]:
    """Run ``requests`` against the app with an in-memory exporter; records by route."""
    exporter = KeepingExporter()
    app = create_app(config, exporter=exporter, schedule_delay=0.05, **options)
    profiler = app.extensions["otlp_middleware"].profiler_for(app)
    try:
        requests(app.test_client())
    finally:
        profiler.shutdown(5)
    out: dict[str, list[ProfileRecord]] = {}
    for record in exporter.records:
        out.setdefault(str(record.attributes.get("http.route")), []).append(record)
    return out


def only_own(record: ProfileRecord, own: str) -> None:
    seen = names(record) & WORK
    assert seen == {own}, f"{record.attributes.get('http.route')}: {seen}"


def test_views_and_blueprints_through_the_test_client() -> None:
    def requests(client: FlaskClient) -> None:
        assert client.get("/items/7", buffered=True).data == b"item 7"
        assert client.get("/api/orders/3", buffered=True).data == b"order 3"
        assert client.post("/items", buffered=True).status_code == 201

    records = profiled(requests)
    assert set(records) == {"/items/<int:item_id>", "/api/orders/<int:pk>", "/items"}
    (item,) = records["/items/<int:item_id>"]
    only_own(item, "item_work")
    assert item.attributes["http.request.method"] == "GET"
    assert item.attributes["http.response.status_code"] == 200
    only_own(records["/api/orders/<int:pk>"][0], "order_work")
    (created,) = records["/items"]
    assert created.attributes["http.request.method"] == "POST"
    assert created.attributes["http.response.status_code"] == 201


def test_streaming_response_is_profiled_until_closed() -> None:
    emitted: list[int] = []

    def requests(client: FlaskClient) -> None:
        response = client.get("/stream")
        profiler = client.application.extensions["otlp_middleware"].profiler
        emitted.append(profiler.stats().profiles_emitted)
        assert response.get_data().count(b"chunk") == 5
        response.close()  # as a WSGI server does after the last chunk
        emitted.append(profiler.stats().profiles_emitted)

    records = profiled(requests)
    assert emitted == [0, 1]
    (record,) = records["/stream"]
    only_own(record, "stream_work")
    assert record.attributes["http.response.status_code"] == 200


def test_error_response_is_profiled_with_status_500() -> None:
    def requests(client: FlaskClient) -> None:
        assert client.get("/boom", buffered=True).status_code == 500

    (record,) = profiled(requests)["/boom"]
    only_own(record, "boom_work")
    assert record.attributes["http.response.status_code"] == 500
    # Flask turned the exception into the 500; got_request_exception still names it.
    assert record.attributes["error.type"] == "RuntimeError"


def test_profile_carries_the_active_span() -> None:
    tracer = TracerProvider().get_tracer("test")
    spans: list[Any] = []

    def requests(client: FlaskClient) -> None:
        with tracer.start_as_current_span("server") as span:
            client.get("/items/1", buffered=True)
            spans.append(span.get_span_context())

    (record,) = profiled(requests)["/items/<int:item_id>"]
    assert record.link is not None
    assert record.link.trace_id == spans[0].trace_id.to_bytes(16, "big")


def test_app_config_and_keyword_options() -> None:
    def requests(client: FlaskClient) -> None:
        client.get("/items/1", buffered=True)

    assert profiled(requests, {"SAMPLER": "never"}) == {}
    assert set(profiled(requests, {"SAMPLER": "never"}, sampler="always")) == {
        "/items/<int:item_id>"
    }, "keyword options win over app.config"
    with pytest.raises(ConfigurationError, match="SAMPLRE"):
        create_app({"SAMPLRE": "always"})


def test_init_app_pattern() -> None:
    profiling = OtlpProfiling(exporter=KeepingExporter())
    assert profiling.profiler is None
    app = Flask(__name__)
    app.config["OTLP_MIDDLEWARE"] = {"SAMPLER": "never"}
    profiling.init_app(app)
    try:
        assert app.extensions["otlp_middleware"] is profiling
        assert profiling.profiler is profiling.profiler_for(app)
        assert isinstance(profiling.profiler.sampler, NeverSample)
        with pytest.raises(RuntimeError, match="already"):
            profiling.init_app(app)
        with pytest.raises(LookupError):
            profiling.profiler_for(Flask("other"))
    finally:
        profiling.profiler.shutdown(1)


# -- per-route decorators --------------------------------------------------------------------


def test_profile_route_forces_a_view_when_the_sampler_says_never() -> None:
    def requests(client: FlaskClient) -> None:
        for path in ("/forced", "/items/2", "/skipped"):
            assert client.get(path, buffered=True).status_code == 200

    records = profiled(requests, {"SAMPLER": "never"})
    assert set(records) == {"/forced"}
    (record,) = records["/forced"]
    only_own(record, "forced_work")
    assert record.attributes["team"] == "checkout"
    assert record.attributes["http.response.status_code"] == 200


def test_skip_profiling_wins_over_sampler_always() -> None:
    def requests(client: FlaskClient) -> None:
        for path in ("/skipped", "/items/2"):
            assert client.get(path, buffered=True).status_code == 200

    assert set(profiled(requests, {"SAMPLER": "always"})) == {"/items/<int:item_id>"}


# -- gunicorn ----------------------------------------------------------------------------------


@pytest.mark.server
def test_gunicorn_gthread(tmp_path: Any) -> None:
    out = str(tmp_path)
    port = free_port()
    argv = [
        "gunicorn",
        "tests.apps.flask_app:server_app()",
        "--bind",
        f"127.0.0.1:{port}",
        "--worker-class",
        "gthread",
        "--threads",
        "4",
        "--log-level",
        "warning",
    ]
    paths = ["/items/1", "/api/orders/2"] * 10
    with serve(argv, port, {"TEST_OUTPUT_DIR": out}, ready_path="/health") as base:
        sent = send_concurrently(base, paths, workers=6)
        with httpx.stream("GET", base + "/stream", timeout=10) as r:
            assert b"".join(r.iter_raw()).count(b"chunk") == 5
        assert httpx.get(base + "/boom", timeout=10).status_code == 500
    profiles = load_profiles(out)
    by_route: dict[str, list[Any]] = {}
    for p in profiles.values():
        by_route.setdefault(comments(p)["http.route"], []).append(p)
    (stream,) = by_route.pop("/stream")
    assert functions(stream) & WORK == {"stream_work"}
    (boom,) = by_route.pop("/boom")
    assert comments(boom)["http.response.status_code"] == "500"
    expect = {
        "/items/1": ("item_work", "/items/<int:item_id>"),
        "/api/orders/2": ("order_work", "/api/orders/<int:pk>"),
    }
    concurrent = [p for ps in by_route.values() for p in ps]
    assert len(concurrent) >= len(paths) // 2, "most 30 ms requests at 99 Hz yield samples"
    for p in concurrent:
        (trace_id,) = labels(p)["trace_id"]
        assert trace_id in sent, f"trace id {trace_id} was not sent"
        own, route = expect[sent[trace_id]]
        assert functions(p) & WORK == {own}
        c = comments(p)
        assert c["http.route"] == route and c["trace_id"] == trace_id
        assert c["http.request.method"] == "GET" and c["http.response.status_code"] == "200"
    assert set(by_route) == {"/items/<int:item_id>", "/api/orders/<int:pk>"}
