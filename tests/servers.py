"""Run real servers (uvicorn, gunicorn) as subprocesses on loopback ports for tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


RUNNING: list[int] = []
"""Process ids of the servers started by ``serve`` (the last one is the current server)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def uvicorn_argv(app: str, port: int) -> list[str]:
    """The command line serving ASGI ``app`` ("module:attr") with one uvicorn worker."""
    return [
        "uvicorn",
        app,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--log-level",
        "warning",
    ]


@contextlib.contextmanager
def serve(
    argv: Sequence[str], port: int, env: dict[str, str], ready_path: str = "/", timeout: float = 30
) -> Iterator[str]:
    """Start ``argv`` (which must listen on 127.0.0.1:``port``), yield its base URL.

    On exit the server gets SIGTERM (a graceful shutdown: exporters flush at exit) and its
    output is printed if it failed.
    """
    full_env = {**os.environ, **env, "PYTHONPATH": ROOT}
    proc = subprocess.Popen(
        [sys.executable, "-m", *argv],
        cwd=ROOT,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    RUNNING.append(proc.pid)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"server exited early:\n{proc.stdout.read() if proc.stdout else ''}"
                )
            try:
                httpx.get(base + ready_path, timeout=1.0)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise RuntimeError("server did not become ready") from None
                time.sleep(0.1)
        yield base
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        output = proc.stdout.read() if proc.stdout else ""
        if proc.stdout:
            proc.stdout.close()
        serve.last_output = output  # type: ignore[attr-defined]
