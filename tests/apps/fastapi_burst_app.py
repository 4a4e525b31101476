"""A FastAPI app for the native tier's accuracy test: a ``def`` endpoint in the thread pool.

FastAPI runs ``def`` endpoints in anyio's worker threads; the profiling middleware carries the
request's scope there. ``GET /burst`` burns ~1 ms of CPU in ``tests.workloads.burst``, then
does a small GIL-releasing socket round trip, and answers ``"<handler CPU ns> <tier>"`` (the
worker thread's CPU clock across the handler, and the tier sampling that thread).
``GET /aburst`` does the burst in an ``async def`` endpoint, on the event loop's thread.

    uvicorn tests.apps.fastapi_burst_app:app
"""

from __future__ import annotations

import os
import socket
import threading
import time

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse

from otlp_middleware.middleware import ProfilingMiddleware
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


api = FastAPI()


@api.get("/burst")
def burst_endpoint() -> PlainTextResponse:
    """A `def` endpoint: FastAPI runs it in its thread pool."""
    return PlainTextResponse(handle_burst())


@api.get("/aburst")
async def async_burst_endpoint() -> PlainTextResponse:
    """An `async def` endpoint: it burns its CPU on the event loop, inside the request's task."""
    start = time.thread_time_ns()
    workloads.burst(BURST_NS)
    cpu_ns = time.thread_time_ns() - start
    return PlainTextResponse(f"{cpu_ns} {ENGINE.method_for(threading.get_ident())}")


@api.get("/ready")
def ready() -> PlainTextResponse:
    return PlainTextResponse("ready")


app = ProfilingMiddleware(
    api,
    sampler="always",
    output_dir=os.environ["TEST_OUTPUT_DIR"],
    aggregate=True,
    exclude_paths=["/ready"],
    schedule_delay=0.2,
)
