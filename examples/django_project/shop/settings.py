"""Settings of the example project: the parts that matter are MIDDLEWARE and OTLP_MIDDLEWARE."""

import os

SECRET_KEY = "example-only-not-secret"
DEBUG = True
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "testserver"]
ROOT_URLCONF = "shop.urls"
INSTALLED_APPS: list[str] = []
DATABASES: dict[str, dict[str, str]] = {}
USE_TZ = True
WSGI_APPLICATION = "shop.wsgi.application"

MIDDLEWARE = [
    # First, so the profile covers every other middleware and the view. With OpenTelemetry's
    # DjangoInstrumentor, its middleware is inserted above this one: profiles link to its span.
    "otlp_middleware.contrib.django.ProfilingMiddleware",
    "django.middleware.common.CommonMiddleware",
]

# Everything otlp-middleware reads from Django: UPPER-case option names, see
# docs/configuration.md. Read once, when Django loads the middleware.
OTLP_MIDDLEWARE = {
    # The local receiver (`otlp-middleware receive`); OTLP_MIDDLEWARE_ENDPOINT overrides it
    # here only because this example says so: framework settings beat the environment.
    "ENDPOINT": os.environ.get(
        "OTLP_MIDDLEWARE_ENDPOINT", "http://127.0.0.1:4318/v1development/profiles"
    ),
    "SERVICE_NAME": "django-example",
    "SAMPLER": "probabilistic:0.2",  # 1 request in 5 ...
    "ROUTES": {"POST /orders/*": "always"},  # ... every order
    "SCHEDULE_DELAY": 2.0,
}
