"""The middleware in-process: pass-through rules, failure isolation, export queue behaviour.

Apps are called through their real ASGI/WSGI interfaces; exporters are real ``Exporter``
implementations that keep what they receive.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from otlp_middleware.export import BatchProcessor, ExportResult, FileExporter
from otlp_middleware.middleware import ProfilingMiddleware, RequestProfiler, WSGIProfilingMiddleware
from otlp_middleware.profiling import CpuProfilerConfig
from otlp_middleware.profiling._engine import ENGINE
from otlp_middleware.profiling.sampling import NeverSample, SamplingStats, SamplingStrategy
from otlp_middleware.types import ProfileRecord

from . import workloads


class KeepingExporter:
    def __init__(self) -> None:
        self.records: list[ProfileRecord] = []
        self.shut = False

    def export(self, records: Sequence[ProfileRecord]) -> ExportResult:
        self.records.extend(records)
        return ExportResult(success=True, exported=len(records))

    def shutdown(self, timeout: float = 10.0) -> None:
        self.shut = True


class FailingExporter(KeepingExporter):
    def export(self, records: Sequence[ProfileRecord]) -> ExportResult:
        raise OSError("disk on fire")


class BlockingExporter(KeepingExporter):
    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def export(self, records: Sequence[ProfileRecord]) -> ExportResult:
        self.release.wait(10)
        return super().export(records)


def names(record: ProfileRecord) -> set[str]:
    from otlp_middleware.profiling._frames import FRAMES

    return {FRAMES.info(f).name for s in record.cpu_samples for f in s.stack}


async def asgi_get(app: Any, path: str, method: str = "GET") -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []
    scope = {"type": "http", "method": method, "path": path, "headers": [], "root_path": ""}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


async def cpu_app(scope: Any, receive: Any, send: Any) -> None:
    workloads.hot_function(0.1)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def watchers_handed_on(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The request watchers the lean ASGI path hands on to the collector
    (``ENGINE.release_request``: the requests that took samples), as it does."""
    handed_on: list[Any] = []
    release = ENGINE.release_request
    monkeypatch.setattr(
        ENGINE, "release_request", lambda *args: (handed_on.append(args[0]), release(*args))
    )
    return handed_on


def make(app: Any, exporter: Any, **options: Any) -> ProfilingMiddleware:
    options.setdefault("sampler", "always")
    options.setdefault("schedule_delay", 0.05)
    return ProfilingMiddleware(app, exporter=exporter, **options)


@pytest.fixture
def tracer() -> trace.Tracer:
    return TracerProvider().get_tracer("test")


def test_asgi_profiles_a_request_with_its_span(tracer: trace.Tracer) -> None:
    exporter = KeepingExporter()
    mw = make(cpu_app, exporter)

    async def main() -> None:
        with tracer.start_as_current_span("server") as span:
            await asgi_get(mw, "/x")
            ctx = span.get_span_context()
        mw.profiler.shutdown(5)
        (record,) = exporter.records
        assert record.link is not None
        assert record.link.trace_id == ctx.trace_id.to_bytes(16, "big")
        assert record.link.span_id == ctx.span_id.to_bytes(8, "big")

    asyncio.run(main())
    record = exporter.records[0]
    assert "hot_function" in names(record)
    assert record.attributes["http.request.method"] == "GET"
    assert record.attributes["http.response.status_code"] == 200
    assert "http.route" not in record.attributes, "never the raw path by default"
    assert len(record.profile_id) == 16 and any(record.profile_id)
    assert exporter.shut


def test_lean_path_record_has_span_status_route_and_error(
    tracer: trace.Tracer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From the second request on, the ASGI path hands the ended scope to the collector;
    the record built there keeps the span, status, route template and error of its request."""
    from types import SimpleNamespace

    from otlp_middleware.middleware._core import ROUTE_DECORATORS

    monkeypatch.setitem(ROUTE_DECORATORS, "in_use", False)  # other test modules apply some

    async def app(scope: Any, receive: Any, send: Any) -> None:
        workloads.hot_function(0.1)
        scope["route"] = SimpleNamespace(path="/items/{id}")  # as Starlette's router sets it
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})
        if scope["path"] != "/warm":
            raise RuntimeError("after the response")

    exporter = KeepingExporter()
    mw = make(app, exporter)
    handed_on = watchers_handed_on(monkeypatch)

    async def main() -> Any:
        await asgi_get(mw, "/warm")  # the first request starts and arms the sampler
        with tracer.start_as_current_span("server") as span:
            with pytest.raises(RuntimeError, match="after the response"):
                await asgi_get(mw, "/items/7")
            return span.get_span_context()

    ctx = asyncio.run(main())
    mw.profiler.shutdown(5)
    if ENGINE.native_available and ENGINE.method in ("auto", "native"):
        assert [w.samples > 0 for w in handed_on] == [True]  # /items/7 only
    record = exporter.records[-1]
    assert record.link is not None
    assert record.link.trace_id == ctx.trace_id.to_bytes(16, "big")
    assert record.attributes["http.route"] == "/items/{id}"
    assert record.attributes["http.response.status_code"] == 201
    assert record.attributes["error.type"] == "RuntimeError"
    assert "hot_function" in names(record)


def test_lean_asgi_path_attributes_offloaded_work_by_its_root_frame(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The lean path sets no contextvar: work offloaded with ``asyncio.to_thread``,
    ``run_in_executor`` and anyio's ``to_thread.run_sync`` (Starlette's ``def`` endpoints)
    finds the request by its root frame on the submitting stack."""
    import anyio.to_thread

    from otlp_middleware.middleware._core import ROUTE_DECORATORS
    from otlp_middleware.profiling import _offload

    monkeypatch.setitem(ROUTE_DECORATORS, "in_use", False)  # other test modules apply some
    seen: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(_offload.CURRENT_SCOPE.get())
        if scope["path"] == "/work":
            await asyncio.to_thread(workloads.hot_function, 0.1)
            await asyncio.get_running_loop().run_in_executor(None, workloads.cold_function, 0.1)
            await anyio.to_thread.run_sync(workloads.spin, 0.1)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    exporter = KeepingExporter()
    mw = make(app, exporter)
    handed_on = watchers_handed_on(monkeypatch)

    async def main() -> None:
        await asgi_get(mw, "/warm")  # the first request starts and arms the sampler
        await asgi_get(mw, "/work")

    asyncio.run(main())
    mw.profiler.shutdown(5)
    if ENGINE.native_available and ENGINE.method in ("auto", "native"):
        assert len(handed_on) == 1 and handed_on[0].scope.code_root  # made for its threads
        assert seen[-1] is None, "the lean path sets no contextvar"
    assert ENGINE._code_roots == {}
    record = exporter.records[-1]
    assert {"hot_function", "cold_function", "spin"} <= names(record), names(record)


def test_non_http_scopes_pass_through_untouched() -> None:
    seen: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope)
        workloads.spin(0.05)

    exporter = KeepingExporter()
    mw = make(app, exporter)
    for kind in ("lifespan", "websocket"):
        scope = {"type": kind}
        asyncio.run(mw(scope, None, None))  # type: ignore[arg-type]
        assert seen[-1] is scope
    mw.profiler.shutdown(5)
    assert exporter.records == [] and mw.profiler.stats().requests == 0


def test_asgi_exception_propagates_unchanged_and_profile_is_kept() -> None:
    class Boom(Exception):
        pass

    error = Boom("x")

    async def app(scope: Any, receive: Any, send: Any) -> None:
        workloads.hot_function(0.1)
        raise error

    exporter = KeepingExporter()
    mw = make(app, exporter)
    with pytest.raises(Boom) as info:
        asyncio.run(asgi_get(mw, "/boom"))
    assert info.value is error
    mw.profiler.shutdown(5)
    (record,) = exporter.records
    assert (
        record.attributes["error.type"]
        == "test_asgi_exception_propagates_unchanged_and_profile_is_kept.<locals>.Boom"
    )
    assert record.attributes["http.response.status_code"] == 500


def test_asgi_streaming_is_not_buffered() -> None:
    """Each chunk reaches the server before the app produces the next one."""
    order: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for i in range(3):
            order.append(f"produce{i}")
            await send({"type": "http.response.body", "body": b"x", "more_body": i < 2})

    mw = make(app, KeepingExporter())

    async def main() -> None:
        scope = {"type": "http", "method": "GET", "path": "/s", "headers": []}

        async def receive() -> dict[str, Any]:
            return {"type": "http.request"}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.body":
                order.append("sent")

        await mw(scope, receive, send)

    asyncio.run(main())
    mw.profiler.shutdown(5)
    assert order == ["produce0", "sent", "produce1", "sent", "produce2", "sent"]


def test_excluded_paths_and_disabled_middleware() -> None:
    exporter = KeepingExporter()
    mw = make(cpu_app, exporter, exclude_paths=["/health*", "/metrics"])
    asyncio.run(asgi_get(mw, "/healthz"))
    asyncio.run(asgi_get(mw, "/metrics"))
    off = make(cpu_app, exporter, enabled=False)
    asyncio.run(asgi_get(off, "/x"))
    mw.profiler.shutdown(5)
    off.profiler.shutdown(5)
    assert exporter.records == []
    assert mw.profiler.stats().sampled == 0 and off.profiler.stats().sampled == 0


@pytest.mark.parametrize(
    "globs",
    [
        ("/health*", "/livez", "/readyz", "/metrics", "/favicon.ico"),  # the defaults
        ("/a/*/b", "/x?", "/p[ab]*", "*.css", "/*/deep*", "/exact", "/pre*"),
        ("*",),
        (),
    ],
)
def test_path_globs_match_exactly_as_fnmatchcase(globs: tuple[str, ...]) -> None:
    """The split into exact paths, prefixes and one regex keeps fnmatch's semantics."""
    import fnmatch

    from otlp_middleware.middleware._core import split_globs

    exact, prefixes, match = split_globs(globs)
    paths = [
        "/", "/health", "/healthz/deep", "/Health", "/livez", "/livez/", "/readyz", "/metrics",
        "/metrics2", "/favicon.ico", "/a/q/b", "/a/b", "/xy", "/x", "/pa", "/pc", "/pb/x",
        "/s/x.css", "/q/deep/x", "/exact", "/exact/", "/prefix", "/pr",
    ]  # fmt: skip
    for path in paths:
        ours = (
            path in exact or path.startswith(prefixes) or (match is not None and bool(match(path)))
        )
        assert ours == any(fnmatch.fnmatchcase(path, g) for g in globs), (path, globs)


def test_requests_without_samples_export_nothing() -> None:
    async def quick(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    exporter = KeepingExporter()
    mw = make(quick, exporter)
    for _ in range(20):
        asyncio.run(asgi_get(mw, "/quick"))
    mw.profiler.shutdown(5)
    stats = mw.profiler.stats()
    assert stats.sampled == 20
    assert stats.profiles_emitted == len(exporter.records) <= 2
    assert stats.empty >= 18


def test_failing_exporter_never_reaches_the_app(caplog: pytest.LogCaptureFixture) -> None:
    exporter = FailingExporter()
    mw = make(cpu_app, exporter)
    for _ in range(3):
        sent = asyncio.run(asgi_get(mw, "/x"))
        assert sent[-1]["body"] == b"ok"
    assert mw.profiler.force_flush(5)
    mw.profiler.shutdown(5)
    assert mw.profiler.processor.stats().failed == 3
    assert "disk on fire" in caplog.text


def test_a_failing_exporter_is_logged_once_a_minute_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every batch failing (a full disk, say) gives one traceback, then a count, not a flood."""
    processor = BatchProcessor(FailingExporter(), max_export_batch_size=1, schedule_delay=0.01)
    record = ProfileRecord(profile_id=b"p" * 16, start_time_ns=1, duration_ns=1)
    with caplog.at_level("WARNING", logger="otlp_middleware"):
        for _ in range(5):
            assert processor.emit(record)
            assert processor.force_flush(5)
    processor.shutdown(5)
    failures = [r for r in caplog.records if "exporter 'FailingExporter' failed" in r.message]
    assert len(failures) == 1 and "(1 so far)" in failures[0].message
    assert failures[0].exc_info is not None and "disk on fire" in caplog.text
    assert processor.stats().failed == 5


def test_full_queue_drops_and_counts_without_blocking() -> None:
    exporter = BlockingExporter()
    processor = BatchProcessor(
        exporter, max_queue_size=2, max_export_batch_size=1, schedule_delay=0.01
    )
    profiler = RequestProfiler(sampler=_always(), processor=processor, cpu=CpuProfilerConfig())
    mw = ProfilingMiddleware(cpu_app, profiler=profiler)
    started = time.monotonic()
    for _ in range(8):
        asyncio.run(asgi_get(mw, "/x"))
    elapsed = time.monotonic() - started
    exporter.release.set()
    profiler.shutdown(5)
    stats = processor.stats()
    assert stats.dropped >= 4, stats
    assert stats.emitted + stats.dropped == 8
    assert elapsed < 8 * 0.1 + 5, "requests were not held up by the blocked exporter"


class ExplodingSampler(SamplingStrategy):
    def should_sample(self) -> bool:  # type: ignore[override]
        raise RuntimeError("sampler bug")

    def reset(self) -> None:
        pass

    def stats(self) -> SamplingStats:
        return SamplingStats(0, 0)


def _always() -> SamplingStrategy:
    from otlp_middleware.profiling.sampling import AlwaysSample

    return AlwaysSample()


def test_faults_inside_profiling_do_not_break_requests(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    exporter = KeepingExporter()
    mw = make(cpu_app, exporter, sampler=ExplodingSampler())
    assert asyncio.run(asgi_get(mw, "/x"))[-1]["body"] == b"ok"
    assert mw.profiler.stats().faults == 1

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("engine bug")

    mw2 = make(cpu_app, exporter)
    monkeypatch.setattr(ENGINE, "open_root_scope", broken)  # the ASGI request path's call
    assert asyncio.run(asgi_get(mw2, "/x"))[-1]["body"] == b"ok"
    monkeypatch.undo()
    assert mw2.profiler.stats().faults == 1
    mw.profiler.shutdown(5)
    mw2.profiler.shutdown(5)
    assert "the request is not affected" in caplog.text


@pytest.mark.skipif(
    not ENGINE.native_available or ENGINE.method not in ("auto", "native"),
    reason="the lean path runs on the native tier",
)
@pytest.mark.parametrize("where", ["copy_context", "release_request"])
def test_faults_on_the_lean_request_path_do_not_break_requests(
    where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the lean ASGI path (from a server's second request on) calls into as a request
    that took samples ends fails: the request completes, the fault is counted."""
    import otlp_middleware.middleware.asgi as asgi_module
    from otlp_middleware.middleware._core import ROUTE_DECORATORS

    monkeypatch.setitem(ROUTE_DECORATORS, "in_use", False)  # other test modules apply some
    exporter = KeepingExporter()
    mw = make(cpu_app, exporter)
    try:
        asyncio.run(asgi_get(mw, "/warm"))  # the first request starts and arms the sampler
        assert ENGINE._code_roots == {}

        def broken(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("engine bug")

        monkeypatch.setattr(ENGINE if where == "release_request" else asgi_module, where, broken)
        sent = asyncio.run(asgi_get(mw, "/x"))  # 0.1 s of CPU: about ten samples at 99 Hz
        assert sent[0]["status"] == 200 and sent[-1]["body"] == b"ok"
        assert mw.profiler.stats().faults == 1
        assert ENGINE.open_watchers() == 0  # ended all the same
    finally:
        monkeypatch.undo()
        ENGINE._code_roots.clear()  # what the broken calls left registered
        ENGINE._pending.clear()  # samples of the request never released (bounded otherwise)
        mw.profiler.shutdown(5)


def test_every_request_is_counted_once_on_the_always_path() -> None:
    """``always`` counts inline on the ASGI path (the first request takes the general path,
    the next ones the request watcher's): each request is counted once, excluded ones are
    no decision, and the profiler's and the sampler's counts agree."""

    async def quick(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    mw = make(quick, KeepingExporter(), exclude_paths=["/health", "/static/*"])

    async def main() -> None:
        for path in ["/a", "/b", "/health", "/c", "/static/x.css", "/d"]:
            await asgi_get(mw, path)

    asyncio.run(main())
    stats = mw.profiler.stats()
    assert (stats.requests, stats.sampled) == (6, 4)
    decided = mw.profiler.sampler.stats()
    assert (decided.decisions, decided.sampled) == (4, 4)
    mw.profiler.sampler.reset()
    assert mw.profiler.sampler.stats().decisions == 0
    mw.profiler.shutdown(5)


def test_never_sampler_skips_everything() -> None:
    exporter = KeepingExporter()
    mw = make(cpu_app, exporter, sampler=NeverSample())
    asyncio.run(asgi_get(mw, "/x"))
    mw.profiler.shutdown(5)
    assert exporter.records == [] and mw.profiler.stats().requests == 1


# ---------------------------------------------------------------- WSGI
def wsgi_call(app: Any, path: str) -> tuple[str, list[bytes], Any]:
    status: list[str] = []

    def start_response(s: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        status.append(s)
        return lambda data: None

    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": path, "HTTP_TRACEPARENT": "x"}
    body = app(environ, start_response)
    return status[0] if status else "", list(body), body


def test_wsgi_scope_closes_when_the_body_is_closed() -> None:
    exporter = KeepingExporter()

    def app(environ: Any, start_response: Any) -> Any:
        start_response("200 OK", [])

        def gen() -> Any:
            for _ in range(3):
                workloads.hot_function(0.05)
                yield b"x"

        return gen()

    mw = WSGIProfilingMiddleware(app, exporter=exporter, sampler="always")
    status, chunks, body = wsgi_call(mw, "/w")
    assert ENGINE.open_scopes == 1, "the scope stays open while the body streams"
    body.close()
    assert ENGINE.open_scopes == 0
    mw.profiler.shutdown(5)
    assert status == "200 OK" and chunks == [b"x"] * 3
    (record,) = exporter.records
    assert "hot_function" in names(record)
    assert record.attributes["http.response.status_code"] == 200


def test_wsgi_exception_propagates_and_scope_closes() -> None:
    exporter = KeepingExporter()

    def app(environ: Any, start_response: Any) -> Any:
        workloads.hot_function(0.1)
        raise KeyError("k")

    mw = WSGIProfilingMiddleware(app, exporter=exporter, sampler="always")
    with pytest.raises(KeyError):
        wsgi_call(mw, "/w")
    assert ENGINE.open_scopes == 0
    mw.profiler.shutdown(5)
    assert exporter.records[0].attributes["error.type"] == "KeyError"


def test_file_exporter_per_request_and_aggregate(tmp_path: Any) -> None:
    import os

    from otlp_middleware.pprof import read_profile

    per_request = FileExporter(tmp_path / "each", max_files=3)
    mw = make(cpu_app, per_request)
    for _ in range(5):
        asyncio.run(asgi_get(mw, "/x"))
    mw.profiler.shutdown(5)
    files = sorted(os.listdir(tmp_path / "each"))
    assert len(files) == 3, "oldest files removed beyond max_files"
    assert all(f.endswith(".cpu.pb.gz") and "_GET_" in f for f in files)

    aggregate = FileExporter(tmp_path / "agg", aggregate=True)
    mw = make(cpu_app, aggregate, schedule_delay=30)
    for _ in range(4):
        asyncio.run(asgi_get(mw, "/x"))
    mw.profiler.shutdown(5)
    (name,) = os.listdir(tmp_path / "agg")
    profile = read_profile(tmp_path / "agg" / name)
    st = profile.string_table
    assert "requests=4" in [st[c] for c in profile.comment]
    methods = {
        st[lab.str]
        for s in profile.sample
        for lab in s.label
        if st[lab.key] == "http.request.method"
    }
    assert methods == {"GET"}


class DiscardingExporter(KeepingExporter):
    def export(self, records: Sequence[ProfileRecord]) -> ExportResult:
        return ExportResult(success=True, exported=len(records))


def test_many_profiled_requests_do_not_leak_memory() -> None:
    """After warm-up, thousands of profiled requests leave no per-request memory behind."""
    import gc
    import sys

    async def app(scope: Any, receive: Any, send: Any) -> None:
        workloads.spin(0.0005)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    mw = make(app, DiscardingExporter(), schedule_delay=0.01)

    async def burst(n: int) -> None:
        for _ in range(n):
            await asgi_get(mw, "/x")

    asyncio.run(burst(300))  # warm up: frame table, interned strings, caches
    mw.profiler.force_flush(5)
    gc.collect()
    blocks = sys.getallocatedblocks()
    asyncio.run(burst(3000))
    mw.profiler.force_flush(5)
    gc.collect()
    grown = sys.getallocatedblocks() - blocks
    mw.profiler.shutdown(5)
    assert mw.profiler.stats().sampled == 3300
    # a kept record costs ~14 blocks and ~150 of these requests get a sample: keeping them
    # all would grow ~2000 blocks (measured), nothing kept grows ~25
    assert grown < 500, f"{grown} blocks kept after 3000 requests"


def test_interleaved_async_requests_on_one_loop_keep_their_own_samples() -> None:
    """Two requests alternate 3 ms CPU chunks on one event loop for ~0.6 s of CPU each.

    The loop thread samples both; each sample goes to the request whose root frame is on its
    stack (found by the middleware coroutine's code on the native tier), including the
    samples the background collector drains while the requests are still running.
    """

    def burn_alpha() -> None:
        workloads.spin(0.003)

    def burn_beta() -> None:
        workloads.spin(0.003)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        burn = burn_alpha if scope["path"] == "/alpha" else burn_beta
        for _ in range(200):
            burn()
            await asyncio.sleep(0)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    exporter = KeepingExporter()
    mw = make(app, exporter)

    async def main() -> None:
        await asyncio.gather(asgi_get(mw, "/alpha"), asgi_get(mw, "/beta"))

    asyncio.run(main())
    mw.profiler.shutdown(5)
    burners = []
    for record in exporter.records:
        found = {n.rsplit(".", 1)[-1] for n in names(record)} & {"burn_alpha", "burn_beta"}
        assert len(found) == 1, found  # one request's function, never the other's
        burners += found
        assert len(record.cpu_samples) >= 10, len(record.cpu_samples)
    assert sorted(burners) == ["burn_alpha", "burn_beta"]
    # ~1.2 s of CPU in all at 99 Hz. The split between the two is not tested: CPU timers
    # fire on the kernel's 4 ms tick, whose phase against the 6 ms alpha/beta cycle can
    # favour one request's chunks.
    total = sum(len(r.cpu_samples) for r in exporter.records)
    assert 80 <= total <= 160, total


def test_a_request_that_only_waited_while_another_ran_exports_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Samples taken in a request's window that are another request's make it no profile.

    On one loop, ``/wait`` awaits while ``/busy`` burns CPU: samples are taken during both
    windows, but they are ``/busy``'s; ``/wait`` gets none of them, and no profile unless a
    sample fell in its own few microseconds of CPU (about 1 run in 100; 1 in 30 under
    ``-X dev``), and then one of its own frames only. On the lean path the handler counts
    each request's own samples, so a request is handed on to the collector only if it took
    one: ``/busy`` always, ``/wait`` only when it has a profile.
    """
    import types

    exporter = KeepingExporter()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        scope["route"] = types.SimpleNamespace(path=scope["path"])
        if scope["path"] == "/wait":
            await asyncio.sleep(0.15)
        elif scope["path"] == "/busy":
            workloads.hot_function(0.1)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    mw = make(app, exporter)
    handed_on: list[str | None] = []
    release = ENGINE.release_request

    def releasing(watcher: Any, finish: Any) -> None:
        handed_on.append(finish.args[2])  # finish: _finish_lean with the request's route
        release(watcher, finish)

    monkeypatch.setattr(ENGINE, "release_request", releasing)

    async def main() -> None:
        await asgi_get(mw, "/warm")  # the first request starts and arms the sampler
        await asyncio.gather(asgi_get(mw, "/wait"), asgi_get(mw, "/busy"))

    asyncio.run(main())
    mw.profiler.shutdown(5)
    by_route = {r.attributes.get("http.route"): r for r in exporter.records}
    assert "hot_function" in names(by_route["/busy"])
    for own_cpu_only in ("/wait", "/warm"):
        if own_cpu_only in by_route:
            assert "hot_function" not in names(by_route[own_cpu_only])
    stats = mw.profiler.stats()
    assert stats.empty == stats.sampled - len(exporter.records)
    if "/wait" not in by_route:
        assert stats.empty >= 1  # /wait: quiet, though samples were taken in its window
    if handed_on:  # the lean path (taken when the sampler already runs at this rate)
        assert "/busy" in handed_on and set(handed_on) <= set(by_route)


@pytest.mark.skipif(
    not ENGINE.native_available or ENGINE.method not in ("auto", "native"),
    reason="the lean path runs on the native tier",
)
def test_a_handed_on_request_lets_go_of_the_servers_send_and_scope(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A request that took samples waits for the collector (up to a second) with only what
    its record needs: the server's ``send`` (and all it holds) and the ASGI scope go at its
    end, and a late call of the request's ``send`` is an error, not a write."""
    import gc
    import weakref

    exporter = KeepingExporter()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        workloads.hot_function(0.05)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    class ServerSend:
        async def __call__(self, message: Any) -> None:
            pass

    async def receive() -> Any:
        return {"type": "http.request", "body": b"", "more_body": False}

    from otlp_middleware.middleware._core import ROUTE_DECORATORS

    # the lean path, even after other tests used route decorators (a process-wide switch)
    monkeypatch.setitem(ROUTE_DECORATORS, "in_use", False)
    mw = make(app, exporter)
    kept: list[Any] = []
    release = ENGINE.release_request

    def releasing(watcher: Any, finish: Any) -> None:
        kept.append(watcher)  # as the engine's queue does, until the collector runs
        release(watcher, finish)

    monkeypatch.setattr(ENGINE, "release_request", releasing)
    refs: list[weakref.ref[Any]] = []

    async def one() -> None:
        send, scope = ServerSend(), _Scope(type="http", method="GET", path="/x")
        refs[:] = [weakref.ref(send), weakref.ref(scope)]
        await mw(scope, receive, send)

    async def main() -> None:
        await asgi_get(mw, "/warm")  # the first request starts and arms the sampler
        for _ in range(5):
            await one()
            if kept:
                return

    try:
        asyncio.run(main())
        assert kept, "no request took the lean path with a sample"
        gc.collect()
        assert [r() for r in refs] == [None, None]  # the server's send, the ASGI scope
        with pytest.raises(RuntimeError, match="ended"):
            asyncio.run(kept[-1]({"type": "http.response.body", "body": b"late"}))
    finally:
        mw.profiler.shutdown(5)
    assert exporter.records


class _Scope(dict):  # type: ignore[type-arg]
    """A dict that can be weakly referenced."""


@pytest.mark.skipif(
    not ENGINE.native_available or ENGINE.method not in ("auto", "native"),
    reason="the lean path runs on the native tier",
)
def test_lean_request_keeps_the_samples_drained_while_it_ran(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A drain in the middle of a request (the collector's, every second) finds samples of a
    request that has no scope yet: they wait for it, and its record has them all."""
    from otlp_middleware.middleware._core import ROUTE_DECORATORS

    monkeypatch.setitem(ROUTE_DECORATORS, "in_use", False)  # other test modules apply some
    waiting: list[int] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["path"] == "/long":
            workloads.hot_function(0.15)
            with ENGINE._lock:
                ENGINE.collect()
            waiting.append(sum(len(v) for v in ENGINE._pending.values()))
            workloads.cold_function(0.15)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    exporter = KeepingExporter()
    mw = make(app, exporter)
    handed_on = watchers_handed_on(monkeypatch)

    async def main() -> None:
        await asgi_get(mw, "/warm")  # the first request starts and arms the sampler
        await asgi_get(mw, "/long")

    asyncio.run(main())
    mw.profiler.shutdown(5)
    assert len(handed_on) == 1 and waiting[0] >= 5, waiting
    record = exporter.records[-1]
    assert {"hot_function", "cold_function"} <= names(record), names(record)
    assert len(record.cpu_samples) == handed_on[0].samples
    assert handed_on[0].tag not in ENGINE._pending and ENGINE.open_watchers() == 0


def test_samples_of_a_request_that_never_ends_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Samples wait for their request's scope; should a request never release it, the oldest
    requests' are dropped beyond a bound instead of piling up."""
    from otlp_middleware.profiling import _native_tier

    monkeypatch.setattr(_native_tier, "MAX_PENDING_REQUESTS", 2)
    monkeypatch.setattr(ENGINE, "_pending", {-(2**63) + i: [((1,), 1, i)] for i in range(5)})
    ENGINE._take_pending([])
    assert list(ENGINE._pending) == [-(2**63) + 3, -(2**63) + 4]


def test_lean_path_keeps_a_mounted_apps_prefix_in_the_route(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A Starlette ``Mount`` adds its prefix to the request's ``root_path`` as it routes: the
    route template of a lean request's record keeps it in front of the inner route's."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Mount, Route

    from otlp_middleware.middleware._core import ROUTE_DECORATORS

    monkeypatch.setitem(ROUTE_DECORATORS, "in_use", False)  # other test modules apply some

    async def item(request: Request) -> PlainTextResponse:
        workloads.hot_function(0.1)
        return PlainTextResponse("ok")

    inner = Starlette(routes=[Route("/items/{item_id}", item)])
    exporter = KeepingExporter()
    mw = make(Starlette(routes=[Mount("/api", app=inner)]), exporter)
    handed_on = watchers_handed_on(monkeypatch)

    async def main() -> None:
        for _ in range(2):  # the first starts and arms the sampler, the second is lean
            sent = await asgi_get(mw, "/api/items/7")
            assert sent[0]["status"] == 200

    asyncio.run(main())
    mw.profiler.shutdown(5)
    routes = [r.attributes.get("http.route") for r in exporter.records]
    assert routes == ["/api/items/{item_id}"] * 2
    if ENGINE.native_available and ENGINE.method in ("auto", "native"):
        assert len(handed_on) == 1  # the second request, on the lean path
