"""The Django app: ``INSTALLED_APPS += ["chronicle_conn.contrib.django"]``."""

from __future__ import annotations

from django.apps import AppConfig  # type: ignore[import-untyped, unused-ignore]
from django.core import checks  # type: ignore[import-untyped, unused-ignore]

from .checks import TAG, check_connections

__all__ = ["ChronicleConnConfig"]


class ChronicleConnConfig(AppConfig):  # type: ignore[misc, unused-ignore]
    """Registers the system checks of ``CHRONICLE_CONNECTIONS``.

    Builds no connection: each is made on first ``get_connection()``.
    """

    name = "chronicle_conn.contrib.django"
    label = "chronicle_conn"
    verbose_name = "Chronicle connections"

    def ready(self) -> None:
        checks.register(check_connections, TAG)
