"""Cost of heap profiling on an allocation-heavy loop: bare vs native hook vs tracemalloc.

Runs the same loop (many small objects, some 4 KiB and 64 KiB buffers) in alternating rounds
(bare, native hook at ``--rate`` bytes, tracemalloc fallback), so drifts of a shared machine
hit every mode alike, and prints each mode's median throughput relative to bare (per round,
against the bare round next to it). Goal: native >= 0.98 of bare at 512 KiB.

glibc's heap trimming can dominate such numbers: whether free() gives memory back to the OS
depends on the allocation pattern, so a hook that only shifts that pattern can look faster
than bare. Run it twice, with the default and with trimming out of the way::

    .venv/bin/python bench/bench_memory.py
    MALLOC_TRIM_THRESHOLD_=268435456 .venv/bin/python bench/bench_memory.py
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time

from otlp_middleware.profiling.memory import (
    MemoryProfiler,
    MemoryProfilerConfig,
    MemoryProfilerStats,
    native_available,
)


def workload(n: int) -> int:
    """Allocation-heavy: dicts, lists, tuples, strings, plus 4 KiB and 64 KiB buffers."""
    kept = 0
    for i in range(n):
        name = str(i)
        record = {"id": i, "name": name, "tags": [i, i + 1, i + 2], "pair": (i, -i)}
        text = "x" * (i % 300) + name
        items = [(j, str(j)) for j in range(i % 24)]
        if i % 8 == 0:
            buf = bytearray(4096)
            kept += len(buf)
        if i % 128 == 0:
            big = bytearray(65536)
            kept += len(big)
        kept += len(text) + len(items) + len(record)
    return kept


_last_stats: dict[str, MemoryProfilerStats] = {}


def timed_round(mode: str, n: int, rate: int) -> float:
    """Loop iterations per CPU-second in ``mode`` (profiler start/stop excluded).

    CPU time of this thread, not wall time: on a shared machine other processes preempting
    us would otherwise dominate the differences being measured.
    """
    profiler: MemoryProfiler | None = None
    if mode != "bare":
        backend = "native" if mode == "native" else "tracemalloc"
        profiler = MemoryProfiler(MemoryProfilerConfig(sampling_rate=rate, backend=backend))
        profiler.start()
    try:
        t0 = time.thread_time()
        workload(n)
        return n / (time.thread_time() - t0)
    finally:
        if profiler is not None:
            profiler.stop()
            _last_stats[mode] = profiler.get_stats()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--iterations", type=int, default=100_000)
    parser.add_argument(
        "--tracemalloc-share", type=int, default=25, help="tracemalloc runs 1/N of the iterations"
    )
    parser.add_argument("--rate", type=int, default=512 * 1024)
    parser.add_argument("--no-tracemalloc", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # the fallback's "in use" warning is expected

    modes = ["bare"]
    if native_available():
        modes.append("native")
    if not args.no_tracemalloc:
        modes.append("tracemalloc")

    def run(mode: str) -> float:
        n = args.iterations // args.tracemalloc_share if mode == "tracemalloc" else args.iterations
        return timed_round(mode, n, args.rate)

    for mode in modes:  # warm-up
        run(mode)
    rates: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(args.rounds):
        order = modes[r % len(modes) :] + modes[: r % len(modes)]
        for mode in order:
            rates[mode].append(run(mode))

    trim = os.environ.get("MALLOC_TRIM_THRESHOLD_", "default")
    print(
        f"iterations={args.iterations} rounds={args.rounds} rate={args.rate} "
        f"MALLOC_TRIM_THRESHOLD_={trim}"
    )
    bare = rates["bare"]
    for mode in modes:
        ratios = [t / b for b, t in zip(bare, rates[mode], strict=True)]  # per round
        best = max(rates[mode])
        print(
            f"{mode:12s} best {best / 1e3:8.1f} k iter/s   median throughput / bare "
            f"{statistics.median(ratios):.3f}   (min {min(ratios):.3f}, max {max(ratios):.3f})"
        )
        if mode in _last_stats:
            st = _last_stats[mode]
            print(
                f"{'':12s} last round: {st.allocated_bytes / 2**20:.0f} MiB estimated allocated, "
                f"{st.sample_count} aggregated samples"
            )


if __name__ == "__main__":
    main()
