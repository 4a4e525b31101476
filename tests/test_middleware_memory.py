"""Heap samples per request: ``memory=True`` in the middleware, through to pprof files."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest

from otlp_middleware.export import FileExporter
from otlp_middleware.middleware import ProfilingMiddleware, WSGIProfilingMiddleware
from otlp_middleware.pprof import read_profile
from otlp_middleware.profiling import MemoryProfilerConfig
from otlp_middleware.profiling._frames import FRAMES

from .test_middleware import KeepingExporter, asgi_get


def allocate_for_alpha() -> list[bytes]:
    return [bytes(64 * 1024) for _ in range(200)]


def allocate_for_beta() -> list[bytes]:
    return [bytes(64 * 1024) for _ in range(200)]


async def alloc_app(scope: Any, receive: Any, send: Any) -> None:
    keep = allocate_for_alpha() if scope["path"] == "/alpha" else allocate_for_beta()
    for _ in range(4):
        await asyncio.sleep(0)  # interleave with the other request on the loop
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": str(len(keep)).encode()})


def heap_names(record: Any) -> set[str]:
    return {FRAMES.info(f).name for h in record.heap_samples for f in h.stack}


def test_asgi_requests_get_their_own_heap_samples() -> None:
    exporter = KeepingExporter()
    mw = ProfilingMiddleware(
        alloc_app,
        sampler="always",
        cpu=False,
        memory=MemoryProfilerConfig(sampling_rate=64 * 1024),
        exporter=exporter,
    )

    async def main() -> None:
        await asyncio.gather(asgi_get(mw, "/alpha"), asgi_get(mw, "/beta"))

    asyncio.run(main())
    mw.profiler.shutdown(5)
    by_path = {}
    for r in exporter.records:
        assert r.heap_samples and not r.cpu_samples
        by_path["alpha" if "allocate_for_alpha" in heap_names(r) else "beta"] = r
    assert set(by_path) == {"alpha", "beta"}
    assert "allocate_for_beta" not in heap_names(by_path["alpha"])
    assert "allocate_for_alpha" not in heap_names(by_path["beta"])
    for r in by_path.values():
        estimated = sum(h.alloc_bytes for h in r.heap_samples)
        assert 0.6 * 200 * 64 * 1024 <= estimated <= 1.5 * 200 * 64 * 1024, estimated
        assert r.heap_period_bytes == 64 * 1024


def test_wsgi_memory_setting_writes_heap_pprof_files(tmp_path: Any) -> None:
    def app(environ: Any, start_response: Any) -> Any:
        keep = allocate_for_alpha()
        start_response("200 OK", [])
        return [str(len(keep)).encode()]

    mw = WSGIProfilingMiddleware(
        app,
        sampler="always",
        memory=True,
        memory_sampling_rate=128 * 1024,
        exporter=FileExporter(tmp_path),
    )
    body = mw({"REQUEST_METHOD": "GET", "PATH_INFO": "/m"}, lambda s, h, e=None: None)
    list(body)
    body.close()  # type: ignore[attr-defined]
    mw.profiler.shutdown(5)
    heap_files = [f for f in os.listdir(tmp_path) if f.endswith(".heap.pb.gz")]
    assert len(heap_files) == 1
    profile = read_profile(tmp_path / heap_files[0])
    st = profile.string_table
    assert [st[t.type] for t in profile.sample_type] == [
        "alloc_objects",
        "alloc_space",
        "inuse_objects",
        "inuse_space",
    ]
    assert (st[profile.period_type.type], profile.period) == ("space", 128 * 1024)
    assert "allocate_for_alpha" in {st[f.name] for f in profile.function}


def test_invalid_memory_settings_raise() -> None:
    from otlp_middleware.errors import ConfigurationError

    with pytest.raises(ConfigurationError):
        ProfilingMiddleware(alloc_app, memory_sampling_rate=0, exporter=KeepingExporter())
