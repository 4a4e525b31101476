"""A Starlette app served by uvicorn in the server tests (``uvicorn tests.apps.asgi_app:app``).

Each endpoint burns CPU in a function of its own name, so a profile that holds another
endpoint's function proves a leak between requests. OpenTelemetry's ASGI middleware wraps
ours, so the server span it creates (continuing the incoming ``traceparent``) is the active
span when our middleware runs.
"""

from __future__ import annotations

import asyncio
import os
import time

from opentelemetry import trace
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.sdk.trace import TracerProvider
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, StreamingResponse
from starlette.routing import Route

from otlp_middleware.middleware import ProfilingMiddleware

trace.set_tracer_provider(TracerProvider())


def spin_ms(ms: float) -> None:
    end = time.thread_time() + ms / 1000
    while time.thread_time() < end:
        sum(range(50))


def alpha_work(ms: float) -> None:
    spin_ms(ms)


def beta_work(ms: float) -> None:
    spin_ms(ms)


def gamma_work(ms: float) -> None:
    spin_ms(ms)


def delta_work(ms: float) -> None:
    spin_ms(ms)


def _ms(request: Request) -> float:
    return float(request.query_params.get("ms", "20"))


async def alpha(request: Request) -> PlainTextResponse:
    for _ in range(4):
        alpha_work(_ms(request) / 4)
        await asyncio.sleep(0)  # let other requests' tasks interleave on the loop
    return PlainTextResponse("alpha")


async def beta(request: Request) -> PlainTextResponse:
    for _ in range(4):
        beta_work(_ms(request) / 4)
        await asyncio.sleep(0)
    return PlainTextResponse("beta")


def gamma(request: Request) -> PlainTextResponse:
    """A `def` endpoint: Starlette runs it in its thread pool."""
    gamma_work(_ms(request))
    return PlainTextResponse("gamma")


async def delta(request: Request) -> PlainTextResponse:
    await asyncio.to_thread(delta_work, _ms(request))
    return PlainTextResponse("delta")


async def stream(request: Request) -> StreamingResponse:
    async def chunks():  # type: ignore[no-untyped-def]
        for i in range(5):
            alpha_work(2)
            yield f"chunk{i}\n".encode()
            await asyncio.sleep(0.01)

    return StreamingResponse(chunks(), media_type="text/plain")


async def boom(request: Request) -> PlainTextResponse:
    beta_work(20)  # ~2 samples at 99 Hz: five requests all without one are ~e^-10 unlikely
    raise RuntimeError("boom")


async def health(request: Request) -> PlainTextResponse:
    alpha_work(5)
    return PlainTextResponse("ok")


starlette_app = Starlette(
    routes=[
        Route("/alpha/{item}", alpha),
        Route("/beta", beta),
        Route("/gamma", gamma),
        Route("/delta", delta),
        Route("/stream", stream),
        Route("/boom", boom),
        Route("/health", health),
    ]
)

app = OpenTelemetryMiddleware(
    ProfilingMiddleware(
        starlette_app,
        sampler=os.environ.get("TEST_SAMPLER", "always"),
        output_dir=os.environ["TEST_OUTPUT_DIR"],
        exclude_paths=["/health"],
        schedule_delay=float(os.environ.get("TEST_SCHEDULE_DELAY", "0.2")),
    )
)
