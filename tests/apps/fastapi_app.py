"""A FastAPI app for the integration tests (``tests/test_contrib_fastapi.py``).

``create_app(**options)`` adds ``ProfilingMiddleware`` with the given options; uvicorn serves
``server_app()`` (``--factory``), which adds it with no argument at all, configured by the
environment (``OTLP_MIDDLEWARE_*``), and puts OpenTelemetry's ASGI middleware outermost, so
its server span (continuing the incoming ``traceparent``) is active when profiling starts.
Every endpoint burns CPU in a function of its own name.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter, FastAPI

from otlp_middleware import profile_route, skip_profiling
from otlp_middleware.contrib.fastapi import ProfilingMiddleware


def spin_ms(ms: float) -> None:
    end = time.thread_time() + ms / 1000
    while time.thread_time() < end:
        sum(range(50))


def item_work(ms: float) -> None:
    spin_ms(ms)


def sync_work(ms: float) -> None:
    spin_ms(ms)


def order_work(ms: float) -> None:
    spin_ms(ms)


def thing_work(ms: float) -> None:
    spin_ms(ms)


def forced_work(ms: float) -> None:
    spin_ms(ms)


def skipped_work(ms: float) -> None:
    spin_ms(ms)


def build_routes(app: FastAPI) -> None:
    @app.get("/items/{item_id}")
    async def item(item_id: int, ms: float = 30) -> dict[str, int]:
        for _ in range(3):
            item_work(ms / 3)
            await asyncio.sleep(0)  # let other requests' tasks interleave on the loop
        return {"item": item_id}

    @app.get("/sync/{name}", status_code=201)
    def sync_endpoint(name: str, ms: float = 30) -> dict[str, str]:
        """A `def` endpoint: FastAPI runs it in its thread pool."""
        sync_work(ms)
        return {"sync": name}

    router = APIRouter(prefix="/api")

    @router.get("/orders/{pk}")
    async def order(pk: int, ms: float = 30) -> dict[str, int]:
        order_work(ms)
        return {"order": pk}

    app.include_router(router)

    sub = FastAPI()

    @sub.get("/things/{tid}")
    async def thing(tid: int, ms: float = 30) -> dict[str, int]:
        thing_work(ms)
        return {"thing": tid}

    app.mount("/sub", sub)

    @app.get("/health")
    async def health() -> str:
        return "ok"

    # -- per-route decorators ------------------------------------------------------------------

    @app.get("/forced/{n}")
    @profile_route(attributes={"team": "checkout"})
    async def forced(n: int, q: int = 1, ms: float = 30) -> dict[str, int]:
        forced_work(ms)
        return {"n": n, "q": q}

    @app.get("/forced-sync/{n}")
    @profile_route()
    def forced_sync(n: int, q: int = 1, ms: float = 30) -> dict[str, int]:
        forced_work(ms)
        return {"n": n, "q": q}

    @app.get("/plain/{n}")
    def plain(n: int, q: int = 1, ms: float = 30) -> dict[str, int]:
        """The undecorated twin of the decorated endpoints: same parameters, same schema."""
        item_work(ms)
        return {"n": n, "q": q}

    @app.get("/skipped/{n}")
    @skip_profiling
    async def skipped(n: int, ms: float = 30) -> dict[str, int]:
        skipped_work(ms)
        return {"n": n}

    @app.get("/skipped-sync/{n}")
    @skip_profiling
    def skipped_sync(n: int, ms: float = 30) -> dict[str, int]:
        skipped_work(ms)
        return {"n": n}


def create_app(**options: Any) -> FastAPI:
    app = FastAPI()
    build_routes(app)
    app.add_middleware(ProfilingMiddleware, **options)
    return app


def server_app() -> Any:
    """The uvicorn entry point (``--factory``): the middleware with no argument."""
    from opentelemetry import trace
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
    from opentelemetry.sdk.trace import TracerProvider

    trace.set_tracer_provider(TracerProvider())
    app = FastAPI()
    build_routes(app)
    app.add_middleware(ProfilingMiddleware)
    return OpenTelemetryMiddleware(app)
