"""Where a profiled request's cost goes: the request path, the samples, the background threads.

One process, pinned to one CPU as the middleware benchmark's server is, serves the
benchmark's ~1 ms CPU ASGI app (``bench/app.py``) from an asyncio loop, in turns: through the
middleware deciding ``never``, profiling every request at 1 Hz (the request path, almost no
sample), and at 99 Hz. Turns alternate, so drift hits each alike. Per request it reports the
main thread's CPU, the background threads' (collector, export) CPU including the final flush,
the samples taken, and the signal handler's time (``stats()["handler_ns"]``).

    python bench/bench_split.py [--turns 8] [--requests 1500]

The app's handler does a fixed amount of work, so every sample's cost (the signal's delivery
and the handler, wherever it lands) adds to the main thread's figure. In process, without
sockets and with warmer caches, every figure is smaller than in a server
(``bench_middleware.py``); this one is free of the noise between processes that those ratios
carry, not of the machine's: the handler's fixed work takes longer in a slow spell of a shared
VM, so read differences under about 20 us per request between runs as noise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import threading
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def background_cpu() -> float:
    """CPU seconds of every thread but the main one."""
    total = 0.0
    for t in threading.enumerate():
        if t is threading.main_thread() or t.ident is None:
            continue
        with contextlib.suppress(OSError):  # the thread ended meanwhile
            total += time.clock_gettime(time.pthread_getcpuclockid(t.ident))
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--requests", type=int, default=1500)
    args = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})

    from bench.app import bare_app
    from otlp_middleware.middleware import ProfilingMiddleware
    from otlp_middleware.profiling import CpuProfilerConfig
    from otlp_middleware.profiling._engine import ENGINE

    out = tempfile.mkdtemp(prefix="bench-split-")
    apps: dict[str, ProfilingMiddleware] = {
        "never": ProfilingMiddleware(bare_app, sampler="never", output_dir=out),
    }
    for hz in (1, 99):
        apps[f"{hz} Hz"] = ProfilingMiddleware(
            bare_app,
            sampler="always",
            cpu=CpuProfilerConfig(sampling_frequency=hz),
            aggregate=True,
            output_dir=out,
        )
    scope = {"type": "http", "method": "GET", "path": "/", "headers": [], "root_path": ""}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            await asyncio.sleep(0)  # the loop polls its selector, as a server's does

    async def serve(app: Any, n: int) -> None:
        for _ in range(n):
            await app(scope, receive, send)

    def native_stats() -> dict[str, int]:
        native = ENGINE._native_module
        if native is None or not native.is_started():
            return {"samples": 0, "handler_ns": 0}
        return native.stats()  # type: ignore[no-any-return]

    def turn(name: str) -> tuple[float, float, float, float]:
        app = apps[name]
        asyncio.run(serve(app, 50))  # warm, and (the first time) start the sampler
        app.profiler.force_flush(10)
        before, bg0, t0 = native_stats(), background_cpu(), time.thread_time()
        asyncio.run(serve(app, args.requests))
        app.profiler.force_flush(30)
        main_us = (time.thread_time() - t0) / args.requests * 1e6
        bg_us = (background_cpu() - bg0) / args.requests * 1e6
        after = native_stats()
        samples = max(after["samples"] - before["samples"], 0) / args.requests
        handler_us = max(after["handler_ns"] - before["handler_ns"], 0) / args.requests / 1e3
        return main_us, bg_us, samples, handler_us

    results: dict[str, list[tuple[float, float, float, float]]] = {name: [] for name in apps}
    names = list(apps)
    for t in range(args.turns):
        for name in names if t % 2 == 0 else names[::-1]:
            results[name].append(turn(name))
    for app in apps.values():
        app.profiler.shutdown(10)

    base = statistics.median(r[0] for r in results["never"])
    print(
        f"In process, one CPU, {args.requests} requests of ~1 ms per turn, {args.turns} turns "
        f"each (medians; per request):"
    )
    for name, rows in results.items():
        main_us = statistics.median(r[0] for r in rows)
        bg_us = statistics.median(r[1] for r in rows)
        samples = statistics.mean(r[2] for r in rows)
        handler_us = statistics.mean(r[3] for r in rows)
        print(
            f"  {name:>6}: main thread {main_us:7.1f} us ({main_us - base:+5.1f}), background "
            f"{bg_us:4.1f} us, total {main_us - base + bg_us:+5.1f} us "
            f"(ratio ~{base / (main_us + bg_us):.4f}); {samples:.3f} samples, signal handler "
            f"{handler_us:.2f} us"
        )


if __name__ == "__main__":
    main()
