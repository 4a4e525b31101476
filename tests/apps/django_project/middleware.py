"""The real Django middleware with an in-memory exporter, for the in-process tests.

Django builds middleware from a dotted path with ``get_response`` only, so objects that
settings cannot hold (an exporter) are given by subclassing, as the middleware documents.
"""

from __future__ import annotations

from typing import Any, ClassVar

from otlp_middleware.contrib.django import ProfilingMiddleware
from tests.test_middleware import KeepingExporter

PATH = "tests.apps.django_project.middleware.KeepingProfilingMiddleware"


class KeepingProfilingMiddleware(ProfilingMiddleware):
    instances: ClassVar[list[KeepingProfilingMiddleware]] = []

    def __init__(self, get_response: Any) -> None:
        self.exporter = KeepingExporter()
        super().__init__(get_response, exporter=self.exporter, schedule_delay=0.05)
        self.instances.append(self)
