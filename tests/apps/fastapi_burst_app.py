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

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse

from otlp_middleware.middleware import ProfilingMiddleware
from tests.apps._burst import handle_burst

api = FastAPI()


@api.get("/burst")
def burst_endpoint() -> PlainTextResponse:
    """A `def` endpoint: FastAPI runs it in its thread pool."""
    return PlainTextResponse(handle_burst())


@api.get("/aburst")
async def async_burst_endpoint() -> PlainTextResponse:
    """An `async def` endpoint: it burns its CPU on the event loop, inside the request's task."""
    return PlainTextResponse(handle_burst(round_trip=False))


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
