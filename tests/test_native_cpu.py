"""The native CPU sampler (``otlp_middleware.profiling._cpu_native``), against real threads.

Each test drives real CPU-time timers and real signals; what it checks is where the samples
land (which function, which token) and that nothing leaks (timers, handler, roots).
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import threading
import time
import types
import warnings
import zlib
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from types import CoroutineType, FrameType, ModuleType
from typing import Any

import pytest

try:
    from otlp_middleware.profiling import _cpu_native
except ImportError:  # not built: no compiler, not Linux, unsupported Python
    pytest.skip(
        "otlp_middleware.profiling._cpu_native is not built "
        "(run `python setup.py build_ext --inplace` on Linux)",
        allow_module_level=True,
    )

Sample = tuple[int, tuple[int, ...], int, int, int, tuple[tuple[str, str, int, int], ...]]


def _our_proc_timer_ids() -> list[int]:
    """Ids of this process's POSIX timers that deliver the sampler's signal."""
    with open("/proc/self/timers") as f:
        text = f.read()
    ids: list[int] = []
    current = -1
    for line in text.splitlines():
        if line.startswith("ID:"):
            current = int(line.split()[1])
        elif line.startswith("signal:") and line.split()[1].split("/")[0] == str(
            _cpu_native.SIGNAL
        ):
            ids.append(current)
    return ids


def _our_proc_timers() -> int:
    """POSIX timers of this process that deliver the sampler's signal."""
    return len(_our_proc_timer_ids())


def _engine_collector_stopped() -> None:
    """Stop the engine's collector thread, if an earlier test started it.

    While native scopes of earlier tests (the middleware's) are still registered, it drains
    the ring every second, and would take the samples of a test that drains it itself. The
    engine makes a new one with its next native scope.
    """
    from otlp_middleware.profiling._engine import ENGINE

    collector, ENGINE._collector = ENGINE._collector, None
    if collector is not None:
        collector.stop()


@pytest.fixture
def native() -> Iterator[ModuleType]:
    """The module, guaranteed stopped and without timers afterwards."""
    _engine_collector_stopped()
    _cpu_native.stop()
    yield _cpu_native
    _cpu_native.stop()
    assert _cpu_native.active_timers() == 0
    assert _cpu_native.armed_timers() == 0
    assert _our_proc_timers() == 0


def burst(seconds: float) -> int:
    """Burn ``seconds`` of this thread's CPU in pure Python."""
    end = time.thread_time() + seconds
    n = 0
    while time.thread_time() < end:
        n += 1
    return n


def run_in_thread(target: Callable[[], Any]) -> None:
    errors: list[BaseException] = []

    def wrapper() -> None:
        try:
            target()
        except BaseException as exc:  # re-raised in the test's thread
            errors.append(exc)

    t = threading.Thread(target=wrapper)
    t.start()
    t.join()
    if errors:
        raise errors[0]


def leaf_names(samples: list[Sample]) -> Counter[str]:
    return Counter(s[5][0][0] for s in samples)


# --------------------------------------------------------------------------- API contract


def test_arm_before_start_is_an_error(native: ModuleType) -> None:
    with pytest.raises(RuntimeError, match="not started"):
        native.arm_thread(1)


@pytest.mark.parametrize("hz", [0, -5.0, float("nan"), float("inf")])
def test_invalid_frequency(native: ModuleType, hz: float) -> None:
    with pytest.raises(ValueError, match="hz"):
        native.start(hz)
    native.start(99)
    with pytest.raises(ValueError, match="hz"):
        native.set_frequency(hz)


def test_add_root_needs_a_frame(native: ModuleType) -> None:
    with pytest.raises(TypeError, match="frame"):
        native.add_root(object(), 1)
    assert native.remove_root(object()) is False


def test_start_is_idempotent_and_stop_restores_disposition(native: ModuleType) -> None:
    import signal

    before = signal.getsignal(native.SIGNAL)
    native.start(99)
    native.start(199)
    assert native.is_started()
    assert native.drain() == []
    native.stop()
    native.stop()
    assert not native.is_started()
    assert signal.getsignal(native.SIGNAL) == before
    assert native.drain() == []


def test_refuses_a_signal_the_application_handles(native: ModuleType) -> None:
    import signal

    def app_handler(signum: int, frame: object) -> None:
        pass

    previous = signal.signal(native.SIGNAL, app_handler)
    try:
        with pytest.raises(RuntimeError, match="already has a handler"):
            native.start(99)
        assert not native.is_started()
    finally:
        signal.signal(native.SIGNAL, previous)


def test_samples_carry_the_stack_line_and_weight(native: ModuleType) -> None:
    hz = 199
    native.start(hz)
    armed_cpu: list[int] = []

    def work() -> None:
        cpu0 = time.thread_time_ns()
        native.arm_thread(42)
        burst(0.2)
        native.disarm_thread()
        armed_cpu.append(time.thread_time_ns() - cpu0)

    run_in_thread(work)
    samples = native.drain()
    assert samples, native.stats()
    code = burst.__code__
    last_line = max(line for _, _, line in code.co_lines() if line is not None)
    for token, roots, tid, cpu_ns, ts_ns, frames in samples:
        assert token == 42
        assert roots == ()
        assert tid > 0
        assert cpu_ns > 0
        assert abs(ts_ns - time.time_ns()) < 60 * 10**9
        name, filename, first_line, line = frames[0]
        assert name == "burst"
        assert filename == __file__
        assert first_line == code.co_firstlineno
        assert first_line < line <= last_line
        assert frames[1][0].endswith("work")
    # each weight is the CPU time consumed since the previous sample, so they add up to the
    # armed CPU time, less the tail after the last sample (at most 1.5 periods + a tick)
    period_ns = 10**9 // hz
    total = sum(s[3] for s in samples)
    assert armed_cpu[0] - 2 * period_ns - 20_000_000 <= total <= armed_cpu[0] + period_ns
    assert native.stats()["samples"] == len(samples)
    assert native.armed_timers() == 0


def test_full_ring_drops_and_counts(native: ModuleType) -> None:
    native.start(999, capacity=2)
    native.arm_thread(1)
    burst(0.1)
    native.disarm_thread()
    stats = native.stats()
    assert stats["samples"] == 2
    assert stats["dropped"] > 0
    assert len(native.drain()) == 2


def _recurse(n: int) -> int:
    if n == 0:
        return burst(0.1)
    return _recurse(n - 1)


def test_deep_stack_is_truncated(native: ModuleType) -> None:
    native.start(499)
    native.arm_thread(1)
    _recurse(native.MAX_DEPTH + 20)
    native.disarm_thread()
    samples = native.drain()
    # A tick can land while the recursion builds up or unwinds (a shallower stack); those
    # taken in the burst at the bottom are the deep ones.
    deep = [s for s in samples if s[5][0][0] == "burst"]
    assert len(deep) >= len(samples) - 2 and deep, [len(s[5]) for s in samples]
    assert all(len(s[5]) == native.MAX_DEPTH for s in deep)
    assert native.stats()["truncated"] >= len(deep)


# --------------------------------------------------------------------------- accuracy


def test_worker_thread_accuracy(native: ModuleType) -> None:
    """~1 ms CPU bursts between GIL-releasing socket writes, on a worker thread, 99 Hz."""
    hz = 99.0
    native.start(hz)
    a, b = socket.socketpair()
    result: dict[str, float] = {}

    def reader() -> None:
        while b.recv(1 << 16):
            pass

    def worker() -> None:
        payload = b"x" * 4096
        native.arm_thread(1)
        cpu0 = time.thread_time()
        wall0 = time.monotonic()
        while time.thread_time() - cpu0 < 1.5 and time.monotonic() - wall0 < 4.0:
            burst(0.001)
            a.sendall(payload)
        result["cpu"] = time.thread_time() - cpu0
        native.disarm_thread()

    r = threading.Thread(target=reader)
    r.start()
    try:
        run_in_thread(worker)
    finally:
        a.close()
        r.join()
        b.close()
    samples = native.drain()
    expected = hz * result["cpu"]
    in_burst = leaf_names(samples)["burst"] / len(samples)
    cpu_weight = sum(s[3] for s in samples) / 1e9
    print(
        f"python {sys.version_info[:2]}: {len(samples)} samples, expected {expected:.0f}, "
        f"{in_burst:.1%} in burst, weight {cpu_weight:.3f}s of {result['cpu']:.3f}s CPU"
    )
    assert in_burst >= 0.80
    assert abs(len(samples) - expected) <= 0.30 * expected
    assert abs(cpu_weight - result["cpu"]) <= 0.30 * result["cpu"]


_SPINNERS: dict[int, Callable[[float], int]] = {}
for _i in range(8):
    _ns: dict[str, Any] = {"time": time}
    exec(
        f"def spin_{_i}(seconds):\n"
        "    end = time.thread_time() + seconds\n"
        "    n = 0\n"
        "    while time.thread_time() < end:\n"
        "        n += 1\n"
        "    return n\n",
        _ns,
    )
    _SPINNERS[_i] = _ns[f"spin_{_i}"]


def test_eight_threads_keep_their_own_tokens(native: ModuleType) -> None:
    native.start(999)
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            barrier.wait()
            native.arm_thread(100 + i)
            _SPINNERS[i](0.15)
            native.disarm_thread()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    samples = native.drain()
    by_token: dict[int, Counter[str]] = {}
    for token, _roots, _tid, _cpu, _ts, frames in samples:
        names = {f[0] for f in frames}
        spinners = {n for n in names if n.startswith("spin_")}
        if spinners:
            assert spinners == {f"spin_{token - 100}"}, (token, spinners)
        by_token.setdefault(token, Counter()).update(spinners)
    assert sorted(by_token) == [100 + i for i in range(8)]
    for token, counts in by_token.items():
        assert counts[f"spin_{token - 100}"] > 0
    assert native.stats()["dropped"] == 0


def burn_x(until: float) -> None:
    """Burn this thread's CPU until its CPU clock reads ``until`` (seconds)."""
    while time.thread_time() < until:
        pass


def burn_y(until: float) -> None:
    """The same as :func:`burn_x`, under another name."""
    while time.thread_time() < until:
        pass


def test_periodic_work_does_not_alias(native: ModuleType) -> None:
    """burn_x and burn_y alternate, half a sampling period each: both get half the samples.

    The cycle is exactly the 99 Hz period, in the thread's CPU time, on absolute deadlines
    so it never drifts: the worst case for a sampler with a fixed period, whose expiries
    all fall at the same phase of the cycle (every sample in one function, or a split set
    by where the 4 ms kernel tick falls).  With randomised gaps each function must get its
    share; 200 samples put 15 points at about 4 standard deviations.
    """
    hz = 99
    half = 1.0 / hz / 2
    native.start(hz)
    cpu: dict[str, float] = {}

    def worker() -> None:
        native.arm_thread(7)
        t0 = time.thread_time()
        wall_end = time.monotonic() + 10.0
        k = 0
        while time.thread_time() - t0 < 2.0 and time.monotonic() < wall_end:
            burn_x(t0 + (2 * k + 1) * half)
            burn_y(t0 + (2 * k + 2) * half)
            k += 1
        native.disarm_thread()
        cpu["total"] = time.thread_time() - t0

    run_in_thread(worker)
    samples = native.drain()
    counts = leaf_names(samples)
    weights: Counter[str] = Counter()
    for s in samples:
        weights[s[5][0][0]] += s[3]
    n = len(samples)
    total_weight = sum(weights.values())
    print(
        f"python {sys.version_info[:2]}: {n} samples over {cpu['total']:.3f}s CPU, "
        f"burn_x {counts['burn_x'] / n:.1%} burn_y {counts['burn_y'] / n:.1%}, by weight "
        f"burn_x {weights['burn_x'] / total_weight:.1%} "
        f"burn_y {weights['burn_y'] / total_weight:.1%}; {native.stats()}"
    )
    assert n >= 0.7 * hz * cpu["total"], native.stats()
    for name in ("burn_x", "burn_y"):
        assert 0.35 <= counts[name] / n <= 0.65, counts
        assert 0.35 <= weights[name] / total_weight <= 0.65, weights


# --------------------------------------------------------------------------- syscalls


def test_blocking_io_is_not_disturbed(native: ModuleType, tmp_path: Any) -> None:
    """Socket and file I/O under a 999 Hz timer: complete, intact, no EINTR surfacing."""
    native.start(999)
    size = 16 << 20
    data = os.urandom(1 << 20) * 16
    a, b = socket.socketpair()
    received: list[int] = []

    def reader() -> None:
        crc, n = 0, 0
        while True:
            chunk = b.recv(1 << 16)
            if not chunk:
                break
            crc = zlib.crc32(chunk, crc)
            n += len(chunk)
        received.extend([crc, n])

    def io_worker() -> None:
        native.arm_thread(3)
        try:
            a.sendall(data)
            a.shutdown(socket.SHUT_WR)
            path = tmp_path / "blob"
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
            try:
                for _ in range(4):
                    os.lseek(fd, 0, os.SEEK_SET)
                    assert os.write(fd, data) == size
                    os.lseek(fd, 0, os.SEEK_SET)
                    got = bytearray()
                    while len(got) < size:
                        chunk = os.read(fd, size - len(got))
                        assert chunk
                        got += chunk
                    assert got == data
                    burst(0.02)
            finally:
                os.close(fd)
        finally:
            native.disarm_thread()

    r = threading.Thread(target=reader)
    r.start()
    try:
        run_in_thread(io_worker)
    finally:
        a.close()
        r.join()
        b.close()
    assert received == [zlib.crc32(data), size]
    assert native.stats()["signals_received"] > 0


# --------------------------------------------------------------------------- lifecycle


def test_threads_that_exit_do_not_leak_timers(native: ModuleType) -> None:
    """A thread's timer outlives disarm_thread() but not the thread, armed or disarmed."""
    native.start(999)

    def armed_and_gone(disarm: bool) -> None:
        native.arm_thread(9)
        burst(0.005)
        if disarm:
            native.disarm_thread()

    threads = [threading.Thread(target=armed_and_gone, args=(i % 2 == 0,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # join() returns when the Python thread is done; the OS thread runs its key destructors
    # (which delete its timer) just after, so wait for that to happen.
    deadline = time.monotonic() + 5.0
    while native.active_timers() and time.monotonic() < deadline:
        time.sleep(0.001)
    assert native.active_timers() == 0
    assert native.armed_timers() == 0
    assert _our_proc_timers() == 0


def test_arm_twice_only_changes_the_token(native: ModuleType) -> None:
    native.start(499)
    native.arm_thread(1)
    native.arm_thread(2)
    assert native.active_timers() == 1
    assert native.armed_timers() == 1
    burst(0.1)
    native.disarm_thread()
    native.disarm_thread()
    assert native.armed_timers() == 0
    assert native.active_timers() == 1  # kept for the next arm_thread(); stop() deletes it
    assert {s[0] for s in native.drain()} == {2}
    stats = native.stats()
    assert (stats["timers_active"], stats["timers_armed"]) == (1, 0)


def test_token_zero_records_only_samples_under_a_root(native: ModuleType) -> None:
    """Armed with token 0 (a thread kept armed between scopes), only root samples count.

    The handler drops a sample with neither a thread token nor a root on the stack (counted
    as ``skipped_unowned``), so a thread that stays armed between requests costs no ring
    space and no drain work for its unprofiled CPU.
    """
    native.start(999)

    def body() -> None:
        native.arm_thread(0)
        try:
            burst(0.1)  # no scope: dropped in the handler
            frame = sys._getframe()
            native.add_root(frame, 21)
            burst(0.1)  # below the root: recorded with its token
            assert native.remove_root(frame)
            burst(0.1)  # dropped again
        finally:
            native.disarm_thread()

    run_in_thread(body)
    samples = native.drain()
    assert samples, native.stats()
    assert all(s[0] == 0 and s[1] == (21,) for s in samples), {(s[0], s[1]) for s in samples}
    stats = native.stats()
    assert stats["skipped_unowned"] >= len(samples), stats  # about twice as many, ~2x the CPU
    assert stats["samples"] == len(samples)


def test_disarm_keeps_the_timer_but_stops_its_signals(native: ModuleType) -> None:
    """Per-request arm/disarm reuses one timer; a disarmed thread burning CPU gets no signal."""
    native.start(999)
    native.arm_thread(1)
    assert native.armed_timers() == 1
    ids = _our_proc_timer_ids()
    assert len(ids) == 1
    burst(0.05)
    native.disarm_thread()
    assert native.drain()
    signals = native.stats()["signals_received"]
    burst(0.2)  # ~200 deadlines at 999 Hz if the timer were still running
    # at most one stray: a deadline that expired just before the disarm
    assert native.stats()["signals_received"] - signals <= 1
    assert native.drain() == []
    assert _our_proc_timer_ids() == ids
    for token in range(2, 50):
        native.arm_thread(token)
        assert native.armed_timers() == 1
        native.disarm_thread()
        assert native.armed_timers() == 0
    assert _our_proc_timer_ids() == ids  # the same timer, neither deleted nor re-created
    assert native.active_timers() == 1
    native.stop()
    assert native.active_timers() == 0
    assert _our_proc_timers() == 0


def scoped_work(seconds: float) -> int:
    """CPU burnt while armed (in test_short_scopes_are_sampled_in_proportion)."""
    return burst(seconds)


def unscoped_work(seconds: float) -> int:
    """CPU burnt while disarmed (in test_short_scopes_are_sampled_in_proportion)."""
    return burst(seconds)


def test_short_scopes_are_sampled_in_proportion(native: ModuleType) -> None:
    """Thousands of scopes far shorter than the period, with as much CPU between them.

    The countdown and the CPU consumed since the last sample carry over from each disarm to
    the next arm, and the unscoped CPU in between counts for neither: the deadlines and the
    weights match the scoped CPU and no sample lands outside a scope.
    """
    hz = 99
    native.start(hz)
    armed_cpu: list[int] = []

    def worker() -> None:
        total = 0
        wall_end = time.monotonic() + 10.0
        while total < 800_000_000 and time.monotonic() < wall_end:
            t0 = time.thread_time_ns()
            native.arm_thread(5)
            scoped_work(0.0005)
            native.disarm_thread()
            total += time.thread_time_ns() - t0
            unscoped_work(0.0005)
        armed_cpu.append(total)

    run_in_thread(worker)
    samples = native.drain()
    stats = native.stats()
    expected = hz * armed_cpu[0] / 1e9
    weight = sum(s[3] for s in samples)
    print(
        f"python {sys.version_info[:2]}: {len(samples)} samples, expected {expected:.0f}, "
        f"weight {weight / 1e9:.3f}s of {armed_cpu[0] / 1e9:.3f}s armed CPU; {stats}"
    )
    for s in samples:
        names = {f[0] for f in s[5]}
        assert "unscoped_work" not in names, names
    assert sum("scoped_work" in {f[0] for f in s[5]} for s in samples) >= 0.8 * len(samples)
    # A deadline that comes due in a scope fires on a scheduler tick inside a later scope
    # (ticks fall in scoped CPU half the time here), and deadlines passing meanwhile merge
    # into that signal: counted as overruns, their CPU in its weight.
    deadlines = len(samples) + stats["overruns"]
    assert abs(deadlines - expected) <= 0.30 * expected
    assert len(samples) >= 0.4 * expected
    assert abs(weight - armed_cpu[0]) <= 0.30 * armed_cpu[0]
    # signals in the unscoped CPU (as much as the scoped) would be about as many as samples
    assert stats["skipped_not_armed"] <= max(5, len(samples) // 4), stats


@pytest.mark.slow
def test_start_stop_arm_disarm_cycling(native: ModuleType) -> None:
    """Many threads arming, disarming and dying armed while the sampler starts and stops."""
    stop_at = time.monotonic() + 10.0
    errors: list[BaseException] = []
    cycles = Counter[str]()

    def worker(i: int) -> None:
        try:
            while time.monotonic() < stop_at:
                try:
                    native.arm_thread(i)
                except RuntimeError:  # stopped right now
                    cycles["refused"] += 1
                    time.sleep(0.001)
                    continue
                burst(0.002)
                native.disarm_thread()
                cycles["armed"] += 1
        except BaseException as exc:
            errors.append(exc)

    def short_lived() -> None:
        try:
            native.arm_thread(-1)
        except RuntimeError:
            return
        burst(0.001)  # and exits armed

    native.start(999, capacity=256)
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    while time.monotonic() < stop_at:
        native.drain()
        spawned = [threading.Thread(target=short_lived) for _ in range(4)]
        for t in spawned:
            t.start()
        for t in spawned:
            t.join()
        native.set_frequency(499 if cycles["armed"] % 2 else 999)
        native.stop()
        native.start(999, capacity=256)
    for t in threads:
        t.join()
    assert not errors
    assert cycles["armed"] > 100
    native.stop()
    assert native.active_timers() == 0
    assert native.armed_timers() == 0
    assert _our_proc_timers() == 0


# --------------------------------------------------------------------------- asyncio roots


def root_frame(coro: Coroutine[Any, Any, Any]) -> FrameType:
    """The frame an async scope registers as its root: the coroutine's own frame."""
    assert isinstance(coro, CoroutineType)
    frame = coro.cr_frame
    assert frame is not None
    return frame


async def _inner_burn(seconds: float = 0.002) -> None:
    burst(seconds)


def burn_a() -> None:
    burst(0.003)


def burn_b() -> None:
    burst(0.003)


def test_async_roots_on_a_loop_thread(native: ModuleType) -> None:
    """Two tasks alternate 3 ms bursts on one loop thread; samples go to the right root.

    Both tasks must get samples: the sampling gaps are random (see
    test_periodic_work_does_not_alias), so the ~50 samples of each task's 120 ms of CPU
    cannot all fall in the other task's bursts.  The 3 ms bursts also keep the a/b cycle off
    the 4 ms kernel tick on which CPU timers are delivered: tick instants fall at most 2 ms
    apart modulo a 6 ms cycle, inside each 3 ms burst.
    """
    native.start(499)

    async def handler_a() -> None:
        inner = _inner_burn(0.05)
        inner_frame = root_frame(inner)
        native.add_root(inner_frame, 13)  # nested root: both tokens, leaf first
        for _ in range(40):
            burn_a()
            await asyncio.sleep(0)
        await inner
        assert native.remove_root(inner_frame)
        for _ in range(30):
            await _inner_burn()

    async def handler_b() -> None:
        for _ in range(40):
            burn_b()
            await asyncio.sleep(0)

    async def main() -> None:
        coro_a, coro_b = handler_a(), handler_b()
        frame_a, frame_b = root_frame(coro_a), root_frame(coro_b)
        native.add_root(frame_a, 11)
        native.add_root(frame_b, 12)
        try:
            await asyncio.gather(coro_a, coro_b)
        finally:
            assert native.remove_root(frame_a)
            assert native.remove_root(frame_b)

    def loop_thread() -> None:
        native.arm_thread(0)
        try:
            asyncio.run(main())
        finally:
            native.disarm_thread()

    run_in_thread(loop_thread)
    samples = native.drain()
    seen: Counter[str] = Counter()
    for token, roots, _tid, _cpu, _ts, frames in samples:
        assert token == 0
        names = {f[0] for f in frames}
        in_a = any(n.endswith("handler_a") for n in names)
        in_b = any(n.endswith("handler_b") for n in names)
        # a sample carries a root's token exactly when that root's frame is on its stack
        assert (11 in roots) == in_a, (roots, names)
        assert (12 in roots) == in_b, (roots, names)
        assert (13 in roots) == (roots == (13, 11)), roots
        if "burn_a" in names:
            assert roots == (11,)
            seen["a"] += 1
        if "burn_b" in names:
            assert roots == (12,)
            seen["b"] += 1
        if "_inner_burn" in names:
            assert roots in ((11,), (13, 11)), roots
            seen["inner"] += 1
        seen[str(roots)] += 1
    assert seen["a"] > 0 and seen["b"] > 0 and seen["inner"] > 0, seen
    assert seen["(13, 11)"] > 0, seen


# --------------------------------------------------------------------------- fork


def _fork() -> int:
    with warnings.catch_warnings():
        # 3.12+ warns about fork() in a multi-threaded process; this test's threads are gone
        warnings.filterwarnings("ignore", "This process .* is multi-threaded", DeprecationWarning)
        return os.fork()


@pytest.mark.parametrize("explicit_reset", [True, False])
def test_fork_child_can_start_and_stop(native: ModuleType, explicit_reset: bool) -> None:
    native.start(499)
    native.arm_thread(1)
    pid = _fork()
    if pid == 0:  # child: never return into pytest
        code = 1
        try:
            if explicit_reset:
                native._after_fork_child()
                assert not native.is_started()
            assert native.active_timers() == 0
            native.start(499)
            native.arm_thread(5)
            burst(0.1)
            native.disarm_thread()
            samples = native.drain()
            assert samples and {s[0] for s in samples} == {5}
            native.stop()
            assert native.active_timers() == 0
            assert _our_proc_timers() == 0
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert native.active_timers() == 1
    native.disarm_thread()
    native.stop()


# --------------------------------------------------------------------------- fault guard

CRASH_CHILD = """
import ctypes, faulthandler, sys, time
mode = sys.argv[1]
if "faulthandler" in mode:
    faulthandler.enable()
else:
    faulthandler.disable()
from otlp_middleware.profiling import _cpu_native
_cpu_native.start(999)
_cpu_native.arm_thread(1)
end = time.thread_time() + 0.05
while time.thread_time() < end:   # samples are being taken: the guard has been in use
    pass
if "stopped" in mode:
    _cpu_native.disarm_thread()
    _cpu_native.stop()
print("signals", _cpu_native.stats()["signals_received"], flush=True)
ctypes.string_at(0)               # a genuine segfault, outside any stack walk
print("continued", flush=True)
"""


@pytest.mark.parametrize("mode", ["plain", "faulthandler", "faulthandler-stopped"])
def test_fault_guard_does_not_swallow_a_real_crash(mode: str) -> None:
    """The SIGSEGV/SIGBUS guard installed by start() catches faults of the stack walk only:
    a real segfault elsewhere still kills the process with SIGSEGV, and faulthandler (when
    enabled before start()) still reports it - while started, and after stop()."""
    import signal
    import subprocess

    proc = subprocess.run(
        [sys.executable, "-c", CRASH_CHILD, mode],
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == -signal.SIGSEGV, (proc.returncode, proc.stdout, proc.stderr[-2000:])
    assert proc.stdout.startswith("signals ")
    if mode == "plain":
        assert int(proc.stdout.split()[1]) > 0  # the sampler ran before the crash
    assert "continued" not in proc.stdout
    if "faulthandler" in mode:
        assert "Fatal Python error: Segmentation fault" in proc.stderr, proc.stderr[-2000:]
    else:
        assert "Fatal Python error" not in proc.stderr


def test_stats_count_guarded_walks(native: ModuleType) -> None:
    """The fault guard's counters exist and start at zero; a normal run faults nowhere."""
    native.start(999)
    native.arm_thread(1)
    burst(0.05)
    native.disarm_thread()
    stats = native.stats()
    assert stats["signals_received"] > 0
    assert stats["faults"] == 0
    assert stats["walk_rejected"] == 0
    assert {"faults", "walk_fallbacks", "walk_rejected"} <= stats.keys()


# --------------------------------------------------------------------------- request path in C


class _Scope:
    """What ``end_scope`` and ``SendWatcher`` read and write on a scope."""

    def __init__(self, mark: int) -> None:
        self.mark = mark
        self.closed_ns: int | None = None
        self.quiet = False


def _code_scope(mark: int) -> Any:
    """A ``CodeScope`` (the extension's C fields) as ``open_scope`` leaves it, with ``mark``."""
    from otlp_middleware.profiling._scope import CodeScope

    scope = CodeScope.__new__(CodeScope)
    scope.mark = mark
    return scope


# end_scope and the send watcher read a CodeScope's C fields, any other scope's attributes
SCOPE_KINDS = [pytest.param(_Scope, id="attributes"), pytest.param(_code_scope, id="c-fields")]


def test_mark_counts_published_samples_on_an_armed_thread(native: ModuleType) -> None:
    """-1 unless armed; two equal readings mean no sample was published in between."""
    assert native.mark() == -1  # not started
    native.start(999)
    assert native.mark() == -1  # started, this thread not armed
    readings: list[tuple[int, int, int]] = []

    def body() -> None:
        native.arm_thread(7)
        try:
            first = native.mark()
            again = native.mark()  # nothing ran in between
            burst(0.1)  # ~100 samples at 999 Hz
            readings.append((first, again, native.mark()))
        finally:
            native.disarm_thread()

    run_in_thread(body)
    first, again, after = readings[0]
    assert first >= 0 and again == first
    assert after - first == len(native.drain()) > 0


@pytest.mark.parametrize("make_scope", SCOPE_KINDS)
def test_end_scope_sets_the_end_once_and_whether_it_was_quiet(
    native: ModuleType, make_scope: Callable[[int], Any]
) -> None:
    native.start(999)
    ends: list[tuple[int | None, bool, int | None, bool]] = []

    def body() -> None:
        native.arm_thread(7)
        try:
            quiet = make_scope(native.mark())
            native.end_scope(quiet)  # no sample since its mark
            first_end = quiet.closed_ns
            native.end_scope(quiet)  # idempotent: the first end stays
            busy = make_scope(native.mark())
            burst(0.05)
            native.end_scope(busy)
            ends.append((first_end, quiet.quiet, busy.closed_ns, busy.quiet))
            assert quiet.closed_ns == first_end
        finally:
            native.disarm_thread()

    before = time.time_ns()
    run_in_thread(body)
    first_end, was_quiet, busy_end, busy_quiet = ends[0]
    assert first_end is not None and before <= first_end <= time.time_ns()
    assert was_quiet is True
    assert busy_end is not None and busy_quiet is False
    unarmed = make_scope(native.mark())  # -1 here: an unarmed thread is never quiet
    native.end_scope(unarmed)
    assert unarmed.quiet is False
    with pytest.raises(AttributeError):
        native.end_scope(object())


@pytest.mark.parametrize("make_scope", SCOPE_KINDS)
def test_send_watcher_notes_status_and_ends_at_the_last_body(
    native: ModuleType, make_scope: Callable[[int], Any]
) -> None:
    """Messages pass through unchanged; the scope ends at the last body chunk only."""
    sent: list[Any] = []

    async def send(message: Any) -> str:
        sent.append(message)
        return "sent"

    scope = make_scope(-1)
    watcher = native.SendWatcher(send, scope)
    assert watcher.status is None

    async def respond() -> list[Any]:
        results = [await watcher({"type": "http.response.start", "status": 206})]
        results.append(
            await watcher({"type": "http.response.body", "body": b"a", "more_body": True})
        )
        assert scope.closed_ns is None  # a stream: not complete yet
        results.append(await watcher({"type": "http.response.body", "body": b"b"}))
        return results

    assert asyncio.run(respond()) == ["sent"] * 3
    assert watcher.status == 206 and scope.closed_ns is not None
    assert [m.get("body") for m in sent] == [None, b"a", b"b"]


def test_send_watcher_never_raises_its_own_errors(native: ModuleType) -> None:
    """Odd messages and a scope it cannot end pass through; send's own errors propagate."""
    sent: list[Any] = []

    async def send(message: Any) -> None:
        sent.append(message)

    class Mapping(dict):  # type: ignore[type-arg]
        pass

    watcher = native.SendWatcher(send, object())  # end_scope fails on it: swallowed

    async def odd() -> None:
        await watcher(Mapping(type="http.response.start", status=200))
        await watcher({"type": 42})
        await watcher(["not", "a", "mapping"])
        await watcher({"type": "http.response.body", "more_body": "yes"})
        await watcher({"type": "http.response.body"})

    asyncio.run(odd())
    assert len(sent) == 5 and watcher.status == 200

    async def failing(message: Any) -> None:
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        asyncio.run(native.SendWatcher(failing, _Scope(-1))({"type": "http.response.body"}))


def test_a_code_scopes_c_fields_read_and_set_as_attributes(native: ModuleType) -> None:
    """What ``Scope`` keeps as attributes, ``CodeScope`` keeps in C with the same meaning."""
    import gc
    import weakref

    from otlp_middleware.profiling._scope import CodeScope, Scope

    scope = CodeScope.__new__(CodeScope)
    assert isinstance(scope, native.ScopeCore) and isinstance(scope, Scope)
    defaults = ("closed_ns", "deadline_ns", "mark", "quiet", "root_key", "finish")
    assert [getattr(scope, n) for n in defaults] == [getattr(Scope, n) for n in defaults]
    scope.closed_ns, scope.deadline_ns, scope.opened_ns = 5, -(2**62), 2**62
    scope.thread_id, scope.period_ns, scope.max_depth = 2**64 - 1, 10_101_010, 64
    assert (scope.closed_ns, scope.deadline_ns, scope.opened_ns) == (5, -(2**62), 2**62)
    assert (scope.thread_id, scope.period_ns, scope.max_depth) == (2**64 - 1, 10_101_010, 64)
    assert scope.duration_ns == 0  # Scope's methods read them as they read attributes
    scope.closed_ns = None
    assert scope.closed_ns is None
    scope.root_key, scope.quiet, scope.finish = -123, True, print
    assert (scope.root_key, scope.quiet, scope.finish) == (-123, True, print)
    with pytest.raises(TypeError):
        scope.closed_ns = "soon"  # type: ignore[assignment]
    with pytest.raises(TypeError):
        scope.root_key = None  # type: ignore[assignment]
    with pytest.raises(AttributeError):
        del scope.closed_ns
    scope.samples = "its own"  # type: ignore[assignment]  # anything else is an instance attribute, as before
    assert vars(scope) == {"samples": "its own"}
    # a cycle through finish is collected
    ref = weakref.ref(scope)
    scope.finish = lambda s, scope=scope: None
    del scope
    gc.collect()
    assert ref() is None


def test_a_code_scope_makes_its_sample_store_when_it_takes_its_first_sample() -> None:
    """A request's ``CodeScope`` (made without ``__init__``, as ``request_scope`` makes it)
    shares the class's empty placeholders until its first sample; then it has its own."""
    from otlp_middleware.profiling._scope import CodeScope
    from otlp_middleware.types import CpuSample

    scope = CodeScope.__new__(CodeScope)
    other_scope = CodeScope.__new__(CodeScope)
    assert list(scope.samples) == [] and scope.methods == {} and scope.closed_ns is None
    assert "samples" not in vars(scope) and "methods" not in vars(scope)
    sample = CpuSample((1,), 1, "t", 5, 5, time.time_ns())
    scope.take(sample, "native")
    assert list(scope.samples) == [sample] and scope.methods == {"native": 1}
    assert other_scope.samples is not scope.samples and not other_scope.samples
    assert not CodeScope.samples and CodeScope.methods == {}
    store = other_scope.sample_store()
    assert store == (other_scope.samples, other_scope.methods) and store[0] is not scope.samples


def test_the_frame_cache_names_the_code_that_ran_when_addresses_are_reused(
    native: ModuleType,
) -> None:
    """Each sample's function and line are those of the code that ran, not a cached one's.

    The handler caches (function, line) by code address and instruction; code objects made
    and freed in turn come back at the same addresses. Here every round compiles a fresh
    ``gen`` (same name, file and first line as the last one) whose hot loop sits on another
    line, so a cache checked by address alone would report the previous round's line.
    """
    native.start(999)
    addresses: Counter[int] = Counter()
    wrong: list[tuple[int, int, int]] = []
    sampled_rounds = 0
    for i in range(60):
        pad = "\n" * (i % 4)  # blank lines: the same bytecode, the loop on another line
        src = f"def gen(until):\n{pad}    while time.thread_time() < until:\n        pass\n"
        namespace: dict[str, Any] = {"time": time}
        exec(compile(src, "<gen>", "exec"), namespace)
        gen = namespace.pop("gen")
        addresses[id(gen.__code__)] += 1
        # The loop's two lines, or the ``def`` line: a sample taken as ``gen`` is entered
        # (its RESUME instruction) rightly names line 1, the same line in every round, so it
        # cannot hide a stale cache entry (a rare flake in CI before this was allowed).
        hot = {1, 2 + i % 4, 3 + i % 4}
        # Armed only while ``gen`` runs: a sample taken while ``exec`` ran the module body
        # above would rightly name ``<module>`` in ``<gen>`` (a rare flake in CI before).
        native.arm_thread(1)
        try:
            gen(time.thread_time() + 0.02)
        finally:
            native.disarm_thread()
        del gen, namespace
        leaves = [s[5][0] for s in native.drain() if s[5] and s[5][0][1] == "<gen>"]
        sampled_rounds += bool(leaves)
        wrong += [(i, line, first) for name, _, first, line in leaves if line not in hot]
        assert all(name == "gen" for name, _, _, _ in leaves), leaves
    stats = native.stats()
    # every dead code object counted: a cache entry made before is checked in full again
    assert stats["code_deaths_counted"] == 1 and stats["code_deaths"] >= 60, stats
    assert max(addresses.values()) > 1, "no code address was reused: the test proves nothing"
    assert sampled_rounds >= 30, stats
    assert stats["frame_cache_hits"] > 0, stats
    assert 0 < stats["handler_ns"] < 60 * 0.02 * 1e9, stats  # some, and less than all the CPU
    assert not wrong, wrong


def test_non_ascii_names_are_kept_readable(native: ModuleType) -> None:
    """A name's UTF-8 text when CPython has it cached, else its ASCII with '?' for the rest."""
    namespace: dict[str, Any] = {"time": time}
    exec("def fünf_Ω(until):\n    while time.thread_time() < until:\n        pass\n", namespace)
    native.start(999)
    native.arm_thread(1)
    try:
        namespace["fünf_Ω"](time.thread_time() + 0.2)
    finally:
        native.disarm_thread()
    names = {s[5][0][0] for s in native.drain() if s[5] and s[5][0][1] == "<string>"}
    assert names and names <= {"f?nf_?", "fünf_Ω"}, names


class _Pause:
    """Suspends the coroutine awaiting it once (as a pending read would)."""

    def __await__(self) -> Iterator[None]:
        yield


def test_lean_calls_tag_and_count_only_their_own_running_requests(native: ModuleType) -> None:
    """A LeanPath applies only where the lean path does: set_lean on, the sampler running at
    its period, the calling thread armed. While its lean call runs the app's awaitable, the
    thread's samples carry the call's tag and are counted on it; while the app is suspended,
    after it ended, or outside any lean call, none is. A request that took samples goes to
    on_end; a path excluded gets the app's own awaitable."""
    import collections
    import itertools

    from otlp_middleware.profiling import CpuProfilerConfig
    from otlp_middleware.profiling._engine import ENGINE

    period = CpuProfilerConfig().period_ns
    with pytest.raises(ValueError):
        native.LeanPath(0, 64, None)
    with pytest.raises(TypeError):
        native.LeanPath(period, 64, None, prefixes=("/static", 1))
    counting = types.SimpleNamespace(_count=itertools.count())
    path = native.LeanPath(
        period, 64, 10**9, exact={"/livez"}, prefixes=("/health",), sampler=counting
    )
    ended: list[tuple[Any, ...]] = []

    def on_end(*args: Any) -> None:
        ended.append(args)

    async def app(scope: Any, receive: Any, send: Any) -> str:
        burst(0.3)  # its samples
        await _Pause()
        burst(0.2)  # its samples again, after the pause
        return "done"

    native.start(1e9 / period)
    results: dict[str, Any] = {}

    def body() -> None:
        scope = {"type": "http", "path": "/a", "root_path": "/r"}
        native.set_lean(True)
        results["unarmed"] = path(app, scope, None, print, on_end, False)
        native.arm_thread(0)
        try:
            native.set_lean(False)
            results["lean_off"] = path(app, scope, None, print, on_end, False)
            native.set_lean(True)
            results["wrong_period"] = native.LeanPath(period + 1, 64, None)(
                app, scope, None, print, on_end, False
            )
            excluded = path(app, {**scope, "path": "/healthz"}, None, print, on_end, False)
            results["excluded"] = type(excluded).__name__
            excluded.close()
            open_before = native.open_watchers()
            call = path(app, scope, None, print, on_end, False)
            results["open"] = native.open_watchers() - open_before
            assert call.send(None) is None  # runs the app up to its pause
            results["first"] = call.samples
            burst(0.2)  # the app is suspended: not its samples
            results["paused"] = call.samples
            with pytest.raises(StopIteration) as stop:
                call.send(None)
            results["value"] = stop.value.value
            results["ended"] = native.open_watchers() - open_before
            burst(0.2)  # after the end
            results["call"] = call
        finally:
            native.disarm_thread()
            ENGINE._sync_lean()

    run_in_thread(body)
    assert results["unarmed"] is None and results["lean_off"] is None
    assert results["wrong_period"] is None and results["excluded"] == "coroutine"
    assert results["open"] == 1 and results["ended"] == 0 and results["value"] == "done"
    call = results["call"]
    assert results["first"] >= 10 and results["paused"] == results["first"]
    assert call.samples >= results["first"] + 5  # the second burst, once resumed
    assert call.tag < -(1 << 62) and call.root_key == call.tag and not call.open
    assert call.period_ns == period and call.max_depth == 64
    assert call.deadline_ns == call.opened_ns + 10**9 and call.closed_ns >= call.opened_ns
    tagged = [s for s in native.drain() if call.tag in s[1]]
    assert len(tagged) == call.samples
    assert all(s[5][0][0].endswith("burst") and s[5][1][0].endswith("app") for s in tagged)
    assert ended == [(call, {"type": "http", "path": "/a", "root_path": "/r"}, "/r", None)]
    assert (path.always, path.decided, path.excluded, path.empty) == (1, 0, 1, 0)
    assert next(counting._count) == 1  # the one request decided, not the excluded one
    # release_request ends it (idempotent here) and queues it with its finish
    released: collections.deque[Any] = collections.deque()
    native.release_request(released, call, print)
    assert list(released) == [call] and call.finish is print
    with pytest.raises(TypeError):
        native.release_request(released, native.SendWatcher(print, None), print)
