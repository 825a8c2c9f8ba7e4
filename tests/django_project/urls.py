"""URLs of the test Django project: a view doing a real RPC, and the health checks."""

from __future__ import annotations

from django.urls import path
from health_check.views import HealthCheckView

from . import views

urlpatterns = [
    path("version/", views.version, name="version"),
    path(
        "health/",
        HealthCheckView.as_view(checks=["chronicle_conn.contrib.django.health.Chronicle"]),
        name="health",
    ),
]
