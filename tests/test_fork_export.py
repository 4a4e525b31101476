"""Fork safety of the export path: gunicorn --preload with 2 workers exporting OTLP.

The app (and its export queue) is built in the master before the fork; each worker must send
its own profiles (its own process.pid on the resource) and the master must never start an
export thread.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import gunicorn.config
import httpx
import pytest

from otlp_middleware._receiver import Receiver

from .servers import RUNNING, free_port, serve

pytestmark = [pytest.mark.server]

# Recent gunicorn's control socket runs an asyncio thread in the master; without it the
# master is single-threaded, so any extra thread there would be ours.
_NO_CONTROL_SOCKET = [
    flag
    for setting in gunicorn.config.KNOWN_SETTINGS
    for flag in setting.cli or ()
    if flag == "--no-control-socket"
]


def test_gunicorn_preload_workers_each_export_their_profiles(tmp_path: Any) -> None:
    pids_by_batch: list[int] = []
    lock = threading.Lock()

    def on_batch(request: Any) -> None:
        for rp in request.resource_profiles:
            for kv in rp.resource.attributes:
                if kv.key == "process.pid":
                    with lock:
                        pids_by_batch.append(kv.value.int_value)

    receiver = Receiver(host="127.0.0.1", port=0, output_dir=str(tmp_path), on_batch=on_batch)
    receiver.start()
    port = free_port()
    argv = [
        "gunicorn",
        "tests.apps.wsgi_otlp_app:app",
        "--preload",
        "--workers",
        "2",
        "--bind",
        f"127.0.0.1:{port}",
        "--log-level",
        "warning",
        *_NO_CONTROL_SOCKET,
    ]
    worker_pids: set[int] = set()
    master_threads: list[int] = []
    try:
        with serve(argv, port, {"TEST_ENDPOINT": receiver.url}) as base:
            deadline = time.monotonic() + 30
            with httpx.Client(timeout=10) as client:
                # New connections are spread over both workers; keep going until both answered.
                while len(worker_pids) < 2 and time.monotonic() < deadline:
                    r = httpx.get(base + "/", timeout=10, headers={"Connection": "close"})
                    worker_pids.add(int(r.text))
                for _ in range(20):
                    worker_pids.add(int(client.get(base + "/").text))
            master_threads.append(len(os.listdir(f"/proc/{RUNNING[-1]}/task")))
            time.sleep(1.0)  # let both workers' queues flush (schedule_delay=0.2)
    finally:
        receiver.stop()
    assert len(worker_pids) == 2
    assert worker_pids <= set(pids_by_batch), (worker_pids, pids_by_batch)
    assert master_threads == [1], "the master must not run an export thread"
