"""Per-route control: ``profile_route`` forces or tunes profiling of one view,
``skip_profiling`` excludes one.

They wrap the view function itself, so they work the same on Django function and class-based
views, Flask views and FastAPI/Starlette endpoints, sync and async: when the view runs under
one of our middlewares (found through the ``CURRENT_REQUEST`` contextvar), the wrapper
applies the route's rule; elsewhere it just calls the view. ``functools.wraps`` keeps the
signature visible (``inspect.signature`` follows ``__wrapped__``), so FastAPI's parameter
parsing and validation see the original endpoint.

A request the global sampler skipped but a decorated view forces is profiled from the
moment the view is called (the middleware's own frames before it are not part of it).
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, overload

from .middleware._core import CURRENT_REQUEST, ROUTE_DECORATORS, RequestSlot, RouteOptions
from .profiling import _offload
from .profiling.cpu import CpuProfilerConfig
from .profiling.sampling import SamplingStrategy, parse_sampler
from .types import AttributeScalar

F = TypeVar("F", bound=Callable[..., Any])


def _begin_for_view(slot: RequestSlot, options: RouteOptions, root_frame: Any) -> Any:
    """Apply the route's rule to the request; return a handle this view opened, if any."""
    handle = slot.handle
    if options.force is False:
        if handle is not None:
            handle.discard()
            slot.handle = None
        slot.skipped = True
        return None
    if slot.skipped:
        return None
    if options.sampler is not None:
        wanted = slot.profiler.sampler_decides(options.sampler, slot.method)
    else:
        wanted = True
    if handle is not None:
        if not wanted:
            handle.discard()
            slot.handle = None
            return None
        if options.attributes:
            handle.attributes.update(options.attributes)
        if options.cpu is False:
            handle.drop_cpu()
        return None
    if not wanted:
        return None
    handle = slot.profiler.begin(slot.method, root_frame=root_frame, options=options)
    slot.handle = handle
    return handle


def _wrap_function(fn: F, options: RouteOptions) -> F:
    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def async_view(*args: Any, **kwargs: Any) -> Any:
            slot = CURRENT_REQUEST.get()
            if slot is None:
                return await fn(*args, **kwargs)
            opened = _begin_for_view(slot, options, sys._getframe())
            if opened is None:
                return await fn(*args, **kwargs)
            token = slot.profiler.enter_context(opened)
            try:
                return await fn(*args, **kwargs)
            finally:
                slot.profiler.exit_context(token)
                opened.close_scopes()

        return async_view  # type: ignore[return-value]

    @functools.wraps(fn)
    def view(*args: Any, **kwargs: Any) -> Any:
        slot = CURRENT_REQUEST.get()
        if slot is None:
            return fn(*args, **kwargs)
        opened = _begin_for_view(slot, options, None)
        if opened is None:
            return fn(*args, **kwargs)
        token = slot.profiler.enter_context(opened)
        try:
            return fn(*args, **kwargs)
        finally:
            slot.profiler.exit_context(token)
            opened.close_scopes()

    return view  # type: ignore[return-value]


def _apply(target: Any, options: RouteOptions) -> Any:
    ROUTE_DECORATORS["in_use"] = True
    _offload.install()
    if inspect.isclass(target):
        # Class-based views (Django's View and friends) route every request through dispatch.
        dispatch = getattr(target, "dispatch", None)
        if dispatch is None:
            raise TypeError(f"{target!r}: a class needs a dispatch() method to be decorated")
        setattr(target, "dispatch", _wrap_function(dispatch, options))  # noqa: B010
        return target
    if not callable(target):
        raise TypeError(f"{target!r} is not a view function or class")
    return _wrap_function(target, options)


@overload
def skip_profiling(view: F) -> F: ...
@overload
def skip_profiling(view: None = None) -> Callable[[F], F]: ...


def skip_profiling(view: Any = None) -> Any:
    """Never profile this view, whatever the global sampler says.

    Works as ``@skip_profiling`` and ``@skip_profiling()``::

        @app.get("/healthz")
        @skip_profiling
        async def healthz(): ...
    """
    options = RouteOptions(force=False)
    if view is None:
        return lambda v: _apply(v, options)
    return _apply(view, options)


def profile_route(
    sampler: SamplingStrategy | str | None = None,
    *,
    cpu: bool | CpuProfilerConfig | None = None,
    memory: Any = None,
    attributes: Mapping[str, AttributeScalar] | None = None,
) -> Callable[[F], F]:
    """Profile this view on its own terms.

    Parameters:
        sampler: the strategy (or spec, e.g. ``"rate:10"``) deciding for this route instead
            of the global one; ``None`` (default) profiles every request of the route, even
            when the global sampler says never.
        cpu: ``False`` drops CPU samples for the route; a ``CpuProfilerConfig`` sets the
            frequency for requests this view starts profiling.
        memory: ``True`` or a ``MemoryProfilerConfig`` adds heap samples to requests this view
            starts profiling.
        attributes: extra low-cardinality attributes for the route's profiles.

    Example::

        @app.post("/checkout")
        @profile_route(cpu=CpuProfilerConfig(sampling_frequency=199), attributes={"team": "pay"})
        async def checkout(order: Order): ...
    """
    strategy = parse_sampler(sampler) if sampler is not None else None
    if memory is True:
        from .profiling.memory import MemoryProfilerConfig

        memory = MemoryProfilerConfig()
    options = RouteOptions(
        force=None if strategy is not None else True,
        sampler=strategy,
        cpu=cpu,
        memory=memory,
        attributes=dict(attributes) if attributes else None,
    )

    def decorate(view: F) -> F:
        return _apply(view, options)  # type: ignore[no-any-return]

    return decorate
