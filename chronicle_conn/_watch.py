"""``chronicle-conn watch``: a live view of one connection until Ctrl-C or SIGTERM.

A :class:`~chronicle_conn.Connection` that retries for ever reports every state change.
Three outputs: one plain line per change when stdout is not a terminal; one JSON object
per line with ``--json``; on a terminal, the changes as lines and below them a status
line updated in place (coloured unless ``NO_COLOR`` is set). A FAILED connection (TLS
or credentials refused) is re-armed every few seconds. SIGINT or SIGTERM closes the
connection, prints a summary and exits 0; bad input exits 2 with one line on stderr.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, TextIO

from ._check import ENV_VAR, EXIT_BAD_INPUT, _tls_mode
from ._log import Silent, brief
from .connection import Connection
from .connection_string import ConnectionString
from .errors import ChronicleConnError, ConfigurationError
from .states import ConnectionState, ConnectionStats, StateChange

__all__ = ["BASE_DELAY", "MAX_DELAY", "REARM_INTERVAL", "run_watch"]

_S = ConnectionState

#: The backoff of the watched connection, seconds: short, so the view stays live.
BASE_DELAY, MAX_DELAY = 0.5, 5.0
#: Seconds between re-arms of a FAILED connection (TLS or credentials refused).
REARM_INTERVAL = 5.0
#: Seconds between refreshes of the terminal's status line.
_TICK_TERMINAL = 0.25
#: Otherwise the main thread still wakes this often: a signal delivered to another
#: thread runs its Python handler only when the main thread next runs.
_TICK = 0.5

_COLOURS = {_S.CONNECTED: "32", _S.CONNECTING: "33", _S.RECONNECTING: "33", _S.FAILED: "31"}
_CLEAR_LINE = "\r\x1b[K"


def _iso(at: float) -> str:
    """``2026-11-28T04:12:03.123Z`` for a ``time.time()`` value."""
    stamp = datetime.fromtimestamp(at, timezone.utc)
    return f"{stamp:%Y-%m-%dT%H:%M:%S}.{stamp.microsecond // 1000:03d}Z"


def _span(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


class _Mailbox:
    """State changes (from the listener) and the stop request (from a signal handler)
    for the main thread to wait on.

    A Condition over an RLock: a signal handler runs on the main thread, possibly while
    that thread is inside this Condition, where a plain Lock (``threading.Event``'s)
    would deadlock.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.RLock())
        self._changes: deque[StateChange] = deque()
        self._stopped = False

    def post(self, change: StateChange) -> None:
        with self._cond:
            self._changes.append(change)
            self._cond.notify_all()

    def stop(self, *_: object) -> None:
        """Ask the watch to end (a signal handler: ``stop(signum, frame)``)."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    def wait(self, timeout: float) -> tuple[list[StateChange], bool]:
        """Wait at most ``timeout`` s for a change or the stop; return both, taken."""
        with self._cond:
            if not self._changes and not self._stopped:
                self._cond.wait(timeout)
            changes = list(self._changes)
            self._changes.clear()
            return changes, self._stopped


class _Tally:
    """Time connected, outages and the longest, from the state changes (wall clock).

    An outage is a CONNECTED -> not connected transition other than the final close; it
    lasts until the next CONNECTED (or, still going on, until the end).
    """

    def __init__(self, started: float) -> None:
        self.started = started
        self.connected_since: float | None = None
        self.down_since: float | None = None
        self.connected_total = 0.0
        self.outages = 0
        self.longest = 0.0

    def record(self, change: StateChange) -> None:
        if change.new is _S.CONNECTED:
            self.connected_since = change.at
            if self.down_since is not None:
                self.longest = max(self.longest, change.at - self.down_since)
                self.down_since = None
        elif change.old is _S.CONNECTED:
            if self.connected_since is not None:
                self.connected_total += change.at - self.connected_since
            self.connected_since = None
            if change.new is not _S.CLOSED:
                self.outages += 1
                self.down_since = change.at

    def summary(self, ended: float) -> dict[str, Any]:
        watched = max(0.0, ended - self.started)
        connected = self.connected_total
        if self.connected_since is not None:
            connected += ended - self.connected_since
        connected = min(max(0.0, connected), watched)
        longest = self.longest
        if self.down_since is not None:
            longest = max(longest, ended - self.down_since)
        return {
            "event": "summary",
            "time": _iso(ended),
            "watched_s": round(watched, 3),
            "connected_s": round(connected, 3),
            "connected_pct": round(100.0 * connected / watched, 1) if watched > 0 else 0.0,
            "outages": self.outages,
            "longest_outage_s": round(longest, 3),
        }


class _Output:
    """Text to a stream, flushed; when the reader has gone (a closed pipe) the watch
    stops and later writes are dropped."""

    def __init__(self, stream: TextIO, on_gone: Callable[[], None]) -> None:
        self._stream = stream
        self._on_gone = on_gone
        self.gone = False

    def write(self, text: str) -> None:
        if self.gone:
            return
        try:
            self._stream.write(text)
            self._stream.flush()
        except (OSError, ValueError):
            self.gone = True
            self._on_gone()
            # Keep the interpreter's last flush at exit from failing on the same pipe.
            with contextlib.suppress(OSError, ValueError):
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, self._stream.fileno())
                os.close(devnull)


class _Plain:
    """One line per state change, a first line saying what is watched, a summary; while
    down, a line when attempts failed since the last look (no state change says so)."""

    tick = _TICK

    def __init__(self, out: _Output) -> None:
        self.out = out
        self._failed_seen: int | None = None  # stats().failed_attempts at the last look
        self._failed_before = 0  # failed attempts before the current outage

    def start(self, info: dict[str, Any]) -> None:
        self.out.write(
            f"{info['time']} watching {info['target']} (TLS {info['tls']}; auth {info['auth']})\n"
        )

    def change(self, change: StateChange) -> None:
        self.out.write(f"{_iso(change.at)} {change}\n")

    def status(self, conn: Connection, tally: _Tally, rearm_in: float | None) -> None:
        """Report attempts that failed since the last look (only a terminal has a
        status line)."""
        stats = conn.stats()
        seen, self._failed_seen = self._failed_seen, stats.failed_attempts
        if stats.state not in (_S.CONNECTING, _S.RECONNECTING):
            self._failed_before = stats.failed_attempts
            return
        if seen is None or stats.failed_attempts <= seen:
            return
        self.attempts_failed(
            {
                "time": _iso(time.time()),
                "state": stats.state.value,
                "attempt": stats.failed_attempts - self._failed_before,
                "failed": stats.failed_attempts - seen,
                "next_delay": stats.current_delay,
                "error": brief(stats.last_error),
            }
        )

    def attempts_failed(self, info: dict[str, Any]) -> None:
        count = info["failed"]
        what = f"attempt {info['attempt']} failed"
        if count > 1:
            what = f"attempts {info['attempt'] - count + 1}-{info['attempt']} failed"
        delay = info["next_delay"]
        then = f", next in {delay:.1f} s" if delay is not None else ""
        self.out.write(f"{info['time']} {info['state']}: {what}{then}: {info['error']}\n")

    def summary(self, summary: dict[str, Any]) -> None:
        self.out.write(f"{summary['time']} {_summary_text(summary)}\n")


def _summary_text(s: dict[str, Any]) -> str:
    outages = s["outages"]
    return (
        f"summary: watched {s['watched_s']:.1f} s, connected {s['connected_s']:.1f} s "
        f"({s['connected_pct']:.1f}%), {outages} outage{'' if outages == 1 else 's'}, "
        f"longest outage {s['longest_outage_s']:.1f} s"
    )


class _Json(_Plain):
    """One JSON object per line: ``start``, each ``change``, the ``summary``."""

    def start(self, info: dict[str, Any]) -> None:
        self.out.write(json.dumps({"event": "start", **info}) + "\n")

    def change(self, change: StateChange) -> None:
        record = {
            "event": "change",
            "time": _iso(change.at),
            "old": change.old.value,
            "new": change.new.value,
            "attempt": change.attempt,
            "delay": change.delay,
            "error": change.error,
            "generation": change.generation,
        }
        self.out.write(json.dumps(record) + "\n")

    def attempts_failed(self, info: dict[str, Any]) -> None:
        self.out.write(json.dumps({"event": "attempts_failed", **info}) + "\n")

    def summary(self, summary: dict[str, Any]) -> None:
        self.out.write(json.dumps(summary) + "\n")


class _Terminal(_Plain):
    """Changes as permanent lines, below them a status line redrawn in place."""

    tick = _TICK_TERMINAL

    def __init__(self, out: _Output, colour: bool) -> None:
        super().__init__(out)
        self.colour = colour
        self._attempts: tuple[int, int] | None = None
        self._next_attempt: float | None = None  # time.time() of the next attempt

    def _paint(self, text: str, state: ConnectionState) -> str:
        code = _COLOURS.get(state)
        return f"\x1b[{code}m{text}\x1b[0m" if self.colour and code else text

    def start(self, info: dict[str, Any]) -> None:
        self.out.write(
            f"{info['time']} watching {info['target']} "
            f"(TLS {info['tls']}; auth {info['auth']}); Ctrl-C to stop\n"
        )

    def change(self, change: StateChange) -> None:
        self.out.write(f"{_CLEAR_LINE}{self._paint(f'{_iso(change.at)} {change}', change.new)}\n")

    def status(self, conn: Connection, tally: _Tally, rearm_in: float | None) -> None:
        stats = conn.stats()
        now = time.time()
        attempts = (stats.attempts, stats.failed_attempts)
        if attempts != self._attempts:  # an attempt began or failed since the last look
            self._attempts = attempts
            delay = stats.current_delay
            self._next_attempt = None if delay is None else now + delay
        if stats.state in (_S.CONNECTED, _S.FAILED, _S.IDLE):
            self._failed_before = stats.failed_attempts
        text = self._status_text(stats, tally, now, rearm_in)
        width = shutil.get_terminal_size((80, 24)).columns
        self.out.write(_CLEAR_LINE + self._paint(text[: max(10, width - 1)], stats.state))

    def _status_text(
        self, stats: ConnectionStats, tally: _Tally, now: float, rearm_in: float | None
    ) -> str:
        state = stats.state
        if state is _S.CONNECTED:
            up = now - (tally.connected_since or stats.since)
            text = f"connected for {_span(up)}"
            if stats.liveness == "keepalive":
                return f"{text}, keep-alives received: {stats.keepalives_received}"
            return f"{text} (liveness: {stats.liveness})"
        if state in (_S.CONNECTING, _S.RECONNECTING):
            down = now - (tally.down_since or stats.since)
            attempt = stats.failed_attempts - self._failed_before + 1
            text = f"{state.value} for {_span(down)}, attempt {attempt}"
            if stats.current_delay is not None and self._next_attempt is not None:
                text += f" in {max(0.0, self._next_attempt - now):.1f} s"
            else:
                text += " in progress"
            error = brief(stats.last_error)  # the cause, not grpc's 200 characters
            return f"{text}; last error: {error}" if error else text
        if state is _S.FAILED:
            again = f", trying again in {max(0.0, rearm_in):.0f} s" if rearm_in is not None else ""
            return f"failed{again}: {stats.last_error}"
        return str(state)

    def summary(self, summary: dict[str, Any]) -> None:
        self.out.write(f"{_CLEAR_LINE}{summary['time']} {_summary_text(summary)}\n")


def _rearm(conn: Connection) -> None:
    """Arm an IDLE or FAILED connection without waiting for it."""
    with contextlib.suppress(ChronicleConnError):  # ConnectTimeoutError: not yet, as meant
        conn.connect(timeout=0)


def run_watch(text: str | None, as_json: bool, out: TextIO = sys.stdout) -> int:
    """Watch the server ``text`` names (default: ``$CHRONICLE_CONNECTION_STRING``, else
    ``ConnectionString.default()``) until SIGINT or SIGTERM; return the exit code."""
    # An empty variable counts as unset; an empty argument is a bad string.
    source = text if text is not None else (os.environ.get(ENV_VAR) or None)
    try:
        cs = ConnectionString.parse(source) if source is not None else ConnectionString.default()
        conn = Connection(
            cs,
            retry_attempts=None,
            reconnect_base_delay=BASE_DELAY,
            reconnect_max_delay=MAX_DELAY,
            auto_connect=False,
            logger=Silent(),
            name=None,
        )
    except ConfigurationError as exc:
        print(f"chronicle-conn watch: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT

    mailbox = _Mailbox()
    output = _Output(out, mailbox.stop)
    view: _Plain
    if as_json:
        view = _Json(output)
    elif out.isatty():
        view = _Terminal(output, colour=not os.environ.get("NO_COLOR"))
    else:
        view = _Plain(output)

    previous: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():  # else signal.signal fails
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, mailbox.stop)
    try:
        _watch(conn, cs, view, mailbox)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0


def _watch(conn: Connection, cs: ConnectionString, view: _Plain, mailbox: _Mailbox) -> None:
    """Report until the mailbox is stopped; then close ``conn`` and print the summary."""
    started = time.time()
    tally = _Tally(started)
    try:
        view.start(
            {
                "time": _iso(started),
                "target": cs.redacted(),
                "tls": _tls_mode(cs),
                "auth": cs.authentication_mode.value,
            }
        )
        conn.add_listener(mailbox.post)
        _rearm(conn)
        rearm_at: float | None = None  # time.monotonic() of the next re-arm when FAILED
        while True:
            changes, stopped = mailbox.wait(view.tick)
            for change in changes:
                tally.record(change)
                view.change(change)
                if change.new is _S.FAILED:
                    rearm_at = time.monotonic() + REARM_INTERVAL
            if stopped:
                break
            if rearm_at is not None and time.monotonic() >= rearm_at:
                rearm_at = None
                if conn.state is _S.FAILED:
                    _rearm(conn)
            rearm_in = None if rearm_at is None else rearm_at - time.monotonic()
            view.status(conn, tally, rearm_in)
    finally:
        conn.close()  # the listener hears CLOSED on this thread, before close() returns
    changes, _ = mailbox.wait(0)
    for change in changes:
        tally.record(change)
        view.change(change)
    view.summary(tally.summary(time.time()))
