"""The app `make demo` serves: a Starlette app with a few routes doing different work.

    OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4318 uvicorn examples.demo_app:app

OpenTelemetry's ASGI middleware wraps ours, so every profile links to its request's span.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time

from opentelemetry import trace
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.sdk.trace import TracerProvider
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse

from otlp_middleware import ProfilingMiddleware, profile_route

trace.set_tracer_provider(TracerProvider())


def hash_password(password: str) -> str:
    return hashlib.pbkdf2_hmac("sha256", password.encode(), b"salt", 2_000).hex()


def render_report(rows: int) -> str:
    return json.dumps([{"row": i, "square": i * i, "text": f"line {i}"} for i in range(rows)])


def fibonacci(n: int) -> int:
    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)


async def login(request: Request) -> JSONResponse:
    return JSONResponse({"token": hash_password("hunter2")[:16]})


async def report(request: Request) -> JSONResponse:
    return JSONResponse({"size": len(render_report(3000))})


def compute(request: Request) -> JSONResponse:
    """A `def` endpoint: it runs in Starlette's thread pool and stays attributed."""
    return JSONResponse({"fib": fibonacci(int(request.path_params["n"]))})


@profile_route(attributes={"team": "search"})
async def search(request: Request) -> JSONResponse:
    await asyncio.sleep(0.005)
    words = sorted(set(render_report(500).split()))
    return JSONResponse({"hits": len(words), "at": time.time()})


routes = [
    ("/login", login),
    ("/report", report),
    ("/compute/{n:int}", compute),
    ("/search", search),
]

from starlette.routing import Route  # noqa: E402

app = OpenTelemetryMiddleware(
    ProfilingMiddleware(
        Starlette(routes=[Route(path, endpoint) for path, endpoint in routes]),
        sampler="always",
        schedule_delay=1.0,
    )
)
