"""The supervisor: one daemon thread per connection that owns its channels.

It dials, watches and redials; it is the only writer of the connection's state (``close()``
only sets a flag and records the final CLOSED). Everything it shares with other threads is
guarded by one ``threading.Condition``; nothing slow (a gRPC call, ``channel.close()``, a
join, a user callback, logging) runs while it is held.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import math
import os
import random
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
import structlog

from . import __version__
from ._channel_factory import ChannelFactory
from ._liveness import AUTO_ORDER, Monitor, MonitorStatus, make_monitor, rpc_status
from .config import ConnectionConfig, LivenessMode, ReconnectPolicy
from .errors import (
    ConnectionClosedError,
    ConnectTimeoutError,
    NotConnectedError,
    RetriesExhaustedError,
)
from .states import ConnectionState, ConnectionStats, StateChange, is_allowed

if TYPE_CHECKING:
    from .connection import Connection

__all__ = ["AttemptFailed", "DelaySchedule", "Generation", "Supervisor"]

_S = ConnectionState
_C = grpc.ChannelConnectivity

Clock = Callable[[], float]
DelayFactory = Callable[[ReconnectPolicy], Iterator[float]]

#: Channels inherited across ``fork()``. They are never used or closed in the child
#: (closing one can hang there, and so can garbage collection of one), so they are kept
#: here, reachable, for the life of the process.
_PARKED: list[Any] = []

#: The least time between giving up a channel and closing it. grpc's connectivity
#: poller wakes every 200 ms; a ``try_to_connect`` subscription (a ready probe) made
#: while it sleeps is only taken up at its next wake-up, and if the channel was closed
#: in between, the poller thread dies on "Cannot invoke RPC" (grpc 1.85).
_POLLER_GRACE = 0.25


class _QuietLog:
    """A structlog logger whose calls never raise: a broken log sink (a closed stdout,
    say) must not take the supervisor thread down with it."""

    __slots__ = ("_logger",)

    def __init__(self, logger: Any) -> None:
        self._logger = logger

    def _emit(self, method: str, event: str, **fields: Any) -> None:
        with contextlib.suppress(Exception):  # nowhere left to report it
            getattr(self._logger, method)(event, **fields)

    def debug(self, event: str, **fields: Any) -> None:
        self._emit("debug", event, **fields)

    def info(self, event: str, **fields: Any) -> None:
        self._emit("info", event, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._emit("warning", event, **fields)

    def exception(self, event: str, **fields: Any) -> None:
        self._emit("exception", event, **fields)


class AttemptFailed(Exception):
    """Why one attempt failed; chained as the cause of ``RetriesExhaustedError``."""


class Unreachable(AttemptFailed):
    """A probe was refused: the transport is down (no call can have been sent)."""


class _Exit(enum.Enum):
    """What ``_serve`` decided to do about the current generation."""

    LOST = "lost"  # declared lost: RECONNECTING
    DROPPED = "dropped"  # reconnect() asked for a fresh channel: RECONNECTING
    VERIFY = "verify"  # a detector is suspicious: probe before deciding
    ROTATE = "rotate"  # max_channel_age reached: replace it without a state change
    STALE = "stale"  # no keep-alive within keepalive_stale_after: lost
    REAP = "reap"  # a retired channel is due to be closed


@dataclass(eq=False)
class Generation:
    """One underlying channel and what watches it. Immutable once installed, but
    ``suspect`` (a detector's report) is guarded by the connection's Condition, and
    ``lost`` and the calls watching it by the generation's own small lock."""

    number: int
    channel: grpc.Channel
    created: float
    monitor: Monitor
    transport_callback: Callable[[grpc.ChannelConnectivity], None] | None = None
    suspect: str | None = None
    seen_ready: bool = False
    lost: bool = False
    unsent: bool = False  # lost with its transport already down (see mark_lost)
    _watchers: set[threading.Event] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def watch(self, event: threading.Event) -> bool:
        """Have ``event`` set if this generation is declared lost with the calls waiting
        on it unsent. False if that already happened (send the call again now)."""
        with self._lock:
            if self.lost:
                return not self.unsent
            self._watchers.add(event)
            return True

    @property
    def resend(self) -> bool:
        """Whether a call still waiting on this generation may be sent on the next one."""
        with self._lock:
            return self.lost and self.unsent

    def unwatch(self, event: threading.Event) -> None:
        with self._lock:
            self._watchers.discard(event)

    def mark_lost(self, *, unsent: bool) -> None:
        """Declare it lost. ``unsent``: its transport was already down, so calls still
        waiting on it never reached the server; wake them to go to the next one."""
        with self._lock:
            self.lost = True
            self.unsent = unsent
            watchers = list(self._watchers) if unsent else []
            self._watchers.clear()
        for event in watchers:
            event.set()


class DelaySchedule:
    """When to attempt next within one retry budget, and which attempts it counts.

    The budget (``retry_attempts``) counts the attempts made on the exponential schedule.
    While a caller waits (``connect()`` or a ``wait_for_ready`` call), the supervisor
    also attempts at least every jittered ``base_delay``; those early attempts are
    *probes*: they do not advance the schedule nor spend the budget, so a waiting caller
    never makes the connection give up sooner. Pure: the caller passes the clock
    readings, so tests drive it without sleeping. Not thread-safe (the supervisor's).
    """

    def __init__(
        self,
        policy: ReconnectPolicy,
        delays: Iterator[float],
        rng: random.Random | None = None,
    ) -> None:
        self._policy = policy
        self._delays = delays
        self._rng = rng or random.Random()
        self.counted = 0  # attempts that spent the budget
        self.delay: float | None = None  # the current exponential delay
        self._due: float | None = None  # when the next counted attempt is due (None: now)
        self._failed_at = 0.0
        self._demand_delay = 0.0
        self._counting = False

    def start(self, now: float) -> bool:
        """An attempt begins at ``now``; return whether it counts toward the budget."""
        self._counting = self._due is None or now >= self._due
        if self._counting:
            self.counted += 1
        return self._counting

    def failed(self, now: float) -> None:
        """The attempt that began last failed at ``now``."""
        if self._counting:
            self.delay = next(self._delays)
            self._due = now + self.delay
        self._failed_at = now
        base = self._policy.base_delay
        spread = base * self._policy.jitter
        self._demand_delay = max(0.0, base + self._rng.uniform(-spread, spread))

    @property
    def exhausted(self) -> bool:
        """Whether the last failure spent the last counted attempt."""
        limit = self._policy.max_attempts
        return self._counting and limit is not None and self.counted >= limit

    def wake_at(self, waiters: int) -> float:
        """When the next attempt should start, given how many callers wait now."""
        due = self._due if self._due is not None else self._failed_at
        if waiters > 0:
            return min(due, self._failed_at + self._demand_delay)
        return due


@dataclass
class _Waiter:
    """Bookkeeping for demand: how many callers wait, and what ended their wait."""

    count: int = 0
    exhaustions: int = 0  # bumped each time a budget runs out


@dataclass
class _Counters:
    connects: int = 0
    disconnects: int = 0
    attempts: int = 0
    failed_attempts: int = 0
    keepalives: int = 0  # of monitors already retired
    generation: int = 0


@dataclass
class _Pending:
    """Listener events waiting for delivery (in order, one deliverer at a time).

    Each event has a sequence number, and each listener the number of the first event
    it is owed: one added while older events wait for delivery does not get them (its
    view starts from the state at the time it was added).
    """

    events: collections.deque[tuple[int, StateChange]] = field(default_factory=collections.deque)
    delivering: bool = False
    sequence: int = 0  # of the next event


class Supervisor:
    """State, waiters and the background loop of one connection (see module docstring).

    Created by :class:`~chronicle_conn.Connection`; a forked child gets a fresh one.
    """

    def __init__(
        self,
        conn: Connection,
        config: ConnectionConfig,
        *,
        clock: Clock = time.monotonic,
        delay_factory: DelayFactory | None = None,
        listeners: list[Callable[[StateChange], None]] | None = None,
        label: str,
    ) -> None:
        self._conn_ref = weakref.ref(conn)
        self.config = config
        self.factory = ChannelFactory(config)
        self._clock = clock
        self._delay_factory: DelayFactory = delay_factory or (lambda p: p.delays())
        self._label = label
        context = {
            "connection": config.name or label,
            "target": config.connection_string.redacted(),
        }
        # Not get_logger(...).bind(...): binding finalizes structlog's lazy proxy with the
        # configuration of this moment, and apps often configure structlog only after
        # creating their connection at import time.
        self.log = _QuietLog(
            config.logger.bind(**context)
            if config.logger is not None
            else structlog.get_logger("chronicle_conn", **context)
        )
        self.pid = os.getpid()
        self.cond = threading.Condition()
        # --- guarded by self.cond ------------------------------------------------
        self.state = _S.IDLE
        self.since = time.time()
        #: The generation calls go to, or None. Also read without the lock on hot paths
        #: (a plain attribute read; it is only ever replaced whole).
        self.current: Generation | None = None
        self.armed = False
        self.closing = False
        self.reconnect_requested = False
        self.waiters = _Waiter()
        self.last_error: str | None = None
        self.last_exc: BaseException | None = None
        self.current_delay: float | None = None
        self.liveness = config.liveness.value
        #: (listener, the sequence number of the first event it is owed)
        self.listeners: list[tuple[Callable[[StateChange], None], int]] = [
            (listener, 0) for listener in listeners or ()
        ]
        self.counters = _Counters()
        self._pending = _Pending()
        self._thread: threading.Thread | None = None
        self._candidate: grpc.Channel | None = None
        # --- owned by the supervisor thread only ---------------------------------
        #: Channels given up, soonest to close first.
        self._retiring: list[_Retiree] = []

    def _closing(self) -> bool:
        # A call, not an attribute test: mypy would otherwise keep an earlier narrowing
        # of ``self.closing`` across the waits that let another thread change it.
        return self.closing

    # ------------------------------------------------------------------ transitions

    def _transition(self, new: ConnectionState, **info: Any) -> None:
        """Move to ``new`` and queue the StateChange. Call with the lock held."""
        old = self.state
        if old is new:
            return
        if not is_allowed(old, new):
            raise AssertionError(f"illegal transition {old.name} -> {new.name}")
        self.state = new
        self.since = time.time()
        pending = self._pending
        pending.sequence += 1
        pending.events.append(
            (
                pending.sequence - 1,
                StateChange(
                    old=old,
                    new=new,
                    at=self.since,
                    attempt=info.get("attempt", 0),
                    delay=info.get("delay"),
                    error=info.get("error"),
                    generation=self.counters.generation,
                ),
            )
        )
        self.cond.notify_all()

    def deliver(self) -> None:
        """Deliver queued state changes to the listeners, in order, outside the lock.

        Whoever queues an event calls this; if somebody is already delivering (the
        supervisor inside a listener that calls ``close()``, say), that caller's loop
        delivers the new events too.
        """
        while True:
            with self.cond:
                if self._pending.delivering or not self._pending.events:
                    return
                self._pending.delivering = True
                events = list(self._pending.events)
                self._pending.events.clear()
                listeners = list(self.listeners)
            try:
                for sequence, change in events:
                    self.log.info(
                        "state_changed",
                        old=change.old.value,
                        new=change.new.value,
                        attempt=change.attempt,
                        delay=change.delay,
                        error=change.error,
                        generation=change.generation,
                    )
                    for listener, first in listeners:
                        if sequence < first:
                            continue
                        try:
                            listener(change)
                        except Exception:
                            self.log.exception("listener_failed", listener=repr(listener))
            finally:
                with self.cond:
                    self._pending.delivering = False

    # ------------------------------------------------------------------ public side

    def add_listener(self, listener: Callable[[StateChange], None]) -> ConnectionState:
        """Register ``listener`` for the changes from now on; return the state it starts
        from (read at the same moment, so no change falls between the two)."""
        with self.cond:
            self.listeners.append((listener, self._pending.sequence))
            return self.state

    def remove_listener(self, listener: Callable[[StateChange], None]) -> None:
        with self.cond:
            # ==, not is: a bound method is a new object each time it is looked up.
            self.listeners = [(f, n) for f, n in self.listeners if f != listener]

    def ensure_thread(self) -> None:
        """Start the supervisor thread if it is not running. Call with the lock held."""
        if self._thread is None and not self.closing:
            self._thread = threading.Thread(
                target=self._run, name=f"chronicle_conn-supervisor[{self._label}]", daemon=True
            )
            self._thread.start()

    def arm(self) -> None:
        """Ask for a connection (IDLE/FAILED -> CONNECTING). Call with the lock held."""
        if self.closing:
            return
        if not self.armed:
            self.armed = True
            self.cond.notify_all()
        self.ensure_thread()

    def wait_connected(self, deadline: float | None) -> Generation:
        """Block until CONNECTED and return the current generation.

        Re-arms an IDLE or FAILED connection. Counts as demand while it waits.

        Raises:
            ConnectTimeoutError: at ``deadline`` (a ``clock()`` value).
            RetriesExhaustedError: a budget ran out while waiting.
            ConnectionClosedError: the connection was closed.
        """
        with self.cond:
            gen = self.current
            if gen is not None:
                return gen
            if self.closing:
                raise ConnectionClosedError(f"connection {self._label} is closed")
            if threading.current_thread() is self._thread:
                # A listener or on_retries_exhausted waiting would wait for itself.
                raise NotConnectedError(
                    f"connection {self._label} is not connected, and a listener cannot "
                    "wait for it (it runs on the supervisor thread)",
                    state=self.state,
                )
            self.arm()
            waiters = self.waiters
            waiters.count += 1
            if waiters.count == 1:
                self.cond.notify_all()  # demand begins: shorten the supervisor's sleep
            seen = waiters.exhaustions
            try:
                while True:
                    gen = self.current
                    if gen is not None:
                        return gen
                    if self.closing:
                        raise ConnectionClosedError(
                            f"connection {self._label} was closed while waiting to connect"
                        )
                    if waiters.exhaustions != seen:
                        attempts = self.config.policy.max_attempts or 0
                        raise RetriesExhaustedError(
                            f"connection {self._label}: gave up after {attempts} attempts; "
                            f"last error: {self.last_error}",
                            attempts=attempts,
                        ) from self.last_exc
                    self.ensure_thread()  # in case the supervisor died (see _run)
                    if deadline is None:
                        self.cond.wait()
                        continue
                    remaining = deadline - self._clock()
                    if remaining <= 0:
                        raise ConnectTimeoutError(
                            f"connection {self._label} not connected within the timeout "
                            f"(state {self.state.value}; last error: {self.last_error})"
                        )
                    self.cond.wait(remaining)
            finally:
                waiters.count -= 1

    def request_reconnect(self) -> None:
        with self.cond:
            if self.closing:
                return
            self.reconnect_requested = True
            self.arm()
            self.cond.notify_all()

    def close(self) -> None:
        """Close: fail waiters, stop the loop, join it (bounded). Idempotent, any thread."""
        with self.cond:
            if not self.closing:
                self.closing = True
                self.armed = False
                self._transition(_S.CLOSED)
            thread = self._thread
            self.cond.notify_all()
        self.deliver()
        # Every caller waits for the shutdown, not only the first (a second close()
        # racing the first must not return while channels are still open).
        if thread is None:
            return
        if thread is threading.current_thread():
            return  # called from a listener: the loop sees the flag when it returns
        thread.join(self.config.close_timeout)
        if thread.is_alive():
            self.log.warning("supervisor_join_timeout", timeout=self.config.close_timeout)

    def abandon(self) -> None:
        """Close without waiting: for a Connection garbage-collected unclosed (this may
        run on any thread, in the middle of anything). The supervisor shuts down alone."""
        with self.cond:
            if not self.closing:
                self.closing = True
                self.armed = False
                self._transition(_S.CLOSED, error="garbage-collected without close()")
            self.cond.notify_all()

    def stats(self) -> ConnectionStats:
        with self.cond:
            gen = self.current
            live = gen.monitor.received if gen is not None else 0
            c = self.counters
            return ConnectionStats(
                name=self.config.name,
                target=self.config.connection_string.redacted(),
                state=self.state,
                since=self.since,
                connects=c.connects,
                disconnects=c.disconnects,
                attempts=c.attempts,
                failed_attempts=c.failed_attempts,
                last_error=self.last_error,
                current_delay=self.current_delay,
                keepalives_received=c.keepalives + live,
                generation=c.generation,
                liveness=self.liveness,
                waiters=self.waiters.count,
            )

    def threads(self) -> list[threading.Thread]:
        """The threads this connection started that are still alive (for tests/diagnosis)."""
        found = []
        with self.cond:
            if self._thread is not None and self._thread.is_alive():
                found.append(self._thread)
        prefix = "chronicle_conn-"
        suffix = f"[{self._label}]"
        for thread in threading.enumerate():
            if thread.name.startswith(prefix) and suffix in thread.name and thread not in found:
                found.append(thread)
        return found

    def forked(self, conn: Connection) -> Supervisor:
        """Return a fresh supervisor for a child process, in IDLE; park this one.

        The inherited channels (current, retiring, candidate), monitors and calls stay
        reachable through this object in ``_PARKED``: none of them is used, closed or
        finalized in the child. The child's listeners hear ``<parent state> -> IDLE``
        (error "fork") when its supervisor next delivers, not inside the fork handler.
        """
        # The lock may have been held by a thread that does not exist in the child, so
        # nothing here takes it: the child only reads plain attributes.
        _PARKED.append(self)
        child = Supervisor(
            conn,
            self.config,
            clock=self._clock,
            delay_factory=self._delay_factory,
            listeners=[listener for listener, _ in self.listeners],
            label=self._label,
        )
        if self.closing:
            child.closing = True
            child.state = _S.CLOSED
        else:
            with child.cond:
                child.state = self.state
                child._transition(_S.IDLE, error="fork: the child starts over on its own channel")
        return child

    # ------------------------------------------------------------------ the loop

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException:
            # Only what _loop does not catch (SystemExit from a listener, say).
            self.log.exception("supervisor_crashed")
            raise
        finally:
            self._shutdown()
            with self.cond:
                if not self.closing:
                    # Died unexpectedly: the next caller (waiters wake now) starts a
                    # fresh supervisor thread.
                    self._thread = None
                    self.cond.notify_all()

    def _loop(self) -> None:
        while True:
            self._reap()
            with self.cond:
                if not (self.closing or self.armed):
                    # Parked (IDLE/FAILED): wake to close retired channels when due.
                    wake = self._until(math.inf)
                    self.cond.wait(None if wake == math.inf else wake - self._clock())
                    continue
                if self.closing:
                    return
                if self.state in (_S.IDLE, _S.FAILED):
                    self._transition(_S.CONNECTING)
            try:
                self.deliver()
                gen = self._dial()
                while gen is not None:
                    gen = self._serve(gen)
            except Exception as exc:
                # Never die silently: log it, treat it as a lost connection, dial again.
                self.log.exception("supervisor_error")
                self._lose(f"internal error: {exc!r}", exc)
                with self.cond:
                    if self._closing():
                        return
                    self.cond.wait(self.config.policy.base_delay)

    def _lose(
        self, reason: str, exc: BaseException | None = None, *, unreachable: bool = False
    ) -> None:
        """Drop the current generation (if any) and go RECONNECTING.

        ``unreachable``: a probe found the server refusing connections, so nothing
        waiting on the generation can have been sent (see ``Generation.mark_lost``).
        """
        with self.cond:
            gen = self.current
            self.current = None
            closing = self.closing
            if not closing:
                self.last_error = reason
                self.last_exc = exc
                if gen is not None:
                    self.counters.disconnects += 1
                if self.state is _S.CONNECTED:
                    self._transition(_S.RECONNECTING, error=reason)
        if not closing and gen is not None:
            self.log.warning("connection_lost", reason=reason, generation=gen.number)
        self.deliver()
        # Retired even when closing: nothing else holds it any more (_shutdown closes
        # only what is current or retiring).
        if gen is not None:
            gen.mark_lost(unsent=unreachable)
            self._retire(gen, drain=0.0)

    def _dial(self) -> Generation | None:
        """Attempt until connected (returns the generation), exhausted or closing (None)."""
        policy = self.config.policy
        schedule = DelaySchedule(policy, self._delay_factory(policy))
        while True:
            self._reap()
            with self.cond:
                if self.closing:
                    return None
                self.reconnect_requested = False
                counted = schedule.start(self._clock())
                self.counters.attempts += 1
                self.current_delay = None
            self.log.debug("attempt_started", attempt=schedule.counted, counted=counted)
            result = self._attempt(schedule.counted)
            if isinstance(result, Generation):
                if self._install(result, schedule.counted):
                    return result
                return None
            schedule.failed(self._clock())
            with self.cond:
                self.counters.failed_attempts += 1
                self.last_error = str(result)
                self.last_exc = result
                if self._closing():
                    return None
                self.current_delay = schedule.delay
                waiters = self.waiters.count
            if schedule.exhausted:
                self._exhausted(schedule.counted, result)
                return None
            self.log.info(
                "attempt_failed",
                attempt=schedule.counted,
                counted=counted,
                error=str(result),
                delay=round(schedule.delay or 0.0, 3),
                waiters=waiters,
            )
            self._backoff(schedule)

    def _backoff(self, schedule: DelaySchedule) -> None:
        """Sleep until the next attempt is due; a new waiter, ``reconnect()`` or
        ``close()`` wakes it at once (the Condition is notified)."""
        self.log.debug("reconnect_scheduled", delay=round(schedule.delay or 0.0, 3))
        while True:
            self._reap()
            with self.cond:
                if self.closing or self.reconnect_requested:
                    return
                wake = schedule.wake_at(self.waiters.count)
                now = self._clock()
                if now >= wake:
                    return
                self.cond.wait(self._until(wake) - now)

    def _exhausted(self, attempts: int, error: AttemptFailed) -> None:
        with self.cond:
            if self.closing:
                return
            self.armed = False
            self.waiters.exhaustions += 1
            self._transition(_S.FAILED, attempt=attempts, error=str(error))
        self.deliver()
        self.log.warning("retries_exhausted", attempts=attempts, error=str(error))
        callback = self.config.on_retries_exhausted
        conn = self._conn_ref()
        if callback is not None and conn is not None:
            try:
                callback(conn)
            except Exception:
                self.log.exception("on_retries_exhausted_failed")

    # ------------------------------------------------------------------ one attempt

    def _attempt(self, attempt: int) -> Generation | AttemptFailed:
        deadline = self._clock() + self.config.attempt_timeout
        try:
            channel = self.factory.build()
        except Exception as exc:
            return AttemptFailed(f"could not build the channel: {exc!r}")
        with self.cond:
            self._candidate = channel
        try:
            error = self._await_ready(channel, deadline)
            monitor: Monitor | None = None
            if error is None:
                monitor, error = self._establish(channel, deadline)
            if monitor is not None:
                with self.cond:
                    self.counters.generation += 1
                    number = self.counters.generation
                # seen_ready: _await_ready saw READY, so a first callback reporting IDLE
                # (the server died in between) is already suspect.
                return Generation(number, channel, self._clock(), monitor, seen_ready=True)
        except Exception as exc:
            error = AttemptFailed(f"attempt {attempt} failed: {exc!r}")
        finally:
            with self.cond:
                self._candidate = None
        self._retire_channel(channel)
        return error or AttemptFailed("attempt failed")

    def _await_ready(self, channel: grpc.Channel, deadline: float) -> AttemptFailed | None:
        """Wait until ``channel`` is READY (None) or fails/times out (the reason).

        ``channel_ready_future`` has no failure outcome, so a ``subscribe`` callback ends
        the wait early on TRANSIENT_FAILURE; ``close()`` ends it at once too.
        """
        outcome: list[str] = []
        cond = self.cond

        def settle(result: str) -> None:
            with cond:
                if not outcome:
                    outcome.append(result)
                    cond.notify_all()

        def on_state(connectivity: grpc.ChannelConnectivity) -> None:
            if connectivity is _C.TRANSIENT_FAILURE:
                settle("TRANSIENT_FAILURE")
            elif connectivity is _C.SHUTDOWN:
                settle("SHUTDOWN")

        future = grpc.channel_ready_future(channel)
        future.add_done_callback(lambda f: settle("READY") if not f.cancelled() else None)
        channel.subscribe(on_state, try_to_connect=False)
        try:
            with cond:
                while not outcome and not self.closing:
                    remaining = deadline - self._clock()
                    if remaining <= 0:
                        break
                    cond.wait(remaining)
                result = outcome[0] if outcome else ("CLOSING" if self.closing else "TIMEOUT")
        finally:
            future.cancel()
            channel.unsubscribe(on_state)
        if result == "READY":
            return None
        if result == "TIMEOUT":
            return AttemptFailed(
                f"not ready within {self.config.attempt_timeout:g}s (host unreachable?)"
            )
        if result == "CLOSING":
            return AttemptFailed("connection closed")
        return AttemptFailed(f"{result}: {self._failure_details(channel)}")

    @staticmethod
    def _failure_details(channel: grpc.Channel) -> str:
        """Why a channel is in TRANSIENT_FAILURE: only a fail-fast RPC's details say
        (refused, TLS handshake, name resolution...)."""
        try:
            _probe_call(channel)(b"", timeout=1.0, wait_for_ready=False)
        except grpc.RpcError as exc:
            code, details = rpc_status(exc)
            return f"{code.name if code else 'UNKNOWN'}: {details}"
        except ValueError as exc:
            return str(exc)
        return "the server answered a probe"

    def _probe(self, channel: grpc.Channel, deadline: float) -> AttemptFailed | None:
        """Is the server behind an established channel still there? None if it answers.

        A fail-fast RPC makes an IDLE channel connect at once, and against a crashed
        server fails within milliseconds. (A ready future would only ask grpc's
        connectivity poller, which takes the request up at its next 200 ms tick.) Any
        answer, even UNIMPLEMENTED, proves the server reachable. Ends early on close().
        """
        cond = self.cond
        done: list[bool] = []

        def settle(_: object) -> None:
            with cond:
                done.append(True)
                cond.notify_all()

        try:
            future = _probe_call(channel).future(
                b"", timeout=max(0.001, deadline - self._clock()), wait_for_ready=False
            )
        except ValueError as exc:  # closed channel
            return AttemptFailed(f"probe: {exc}")
        future.add_done_callback(settle)
        with cond:
            while not done and not self.closing:
                cond.wait()
            closing = not done
        if closing:
            future.cancel()
            return AttemptFailed("connection closed")
        error = future.exception()
        if error is None:
            return None
        code, details = rpc_status(error)
        if code is grpc.StatusCode.UNAVAILABLE:
            return Unreachable(f"probe: {code.name}: {details}")
        if code is grpc.StatusCode.DEADLINE_EXCEEDED:
            return AttemptFailed(f"probe: {code.name}: {details}")
        return None  # the server answered (UNIMPLEMENTED, UNAUTHENTICATED, ...)

    def _establish(
        self, channel: grpc.Channel, deadline: float
    ) -> tuple[Monitor | None, AttemptFailed | None]:
        mode = self.config.liveness
        modes = AUTO_ORDER if mode is LivenessMode.AUTO else (mode,)
        last: str | None = None
        for candidate in modes:
            monitor = make_monitor(
                candidate,
                channel,
                cond=self.cond,
                clock=self._clock,
                thread_name=f"chronicle_conn-{candidate.value}[{self._label}]",
                stale_after=self.config.keepalive_stale_after,
                client_version=__version__,
            )
            monitor.start()
            with self.cond:
                while monitor.status is MonitorStatus.PENDING and not self.closing:
                    remaining = deadline - self._clock()
                    if remaining <= 0:
                        break
                    self.cond.wait(remaining)
                status = monitor.status
                error = monitor.error
                if status is MonitorStatus.ESTABLISHED:
                    self.liveness = candidate.value
            if status is MonitorStatus.ESTABLISHED:
                return monitor, None
            monitor.stop()
            monitor.join(self.config.close_timeout)
            if status is MonitorStatus.UNSUPPORTED:
                self.log.debug("liveness_unsupported", mode=candidate.value, error=error)
                last = error
                continue
            if status is MonitorStatus.PENDING:
                return None, AttemptFailed(
                    f"{candidate.value}: no answer within {self.config.attempt_timeout:g}s"
                )
            return None, AttemptFailed(error or f"{candidate.value} failed")
        return None, AttemptFailed(f"no liveness mode available: {last}")

    # ------------------------------------------------------------------ connected

    def _install(self, gen: Generation, attempt: int) -> bool:
        """Make ``gen`` current and CONNECTED. False (and ``gen`` disposed) if closing."""
        gen.transport_callback = _transport_callback(weakref.ref(self), gen)
        gen.channel.subscribe(gen.transport_callback, try_to_connect=False)
        with self.cond:
            if self.closing:
                installed = False
            else:
                installed = True
                old = self.current
                self.current = gen
                self.counters.connects += 1
                self.current_delay = None
                self.armed = True
                self._transition(_S.CONNECTED, attempt=attempt)
        if not installed:
            self._retire(gen, drain=0.0)
            return False
        self.deliver()
        if old is not None:
            self._retire(old, drain=self.config.drain_timeout)
        self.log.info("connected", generation=gen.number, liveness=self.liveness)
        return True

    def on_transport(self, gen: Generation, connectivity: grpc.ChannelConnectivity) -> None:
        """Transport callback (a gRPC delivery thread): READY then anything else is
        suspicious. Verified by the supervisor before it calls the connection lost."""
        with self.cond:
            if connectivity is _C.READY:
                gen.seen_ready = True
                return
            if gen.seen_ready and gen.suspect is None:
                gen.suspect = f"transport {connectivity.name}"
                self.cond.notify_all()

    def _serve(self, gen: Generation) -> Generation | None:
        """Watch ``gen`` until it is lost (None) or replaced (the new one)."""
        while True:
            self._reap()
            action, reason = self._next_action(gen)
            if action is None:
                return None  # closing
            if action is _Exit.REAP:
                continue
            if action is _Exit.STALE:
                self.log.warning("keepalive_stale", after=self.config.keepalive_stale_after)
            if action in (_Exit.LOST, _Exit.STALE):
                self._lose(reason)
                return None
            if action is _Exit.DROPPED:
                return self._drop(gen, reason)
            if action is _Exit.ROTATE:
                replacement = self._rotate(gen)
                if replacement is not None:
                    return replacement
                continue
            # Suspect: IDLE is "cold", not "dead" (idle timeout, GOAWAY). A probe tells:
            # a crashed server refuses it within milliseconds.
            self.log.debug("verifying", reason=reason)
            monitor = gen.monitor
            error = self._probe(gen.channel, self._clock() + self.config.attempt_timeout)
            if error is None and monitor.status in (MonitorStatus.ENDED, MonitorStatus.FAILED):
                error = self._restart_monitor(gen)
            if error is not None:
                self._lose(f"{reason}; {error}", error, unreachable=isinstance(error, Unreachable))
                return None
            with self.cond:
                gen.seen_ready = True

    def _next_action(self, gen: Generation) -> tuple[_Exit | None, str]:
        """Wait (under the lock) until something needs doing about ``gen``: (None, "")
        when closing. Wakes for retired channels that are due, so they get closed."""
        max_age = self.config.max_channel_age
        with self.cond:
            while True:
                if self.closing:
                    return None, ""
                now = self._clock()
                monitor = gen.monitor
                stale_at = monitor.deadline()
                age_at = gen.created + max_age if max_age is not None else math.inf
                reap_at = self._retiring[0].close_at if self._retiring else math.inf
                if self.reconnect_requested:
                    self.reconnect_requested = False
                    return _Exit.DROPPED, "reconnect requested"
                if monitor.status is MonitorStatus.LOST:
                    return _Exit.LOST, monitor.error or "liveness lost"
                if stale_at is not None and now >= stale_at:
                    return _Exit.STALE, (
                        f"no keep-alive for {self.config.keepalive_stale_after:g}s "
                        "(kernel hung or network partitioned)"
                    )
                if gen.suspect is not None or monitor.status in (
                    MonitorStatus.ENDED,
                    MonitorStatus.FAILED,
                ):
                    reason = gen.suspect or monitor.error or "suspect"
                    gen.suspect = None
                    return _Exit.VERIFY, reason
                if now >= age_at:
                    return _Exit.ROTATE, "max_channel_age"
                if now >= reap_at:
                    return _Exit.REAP, ""
                wake = min(stale_at if stale_at is not None else math.inf, age_at, reap_at)
                self.cond.wait(None if wake == math.inf else wake - now)

    def _restart_monitor(self, gen: Generation) -> AttemptFailed | None:
        """The liveness stream ended on a healthy transport (GOAWAY, say): open it again."""
        old = gen.monitor
        old.stop()
        old.join(self.config.close_timeout)
        monitor, error = self._establish(gen.channel, self._clock() + self.config.attempt_timeout)
        if monitor is None:
            return error  # gen keeps the old monitor; _retire counts its keep-alives
        with self.cond:
            self.counters.keepalives += old.received
            gen.monitor = monitor
        return None

    def _drop(self, gen: Generation, reason: str) -> Generation | None:
        with self.cond:
            self.current = None
            closing = self.closing
            if not closing:
                self.counters.disconnects += 1
                self._transition(_S.RECONNECTING, error=reason)
        self.deliver()
        self._retire(gen, drain=self.config.drain_timeout)
        return None if closing else self._dial()

    def _rotate(self, gen: Generation) -> Generation | None:
        """Make-before-break replacement at ``max_channel_age``; no state change."""
        result = self._attempt(0)
        if not isinstance(result, Generation):
            self.log.info("rotation_failed", error=str(result))
            gen.created = self._clock()  # try again after another max age
            return None
        result.transport_callback = _transport_callback(weakref.ref(self), result)
        result.channel.subscribe(result.transport_callback, try_to_connect=False)
        with self.cond:
            closing = self.closing
            if not closing:
                self.current = result
        if closing:
            self._retire(result, drain=0.0)
            return None
        self.log.info("channel_rotated", generation=result.number)
        self._retire(gen, drain=self.config.drain_timeout)
        return result

    # ------------------------------------------------------------------ cleanup

    def _until(self, wake: float) -> float:
        """``wake``, or earlier if a retired channel is due to be closed."""
        if self._retiring:
            return min(wake, self._retiring[0].close_at)
        return wake

    def _retire(self, gen: Generation, drain: float) -> None:
        """Stop watching ``gen`` now; close its channel after ``drain`` seconds."""
        with self.cond:
            self.counters.keepalives += gen.monitor.received
        if gen.transport_callback is not None:
            gen.channel.unsubscribe(gen.transport_callback)
        self._retire_channel(gen.channel, gen.monitor, drain)

    def _retire_channel(
        self, channel: grpc.Channel, monitor: Monitor | None = None, drain: float = 0.0
    ) -> None:
        """Queue ``channel`` for closing: after ``drain``, and never sooner than
        ``_POLLER_GRACE`` after its last unsubscription (see there)."""
        if monitor is not None:
            monitor.stop()
        now = self._clock()
        close_at = now + max(drain, _POLLER_GRACE)
        self._retiring.append(_Retiree(close_at, now, channel, monitor))
        self._retiring.sort(key=lambda retiree: retiree.close_at)

    def _reap(self, *, everything: bool = False) -> None:
        """Close the retired channels that are due (``everything``: all of them, after
        the poller grace). Supervisor thread, no lock held."""
        if everything and self._retiring:
            latest = max(r.retired_at for r in self._retiring) + _POLLER_GRACE
            pause = latest - self._clock()
            if pause > 0:
                time.sleep(min(pause, _POLLER_GRACE))
        now = self._clock()
        while self._retiring and (everything or self._retiring[0].close_at <= now):
            retiree = self._retiring.pop(0)
            self._dispose(retiree.channel)
            if retiree.monitor is not None:
                retiree.monitor.join(self.config.close_timeout)

    def _dispose(self, channel: grpc.Channel) -> None:
        if os.getpid() != self.pid:
            _PARKED.append(channel)  # never close an inherited channel
            return
        try:
            self.factory.dispose(channel)
        except Exception:
            self.log.exception("channel_close_failed")

    def _shutdown(self) -> None:
        """Supervisor exit: close everything it owns."""
        with self.cond:
            gen = self.current
            self.current = None
        if gen is not None:
            self._retire(gen, drain=0.0)
        self._reap(everything=True)
        self.deliver()


@dataclass
class _Retiree:
    """A channel given up, waiting to be closed by the supervisor."""

    close_at: float
    retired_at: float
    channel: grpc.Channel
    monitor: Monitor | None


def _probe_call(channel: grpc.Channel) -> grpc.UnaryUnaryMultiCallable[bytes, bytes]:
    """``grpc.health.v1.Health/Check`` with raw bytes: an empty request asks about the
    whole server; any server answers it somehow (UNIMPLEMENTED if it has no health)."""
    return channel.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=_identity,
        response_deserializer=_identity,
    )


def _identity(data: bytes) -> bytes:
    return data


def _transport_callback(
    ref: weakref.ReferenceType[Supervisor], gen: Generation
) -> Callable[[grpc.ChannelConnectivity], None]:
    # Only a weak reference to the supervisor: a callback that held it strongly would
    # keep the supervisor, its channels and gRPC's poller alive forever.
    gen_ref = weakref.ref(gen)

    def callback(connectivity: grpc.ChannelConnectivity) -> None:
        supervisor = ref()
        generation = gen_ref()
        if supervisor is not None and generation is not None:
            supervisor.on_transport(generation, connectivity)

    return callback
