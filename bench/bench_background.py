"""The background threads' cost per exported request, with and without the GIL handoff.

The collector (drains the native ring, builds the records) and the exporter thread wait
between batches on a ``Bell`` (``otlp_middleware.profiling._bell``): on waking, the main
thread hands them the GIL. The alternative, ``threading.Event``, takes the GIL back the
ordinary way, and while the main thread is busy and releasing the GIL around its system
calls, CPython wakes the waiting thread at each release it then loses (a context switch
each). This runs an ASGI app in process on an asyncio loop (every request profiled at
99 Hz, a ~1 ms CPU handler, the loop polling its selector between requests as a server
does), once with each, in fresh processes, and reports each thread's CPU time and context
switches per exported request record.

    python bench/bench_background.py [--requests 5000] [--repeat 2]

Not pinned: the background threads run on another CPU if there is one, as in production.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def thread_usage() -> dict[str, tuple[float, int]]:
    """{thread name: (CPU seconds, context switches)} of this process's Python threads."""
    out = {}
    for t in threading.enumerate():
        if t.native_id is None or t.ident is None:
            continue
        try:
            with open(f"/proc/self/task/{t.native_id}/status") as f:
                switches = sum(int(line.split()[1]) for line in f if "ctxt_switches" in line)
            cpu = time.clock_gettime(time.pthread_getcpuclockid(t.ident))
        except OSError:
            continue
        out[t.name] = (cpu, switches)
    return out


def child(variant: str, requests: int) -> dict[str, Any]:
    """One run in this process: ``handoff`` (Bell) or ``event`` (threading.Event)."""
    if variant == "event":
        import otlp_middleware.export._batch as batch
        import otlp_middleware.profiling._workers as workers

        workers.Bell = threading.Event  # type: ignore[misc,assignment]
        batch.Bell = threading.Event  # type: ignore[misc,assignment]
    from bench.app import bare_app
    from otlp_middleware.middleware import ProfilingMiddleware
    from otlp_middleware.profiling import CpuProfilerConfig

    app = ProfilingMiddleware(
        bare_app,
        sampler="always",
        cpu=CpuProfilerConfig(sampling_frequency=99),
        aggregate=True,
        output_dir=tempfile.mkdtemp(prefix="bench-background-"),
    )
    scope = {"type": "http", "method": "GET", "path": "/", "headers": [], "root_path": ""}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            await asyncio.sleep(0)  # the loop polls its selector: the GIL is released

    async def run() -> dict[str, Any]:
        for _ in range(300):
            await app(scope, receive, send)
        app.profiler.force_flush(10)
        before, emitted = thread_usage(), app.profiler.stats().profiles_emitted
        for _ in range(requests):
            await app(scope, receive, send)
        app.profiler.force_flush(30)
        after = thread_usage()
        records = app.profiler.stats().profiles_emitted - emitted
        threads = {
            name: (cpu - before.get(name, (0.0, 0))[0], sw - before.get(name, (0.0, 0))[1])
            for name, (cpu, sw) in after.items()
        }
        return {"records": records, "requests": requests, "threads": threads}

    result = asyncio.run(run())
    app.profiler.shutdown(10)
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.requests)))
        return
    print(
        f"In process, every request profiled at 99 Hz, {args.requests} requests of ~1 ms "
        f"per run; per exported request record (about 1 in 10 requests):"
    )
    for r in range(args.repeat):
        for variant in ("event", "handoff") if r % 2 == 0 else ("handoff", "event"):
            out = subprocess.run(
                [sys.executable, __file__, "--child", variant, "--requests", str(args.requests)],
                capture_output=True,
                text=True,
                check=True,
                env={**os.environ, "PYTHONPATH": ROOT},
            ).stdout
            res = json.loads(out.strip().splitlines()[-1])
            n = max(res["records"], 1)
            parts = [
                f"{name.removeprefix('otlp-middleware-')} {cpu / n * 1e6:6.1f} us "
                f"{switches / n:5.2f} switches"
                for name, (cpu, switches) in sorted(res["threads"].items())
                if name.startswith("otlp-middleware-")
            ]
            main_cpu = res["threads"]["MainThread"][0] / res["requests"] * 1e6
            print(
                f"  {variant:>8} ({res['records']} records): "
                + ", ".join(parts)
                + f"; main thread {main_cpu:.1f} us per request"
            )


if __name__ == "__main__":
    main()
