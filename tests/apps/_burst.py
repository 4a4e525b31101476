"""The handler shared by the burst apps of the native tier's accuracy tests.

``handle_burst`` burns ``TEST_BURST_NS`` (default 1 ms) of CPU in ``tests.workloads.burst``,
then by default does a small GIL-releasing socket round trip (the shape where a GIL-bound
sampler thread sees only the socket calls), and returns ``"<handler CPU ns> <tier>"``: the CPU
the handler burned (its thread's CPU clock) and the tier sampling that thread, so a test can
compare the written profiles with the truth.
"""

from __future__ import annotations

import os
import socket
import threading
import time

from otlp_middleware.profiling._engine import ENGINE
from tests import workloads

_local = threading.local()
_PAYLOAD = b"x" * 512
BURST_NS = int(os.environ.get("TEST_BURST_NS", "1000000"))


def socket_round_trip() -> None:
    """Write a small payload to a per-thread socket pair and read it back (releases the GIL)."""
    pair = getattr(_local, "pair", None)
    if pair is None:
        pair = _local.pair = socket.socketpair()
    a, b = pair
    a.sendall(_PAYLOAD)
    received = 0
    while received < len(_PAYLOAD):
        received += len(b.recv(65536))


def handle_burst(round_trip: bool = True) -> str:
    start = time.thread_time_ns()
    workloads.burst(BURST_NS)
    if round_trip:
        socket_round_trip()
    cpu_ns = time.thread_time_ns() - start
    return f"{cpu_ns} {ENGINE.method_for(threading.get_ident())}"
