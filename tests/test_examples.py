"""The examples run, and the generated docs are up to date.

- ``examples/profiling_demo.py`` runs as a subprocess and prints what each section promises;
- each framework example is imported and one request is driven through its real stack
  in-process (httpx's ASGI transport, Flask's and Django's test clients), exporting OTLP to a
  loopback ``Receiver``: the profile must arrive there;
- ``docs/configuration.md`` holds ``render_markdown_table()`` verbatim and ``docs/api.md`` is
  what ``docs/gen_api.py`` generates, so neither drifts from the code.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import os
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from otlp_middleware import ProfilingMiddleware
from otlp_middleware._receiver import Receiver
from otlp_middleware.config import render_markdown_table
from otlp_middleware.middleware import RequestProfiler

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
DOCS = ROOT / "docs"


def load_example(relative: str, name: str) -> types.ModuleType:
    """Import ``examples/<relative>`` as module ``name`` (examples are not a package)."""
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / relative)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    with Receiver(port=0, output_dir=tmp_path / "received") as running:
        yield running


def received_functions(receiver: Receiver) -> set[str]:
    from otlp_middleware._view import load_profile

    names: set[str] = set()
    for path in receiver.files:
        profile = load_profile(path)
        names |= {profile.string_table[f.name] for f in profile.function}
    return names


# -- the standalone demo ---------------------------------------------------------------------


def test_profiling_demo_runs_and_reports_each_section(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "profiling_demo.py"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "top function hash_passwords" in text
    assert "top function sum_of_squares" in text
    for task in ("render_invoices", "score_recommendations"):
        assert f"task {task}:" in text
    assert text.count("own function present=True, other task's present=False") == 2
    assert "top allocator build_catalogue" in text
    for strategy in (
        "AlwaysSample()",
        "NeverSample()",
        "ProbabilisticSampler(0.1)",
        "RateSampler(100)",
        "AdaptiveSampler(5)",
        "RuleSampler(",
        "ParentBasedSampler(",
    ):
        assert strategy in text
    assert "1000/1000 sampled" in text  # always
    assert "   0/1000 sampled" in text  # never
    assert "  10/1000 sampled" in text  # rate:100, exact
    assert "success=True exported=3 rejected=0" in text
    assert "3 OTLP profiles" in text
    # Files only where we asked, none in the working directory.
    assert sorted(p.name for p in out.glob("*.pb.gz")) == [
        "cpu-hash_passwords.pb.gz",
        "heap-build_catalogue.pb.gz",
    ]
    assert len(list((out / "received").glob("*.pb.gz"))) == 3
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


# -- FastAPI ---------------------------------------------------------------------------------


def _asgi_profiler(app: Any) -> RequestProfiler:
    """The RequestProfiler inside a built Starlette middleware stack."""
    layer = app.middleware_stack
    while layer is not None:
        if isinstance(layer, ProfilingMiddleware):
            return layer.profiler
        layer = getattr(layer, "app", None)
    raise AssertionError("ProfilingMiddleware not found in the middleware stack")


@pytest.mark.server
def test_fastapi_example_profiles_a_decorated_endpoint(receiver: Receiver) -> None:
    pytest.importorskip("otlp_middleware.contrib.fastapi")
    module = load_example("fastapi_app.py", "example_fastapi_app")
    app = module.create_app(endpoint=receiver.url)

    async def drive() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://example") as client:
            return [
                await client.get("/primes/60000"),
                await client.get("/digest/50000"),
                await client.get("/version"),
                await client.get("/primes/not-a-number"),
            ]

    primes, digest, version, invalid = asyncio.run(drive())
    profiler = _asgi_profiler(app)
    try:
        assert primes.status_code == 200 and primes.json()["primes"] > 6000
        assert digest.status_code == 200 and len(digest.json()["digest"]) == 64
        assert version.json() == {"version": "1.0"}
        assert invalid.status_code == 422  # the decorator keeps FastAPI's validation
        assert profiler.force_flush(10)
    finally:
        profiler.shutdown(10)
    assert receiver.profiles_received > 0
    assert "count_primes" in received_functions(receiver)


# -- Flask -----------------------------------------------------------------------------------


@pytest.mark.server
def test_flask_example_profiles_a_decorated_view(receiver: Receiver) -> None:
    pytest.importorskip("otlp_middleware.contrib.flask")
    module = load_example("flask_app.py", "example_flask_app")
    app = module.create_app(endpoint=receiver.url)
    profiler = app.extensions["otlp_middleware"].profiler_for(app)
    try:
        client = app.test_client()
        # buffered: the client consumes and closes the response, as a WSGI server does; the
        # profile is finished when the body is closed.
        primes = client.get("/primes/60000", buffered=True)
        digest = client.get("/digest/1000", buffered=True)
        version = client.get("/version", buffered=True)
        assert primes.status_code == 200 and primes.get_json()["primes"] > 6000
        assert digest.status_code == 200
        assert version.get_json() == {"version": "1.0"}
        assert profiler.force_flush(10)
    finally:
        profiler.shutdown(10)
    assert receiver.profiles_received > 0
    assert "count_primes" in received_functions(receiver)


# -- Django ----------------------------------------------------------------------------------

# Django's settings are process-wide and other tests configure their own: drive the example
# project through Django's test client in a fresh interpreter. Its queued profiles are
# flushed by the exporter's exit hook, which this proves too.
DJANGO_DRIVER = """
import os, sys
project, endpoint, first = sys.argv[1:4]
sys.path.insert(0, project)
os.environ["DJANGO_SETTINGS_MODULE"] = "shop.settings"
import django
django.setup()
from django.conf import settings
from django.test import Client, override_settings

with override_settings(OTLP_MIDDLEWARE={**settings.OTLP_MIDDLEWARE, "ENDPOINT": endpoint}):
    client = Client()
    responses = {}
    for path in (first, "/primes/60000/", "/version/"):
        responses[path] = client.get(path)
    order = client.post("/orders/7/", '{"items": [1, 2]}', content_type="application/json")
    print(responses["/primes/60000/"].status_code, responses["/primes/60000/"].json()["primes"])
    print(responses["/version/"].status_code, responses["/version/"].json())
    print(order.status_code, order.json())
"""


def _drive_django_example(receiver: Receiver, first: str) -> None:
    pytest.importorskip("otlp_middleware.contrib.django")
    project = EXAMPLES / "django_project"
    proc = subprocess.run(
        [sys.executable, "-c", DJANGO_DRIVER, str(project), receiver.url, first],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr
    primes, version, order = proc.stdout.splitlines()
    assert primes.startswith("200 ") and int(primes.split()[1]) > 6000
    assert version == "200 {'version': '1.0'}"
    assert order == "200 {'order': 7, 'items': 2}"
    # /primes/ is decorated with @profile_route(): profiled whatever SAMPLER says.
    assert receiver.profiles_received > 0
    assert "count_primes" in received_functions(receiver)


@pytest.mark.server
def test_django_example_project_profiles_a_decorated_view(receiver: Receiver) -> None:
    _drive_django_example(receiver, first="/version/")


DJANGO_COLD_DRIVER = """
import os, sys
project, endpoint = sys.argv[1:3]
sys.path.insert(0, project)
os.environ["DJANGO_SETTINGS_MODULE"] = "shop.settings"
import django
django.setup()
from django.conf import settings
from django.test import Client, override_settings

options = {**settings.OTLP_MIDDLEWARE, "ENDPOINT": endpoint, "SAMPLER": "never"}
with override_settings(OTLP_MIDDLEWARE=options):
    print(Client().get("/primes/60000/").status_code)
"""


@pytest.mark.server
def test_django_first_request_to_a_decorated_view_is_profiled(receiver: Receiver) -> None:
    pytest.importorskip("otlp_middleware.contrib.django")
    proc = subprocess.run(
        [sys.executable, "-c", DJANGO_COLD_DRIVER, str(EXAMPLES / "django_project"), receiver.url],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout.strip() == "200", proc.stderr
    assert receiver.profiles_received > 0  # SAMPLER=never: only the decorator can profile it


def test_django_example_project_passes_system_checks() -> None:
    pytest.importorskip("otlp_middleware.contrib.django")
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "django_project" / "manage.py"), "check"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr
    assert "no issues" in proc.stdout


# -- docs freshness --------------------------------------------------------------------------


def test_configuration_doc_holds_the_generated_table() -> None:
    text = (DOCS / "configuration.md").read_text(encoding="utf-8")
    assert render_markdown_table() in text, (
        "docs/configuration.md is out of date: paste the output of "
        "`python -c 'from otlp_middleware.config import render_markdown_table as r; print(r())'`"
    )


def test_api_doc_is_generated_from_the_docstrings() -> None:
    gen_api = load_example_module(DOCS / "gen_api.py", "docs_gen_api")
    assert gen_api.render() == (DOCS / "api.md").read_text(encoding="utf-8"), (
        "docs/api.md is out of date: run `python docs/gen_api.py`"
    )


def load_example_module(path: Path, name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
