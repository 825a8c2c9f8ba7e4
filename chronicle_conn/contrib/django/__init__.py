"""Django integration: one shared :class:`~chronicle_conn.Connection` per alias, per process.

::

    # settings.py
    INSTALLED_APPS = [..., "chronicle_conn.contrib.django"]
    CHRONICLE_CONNECTIONS = {
        "default": {
            "CONNECTION_STRING": os.environ["CHRONICLE_URL"],  # chronicle://host:35000...
            "OPTIONS": {"retry_attempts": None},  # any Connection(...) keyword option
        },
    }

    # anywhere
    from chronicle_conn.contrib.django import get_connection

    def my_view(request):
        conn = get_connection()              # the process' connection for "default"
        conn.connect(timeout=2)              # wait briefly if it is (re)connecting
        reply = MyServiceStub(conn.channel()).DoThing(request_pb, timeout=5)

The setting is shaped like ``DATABASES``: each alias has ``CONNECTION_STRING`` (a str
or a :class:`~chronicle_conn.ConnectionString`; absent or None:
``ConnectionString.default()``) and ``OPTIONS`` (the keyword options of
``Connection(...)``: ``retry_attempts``, ``liveness``, ``grpc_options``, ``name``...).
No setting at all means ``{"default": {}}``: ``chronicle://localhost:35000`` with TLS.

- :func:`get_connection` (and ``connections[alias]``) builds the alias' connection on
  first use, never at import or start-up, and returns that same object afterwards to
  every thread. It never blocks and never fails because the kernel is down: the
  connection dials in the background, and behaves as documented for
  :class:`~chronicle_conn.Connection` (``conn.channel()`` raises
  :class:`~chronicle_conn.NotConnectedError` while not connected; fail-fast calls on
  ``conn.managed_channel`` fail with ``UNAVAILABLE``; ``wait_for_ready`` calls wait
  within their deadline). An alias that is not configured raises
  :class:`UnknownAliasError`, an invalid one ``ImproperlyConfigured`` (both
  ``django.core.exceptions.ImproperlyConfigured``).
- ``manage.py check`` validates every alias as ``Connection(...)`` would, without
  connecting (check ids ``chronicle_conn.E001`` to ``E007``, see
  :mod:`~chronicle_conn.contrib.django.checks`).
- Under gunicorn or uWSGI each worker process gets its own connection on its first
  request (a connection made before ``fork()``, with ``--preload``, starts over in the
  child on its own channel).
- ``override_settings(CHRONICLE_CONNECTIONS=...)`` closes the connections built so far;
  the next use builds them from the new value. ``connections.close_all()`` does the same
  on demand (in a gunicorn ``worker_exit`` hook, say).
- :mod:`chronicle_conn.contrib.django.health` is a django-health-check (>= 4) check.
"""

from __future__ import annotations

from ._conf import DEFAULT_ALIAS, SETTING
from .handler import ConnectionHandler, UnknownAliasError, connections, get_connection

__all__ = [
    "DEFAULT_ALIAS",
    "SETTING",
    "ConnectionHandler",
    "UnknownAliasError",
    "connections",
    "get_connection",
]
