"""A Flask app profiled by otlp-middleware, exporting OTLP profiles to the local receiver.

Run it (two terminals)::

    otlp-middleware receive                 # terminal 1: listens on 127.0.0.1:4318
    python examples/flask_app.py            # terminal 2: http://127.0.0.1:8000

then ``curl http://127.0.0.1:8000/primes/30000`` a few times; profiles arrive in the
receiver's ``received/`` folder within ``SCHEDULE_DELAY`` seconds (and at shutdown).
Under a production server: ``gunicorn -k gthread --threads 4 -b 127.0.0.1:8000
examples.flask_app:app`` from the repository root.

What it shows:

- ``OtlpProfiling(app)`` reading ``app.config["OTLP_MIDDLEWARE"]`` (UPPER-case option names,
  see docs/configuration.md); ``OtlpProfiling().init_app(app)`` works for app factories;
- a global sampler profiling 1 request in 10, ``@profile_route`` profiling every request of
  one view, ``@skip_profiling`` excluding another;
- profiles carry the matched URL rule (``/primes/<int:limit>``) as ``http.route``.
"""

from __future__ import annotations

import hashlib
import os
import sys

from flask import Flask

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from otlp_middleware import profile_route, skip_profiling
from otlp_middleware.contrib.flask import OtlpProfiling

RECEIVER_URL = "http://127.0.0.1:4318/v1development/profiles"


def count_primes(limit: int) -> int:
    """CPU-bound work that shows up by name in the profiles."""
    return sum(1 for n in range(2, limit) if all(n % d for d in range(2, int(n**0.5) + 1)))


def create_app(endpoint: str = RECEIVER_URL) -> Flask:
    """The app, exporting to ``endpoint`` (tests pass their own receiver's URL)."""
    app = Flask(__name__)
    app.config["OTLP_MIDDLEWARE"] = {
        "ENDPOINT": endpoint,
        "SERVICE_NAME": "flask-example",
        "SAMPLER": "rate:10",
        "SCHEDULE_DELAY": 2.0,
    }
    OtlpProfiling(app)

    @app.get("/primes/<int:limit>")
    @profile_route(attributes={"team": "math"})  # every request of this view
    def primes(limit: int) -> dict[str, int]:
        return {"limit": limit, "primes": count_primes(limit)}

    @app.get("/digest/<int:rounds>")
    def digest(rounds: int) -> dict[str, str]:
        value = b"seed"
        for _ in range(rounds):
            value = hashlib.sha256(value).digest()
        return {"digest": value.hex()}

    @app.get("/version")
    @skip_profiling
    def version() -> dict[str, str]:
        return {"version": "1.0"}

    return app


# OTLP_MIDDLEWARE_ENDPOINT=http://127.0.0.1:4040/v1development/profiles sends to Pyroscope.
app = create_app(os.environ.get("OTLP_MIDDLEWARE_ENDPOINT", RECEIVER_URL))

if __name__ == "__main__":
    app.run(host="127.0.0.1", port=8000, threaded=True)
