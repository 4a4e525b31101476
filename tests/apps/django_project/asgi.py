"""ASGI entry point for uvicorn, wrapped in OpenTelemetry's ASGI middleware."""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application
from opentelemetry import trace
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.sdk.trace import TracerProvider

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.apps.django_project.settings")
trace.set_tracer_provider(TracerProvider())

application = OpenTelemetryMiddleware(get_asgi_application())
