"""URLs of the test project: ``path`` routes, a ``re_path`` route and an ``include``."""

from __future__ import annotations

from django.urls import include, path, re_path

from . import views

api = [path("orders/<int:pk>/", views.order)]

urlpatterns = [
    path("items/<int:pk>/", views.item),
    path("async/<slug:name>/", views.async_item),
    path("api/", include(api)),
    re_path(r"^legacy/(?P<year>[0-9]{4})/$", views.legacy),
    path("boom/", views.boom),
    path("stream/", views.stream),
    path("health/", views.health),
    path("cbv/", views.ItemView.as_view()),
    path("async-cbv/", views.AsyncItemView.as_view()),
    path("forced/", views.forced),
    path("forced-async/", views.forced_async),
    path("forced-cbv/", views.ForcedMethodDecoratorView.as_view()),
    path("forced-class/", views.ForcedClassView.as_view()),
    path("skipped/", views.skipped),
    path("skipped-async/", views.skipped_async),
    path("skipped-cbv/", views.SkippedMethodDecoratorView.as_view()),
    path("skipped-class/", views.SkippedClassView.as_view()),
]
