"""Native CPU sampler (C extension, Linux, CPython 3.10-3.13).

Each thread inside a scope calls :func:`arm_thread`: a POSIX timer on its own CPU-time clock
fires on average every ``1/hz`` CPU-seconds and delivers ``SIGRTMIN+3`` to that very thread,
whose handler copies the thread's own Python stack into a preallocated lock-free ring. The
handler allocates nothing and takes no lock. :func:`drain` returns the samples, with the GIL.

The gaps between a thread's samples are random, ``period * U`` with ``U`` uniform in
``[0.5, 1.5)`` (mean: the period), drawn per thread by the handler, which re-arms its one-shot
timer for the next deadline of that schedule. A fixed period would phase-lock with periodic
work (two tasks alternating bursts of about half a period would see every sample land in
the same one); a random gap spreads each sample's phase over a whole period. Each sample's
``cpu_ns`` is the CPU time its thread really consumed, while armed, since its previous
sample, so a run's weights add up to the thread's armed CPU time.

:func:`arm_thread` and :func:`disarm_thread` run once per request, so only a thread's first
:func:`arm_thread` (after each :func:`start`) creates its timer; :func:`disarm_thread` parks
it (one ``timer_settime``, whose old value also gives the CPU clock), the next
:func:`arm_thread` re-arms it (one ``timer_settime``), and it is deleted when the thread
exits or by :func:`stop` - which the engine calls once no scope has been open for a while.

Usage::

    from otlp_middleware.profiling import _cpu_native

    _cpu_native.start(99.0)
    _cpu_native.arm_thread(token)        # in the thread entering the scope
    ...                                  # the scope's work
    _cpu_native.disarm_thread()          # in the same thread
    for token, roots, tid, cpu_ns, ts_ns, frames in _cpu_native.drain():
        ...
    _cpu_native.stop()

The kernel checks CPU timers on its scheduler tick, so a signal comes up to one tick of CPU
time after its deadline (the schedule does not drift: deadlines are absolute), and deadlines
closer together than the tick are delivered as one signal whose ``cpu_ns`` covers them all;
``stats()["overruns"]`` counts the deadlines merged that way. With gaps of at least half a
period, that happens only above twice the tick rate (125 Hz with a 250 Hz tick).
"""

from collections.abc import Callable, Generator
from collections.abc import Set as AbstractSet
from types import FrameType
from typing import Any

#: The real-time signal the timers deliver (SIGRTMIN+3).
SIGNAL: int
#: Frames kept per sample (leaf first); deeper stacks are cut and counted as truncated.
MAX_DEPTH: int
#: Root tokens kept per sample.
MAX_ROOTS: int

Frame = tuple[str, str, int, int]
"""(qualified name, file name, first line, current line)."""

Sample = tuple[int, tuple[int, ...], int, int, int, tuple[Frame, ...]]
"""(thread_token, root_tokens leaf first, native thread id, cpu_ns, unix timestamp_ns,
frames leaf first)."""

def start(hz: float, capacity: int = 4096) -> None:
    """Install the signal handler and allocate a ring of ``capacity`` samples (rounded up
    to a power of two). Idempotent: when already started only the frequency changes.

    Also installs a fault guard for SIGSEGV and SIGBUS (the actions found are kept): a fault
    while the signal handler walks a thread's frames (a stale pointer) drops that sample and
    counts it in ``stats()["faults"]``; any other fault is a real crash and goes, unchanged,
    to the action found at start (faulthandler's, or the default core dump).

    Raises RuntimeError when the signal already has a foreign handler.
    """

def stop() -> None:
    """Delete every timer (also those of threads that died armed), restore the previous
    signal disposition and the SIGSEGV/SIGBUS actions (where the fault guard is still the
    current one), free the buffers (undrained samples are discarded) and forget every root.
    Idempotent."""

def is_started() -> bool:
    """Whether :func:`start` ran (and :func:`stop` has not)."""

def set_frequency(hz: float) -> None:
    """Change the mean period of every armed timer (and of timers armed later); a no-op
    when the period does not change."""

def arm_thread(token: int) -> None:
    """Sample the calling thread; its samples carry ``token``. Calling it again only
    changes the token. The countdown left at the last :func:`disarm_thread` carries over, and
    so does the CPU time consumed armed since the last sample (it weighs the next sample);
    a thread's first arming starts at a random phase. The first call of a thread (since
    :func:`start`) creates its timer; later ones re-arm it (one ``timer_settime``).

    Raises RuntimeError when the sampler is not started.
    """

def disarm_thread() -> None:
    """Stop sampling the calling thread (no-op if not armed). Its timer is disarmed, not
    deleted: it goes when the thread exits or at :func:`stop`. A signal already on its way
    is ignored (counted in ``skipped_not_armed``) and does not re-arm the timer."""

def thread_armed() -> bool:
    """Whether the calling thread's timer is armed (the sampler started, this thread
    sampled)."""

def mark() -> int:
    """-1 unless the sampler is started and the calling thread is armed; else the number of
    samples published so far (never reset). Equal readings at a scope's open and close mean
    that no sample at all was recorded in between: the close need not drain."""

def add_root(frame: FrameType, token: int) -> bool:
    """Register a coroutine's frame (``coro.cr_frame``): a sample whose stack holds it
    carries ``token`` in its root tokens. Registering the same frame again changes the
    token. The frame is kept alive until :func:`remove_root` or :func:`stop`. Returns
    :func:`thread_armed`."""

def remove_root(frame: FrameType) -> bool:
    """Forget a root frame; returns whether it was registered."""

def drain() -> list[Sample]:
    """Take every sample recorded so far (oldest first)."""

def stats() -> dict[str, int]:
    """Counters: samples, dropped (ring full), timers_active (as :func:`active_timers`),
    timers_armed (as :func:`armed_timers`), signals_received,
    skipped_no_python, skipped_no_thread_state, skipped_not_armed, function_table_full,
    truncated, overruns, faults (walks that faulted on a stale pointer; sample dropped),
    walk_fallbacks (3.11/3.12: the newest C-level frame was not initialised yet, the sample
    was taken from its caller's frame), walk_rejected (an inconsistent frame chain; sample
    dropped), frame_cache_hits and frame_cache_misses (frames whose function and line came
    from the frame cache, or were computed), handler_ns (the time the signal handler spent
    on samples, its timer's re-arming included, not the kernel's delivery), roots, started,
    signal, code_deaths (code objects deallocated since import: each makes the frame cache
    check its older entries in full once) and code_deaths_counted (1 once that counting is
    in place; 0: every entry is checked in full)."""

def active_timers() -> int:
    """The number of timers this module's threads have (armed or disarmed): what
    ``/proc/self/timers`` lists. Zero after :func:`stop`."""

def armed_timers() -> int:
    """The number of those timers currently armed (threads inside a scope)."""

def _after_fork_child() -> None:
    """Reset all state in a forked child: timers are not inherited by ``fork()``."""

class ScopeCore:
    """The C fields of a code scope (the base of ``CodeScope``), read and set by the request
    path without dictionaries or int objects; ``closed_ns`` and ``deadline_ns`` are None
    when unset."""

    thread_id: int
    period_ns: int
    max_depth: int
    opened_ns: int
    closed_ns: int | None
    deadline_ns: int | None
    mark: int
    quiet: bool
    root_key: int
    finish: Any

def release_request(released: Any, watcher: SendWatcher, finish: Any) -> None:
    """End a request watcher and its scope, if any; keep ``finish`` on it; append it to the
    deque ``released`` (the engine's collector makes its scope and calls
    ``finish(watcher, scope)``)."""

def open_watchers() -> int:
    """Request watchers made and not yet ended."""

class SendWatcher:
    """An ASGI send callable: ``SendWatcher(send, scope)``, or a request watcher made by a
    :class:`LeanPath` call, which is also the awaitable running the app (a lean call)."""

    status: Any
    open: bool
    samples: int
    tag: int
    root_key: int
    closed_ns: int | None
    deadline_ns: int | None
    scope: Any
    finish: Any
    opened_ns: int
    period_ns: int
    max_depth: int
    thread_id: int

    def __init__(self, send: Any, scope: Any) -> None: ...
    def __call__(self, message: Any) -> Any: ...
    # a lean call's awaitable protocol (a coroutine's: asyncio takes it for one)
    def __await__(self) -> Generator[Any, None, Any]: ...
    def __iter__(self) -> SendWatcher: ...
    def __next__(self) -> Any: ...
    def send(self, value: Any) -> Any: ...
    def throw(self, *exc: Any) -> Any: ...
    def close(self) -> None: ...

class LeanPath:
    """The ASGI request path at its leanest, for requests sampled at ``period_ns``.

    Called as ``(app, scope, receive, send, on_end, decided)``: a lean call, a request
    watcher that is at once the request's CPU scope, the ``send`` given to the app and the
    awaitable that runs ``app(scope, receive, watcher)``; or None where the sampler does not
    run at ``period_ns`` on the calling thread, or :func:`set_lean` is off. While it runs the
    app's awaitable, the thread's samples carry its tag. When the app's awaitable is done it
    ends the request: without a sample of its own it is counted in ``empty``, else handed to
    ``on_end(watcher, scope, root_path, error)``. Undecided (``decided`` False), a path in
    ``exact``, starting with one of ``prefixes`` or matched by ``match`` is not profiled
    (``app(scope, receive, send)`` is returned, counted ``excluded``), and every other
    request is counted on ``sampler`` (``next(sampler._count)``)."""

    period_ns: int
    max_depth: int
    always: int
    decided: int
    excluded: int
    empty: int
    failures: int

    def __init__(
        self,
        period_ns: int,
        max_depth: int,
        max_duration_ns: int | None,
        *,
        exact: AbstractSet[str] | None = None,
        prefixes: tuple[str, ...] | None = None,
        match: Callable[[str], Any] | None = None,
        sampler: Any = None,
    ) -> None: ...
    def __call__(
        self, app: Any, scope: Any, receive: Any, send: Any, on_end: Any, decided: bool
    ) -> Any: ...

def set_lean(on: bool) -> None:
    """Whether :class:`LeanPath` calls make lean calls at all (off at import: the engine turns
    it on while its native tier is in use)."""

def running_request() -> SendWatcher | None:
    """The innermost open request watcher among the lean calls running on this thread."""

def code_opens() -> int:
    """The number of request watchers :class:`LeanPath` calls have made (never reset)."""
