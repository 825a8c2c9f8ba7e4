"""``connections``: one :class:`~chronicle_conn.Connection` per alias, per process.

Like ``django.db.connections``, but a connection is shared by every thread of the
process (a :class:`~chronicle_conn.Connection` is thread-safe), not one per thread.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Iterator, Mapping
from typing import Any

from django.conf import settings  # type: ignore[import-untyped, unused-ignore]
from django.core.exceptions import (  # type: ignore[import-untyped, unused-ignore]
    ImproperlyConfigured,
)
from django.core.signals import (  # type: ignore[import-untyped, unused-ignore]
    setting_changed,
)

from chronicle_conn import Connection

from . import _conf

__all__ = ["ConnectionHandler", "UnknownAliasError", "connections", "get_connection"]


class UnknownAliasError(ImproperlyConfigured):  # type: ignore[misc, unused-ignore]
    """No alias of that name in ``CHRONICLE_CONNECTIONS``.

    An ``ImproperlyConfigured``; the message lists the configured aliases.

    Attributes:
        alias: the alias asked for.
    """

    def __init__(self, message: str, *, alias: str) -> None:
        super().__init__(message)
        self.alias = alias


# Every handler, so that a fork can give each a fresh lock in the child.
_HANDLERS: weakref.WeakSet[ConnectionHandler] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # Only the forking thread survives in the child: a lock another thread of the parent
    # held at the fork would stay held for ever. The connections themselves reset on
    # their own (the library's fork hook): the child keeps the same objects.
    for handler in list(_HANDLERS):
        handler._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class ConnectionHandler:
    """The connections of ``CHRONICLE_CONNECTIONS``, each made on first use.

    ``handler[alias]`` builds the alias' :class:`~chronicle_conn.Connection` the first
    time it is asked for (never at import or at app-ready time) and returns that same
    object every time after, to every thread, until :meth:`close_all`. It does not
    block: the connection dials in the background (with ``auto_connect``, the
    default). Thread-safe: threads racing for a new alias get one connection, built
    once; a connection that exists is returned without taking a lock. After
    ``fork()`` the child keeps the same objects (each starts over on its own channel).

    Args:
        settings: the aliases, shaped like ``CHRONICLE_CONNECTIONS``; default: read
            ``settings.CHRONICLE_CONNECTIONS`` on first use (absent: ``{"default": {}}``).
    """

    def __init__(self, settings: Mapping[str, Any] | None = None) -> None:
        self._given = settings
        self._lock = threading.Lock()
        # --- guarded by _lock (read without it on the fast path of __getitem__) ---
        self._settings: dict[str, object] | None = None
        self._connections: dict[str, Connection] = {}
        _HANDLERS.add(self)

    @property
    def settings(self) -> dict[str, object]:
        """The aliases and their (unchecked) dicts, read once and cached.

        Raises:
            ImproperlyConfigured: the setting is not a dict (or Django's settings are
                not configured).
        """
        with self._lock:
            return dict(self._read_settings())

    def _read_settings(self) -> dict[str, object]:
        """The cached aliases, read now if needed. Lock held."""
        if self._settings is None:
            value = self._given
            if value is None:
                value = getattr(settings, _conf.SETTING, None)
            try:
                self._settings = _conf.aliases(value)
            except _conf.Invalid as exc:
                raise ImproperlyConfigured(exc.message) from None
        return self._settings

    def __getitem__(self, alias: str) -> Connection:
        """The alias' connection, built on first use. Non-blocking, thread-safe.

        Raises:
            UnknownAliasError: ``alias`` is not in the setting (an ``ImproperlyConfigured``).
            ImproperlyConfigured: the alias' settings are invalid (the message is the
                system check's; the library's ``ConfigurationError`` is chained).
        """
        conn = self._connections.get(alias)
        if conn is not None:
            return conn
        with self._lock:
            conn = self._connections.get(alias)
            if conn is not None:
                return conn
            aliases = self._read_settings()
            if alias not in aliases:
                known = ", ".join(repr(name) for name in aliases) or "none"
                raise UnknownAliasError(
                    f"no Chronicle connection alias {alias!r} in {_conf.SETTING} "
                    f"(configured: {known})",
                    alias=alias,
                )
            try:
                # Not slow: it validates and, with auto_connect, starts the
                # supervisor thread, which dials in the background.
                conn = _conf.build(_conf.parse_alias(alias, aliases[alias]))
            except _conf.Invalid as exc:
                raise ImproperlyConfigured(exc.message) from exc.__cause__
            self._connections[alias] = conn
            return conn

    def __contains__(self, alias: object) -> bool:
        """Whether ``alias`` is configured (its connection need not exist yet)."""
        return alias in self.settings

    def __iter__(self) -> Iterator[str]:
        """The configured aliases."""
        return iter(self.settings)

    def all(self, initialized_only: bool = False) -> list[Connection]:
        """The connections of every alias, in the setting's order.

        Args:
            initialized_only: only those already built; else build the missing ones.

        Raises:
            ImproperlyConfigured: as ``handler[alias]`` (not with ``initialized_only``).
        """
        if initialized_only:
            with self._lock:
                return list(self._connections.values())
        return [self[alias] for alias in self.settings]

    def close_all(self) -> None:
        """Close every connection built so far and forget them, and the settings.

        The next ``handler[alias]`` reads the settings again and builds a new
        connection. Blocks while each connection closes (bounded by its
        ``close_timeout``), outside the handler's lock. Thread-safe; a thread that
        fetched a connection just before may still hold the closed one.
        """
        with self._lock:
            closing = list(self._connections.values())
            self._connections.clear()
            self._settings = None
        for conn in closing:
            conn.close()

    def __repr__(self) -> str:
        with self._lock:
            built = sorted(self._connections)
        return f"<ConnectionHandler built={built!r}>"


#: The connections of ``settings.CHRONICLE_CONNECTIONS``.
connections = ConnectionHandler()


def get_connection(alias: str = _conf.DEFAULT_ALIAS) -> Connection:
    """Return the process' :class:`~chronicle_conn.Connection` for ``alias``.

    The same object on every call and in every thread, built on first use (see
    :class:`ConnectionHandler`). Non-blocking: it may still be connecting; call
    ``conn.connect(timeout)`` to wait, or build stubs on ``conn.managed_channel``.

    Raises:
        UnknownAliasError: ``alias`` is not in ``CHRONICLE_CONNECTIONS``.
        ImproperlyConfigured: the alias' settings are invalid (``manage.py check``
            reports the same problem).
    """
    return connections[alias]


def _on_setting_changed(*, setting: str, **kwargs: Any) -> None:
    # override_settings(CHRONICLE_CONNECTIONS=...) in tests: the next use reads the new
    # value and builds new connections (Django does the same for CACHES).
    if setting == _conf.SETTING:
        connections.close_all()


setting_changed.connect(_on_setting_changed, dispatch_uid="chronicle_conn.contrib.django")
