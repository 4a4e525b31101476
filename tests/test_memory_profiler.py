"""MemoryProfiler and memory scopes: config, lifecycle, accuracy, isolation, stress, fallback."""

from __future__ import annotations

import asyncio
import gc
import os
import subprocess
import sys
import threading
import tracemalloc
from collections.abc import Iterator
from datetime import timedelta

import pytest

from otlp_middleware._frames import FRAMES
from otlp_middleware.errors import ConfigurationError, ProfilerStateError
from otlp_middleware.pprof import Profile, read_profile, write_profile
from otlp_middleware.profiling.memory import (
    MemoryProfiler,
    MemoryProfilerConfig,
    native_available,
    open_memory_scope,
    open_scope_count,
)
from otlp_middleware.types import HeapSample

if native_available():
    from otlp_middleware.profiling import _memalloc

needs_native = pytest.mark.skipif(not native_available(), reason="_memalloc extension not built")

BLOCK = 64 * 1024
MIB = 1024 * 1024


# ---------------------------------------------------------------- workloads (distinct names)
def allocate_200mib() -> int:
    total = 0
    for _ in range(200 * MIB // BLOCK):
        block = bytearray(BLOCK)
        total += len(block)
    return total


def alloc_in_a(n: int, keep: list[bytearray] | None = None) -> None:
    for _ in range(n):
        block = bytearray(BLOCK)
        if keep is not None:
            keep.append(block)


def alloc_in_b(n: int, keep: list[bytearray] | None = None) -> None:
    for _ in range(n):
        block = bytearray(BLOCK)
        if keep is not None:
            keep.append(block)


def small_allocs(n: int) -> int:
    total = 0
    for _ in range(n):
        total += len(bytes(100))
    return total


def big_allocs(n: int) -> int:
    total = 0
    for _ in range(n):
        total += len(bytes(8192))
    return total


def bytes_in(samples: list[HeapSample], name: str, field: str = "alloc_bytes") -> int:
    """Sum of ``field`` over samples holding function ``name`` (or ``f.<locals>.name``)."""

    def matches(frame_id: int) -> bool:
        qualname = FRAMES.info(frame_id).name
        return qualname == name or qualname.endswith("." + name)

    return sum(getattr(s, field) for s in samples if any(matches(f) for f in s.stack))


def profile_value(profile: Profile, type_name: str, function: str) -> int:
    types = [profile.string_table[t.type] for t in profile.sample_type]
    index = types.index(type_name)
    funcs = {f.id: profile.string_table[f.name] for f in profile.function}
    locs = {loc.id: funcs[loc.line[0].function_id] for loc in profile.location}
    return sum(
        s.value[index] for s in profile.sample if function in {locs[i] for i in s.location_id}
    )


def hook_installed() -> bool:
    return native_available() and bool(_memalloc.is_installed())


# ---------------------------------------------------------------- configuration
@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"sampling_rate": 0}, "sampling_rate"),
        ({"sampling_rate": 1.5}, "sampling_rate"),
        ({"sampling_rate": True}, "sampling_rate"),
        ({"min_allocation_size": -1}, "min_allocation_size"),
        ({"max_duration": 0}, "max_duration"),
        ({"max_duration": timedelta(seconds=-1)}, "max_duration"),
        ({"max_duration": float("nan")}, "max_duration"),
        ({"track_deallocations": 1}, "track_deallocations"),
        ({"max_stack_depth": 0}, "max_stack_depth"),
        ({"max_stack_depth": 513}, "max_stack_depth"),
        ({"backend": "jemalloc"}, "backend"),
    ],
)
def test_invalid_config_names_field_and_value(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        MemoryProfilerConfig(**kwargs)  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError)
    assert info.value.field == field
    assert repr(next(iter(kwargs.values()))) in str(info.value)


def test_config_defaults_and_timedelta() -> None:
    c = MemoryProfilerConfig()
    assert (c.sampling_rate, c.min_allocation_size, c.track_deallocations) == (524_288, 0, True)
    assert c.max_stack_depth == 64 and c.max_duration_seconds == 30.0
    assert MemoryProfilerConfig(max_duration=timedelta(seconds=2)).max_duration_seconds == 2.0
    expected = "native" if native_available() else "tracemalloc"
    assert c.resolved_backend == expected
    assert MemoryProfilerConfig(backend="tracemalloc").resolved_backend == "tracemalloc"


# ---------------------------------------------------------------- lifecycle
def test_lifecycle_errors() -> None:
    p = MemoryProfiler()
    with pytest.raises(ProfilerStateError, match="not running"):
        p.stop()
    with pytest.raises(ProfilerStateError, match="never ran"):
        p.generate_profile()
    p.start()
    try:
        with pytest.raises(ProfilerStateError, match="already running"):
            p.start()
        with pytest.raises(ProfilerStateError, match="stop"):
            p.generate_profile()
        assert p.get_stats().running
    finally:
        p.stop()
    assert not p.get_stats().running
    assert isinstance(p.generate_profile(), Profile)
    assert not hook_installed()


@needs_native
def test_profile_has_heap_conventions_and_topped_by_allocator(
    tmp_path: os.PathLike[str], go_pprof: str
) -> None:
    profiler = MemoryProfiler(MemoryProfilerConfig(sampling_rate=524_288))
    with profiler:
        total = allocate_200mib()
    stats = profiler.get_stats()
    assert stats.backend == "native"
    # Unbiased estimate of 200 MiB, within 25%.
    estimate = bytes_in(profiler.samples, "allocate_200mib")
    assert abs(estimate - total) / total < 0.25, (estimate, total)
    assert stats.allocated_bytes >= estimate
    # Every block was freed right away: almost nothing is still in use.
    assert bytes_in(profiler.samples, "allocate_200mib", "inuse_bytes") < 0.05 * total

    profile = profiler.generate_profile()
    strings = profile.string_table
    assert [(strings[t.type], strings[t.unit]) for t in profile.sample_type] == [
        ("alloc_objects", "count"),
        ("alloc_space", "bytes"),
        ("inuse_objects", "count"),
        ("inuse_space", "bytes"),
    ]
    assert (strings[profile.period_type.type], strings[profile.period_type.unit]) == (
        "space",
        "bytes",
    )
    assert profile.period == 524_288

    path = write_profile(profile, os.path.join(tmp_path, "heap.pb.gz"))
    with open(path, "rb") as f:
        assert f.read(2) == b"\x1f\x8b"  # gzip, as pprof readers expect
    assert profile_value(read_profile(path), "alloc_space", "allocate_200mib") == estimate
    out = subprocess.run(
        [go_pprof, "tool", "pprof", "-sample_index=alloc_space", "-top", path],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    rows = out[out.index("flat%") :].splitlines()[1:]
    assert rows and rows[0].split()[-1] == "allocate_200mib", out


@needs_native
def test_inuse_counts_only_blocks_alive_at_stop() -> None:
    keep: list[bytearray] = []
    with MemoryProfiler(MemoryProfilerConfig(sampling_rate=256 * 1024)) as profiler:
        alloc_in_a(1600, keep)  # 100 MiB kept
        alloc_in_b(1600)  # 100 MiB freed at once
    samples = profiler.samples
    del keep
    kept_inuse = bytes_in(samples, "alloc_in_a", "inuse_bytes")
    assert abs(kept_inuse - 100 * MIB) < 0.25 * 100 * MIB
    assert bytes_in(samples, "alloc_in_b", "inuse_bytes") < 5 * MIB
    assert bytes_in(samples, "alloc_in_b") > 70 * MIB


@needs_native
def test_sampling_rate_one_records_every_allocation_and_min_size_filters() -> None:
    config = MemoryProfilerConfig(sampling_rate=1, min_allocation_size=4096)
    with MemoryProfiler(config) as profiler:
        assert small_allocs(500) == 500 * 100
        assert big_allocs(50) == 50 * 8192
    samples = profiler.samples
    assert bytes_in(samples, "small_allocs") == 0  # under min_allocation_size
    big_objects = sum(
        s.alloc_objects
        for s in samples
        if any(FRAMES.info(f).name == "big_allocs" for f in s.stack)
    )
    assert big_objects >= 50  # each bytes(8192) is one allocation, each recorded
    assert bytes_in(samples, "big_allocs") >= 50 * 8192
    assert all(s.alloc_bytes >= 4096 * s.alloc_objects for s in samples)
    profile = profiler.generate_profile()
    comments = {profile.string_table[c] for c in profile.comment}
    assert any(c.startswith("min_allocation_size=4096") for c in comments)


def test_max_duration_stops_recording_by_itself() -> None:
    profiler = MemoryProfiler(MemoryProfilerConfig(sampling_rate=4096, max_duration=0.05))
    profiler.start()
    assert profiler.join(timeout=10)
    assert not hook_installed()
    alloc_in_a(200)  # after max_duration: not recorded
    assert profiler.running  # until stop(): the profile is still to be collected
    profiler.stop()
    assert bytes_in(profiler.samples, "alloc_in_a") == 0
    assert profiler.generate_profile().duration_nanos >= 50_000_000


async def _task_allocating(fn_name: str, barrier: asyncio.Event) -> list[HeapSample]:
    fn = alloc_in_a if fn_name == "a" else alloc_in_b
    async with MemoryProfiler(MemoryProfilerConfig(sampling_rate=64 * 1024)) as profiler:
        for _ in range(20):
            fn(20)
            await asyncio.sleep(0)  # interleave with the other task on the same loop
        await barrier.wait()
    return profiler.samples


# ---------------------------------------------------------------- isolation
@needs_native
def test_asyncio_tasks_on_one_loop_each_get_their_own() -> None:
    async def main() -> tuple[list[HeapSample], list[HeapSample]]:
        barrier = asyncio.Event()
        ta = asyncio.create_task(_task_allocating("a", barrier))
        tb = asyncio.create_task(_task_allocating("b", barrier))
        await asyncio.sleep(0.01)
        barrier.set()
        return await ta, await tb

    a, b = asyncio.run(main())
    assert bytes_in(a, "alloc_in_a") > 0 and bytes_in(a, "alloc_in_b") == 0
    assert bytes_in(b, "alloc_in_b") > 0 and bytes_in(b, "alloc_in_a") == 0


@needs_native
def test_threads_each_get_their_own() -> None:
    start = threading.Barrier(2)
    results: dict[str, list[HeapSample]] = {}

    def worker(name: str) -> None:
        fn = alloc_in_a if name == "a" else alloc_in_b
        with MemoryProfiler(MemoryProfilerConfig(sampling_rate=64 * 1024)) as profiler:
            start.wait()
            for _ in range(20):
                fn(20)
            start.wait()
        results[name] = profiler.samples

    threads = [threading.Thread(target=worker, args=(n,)) for n in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    a, b = results["a"], results["b"]
    assert bytes_in(a, "alloc_in_a") > 0 and bytes_in(a, "alloc_in_b") == 0
    assert bytes_in(b, "alloc_in_b") > 0 and bytes_in(b, "alloc_in_a") == 0
    main_tid = threading.get_ident()
    assert all(s.thread_id != main_tid and s.thread_name for s in a + b)


@needs_native
def test_work_offloaded_to_a_thread_stays_attributed() -> None:
    async def request() -> list[HeapSample]:
        scope = open_memory_scope(MemoryProfilerConfig(sampling_rate=64 * 1024))
        try:
            await asyncio.to_thread(alloc_in_a, 100)
        finally:
            samples, period = scope.close()
        assert period == 64 * 1024
        return samples

    samples = asyncio.run(request())
    assert bytes_in(samples, "alloc_in_a") > 0
    assert {s.thread_id for s in samples} != {threading.get_ident()}


@needs_native
def test_nested_scopes_both_see_the_allocation_at_their_own_rate() -> None:
    outer = open_memory_scope(MemoryProfilerConfig(sampling_rate=512 * 1024))
    try:
        with MemoryProfiler(MemoryProfilerConfig(sampling_rate=32 * 1024)) as inner:
            alloc_in_a(3200)  # 200 MiB
        alloc_in_b(160)  # outer only
    finally:
        outer_samples, period = outer.close()
    assert period == 512 * 1024
    for samples in (inner.samples, outer_samples):
        assert abs(bytes_in(samples, "alloc_in_a") - 200 * MIB) < 0.25 * 200 * MIB
    assert bytes_in(inner.samples, "alloc_in_b") == 0
    assert bytes_in(outer_samples, "alloc_in_b") > 0
    assert not hook_installed()


@needs_native
def test_scope_api_lifecycle_and_hook_removal() -> None:
    assert not hook_installed()
    scope = open_memory_scope(MemoryProfilerConfig(sampling_rate=64 * 1024))
    assert hook_installed() and open_scope_count() == 1 and scope.backend == "native"
    alloc_in_a(50)
    samples, period = scope.close()
    assert scope.close() == (samples, period)  # idempotent
    assert not hook_installed() and open_scope_count() == 0
    assert all(isinstance(s, HeapSample) for s in samples)
    assert bytes_in(samples, "alloc_in_a") > 0


@needs_native
def test_closed_scopes_blocks_leave_the_pointer_table() -> None:
    config = MemoryProfilerConfig(sampling_rate=64 * 1024)
    keep: list[bytearray] = []
    results: list[list[HeapSample]] = []

    def request() -> None:
        scope = open_memory_scope(config)
        alloc_in_a(160, keep)  # 10 MiB, still alive when the scope closes
        results.append(scope.close()[0])

    other = open_memory_scope(config)  # keeps the hook in
    try:
        worker = threading.Thread(target=request)
        worker.start()
        worker.join()
        # Every free probes the table: blocks no open scope reports on are dropped from it.
        assert _memalloc.stats()["tracked"] < 10
    finally:
        other.close()
    assert bytes_in(results[0], "alloc_in_a", "inuse_bytes") > 5 * MIB
    keep.clear()


@needs_native
def test_unhook_leaves_tracemalloc_working() -> None:
    scope = open_memory_scope(MemoryProfilerConfig(sampling_rate=64 * 1024))
    tracemalloc.start()
    try:
        alloc_in_a(50)
        scope.close()  # tracemalloc wraps our hook: it stays as a pure forwarder
        assert not hook_installed()
        assert tracemalloc.get_traced_memory()[0] > 0
    finally:
        tracemalloc.stop()
    assert not hook_installed()
    alloc_in_b(10)


# ---------------------------------------------------------------- stress, fork
@needs_native
def test_stress_threads_alloc_free_while_profilers_start_and_stop() -> None:
    stop = threading.Event()
    errors: list[BaseException] = []

    def churn(i: int) -> None:
        try:
            while not stop.is_set():
                keep = [bytearray(100 + (j * 37 + i) % 20000) for j in range(200)]
                del keep[::2]
                if i % 2:
                    with MemoryProfiler(MemoryProfilerConfig(sampling_rate=8192 * (i + 1))):
                        alloc_in_b(5)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def one_round() -> None:
        stop.clear()
        threads = [threading.Thread(target=churn, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for k in range(30):
            config = MemoryProfilerConfig(sampling_rate=1024 * (1 + k % 4), max_stack_depth=8)
            with MemoryProfiler(config) as p:
                alloc_in_a(10)
            assert p.get_stats().backend == "native"
        stop.set()
        for t in threads:
            t.join()

    one_round()  # warm up caches (frame table, thread-local storage)
    gc.collect()
    blocks = sys.getallocatedblocks()
    one_round()
    gc.collect()
    assert not errors
    assert not hook_installed()
    stats = _memalloc.stats()
    assert stats["pending"] == 0 and stats["tracked"] == 0 and stats["table_capacity"] == 0
    # Memory returns: nothing per sample survives the profilers. The round records thousands
    # of samples, so a per-sample leak would be far above this allowance for interpreter
    # caches (3.13 keeps ~3000 blocks more than 3.11 here).
    assert sys.getallocatedblocks() - blocks < 10_000


@needs_native
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_starts_clean() -> None:
    scope = open_memory_scope(MemoryProfilerConfig(sampling_rate=64 * 1024))
    try:
        pid = os.fork()
        if pid == 0:  # child: the parent's hook and scope are gone, a new scope works
            code = 0
            try:
                if _memalloc.is_installed() or open_scope_count():
                    code = 3
                child = open_memory_scope(MemoryProfilerConfig(sampling_rate=64 * 1024))
                alloc_in_b(50)
                samples, _ = child.close()
                if bytes_in(samples, "alloc_in_b") <= 0 or _memalloc.is_installed():
                    code = 4
                scope.close()  # the parent's scope is inert here
            except BaseException:
                code = 5
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        alloc_in_a(50)
    finally:
        samples, _ = scope.close()
    assert os.waitstatus_to_exitcode(status) == 0
    assert bytes_in(samples, "alloc_in_a") > 0


EXIT_SCRIPT = """
import atexit, threading
closers = []
atexit.register(lambda: print("late close", *(len(c()[0]) for c in closers)))  # runs last
from otlp_middleware.profiling.memory import MemoryProfilerConfig, open_memory_scope
scope = open_memory_scope(MemoryProfilerConfig(sampling_rate=1024))  # left open at exit
closers.append(scope.close)

def churn():
    while True:
        data = [bytearray(2048) for _ in range(50)]

threading.Thread(target=churn, daemon=True).start()
data = [bytearray(4096) for _ in range(1000)]
print("exiting")
"""


@needs_native
def test_interpreter_exits_cleanly_with_a_scope_open_and_threads_allocating() -> None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-c", EXIT_SCRIPT],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": root},
        cwd=root,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:2] == ["exiting", "late close 0"], proc.stdout


# ---------------------------------------------------------------- recording edge cases
def recurse(depth: int) -> int:
    if depth == 0:
        return len(bytearray(BLOCK))
    return recurse(depth - 1)


def raise_and_catch(n: int) -> int:
    caught = 0
    for i in range(n):
        try:
            raise ValueError(f"boom {i}")  # allocates while the exception is being set
        except ValueError as exc:
            caught += len(str(exc)) > 0
            assert sys.exc_info()[1] is exc
    return caught


def generator_allocs(n: int) -> int:
    def gen() -> Iterator[bytearray]:
        for _ in range(n):
            yield bytearray(1024)

    return sum(len(b) for b in gen())


@needs_native
def test_every_allocation_recorded_keeps_exceptions_and_truncates_deep_stacks() -> None:
    config = MemoryProfilerConfig(sampling_rate=1, max_stack_depth=8)
    with MemoryProfiler(config) as profiler:
        assert raise_and_catch(200) == 200
        assert generator_allocs(200) == 200 * 1024
        assert recurse(50) == BLOCK
    samples = profiler.samples
    assert bytes_in(samples, "raise_and_catch") > 0
    assert bytes_in(samples, "gen") >= 200 * 1024
    deep = [s for s in samples if FRAMES.info(s.stack[0]).name == "recurse"]
    assert deep and all(len(s.stack) == 9 for s in deep)
    assert all(FRAMES.info(s.stack[-1]).name == "<truncated>" for s in deep)


# ---------------------------------------------------------------- tracemalloc fallback
FALLBACK_SCRIPT = """
import logging, sys
sys.modules["otlp_middleware.profiling._memalloc"] = None  # as if the build had failed
logging.basicConfig(level=logging.WARNING)
from otlp_middleware.profiling.memory import (
    MemoryProfiler, MemoryProfilerConfig, native_available)
assert not native_available()
assert MemoryProfilerConfig().resolved_backend == "tracemalloc"
try:
    MemoryProfilerConfig(backend="native")
except ValueError:
    pass
else:
    raise SystemExit("backend='native' accepted without the extension")

def alloc_here():
    return [bytearray(65536) for _ in range(160)]

for _ in range(2):
    with MemoryProfiler() as profiler:
        keep = alloc_here()
stats = profiler.get_stats()
print(stats.backend, stats.allocated_bytes)
"""


def test_fallback_used_when_extension_missing_and_warns_once() -> None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root}
    proc = subprocess.run(
        [sys.executable, "-c", FALLBACK_SCRIPT],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=root,
    )
    assert proc.returncode == 0, proc.stderr
    backend, allocated = proc.stdout.split()
    assert backend == "tracemalloc"
    assert abs(int(allocated) - 160 * BLOCK) < 0.25 * 160 * BLOCK
    assert proc.stderr.count("tracemalloc fallback") == 1, proc.stderr


def test_tracemalloc_fallback_same_output() -> None:
    config = MemoryProfilerConfig(backend="tracemalloc", sampling_rate=524_288)
    keep: list[bytearray] = []
    with MemoryProfiler(config) as profiler:
        alloc_in_a(320, keep)  # 20 MiB kept alive
    assert profiler.get_stats().backend == "tracemalloc"
    assert not tracemalloc.is_tracing()
    estimate = bytes_in(profiler.samples, "alloc_in_a")
    assert abs(estimate - 20 * MIB) < 0.25 * 20 * MIB
    profile = profiler.generate_profile()
    assert profile.period == 524_288
    assert profile_value(profile, "inuse_space", "alloc_in_a") == estimate
    del keep
    assert not hook_installed()
