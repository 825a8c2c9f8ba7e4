"""The library's logger: structlog events that can never take a thread down with them.

structlog is imported when the first connection is built (on its constructing thread, see
``_schedule``), not with the package: it costs about as much as the rest of the package.
"""

from __future__ import annotations

import threading
from typing import Any

__all__ = ["QuietLog", "connection_log", "load", "module_log", "swallow"]

_structlog: Any = None


def load() -> Any:
    """Import structlog (once). Call it on a constructing thread, not in a background one."""
    global _structlog
    if _structlog is None:
        import structlog  # noqa: PLC0415 - deliberately deferred, see the module docstring

        _structlog = structlog
    return _structlog


def swallow(exc: BaseException) -> None:
    """Decide whether ``exc``, raised by user code (a listener, a callback, a log sink)
    on one of the library's threads, may be swallowed (after logging it).

    Everything may, even ``SystemExit``: such an exception in a background thread would
    only end that thread, and with it the connection's supervision. Only a
    ``KeyboardInterrupt`` on the main thread is re-raised: that is the user's Ctrl-C.
    """
    if isinstance(exc, KeyboardInterrupt) and threading.current_thread() is threading.main_thread():
        raise exc


class QuietLog:
    """A structlog logger whose calls never raise: a broken log sink (a closed stdout,
    a handler that raises) must not break the thread that logs."""

    __slots__ = ("_logger",)

    def __init__(self, logger: Any) -> None:
        self._logger = logger

    def _emit(self, method: str, event: str, **fields: Any) -> None:
        try:
            getattr(self._logger, method)(event, **fields)
        except BaseException as exc:  # nowhere left to report it
            swallow(exc)

    def debug(self, event: str, **fields: Any) -> None:
        self._emit("debug", event, **fields)

    def info(self, event: str, **fields: Any) -> None:
        self._emit("info", event, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._emit("warning", event, **fields)

    def error(self, event: str, **fields: Any) -> None:
        self._emit("error", event, **fields)

    def exception(self, event: str, **fields: Any) -> None:
        self._emit("exception", event, **fields)


def connection_log(logger: Any, **context: Any) -> QuietLog:
    """The logger of one connection, bound with ``context``.

    Not ``get_logger(...).bind(...)`` for the default logger: binding finalizes
    structlog's lazy proxy with the configuration of that moment, and applications
    often configure structlog only after creating their connection at import time.
    """
    if logger is not None:
        return QuietLog(logger.bind(**context))
    return QuietLog(load().get_logger("chronicle_conn", **context))


class _Silent:
    """Stands in for structlog before anything loaded it (nothing to log then)."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


def module_log() -> QuietLog:
    """A logger for events that belong to no one connection (callbacks of calls and
    subscriptions, which exist only once a connection was built, and so structlog
    loaded)."""
    structlog = _structlog
    return QuietLog(_Silent() if structlog is None else structlog.get_logger("chronicle_conn"))
