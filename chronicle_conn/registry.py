"""A process-wide registry of named connections (``Connection(name=...)``)."""

from __future__ import annotations

import os
import threading
import weakref
from typing import Any, Generic, Protocol, TypeVar

from .errors import DuplicateNameError, UnknownNameError

__all__ = ["ConnectionRegistry"]


class _Closeable(Protocol):
    def close(self) -> None: ...


Connection = TypeVar("Connection", bound=_Closeable)


class ConnectionRegistry(Generic[Connection]):
    """Named connections. Thread-safe; ``close_all()`` closes outside the lock.

    The package's default registry is ``chronicle_conn.registry``, where
    ``Connection(name=...)`` registers itself, and ``close()`` removes it. After
    ``fork()`` the child's registry works (a fresh lock) and holds the same names (each
    connection starts over in the child on its own channel).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._connections: dict[str, Connection] = {}  # guarded by _lock
        if hasattr(os, "register_at_fork"):
            ref = weakref.ref(self)
            os.register_at_fork(after_in_child=lambda: _renew_lock(ref))

    def add(self, name: str, conn: Connection) -> None:
        """Register ``conn`` as ``name``.

        Raises:
            DuplicateNameError: ``name`` is already taken.
        """
        with self._lock:
            if name in self._connections:
                raise DuplicateNameError(
                    f"a connection named {name!r} is already registered", name=name
                )
            self._connections[name] = conn

    def get(self, name: str) -> Connection:
        """Return the connection registered as ``name``.

        Raises:
            UnknownNameError: nothing is registered under ``name``.
        """
        with self._lock:
            conn = self._connections.get(name)
            known = sorted(self._connections)
        if conn is None:
            raise UnknownNameError(
                f"no connection named {name!r} (registered: {', '.join(known) or 'none'})",
                name=name,
            )
        return conn

    def remove(self, name: str) -> Connection:
        """Unregister ``name`` (without closing it) and return the connection.

        Raises:
            UnknownNameError: nothing is registered under ``name``.
        """
        with self._lock:
            conn = self._connections.pop(name, None)
        if conn is None:
            raise UnknownNameError(f"no connection named {name!r}", name=name)
        return conn

    def _discard(self, name: str, conn: Connection) -> None:
        with self._lock:
            if self._connections.get(name) is conn:
                del self._connections[name]

    def names(self) -> list[str]:
        """The registered names, sorted."""
        with self._lock:
            return sorted(self._connections)

    def close_all(self) -> None:
        """Close and unregister every connection (each ``close()`` runs off the lock)."""
        with self._lock:
            connections = list(self._connections.values())
            self._connections.clear()
        for conn in connections:
            conn.close()

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._connections

    def __len__(self) -> int:
        with self._lock:
            return len(self._connections)


def _renew_lock(ref: weakref.ReferenceType[ConnectionRegistry[Any]]) -> None:
    """In a forked child: a lock another thread of the parent held would stay held."""
    registry = ref()
    if registry is not None:
        registry._lock = threading.Lock()
