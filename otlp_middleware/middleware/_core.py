"""The sans-IO request profiler: decide, open the request's scope, close it, hand it off.

Adapters (``asgi.py``, ``wsgi.py``, ``contrib/*``) translate their framework's request into
calls on ``RequestProfiler`` and know nothing of sampling; this module knows nothing of ASGI
scopes or WSGI environs.

The request path does only this: a glob check of the path, the strategy's decision and, for
a sampled request, opening a CPU scope (and a memory scope) plus reading the active span.
Closing turns the scope's samples into a ``ProfileRecord`` queued on the ``BatchProcessor``;
a request with no samples produces nothing. Rendering (pprof, OTLP), merging and writing
happen on the export thread.

The profiler never breaks the app: every failure inside profiling is logged (rate-limited),
counted in ``stats()``, and the request goes on as if unprofiled.
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import fnmatch
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace

from ..export._batch import BatchProcessor
from ..profiling import _offload
from ..profiling._engine import ENGINE
from ..profiling._scope import RateLimitedLog, Scope
from ..profiling.cpu import CpuProfilerConfig, open_cpu_scope
from ..profiling.sampling import AlwaysSample, RequestInfo, SamplingStrategy, decide
from ..types import AttributeScalar, ProfileRecord, SpanLink, new_profile_id

logger = logging.getLogger(__name__)
_faults = RateLimitedLog(logger)


def split_globs(
    patterns: Sequence[str],
) -> tuple[frozenset[str], tuple[str, ...], Callable[[str], Any] | None]:
    """Path globs as (exact paths, prefixes, the C ``match`` of one regex for the rest).

    Checked per request, so the common shapes skip the regex engine: a glob without
    wildcards is an exact path, one whose only wildcard is a trailing ``*`` a prefix
    (fnmatch's ``*`` matches ``/`` too). Case-sensitive, as ``fnmatch.fnmatchcase``.
    """
    exact: set[str] = set()
    prefixes: list[str] = []
    rest: list[str] = []
    for pattern in patterns:
        body = pattern[:-1] if pattern.endswith("*") else pattern
        if any(c in body for c in "*?["):
            rest.append(pattern)
        elif body is pattern:
            exact.add(pattern)
        else:
            prefixes.append(body)
    regex = re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in rest)) if rest else None
    return frozenset(exact), tuple(prefixes), regex.match if regex is not None else None


def trace_sampled_flag(traceparent: str | None) -> bool | None:
    """The sampled bit of a W3C ``traceparent`` header, None if absent or malformed."""
    if not traceparent:
        return None
    parts = traceparent.strip().split("-")
    if len(parts) < 4 or len(parts[3]) != 2:
        return None
    try:
        return bool(int(parts[3], 16) & 1)
    except ValueError:
        return None


def current_span_link(context: otel_context.Context | None = None) -> SpanLink | None:
    """The span active in ``context`` (default: now) as a link; None if no valid span."""
    ctx = trace.get_current_span(context).get_span_context()
    if not ctx.is_valid:
        return None
    return SpanLink(ctx.trace_id.to_bytes(16, "big"), ctx.span_id.to_bytes(8, "big"))


def _root_scope_args(cpu: CpuProfilerConfig) -> tuple[Any, int, int, int | None]:
    max_s = cpu.max_duration_seconds
    return cpu, cpu.period_ns, cpu.max_stack_depth, round(max_s * 1e9) if max_s else None


@dataclass(frozen=True)
class RouteOptions:
    """Per-route overrides set by ``profile_route`` / ``skip_profiling``.

    ``force``: True profiles the route regardless of the global sampler, False never profiles
    it; ``sampler`` (when set) replaces the global sampler for the route; ``cpu`` overrides
    the CPU configuration (False disables CPU sampling); ``attributes`` are added to the
    route's profiles.
    """

    force: bool | None = None
    sampler: SamplingStrategy | None = None
    cpu: CpuProfilerConfig | bool | None = None
    memory: Any = None
    attributes: Mapping[str, AttributeScalar] | None = None


class RequestSlot:
    """Per-request state shared with per-route decorators through ``CURRENT_REQUEST``.

    The middleware makes one for every request it decided on while route decorators are in
    use; a decorated view (running in the same context, or a copy of it in a thread pool)
    can then start profiling a request the global sampler skipped, or skip one it sampled.
    The middleware finishes ``handle`` when the response is complete.
    """

    __slots__ = ("handle", "method", "profiler", "skipped", "status_code")

    def __init__(self, profiler: RequestProfiler, method: str, handle: RequestHandle | None):
        self.profiler = profiler
        self.method = method
        self.handle = handle
        self.skipped = False
        self.status_code: int | None = None

    def finish(self, route: str | None) -> None:
        handle = self.handle
        if handle is not None:
            if handle.status_code is None:
                handle.status_code = self.status_code
            if route and "http.route" not in handle.attributes:
                handle.set_route(route)
            handle.finish()


CURRENT_REQUEST: contextvars.ContextVar[RequestSlot | None] = contextvars.ContextVar(
    "otlp_middleware_request", default=None
)
"""The request being served in this context (set only while route decorators exist)."""

ROUTE_DECORATORS = {"in_use": False}
"""Set by ``profile_route`` / ``skip_profiling`` when first applied, so that the request path
pays for ``CURRENT_REQUEST`` only in apps that use them."""


@dataclass(frozen=True)
class ProfilerStats:
    """Request-path counters of a ``RequestProfiler``."""

    requests: int
    sampled: int
    profiles_emitted: int
    empty: int  # sampled requests that collected no sample
    faults: int  # failures inside profiling, absorbed


class RequestHandle:
    """One profiled request, from the decision to its record. Made per request, never shared.

    Made for every profiled request, so it is cheap to make: what most requests leave at
    its default is a class attribute, not set per instance.
    """

    _cpu_scope: Scope | None = None
    _memory_scope: Any = None
    _done = False
    _closed = False
    _cpu_samples: tuple[Any, ...] = ()
    _heap_samples: Sequence[Any] = ()
    _period_ns = 0
    _heap_period = 0
    _start_ns = 0
    _end_ns = 0
    _link: SpanLink | bool | None = False  # False: not read yet
    status_code: int | None = None
    # Called for the route only if the request has samples (adapters that can name the
    # route cheaply at the end set it instead of an http.route attribute).
    route_source: Callable[[], str | None] | None = None

    def __init__(
        self,
        owner: RequestProfiler,
        otel_ctx: otel_context.Context | None = None,
        method: str | None = None,
    ) -> None:
        self._owner = owner
        # The OpenTelemetry context at the start; its span becomes the link, read only for
        # requests that have samples to export.
        self._otel_context = otel_ctx
        self.attributes: dict[str, AttributeScalar] = (
            {"http.request.method": method} if method is not None else {}
        )

    @property
    def link(self) -> SpanLink | None:
        """The span that was active when the request's profiling began (None if none)."""
        link = self._link
        if link is False:
            link = self._link = current_span_link(self._otel_context)
        return link  # type: ignore[return-value]

    @property
    def cpu_scope(self) -> Scope | None:
        return self._cpu_scope

    def set_route(self, route: str | None) -> None:
        if route:
            self.attributes["http.route"] = route

    def set_error(self, exc: BaseException) -> None:
        self.attributes["error.type"] = type(exc).__qualname__

    def close_scopes(self) -> None:
        """Stop collecting (the record is queued later by ``finish``). Idempotent."""
        try:
            self._owner._close_scopes(self)
        except Exception:
            self._owner._fault("closing a request's profile")

    def discard(self) -> None:
        """Stop collecting and drop what was collected: the request exports nothing."""
        self.close_scopes()
        self._done = True
        self._cpu_samples = ()
        self._heap_samples = ()

    def drop_cpu(self) -> None:
        """Stop and drop the CPU samples (``profile_route(cpu=False)``)."""
        scope, self._cpu_scope = self._cpu_scope, None
        if scope is not None:
            ENGINE.close(scope)

    def finish(self) -> None:
        """Close the request's scopes and queue its record. Idempotent, never raises."""
        if self._done:
            return
        self._done = True
        try:
            self._owner._close_scopes(self)
            self._owner._emit(self)
        except Exception:
            self._owner._fault("closing a request's profile")


class RequestProfiler:
    """Decides which requests to profile and collects exactly their samples.

    Parameters:
        sampler: the strategy asked once per request.
        processor: where closed requests go (a ``BatchProcessor`` around an exporter).
        cpu: CPU sampling configuration, or ``None`` for no CPU samples.
        memory: a ``MemoryProfilerConfig`` for heap samples, or ``None``.
        exclude_paths: globs of paths never profiled (health checks, metrics).
        enabled: ``False`` turns the whole middleware into a pass-through.
        extra_attributes: added to every profile (e.g. deployment labels).
    """

    def __init__(
        self,
        *,
        sampler: SamplingStrategy,
        processor: BatchProcessor,
        cpu: CpuProfilerConfig | None = None,
        memory: Any = None,
        exclude_paths: Sequence[str] = (),
        enabled: bool = True,
        extra_attributes: Mapping[str, AttributeScalar] | None = None,
    ) -> None:
        self._sampler = sampler
        self.processor = processor
        self._cpu = cpu
        self._memory = memory
        self._enabled = enabled
        self.exclude_paths = tuple(exclude_paths)
        self._exclude_exact, self._exclude_prefixes, self._exclude_match = split_globs(
            self.exclude_paths
        )
        self.lean_path: Any = None
        self.lean_always = False
        # (always, decided, excluded, empty) counted by the lean paths replaced so far
        self._lean_counted = (0, 0, 0, 0)
        self._update_lean_path()
        # (config, period_ns, max_depth, max_duration_ns) for ENGINE.open_root_scope
        self._root_args: tuple[Any, int, int, int | None] = (None, 0, 0, None)
        self._extra = dict(extra_attributes or {})
        self._requests = 0
        self._sampled = 0
        self._emitted = 0
        self._empty = 0
        self._faults = 0
        if cpu is not None:
            _offload.install()
        # At exit, the records of ended requests still with the engine's collector go to the
        # queue before the queue's own exit flush: exit hooks run last registered first, so
        # the engine's hook moves after every processor made so far.
        atexit.unregister(ENGINE.flush_code_scopes)
        atexit.register(ENGINE.flush_code_scopes)

    @property
    def sampler(self) -> SamplingStrategy:
        """The strategy asked once per request."""
        return self._sampler

    @sampler.setter
    def sampler(self, value: SamplingStrategy) -> None:
        self._sampler = value
        self._update_lean_path()

    @property
    def enabled(self) -> bool:
        """``False`` turns the whole middleware into a pass-through."""
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self._enabled = value
        self._update_lean_path()

    @property
    def cpu(self) -> CpuProfilerConfig | None:
        """CPU sampling configuration, or ``None`` for no CPU samples."""
        return self._cpu

    @cpu.setter
    def cpu(self, value: CpuProfilerConfig | None) -> None:
        self._cpu = value
        self._update_lean_path()

    @property
    def memory(self) -> Any:
        """A ``MemoryProfilerConfig`` for heap samples, or ``None``."""
        return self._memory

    @memory.setter
    def memory(self, value: Any) -> None:
        self._memory = value
        self._update_lean_path()

    def _update_lean_path(self) -> None:
        # ``lean_path`` (``ENGINE.lean_path``): when a sampled request needs only on-CPU
        # samples, an async adapter takes it at its leanest through this; else None (as
        # where the native sampler is unavailable). Kept in step with ``sampler``,
        # ``enabled``, ``cpu`` and ``memory`` by their setters.
        cpu = self._cpu
        lean_root = None  # the request scopes' (period_ns, max_depth, max_duration_ns)
        if cpu is not None and not cpu.include_system_calls and self._memory is None:
            lean_root = _root_scope_args(cpu)[1:]
        self._lean_counted = self._lean_counts()  # the replaced path's counts stay in stats()
        # ``lean_always``: every request not excluded is profiled (the built-in
        # ``AlwaysSample``, enabled): the ASGI adapter then has ``lean_path`` check the
        # excluded paths and count the decision, instead of calling ``should_profile``.
        self.lean_always = type(self._sampler) is AlwaysSample and self._enabled
        self.lean_path = None
        if lean_root is not None:
            self.lean_path = ENGINE.lean_path(
                *lean_root,
                exact=self._exclude_exact or None,
                prefixes=self._exclude_prefixes or None,
                match=self._exclude_match,
                sampler=self._sampler if self.lean_always else None,
            )

    def _lean_counts(self) -> tuple[int, int, int, int]:
        """(always, decided, excluded, empty) the lean paths counted, the current one included.

        The ASGI adapter's lean calls are counted in the extension (``ENGINE.lean_path``).
        """
        counted = self._lean_counted
        lean = self.lean_path
        if lean is None:
            return counted
        always, decided, excluded, empty = counted
        return (
            always + lean.always,
            decided + lean.decided,
            excluded + lean.excluded,
            empty + lean.empty,
        )

    # ------------------------------------------------------------------ decision
    def should_profile(
        self,
        method: str,
        path: str,
        *,
        headers: Callable[[], Mapping[str, str]] | None = None,
        route: str | None = None,
        options: RouteOptions | None = None,
    ) -> bool:
        """The per-request decision: enabled, not excluded, route override, then strategy."""
        self._requests += 1
        if not self.enabled:
            return False
        if options is not None and options.force is not None:
            return options.force
        if (
            path in self._exclude_exact
            or path.startswith(self._exclude_prefixes)
            or (self._exclude_match is not None and self._exclude_match(path) is not None)
        ):
            return False
        strategy = options.sampler if options is not None and options.sampler else self.sampler
        try:
            if strategy.needs_request:
                hdrs = headers() if headers is not None else {}
                info = RequestInfo(
                    method,
                    path,
                    route,
                    hdrs,
                    trace_sampled_flag(hdrs.get("traceparent")),
                )
                return decide(strategy, info)
            return strategy.should_sample()
        except Exception:
            self._fault("the sampling strategy")
            return False

    def sampler_decides(self, strategy: SamplingStrategy, method: str) -> bool:
        """A route's own strategy deciding (``profile_route(sampler=...)``); faults -> False."""
        try:
            if strategy.needs_request:
                return decide(strategy, RequestInfo(method, ""))
            return strategy.should_sample()
        except Exception:
            self._fault("a route's sampling strategy")
            return False

    # ------------------------------------------------------------------ scopes
    def begin(
        self,
        method: str,
        *,
        root_frame: FrameType | None = None,
        route: str | None = None,
        options: RouteOptions | None = None,
    ) -> RequestHandle | None:
        """Open a sampled request's scopes on this thread (or below ``root_frame``).

        Returns None (and counts a fault) if profiling could not start; the request then runs
        unprofiled.
        """
        cpu = self.cpu
        try:
            handle = RequestHandle(self, otel_context.get_current(), method)
            handle._start_ns = time.time_ns()
            if route:
                handle.attributes["http.route"] = route
            if self._extra:
                handle.attributes.update(self._extra)
            if options is not None:
                if options.attributes:
                    handle.attributes.update(options.attributes)
                if isinstance(options.cpu, CpuProfilerConfig):
                    cpu = options.cpu
                elif options.cpu is False:
                    cpu = None
                elif options.cpu is True and cpu is None:
                    cpu = CpuProfilerConfig()
            if cpu is not None:
                if root_frame is not None and not cpu.include_system_calls:
                    args = self._root_args_for(cpu)
                    handle._cpu_scope = ENGINE.open_root_scope(root_frame, *args[1:])
                else:
                    handle._cpu_scope = open_cpu_scope(cpu, root_frame)
            memory = self.memory
            if options is not None and options.memory is not None:
                memory = None if options.memory is False else options.memory
            if memory is not None:
                from ..profiling.memory import open_memory_scope

                handle._memory_scope = open_memory_scope(memory)
            self._sampled += 1
            return handle
        except Exception:
            self._fault("opening a request's profile")
            return None

    def _finish_root(
        self,
        method: str,
        status_code: int | None,
        error: BaseException | None,
        route: str | None,
        context: contextvars.Context,
        scope: Scope,
    ) -> None:
        """The record of a lean request that took samples, on the collector thread.

        The ASGI adapter hands its request watcher to the engine
        (``ENGINE.release_request``); the collector makes the request's scope, gives it its
        samples and calls this (through the adapter's ``finish``). The context was copied
        and the route read on the request path as it ended; the OpenTelemetry span is read
        from the context here.

        Built straight from the scope, without a ``RequestHandle``: about 1 in 10 requests at
        99 Hz come here, so this is most of the collector's work per exported request.
        """
        samples = scope.samples
        if not samples:
            # Samples were taken while it ran, but none was its own (another request's, on
            # the same loop between two of its awaits): nothing to build.
            self._empty += 1
            return
        try:
            if scope.closed_ns is None:  # the request path ends it before the hand-on
                ENGINE.close(scope)
            attributes: dict[str, AttributeScalar] = {"http.request.method": method}
            if self._extra:
                attributes.update(self._extra)
            if error is not None:
                attributes["error.type"] = type(error).__qualname__
                if status_code is None:
                    status_code = 500
            if route and "http.route" not in attributes:
                attributes["http.route"] = route
            self._emit_record(
                attributes,
                status_code,
                None,
                start_ns=scope.opened_ns,
                duration_ns=scope.duration_ns,
                cpu_samples=tuple(samples),
                cpu_period_ns=scope.period_ns,
                heap_samples=(),
                heap_period_bytes=0,
                link=current_span_link(context.run(otel_context.get_current)),
            )
        except Exception:
            self._fault("closing a request's profile")

    def _root_args_for(self, cpu: CpuProfilerConfig) -> tuple[Any, int, int, int | None]:
        args = self._root_args
        if args[0] is not cpu:
            args = self._root_args = _root_scope_args(cpu)
        return args

    def open_slot(self, method: str, handle: RequestHandle | None) -> RequestSlot | None:
        """The request's slot for route decorators, or None when no decorator is in use."""
        if handle is None and not ROUTE_DECORATORS["in_use"]:
            return None
        return RequestSlot(self, method, handle)

    def enter_slot(self, slot: RequestSlot) -> tuple[Any, Any]:
        """Publish ``slot`` (and its CPU scope, for offloaded work) in this context."""
        req = CURRENT_REQUEST.set(slot) if ROUTE_DECORATORS["in_use"] else None
        cpu = self.enter_context(slot.handle) if slot.handle is not None else None
        return req, cpu

    def exit_slot(self, tokens: tuple[Any, Any]) -> None:
        req, cpu = tokens
        self.exit_context(cpu)
        if req is not None:
            # reset from another context: nothing of ours to undo there
            with contextlib.suppress(ValueError):
                CURRENT_REQUEST.reset(req)

    def enter_context(self, handle: RequestHandle) -> contextvars.Token[Scope | None] | None:
        """Make ``handle``'s CPU scope the current one, so offloaded work is attributed."""
        if handle._cpu_scope is None:
            return None
        return _offload.CURRENT_SCOPE.set(handle._cpu_scope)

    @staticmethod
    def exit_context(token: contextvars.Token[Scope | None] | None) -> None:
        if token is not None:
            try:  # noqa: SIM105 (per request: cheaper than contextlib.suppress)
                _offload.CURRENT_SCOPE.reset(token)
            except ValueError:  # reset from another context: nothing of ours to undo there
                pass

    def _close_scopes(self, handle: RequestHandle) -> None:
        if handle._closed:
            return
        handle._closed = True
        scope = handle._cpu_scope
        if scope is not None:
            ENGINE.close(scope)
            handle._start_ns = start = scope.opened_ns
            handle._end_ns = start + scope.duration_ns
            if scope.samples:
                handle._cpu_samples = tuple(scope.samples)
                handle._period_ns = scope.period_ns
        else:
            handle._end_ns = time.time_ns()
        if handle._memory_scope is not None:
            handle._heap_samples, handle._heap_period = handle._memory_scope.close()

    def _emit(self, handle: RequestHandle) -> None:
        if not handle._cpu_samples and not handle._heap_samples:
            self._empty += 1
            return
        self._emit_record(
            handle.attributes,
            handle.status_code,
            handle.route_source,
            start_ns=handle._start_ns,
            duration_ns=max(handle._end_ns - handle._start_ns, 0),
            cpu_samples=handle._cpu_samples,
            cpu_period_ns=handle._period_ns,
            heap_samples=handle._heap_samples,
            heap_period_bytes=handle._heap_period,
            link=handle.link,
        )

    def _emit_record(
        self,
        attributes: dict[str, AttributeScalar],
        status_code: int | None,
        route_source: Callable[[], str | None] | None,
        start_ns: int,
        duration_ns: int,
        cpu_samples: Sequence[Any],
        cpu_period_ns: int,
        heap_samples: Sequence[Any],
        heap_period_bytes: int,
        link: SpanLink | None,
    ) -> None:
        """Complete a request's attributes (status, route) and queue its record."""
        if status_code is not None:
            attributes["http.response.status_code"] = status_code
        if route_source is not None and "http.route" not in attributes:
            route = route_source()
            if route:
                attributes["http.route"] = route
        record = ProfileRecord(
            profile_id=new_profile_id(),
            start_time_ns=start_ns,
            duration_ns=duration_ns,
            cpu_samples=cpu_samples,
            cpu_period_ns=cpu_period_ns,
            heap_samples=heap_samples,
            heap_period_bytes=heap_period_bytes,
            link=link,
            attributes=attributes,
        )
        if self.processor.emit(record):
            self._emitted += 1

    # ------------------------------------------------------------------ bookkeeping
    def _fault(self, where: str) -> None:
        self._faults += 1
        _faults.exception("otlp_middleware: failure in %s; the request is not affected", where)

    def stats(self) -> ProfilerStats:
        """The counters, with every request that has ended counted."""
        ENGINE.flush_code_scopes()
        always, decided, excluded, empty = self._lean_counts()
        return ProfilerStats(
            requests=self._requests + always + excluded,
            sampled=self._sampled + always + decided,
            profiles_emitted=self._emitted,
            empty=self._empty + empty,
            faults=self._faults,
        )

    def force_flush(self, timeout: float = 30.0) -> bool:
        """Queue the ended requests' records still with the engine, then flush the queue."""
        ENGINE.flush_code_scopes()
        return self.processor.force_flush(timeout)

    def shutdown(self, timeout: float = 30.0) -> None:
        ENGINE.flush_code_scopes()
        self.processor.shutdown(timeout)
