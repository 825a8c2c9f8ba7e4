"""The state machine of one connection: the Condition and every field it guards.

The core is what callers and the supervisor share. Callers (``connect()``, the managed
channel, ``close()``) wait on it, register demand and deferred calls, and read the
current generation; the supervisor (``_supervisor``), its only other writer, moves the
state through :meth:`Core.transition`. Nothing slow runs under its lock: no gRPC call,
no ``channel.close()``, no join, no user callback, no logging.

The core knows nothing of ``Connection``, the managed channel or the supervisor: the
supervisor hands it a way to start its thread (:meth:`Core.bind`).
"""

from __future__ import annotations

import math
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from ._calls import CallError
from ._events import EventQueue, Listener
from ._generation import Generation
from ._liveness import Monitor
from ._log import QuietLog
from .config import ConnectionConfig
from .errors import (
    ChronicleConnError,
    ConnectionClosedError,
    ConnectTimeoutError,
    NotConnectedError,
    RetriesExhaustedError,
)
from .states import ConnectionState, ConnectionStats, StateChange, is_allowed

__all__ = ["DEMAND_WINDOW", "Core", "Counters"]

_S = ConnectionState

#: How long a fail-fast call (or ``channel()``) that found the connection down counts as
#: demand: a busy app that never waits still wants the connection back now.
DEMAND_WINDOW = 1.0

Clock = Callable[[], float]


@dataclass
class Counters:
    """What ``stats()`` counts. Guarded by the core's Condition."""

    connects: int = 0
    disconnects: int = 0
    attempts: int = 0
    failed_attempts: int = 0
    # Signs of life counted by monitors already replaced (see ``absorb``):
    keepalives: int = 0
    health_updates: int = 0
    probes_answered: int = 0
    generation: int = 0  # the number of the newest generation

    def absorb(self, monitor: Monitor) -> None:
        """Add the signs of life a monitor has counted since it was last absorbed: when
        it stops being the current one (lock held). Absorbing again adds only what came
        since, so the totals never go back or count twice."""
        keepalives, health_updates, probes = monitor.take()
        self.keepalives += keepalives
        self.health_updates += health_updates
        self.probes_answered += probes


class Core:
    """State, waiters, demand and deferred calls of one connection (see module docstring).

    Every public method is thread-safe; those named ``*_locked`` or documented "lock held"
    must be called with ``cond`` held.
    """

    def __init__(
        self, config: ConnectionConfig, *, clock: Clock, label: str, log: QuietLog
    ) -> None:
        self.config = config
        self.clock = clock
        self.label = label
        self.log = log
        # A plain Lock, not an RLock: abandon() must never get it re-entrantly from a
        # thread already inside a critical section.
        self._lock = threading.Lock()
        self.cond = threading.Condition(self._lock)
        # --- guarded by cond ---------------------------------------------------------
        self.state = _S.IDLE
        self.since = time.time()
        #: The generation calls go to, or None. Also read without the lock on hot paths
        #: (a plain attribute read; it is only ever replaced whole).
        self.current: Generation | None = None
        self.armed = False
        self.closing = False
        self.reconnect_requested = False
        self.waiters = 0  # threads in wait_connected()
        self.demand_until = -math.inf  # recent fail-fast demand lasts until then
        self.exhaustions = 0  # bumped each time a budget runs out
        #: Why the last FAILED came at once (TLS misconfigured, credentials refused).
        self.refusal: ChronicleConnError | None = None
        self.last_error: str | None = None
        self.last_exc: BaseException | None = None
        self.current_delay: float | None = None
        self.liveness = config.liveness.value
        self.counters = Counters()
        #: wait_for_ready future()/stream calls waiting for a generation, oldest first;
        #: held weakly, as gRPC holds its calls: one the application dropped is garbage.
        self.deferred: list[weakref.ReferenceType[CallError]] = []
        #: The generation close() took out of ``current``, for the supervisor to close.
        self.dropped: Generation | None = None
        self.events = EventQueue(self.cond, log)
        self.thread: threading.Thread | None = None
        #: Forks being prepared (several threads may fork at once): while non-zero the
        #: supervisor must hold, no call of its own in flight (``_fork``); ``paused`` is
        #: its answer that it does.
        self.fork_hold = 0
        self.paused = False
        self._start: Callable[[], threading.Thread] | None = None
        self._owner: Callable[[], Any] = lambda: None
        # --- written without the lock --------------------------------------------------
        #: Set by abandon() (garbage collection): the supervisor shuts down.
        self.abandoned = False

    def bind(self, start: Callable[[], threading.Thread], owner: object) -> None:
        """Wire the supervisor in: ``start()`` starts its thread. ``owner`` (the
        ``Connection``) is kept weakly, for ``on_retries_exhausted``."""
        self._start = start
        self._owner = weakref.ref(owner)

    def unbind(self) -> None:
        """Forget the supervisor (after it shut down): no thread will start again, and
        the core no longer keeps the supervisor alive."""
        self._start = None

    def owner(self) -> Any:
        """The ``Connection``, if it still exists."""
        return self._owner()

    # ------------------------------------------------------------------ transitions

    def transition(self, new: ConnectionState, **info: Any) -> None:
        """Move to ``new`` and queue the StateChange. Lock held."""
        old = self.state
        if old is new:
            return
        if not is_allowed(old, new):
            raise AssertionError(f"illegal transition {old.name} -> {new.name}")
        self.state = new
        self.since = time.time()
        self.events.push(
            StateChange(
                old=old,
                new=new,
                at=self.since,
                attempt=info.get("attempt", 0),
                delay=info.get("delay"),
                error=info.get("error"),
                generation=self.counters.generation,
                outage=info.get("outage"),
            )
        )
        self.cond.notify_all()

    def deliver(self) -> None:
        """Deliver queued state changes to the listeners (outside the lock)."""
        self.events.deliver()

    # ------------------------------------------------------------------ the thread

    def ensure_thread(self) -> None:
        """Start the supervisor thread if it is not running. Lock held."""
        start = self._start  # read once: abandon() may clear it on any thread
        if self.closing or start is None:
            return
        thread = self.thread
        if thread is None or not thread.is_alive():
            self.thread = start()

    def arm(self) -> None:
        """Ask for a connection (IDLE/FAILED -> CONNECTING). Lock held."""
        if self.closing:
            return
        if not self.armed:
            self.armed = True
            self.cond.notify_all()
        self.ensure_thread()

    # ------------------------------------------------------------------ callers

    def check_open(self) -> None:
        """Raise ``ConnectionClosedError`` if closed. Lock held or not."""
        if self.closing:
            raise ConnectionClosedError(f"connection {self.label} is closed", state=_S.CLOSED)

    def has_demand(self, now: float) -> bool:
        """Whether a caller wants the connection now. Lock held."""
        return self.waiters > 0 or bool(self.deferred) or now < self.demand_until

    def note_demand(self) -> None:
        """A fail-fast call or ``channel()`` found the connection down: that is demand
        for a while (it re-arms an IDLE or FAILED connection, and shortens the
        supervisor's backoff)."""
        now = self.clock()
        if now < self.demand_until - DEMAND_WINDOW / 2:
            return  # fresh enough: no lock on a busy app's failing calls
        with self.cond:
            fresh = now < self.demand_until
            self.demand_until = now + DEMAND_WINDOW
            if self.state in (_S.IDLE, _S.FAILED):
                self.arm()
                return
            if not fresh:
                self.cond.notify_all()  # demand begins: shorten the supervisor's sleep
            self.ensure_thread()

    def wait_connected(self, deadline: float | None) -> Generation:
        """Block until CONNECTED and return the current generation.

        Re-arms an IDLE or FAILED connection and counts as demand while it waits.

        Raises:
            ConnectTimeoutError: at ``deadline`` (a ``clock()`` value).
            RetriesExhaustedError: a budget ran out while waiting.
            ConnectionClosedError: the connection was closed.
            NotConnectedError: called on the supervisor thread (a listener).
        """
        with self.cond:
            gen = self.current
            if gen is not None:
                return gen
            self.check_open()
            if threading.current_thread() is self.thread:
                # A listener or on_retries_exhausted waiting would wait for itself.
                raise NotConnectedError(
                    f"connection {self.label} is not connected, and a listener cannot "
                    "wait for it (it runs on the supervisor thread)",
                    state=self.state,
                )
            self.arm()
            self.waiters += 1
            if self.waiters == 1:
                self.cond.notify_all()  # demand begins: shorten the supervisor's sleep
            seen = self.exhaustions

            def settled() -> bool:
                if self.current is not None or self.closing or self.exhaustions != seen:
                    return True
                self.ensure_thread()  # in case the supervisor died
                return False

            try:
                timeout = None if deadline is None else max(0.0, deadline - self.clock())
                self.cond.wait_for(settled, timeout)
                gen = self.current
                if gen is not None:
                    return gen
                if self.closing:
                    raise ConnectionClosedError(
                        f"connection {self.label} was closed while waiting to connect",
                        state=_S.CLOSED,
                    )
                if self.exhaustions != seen and self.refusal is not None:
                    raise type(self.refusal)(str(self.refusal)) from None
                if self.exhaustions != seen:
                    attempts = self.config.policy.max_attempts or 0
                    raise RetriesExhaustedError(
                        f"connection {self.label}: gave up after {attempts} attempts; "
                        f"last error: {self.last_error}",
                        attempts=attempts,
                    ) from self.last_exc
                raise ConnectTimeoutError(
                    f"connection {self.label} not connected within the timeout "
                    f"(state {self.state.value}; last error: {self.last_error})"
                )
            finally:
                self.waiters -= 1

    def defer(self, call: CallError) -> Generation | None:
        """Queue a pending ``wait_for_ready`` call until a generation is installed.

        Returns the current generation instead (without queueing) if there is one by
        now. Raises ``ConnectionClosedError`` when closed.
        """
        with self.cond:
            gen = self.current
            if gen is not None:
                return gen
            self.check_open()
            self.deferred.append(weakref.ref(call))
            if len(self.deferred) == 1:
                self.cond.notify_all()  # demand begins
            self.arm()
            return None

    def take_deferred(self) -> list[CallError]:
        """Remove and return every deferred call still alive. Lock held."""
        refs, self.deferred = self.deferred, []
        return [call for call in (ref() for ref in refs) if call is not None]

    def prune_deferred(self) -> None:
        """Forget deferred calls that finished while waiting (deadline, cancel) or were
        dropped. Lock held."""
        if self.deferred:
            self.deferred = [ref for ref in self.deferred if _pending(ref)]

    def request_reconnect(self) -> None:
        with self.cond:
            self.check_open()
            self.reconnect_requested = True
            self.arm()
            self.cond.notify_all()

    def add_listener(self, listener: Listener) -> ConnectionState:
        """Register ``listener``; return the state its changes start from (read at the
        same moment, so no change falls between the two)."""
        with self.cond:
            self.check_open()
            self.events.add(listener)
            return self.state

    def remove_listener(self, listener: Listener) -> None:
        with self.cond:
            self.events.remove(listener)

    # ------------------------------------------------------------------ closing

    def begin_close(self, error: str | None = None) -> tuple[bool, threading.Thread | None]:
        """Set the closing flag, go CLOSED, fail deferred calls and deliver. Returns
        (whether this call closed it, the supervisor thread to join)."""
        with self.cond:
            first = not self.closing
            deferred: list[CallError] = []
            if first:
                self.closing = True
                self.armed = False
                # No call may start on it from now on: the supervisor closes it.
                self.dropped, self.current = self.current, None
                if self.dropped is not None:
                    self.counters.absorb(self.dropped.monitor)
                self.transition(_S.CLOSED, error=error)
                deferred = self.take_deferred()
            thread = self.thread
            self.cond.notify_all()
        for call in deferred:
            call.finish(grpc.StatusCode.CANCELLED, "chronicle_conn: the connection was closed")
        self.deliver()
        if first:
            self.log.info("closed", **({"reason": error} if error else {}))
        return first, thread

    def abandon(self) -> None:
        """The ``Connection`` was garbage-collected without ``close()``: shut down without
        waiting. Runs wherever the collector runs, possibly inside one of this
        connection's own critical sections, so it never waits for the lock: it sets a
        flag, and wakes the supervisor only if the lock is free (else the supervisor's
        idle waits notice the flag within a second, or its attempt in progress when it
        ends)."""
        self.abandoned = True
        self._start = None  # no new thread; a running one shuts down
        if self._lock.acquire(blocking=False):
            try:
                self.cond.notify_all()
            finally:
                self._lock.release()

    # ------------------------------------------------------------------ reading

    def stats(self) -> ConnectionStats:
        with self.cond:
            self.prune_deferred()
            gen = self.current
            live = gen.monitor.untaken() if gen is not None else (0, 0, 0)
            c = self.counters
            return ConnectionStats(
                name=self.config.name,
                target=self.config.shown_target,
                state=self.state,
                since=self.since,
                connects=c.connects,
                disconnects=c.disconnects,
                attempts=c.attempts,
                failed_attempts=c.failed_attempts,
                last_error=self.last_error,
                current_delay=self.current_delay,
                keepalives_received=c.keepalives + live[0],
                generation=c.generation,
                liveness=self.liveness,
                waiters=self.waiters + len(self.deferred),
                health_updates_received=c.health_updates + live[1],
                probes_answered=c.probes_answered + live[2],
            )

    def describe(self) -> str:
        """``state X; last error: Y`` for messages (lock-free reads)."""
        return f"state {self.state.value}; last error: {self.last_error}"

    # ------------------------------------------------------------------ fork

    def reset_after_fork(self) -> None:
        """In a forked child (only this thread exists): fresh lock and Condition, no
        thread, no generation (the inherited one is the caller's to park), IDLE."""
        self._lock = threading.Lock()
        self.cond = threading.Condition(self._lock)
        self.events.reset_after_fork(self.cond)
        self.thread = None
        self.current = None
        self.waiters = 0
        self.deferred = []
        self.reconnect_requested = False
        self.demand_until = -math.inf
        self.fork_hold = 0
        self.paused = False
        if self.closing:
            return
        self.armed = False
        with self.cond:
            self.transition(_S.IDLE, error="fork: the child starts over on its own channel")


def _pending(ref: weakref.ReferenceType[CallError]) -> bool:
    call = ref()
    return call is not None and call.pending
