"""A FastAPI app profiled by otlp-middleware, exporting OTLP profiles to the local receiver.

Run it (two terminals)::

    otlp-middleware receive                 # terminal 1: listens on 127.0.0.1:4318
    python examples/fastapi_app.py          # terminal 2: uvicorn on http://127.0.0.1:8000

then ``curl http://127.0.0.1:8000/primes/20000`` a few times; profiles arrive in the
receiver's ``received/`` folder within ``SCHEDULE_DELAY`` seconds (and at shutdown).

What it shows:

- ``app.add_middleware(ProfilingMiddleware, ...)``: keyword options win over every other
  configuration source (the environment, ``OTLP_MIDDLEWARE_SETTINGS_MODULE``);
- a global sampler that profiles 1 request in 10, and ``@profile_route`` forcing every
  request of one endpoint to be profiled at a higher frequency;
- ``@skip_profiling`` on an endpoint never worth profiling (health checks and ``/metrics``
  are already excluded by the default ``EXCLUDE_PATHS``);
- a ``def`` endpoint: FastAPI runs it in its thread pool, and its samples still belong to
  the request that called it.
"""

from __future__ import annotations

import hashlib
import os
import sys

from fastapi import FastAPI

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from otlp_middleware import CpuProfilerConfig, profile_route, skip_profiling
from otlp_middleware.contrib.fastapi import ProfilingMiddleware  # = otlp_middleware's

RECEIVER_URL = "http://127.0.0.1:4318/v1development/profiles"


def count_primes(limit: int) -> int:
    """CPU-bound work that shows up by name in the profiles."""
    return sum(1 for n in range(2, limit) if all(n % d for d in range(2, int(n**0.5) + 1)))


def create_app(endpoint: str = RECEIVER_URL) -> FastAPI:
    """The app, exporting to ``endpoint`` (tests pass their own receiver's URL)."""
    app = FastAPI(title="otlp-middleware FastAPI example")
    app.add_middleware(
        ProfilingMiddleware,
        endpoint=endpoint,
        service_name="fastapi-example",
        sampler="rate:10",  # profile 1 request in 10 ...
        schedule_delay=2.0,  # ... and export every 2 s (default 5 s)
    )

    @app.get("/primes/{limit}")
    @profile_route(  # ... but every request of this route, at 199 Hz
        cpu=CpuProfilerConfig(sampling_frequency=199), attributes={"team": "math"}
    )
    async def primes(limit: int) -> dict[str, int]:
        return {"limit": limit, "primes": count_primes(limit)}

    @app.get("/digest/{rounds}")
    def digest(rounds: int) -> dict[str, str]:
        # A ``def`` endpoint runs in the thread pool; its samples stay with this request.
        value = b"seed"
        for _ in range(rounds):
            value = hashlib.sha256(value).digest()
        return {"digest": value.hex()}

    @app.get("/version")
    @skip_profiling
    async def version() -> dict[str, str]:
        return {"version": "1.0"}

    return app


# OTLP_MIDDLEWARE_ENDPOINT=http://127.0.0.1:4040/v1development/profiles sends to Pyroscope.
app = create_app(os.environ.get("OTLP_MIDDLEWARE_ENDPOINT", RECEIVER_URL))

if __name__ == "__main__":
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=8000)
