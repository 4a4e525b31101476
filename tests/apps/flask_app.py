"""A Flask app for the integration tests (``tests/test_contrib_flask.py``).

``create_app(**options)`` builds it with ``OtlpProfiling`` (options win over
``app.config["OTLP_MIDDLEWARE"]``); gunicorn serves ``server_app()``, which reads the test's
output folder from the environment and puts OpenTelemetry's WSGI middleware outermost, so its
server span (continuing the incoming ``traceparent``) is active when profiling starts.
Every view burns CPU in a function of its own name.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Flask, Response

from otlp_middleware import profile_route, skip_profiling
from otlp_middleware.contrib.flask import OtlpProfiling


def spin_ms(ms: float) -> None:
    end = time.thread_time() + ms / 1000
    while time.thread_time() < end:
        sum(range(50))


def item_work(ms: float) -> None:
    spin_ms(ms)


def order_work(ms: float) -> None:
    spin_ms(ms)


def stream_work(ms: float) -> None:
    spin_ms(ms)


def boom_work(ms: float) -> None:
    spin_ms(ms)


def forced_work(ms: float) -> None:
    spin_ms(ms)


def skipped_work(ms: float) -> None:
    spin_ms(ms)


api = Blueprint("api", __name__, url_prefix="/api")


@api.get("/orders/<int:pk>")
def order(pk: int) -> str:
    order_work(30)
    return f"order {pk}"


def create_app(config: dict[str, Any] | None = None, **options: Any) -> Flask:
    app = Flask(__name__)
    app.config["OTLP_MIDDLEWARE"] = config if config is not None else {"SAMPLER": "always"}
    OtlpProfiling(app, **options)
    app.register_blueprint(api)

    @app.get("/items/<int:item_id>")
    def item(item_id: int) -> str:
        item_work(30)
        return f"item {item_id}"

    @app.post("/items")
    def create_item() -> tuple[str, int]:
        item_work(30)
        return "created", 201

    @app.get("/stream")
    def stream() -> Response:
        def chunks() -> Iterator[str]:
            for i in range(5):
                stream_work(10)
                yield f"chunk{i}\n"

        return Response(chunks(), mimetype="text/plain")

    @app.get("/boom")
    def boom() -> str:
        boom_work(30)
        raise RuntimeError("boom")

    @app.get("/health")
    def health() -> str:
        return "ok"

    @app.get("/forced")
    @profile_route(attributes={"team": "checkout"})
    def forced() -> str:
        forced_work(30)
        return "forced"

    @app.get("/skipped")
    @skip_profiling
    def skipped() -> str:
        skipped_work(30)
        return "skipped"

    return app


def server_app() -> Any:
    """The gunicorn entry point: ``gunicorn 'tests.apps.flask_app:server_app()'``."""
    from opentelemetry import trace
    from opentelemetry.instrumentation.wsgi import OpenTelemetryMiddleware
    from opentelemetry.sdk.trace import TracerProvider

    trace.set_tracer_provider(TracerProvider())
    app = create_app(
        {
            "SAMPLER": "always",
            "OUTPUT_DIR": os.environ["TEST_OUTPUT_DIR"],
            "SCHEDULE_DELAY": 0.2,
            "EXCLUDE_PATHS": ["/health"],
        }
    )
    app.wsgi_app = OpenTelemetryMiddleware(app.wsgi_app)  # type: ignore[method-assign]
    return app
