"""The benchmark app: one ~1 ms CPU endpoint, wrapped according to BENCH_MODE.

BENCH_MODE: ``bare`` (no middleware), ``never`` (middleware, nothing sampled), ``always``
(every request profiled at 99 Hz, aggregate pprof files), ``otlp`` (every request profiled,
exported as OTLP to BENCH_ENDPOINT), ``switch`` (as ``always``, but profiling is off until a
SIGUSR1 turns it on, and each SIGUSR1 flips it: one process measured against itself),
``pyinstrument`` (a peer: pyinstrument's profiler around every request at 99 Hz; ``pip install
pyinstrument``). BENCH_HZ sets the sampling rate of ``always``, ``otlp`` and ``switch``
(default 99); BENCH_WORK the handler's work (default 700 chunks, about 1 ms), and
BENCH_HANDLER=mixed makes it build and encode records instead of adding ints (see
``mixed_work``). For diagnosis, ``always_norecord`` is ``always`` with no record built
from the requests that took samples (they are handed on and their samples collected, then
dropped: no record, no export); BENCH_HANDON=0 does the same to ``switch``, which with
BENCH_HZ then separates the request path, the sampling, and the records with what follows
them. BENCH_SPLIT=FILE times
the handler's work on its thread's CPU clock and, at each SIGUSR2, appends to FILE a JSON line
of the CPU spent so far: in the handler, in the main thread, in the process, in the garbage
collector (see ``split_snapshot``).
"""

from __future__ import annotations

import gc
import json
import os
import resource
import signal
import time
from typing import Any

from otlp_middleware.middleware import ProfilingMiddleware
from otlp_middleware.profiling import CpuProfilerConfig
from otlp_middleware.profiling.sampling import DecisionCounter, SamplingStats, SamplingStrategy

# Chunks of the handler's loop: about 1 ms of CPU on the machines this runs on (1.4 us each).
WORK = int(os.environ.get("BENCH_WORK", "700"))


def handler_work(chunks: int = WORK) -> int:
    """A fixed amount of pure-Python work (about 1 ms), the same in every process.

    Fixed work, not a fixed CPU time: a sample's cost inside the handler (the signal, the
    handler) then adds to the request as it would in a real app, instead of being absorbed
    by a loop that runs until its thread's CPU clock has advanced 1 ms.
    """
    if MIXED:
        return mixed_work(chunks // 4)
    x = 0
    for _ in range(chunks):
        for i in range(50):
            x += i
    return x


# BENCH_HANDLER=mixed: the handler builds and encodes records (dicts, lists, strings, floats,
# json) instead of adding ints. The int loop allocates and frees one 32-byte int per step,
# which makes it the most sensitive of workloads to the state the allocator's pools are in
# (a pool one block short of full costs it 7% more); this one spreads its allocations over
# the size classes, as a web handler does.
MIXED = os.environ.get("BENCH_HANDLER", "ints") == "mixed"


def mixed_work(chunks: int) -> int:
    out = []
    for i in range(chunks):
        item = {"id": i, "name": f"item-{i}", "price": i * 1.25, "tags": [str(i), "a", "b"]}
        item["total"] = sum(len(t) for t in item["tags"]) + item["price"]
        out.append(json.dumps(item, sort_keys=True))
    return len("".join(out))


SPLIT_FILE = os.environ.get("BENCH_SPLIT")
# [requests, handler CPU ns] while BENCH_SPLIT is set
_split = [0, 0]
_gc_started = [0.0]
_gc_time = [0.0, 0.0, 0.0]  # seconds the garbage collector took, by generation


def split_snapshot(signum: int = 0, frame: Any = None) -> None:
    """Append the CPU split so far to BENCH_SPLIT's file (a SIGUSR2 handler: main thread).

    Two snapshots around a measured window give, per request: the handler's own work, the
    rest of the main thread (the server, the middleware, samples landing outside the
    handler), and the other threads (the profiler's collector and exporter). Each of these
    is a CPU clock of this process, so the share of the CPU the process got does not enter.
    The process's minor page faults come along: see ``bench_middleware.read_split``.
    """
    assert SPLIT_FILE is not None
    line = {
        "requests": _split[0],
        "handler_s": _split[1] / 1e9,
        "main_s": time.thread_time(),
        "process_s": time.process_time(),
        "minor_faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt,
        "gc_collections": [g["collections"] for g in gc.get_stats()],
        "gc_s": _gc_time[:],
        "signal_handler_s": _signal_handler_ns() / 1e9,
    }
    with open(SPLIT_FILE, "a") as f:
        f.write(json.dumps(line) + "\n")


def _signal_handler_ns() -> int:
    """The native sampler's signal handler time so far (0 where it does not run).

    Measured inside the handler, from its stack walk to its publication: the kernel's
    delivery of the signal is not in it.
    """
    from otlp_middleware.profiling._engine import ENGINE

    native = ENGINE._native_module
    return int(native.stats()["handler_ns"]) if native is not None else 0


if SPLIT_FILE is not None:
    # bare_app calls handler_work by its global name: the timed variant replaces it.
    _work = handler_work
    _thread_ns = time.thread_time_ns

    def handler_work(chunks: int = WORK) -> int:
        start = _thread_ns()
        x = _work(chunks)
        _split[1] += _thread_ns() - start
        _split[0] += 1
        return x

    signal.signal(signal.SIGUSR2, split_snapshot)

    def _time_gc(phase: str, info: dict[str, int]) -> None:
        # the garbage collector's time by generation, on the thread it ran on
        if phase == "start":
            _gc_started[0] = time.thread_time()
        else:
            _gc_time[info["generation"]] += time.thread_time() - _gc_started[0]

    gc.callbacks.append(_time_gc)


async def bare_app(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        return
    handler_work()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain")],
        }
    )
    await send({"type": "http.response.body", "body": b"ok"})


def _no_records() -> None:
    """Requests that took samples are handed on as usual, and their samples collected, but
    no record is built from them (nothing to export): the diagnosis of ``BENCH_HANDON=0``.

    The collector still gives each such request its samples, so none wait for it among the
    pending ones (a hand-on dropped instead would leave up to thousands of requests' samples
    there, which itself slows the app's allocations).
    """
    from otlp_middleware.profiling._engine import ENGINE

    release = ENGINE.release_request

    def _ignore(watcher: Any, scope: Any) -> None:
        pass  # the request's samples are in its scope: dropped with it

    def _hand_on(watcher: Any, finish: Any) -> None:
        release(watcher, _ignore)

    ENGINE.release_request = _hand_on  # type: ignore[method-assign]


MODE = os.environ.get("BENCH_MODE", "bare")
# Sampling rate of the profiled variants; other rates separate the per-request cost from the
# per-sample cost (the cost grows linearly with the rate).
HZ = float(os.environ.get("BENCH_HZ", "99"))
if MODE == "bare":
    app: Any = bare_app
elif MODE == "never":
    app = ProfilingMiddleware(
        bare_app, sampler="never", output_dir=os.environ.get("BENCH_DIR", "profiles")
    )
elif MODE in ("always", "always_norecord"):
    app = ProfilingMiddleware(
        bare_app,
        sampler="always",
        cpu=CpuProfilerConfig(sampling_frequency=HZ),
        aggregate=True,
        output_dir=os.environ.get("BENCH_DIR", "profiles"),
    )
    if MODE == "always_norecord":
        _no_records()
elif MODE == "otlp":
    app = ProfilingMiddleware(
        bare_app,
        sampler="always",
        cpu=CpuProfilerConfig(sampling_frequency=HZ),
        endpoint=os.environ["BENCH_ENDPOINT"],
    )
elif MODE == "switch":

    class Switch(SamplingStrategy):
        """Every request or none, flipped by SIGUSR1 (a strategy of one's own, as a team writes)."""

        def __init__(self) -> None:
            self.on = False
            self._counter = DecisionCounter()

        def should_sample(self, request: Any = None) -> bool:
            return self._counter.record(self.on)

        def reset(self) -> None:
            self._counter.reset()

        def stats(self) -> SamplingStats:
            return self._counter.stats()

    switch = Switch()

    def _flip(signum: int, frame: Any) -> None:
        switch.on = not switch.on

    signal.signal(signal.SIGUSR1, _flip)
    app = ProfilingMiddleware(
        bare_app,
        sampler=switch,
        cpu=CpuProfilerConfig(sampling_frequency=HZ),
        aggregate=True,
        output_dir=os.environ.get("BENCH_DIR", "profiles"),
    )
    if os.environ.get("BENCH_HANDON", "1") == "0":
        _no_records()
elif MODE == "pyinstrument":
    # A peer for comparison: pyinstrument's Profiler around every request (its documented
    # ASGI recipe), at our 99 Hz interval, the session dropped (no rendering, no export).
    from pyinstrument import Profiler

    async def pyinstrument_app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await bare_app(scope, receive, send)
            return
        profiler = Profiler(interval=1 / 99, async_mode="enabled")
        profiler.start()
        try:
            await bare_app(scope, receive, send)
        finally:
            profiler.stop()

    app = pyinstrument_app
else:
    raise SystemExit(f"unknown BENCH_MODE={MODE!r}")
