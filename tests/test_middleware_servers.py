"""The middleware under real servers: uvicorn (ASGI) and gunicorn gthread (WSGI).

Many concurrent requests to endpoints burning CPU in different functions: every profile holds
only its own request's functions, carries the trace id sent in that request's traceparent
(OpenTelemetry's middleware wraps ours), and its route template.
"""

from __future__ import annotations

import os
import secrets
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from otlp_middleware.pprof import Profile, read_profile

from .servers import free_port, serve, uvicorn_argv

pytestmark = [pytest.mark.server]

WORK_FUNCTIONS = {"alpha_work", "beta_work", "gamma_work", "delta_work", "red_work", "blue_work"}


def traceparent() -> tuple[str, str]:
    trace_id = secrets.token_hex(16)
    return trace_id, f"00-{trace_id}-{secrets.token_hex(8)}-01"


def load_profiles(directory: str) -> dict[str, Profile]:
    return {
        name: read_profile(os.path.join(directory, name))
        for name in sorted(os.listdir(directory))
        if name.endswith(".pb.gz")
    }


def functions(p: Profile) -> set[str]:
    return {p.string_table[f.name] for f in p.function}


def labels(p: Profile) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for s in p.sample:
        for lab in s.label:
            value = p.string_table[lab.str] if lab.str else str(lab.num)
            out.setdefault(p.string_table[lab.key], set()).add(value)
    return out


def comments(p: Profile) -> dict[str, str]:
    return dict(p.string_table[c].split("=", 1) for c in p.comment)


def send_concurrently(base: str, paths: list[str], workers: int = 8) -> dict[str, str]:
    """GET every path concurrently with its own traceparent; return trace id -> path."""
    sent: dict[str, str] = {}

    def one(path: str) -> None:
        trace_id, header = traceparent()
        r = httpx.get(base + path, headers={"traceparent": header}, timeout=30)
        assert r.status_code in (200, 201), (path, r.status_code, r.text)
        sent[trace_id] = path

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, paths))
    return sent


def check_profiles(
    profiles: dict[str, Profile], sent: dict[str, str], expect: dict[str, str]
) -> set[str]:
    """Each profile: one trace we sent, only its endpoint's function. Returns routes seen."""
    routes = set()
    for name, p in profiles.items():
        lab = labels(p)
        assert len(lab["trace_id"]) == 1, name
        trace_id = lab["trace_id"].pop()
        assert trace_id in sent, f"{name}: trace id {trace_id} was not sent"
        path = sent[trace_id]
        prefix = path.split("?")[0].rsplit("/", 1)[0] if path.count("/") > 1 else path.split("?")[0]
        own = expect[prefix]
        leaked = (functions(p) & WORK_FUNCTIONS) - {own}
        assert not leaked, f"{name} ({path}) holds other requests' functions: {leaked}"
        assert comments(p)["trace_id"] == trace_id
        assert len(lab["span_id"]) == 1 and len(lab["span_id"].pop()) == 16
        routes.add(comments(p).get("http.route", ""))
    return routes


def test_uvicorn_concurrent_requests_stay_separate(tmp_path: object) -> None:
    out = str(tmp_path)
    port = free_port()
    paths = ["/alpha/1?ms=20", "/beta?ms=20", "/gamma?ms=20", "/delta?ms=20"] * 12
    argv = uvicorn_argv("tests.apps.asgi_app:app", port)
    with serve(argv, port, {"TEST_OUTPUT_DIR": out}, ready_path="/health"):
        sent = send_concurrently(f"http://127.0.0.1:{port}", paths)
    profiles = load_profiles(out)
    assert len(profiles) >= len(paths) // 2, "most 20 ms requests at 99 Hz yield samples"
    expect = {
        "/alpha": "alpha_work",
        "/beta": "beta_work",
        "/gamma": "gamma_work",
        "/delta": "delta_work",
    }
    routes = check_profiles(profiles, sent, expect)
    assert {"/alpha/{item}", "/beta", "/gamma", "/delta"} <= routes
    # `def` endpoints (thread pool) and asyncio.to_thread work are attributed to their request.
    # Not every profile need show it: under CPU contention a request's few samples may all
    # land in its other frames (the loop's part, the worker's wrapper), 2 runs in 25 with two
    # CPU hogs, before and after the request watcher alike.
    for route, work in (("/gamma", "gamma_work"), ("/delta", "delta_work")):
        mine = [p for p in profiles.values() if comments(p).get("http.route") == route]
        missing = [sorted(functions(p)) for p in mine if work not in functions(p)]
        assert mine and len(missing) <= len(mine) // 4, (route, missing)
    # The excluded health check produced nothing.
    assert not any(comments(p).get("http.route") == "/health" for p in profiles.values())


def test_uvicorn_errors_and_streaming(tmp_path: object) -> None:
    out = str(tmp_path)
    port = free_port()
    argv = [
        "uvicorn",
        "tests.apps.asgi_app:app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "critical",
    ]
    with serve(argv, port, {"TEST_OUTPUT_DIR": out}, ready_path="/health") as base:
        for _ in range(5):
            with httpx.stream("GET", base + "/stream", timeout=10) as r:
                chunks = list(r.iter_raw())
                assert b"".join(chunks) == b"".join(f"chunk{i}\n".encode() for i in range(5))
            r = httpx.get(base + "/boom", timeout=10)
            assert r.status_code == 500
    profiles = load_profiles(out)
    by_route: dict[str, list[dict[str, str]]] = {}
    for p in profiles.values():
        c = comments(p)
        by_route.setdefault(c.get("http.route", ""), []).append(c)
    assert by_route.get("/boom"), "a failing request still yields its profile"
    for c in by_route["/boom"]:
        assert c["error.type"] == "RuntimeError"
        assert c["http.response.status_code"] == "500"
    assert by_route.get("/stream")
    assert all(c["http.response.status_code"] == "200" for c in by_route["/stream"])


def test_uvicorn_exports_the_last_profiles_at_shutdown(tmp_path: object) -> None:
    """uvicorn re-raises the SIGTERM it handled, so exit hooks never run: the middleware
    exports what is still queued (and still with the engine's collector) when the lifespan
    shutdown completes. With a one-minute export delay only that flush can write them."""
    out = str(tmp_path)
    port = free_port()
    argv = uvicorn_argv("tests.apps.asgi_app:app", port)
    env = {"TEST_OUTPUT_DIR": out, "TEST_SCHEDULE_DELAY": "60"}
    with serve(argv, port, env, ready_path="/health") as base:
        for _ in range(6):  # ~6 samples each at 99 Hz: each yields a profile
            assert httpx.get(base + "/beta?ms=60", timeout=10).status_code == 200
        assert load_profiles(out) == {}  # nothing exported yet
    profiles = load_profiles(out)
    assert len(profiles) == 6
    assert {comments(p).get("http.route") for p in profiles.values()} == {"/beta"}


def test_gunicorn_gthread_concurrent_requests_stay_separate(tmp_path: object) -> None:
    out = str(tmp_path)
    port = free_port()
    argv = [
        "gunicorn",
        "tests.apps.wsgi_app:app",
        "--bind",
        f"127.0.0.1:{port}",
        "--worker-class",
        "gthread",
        "--threads",
        "4",
        "--workers",
        "1",
        "--log-level",
        "warning",
    ]
    paths = ["/red/1", "/blue"] * 20
    with serve(argv, port, {"TEST_OUTPUT_DIR": out}, ready_path="/nope") as base:
        sent = send_concurrently(base, paths)
        with httpx.stream("GET", base + "/stream", timeout=10) as r:
            assert b"".join(r.iter_raw()).count(b"part") == 5
    profiles = load_profiles(out)
    assert len(profiles) >= len(paths) // 2
    stream_profiles = {
        n: p for n, p in profiles.items() if comments(p).get("http.route") == "/stream"
    }
    # The readiness probe (GET /nope, 404, no route, no traceparent) may have a sample too.
    request_profiles = {
        n: p
        for n, p in profiles.items()
        if n not in stream_profiles and comments(p).get("http.route")
    }
    routes = check_profiles(request_profiles, sent, {"/red": "red_work", "/blue": "blue_work"})
    assert routes == {"/red/<id>", "/blue"}
    statuses = {
        comments(p)["http.route"]: comments(p)["http.response.status_code"]
        for p in request_profiles.values()
    }
    assert statuses == {"/red/<id>": "200", "/blue": "201"}
