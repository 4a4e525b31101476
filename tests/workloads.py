"""CPU workloads with distinct function names, shared by tests and benchmarks."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable


def spin(seconds: float) -> int:
    """Burn ``seconds`` of this thread's CPU time."""
    end = time.thread_time() + seconds
    x = 0
    while time.thread_time() < end:
        for i in range(200):
            x += i * i
    return x


def hot_function(seconds: float) -> int:
    return spin(seconds)


def cold_function(seconds: float) -> int:
    return spin(seconds)


def sleeper(seconds: float) -> None:
    time.sleep(seconds)


def burst(ns: int = 1_000_000) -> int:
    """About 1 ms of CPU: the 'handler' of the accuracy tests."""
    t = time.thread_time_ns()
    x = 0
    while time.thread_time_ns() - t < ns:
        for i in range(100):
            x += i
    return x


def bursts_with_socket_writes(wall_seconds: float) -> None:
    """1 ms CPU bursts alternating with GIL-releasing socket writes and reads.

    Where a sampler thread would see only the socket calls, a sampler that interrupts the
    burning thread sees the bursts.
    """
    a, b = socket.socketpair()
    b.setblocking(False)
    payload = b"x" * 4096
    try:
        end = time.monotonic() + wall_seconds
        while time.monotonic() < end:
            burst()
            a.sendall(payload)
            try:
                while b.recv(65536):
                    pass
            except BlockingIOError:
                pass
    finally:
        a.close()
        b.close()


def wait_until(
    condition: Callable[[], object], timeout: float, describe: Callable[[], object] = str
) -> None:
    """Poll ``condition`` every 20 ms until it holds; fail after ``timeout`` seconds, with
    ``describe()`` in the message (what the test was waiting on)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, describe()
        time.sleep(0.02)
