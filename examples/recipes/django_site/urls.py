from __future__ import annotations

from django.urls import path, re_path

from . import views

urlpatterns = [
    re_path(r"^reports/(?P<name>[a-z0-9-]{1,40})$", views.report),
    path("healthz", views.healthz),
]
