"""Connection states, the table of allowed transitions, and the values that report them."""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = [
    "ALLOWED_TRANSITIONS",
    "ConnectionState",
    "ConnectionStats",
    "StateChange",
    "is_allowed",
]


class ConnectionState(enum.Enum):
    """The life cycle of a :class:`~chronicle_conn.Connection`.

    ``IDLE``: created with ``auto_connect=False``, or in a child after ``fork()``.
    ``CONNECTING``: the first attempts of a budget. ``CONNECTED``: a channel is ready.
    ``RECONNECTING``: the connection was lost and the supervisor is dialing again
    (``reconnect()`` replaces a channel without leaving CONNECTED). ``FAILED``: a
    bounded retry budget ran out; the next ``connect()``, call or ``channel()`` re-arms
    it. ``CLOSED``: terminal.
    """

    IDLE = "idle"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    FAILED = "failed"
    CLOSED = "closed"

    def __str__(self) -> str:
        return self.value


_S = ConnectionState

#: Every transition the supervisor may make. ``X -> IDLE`` happens only in a child
#: process after ``fork()``; ``X -> CLOSED`` only through ``close()``.
ALLOWED_TRANSITIONS: dict[ConnectionState, frozenset[ConnectionState]] = {
    _S.IDLE: frozenset({_S.CONNECTING, _S.CLOSED}),
    _S.CONNECTING: frozenset({_S.CONNECTED, _S.FAILED, _S.IDLE, _S.CLOSED}),
    _S.CONNECTED: frozenset({_S.RECONNECTING, _S.IDLE, _S.CLOSED}),
    _S.RECONNECTING: frozenset({_S.CONNECTED, _S.FAILED, _S.IDLE, _S.CLOSED}),
    _S.FAILED: frozenset({_S.CONNECTING, _S.IDLE, _S.CLOSED}),
    _S.CLOSED: frozenset(),
}


def is_allowed(old: ConnectionState, new: ConnectionState) -> bool:
    """Return whether ``old -> new`` is in :data:`ALLOWED_TRANSITIONS`."""
    return new in ALLOWED_TRANSITIONS[old]


@dataclass(frozen=True)
class StateChange:
    """One transition, as delivered to listeners.

    Attributes:
        old: the state before.
        new: the state after.
        at: ``time.time()`` of the transition (wall clock, for display and logs).
        attempt: the attempt number within the current budget (0 when not dialing).
        delay: the delay in seconds before the next attempt, when one is scheduled.
        error: a short, redacted description of the cause, if any.
        generation: the channel generation current after the transition.
        outage: on a transition to CONNECTED after the connection was lost, how long
            it was down, in seconds (None otherwise, the first connect included).
    """

    old: ConnectionState
    new: ConnectionState
    at: float
    attempt: int = 0
    delay: float | None = None
    error: str | None = None
    generation: int = 0
    outage: float | None = None

    def __str__(self) -> str:
        """``connected -> reconnecting (attempt 3, next in 2.0 s): reason``."""
        details = []
        if self.attempt:
            details.append(f"attempt {self.attempt}")
        if self.delay is not None:
            details.append(f"next in {self.delay:.1f} s")
        if self.outage is not None:
            details.append(f"down {self.outage:.1f} s")
        text = f"{self.old.value} -> {self.new.value}"
        if details:
            text += f" ({', '.join(details)})"
        return f"{text}: {self.error}" if self.error else text


@dataclass(frozen=True)
class ConnectionStats:
    """A consistent snapshot of a connection's counters (see ``Connection.stats()``).

    Nothing in it is secret: the target and the last error are redacted. Each sign of
    life is counted under its own name: ``keepalives_received`` (the Chronicle kernel's
    keep-alives, ``keepalive`` liveness), ``health_updates_received`` (SERVING messages
    on a ``grpc.health.v1`` Watch stream, ``health`` liveness) and ``probes_answered``
    (the periodic probes that look for a silent partition, in every mode).

    What the channel dials (filled in by ``Connection.stats()``): ``addresses`` as
    resolved at the current channel's build (without one, at the latest attempt's; a
    single name is shown as it is, since gRPC resolves it itself),
    ``load_balancer`` and ``backends_ready``, how many backends have a ready transport
    (from gRPC's channelz; None when it cannot tell, as when the process has several
    channels to the same target).
    """

    name: str | None
    target: str
    state: ConnectionState
    since: float
    connects: int
    disconnects: int
    attempts: int
    failed_attempts: int
    last_error: str | None
    current_delay: float | None
    keepalives_received: int
    generation: int
    liveness: str
    waiters: int
    health_updates_received: int = 0
    probes_answered: int = 0
    addresses: tuple[str, ...] = ()
    load_balancer: str = "pick-first"
    backends_ready: int | None = None
