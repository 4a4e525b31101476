"""The benchmark's instruments measure what they say, on a real server.

``bench/bench_middleware.py --split`` trusts the servers of ``bench/app.py`` to count their
requests and split their CPU clocks at each SIGUSR2 (``BENCH_SPLIT``); here a real uvicorn
server of a profiled variant takes a known number of requests between two snapshots.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import httpx

from bench.bench_middleware import ROOT, parse_mode, read_split
from otlp_middleware.pprof import read_profile

from .servers import RUNNING, free_port, serve, uvicorn_argv


def _wait_for_lines(path: Path, count: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while len(path.read_text().splitlines()) < count:
        assert time.monotonic() < deadline, f"no snapshot {count} in {path}"
        time.sleep(0.05)


def test_the_split_counts_the_requests_and_splits_the_cpu_between_two_snapshots(
    tmp_path: Path,
) -> None:
    split = tmp_path / "split.jsonl"
    split.touch()
    port = free_port()
    env = {
        "BENCH_MODE": "always",
        "BENCH_WORK": "200",  # about 0.3 ms per request
        "BENCH_DIR": str(tmp_path / "profiles"),
        "BENCH_SPLIT": str(split),
    }
    with serve(uvicorn_argv("bench.app:app", port), port, env) as base:
        pid = RUNNING[-1]
        with httpx.Client(base_url=base) as client:
            for _ in range(5):  # before the window: not counted in it
                assert client.get("/").text == "ok"
            os.kill(pid, signal.SIGUSR2)
            _wait_for_lines(split, 1)
            for _ in range(40):
                assert client.get("/").text == "ok"
            os.kill(pid, signal.SIGUSR2)
            _wait_for_lines(split, 2)
    before, after = (json.loads(line) for line in split.read_text().splitlines())
    assert after["requests"] - before["requests"] == 40
    handler, rest, others, collector, signals, _faults = read_split(str(split))
    # 200 chunks of the handler's loop take well over 50 us anywhere; the server's own work
    # per request (h11, the middleware) is CPU on the main thread too; the other threads'
    # share is a difference of two clocks, never negative beyond clock granularity.
    assert handler > 50, handler
    assert rest > 0, rest
    assert others > -50, others
    assert collector >= 0 and len(after["gc_collections"]) == len(after["gc_s"]) == 3
    # the signal handler runs on the main thread, inside the handler's work or the rest
    assert 0 <= signals <= handler + rest, (signals, handler, rest)
    assert after["main_s"] - before["main_s"] >= after["handler_s"] - before["handler_s"]


def test_a_variant_names_its_rate_and_the_checkout_it_runs_from(tmp_path: Path) -> None:
    """``MODE[%HZ][@TREE]``: a change is measured by serving two checkouts side by side."""
    assert parse_mode("always") == ("always", ROOT, {})
    assert parse_mode("always%1") == ("always", ROOT, {"BENCH_HZ": "1"})
    assert parse_mode(f"otlp%297@{tmp_path}") == ("otlp", str(tmp_path), {"BENCH_HZ": "297"})


def test_the_no_record_variant_takes_samples_and_writes_no_profile(tmp_path: Path) -> None:
    """``always_norecord`` samples every request but builds no record from the lean path.

    At 999 Hz most requests of the handler's work take a sample; the same server in
    ``always`` mode writes aggregate pprof files of dozens of them at shutdown. Here only the
    server's first requests can be in a file: the readiness probe and the first request take
    the general path (the sampler does not run yet), which builds records as usual.
    """
    split = tmp_path / "split.jsonl"
    split.touch()
    profiles = tmp_path / "profiles"
    port = free_port()
    env = {
        "BENCH_MODE": "always_norecord",
        "BENCH_HZ": "999",
        "BENCH_DIR": str(profiles),
        "BENCH_SPLIT": str(split),
    }
    with serve(uvicorn_argv("bench.app:app", port), port, env) as base:
        pid = RUNNING[-1]
        with httpx.Client(base_url=base) as client:
            for _ in range(60):
                assert client.get("/").text == "ok"
        os.kill(pid, signal.SIGUSR2)
        _wait_for_lines(split, 1)
    snapshot = json.loads(split.read_text().splitlines()[0])
    assert snapshot["signal_handler_s"] > 0  # samples were taken
    recorded = 0
    for path in profiles.glob("*") if profiles.exists() else ():
        profile = read_profile(path)
        for index in profile.comment:
            key, _, value = profile.string_table[index].partition("=")
            if key == "requests":
                recorded += int(value)
    assert recorded <= 2, recorded
