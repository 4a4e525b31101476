from django.urls import path

from . import views

urlpatterns = [
    path("primes/<int:limit>/", views.primes),
    path("digest/<int:rounds>/", views.digest),
    path("version/", views.VersionView.as_view()),
    path("orders/<int:order_id>/", views.order),
]
