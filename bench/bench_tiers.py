"""Cost and accuracy of each CPU sampling tier (native, signal, thread), in one run.

Throughput of a CPU-bound workload with one open scope at 99 Hz and at 999 Hz, per tier,
relative to no scope, on the main thread and on a worker thread. Variants run in repeated
rounds whose order alternates, so drift on a shared machine hits every variant alike; each
figure is the median over rounds of (variant / bare in the same round). Throughput is work
units per CPU-second of the whole process, so the cost of the tiers' helper threads (the
sampler thread, the native ring's collector) counts too.

Then the accuracy per tier and thread: 1 ms bursts alternating with GIL-releasing socket
writes under a 99 Hz profiler; the share of CPU weight in the burst function (truth ~99%)
and the samples per CPU-second (truth 99).

    python bench/bench_tiers.py [--rounds 11] [--seconds 0.2] [--accuracy-seconds 1.5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import TypeVar

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from otlp_middleware.profiling import CpuProfiler, CpuProfilerConfig
from otlp_middleware.profiling._engine import ENGINE
from otlp_middleware.profiling._frames import FRAMES
from tests import workloads

T = TypeVar("T")

TIERS = ("native", "signal", "thread")
PLACES = ("main", "worker")


def work_units(seconds: float) -> float:
    """Units of fixed work done per process CPU-second over ``seconds`` of process CPU."""
    start = time.process_time()
    units = 0
    while time.process_time() - start < seconds:
        x = 0
        for i in range(2000):
            x += i * i
        units += 1
    return units / (time.process_time() - start)


def on(place: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` on the main thread or on a fresh worker thread; return its result."""
    if place == "main":
        return fn()
    out: list[T] = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join()
    return out[0]


def run_variant(tier: str | None, hz: float, seconds: float) -> float:
    if tier is None:
        return work_units(seconds)
    ENGINE.set_method(tier)
    try:
        with CpuProfiler(CpuProfilerConfig(sampling_frequency=hz, max_duration=None)):
            return work_units(seconds)
    finally:
        ENGINE.set_method("auto")


def accuracy(tier: str, seconds: float) -> tuple[float, float, str]:
    """(share of CPU weight in burst, samples per CPU-second, tiers that sampled)."""
    ENGINE.set_method(tier)
    try:
        with CpuProfiler(CpuProfilerConfig(sampling_frequency=99, max_duration=None)) as p:
            cpu0 = time.thread_time()
            workloads.bursts_with_socket_writes(seconds)
            cpu = time.thread_time() - cpu0
    finally:
        ENGINE.set_method("auto")
    samples = p.samples
    total = sum(s.cpu_ns for s in samples)
    in_burst = sum(
        s.cpu_ns for s in samples if any(FRAMES.info(f).name == "burst" for f in s.stack)
    )
    stats = p.get_stats()
    # stats.methods counts the tiers that took the samples (stats.method is the tier the
    # engine would use now, after the reset to "auto").
    methods = "+".join(sorted(stats.methods)) or "none"
    return (in_burst / total if total else 0.0), stats.sample_count / cpu, methods


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--seconds", type=float, default=0.2)
    ap.add_argument("--accuracy-seconds", type=float, default=1.5)
    args = ap.parse_args()
    tiers = [t for t in TIERS if t != "native" or ENGINE.native_available]
    variants: list[tuple[str, str | None, float]] = [("bare", None, 0.0)]
    variants += [(f"{t} {hz:g} Hz", t, hz) for t in tiers for hz in (99.0, 999.0)]
    results: dict[tuple[str, str], list[float]] = {
        (place, name): [] for place in PLACES for name, _, _ in variants
    }
    on("worker", partial(run_variant, None, 0.0, 0.2))  # warm up
    for r in range(args.rounds):
        order = [(place, v) for place in PLACES for v in variants]
        if r % 2:
            order.reverse()
        for place, (name, tier, hz) in order:
            value = on(place, partial(run_variant, tier, hz, args.seconds))
            results[(place, name)].append(value)
    ENGINE.uninstall()
    print(
        f"Python {sys.version.split()[0]}; CPU-bound workload, {args.rounds} alternating rounds"
        f" of {args.seconds}s process CPU per variant"
    )
    print("ratio = median over rounds of (variant / bare in the same round, same thread)")
    print(f"  {'variant':<16}{'main thread':>14}{'worker thread':>16}")
    for name, _, _ in variants:
        cells = []
        for place in PLACES:
            bare = results[(place, "bare")]
            ratios = [v / b for v, b in zip(results[(place, name)], bare, strict=True)]
            cells.append(statistics.median(ratios))
        print(f"  {name:<16}{cells[0]:>14.4f}{cells[1]:>16.4f}")
    print(
        f"Accuracy: 1 ms bursts between socket writes, 99 Hz, {args.accuracy_seconds}s wall;"
        " % CPU weight in burst / samples per CPU-second (99 expected) / tier that sampled"
    )
    print(f"  {'tier':<10}{'main thread':>28}{'worker thread':>30}")
    for tier in tiers:
        texts = []
        for place in PLACES:
            share, rate, method = on(place, partial(accuracy, tier, args.accuracy_seconds))
            texts.append(f"{share * 100:5.1f}% {rate:6.1f}/s ({method})")
        print(f"  {tier:<10}{texts[0]:>28}{texts[1]:>30}")
    ENGINE.uninstall()


if __name__ == "__main__":
    main()
