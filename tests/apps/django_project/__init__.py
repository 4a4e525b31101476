"""A tiny Django project for the integration tests (``tests/test_contrib_django.py``)."""
