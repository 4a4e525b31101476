#!/usr/bin/env python
"""A Django project profiled by otlp-middleware, exporting OTLP profiles to the local receiver.

Run it (two terminals)::

    otlp-middleware receive                                       # 127.0.0.1:4318
    python examples/django_project/manage.py runserver            # http://127.0.0.1:8000

then ``curl http://127.0.0.1:8000/primes/30000/`` a few times; profiles arrive in the
receiver's ``received/`` folder within a few seconds. Under a production server::

    cd examples/django_project && gunicorn shop.wsgi -k gthread --threads 4
    cd examples/django_project && uvicorn shop.asgi:application

The configuration is in ``shop/settings.py`` (``MIDDLEWARE`` and ``OTLP_MIDDLEWARE``).
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # otlp_middleware from a checkout

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "shop.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
