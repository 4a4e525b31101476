"""Views that each burn CPU in a function of their own name.

A profile holding another view's function proves a leak between requests; the decorated
views check ``profile_route`` / ``skip_profiling`` against the global sampler.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.utils.decorators import method_decorator
from django.views import View

from otlp_middleware import profile_route, skip_profiling


def spin_ms(ms: float) -> None:
    end = time.thread_time() + ms / 1000
    while time.thread_time() < end:
        sum(range(50))


def item_work(ms: float) -> None:
    spin_ms(ms)


def async_work(ms: float) -> None:
    spin_ms(ms)


def order_work(ms: float) -> None:
    spin_ms(ms)


def legacy_work(ms: float) -> None:
    spin_ms(ms)


def boom_work(ms: float) -> None:
    spin_ms(ms)


def stream_work(ms: float) -> None:
    spin_ms(ms)


def cbv_work(ms: float) -> None:
    spin_ms(ms)


def forced_work(ms: float) -> None:
    spin_ms(ms)


def skipped_work(ms: float) -> None:
    spin_ms(ms)


def _ms(request: HttpRequest) -> float:
    return float(request.GET.get("ms", "20"))


def item(request: HttpRequest, pk: int) -> HttpResponse:
    item_work(_ms(request))
    return HttpResponse(f"item {pk}")


async def async_item(request: HttpRequest, name: str) -> HttpResponse:
    for _ in range(4):
        async_work(_ms(request) / 4)
        await asyncio.sleep(0)  # let other requests' tasks interleave on the loop
    return HttpResponse(f"async {name}", status=201)


def order(request: HttpRequest, pk: int) -> HttpResponse:
    order_work(_ms(request))
    return HttpResponse(f"order {pk}")


def legacy(request: HttpRequest, year: str) -> HttpResponse:
    legacy_work(_ms(request))
    return HttpResponse(f"legacy {year}")


def boom(request: HttpRequest) -> HttpResponse:
    boom_work(_ms(request))
    raise RuntimeError("boom")


def stream(request: HttpRequest) -> StreamingHttpResponse:
    def chunks() -> Iterator[bytes]:
        for i in range(5):
            stream_work(_ms(request) / 5)
            yield f"chunk{i}\n".encode()

    return StreamingHttpResponse(chunks(), content_type="text/plain")


def health(request: HttpRequest) -> HttpResponse:
    return HttpResponse("ok")


class ItemView(View):
    def get(self, request: HttpRequest) -> HttpResponse:
        cbv_work(_ms(request))
        return HttpResponse("cbv")


# -- per-route decorators ----------------------------------------------------------------------


@profile_route(attributes={"team": "checkout"})
def forced(request: HttpRequest) -> HttpResponse:
    forced_work(_ms(request))
    return HttpResponse("forced")


@profile_route()
async def forced_async(request: HttpRequest) -> HttpResponse:
    forced_work(_ms(request))
    return HttpResponse("forced-async")


@skip_profiling
def skipped(request: HttpRequest) -> HttpResponse:
    skipped_work(_ms(request))
    return HttpResponse("skipped")


@skip_profiling
async def skipped_async(request: HttpRequest) -> HttpResponse:
    skipped_work(_ms(request))
    return HttpResponse("skipped-async")


@method_decorator(profile_route(), name="dispatch")
class ForcedMethodDecoratorView(View):
    def get(self, request: HttpRequest) -> HttpResponse:
        forced_work(_ms(request))
        return HttpResponse("forced-cbv")


@profile_route()
class ForcedClassView(View):
    def get(self, request: HttpRequest) -> HttpResponse:
        forced_work(_ms(request))
        return HttpResponse("forced-class")


@method_decorator(skip_profiling, name="dispatch")
class SkippedMethodDecoratorView(View):
    def get(self, request: HttpRequest) -> HttpResponse:
        skipped_work(_ms(request))
        return HttpResponse("skipped-cbv")


@skip_profiling
class SkippedClassView(View):
    def get(self, request: HttpRequest) -> HttpResponse:
        skipped_work(_ms(request))
        return HttpResponse("skipped-class")


class AsyncItemView(View):
    async def get(self, request: HttpRequest) -> HttpResponse:
        async_work(_ms(request))
        return HttpResponse("async-cbv")
