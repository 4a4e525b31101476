"""Settings of the test project: the real middleware path, options from the environment.

The server tests set ``TEST_OUTPUT_DIR`` (pprof files) and ``TEST_SAMPLER``; in-process tests
configure Django from these values and override ``MIDDLEWARE`` / ``OTLP_MIDDLEWARE``.
"""

from __future__ import annotations

import os

SECRET_KEY = "tests-only-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "testserver"]
ROOT_URLCONF = "tests.apps.django_project.urls"
INSTALLED_APPS: list[str] = []
DATABASES: dict[str, object] = {}
USE_TZ = True
LOGGING_CONFIG = None  # keep the server output quiet and the test process untouched

MIDDLEWARE = [
    "otlp_middleware.contrib.django.ProfilingMiddleware",
    "django.middleware.common.CommonMiddleware",
]

OTLP_MIDDLEWARE = {
    "SAMPLER": os.environ.get("TEST_SAMPLER", "always"),
    "OUTPUT_DIR": os.environ.get("TEST_OUTPUT_DIR", "profiles"),
    "EXCLUDE_PATHS": ["/health/"],
    "SCHEDULE_DELAY": 0.2,
}
