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
import socket
import threading
import time
from collections.abc import Iterable
from typing import Any

from otlp_middleware.middleware import WSGIProfilingMiddleware
from otlp_middleware.profiling._engine import ENGINE
from tests import workloads

_local = threading.local()
_PAYLOAD = b"x" * 512
BURST_NS = int(os.environ.get("TEST_BURST_NS", "1000000"))


def socket_round_trip() -> None:
    """Write a small payload to a per-thread socket pair and read it back (releases the GIL)."""
    pair = getattr(_local, "pair", None)
    if pair is None:
        pair = _local.pair = socket.socketpair()
    a, b = pair
    a.sendall(_PAYLOAD)
    received = 0
    while received < len(_PAYLOAD):
        received += len(b.recv(65536))


def handle_burst() -> str:
    start = time.thread_time_ns()
    workloads.burst(BURST_NS)
    socket_round_trip()
    cpu_ns = time.thread_time_ns() - start
    return f"{cpu_ns} {ENGINE.method_for(threading.get_ident())}"


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
