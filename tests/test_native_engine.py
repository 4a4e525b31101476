"""The native CPU tier through the engine's public paths: real servers, concurrency, stress.

Everything here goes through ``CpuProfiler``, ``profile_async`` and the middleware, never the
raw ``_cpu_native`` API (that is ``test_native_cpu.py``'s job): accuracy of ~1 ms requests on
server worker threads (gunicorn gthread, FastAPI ``def`` endpoints), isolation of eight
threads sampled at 999 Hz, a bounded stress run that must leave no timer behind, blocking
system calls under a 999 Hz timer, and the fallback tiers doing the same work.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from otlp_middleware.pprof import read_profile
from otlp_middleware.profiling import CpuProfiler, CpuProfilerConfig, profile_async
from otlp_middleware.profiling._engine import ENGINE

from . import workloads
from .servers import ROOT, free_port, serve, uvicorn_argv

needs_native = pytest.mark.skipif(
    not ENGINE.native_available, reason="native CPU sampler not built (no compiler?)"
)

# Each request burns 2.5 ms of CPU in ``burst``. The profiled scope also holds ~0.2-0.3 ms of
# server and middleware work (real CPU, correctly sampled), so the truth is ~90% in the burst
# and ">= 80%" tests the sampler, not the framework's overhead: with 1.5 ms bursts the truth
# was ~85% and a correct run of ~160 samples fell below 80% about once in 25 (binomial noise).
BURST_NS = 2_500_000
REQUESTS = 1000  # 1.5 CPU-seconds of handlers: ~150 samples expected at 99 Hz
SERVER_ENV = {"OTLP_MIDDLEWARE_CPU_SAMPLER": "native", "TEST_BURST_NS": str(BURST_NS)}


# ---------------------------------------------------------------- helpers
def written_samples(directory: str) -> Iterator[tuple[str, set[str], list[int]]]:
    """(thread name, function names on the stack, values) of every sample written."""
    for file_name in sorted(os.listdir(directory)):
        if not file_name.endswith(".pb.gz"):
            continue
        profile = read_profile(os.path.join(directory, file_name))
        st = profile.string_table
        funcs = {f.id: st[f.name] for f in profile.function}
        locs = {loc.id: {funcs[ln.function_id] for ln in loc.line} for loc in profile.location}
        for s in profile.sample:
            names: set[str] = set()
            for i in s.location_id:
                names |= locs[i]
            labels = {st[lab.key]: st[lab.str] for lab in s.label if lab.str}
            yield labels.get("thread_name", ""), names, list(s.value)


def burst_figures(samples: list[tuple[str, set[str], list[int]]]) -> tuple[float, int]:
    """(share of CPU weight in ``burst``, sample count)."""
    total = sum(v[1] for _, _, v in samples)
    in_burst = sum(v[1] for _, names, v in samples if "burst" in names)
    return (in_burst / total if total else 0.0), sum(v[0] for _, _, v in samples)


def drive(
    base: str, requests: int, clients: int = 4, path: str = "/burst"
) -> tuple[float, set[str]]:
    """GET ``path`` ``requests`` times from ``clients`` threads; (handler CPU seconds, tiers)."""
    cpu_ns: list[int] = []
    tiers: set[str] = set()

    def client(n: int) -> None:
        with httpx.Client(base_url=base, timeout=30) as c:
            for _ in range(n):
                r = c.get(path)
                assert r.status_code == 200, r.text
                ns, tier = r.text.split()
                cpu_ns.append(int(ns))
                tiers.add(tier)

    share, rest = divmod(requests, clients)
    with ThreadPoolExecutor(clients) as pool:
        for f in [pool.submit(client, share + (i < rest)) for i in range(clients)]:
            f.result()
    return sum(cpu_ns) / 1e9, tiers


def assert_accurate(
    samples: list[tuple[str, set[str], list[int]]], cpu_seconds: float, hz: float = 99.0
) -> None:
    """>= 80% of the CPU weight in the burst, sample count within 30% of hz x CPU seconds."""
    share, count = burst_figures(samples)
    expected = hz * cpu_seconds
    assert share >= 0.8, f"{share:.1%} of CPU weight in burst (count {count})"
    assert abs(count - expected) <= 0.3 * expected, (count, expected, cpu_seconds)


def fastapi_bursts(out: str, path: str) -> tuple[float, list[tuple[str, set[str], list[int]]]]:
    """Serve tests/apps/fastapi_burst_app.py, drive ``path``: (handler CPU s, samples written)."""
    pytest.importorskip("fastapi")
    port = free_port()
    env = {"TEST_OUTPUT_DIR": out, **SERVER_ENV}
    argv = uvicorn_argv("tests.apps.fastapi_burst_app:app", port)
    with serve(argv, port, env, ready_path="/ready") as base:
        cpu_seconds, tiers = drive(base, REQUESTS, path=path)
    assert tiers == {"native"}
    return cpu_seconds, list(written_samples(out))


# ---------------------------------------------------------------- real servers
@pytest.mark.server
@needs_native
def test_gunicorn_gthread_worker_bursts_are_exact(tmp_path: object) -> None:
    """~1.5 ms requests on gunicorn's gthread worker threads, sampled by the native tier.

    Measured on 3.11: 89% of the CPU weight in the burst, 167 samples for 155 expected;
    the rest is gunicorn writing the response and the middleware inside the scope.
    """
    pytest.importorskip("gunicorn")
    out = str(tmp_path)
    port = free_port()
    argv = [
        "gunicorn",
        "tests.apps.gthread_burst_app:app",
        "--bind",
        f"127.0.0.1:{port}",
        "--worker-class",
        "gthread",
        "--threads",
        "2",
        "--workers",
        "1",
        "--log-level",
        "warning",
    ]
    env = {"TEST_OUTPUT_DIR": out, **SERVER_ENV}
    with serve(argv, port, env, ready_path="/ready") as base:
        cpu_seconds, tiers = drive(base, REQUESTS)
    assert tiers == {"native"}
    assert_accurate(list(written_samples(out)), cpu_seconds)


@pytest.mark.server
@needs_native
def test_fastapi_def_endpoint_bursts_are_exact(tmp_path: object) -> None:
    """~1.5 ms `def` endpoint requests in FastAPI's thread pool under uvicorn, native tier.

    The handler's worker threads are held to the accuracy criteria. The request's profile
    also holds, rightly, the event loop's own work for the request (routing, the response,
    the hand-off to the thread pool), taken while the middleware's lean call runs the app:
    measured ~0.33 ms of loop CPU per 1 ms handler, so across all samples the burst held
    ~73% of the weight and the count was ~125% of 99 Hz x handler CPU (1 ms bursts, 3.11).
    Those loop samples are checked for attribution only (see ``assert_inside_requests``).
    """
    cpu_seconds, samples = fastapi_bursts(str(tmp_path), "/burst")
    workers = [s for s in samples if s[0].startswith("AnyIO worker thread")]
    assert_accurate(workers, cpu_seconds)
    loop = [s for s in samples if s[0] == "MainThread"]
    assert len(loop) + len(workers) == len(samples), {s[0] for s in samples}
    assert_inside_requests(loop)


def assert_inside_requests(samples: list[tuple[str, set[str], list[int]]]) -> None:
    """Samples of the event loop attributed to a request were taken inside one.

    Each holds uvicorn's coroutine of a request (``run_asgi``), and nearly all the app's own
    frame: the lean call that runs the app has no frame of its own, and the few without the
    app's frame were taken in its step as the app's coroutine ended (its frame gone, its
    locals being freed: the request's work all the same; 1 in 48 loop samples on 3.13).
    """
    assert samples
    # 3.10 frames carry bare names, later versions qualified names.
    assert all(any(n.endswith("run_asgi") for n in names) for _, names, _ in samples)
    in_app = sum(1 for _, names, _ in samples if names & {"FastAPI.__call__", "__call__"})
    assert in_app >= 0.8 * len(samples), (in_app, len(samples))


@pytest.mark.server
@needs_native
def test_fastapi_async_endpoint_bursts_on_the_loop_are_exact(tmp_path: object) -> None:
    """~2.5 ms `async def` requests, 4 clients, all on uvicorn's event-loop thread.

    Each request is a root scope on the loop thread, whose timer stays armed between
    requests: samples landing between requests (uvicorn's own work) belong to no request and
    are dropped; those inside a request belong to it alone. The burst is therefore sampled
    like any code in a scope: its samples' count and CPU weight match 99 Hz x the handlers'
    measured CPU (within 25%). The rest of each request's samples are, rightly, FastAPI's and
    uvicorn's work inside the request (routing, the response): measured ~20-25% of the
    weight with 2.5 ms bursts on 3.11.
    """
    cpu_seconds, samples = fastapi_bursts(str(tmp_path), "/aburst")
    assert {s[0] for s in samples} == {"MainThread"}
    in_burst = [v for _, names, v in samples if "burst" in names]
    count, weight_s = sum(v[0] for v in in_burst), sum(v[1] for v in in_burst) / 1e9
    expected = 99 * cpu_seconds
    assert abs(count - expected) <= 0.25 * expected, (count, expected)
    assert abs(weight_s - cpu_seconds) <= 0.25 * cpu_seconds, (weight_s, cpu_seconds)
    share, _ = burst_figures(samples)
    assert share >= 0.6, f"{share:.1%} of the requests' CPU weight in the burst"
    assert_inside_requests(samples)


# ---------------------------------------------------------------- concurrency
def _burn_until(deadline: float) -> None:
    while time.monotonic() < deadline:
        workloads.burst(200_000)


def conc_0(deadline: float) -> None:
    _burn_until(deadline)


def conc_1(deadline: float) -> None:
    _burn_until(deadline)


def conc_2(deadline: float) -> None:
    _burn_until(deadline)


def conc_3(deadline: float) -> None:
    _burn_until(deadline)


def conc_4(deadline: float) -> None:
    _burn_until(deadline)


def conc_5(deadline: float) -> None:
    _burn_until(deadline)


def conc_6(deadline: float) -> None:
    _burn_until(deadline)


def conc_7(deadline: float) -> None:
    _burn_until(deadline)


CONCURRENT = [conc_0, conc_1, conc_2, conc_3, conc_4, conc_5, conc_6, conc_7]


def profile_sample_names(profiler: CpuProfiler) -> list[set[str]]:
    """Function names on the stack of each CPU sample of a stopped profiler."""
    profile = profiler.generate_profile()
    st = profile.string_table
    funcs = {f.id: st[f.name] for f in profile.function}
    locs = {loc.id: {funcs[ln.function_id] for ln in loc.line} for loc in profile.location}
    return [set().union(*(locs[i] for i in s.location_id)) for s in profile.sample]


@needs_native
def test_eight_threads_at_999hz_keep_their_own_samples() -> None:
    """Eight threads, each in a distinct function under its own 999 Hz profiler, at once."""
    barrier = threading.Barrier(len(CONCURRENT))
    profilers: dict[str, CpuProfiler] = {}
    errors: list[BaseException] = []

    def run(fn: Callable[[float], None]) -> None:
        try:
            barrier.wait()
            with CpuProfiler(CpuProfilerConfig(sampling_frequency=999, max_duration=None)) as p:
                fn(time.monotonic() + 1.0)
            profilers[fn.__name__] = p
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(fn,)) for fn in CONCURRENT]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    names = {fn.__name__ for fn in CONCURRENT}
    for own, p in profilers.items():
        assert p.get_stats().methods.keys() == {"native"}, (own, p.get_stats())
        stacks = profile_sample_names(p)
        assert any(own in s for s in stacks), f"{own}: no sample in its own function"
        foreign = [sorted(s & names - {own}) for s in stacks if s & names - {own}]
        assert not foreign, f"{own}'s profile holds other threads' functions: {foreign[:3]}"
    assert len(profilers) == len(CONCURRENT)


# ---------------------------------------------------------------- stress
STRESS_SECONDS = 30.0
STRESS_THREADS = 6


def _posix_timers() -> list[str]:
    """The POSIX timers this process holds, from /proc/self/timers (one 'ID:' line each)."""
    with open("/proc/self/timers") as f:
        return [line for line in f if line.startswith("ID:")]


def _churn_scopes(deadline: float, rng: random.Random) -> int:
    """Open and close profilers rapidly (nested, mixed frequencies); returns scopes opened."""
    opened = 0
    while time.monotonic() < deadline:
        config = CpuProfilerConfig(
            sampling_frequency=rng.choice((99, 199, 999)),
            max_duration=None,
            include_system_calls=rng.random() < 0.05,
        )
        with CpuProfiler(config):
            opened += 1
            workloads.burst(rng.randrange(20_000, 600_000))
            if rng.random() < 0.3:
                with CpuProfiler(CpuProfilerConfig(sampling_frequency=999)):
                    opened += 1
                    workloads.burst(rng.randrange(20_000, 300_000))
    return opened


async def _async_task(rng: random.Random) -> None:
    for _ in range(rng.randrange(1, 6)):
        workloads.burst(rng.randrange(20_000, 400_000))
        await asyncio.sleep(0)


def _async_churn(deadline: float) -> int:
    async def main() -> int:
        rng = random.Random(7)
        opened = 0
        config = CpuProfilerConfig(sampling_frequency=999, max_duration=None)
        while time.monotonic() < deadline:
            batch = [profile_async(_async_task(rng), config) for _ in range(rng.randrange(1, 9))]
            await asyncio.gather(*batch)
            opened += len(batch)
        return opened

    return asyncio.run(main())


@pytest.mark.slow
@needs_native
def test_scope_churn_on_many_threads_leaves_nothing_behind() -> None:
    """Threads (short-lived, so idents are reused) and asyncio tasks open and close scopes
    for ``STRESS_SECONDS``: no crash, and afterwards no timer, no scope, no helper thread."""
    deadline = time.monotonic() + STRESS_SECONDS
    errors: list[BaseException] = []
    opened: list[int] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            # Each worker lives ~0.2-1 s, then a new one takes its place.
            opened.append(_churn_scopes(min(deadline, time.monotonic() + rng.uniform(0.2, 1)), rng))
        except BaseException as exc:
            errors.append(exc)

    def supervisor(slot: int) -> None:
        seed = slot * 100_000
        while time.monotonic() < deadline and not errors:
            t = threading.Thread(target=worker, args=(seed,))
            t.start()
            t.join()
            seed += 1

    def async_loop() -> None:
        try:
            opened.append(_async_churn(deadline))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=supervisor, args=(i,)) for i in range(STRESS_THREADS)]
    threads.append(threading.Thread(target=async_loop))
    for t in threads:
        t.start()
    # The main thread churns too (the signal-free native path on the main thread).
    opened.append(_churn_scopes(deadline, random.Random(1)))
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert sum(opened) > 1000
    assert ENGINE.open_scopes == 0
    from otlp_middleware.profiling import _cpu_native

    # Between scopes a thread's timer stays armed (token 0: its samples are dropped) until
    # the idle teardown; the threads that ended took theirs along: only the main thread's
    # may remain, and the kernel lists exactly the timers the module counts.
    # join() returns before an exiting thread's TLS destructors (which delete its timer) run.
    settle = time.monotonic() + 2.0
    while _cpu_native.active_timers() > 1 and time.monotonic() < settle:
        time.sleep(0.01)
    assert _cpu_native.armed_timers() <= 1
    assert _cpu_native.active_timers() <= 1
    assert len(_posix_timers()) == _cpu_native.active_timers()
    # Idle between scopes, the collector thread waits; uninstall() must end it.
    assert "otlp-middleware-collector" in {t.name for t in threading.enumerate()}
    ENGINE.uninstall()
    assert _cpu_native.active_timers() == 0
    assert _posix_timers() == []
    assert not ENGINE.sampler_thread_running
    alive = [t.name for t in threading.enumerate() if t.name.startswith("otlp-middleware")]
    assert alive == []


CRASH_PROBE = """
import sys, threading, time
from otlp_middleware.profiling import CpuProfiler, CpuProfilerConfig

def c_calls_python(deadline):
    small = (3, 1, 2)
    while time.monotonic() < deadline:
        with CpuProfiler(CpuProfilerConfig(sampling_frequency=999, max_duration=None)):
            for _ in range(200):
                tuple(x for x in small)               # C resumes a generator frame
                sorted(small, key=lambda v: -v)       # C calls a Python function

deadline = time.monotonic() + float(sys.argv[1])
threads = [threading.Thread(target=c_calls_python, args=(deadline,)) for _ in range(3)]
for t in threads:
    t.start()
c_calls_python(deadline)
for t in threads:
    t.join()
print("survived")
"""


@needs_native
def test_samples_taken_while_c_calls_python_do_not_crash() -> None:
    """Signals that land while C code enters the interpreter (a generator resumed by
    ``tuple()``, a ``sorted`` key function) must not crash the process.

    Run in a child process: the failure mode is a segfault. On 3.11/3.12 it crashed within
    ~2 s in every run before the handler checked the entry-frame links and guarded its walk
    against faults (gdb: ``walk_stack`` reading ``f->f_code`` of an uninitialised frame
    pointer while the thread was in ``_PyEval_EvalFrameDefault``'s entry code).
    """
    proc = subprocess.run(
        [sys.executable, "-c", CRASH_PROBE, "5"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert proc.stdout.strip() == "survived"


# ---------------------------------------------------------------- system calls
IO_BYTES = 4 * 1024 * 1024
IO_CPU_SECONDS = 0.25  # each I/O thread repeats its round trips until it burned this much


def _socket_transfer(payload: bytes) -> bytes:
    """Send ``payload`` through a blocking socket pair to a reader thread; return what it got."""
    a, b = socket.socketpair()
    received = bytearray()

    def reader() -> None:
        with CpuProfiler(CpuProfilerConfig(sampling_frequency=999, max_duration=None)):
            while chunk := b.recv(4096):
                received.extend(chunk)

    t = threading.Thread(target=reader)
    t.start()
    with a:
        a.sendall(payload)
        a.shutdown(socket.SHUT_WR)
        t.join()
    b.close()
    return bytes(received)


def _pipe_transfer(payload: bytes) -> bytes:
    """Raw os.write/os.read through a pipe (partial writes handled) to a reader thread."""
    r, w = os.pipe()
    received = bytearray()

    def reader() -> None:
        while chunk := os.read(r, 4096):
            received.extend(chunk)

    t = threading.Thread(target=reader)
    t.start()
    view = memoryview(payload)
    while view:
        view = view[os.write(w, view[: 1 << 16]) :]
    os.close(w)
    t.join()
    os.close(r)
    return bytes(received)


def _file_round_trip(path: str, payload: bytes) -> bytes:
    with open(path, "wb") as f:
        for i in range(0, len(payload), 4096):
            f.write(payload[i : i + 4096])
            if i % (1 << 20) == 0:
                f.flush()
        f.flush()
        os.fsync(f.fileno())
    with open(path, "rb", buffering=0) as f:
        chunks = []
        while chunk := f.read(4096):
            chunks.append(chunk)
    return b"".join(chunks)


@needs_native
def test_blocking_io_under_999hz_timers_completes_intact(tmp_path: object) -> None:
    """Blocking socket, pipe and file I/O in several threads, each under a 999 Hz scope:
    the timers' signals land in the middle of system calls (SA_RESTART), which must not fail,
    lose or corrupt a byte."""
    payload = random.Random(3).randbytes(IO_BYTES)
    rounds: dict[str, int] = {}
    counts: dict[str, int] = {}
    errors: list[BaseException] = []

    def run(name: str, job: Callable[[], bytes]) -> None:
        try:
            with CpuProfiler(CpuProfilerConfig(sampling_frequency=999, max_duration=None)) as p:
                cpu0 = time.thread_time()
                n = 0
                while time.thread_time() - cpu0 < IO_CPU_SECONDS:
                    assert job() == payload, f"{name}: data differs in round {n}"
                    n += 1
            rounds[name] = n
            stats = p.get_stats()
            assert stats.methods.keys() == {"native"}, (name, stats)
            counts[name] = stats.sample_count
        except BaseException as exc:
            errors.append(exc)

    jobs: dict[str, Callable[[], bytes]] = {
        "socket": lambda: _socket_transfer(payload),
        "pipe": lambda: _pipe_transfer(payload),
        "file": lambda: _file_round_trip(os.path.join(str(tmp_path), "data"), payload),
    }
    threads = [threading.Thread(target=run, args=item) for item in jobs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert rounds.keys() == jobs.keys() and min(rounds.values()) >= 1, rounds
    # Each thread was interrupted many times while it worked (mostly inside system calls).
    assert min(counts.values()) >= 20, counts


# ---------------------------------------------------------------- tiers and fallbacks
# tier configured -> (tier sampling the main thread, tier sampling a worker thread)
TIER_OF_THREAD = {
    "native": ("native", "native"),
    "signal": ("signal", "thread"),  # SIGPROF reaches the main thread only
    "thread": ("thread", "thread"),
}
EXACT = {"native", "signal"}


@dataclass
class BurstRun:
    """What one profiled run of ``bursts_with_socket_writes`` measured."""

    cpu: float = 0.0  # the thread's CPU seconds across the workload
    method: str = ""
    methods: dict[str, int] = field(default_factory=dict)
    stacks: list[set[str]] = field(default_factory=list)
    share: float = 0.0  # of CPU weight in burst
    count: int = 0


def _bursts_under_profiler(run: BurstRun, until_sampled: bool = False) -> None:
    """One second of bursts; ``until_sampled``: more seconds (10 at most) until a sample.

    The sampler thread (the inexact tier) must win the GIL to take a sample, and on a busy
    machine a second can pass without one (0-93 samples per second measured): it is held to
    sampling somewhere in the workload, not to a rate.
    """
    with CpuProfiler(CpuProfilerConfig(sampling_frequency=99, max_duration=None)) as p:
        cpu0 = time.thread_time()
        workloads.bursts_with_socket_writes(1.0)
        for _ in range(9):
            if not until_sampled or p.samples:
                break
            workloads.bursts_with_socket_writes(1.0)
        run.cpu = time.thread_time() - cpu0
    stats = p.get_stats()
    run.method, run.methods = stats.method, stats.methods
    run.stacks = profile_sample_names(p)
    values = [list(s.value) for s in p.generate_profile().sample]
    run.share, run.count = burst_figures(
        [("", names, v) for names, v in zip(run.stacks, values, strict=True)]
    )


@pytest.mark.parametrize("where", ["main", "worker"])
@pytest.mark.parametrize("tier", [pytest.param("native", marks=needs_native), "signal", "thread"])
def test_each_tier_on_each_thread_reports_itself(tier: str, where: str) -> None:
    """1 ms bursts between socket writes (1 s wall) under a 99 Hz profiler, per tier and thread.

    Measured (3.11, shared 2-core machine, several runs and bench/bench_tiers.py; share of
    CPU weight in ``burst`` and samples per CPU-second, 99 expected):

    ============  ===========================  ===========================
    tier          main thread                  worker thread
    ============  ===========================  ===========================
    native        99-100%, 96-99/s             99-100%, 98-100/s
    signal        98-100%, 96-98/s (SIGPROF)   0%, 3-93/s (sampler thread)
    thread        0%, 5-87/s (sampler thread)  0%, 3-54/s (sampler thread)
    ============  ===========================  ===========================

    The sampler thread must win the GIL to look, so it sees the thread at its socket calls
    and rarely: it is the documented last resort. The exact tiers are held to the accuracy
    criteria; every tier must report itself and keep its samples in the profiled code.
    """
    ENGINE.set_method(tier)
    run = BurstRun()
    expected = TIER_OF_THREAD[tier][where == "worker"]
    inexact = expected not in EXACT
    try:
        if where == "main":
            _bursts_under_profiler(run, inexact)
        else:
            t = threading.Thread(target=_bursts_under_profiler, args=(run, inexact))
            t.start()
            t.join()
    finally:
        ENGINE.set_method("auto")
    assert run.method == expected, run
    assert run.methods.keys() == {expected}, run
    # Every sample is in the workload, except that the SIGPROF tier's Python handler runs at
    # the next bytecode boundary: a tick at the very end may be handled in the profiler's
    # __exit__, just after the workload returned.
    outside = [s for s in run.stacks if "bursts_with_socket_writes" not in s]
    assert run.stacks and len(outside) <= 1, outside
    if expected in EXACT:
        assert run.share >= 0.8, run
        assert abs(run.count - 99 * run.cpu) <= 0.3 * 99 * run.cpu, run


def _first_half(seconds: float) -> None:
    workloads.spin(seconds)


def _second_half(seconds: float) -> None:
    workloads.spin(seconds)


@needs_native
@pytest.mark.skipif(ENGINE.method not in ("auto", "native"), reason="native tier not selected")
def test_request_scope_and_profiler_share_a_root_frame() -> None:
    """A request's lean root scope and a second scope on the same frame both get samples.

    The request path registers its root alone (one token); a second scope on that frame
    (here with off-CPU sampling, which takes the general path) re-registers the frame for
    both. Closing the request's scope first hands the frame back to the other alone.
    """
    from otlp_middleware.profiling import _cpu_native

    period = 1_001_001  # 999 Hz

    async def handler() -> tuple[list[set[str]], list[set[str]]]:
        frame = sys._getframe()
        request = ENGINE.open_root_scope(frame, period, 128, None)
        other = ENGINE.open_frame_scope(frame, period_ns=period, include_system_calls=True)
        try:
            _first_half(0.2)
            ENGINE.close(request)
            _second_half(0.2)
        finally:
            ENGINE.close(request)
            ENGINE.close(other)

        def names(scope: object) -> list[set[str]]:
            from otlp_middleware.profiling._frames import FRAMES

            return [
                {FRAMES.info(f).name.rsplit(".", 1)[-1] for f in s.stack}
                for s in scope.samples  # type: ignore[attr-defined]
                if s.cpu_ns
            ]

        return names(request), names(other)

    request_names, other_names = asyncio.run(handler())
    assert request_names and other_names
    assert all("_second_half" not in n for n in request_names), request_names
    assert sum("_first_half" in n for n in request_names) >= 0.8 * len(request_names)
    assert any("_first_half" in n for n in other_names)
    assert any("_second_half" in n for n in other_names)
    assert ENGINE.open_scopes == 0
    assert _cpu_native.stats()["roots"] == 0


class _Ring:
    """The extension with ``drain`` replaced by given samples (the rest is the real module).

    ``mark`` counts the given samples as published, as the real one counts recorded ones.
    """

    def __init__(self, real: Any, samples: list[object]) -> None:
        self._real = real
        self._samples = samples
        self._given = 0

    def drain(self) -> list[object]:
        out, self._samples = self._samples, []
        return out

    def give(self, samples: list[object]) -> None:
        self._samples = samples
        self._given += len(samples)

    def mark(self) -> int:
        mark: int = self._real.mark()
        return mark + self._given if mark >= 0 else mark

    def __getattr__(self, name: str) -> object:
        return getattr(self._real, name)


@needs_native
@pytest.mark.skipif(ENGINE.method not in ("auto", "native"), reason="native tier not selected")
def test_a_released_request_gets_the_samples_tagged_with_its_watcher() -> None:
    """The ASGI request path ends its lean call's request watcher and hands it on.

    The next drain makes the request's scope and gives it exactly the samples tagged with
    its watcher (the handler tags only while it is open), whatever their time stamps say (a
    step of the wall clock), and none of another request's. Then ``finish`` is called once,
    and nothing is left behind. An engine of its own, on the real extension with ``drain``
    replaced, hands it exactly such samples.
    """
    from otlp_middleware.profiling import _cpu_native
    from otlp_middleware.profiling._engine import Engine

    ring = _Ring(_cpu_native, [])
    engine = Engine(native_module=ring)
    finished: list[list[int]] = []

    def finish(watcher: Any, scope: Any) -> None:
        finished.append([s.cpu_ns for s in scope.samples])

    def request() -> None:
        period = 10_101_010
        # a server's first request starts the sampler and leaves the thread armed
        engine.close(engine.open_root_scope(sys._getframe(), period, 128, None))
        lean = engine.lean_path(period, 128, None)

        async def app(scope: Any, receive: Any, send: Any) -> None:
            time.sleep(0.001)

        watcher = lean(app, {}, None, print, finish, True)
        assert watcher is not None and watcher.open
        with pytest.raises(StopIteration):
            watcher.send(None)
        assert not watcher.open and lean.empty == 1  # no sample of its own was counted
        frames = (("request", __file__, 1, 2),)
        tag = watcher.tag
        ring.give(
            [
                (0, (tag,), 1, 1_000, watcher.opened_ns, frames),
                (0, (tag - 1,), 1, 2_000, watcher.opened_ns, frames),  # another request's
                (0, (tag,), 1, 3_000, watcher.closed_ns, frames),
                (0, (tag,), 1, 4_000, watcher.opened_ns - 10**9, frames),  # the clock stepped
            ]
        )
        engine.release_request(watcher, finish)
        engine.flush_code_scopes()

    try:
        request()
    finally:
        engine.uninstall()
        _cpu_native.disarm_thread()
    assert finished == [[1_000, 3_000, 4_000]]
    assert [len(v) for v in engine._pending.values()] == [1]  # the other request's, waiting
    assert not engine._code_roots and not engine._released and not engine._finished
