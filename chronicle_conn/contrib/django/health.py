"""A django-health-check (4.x) check of a ``CHRONICLE_CONNECTIONS`` alias.

Needs ``django-health-check >= 4`` (``pip install django-health-check``); nothing else
in ``chronicle_conn.contrib.django`` imports this module. django-health-check 4 runs
the checks a view is given, so list it in your URLconf::

    from health_check.views import HealthCheckView

    urlpatterns = [
        path(
            "health/",
            HealthCheckView.as_view(
                checks=[
                    "health_check.checks.Database",
                    "chronicle_conn.contrib.django.health.Chronicle",
                    # another alias, or a longer wait:
                    ("chronicle_conn.contrib.django.health.Chronicle", {"alias": "audit"}),
                ]
            ),
        ),
    ]

(``"health_check"`` in ``INSTALLED_APPS`` gives the HTML page; JSON, text and
OpenMetrics, e.g. ``/health/?format=json``, work without it.)
"""

from __future__ import annotations

import dataclasses
import datetime

from django.core.exceptions import (  # type: ignore[import-untyped, unused-ignore]
    ImproperlyConfigured,
)

from chronicle_conn import (
    ConnectionClosedError,
    ConnectTimeoutError,
    NotConnectedError,
    RetriesExhaustedError,
)

from ._conf import DEFAULT_ALIAS
from .handler import connections

try:
    from health_check.base import HealthCheck  # type: ignore[import-untyped, unused-ignore]
    from health_check.exceptions import (  # type: ignore[import-untyped, unused-ignore]
        ServiceUnavailable,
    )
except ImportError as exc:  # pragma: no cover - depends on what is installed
    raise ImportError(
        "chronicle_conn.contrib.django.health needs django-health-check >= 4 "
        "(pip install 'django-health-check>=4')"
    ) from exc

__all__ = ["Chronicle"]


@dataclasses.dataclass
class Chronicle(HealthCheck):  # type: ignore[misc, unused-ignore]
    """Up when the alias' connection is CONNECTED; else down, with the state and why.

    A connection that is not connected yet (the first probe after start-up, a
    reconnect in progress) gets ``wait`` (1 s) to connect: the probe counts as demand,
    so the supervisor dials at once (and a FAILED connection gets a fresh retry
    budget). So a probe takes at most about ``wait``. The report is
    ``Unavailable: not connected after 1 s: state reconnecting; last error: ...``: the
    state and the library's redacted reason, never a secret. It sends no RPC: the
    connection's own liveness (the kernel's keep-alives, or health) says whether the
    server is there.

    Args:
        alias: the ``CHRONICLE_CONNECTIONS`` alias.
        wait: how long to wait for a connection that is not connected (keep it under
            the check's ``timeout``, 5 s).
    """

    alias: str = DEFAULT_ALIAS
    wait: datetime.timedelta = dataclasses.field(default=datetime.timedelta(seconds=1), repr=False)

    def run(self) -> None:
        """Raise ``ServiceUnavailable`` unless connected (within ``wait``). Blocking."""
        try:
            conn = connections[self.alias]
        except ImproperlyConfigured as exc:
            # The message names the alias and the key at fault, and no secret.
            raise ServiceUnavailable(f"not configured: {exc}") from exc
        if conn.connected:
            return
        try:
            conn.connect(timeout=self.wait.total_seconds())
        except ConnectionClosedError as exc:
            raise ServiceUnavailable("the connection is closed") from exc
        except (ConnectTimeoutError, RetriesExhaustedError, NotConnectedError) as exc:
            stats = conn.stats()
            waited = f"not connected after {self.wait.total_seconds():g} s"
            raise ServiceUnavailable(
                f"{waited}: state {stats.state.value}; last error: {stats.last_error}"
            ) from exc
