"""Views doing recognisable work, so their functions stand out in the profiles."""

import hashlib
import json

from django.http import HttpRequest, JsonResponse
from django.views import View

from otlp_middleware import CpuProfilerConfig, profile_route, skip_profiling


def count_primes(limit: int) -> int:
    return sum(1 for n in range(2, limit) if all(n % d for d in range(2, int(n**0.5) + 1)))


@profile_route(cpu=CpuProfilerConfig(sampling_frequency=199), attributes={"team": "math"})
def primes(request: HttpRequest, limit: int) -> JsonResponse:
    """Always profiled (whatever SAMPLER says), at 199 Hz."""
    return JsonResponse({"limit": limit, "primes": count_primes(limit)})


def digest(request: HttpRequest, rounds: int) -> JsonResponse:
    """Profiled when the global sampler picks the request."""
    value = b"seed"
    for _ in range(rounds):
        value = hashlib.sha256(value).digest()
    return JsonResponse({"digest": value.hex()})


@skip_profiling
class VersionView(View):
    """A class-based view that is never profiled."""

    def get(self, request: HttpRequest) -> JsonResponse:
        return JsonResponse({"version": "1.0"})


async def order(request: HttpRequest, order_id: int) -> JsonResponse:
    """An async view; ROUTES profiles every POST to /orders/*."""
    body = json.loads(request.body or b"{}")
    return JsonResponse({"order": order_id, "items": len(body.get("items", []))})
