"""A WSGI app exporting OTLP to TEST_ENDPOINT; served by gunicorn --preload in the fork test."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from typing import Any

from otlp_middleware.middleware import WSGIProfilingMiddleware


def worker_work(ms: float) -> None:
    end = time.thread_time() + ms / 1000
    while time.thread_time() < end:
        sum(range(50))


def plain_app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    worker_work(30)
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [str(os.getpid()).encode()]


app = WSGIProfilingMiddleware(
    plain_app,
    sampler="always",
    endpoint=os.environ["TEST_ENDPOINT"],
    service_name="fork-test",
    schedule_delay=0.2,
)
