"""A WSGI app served by gunicorn (gthread) in the server tests.

OpenTelemetry's WSGI middleware wraps ours; each path burns CPU in its own function.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from typing import Any

from opentelemetry import trace
from opentelemetry.instrumentation.wsgi import OpenTelemetryMiddleware
from opentelemetry.sdk.trace import TracerProvider

from otlp_middleware.middleware import WSGIProfilingMiddleware
from otlp_middleware.middleware.wsgi import ROUTE_ENVIRON_KEY

trace.set_tracer_provider(TracerProvider())


def spin_ms(ms: float) -> None:
    end = time.thread_time() + ms / 1000
    while time.thread_time() < end:
        sum(range(50))


def red_work(ms: float) -> None:
    spin_ms(ms)


def blue_work(ms: float) -> None:
    spin_ms(ms)


def streamed_work(ms: float) -> None:
    spin_ms(ms)


def plain_app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    path = environ["PATH_INFO"]
    if path.startswith("/red/"):
        environ[ROUTE_ENVIRON_KEY] = "/red/<id>"
        red_work(20)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"red"]
    if path == "/blue":
        environ[ROUTE_ENVIRON_KEY] = "/blue"
        blue_work(20)
        start_response("201 Created", [("Content-Type", "text/plain")])
        return [b"blue"]
    if path == "/stream":
        environ[ROUTE_ENVIRON_KEY] = "/stream"

        def body() -> Iterable[bytes]:
            for i in range(5):
                streamed_work(3)
                yield f"part{i}\n".encode()

        start_response("200 OK", [("Content-Type", "text/plain")])
        return body()
    start_response("404 Not Found", [("Content-Type", "text/plain")])
    return [b"nope"]


app = OpenTelemetryMiddleware(
    WSGIProfilingMiddleware(
        plain_app,
        sampler="always",
        output_dir=os.environ["TEST_OUTPUT_DIR"],
        schedule_delay=0.2,
    )
)
