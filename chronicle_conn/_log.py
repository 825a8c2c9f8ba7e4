"""The library's logger: events that follow the application's logging, and can never
take a thread down with them.

A library is quiet unless its application asks. Each event goes
to structlog when the application configured structlog (checked at each event, so a
configuration made after the connection counts), else to the standard ``logging``
logger of the same name (``chronicle_conn``, ``chronicle_conn.devserver``) as one line,
``event key=value ...``: Python's default WARNING threshold, ``logging.basicConfig``
and the application's handlers apply, and nothing is ever printed to stdout by
structlog's unconfigured default.

structlog is imported when the first connection is built (on its constructing thread, see
``_schedule``), not with the package: it costs about as much as the rest of the package.
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Any

__all__ = [
    "FailureStreak",
    "QuietLog",
    "Router",
    "Silent",
    "brief",
    "connection_log",
    "load",
    "module_log",
    "swallow",
]

# The logging HOWTO's advice for libraries: without a handler of the application's,
# events are dropped, not printed by logging's last-resort handler.
logging.getLogger("chronicle_conn").addHandler(logging.NullHandler())

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "exception": logging.ERROR,
}

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


def _text(value: Any) -> str:
    text = str(value)
    return text if text and " " not in text and "=" not in text else repr(text)


class Router:
    """A structlog-style logger (``debug`` ... ``exception``, ``bind``) that sends each
    event to structlog if the application configured it, else to standard ``logging``
    (see the module docstring). ``context`` is bound to every event."""

    __slots__ = ("_context", "_name", "_stdlib")

    def __init__(self, name: str, context: dict[str, Any] | None = None) -> None:
        self._name = name
        self._context = dict(context or {})
        self._stdlib = logging.getLogger(name)

    def bind(self, **context: Any) -> Router:
        return Router(self._name, {**self._context, **context})

    def _emit(self, method: str, event: str, fields: dict[str, Any]) -> None:
        structlog = _structlog
        if structlog is not None and structlog.is_configured():
            # A fresh proxy each time: binding once would freeze the configuration.
            getattr(structlog.get_logger(self._name, **self._context), method)(event, **fields)
            return
        level = _LEVELS[method]
        if not self._stdlib.isEnabledFor(level):
            return
        pairs = {**self._context, **fields}
        message = " ".join([event, *(f"{k}={_text(v)}" for k, v in pairs.items())])
        self._stdlib.log(
            level, "%s", message, exc_info=method == "exception", extra={"chronicle": pairs}
        )

    def debug(self, event: str, **fields: Any) -> None:
        self._emit("debug", event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._emit("info", event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._emit("warning", event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._emit("error", event, fields)

    def exception(self, event: str, **fields: Any) -> None:
        self._emit("exception", event, fields)


def connection_log(logger: Any, **context: Any) -> QuietLog:
    """The logger of one connection, bound with ``context``: the application's own
    ``logger`` if it gave one, else a :class:`Router` for ``chronicle_conn``."""
    if logger is not None:
        return QuietLog(logger.bind(**context))
    return QuietLog(Router("chronicle_conn", context))


class Silent:
    """A structlog-style logger that drops everything (``logger=Silent()``: a dry run,
    a command that reports by itself)."""

    def bind(self, **context: Any) -> Silent:
        return self

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


def module_log() -> QuietLog:
    """A logger for events that belong to no one connection (callbacks of calls and
    subscriptions)."""
    return QuietLog(Router("chronicle_conn"))


#: What a long grpc error comes down to, most telling first: (words in it, short form).
_CAUSES = (
    ("connection refused", "connection refused"),
    ("connection reset", "connection reset"),
    ("dns resolution failed", "name not resolved"),
    ("errors resolving", "name not resolved"),
    ("address lookup failed", "name not resolved"),
    ("domain name not found", "name not resolved"),
    ("name or service not known", "name not resolved"),
    ("no route to host", "no route to host"),
    ("network is unreachable", "network unreachable"),
    ("goaway", "server going away (GOAWAY)"),
    ("handshake failed", "TLS handshake failed"),
    ("deadline exceeded", "timed out"),
    ("timed out", "timed out"),
    ("socket closed", "socket closed"),
    ("broken pipe", "broken pipe"),
    ("cancelling all calls", "channel closed"),
)

#: A gRPC status code name followed by its message: ``UNAVAILABLE: ...``.
_STATUS = re.compile(r"\b[A-Z][A-Z_]{3,}: ")

#: Errors up to this long are kept whole.
_SHORT = 100


def brief(text: str | None) -> str | None:
    """A long error in a few words, for INFO and WARNING events: what failed (the words
    before the first status code, ``keep-alive answer: ``) and the cause grpc names
    (``connection refused``). Short errors, our own sentences among them (a TLS
    diagnosis says what to change), are kept whole; ``stats().last_error`` and DEBUG
    events keep every error whole."""
    if text is None or len(text) <= _SHORT:
        return text
    found = _STATUS.search(text)
    what = text[: found.start()] if found else ""
    if len(what) > _SHORT:
        return text[: _SHORT - 1] + "\u2026"
    rest = text[len(what) :].lower()
    for words, short in _CAUSES:
        if words in rest:
            return what + short
    first = text[len(what) :].split("; ", 1)[0]
    if len(what) + len(first) > _SHORT:
        first = first[: max(20, _SHORT - len(what)) - 1] + "\u2026"
    return what + first


class FailureStreak:
    """Failed attempts in a row, summarised: one summary when ``first_after`` seconds
    have passed since the first, then after twice as long each time, up to every
    ``longest`` seconds, so a long outage is a bounded number of lines (``12 attempts
    failed the same way in 30 s: connection refused``). Each summary counts the
    failures since the previous one (the first: since the streak began)."""

    def __init__(self, first_after: float = 30.0, longest: float = 600.0) -> None:
        self._first_after = first_after
        self._longest = longest
        self.reset()

    def reset(self) -> None:
        self.total = 0
        self._window_start: float | None = None
        self._interval = self._first_after
        self._count = 0
        self._kinds: set[str] = set()

    def failed(self, now: float, error: str) -> dict[str, Any] | None:
        """Count one failure (``error`` already short); return a summary when one is due."""
        self.total += 1
        if self._window_start is None:
            self._window_start = now
        self._count += 1
        self._kinds.add(error)
        span = now - self._window_start
        if span < self._interval:
            return None
        count, kinds = self._count, len(self._kinds)
        if kinds == 1:
            text = f"{count} attempts failed the same way in {span:.0f} s: {error}"
        else:
            text = f"{count} attempts failed in {span:.0f} s, {kinds} different ways; last: {error}"
        summary = {
            "summary": text,
            "attempts": count,
            "seconds": round(span, 1),
            "error": error,
        }
        self._window_start = now
        self._interval = min(self._interval * 2, self._longest)
        self._count = 0
        self._kinds = set()
        return summary
