"""Shared fixtures. The autouse ``leak_check`` fails any test that leaves profiling running.

A test must leave behind no open scope, no armed timer, no sampler or exporter thread and no
allocator hook: those are exactly the leaks a production app would suffer.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterator

import pytest

from otlp_middleware.profiling._engine import ENGINE


def _our_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("otlp-middleware")]


def _memory_hook_installed() -> bool:
    try:
        from otlp_middleware.profiling import _memalloc  # type: ignore[attr-defined]
    except ImportError:
        return False
    return bool(_memalloc.is_installed())


def _environ() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}


@pytest.fixture(autouse=True)
def leak_check() -> Iterator[None]:
    environ_before = _environ()
    yield
    problems = []
    if ENGINE.open_scopes:
        problems.append(f"{ENGINE.open_scopes} profiling scope(s) left open")
    if ENGINE.timer_armed:
        problems.append("the SIGPROF interval timer is still armed")
    # Idle machinery (signal handler, native sampler, its collector thread) may stay between
    # scopes in production; tests remove it so each test starts clean.
    ENGINE.uninstall()
    if ENGINE.native_available:
        from otlp_middleware.profiling import _cpu_native  # type: ignore[attr-defined]

        if _cpu_native.active_timers():
            problems.append(f"{_cpu_native.active_timers()} native CPU timer(s) still armed")
    # Threads finish asynchronously after being told to stop: give them a moment.
    deadline = time.monotonic() + 2.0
    while _our_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    if _our_threads():
        problems.append(f"threads left running: {[t.name for t in _our_threads()]}")
    if _memory_hook_installed():
        problems.append("the allocator hook is still installed")
    if _environ() != environ_before:
        changed = set(_environ().items()) ^ set(environ_before.items())
        problems.append(f"environment changed: {sorted(changed)}")
    if problems:
        pytest.fail("leak check: " + "; ".join(problems))


@pytest.fixture
def go_pprof() -> str:
    """Path of the ``go`` binary for ``go tool pprof``; skips where Go is absent."""
    go = shutil.which("go")
    if go is None:
        pytest.skip("`go` not installed (apt-get install golang-go); CI installs it")
    return go


def _methods() -> list[object]:
    native = pytest.param(
        "native",
        marks=pytest.mark.skipif(
            not ENGINE.native_available, reason="native CPU sampler not built (no compiler?)"
        ),
    )
    return [native, "signal"]


@pytest.fixture(params=_methods())
def cpu_method(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run the test with each exact CPU sampling tier (native, and SIGPROF on the main thread)."""
    method = str(request.param)
    ENGINE.set_method(method)
    try:
        yield method
    finally:
        ENGINE.set_method("auto")


@pytest.fixture
def thread_method() -> Iterator[str]:
    """Force the sampler-thread fallback tier."""
    ENGINE.set_method("thread")
    try:
        yield "thread"
    finally:
        ENGINE.set_method("auto")
