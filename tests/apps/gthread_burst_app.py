"""A WSGI app for the native tier's accuracy test under gunicorn's gthread worker.

``GET /burst`` burns ~1 ms of CPU in ``tests.workloads.burst`` and then does a small
GIL-releasing socket round trip, the shape where a GIL-bound sampler thread sees only the
socket calls. The response body is ``"<handler CPU ns> <tier>"``: the CPU the handler burned
(its thread's CPU clock) and the tier sampling that thread, so the test can compare the
written profiles with the truth. ``/ready`` is excluded from profiling (readiness probe).

    gunicorn tests.apps.gthread_burst_app:app --worker-class gthread --threads 2
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from otlp_middleware.middleware import WSGIProfilingMiddleware
from tests.apps._burst import handle_burst


def plain_app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    if environ["PATH_INFO"] == "/burst":
        body = handle_burst().encode()
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [body]
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ready"]


app = WSGIProfilingMiddleware(
    plain_app,
    sampler="always",
    output_dir=os.environ["TEST_OUTPUT_DIR"],
    aggregate=True,
    exclude_paths=["/ready"],
    schedule_delay=0.2,
)
