"""The standalone tour of otlp-middleware, no web framework needed.

    python examples/profiling_demo.py [--out DIR]

In about five seconds it shows every building block the middleware is made of:

1. ``CpuProfiler``: start/stop, as a context manager, its stats and the sampling tier in use;
2. ``profile_sync`` and ``profile_async`` (two asyncio tasks on one loop, each profile holding
   only its own task's function);
3. ``MemoryProfiler``: sampled heap allocations of one function;
4. every sampling strategy deciding on a stream of requests, with its stats;
5. ``ProfileBuilder`` + ``AttributeValue`` turning a pprof profile into an OTLP-ready one,
   linked to a span;
6. ``ProfileExporter`` sending it over OTLP/HTTP to the development ``Receiver`` (started
   in-process on a free loopback port), and what arrived: the top functions of a received
   profile.

Files are written only under ``--out`` (default: a fresh temporary folder, printed at the end).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import random
import secrets
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a checkout without installing

from otlp_middleware import (  # noqa: E402
    AdaptiveSampler,
    AlwaysSample,
    AttributeValue,
    CpuProfiler,
    CpuProfilerConfig,
    MemoryProfiler,
    MemoryProfilerConfig,
    NeverSample,
    ParentBasedSampler,
    ProbabilisticSampler,
    ProfileBuilder,
    ProfileExporter,
    ProfileExporterConfig,
    RateSampler,
    RequestInfo,
    RuleSampler,
    SamplingStrategy,
    generate_profile_id,
    profile_async,
    profile_sync,
)
from otlp_middleware._receiver import Receiver  # noqa: E402
from otlp_middleware._view import load_profile, top_functions  # noqa: E402
from otlp_middleware.pprof import Profile, write_profile  # noqa: E402

CPU = CpuProfilerConfig(sampling_frequency=199)


# -- workloads: distinct names, so each shows up clearly in its profile ----------------------


def hash_passwords(seconds_of_work: int) -> str:
    """CPU-bound: ~0.1 s of PBKDF2 per unit on a typical machine."""
    digest = b""
    for _ in range(seconds_of_work):
        digest = hashlib.pbkdf2_hmac("sha256", b"hunter2", digest or b"salt", 400_000)
    return digest.hex()


def sum_of_squares(n: int) -> int:
    """CPU-bound, pure Python bytecode."""
    return sum(i * i for i in range(n))


async def render_invoices(rounds: int) -> int:
    """A coroutine that burns CPU in slices, yielding to the loop between them."""
    total = 0
    for _ in range(rounds):
        total += sum(len(f"invoice {i}") for i in range(20_000))
        await asyncio.sleep(0)
    return total


async def score_recommendations(rounds: int) -> float:
    """Another coroutine on the same loop, doing different work."""
    total = 0.0
    for _ in range(rounds):
        total += sum((i % 7) ** 0.5 for i in range(20_000))
        await asyncio.sleep(0)
    return total


def build_catalogue(items: int) -> list[bytes]:
    """Allocates: ~1 KiB per item."""
    return [bytes(1024) for _ in range(items)]


# -- helpers ---------------------------------------------------------------------------------


def function_names(profile: Profile) -> set[str]:
    return {profile.string_table[f.name] for f in profile.function}


def sample_count(profile: Profile) -> int:
    """Samples in a pprof profile (its first value is the count for our profiles)."""
    return sum(s.value[0] for s in profile.sample)


def top_line(profile: Profile, sample_index: str | None = None) -> str:
    rows = top_functions(profile, sample_index=sample_index)
    return rows[0].function if rows else "(no samples)"


def section(title: str) -> None:
    print(f"\n== {title}")


# -- the tour --------------------------------------------------------------------------------


def cpu_profiler_demo(out: str) -> Profile:
    section("CpuProfiler")
    profiler = CpuProfiler(CPU)
    profiler.start()
    hash_passwords(3)
    profiler.stop()
    stats = profiler.get_stats()
    profile = profiler.generate_profile()
    print(
        f"start/stop: {stats.sample_count} samples over {stats.cpu_time:.2f} CPU-s "
        f"({stats.actual_sampling_rate():.0f}/s at {stats.sampling_frequency:g} Hz), "
        f"tier {stats.method}, top function {top_line(profile)}"
    )
    path = write_profile(profile, os.path.join(out, "cpu-hash_passwords.pb.gz"))
    print(f"wrote {path}  (otlp-middleware top {path})")

    with CpuProfiler(CPU) as ctx:
        sum_of_squares(1_500_000)
    print(
        f"context manager: {ctx.get_stats().sample_count} samples, "
        f"top function {top_line(ctx.generate_profile())}"
    )
    return profile


def profile_helpers_demo() -> None:
    section("profile_sync / profile_async")
    result, profile = profile_sync(sum_of_squares, 1_000_000, config=CPU)
    print(
        f"profile_sync: result {result}, {sample_count(profile)} samples, top {top_line(profile)}"
    )

    async def two_tasks() -> None:
        invoices = asyncio.create_task(profile_async(render_invoices(60), CPU))
        scores = asyncio.create_task(profile_async(score_recommendations(60), CPU))
        (_, p1), (_, p2) = await asyncio.gather(invoices, scores)
        for name, profile, other in (
            ("render_invoices", p1, "score_recommendations"),
            ("score_recommendations", p2, "render_invoices"),
        ):
            names = function_names(profile)
            print(
                f"profile_async task {name}: {sample_count(profile)} samples, "
                f"own function present={name in names}, other task's present={other in names}"
            )

    asyncio.run(two_tasks())


def memory_profiler_demo(out: str) -> None:
    section("MemoryProfiler")
    # A small sampling rate so a short demo gets many samples; production uses ~512 KiB.
    profiler = MemoryProfiler(MemoryProfilerConfig(sampling_rate=16 * 1024))
    with profiler:
        catalogue = build_catalogue(20_000)
    stats = profiler.get_stats()
    profile = profiler.generate_profile()
    estimated, truth = stats.allocated_bytes / 2**20, len(catalogue) * 1024 / 2**20
    print(
        f"backend {stats.backend}: {stats.sample_count} sampled stacks, "
        f"~{estimated:.1f} MiB allocated (truth ~{truth:.1f} MiB), "
        f"top allocator {top_line(profile, 'alloc_space')}"
    )
    path = write_profile(profile, os.path.join(out, "heap-build_catalogue.pb.gz"))
    print(f"wrote {path}  (otlp-middleware top --sample-index alloc_space {path})")


def sampling_demo() -> None:
    section("Sampling strategies (1000 requests each)")
    now = [0.0]

    def clock() -> float:
        return now[0]

    seeded = random.Random(7).random
    strategies: list[tuple[str, SamplingStrategy]] = [
        ("AlwaysSample()", AlwaysSample()),
        ("NeverSample()", NeverSample()),
        ("ProbabilisticSampler(0.1)", ProbabilisticSampler(0.1, random=seeded)),
        ("RateSampler(100)", RateSampler(100)),
        # 1000 requests over 10 s of a fake clock: 100 req/s offered, 5/s wanted.
        ("AdaptiveSampler(5)", AdaptiveSampler(5, 1.0, clock=clock, random=seeded)),
        (
            "RuleSampler(POST /orders/* always, /health* never; default rate:50)",
            RuleSampler({"POST /orders/*": "always", "/health*": "never"}, default="rate:50"),
        ),
        ("ParentBasedSampler(root=never)", ParentBasedSampler(root="never")),
    ]
    for name, strategy in strategies:
        now[0] = 0.0
        for i in range(1000):
            now[0] = i * 0.01
            info = RequestInfo(
                method="POST" if i % 10 == 0 else "GET",
                path=f"/orders/{i}" if i % 10 == 0 else ("/healthz" if i % 10 == 1 else "/"),
                trace_sampled=(i % 4 == 0) if i % 2 == 0 else None,
            )
            strategy.should_sample(info) if strategy.needs_request else strategy.should_sample()
        stats = strategy.stats()
        print(
            f"{name:<72} {stats.sampled:>4}/{stats.decisions} sampled "
            f"(rate {stats.actual_rate:.3f})"
        )


def export_demo(profile: Profile, out: str) -> None:
    section("ProfileBuilder + ProfileExporter -> local Receiver")
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    built = (
        ProfileBuilder(generate_profile_id())
        .attribute("service.name", AttributeValue.string("profiling-demo"))
        .attribute("deployment.environment.name", "demo")  # plain values work too
        .attribute("http.route", "/passwords")
        .attribute("retries", AttributeValue.int(0))
        .attribute("tags", AttributeValue.array(["cpu", "demo"]))
        .link_to_span(trace_id, span_id)
        .build(profile)
    )
    print(f"built profile {built.profile_id.hex()} linked to trace {trace_id} span {span_id}")
    with Receiver(port=0, output_dir=os.path.join(out, "received")) as receiver:
        exporter = ProfileExporter(ProfileExporterConfig(endpoint=receiver.url))
        try:
            result = exporter.export_profile(built)
        finally:
            exporter.shutdown()
        print(
            f"export to {receiver.url}: success={result.success} exported={result.exported} "
            f"rejected={result.rejected}"
        )
        print(
            f"receiver: {receiver.batches_received} batch, {receiver.profiles_received} OTLP "
            f"profiles (one per sample type), {receiver.samples_received} samples"
        )
        for path in receiver.files:
            received = load_profile(path)
            print(f"  {path.name}: top function {top_line(received)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="folder for the pprof files (default: a temporary one)")
    args = parser.parse_args(argv)
    out = args.out or tempfile.mkdtemp(prefix="otlp-middleware-demo-")
    os.makedirs(out, exist_ok=True)

    profile = cpu_profiler_demo(out)
    profile_helpers_demo()
    memory_profiler_demo(out)
    sampling_demo()
    export_demo(profile, out)
    print(f"\nAll files are under {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
