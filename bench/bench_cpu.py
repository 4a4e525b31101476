"""CPU profiler overhead and accuracy, measured as ratios within one run.

Throughput of a CPU-bound workload (work units per CPU-second) with one open scope at 99 Hz
and at 999 Hz, relative to no scope, in repeated alternating rounds so drift on a shared
machine hits every variant alike. Then the accuracy figure: share of CPU weight in 1 ms bursts
that alternate with GIL-releasing socket writes, on the main thread.

    python bench/bench_cpu.py [--rounds 21] [--seconds 0.25]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from otlp_middleware.profiling import CpuProfiler, CpuProfilerConfig
from tests import workloads


def work_units(seconds: float) -> float:
    """Units of fixed work done per CPU-second over ``seconds`` of CPU."""
    start = time.thread_time()
    units = 0
    while time.thread_time() - start < seconds:
        x = 0
        for i in range(2000):
            x += i * i
        units += 1
    return units / (time.thread_time() - start)


def run_variant(hz: float | None, seconds: float) -> float:
    if hz is None:
        return work_units(seconds)
    with CpuProfiler(CpuProfilerConfig(sampling_frequency=hz, max_duration=None)):
        return work_units(seconds)


def accuracy(seconds: float) -> tuple[float, float]:
    with CpuProfiler(CpuProfilerConfig(sampling_frequency=99, max_duration=None)) as p:
        cpu0 = time.thread_time()
        workloads.bursts_with_socket_writes(seconds)
        cpu = time.thread_time() - cpu0
    samples = p.samples
    total = sum(s.cpu_ns for s in samples)
    from otlp_middleware.profiling._frames import FRAMES

    in_burst = sum(
        s.cpu_ns for s in samples if any(FRAMES.info(f).name == "burst" for f in s.stack)
    )
    return in_burst / total if total else 0.0, p.get_stats().sample_count / cpu


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--seconds", type=float, default=0.25)
    args = ap.parse_args()
    variants: dict[str, float | None] = {"bare": None, "99 Hz": 99.0, "999 Hz": 999.0}
    results: dict[str, list[float]] = {k: [] for k in variants}
    run_variant(None, 0.2)  # warm up
    for r in range(args.rounds):
        order = list(variants.items())
        if r % 2:
            order.reverse()
        for name, hz in order:
            results[name].append(run_variant(hz, args.seconds))
    print(f"CPU-bound workload, {args.rounds} alternating rounds of {args.seconds}s CPU each")
    print("(ratio = median over rounds of variant / bare in the same round)")
    for name in variants:
        med = statistics.median(results[name])
        ratios = [v / b for v, b in zip(results[name], results["bare"], strict=True)]
        print(
            f"  {name:>7}: {med:10.1f} units/CPU-s   ratio vs bare {statistics.median(ratios):.4f}"
        )
    share, rate = accuracy(2.0)
    print(
        "Accuracy (main thread, 1 ms bursts between socket writes, 99 Hz): "
        f"{share * 100:.1f}% of CPU weight in the burst, {rate:.1f} samples per CPU-second"
    )


if __name__ == "__main__":
    main()
