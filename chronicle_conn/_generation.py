"""One channel generation: an underlying ``grpc.Channel`` and the calls in flight on it.

A generation is made by one successful attempt and serves calls until it is replaced
(``reconnect()``, ``max_channel_age``) or lost. From then on it is *retired*: it takes no
new call, and it is closed once the calls already in flight on it have finished (or at a
cap). So the library never cuts a call short by swapping channels, and never sends a call
on a channel it has closed.

Every call the managed channel makes goes through :meth:`Generation.enter` before it is
issued and :meth:`Generation.leave` when it has finished. Both take this generation's
own small lock; only the last ``leave`` of a retired generation also calls the owner
(which takes the connection's lock, after this one is released). Nothing here knows the
connection it belongs to: the owner passes in what to call when the generation drains
or looks unhealthy.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import grpc

__all__ = ["Generation", "park"]

#: Codes that, coming back from a call on a generation believed healthy, make the
#: transport suspect: the supervisor then checks it with a probe.
_SUSPECT_CODES = frozenset({grpc.StatusCode.UNAVAILABLE})


class Generation:
    """One underlying channel, what watches it, and its calls in flight.

    Thread-safe. ``enter``/``leave`` are on every call's path: a lock and an integer.

    Args:
        number: 1 for the first generation of a connection, then 2, 3...
        channel: the underlying channel (owned: the supervisor closes it).
        monitor: the liveness monitor watching it (see ``_liveness``).
        on_drained: called (on whatever thread finished the last call) when a retired
            generation's last call in flight finishes.
        on_suspect: ``on_suspect(generation, reason)``: a call came back with a code that
            suggests the transport is gone (called outside this generation's lock).
    """

    __slots__ = (
        "__weakref__",
        "_accepting",
        "_closed",
        "_in_flight",
        "_lock",
        "_on_drained",
        "_on_suspect",
        "_waiting",
        "channel",
        "monitor",
        "number",
        "rotate_at",
    )

    def __init__(
        self,
        number: int,
        channel: grpc.Channel,
        monitor: Any,
        *,
        on_drained: Callable[[], None],
        on_suspect: Callable[[Generation, str], None],
    ) -> None:
        self.number = number
        self.channel = channel
        self.monitor = monitor
        #: When to replace it for ``max_channel_age`` (None: never). The supervisor's.
        self.rotate_at: float | None = None
        self._on_drained = on_drained
        self._on_suspect = on_suspect
        self._lock = threading.Lock()
        # Guarded by _lock:
        self._in_flight = 0
        self._waiting = 0  # of which wait_for_ready calls
        self._accepting = True  # False once retired: new calls go elsewhere
        self._closed = False  # the channel is closed (or about to be)

    # ------------------------------------------------------------------ calls

    def enter(self, waiting: bool = False) -> bool:
        """A call is about to be issued on this generation's channel (``waiting``: a
        ``wait_for_ready`` call, which waits in the channel if the server is away).

        Returns False when the generation is retired: the caller must read the
        connection's current generation again. On True the channel stays open until the
        matching :meth:`leave` (or until the retirement cap forces it shut).
        """
        with self._lock:
            if not self._accepting:
                return False
            self._in_flight += 1
            self._waiting += waiting
            return True

    def leave(self, waiting: bool = False) -> None:
        """The call that entered (with the same ``waiting``) has finished."""
        with self._lock:
            self._in_flight -= 1
            self._waiting -= waiting
            drained = not self._accepting and self._in_flight == 0
        if drained:
            self._on_drained()

    def finished(self, call: Any, waiting: bool = False) -> None:
        """``add_done_callback`` target for a future issued on this generation."""
        self.leave(waiting)
        try:
            code = call.code()
        except Exception:  # a cancelled or odd future: nothing to learn from it
            return
        if code in _SUSPECT_CODES:
            self.suspect(f"a call failed with {code.name}")

    def failed(self, error: grpc.RpcError) -> None:
        """A blocking call on this generation raised ``error``."""
        code = getattr(error, "code", None)
        if callable(code) and code() in _SUSPECT_CODES:
            self.suspect(f"a call failed with {code().name}")

    def suspect(self, reason: str) -> None:
        """Something suggests the transport is gone; ask the owner to check."""
        if self._accepting:
            self._on_suspect(self, reason)

    # ------------------------------------------------------------------ retirement

    @property
    def in_flight(self) -> int:
        """Calls in flight right now (a snapshot)."""
        with self._lock:
            return self._in_flight

    @property
    def waiting(self) -> int:
        """``wait_for_ready`` calls in flight right now (a snapshot)."""
        with self._lock:
            return self._waiting

    def retire(self) -> bool:
        """Take no new call from now on. Returns True if no call is in flight (the
        channel may be closed at once); otherwise ``on_drained`` follows."""
        with self._lock:
            self._accepting = False
            return self._in_flight == 0

    def close_if_drained(self, *, force: bool = False) -> bool:
        """Mark the channel closed if nothing is in flight (or ``force``). Returns whether
        the caller must now close the channel (exactly once over the generation's life)."""
        with self._lock:
            if self._closed or (self._in_flight and not force):
                return False
            self._accepting = False
            self._closed = True
            return True

    @property
    def closed(self) -> bool:
        return self._closed

    def __repr__(self) -> str:
        return (
            f"<Generation {self.number} in_flight={self._in_flight} "
            f"accepting={self._accepting} closed={self._closed}>"
        )


#: Generations inherited across ``fork()``. They are never used, closed or collected in
#: the child (closing an inherited channel can hang there, and garbage collection can
#: trigger that close), so they are kept here, reachable, for the life of the process.
_PARKED: list[Generation] = []


def park(gen: Generation) -> None:
    """Keep an inherited generation out of reach of use, close and garbage collection."""
    _PARKED.append(gen)
