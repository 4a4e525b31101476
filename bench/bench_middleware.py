"""Middleware overhead under load: throughput ratios against the bare app, in one run.

Starts one uvicorn server (one worker) per variant on loopback, then runs ``wrk`` against
them in alternating rounds so machine noise hits every variant alike, and reports each
variant's median requests/second as a ratio of the bare app's in the same round, and the
server process's CPU per request (all its threads, from /proc): the difference to bare is
what the middleware costs per request under real load, background threads included. Also
measures the microseconds the middleware adds per request in process (a hot loop, which
underestimates the cost in a server whose own work keeps the caches cold).

    python bench/bench_middleware.py [--rounds 7] [--duration 3] [--warmup 3]
        [--variants bare,never,always]

A variant may also set the sampling rate and run from another checkout, to measure a change
by itself: ``--rounds 0 --side-by-side 12 --split --variants before=always@../old,always``
(see ``parse_mode``); ``always%1`` against ``always`` separates the samples' cost.

Each round starts fresh servers (see ``main``); ``bare-again``, a second bare app, shows how
far two identical variants' ratio strays from 1 on this machine. Then ``--side-by-side N``
serves each variant at the same time as a fresh bare app on the one server CPU (see
``side_by_side_rounds``): the measure to judge by on a shared machine, where consecutive
rounds of one and the same app differ by several percent. Every ratio comes with a bootstrap
95% confidence interval of its median.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pinning() -> tuple[list[str], list[str]]:
    """``taskset`` prefixes putting the server and ``wrk`` on CPUs of their own, if possible.

    With two CPUs or more the server gets the last one and ``wrk`` the first, so the load
    generator never takes the server's CPU (nor does the OTLP receiver in this process, pinned
    with ``wrk`` in ``main``); otherwise nothing is pinned.
    """
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2 or shutil.which("taskset") is None:
        return [], []
    return ["taskset", "-c", str(cpus[-1])], ["taskset", "-c", str(cpus[0])]


SERVER_PIN, WRK_PIN = pinning()


def parse_mode(spec: str) -> tuple[str, str, dict[str, str]]:
    """``MODE[%HZ][@TREE]``: bench/app.py's mode, its sampling rate (``BENCH_HZ``), and the
    checkout it runs from (default: this one).

    Another checkout (``git worktree add ../old HEAD~1``, its extension built in place) served
    side by side with this one measures a change itself, with all else alike.
    """
    spec, _, tree = spec.partition("@")
    mode, _, hz = spec.partition("%")
    return mode, os.path.abspath(tree) if tree else ROOT, {"BENCH_HZ": hz} if hz else {}


def start_server(spec: str, env_extra: dict[str, str]) -> tuple[subprocess.Popen[bytes], int]:
    mode, root, own_env = parse_mode(spec)
    port = free_port()
    env = {**os.environ, "BENCH_MODE": mode, "PYTHONPATH": root, **env_extra, **own_env}
    proc = subprocess.Popen(
        [
            *SERVER_PIN,
            sys.executable,
            "-m",
            "uvicorn",
            "bench.app:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--log-level",
            "warning",
            "--no-access-log",
        ],
        cwd=root,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc, port
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit(f"server for {mode} did not start") from None
            time.sleep(0.1)


def stop_servers(servers: Any) -> None:
    for proc, _ in servers:
        proc.terminate()
    for proc, _ in servers:
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU of every thread of process ``pid`` so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main_thread_cpu_seconds(pid: int) -> float:
    """CPU of process ``pid``'s main thread so far, in nanoseconds' precision (schedstat)."""
    with open(f"/proc/{pid}/task/{pid}/schedstat") as f:
        return int(f.read().split()[0]) / 1e9


def wrk_start(port: int, duration: float, connections: int) -> subprocess.Popen[str]:
    """A ``wrk`` run in the background (on the load generator's CPU); ``wrk_result`` reads it."""
    return subprocess.Popen(
        [
            *WRK_PIN,
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{max(1, round(duration))}s",
            f"http://127.0.0.1:{port}/",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )


def wrk_result(proc: subprocess.Popen[str]) -> tuple[float, int]:
    """(requests per second, requests completed) of a ``wrk_start`` run, once it ends."""
    out, _ = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"wrk failed ({proc.returncode}):\n{out}")
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    n = re.search(r"(\d+) requests in", out)
    if not m or not n:
        raise SystemExit(f"cannot parse wrk output:\n{out}")
    return float(m.group(1)), int(n.group(1))


def wrk(port: int, duration: float, connections: int) -> tuple[float, int]:
    """(requests per second, requests completed)."""
    return wrk_result(wrk_start(port, duration, connections))


def measure(
    proc: subprocess.Popen[bytes], port: int, duration: float, connections: int
) -> tuple[float, float, float]:
    """One ``wrk`` round: (requests per second, the server's CPU microseconds per request,
    its main thread's)."""
    cpu, main = process_cpu_seconds(proc.pid), main_thread_cpu_seconds(proc.pid)
    rate, done = wrk(port, duration, connections)
    cpu_us = (process_cpu_seconds(proc.pid) - cpu) / done * 1e6
    return rate, cpu_us, (main_thread_cpu_seconds(proc.pid) - main) / done * 1e6


def request_path_cost(n: int = 20000) -> dict[str, float]:
    """Microseconds per request the middleware adds around a trivial ASGI app, in process."""
    from otlp_middleware.export import ExportResult
    from otlp_middleware.middleware import ProfilingMiddleware

    class Discard:
        def export(self, records: Any) -> ExportResult:
            return ExportResult(True, len(records))

        def shutdown(self, timeout: float = 10) -> None:
            pass

    async def trivial(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def noop_send(message: Any) -> None:
        pass

    async def receive() -> Any:
        return {"type": "http.request"}

    scope = {"type": "http", "method": "GET", "path": "/", "headers": [], "root_path": ""}
    apps = {
        "bare": trivial,
        "never": ProfilingMiddleware(trivial, sampler="never", exporter=Discard()),
        "always": ProfilingMiddleware(trivial, sampler="always", exporter=Discard()),
    }

    async def run(app: Any) -> float:
        for _ in range(500):
            await app(scope, receive, noop_send)
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(n // 5):
                await app(scope, receive, noop_send)
            best = min(best, (time.perf_counter() - t) / (n // 5))
        return best

    async def main() -> dict[str, float]:
        return {name: await run(app) for name, app in apps.items()}

    times = asyncio.run(main())
    for app in apps.values():
        if hasattr(app, "profiler"):
            app.profiler.shutdown(5)
    return {name: (t - times["bare"]) * 1e6 for name, t in times.items() if name != "bare"}


def encoder_cost() -> tuple[float, float]:
    """Encoding cost on the export thread, for a realistic batch."""
    import random

    from otlp_middleware.otlp import encode_profiles
    from otlp_middleware.profiling._frames import FRAMES
    from otlp_middleware.types import CpuSample, ProfileRecord, SpanLink, new_profile_id

    rng = random.Random(1)
    funcs = [
        FRAMES.intern(f"module.func_{i}", f"/app/mod{i % 7}.py", i * 10, i * 10 + 3)
        for i in range(40)
    ]
    records = []
    for r in range(512):
        samples = [
            CpuSample(
                tuple(rng.choice(funcs) for _ in range(30)),
                1,
                "MainThread",
                10_101_010,
                10_101_010,
                time.time_ns(),
            )
            for _ in range(2)
        ]
        records.append(
            ProfileRecord(
                profile_id=new_profile_id(),
                start_time_ns=time.time_ns(),
                duration_ns=5_000_000,
                cpu_samples=samples,
                cpu_period_ns=10_101_010,
                link=SpanLink(rng.randbytes(16), rng.randbytes(8)),
                attributes={"http.route": f"/route/{r % 8}", "http.request.method": "GET"},
            )
        )
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        encode_profiles(records).SerializeToString()
        best = min(best, time.perf_counter() - t)
    return best / (512 * 2) * 1e6, best * 1e3


def same_process_rounds(
    processes: int, rounds: int, duration: float, connections: int, extra: dict[str, str]
) -> tuple[list[float], list[float], list[float]]:
    """(ratios, CPU differences, main-thread CPU differences) of profiling every request
    against none, in one process, the differences in microseconds per request.

    Each server (``BENCH_MODE=switch``) alternates rounds with profiling off (the middleware
    deciding ``never``) and on (every request at BENCH_HZ), flipped by SIGUSR1: a process
    measured against itself, so the 1-2% by which two processes of one program can differ
    drops out. The ratio is on / off within each pair of rounds. The main thread serves the
    requests (the request path, the signal handler); the rest of the difference is the
    background threads (collector, export).

    Read it as a lower bound: what profiling leaves in the process (a grown heap, work the
    background threads finish late) is there in the off rounds too, so the difference can
    come out smaller than against a bare app; the fresh servers' ratios are the measure.
    """
    ratios: list[float] = []
    cpu_diffs: list[float] = []
    main_diffs: list[float] = []
    for _ in range(processes):
        proc, port = start_server("switch", extra)
        on = False
        try:
            wrk(port, 1.0, connections)  # warm up
            for r in range(rounds):
                rate: dict[bool, float] = {}
                cpu_us: dict[bool, float] = {}
                main_us: dict[bool, float] = {}
                for want in (False, True) if r % 2 == 0 else (True, False):
                    if want != on:
                        proc.send_signal(signal.SIGUSR1)
                        on = want
                        time.sleep(0.2)
                        wrk(port, 1.0, connections)  # the new state warm
                    rate[on], cpu_us[on], main_us[on] = measure(proc, port, duration, connections)
                ratios.append(rate[True] / rate[False])
                cpu_diffs.append(cpu_us[True] - cpu_us[False])
                main_diffs.append(main_us[True] - main_us[False])
        finally:
            stop_servers([(proc, port)])
    return ratios, cpu_diffs, main_diffs


SPLIT_PARTS = (
    "handler",
    "rest of main thread",
    "other threads",
    "of these, garbage collection",
    "of the main thread, the signal handler",
)
# Minor page faults per request above which a server's figures are suspect (see read_split).
FAULTS_SUSPECT = 0.2


def read_split(path: str) -> tuple[float, float, float, float, float, float]:
    """Per request between the last two ``BENCH_SPLIT`` snapshots of a server: its handler's
    work, the rest of its main thread, its other threads, the garbage collector's time on
    any of them, the native sampler's signal handler time (in the handler's or the rest's
    figure, wherever the signal landed) (us, see ``bench/app.py``), and its minor page
    faults.

    A warm server takes almost no page faults. One that takes one or more per request has
    most likely fallen into a glibc allocator cycle that is not the profiler's own work: when
    glibc serves asyncio's 256 KiB receive buffer by a fresh mapping (the heap has no free
    block that large, and glibc's mmap threshold is below that size: it rises only when a
    larger mapped block is freed whole), every read maps a buffer, shrinks it to the bytes
    received and unmaps it later, costing tens of microseconds per request. Whether a
    process falls into it depends on where its earlier allocations landed;
    ``strace -e trace=mmap,mremap,munmap`` shows it.
    """
    with open(path) as f:
        before, after = (json.loads(line) for line in f.read().splitlines()[-2:])
    n = after["requests"] - before["requests"]
    if n <= 0:
        raise SystemExit(f"no request between the snapshots in {path}")
    handler = after["handler_s"] - before["handler_s"]
    main = after["main_s"] - before["main_s"]
    process = after["process_s"] - before["process_s"]
    faults = after["minor_faults"] - before["minor_faults"]
    collector = sum(after["gc_s"]) - sum(before["gc_s"])
    # absent from the snapshots of a checkout from before it was measured
    signals = after.get("signal_handler_s", 0.0) - before.get("signal_handler_s", 0.0)
    return (
        handler / n * 1e6,
        (main - handler) / n * 1e6,
        (process - main) / n * 1e6,
        collector / n * 1e6,
        signals / n * 1e6,
        faults / n,
    )


def side_by_side_rounds(
    mode: str,
    base_mode: str,
    rounds: int,
    duration: float,
    warmup: float,
    connections: int,
    extra: dict[str, str],
    split: bool = False,
) -> tuple[list[float], list[tuple[float, ...]]]:
    """Ratios of ``mode``'s throughput to ``base_mode``'s, the two served at the same time,
    and with ``split`` the differences of their CPU per request, part by part.

    Each round starts a fresh server of each, on the one server CPU, and loads both at once,
    each by its own ``wrk``: they split that CPU about evenly (the scheduler's fair share), so
    the ratio of their rates is the inverse ratio of their CPU per request, and the machine's
    noise (another tenant, a slow spell of the VM), which makes consecutive rounds differ by
    several percent, hits both alike and drops out. A bare app against a bare app shows how
    far that holds. Fresh servers every round average out where each process's code and data
    happened to land.

    ``split`` has each server time its handler's work (``BENCH_SPLIT``) and snapshot its CPU
    clocks at the start and near the end of the measured window: the differences per request
    (``SPLIT_PARTS``: ``mode`` minus ``base_mode``) then say where the cost goes. The part
    outside the handler is the finer measure: the handler's own fixed work runs a percent or
    two faster or slower from one process to the next (where its objects landed), the rest
    of the main thread much less so. A round in which either server took ``FAULTS_SUSPECT``
    page faults per request or more is reported on stderr (see ``read_split``).
    """
    ratios: list[float] = []
    splits: list[tuple[float, ...]] = []
    for _ in range(rounds):
        files: dict[str, str] = {}  # "base", "other" -> its BENCH_SPLIT file
        if split:
            for side in ("base", "other"):
                fd, files[side] = tempfile.mkstemp(prefix=f"bench-split-{side}-")
                os.close(fd)
        base = start_server(base_mode, {**extra, "BENCH_SPLIT": files["base"]} if split else extra)
        other = start_server(mode, {**extra, "BENCH_SPLIT": files["other"]} if split else extra)
        try:
            runs = [wrk_start(port, warmup, connections) for _, port in (base, other)]
            for run in runs:
                wrk_result(run)
            runs = [wrk_start(port, duration, connections) for _, port in (base, other)]
            if split:
                # The window: from shortly after both wrk runs start to shortly before they end.
                time.sleep(0.3)
                for proc, _ in (base, other):
                    proc.send_signal(signal.SIGUSR2)
                time.sleep(max(0.5, round(duration) - 0.8))
                for proc, _ in (base, other):
                    proc.send_signal(signal.SIGUSR2)
            (base_rate, _), (rate, _) = (wrk_result(run) for run in runs)
            ratios.append(rate / base_rate)
        finally:
            stop_servers([base, other])
        if split:
            o, b = read_split(files["other"]), read_split(files["base"])
            splits.append(tuple(o[i] - b[i] for i in range(len(SPLIT_PARTS))))
            for name, parts in ((mode, o), (base_mode, b)):
                if parts[-1] >= FAULTS_SUSPECT:
                    print(
                        f"  caution: the {name} server of this round took {parts[-1]:.2f} page "
                        "faults per request (a glibc allocator cycle? see read_split)",
                        file=sys.stderr,
                    )
            for path in files.values():
                os.unlink(path)
    return ratios, splits


def quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, median, q3 = statistics.quantiles(values, n=4)  # the middle cut is the median
    return q1, median, q3


def median_ci(
    values: list[float], level: float = 0.95, resamples: int = 4000
) -> tuple[float, float]:
    """A bootstrap confidence interval of the median of ``values`` (percentile method).

    The rounds' ratios scatter by a percent or two on a shared machine, so a median alone
    cannot say whether 0.99 is met: the interval says how far the median itself may be off.
    Seeded, so one set of rounds always gives one interval.
    """
    if len(values) < 2:
        return values[0], values[0]
    rng = random.Random(0)
    medians = sorted(
        statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples)
    )
    tail = (1 - level) / 2
    return medians[int(tail * resamples)], medians[int((1 - tail) * resamples) - 1]


def summary(values: list[float]) -> str:
    """``median [95% CI of the median; quartiles]`` of the rounds' ratios."""
    lo, hi = median_ci(values)
    q1, median, q3 = quartiles(values)
    return f"{median:.4f} [95% CI {lo:.4f}-{hi:.4f}; quartiles {q1:.4f}-{q3:.4f}]"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--duration", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=3, metavar="SECONDS", help="per fresh server")
    ap.add_argument("--connections", type=int, default=4)
    ap.add_argument(
        "--same-process",
        type=int,
        default=3,
        metavar="N",
        help="then N servers each measured against itself, profiling on vs off (0: skip)",
    )
    ap.add_argument(
        "--side-by-side",
        type=int,
        default=8,
        metavar="N",
        help="then N rounds per variant served at the same time as the baseline (0: skip)",
    )
    ap.add_argument(
        "--split",
        action="store_true",
        help="side by side, also each variant's CPU per request minus its baseline's, split "
        "into the handler, the rest of the main thread and the other threads",
    )
    ap.add_argument("--same-process-rounds", type=int, default=6)
    ap.add_argument("--same-process-duration", type=int, default=2, metavar="SECONDS")
    ap.add_argument(
        "--variants",
        default="bare,bare-again=bare,never,always,otlp",
        help="comma-separated modes of bench/app.py, each optionally LABEL=MODE, a MODE as "
        "MODE[%%HZ][@TREE] (its sampling rate; another checkout to run it from); the first is "
        "the baseline (default: with a second bare app, the noise floor of the ratios)",
    )
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is required (apt-get install wrk)")
    if WRK_PIN:
        # This process runs the OTLP receiver, which stands in for a collector on another
        # machine: it shares the load generator's CPU, never the server's.
        os.sched_setaffinity(0, {int(WRK_PIN[-1])})
    modes = dict(v.split("=", 1) if "=" in v else (v, v) for v in args.variants.split(","))
    variants = list(modes)
    base = variants[0]
    tmp = tempfile.mkdtemp(prefix="bench-profiles-")
    from otlp_middleware._receiver import Receiver

    receiver = Receiver(host="127.0.0.1", port=0, output_dir=None).start()  # decodes, discards
    extra = {"BENCH_DIR": tmp, "BENCH_ENDPOINT": receiver.url}
    results: dict[str, list[float]] = {v: [] for v in variants}
    cpu_per_request: dict[str, list[float]] = {v: [] for v in variants}
    try:
        for r in range(args.rounds):
            # Fresh servers every round: one process of a program can run a percent or two
            # faster or slower than another of the same program (where its code and data
            # happened to land), which no number of rounds against one process averages out.
            servers = {v: start_server(modes[v], extra) for v in variants}
            try:
                for _, port in servers.values():
                    # Warm up past a server's first seconds (imports, first profiles, the
                    # heap growing to its working size), which a long-running one is past.
                    wrk(port, args.warmup, args.connections)
                order = variants if r % 2 == 0 else list(reversed(variants))
                for v in order:
                    proc, port = servers[v]
                    rate, cpu_us, _ = measure(proc, port, args.duration, args.connections)
                    results[v].append(rate)
                    cpu_per_request[v].append(cpu_us)
            finally:
                stop_servers(servers.values())
        if args.rounds:  # 0: only the other measurements
            print(
                f"uvicorn, 1 worker, ~1 ms CPU endpoint; wrk -t1 -c{args.connections} "
                f"-d{args.duration}s; {args.rounds} alternating rounds, fresh servers each round, "
                f"warmed {args.warmup} s"
            )
            print(
                f"(ratio = median over rounds of variant / {base} in the same round, "
                "[95% confidence interval of that median; quartiles of the rounds])"
            )
            print("(CPU = the server process's CPU per request, all threads, median over rounds)")
            base_cpu = statistics.median(cpu_per_request[base])
            for v in variants:
                ratios = [a / b for a, b in zip(results[v], results[base], strict=True)]
                median = statistics.median(results[v])
                cpu = statistics.median(cpu_per_request[v])
                print(
                    f"  {v:>11}: {median:8.1f} req/s   ratio {summary(ratios)}   "
                    f"CPU {cpu:7.1f} us/request ({cpu - base_cpu:+.1f} us)"
                )
            files = [f for f in os.listdir(tmp) if f.endswith(".pb.gz")]
            if "always" in modes.values():
                print(f"  profiles written by 'always': {len(files)} aggregate file(s) in {tmp}")
            if "otlp" in modes.values():
                print(f"  OTLP batches received from 'otlp': {receiver.batches_received}")
        if args.same_process:
            ratios, cpu_diffs, main_diffs = same_process_rounds(
                args.same_process,
                args.same_process_rounds,
                args.same_process_duration,
                args.connections,
                {"BENCH_DIR": tempfile.mkdtemp(prefix="bench-profiles-switch-")},
            )
            print(
                f"Same process, every request profiled vs none ({args.same_process} servers x "
                f"{args.same_process_rounds} pairs of {args.same_process_duration} s rounds): "
                f"ratio {summary(ratios)}, CPU {statistics.median(cpu_diffs):+.1f} us/request "
                f"(main thread {statistics.median(main_diffs):+.1f})"
            )
        if args.side_by_side:
            print(
                f"Side by side: each variant and a fresh {base} served at the same time on one "
                f"CPU, each loaded by its own wrk ({args.side_by_side} rounds of "
                f"{args.duration} s, warmed {args.warmup} s; ratio to {base} "
                "[95% CI of the median; quartiles])"
            )
            for v in variants[1:]:
                ratios, splits = side_by_side_rounds(
                    modes[v],
                    modes[base],
                    args.side_by_side,
                    args.duration,
                    args.warmup,
                    args.connections,
                    extra,
                    split=args.split,
                )
                print(f"  {v:>11}: {summary(ratios)}")
                for i, name in enumerate(SPLIT_PARTS if splits else ()):
                    diffs = [parts[i] for parts in splits]
                    lo, hi = median_ci(diffs)
                    print(
                        f"  {'':>11}  CPU per request, {name}: "
                        f"{statistics.median(diffs):+.1f} us [95% CI {lo:+.1f} to {hi:+.1f}]"
                    )
    finally:
        receiver.stop()
    per_sample, per_batch = encoder_cost()
    print(
        f"OTLP encoder: {per_sample:.1f} us per sample, {per_batch:.1f} ms per batch of 512 "
        "request records (merged, 2 samples each, 30-frame stacks from 40 distinct functions)"
    )
    cost = request_path_cost()
    print(
        "Added per request in process (trivial app, hot caches): "
        + ", ".join(f"{k}: {v:.2f} us" for k, v in cost.items())
    )


if __name__ == "__main__":
    main()
