"""``Connection.call``: run ``fn(channel)`` within one deadline, waiting for the connection
and retrying only what certainly never reached a server.

Each attempt waits for CONNECTED with what is left of the budget (``conn.connect``), then
runs ``fn(conn.channel())``: the channel is fetched again for every attempt. An outage is
ridden out by the wait, not by retries; retries are spent only on attempts that failed.
A retry runs ``fn`` again from its start: make one call in it (what it did before the
failing call is done again), and give that call its own ``timeout``, shorter than the
budget (the budget bounds the waits and the pauses, not a call already made).

What is retried (at most ``retries`` times, after a short jittered pause: 25-50 ms,
doubling up to 0.5-1 s; when the next pause would reach the deadline, the error is
raised at once instead):

- :class:`~chronicle_conn.NotConnectedError` (not its subclass
  :class:`~chronicle_conn.ConnectionClosedError`): ``conn.channel()`` found the connection
  down, so there was no channel to send on;
- a :class:`~chronicle_conn.CallError` with ``UNAVAILABLE`` that finished without being
  sent: the library's own fail-fast answer while not connected (or a ``wait_for_ready``
  call whose connection gave up, or one whose channel closed before it could start);
- grpc's own ``UNAVAILABLE`` whose details begin with ``failed to connect to all
  addresses`` (pick_first) or ``connections to all backends failing`` (round_robin):
  grpc's load balancer failed the call because no connection could be made, so it was
  never written to any transport. That happens in the moment between a server's death
  and the connection noticing it. ``Connection refused``, ``Socket closed``, ``Stream
  removed``, ``Connection reset by peer``, ``GOAWAY received``, a keep-alive timeout and
  the like are *not* taken as proof: they also end calls that were already sent;
- with ``idempotent=True`` only: any ``UNAVAILABLE``. A call in flight when a server
  dies ends ``UNAVAILABLE`` even though the server may have run it (in full, or its side
  effects without the answer); retrying it is safe only if running it twice is.

Never retried: ``DEADLINE_EXCEEDED`` (the call's own deadline passed: the server may be
running it still), ``CANCELLED`` (the connection was closed, or the application cancelled
it), every other status (``UNAUTHENTICATED``, ``INVALID_ARGUMENT``, ``INTERNAL``... retrying
does not help), :class:`~chronicle_conn.ConnectionClosedError`, and anything else ``fn``
raises. When an error is not retried, or retries or time run out, the error ``fn`` raised
propagates unchanged (the same object), so the caller's ``except`` clauses keep working.

While waiting for the connection: the deadline passing raises
:class:`~chronicle_conn.ConnectTimeoutError` (one line: ``call gave up after N attempts
within Ts``, how the last attempt failed if one did, and why it is not connected). What
else ``connect()`` raises propagates at once, never retried:
:class:`~chronicle_conn.RetriesExhaustedError` (a bounded ``retry_attempts`` budget ran
out during the wait), :class:`~chronicle_conn.TlsError` and
:class:`~chronicle_conn.AuthenticationError` (refused: FAILED after one attempt),
:class:`~chronicle_conn.ConnectionClosedError`.

One limit of the details rule: grpc gives a client a status from a server exactly as it
gives one it made itself, so a server that forwards a downstream's failure verbatim
(``context.abort(error.code(), error.details())``) after doing some work would be taken
for a call that never left. The dev kernel does not forward statuses; behind a server
that may, use ``Connection.call`` only for calls that are safe to repeat. A channel
whose service config has a grpc ``retryPolicy`` retries on its own, before this module
sees anything.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, TypeVar

import grpc

from ._calls import CallError
from .errors import (
    ConfigurationError,
    ConnectionClosedError,
    ConnectTimeoutError,
    NotConnectedError,
)

if TYPE_CHECKING:
    from .connection import Connection
    from .managed_channel import ManagedChannel

__all__ = ["NEVER_SENT_DETAILS", "retryable", "run"]

_T = TypeVar("_T")

#: How grpc's load balancers fail a call they could not route because no connection to
#: any address could be made (pick_first, round_robin). Such a call never reached a
#: transport. Matched at the start of ``details()``, with ``UNAVAILABLE`` only.
NEVER_SENT_DETAILS = (
    "failed to connect to all addresses",
    "connections to all backends failing",
)

#: The pause before a retry: the first one, the growth factor and the cap (seconds).
_FIRST_PAUSE = 0.05
_GROWTH = 2.0
_MAX_PAUSE = 1.0

_UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


def run(
    conn: Connection,
    fn: Callable[[ManagedChannel], _T],
    *,
    timeout: float,
    retries: int,
    idempotent: bool,
) -> _T:
    """Run ``fn(channel)`` within ``timeout`` seconds; see the module docstring.

    Raises:
        ConfigurationError: ``timeout`` is not a finite number > 0, ``retries`` not an
            int >= 0, or ``idempotent`` not a bool.
        ConnectTimeoutError: not connected in time for an attempt.
        RetriesExhaustedError, TlsError, AuthenticationError, ConnectionClosedError:
            from ``connect()``, at once.
        whatever ``fn`` raised last, unchanged: not retryable, or retries or time ran out.
    """
    seconds = _budget(timeout)
    allowed = _retries(retries)
    if not isinstance(idempotent, bool):
        raise ConfigurationError(
            f"idempotent must be a bool, got {idempotent!r}", option="idempotent"
        )
    if not callable(fn):
        raise TypeError(f"fn must be callable with the channel, not {type(fn).__name__}")
    clock = time.monotonic
    deadline = clock() + seconds
    pauses = _pauses()
    attempt = 0
    last: str | None = None  # how the last failed attempt failed
    while True:
        attempt += 1
        try:
            conn.connect(timeout=max(0.0, deadline - clock()))
        except ConnectTimeoutError as exc:
            raise ConnectTimeoutError(_gave_up(attempt, seconds, last, exc)) from exc
        try:
            return fn(conn.channel())
        except Exception as exc:
            if attempt > allowed or not retryable(exc, idempotent=idempotent):
                raise
            pause = next(pauses)
            if deadline - clock() <= pause:
                raise  # no time for another attempt: the caller gets this error
            last = _describe(exc)
        # Outside the handler: the error is not kept alive (nor chained) while we wait.
        # The caller's own thread: a bounded sleep is all the waiting there is to do.
        time.sleep(pause)


def retryable(error: BaseException, *, idempotent: bool) -> bool:
    """Whether ``run`` retries ``error`` (raised by ``fn`` or by ``conn.channel()``)."""
    if isinstance(error, ConnectionClosedError):
        return False  # closed for good
    if isinstance(error, NotConnectedError):
        return True  # no channel: nothing was sent
    if isinstance(error, CallError):
        if not _settled(error):
            return False  # still waiting for the connection: not a failure (yet)
        if _never_sent(error):
            return _code(error) is _UNAVAILABLE
        # Sent once the connection was up: its outcome is the real call's, judged below.
    if not isinstance(error, grpc.RpcError) or _code(error) is not _UNAVAILABLE:
        return False
    if idempotent:
        return True
    details = _details(error)
    return details.startswith(NEVER_SENT_DETAILS)


def _settled(error: CallError) -> bool:
    """Whether a :class:`CallError` has an outcome: ``code()`` on a pending one would block
    until it has one."""
    try:
        return bool(error.done())
    except Exception:
        return False


def _never_sent(error: CallError) -> bool:
    """Whether a settled :class:`CallError` finished without being sent. One that was
    sent (a ``wait_for_ready`` future or stream that the connection sent once it was up,
    then raised by the application) reports the real call's outcome through the same
    object, and is judged as grpc's own error."""
    return not error.sent


def _code(error: BaseException) -> grpc.StatusCode | None:
    code = getattr(error, "code", None)
    if not callable(code):
        return None
    try:
        value = code()
    except Exception:
        return None
    return value if isinstance(value, grpc.StatusCode) else None


def _details(error: BaseException) -> str:
    details = getattr(error, "details", None)
    if not callable(details):
        return ""
    try:
        value = details()
    except Exception:
        return ""
    return value if isinstance(value, str) else ""


def _pauses() -> Iterator[float]:
    """50 ms, 100 ms, 200 ms ... up to 1 s, each drawn from its upper half (jitter that
    keeps a floor: never a busy loop)."""
    ceiling = _FIRST_PAUSE
    while True:
        yield random.uniform(ceiling / 2, ceiling)
        ceiling = min(_MAX_PAUSE, ceiling * _GROWTH)


def _describe(error: BaseException) -> str:
    code = _code(error)
    return code.name if code is not None else type(error).__name__


def _gave_up(attempt: int, seconds: float, last: str | None, cause: ConnectTimeoutError) -> str:
    """One line: how many attempts, the budget, the last call failure, why not connected."""
    attempts = f"{attempt} attempt{'' if attempt == 1 else 's'}"
    failed = "" if last is None else f"; the last failed with {last}"
    reason = " ".join(str(cause).split())
    return f"call gave up after {attempts} within {seconds:g}s{failed}: {reason}"


def _budget(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigurationError(
            f"timeout must be a number of seconds, not {type(value).__name__}", option="timeout"
        )
    if not math.isfinite(value) or value <= 0:
        raise ConfigurationError(
            f"timeout must be a finite number of seconds > 0, got {value!r}", option="timeout"
        )
    return float(value)


def _retries(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigurationError(f"retries must be an int >= 0, got {value!r}", option="retries")
    return value
