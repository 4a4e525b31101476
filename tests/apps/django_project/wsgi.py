"""WSGI entry point for gunicorn, wrapped in OpenTelemetry's WSGI middleware.

OpenTelemetry's middleware continues the incoming ``traceparent``, so its server span is the
active span when the Django middleware opens a profile.
"""

from __future__ import annotations

import os

from django.core.wsgi import get_wsgi_application
from opentelemetry import trace
from opentelemetry.instrumentation.wsgi import OpenTelemetryMiddleware
from opentelemetry.sdk.trace import TracerProvider

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.apps.django_project.settings")
trace.set_tracer_provider(TracerProvider())

application = OpenTelemetryMiddleware(get_wsgi_application())
