"""`make demo`: the whole path on one machine, in about half a minute.

1. starts the local OTLP receiver (`otlp-middleware receive`) on a free loopback port;
2. serves examples/demo_app.py with uvicorn, our middleware exporting OTLP to that receiver;
3. sends concurrent traffic with W3C traceparent headers;
4. stops the server (profiles are flushed on shutdown) and prints what arrived: the top
   functions per route, and a flame graph page to open.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import httpx  # noqa: E402

from otlp_middleware import cli  # noqa: E402
from otlp_middleware._receiver import Receiver  # noqa: E402

OUT = os.path.join(ROOT, "profiles", "demo")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> int:
    os.makedirs(OUT, exist_ok=True)
    for name in os.listdir(OUT):
        if name.endswith(".pb.gz"):
            os.unlink(os.path.join(OUT, name))
    receiver = Receiver(host="127.0.0.1", port=0, output_dir=OUT).start()
    print(f"receiver listening on {receiver.url}, writing pprof files to {OUT}")
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": ROOT,
        "OTEL_EXPORTER_OTLP_PROFILES_ENDPOINT": receiver.url,
        "OTEL_SERVICE_NAME": "otlp-middleware-demo",
    }
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "examples.demo_app:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        cwd=ROOT,
        env=env,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(base + "/login", timeout=2)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or server.poll() is not None:
                    print("the demo server did not start", file=sys.stderr)
                    return 1
                time.sleep(0.2)
        paths = ["/login", "/report", "/compute/22", "/search"] * 40

        def get(path: str) -> int:
            header = f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"
            return httpx.get(base + path, headers={"traceparent": header}, timeout=30).status_code

        started = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(get, paths))
        print(
            f"sent {len(codes)} requests in {time.monotonic() - started:.1f}s "
            f"({codes.count(200)} OK)"
        )
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)
    time.sleep(0.5)
    receiver.stop()
    files = sorted(f for f in os.listdir(OUT) if f.endswith(".pb.gz"))
    print(f"receiver got {receiver.batches_received} batch(es), wrote {len(files)} pprof file(s)\n")
    cpu_files = [os.path.join(OUT, f) for f in files if "cpu" in f]
    if not cpu_files:
        print("no CPU profiles arrived", file=sys.stderr)
        return 1
    print("Top functions per route (CPU time):")
    cli.main(["top", *cpu_files, "--sample-index", "cpu", "--by-label", "http.route", "-n", "4"])
    page = os.path.join(ROOT, "profiles", "demo-flamegraph.html")
    cli.main(["flamegraph", *cpu_files, "--sample-index", "cpu", "-o", page])
    print(f"\nOpen the flame graph: file://{page}")
    print(f"Read a profile with Go's tools: go tool pprof -top {cpu_files[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
