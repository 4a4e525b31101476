"""The curated public surface, and importing without any web framework installed."""

from __future__ import annotations

import subprocess
import sys
import types

import otlp_middleware
import otlp_middleware.profiling

from .servers import ROOT


def public_names(module: types.ModuleType) -> set[str]:
    return {
        n
        for n, v in vars(module).items()
        if not n.startswith("_") and not isinstance(v, types.ModuleType) and n != "annotations"
    }


def test_all_is_sorted_and_complete() -> None:
    for module in (otlp_middleware, otlp_middleware.profiling):
        exported = list(module.__all__)
        assert exported == sorted(exported), module.__name__
        assert public_names(module) <= set(exported), module.__name__
        for name in exported:
            assert getattr(module, name) is not None


def test_seed_api_import_paths() -> None:
    from otlp_middleware.profiling import (  # noqa: F401
        AttributeValue,
        CpuProfiler,
        CpuProfilerConfig,
        ProfileBuilder,
        ProfileExporter,
        ProfileExporterConfig,
        generate_profile_id,
        profile_async,
        profile_sync,
    )

    assert ProfileExporter is otlp_middleware.ProfileExporter


def test_import_works_without_any_web_framework() -> None:
    code = (
        "import sys\n"
        "for name in ('django', 'flask', 'starlette', 'fastapi', 'werkzeug', 'anyio'):\n"
        "    sys.modules[name] = None\n"
        "import otlp_middleware\n"
        "from otlp_middleware import ProfilingMiddleware, WSGIProfilingMiddleware, FileExporter\n"
        "import tempfile\n"
        "async def app(scope, receive, send): pass\n"
        "m = ProfilingMiddleware(app, exporter=FileExporter(tempfile.mkdtemp()))\n"
        "m.profiler.shutdown(1)\n"
        "print('ok')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
