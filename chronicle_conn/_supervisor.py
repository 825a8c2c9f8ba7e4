"""The supervisor: the loop of one connection's background thread.

It dials (``_dialer``), backs off (``_schedule``), serves the current generation until it
is lost or replaced, and retires generations: a retired generation takes no new call
and is closed when its calls in flight have finished, or at ``drain_timeout``. It is
the only writer of the connection's state besides ``close()``; the state itself, and
everything shared with callers, lives in the core (``_core``).

Kazoo's shape: ``while not stopped: dial; serve``, every sleep an interruptible wait on
the connection's Condition.
"""

from __future__ import annotations

import enum
import math
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc

from . import _fork
from ._calls import CallError
from ._channel_factory import ChannelFactory
from ._core import Core
from ._dialer import AttemptFailed, Dialer, Interrupted, Refused, Unreachable
from ._generation import Generation, park
from ._liveness import Monitor, MonitorStatus
from ._log import FailureStreak, brief, swallow
from ._schedule import DelaySchedule, exponential
from .config import LivenessMode, ReconnectPolicy
from .errors import AuthenticationError, ChronicleConnError
from .states import ConnectionState

__all__ = ["Supervisor"]

_S = ConnectionState

DelayFactory = Callable[[ReconnectPolicy], Iterator[float]]

#: The supervisor's idle waits (connected, backing off, parked) end after at most this
#: long, so that a connection abandoned while its lock was busy (see ``Core.abandon``)
#: still shuts down; an attempt in progress ends first (``attempt_timeout``).
_HEARTBEAT = 1.0

#: After a verification that found the server fine, calls failing with UNAVAILABLE do
#: not trigger another one for this long (a server may answer UNAVAILABLE on purpose).
_SUSPECT_COOLDOWN = 1.0

_RECONNECT_REQUESTED = "reconnect requested"

#: ``max_channel_age`` is shortened by up to this fraction, at random (see ``_aged``).
_AGE_JITTER = 0.1

#: After a fork, the liveness monitor restarts once no other fork came for this long
#: (a pre-forking server forks its workers in a burst): a stream is not started only to
#: be cancelled at once, which costs the server and can deadlock one built on
#: grpcio-health-checking's servicer (grpc/grpc#43403).
_FORK_SETTLE = 0.25
#: Verifying a channel with several backends: probes at most this many times, the n-th
#: after n times this pause (see ``Supervisor._verify``).
_VERIFY_TRIES = 3
_VERIFY_PAUSE = 0.05


class _Act(enum.Enum):
    """What ``_serve`` must do about the current generation."""

    STOP = "stop"  # closing
    LOST = "lost"  # the monitor says the server is gone
    STALE = "stale"  # no sign of life within keepalive_stale_after
    VERIFY = "verify"  # something is suspicious: probe before deciding
    REPLACE = "replace"  # reconnect() or max_channel_age: make-before-break
    TICK = "tick"  # the monitor's periodic probe is due
    REAP = "reap"  # a retired generation can be closed
    PAUSE = "pause"  # a fork is being prepared (or was, and the monitor must restart)


@dataclass
class _Retiree:
    """A retired generation, waiting for its calls in flight to finish."""

    gen: Generation
    cap_at: float | None  # closed at this time even with calls in flight (None: never)
    unavailable: str  # what calls cut short at the cap are told (UNAVAILABLE)
    lost: bool  # lost, not replaced: its calls may be waiting for the server


class Supervisor:
    """The background loop of one connection (see the module docstring).

    Only :meth:`start`, :meth:`close` and the ``fork_*`` methods (``_fork``'s hooks) are
    called from other threads; everything else runs on the supervisor thread.
    """

    def __init__(
        self,
        core: Core,
        factory: ChannelFactory,
        *,
        delay_factory: DelayFactory | None = None,
    ) -> None:
        self.core = core
        self.dialer = Dialer(core, factory, self._make_generation)
        self._delay_factory: DelayFactory = delay_factory or exponential
        # Guarded by core.cond:
        self._retired: list[_Retiree] = []
        self._drained = False  # a retired generation's last call finished
        self._call_suspect: str | None = None  # a call through the facade hinted at loss
        self._verified_at = -math.inf  # the last verification that found the server there
        self._crashes = 0  # threads that ended unexpectedly (each restart waits longer)
        self._running: threading.Thread | None = None  # the thread, until its very end
        self._resumed_at = -math.inf  # time.monotonic() of the last fork's end
        self._refused_before: str | None = None  # the last connect_refused reason logged
        self._exhausted_before: str | None = None  # ... and retries_exhausted's, until up
        #: core.clock() when the connection was lost, until it is back (outage length).
        self._down_since: float | None = None
        self._streak = FailureStreak()  # failed attempts in a row, for the log
        #: Why the current channel should be rebuilt at once (make-before-break), if so.
        self._rebuild: str | None = None
        self._pid = os.getpid()
        problem = _fork.register(self)
        if problem is not None:
            core.log.warning("fork_unprotected", reason=problem)
        # A token renewal the endpoint refused: give the connection up (see _next).
        if factory.token_source is not None:
            factory.token_source.on_refused = self._wake

    # ------------------------------------------------------------------ other threads

    def start(self) -> threading.Thread:
        """Start the supervisor thread (the core calls this, lock held)."""
        thread = threading.Thread(
            target=self.run, name=f"chronicle_conn-supervisor[{self.core.label}]", daemon=True
        )
        self._running = thread
        thread.start()
        return thread

    def _wake(self) -> None:
        with self.core.cond:
            self.core.cond.notify_all()

    def close(self) -> None:
        """Close the connection: CLOSED, waiters and deferred calls fail, channels closed.

        Idempotent; every caller returns after the shutdown (bounded by
        ``close_timeout``). From the supervisor thread (a listener) it returns at once
        and the loop finishes the shutdown when the listener returns.
        """
        core = self.core
        _, thread = core.begin_close()
        if thread is threading.current_thread():
            return
        if thread is not None:
            thread.join(core.config.close_timeout)
            if thread.is_alive():
                core.log.warning("supervisor_join_timeout", timeout=core.config.close_timeout)
                return
        # No thread (never started, or died): what it left behind is closed here.
        self._close_all()

    # ------------------------------------------------------------------ fork (_fork's hooks)

    def fork_prepare(self) -> None:
        """Before a fork: ask the thread to hold (see :meth:`_hold_locked`)."""
        core = self.core
        with core.cond:
            core.fork_hold += 1
            core.cond.notify_all()

    def fork_wait(self, deadline: float) -> bool:
        """Before a fork: wait until the thread holds with none of its calls in flight
        (or is not running), or ``deadline`` (``time.monotonic()``)."""
        core = self.core
        with core.cond:
            if self._running is None:
                return True
            if self._running is threading.current_thread():
                return False  # forking from a listener: it cannot hold for itself
            return core.cond.wait_for(
                lambda: core.paused or self._running is None,
                max(0.0, deadline - time.monotonic()),
            )

    def fork_resume(self) -> None:
        """The parent after a fork: carry on (the liveness monitor restarts)."""
        core = self.core
        with core.cond:
            core.fork_hold = max(0, core.fork_hold - 1)
            self._resumed_at = time.monotonic()
            core.cond.notify_all()

    def fork_late(self, timeout: float) -> None:
        """The parent after a fork that did not wait for this connection."""
        self.core.log.warning(
            "fork_not_quiesced",
            timeout=timeout,
            detail="the connection's own calls may have been in flight at fork()",
        )

    def fork_child(self) -> None:
        """In a forked child (only the forking thread exists): park every inherited
        generation (never used, closed or collected there: closing one can hang in the
        child), forget the parent's thread and reset the core to IDLE. Idempotent."""
        if self._pid == os.getpid():
            return
        self._pid = os.getpid()
        core = self.core
        retired, self._retired = self._retired, []
        for gen in [r.gen for r in retired] + [core.current, core.dropped]:
            if gen is not None:
                park(gen)
        core.dropped = None
        self._drained = False
        self._call_suspect = None
        self._crashes = 0
        self._running = None
        self._down_since = None  # the child starts over: no outage of its own yet
        self._streak = FailureStreak()
        self._exhausted_before = None
        self.dialer.factory.fork_child()
        core.reset_after_fork()

    def _hold_locked(self) -> None:
        """Lock held. While a fork is being prepared: once no call of this connection's
        monitors is in flight, say so (``core.paused``) and wait until the fork is over
        (or closing). The caller has no call of its own in flight."""
        core = self.core
        if not core.fork_hold:
            return
        while core.fork_hold and not self._stopping() and not self._quiet():
            core.cond.wait(_HEARTBEAT)
        if not core.fork_hold or self._stopping():
            return
        core.paused = True
        core.cond.notify_all()
        try:
            while core.fork_hold and not self._stopping():
                core.cond.wait(_HEARTBEAT)
        finally:
            core.paused = False

    def _quiet(self) -> bool:
        """No monitor of a generation of ours has a call in flight. Lock held."""
        gens = [r.gen for r in self._retired]
        if self.core.current is not None:
            gens.append(self.core.current)
        return all(g.monitor.quiet() for g in gens)

    # ------------------------------------------------------------------ the thread

    def run(self) -> None:
        """The thread's target: the loop, and whatever happens, a state that tells the truth."""
        try:
            self._after_crash()
            self._loop()
        except BaseException:
            self.core.log.exception("supervisor_crashed")
        finally:
            try:
                self._exit()
            finally:
                with self.core.cond:
                    if self._running is threading.current_thread():
                        self._running = None
                    self.core.cond.notify_all()

    def _after_crash(self) -> None:
        """A thread that replaces one that died waits a little first (longer each time,
        up to reconnect_max_delay), so that a fault that kills every thread does not
        turn into a busy loop."""
        core = self.core
        policy = core.config.policy
        until = core.clock() + min(self._crashes * policy.base_delay, policy.max_delay)
        with core.cond:
            while not self._stopping() and (now := core.clock()) < until:
                self._hold_locked()
                core.cond.wait(min(until - now, _HEARTBEAT))

    def _stopping(self) -> bool:
        core = self.core
        return core.closing or core.abandoned

    def _loop(self) -> None:
        core = self.core
        while True:
            self._reap()
            with core.cond:
                if self._stopping():
                    return
                if core.fork_hold:
                    self._hold_locked()
                    continue
                if not core.armed:
                    # Parked (IDLE/FAILED): wake to close retired channels when due.
                    core.cond.wait(self._timeout(math.inf))
                    continue
                if core.state in (_S.IDLE, _S.FAILED):
                    core.transition(_S.CONNECTING)
            try:
                core.deliver()
                gen = self._dial()
                while gen is not None:
                    gen = self._serve(gen)
            except Exception as exc:
                # Never die silently: log it, treat it as a lost connection, dial again.
                core.log.exception("supervisor_error")
                with core.cond:
                    gen = core.current
                if gen is not None:
                    self._lose(gen, f"internal error: {exc!r}", exc)
                with core.cond:
                    if not self._stopping():
                        self._hold_locked()
                        core.cond.wait(core.config.policy.base_delay)

    def _exit(self) -> None:
        core = self.core
        if core.abandoned and not core.closing:
            core.begin_close(error="garbage-collected without close()")
        with core.cond:
            stopping = core.closing
            gen = core.current
            core.current = None
            if not stopping:
                # Died unexpectedly: say so, and start again at once for the calls that
                # wait in the background (a blocking caller restarts it when it wakes,
                # any later caller too).
                self._crashes += 1
                if core.state is _S.CONNECTED:
                    core.transition(
                        _S.RECONNECTING, error="the supervisor thread stopped unexpectedly"
                    )
                core.thread = None
                core.prune_deferred()
                if core.deferred or self._stranded():
                    core.ensure_thread()  # calls wait in the background for a channel
                core.cond.notify_all()
        if stopping:
            self.dialer.factory.close()
            self.dialer.join_io()
            if gen is not None:
                self._retire(gen, "closed")
            self._close_all()
        elif gen is not None:
            self._retire(gen, "chronicle_conn: the supervisor thread stopped unexpectedly")
            if core.closing:  # close() may have run its _close_all before that
                self._close_all()
        core.deliver()

    # ------------------------------------------------------------------ waiting

    def _timeout(self, until: float, now: float | None = None) -> float:
        """Seconds to wait for ``until``, shortened for retired generations due to be
        closed and bounded by the heartbeat. Lock held."""
        now = self.core.clock() if now is None else now
        wake = min(until, self._reap_at(), now + _HEARTBEAT)
        return max(0.0, wake - now)

    def _reap_at(self) -> float:
        """When the next retired generation is due to be closed. Lock held."""
        if self._drained:
            return -math.inf
        caps = [r.cap_at for r in self._retired if r.cap_at is not None]
        return min(caps, default=math.inf)

    def _stranded(self) -> bool:
        """Whether ``wait_for_ready`` calls are in flight on a lost generation (caught
        there, they wait for the server too): demand. Lock held."""
        return any(r.lost and r.gen.waiting for r in self._retired)

    def _on_drained(self) -> None:
        """A retired generation's last call finished (any thread)."""
        core = self.core
        with core.cond:
            self._drained = True
            core.cond.notify_all()

    def _on_suspect(self, gen: Generation, reason: str) -> None:
        """A call through the facade failed in a way that suggests loss (any thread)."""
        core = self.core
        if core.clock() - self._verified_at < _SUSPECT_COOLDOWN:
            return
        with core.cond:
            if gen is core.current and self._call_suspect is None:
                self._call_suspect = reason
                core.cond.notify_all()

    # ------------------------------------------------------------------ dialing

    def _make_generation(self, channel: grpc.Channel, monitor: Monitor) -> Generation:
        core = self.core
        with core.cond:
            core.counters.generation += 1
            number = core.counters.generation
        now = core.clock()
        gen = Generation(
            number,
            channel,
            monitor,
            on_drained=self._on_drained,
            on_suspect=self._on_suspect,
        )
        max_age = core.config.max_channel_age
        if max_age is not None:
            gen.rotate_at = now + _aged(max_age)
        return gen

    def _dial(self) -> Generation | None:
        """Attempt until connected (returns the generation), exhausted or closing (None)."""
        core = self.core
        policy = core.config.policy
        schedule = DelaySchedule(policy, self._delay_factory(policy))
        while True:
            self._reap()
            with core.cond:
                self._hold_locked()
                if self._stopping():
                    return None
                core.reconnect_requested = False
                counted = schedule.start(core.clock())
                core.counters.attempts += 1
                core.current_delay = None
            core.log.debug(
                "attempt_started",
                attempt=schedule.counted,
                **({} if counted else {"beyond_budget": True}),
            )
            result = self.dialer.attempt(schedule.counted)
            if isinstance(result, Generation):
                return self._install(result, schedule.counted)
            if isinstance(result, Interrupted):
                schedule.interrupted()
                with core.cond:
                    core.counters.attempts -= 1
                continue
            if isinstance(result, Refused):
                self._exhausted(schedule.counted, result, refused=result.error)
                return None
            schedule.failed(core.clock())
            with core.cond:
                core.counters.failed_attempts += 1
                core.last_error = str(result)
                core.last_exc = result
                if self._stopping():
                    return None
                core.current_delay = schedule.delay
            if schedule.exhausted:
                self._exhausted(schedule.counted, result)
                return None
            self._log_failure(schedule, str(result))
            self._backoff(schedule)

    def _log_failure(self, schedule: DelaySchedule, error: str) -> None:
        """One failed attempt: ``attempt_failed`` at DEBUG. The first of a connect (an
        outage has ``connection_lost``) is also ``connect_failing`` at INFO, and a long
        run of them is summarised now and then at WARNING (see ``FailureStreak``)."""
        core = self.core
        delay = round(schedule.delay or 0.0, 3)
        core.log.debug("attempt_failed", attempt=schedule.counted, error=error, delay=delay)
        short = brief(error) or error
        summary = self._streak.failed(core.clock(), short)
        if self._streak.total == 1 and self._down_since is None:
            core.log.info("connect_failing", error=short, retry_in=delay)
        if summary is not None:
            core.log.warning("still_failing", **summary)

    def _backoff(self, schedule: DelaySchedule) -> None:
        """Sleep until the next attempt is due: the exponential schedule, or the demand
        cadence while a caller wants the connection now. Demand beginning,
        ``reconnect()`` and ``close()`` wake it (the Condition is notified)."""
        core = self.core
        while True:
            self._reap()
            with core.cond:
                self._hold_locked()
                if self._stopping() or core.reconnect_requested:
                    return
                core.prune_deferred()
                now = core.clock()
                wake = schedule.wake_at(core.has_demand(now) or self._stranded())
                if now >= wake:
                    return
                core.cond.wait(self._timeout(wake, now))

    def _install(self, gen: Generation, attempt: int) -> Generation | None:
        """Make ``gen`` current and CONNECTED, and send the calls that waited for it."""
        core = self.core
        outage: float | None = None
        with core.cond:
            installed = not self._stopping()
            deferred: list[CallError] = []
            if installed:
                core.current = gen
                core.counters.connects += 1
                core.current_delay = None
                core.armed = True
                self._crashes = 0
                if self._down_since is not None:
                    outage = round(max(0.0, core.clock() - self._down_since), 3)
                    self._down_since = None
                core.transition(_S.CONNECTED, attempt=attempt, outage=outage)
                self._refused_before = self._exhausted_before = None
                factory = self.dialer.factory
                if factory.round_robin and factory.serves_health and not factory.built_with_health:
                    # Learnt on this channel that the server serves health: the next
                    # one skips NOT_SERVING backends (client-side health checking).
                    self._rebuild = "client-side health checking"
                deferred = core.take_deferred()
        if not installed:
            self._retire(gen, "closed")
            return None
        core.deliver()
        self._send(gen, deferred)
        failed, self._streak = self._streak.total, FailureStreak()
        if outage is None:
            core.log.info(
                "connected", generation=gen.number, liveness=core.liveness, failed_attempts=failed
            )
        else:
            core.log.info(
                "reconnected",
                generation=gen.number,
                outage_s=outage,
                failed_attempts=failed,
                liveness=core.liveness,
            )
        return gen

    def _send(self, gen: Generation, calls: list[CallError]) -> None:
        for call in calls:
            if not call.pending:
                continue
            if not gen.enter(True):  # cannot happen: only this thread retires generations
                self.core.defer(call)
                continue
            try:
                sent = call.send(gen)
            except BaseException as exc:  # one call's trouble must not strand the others
                swallow(exc)
                self.core.log.exception("send_failed")
                sent = False
            if not sent:
                gen.leave(True)

    def _exhausted(
        self, attempts: int, error: AttemptFailed, *, refused: ChronicleConnError | None = None
    ) -> None:
        """Give up: FAILED, waiters and deferred calls told. ``refused``: not because a
        budget ran out but because retrying cannot help (waiters get that error)."""
        core = self.core
        with core.cond:
            if self._stopping():
                return
            core.armed = False
            core.exhaustions += 1
            core.refusal = refused
            if refused is not None:
                core.counters.failed_attempts += 1
                core.last_error = str(error)
                core.last_exc = error
                core.current_delay = None
            core.transition(_S.FAILED, attempt=attempts, error=str(error))
            deferred = core.take_deferred()
        if refused is not None:
            code = (
                grpc.StatusCode.UNAUTHENTICATED
                if isinstance(refused, AuthenticationError)
                else grpc.StatusCode.UNAVAILABLE
            )
            for call in deferred:
                call.finish(code, f"chronicle_conn: {error}")
        else:
            for call in deferred:
                call.finish(
                    grpc.StatusCode.UNAVAILABLE,
                    f"chronicle_conn: gave up connecting after {attempts} attempts; "
                    f"last error: {error}",
                )
        core.deliver()
        if refused is not None:
            # Once per reason: a busy app re-arms a FAILED connection again and again.
            repeated = str(error) == self._refused_before
            self._refused_before = str(error)
            log = core.log.debug if repeated else core.log.error
            log("connect_refused", error=str(error), kind=type(refused).__name__)
        else:
            # Once per outage and cause: a busy app re-arms a FAILED connection again and
            # again; the streak (not reset here) summarises the rest (still_failing).
            short = brief(str(error))
            repeated = short == self._exhausted_before
            self._exhausted_before = short
            log = core.log.debug if repeated else core.log.warning
            log("retries_exhausted", attempts=attempts, error=short)
        callback = core.config.on_retries_exhausted
        conn = core.owner()
        if callback is not None and conn is not None:
            try:
                callback(conn)
            except BaseException as exc:
                swallow(exc)
                core.log.exception("on_retries_exhausted_failed")

    # ------------------------------------------------------------------ connected

    def _serve(self, gen: Generation) -> Generation | None:
        """Watch ``gen`` until it is lost (None) or replaced (the new one)."""
        core = self.core
        while True:
            self._reap()
            action, reason = self._next(gen)
            if action is _Act.STOP:
                return None
            if action is _Act.TICK:
                gen.monitor.tick()
                continue
            if action is _Act.REAP:
                continue
            if action is _Act.PAUSE:
                failure = self._pause(gen)
                if failure is not None:
                    self._lose(gen, f"liveness after fork(): {failure}", failure)
                    return None
                continue
            if action is _Act.STALE:
                core.log.debug("liveness_stale", reason=reason)  # connection_lost says it
            if action in (_Act.LOST, _Act.STALE):
                self._lose(gen, reason)
                return None
            if action is _Act.REPLACE:
                replacement = self._replace(gen, reason)
                if replacement is not None:
                    return replacement
                continue
            # VERIFY. A cold channel is not a dead one (idle timeout, a GOAWAY from a
            # healthy server): a probe tells, and a dead server refuses it at once.
            core.log.debug("verifying", reason=reason)
            failure = self._verify(gen)
            if isinstance(failure, Interrupted):
                with core.cond:
                    self._call_suspect = self._call_suspect or reason  # verify after the fork
                continue
            if failure is not None:
                self._lose(gen, f"{reason}; {failure}", failure)
                return None
            with core.cond:
                self._verified_at = core.clock()

    def _verify(self, gen: Generation) -> AttemptFailed | None:
        """Is ``gen``'s server (one of its backends) still there? A probe, and the
        liveness monitor opened again if its stream ended. None if so.

        With several backends, a dead one may still be picked for a moment after it
        died (its transport not yet known to be gone), so an unreachable answer is
        asked again, a little later, up to ``_VERIFY_TRIES`` times: the connection is
        lost only when no backend answers."""
        core = self.core
        tries = _VERIFY_TRIES if self._several_backends(gen) else 1
        failure: AttemptFailed | None = None
        for attempt in range(tries):
            if attempt:
                with core.cond:
                    core.cond.wait_for(
                        lambda: self._stopping() or core.fork_hold, _VERIFY_PAUSE * attempt
                    )
                    if core.fork_hold:
                        return Interrupted()  # verified again after the fork
                if self._stopping():
                    return None
            failure = self.dialer.probe(gen.channel, core.clock() + core.config.attempt_timeout)
            if failure is None and gen.monitor.status in (
                MonitorStatus.ENDED,
                MonitorStatus.FAILED,
            ):
                failure = self._restart_monitor(gen, alive_at=core.clock())
            if not isinstance(failure, Unreachable):
                return failure  # None, Interrupted (a fork), or not about reachability
        return failure

    def _several_backends(self, gen: Generation) -> bool:
        factory = self.dialer.factory
        resolution = factory.resolution_of(gen.channel)
        return factory.round_robin or (resolution is not None and len(resolution.addresses) > 1)

    def _next(self, gen: Generation) -> tuple[_Act, str]:
        """Wait (under the lock) until something needs doing about ``gen``."""
        core = self.core
        config = core.config
        with core.cond:
            while True:
                if self._stopping():
                    return _Act.STOP, ""
                now = core.clock()
                monitor = gen.monitor
                # Signs of loss first: neither forks nor reconnect() called in a loop may
                # hide them.
                if monitor.status is MonitorStatus.LOST:
                    return _Act.LOST, monitor.error or "liveness lost"
                refused = self.dialer.factory.refused
                if refused is not None:
                    return _Act.LOST, str(refused)
                stale_at = monitor.deadline()
                if stale_at is not None and now >= stale_at:
                    return _Act.STALE, _stale_reason(monitor, config.keepalive_stale_after)
                if core.fork_hold or monitor.status is MonitorStatus.STOPPED:
                    return _Act.PAUSE, ""
                ended = monitor.status in (MonitorStatus.ENDED, MonitorStatus.FAILED)
                if monitor.suspect or self._call_suspect or ended:
                    reason = monitor.suspect or self._call_suspect or monitor.error or "suspect"
                    monitor.suspect = None
                    self._call_suspect = None
                    return _Act.VERIFY, reason
                if core.reconnect_requested:
                    core.reconnect_requested = False
                    return _Act.REPLACE, _RECONNECT_REQUESTED
                if self._rebuild is not None:
                    reason, self._rebuild = self._rebuild, None
                    return _Act.REPLACE, reason
                rotate_at = gen.rotate_at if gen.rotate_at is not None else math.inf
                if now >= rotate_at:
                    return _Act.REPLACE, "max_channel_age"
                tick_at = monitor.next_tick()
                if tick_at is not None and now >= tick_at:
                    return _Act.TICK, ""
                if self._reap_at() <= now:
                    return _Act.REAP, ""
                wake = min(
                    stale_at if stale_at is not None else math.inf,
                    rotate_at,
                    tick_at if tick_at is not None else math.inf,
                )
                core.cond.wait(self._timeout(wake, now))

    def _restart_monitor(
        self, gen: Generation, alive_at: float | None = None
    ) -> AttemptFailed | None:
        """Open ``gen``'s liveness monitor again: its stream ended on a healthy transport
        (a GOAWAY, say; ``alive_at``: when a probe proved the server there), or a fork
        stopped it (then the old monitor's last sign of life still counts)."""
        core = self.core
        old = gen.monitor
        old.stop()
        old.join(core.config.close_timeout)
        now = core.clock()
        deadline = now + core.config.attempt_timeout
        if alive_at is None:
            with core.cond:
                alive_at = old.last_seen
            if alive_at is not None:
                # A restart is no sign of life: the server has until the old monitor's
                # staleness deadline (at least a moment) to answer the new one.
                stale_at = alive_at + core.config.keepalive_stale_after
                deadline = min(deadline, max(now + 0.1, stale_at))
        monitor, error = self.dialer.establish(
            gen.channel, deadline, previous=old, alive_at=alive_at
        )
        if monitor is None:
            return error  # gen keeps the old monitor; _retire counts its keep-alives
        with core.cond:
            core.counters.absorb(old)
            gen.monitor = monitor
        return None

    def _pause(self, gen: Generation) -> AttemptFailed | None:
        """A fork is being prepared: stop ``gen``'s monitor, hold until the fork is over
        and no other came for ``_FORK_SETTLE``, then restart the monitor on the same
        channel (no state change). Returns why it could not be restarted (the
        generation is then lost), or None."""
        core = self.core
        gen.monitor.stop()
        with core.cond:
            while True:
                self._hold_locked()
                if self._stopping():
                    return None
                settled_in = self._resumed_at + _FORK_SETTLE - time.monotonic()
                if settled_in <= 0 and not core.fork_hold:
                    break
                core.cond.wait(min(max(settled_in, 0.0), _HEARTBEAT))
        failure = self._restart_monitor(gen)
        if isinstance(failure, Interrupted):
            return None  # another fork: the monitor is STOPPED, _next pauses again
        return failure

    def _lose(self, gen: Generation, reason: str, exc: BaseException | None = None) -> None:
        """``gen`` is lost: RECONNECTING, and retire it (its calls finish as grpc ends them)."""
        core = self.core
        with core.cond:
            if core.current is gen:
                core.current = None
            core.counters.absorb(gen.monitor)  # stats() counts only current's live
            stopping = self._stopping()
            if not stopping:
                core.last_error = reason
                core.last_exc = exc
                core.counters.disconnects += 1
                if self._down_since is None:
                    self._down_since = core.clock()
                if core.state is _S.CONNECTED:
                    core.transition(_S.RECONNECTING, error=reason)
        if not stopping:
            core.log.warning("connection_lost", reason=brief(reason), generation=gen.number)
        core.deliver()
        self._retire(
            gen, f"chronicle_conn: connection lost ({reason}); drain_timeout passed", lost=True
        )

    def _replace(self, gen: Generation, reason: str) -> Generation | None:
        """Make-before-break: dial a new generation while ``gen`` serves, then swap them
        (no state change). On failure ``gen`` keeps serving. Returns the new one."""
        core = self.core
        result = self.dialer.attempt(0)
        if isinstance(result, Interrupted):
            with core.cond:  # try again after the fork
                if reason == _RECONNECT_REQUESTED:
                    core.reconnect_requested = True
            return None
        if not isinstance(result, Generation):
            if self._stopping():
                return None
            core.log.warning("replacement_failed", reason=reason, error=brief(str(result)))
            with core.cond:
                core.last_error = f"{reason}: {result}"
                core.last_exc = result
                if isinstance(result, Unreachable):
                    # The server refused a new connection: is the current one still good?
                    self._call_suspect = self._call_suspect or f"{reason}: {result}"
            max_age = core.config.max_channel_age
            if gen.rotate_at is not None and max_age is not None:
                gen.rotate_at = core.clock() + _aged(max_age)
            return None
        with core.cond:
            installed = not self._stopping()
            if installed:
                core.current = result
                core.counters.absorb(gen.monitor)  # stats() counts only current's live
        if not installed:
            self._retire(result, "closed")
            return None
        core.log.info("channel_replaced", reason=reason, generation=result.number)
        self._retire(gen, f"chronicle_conn: channel replaced ({reason}); drain_timeout passed")
        return result

    # ------------------------------------------------------------------ retiring

    def _retire(self, gen: Generation, unavailable: str, *, lost: bool = False) -> None:
        """Stop watching ``gen`` and refuse it new calls; it is closed (by ``_reap``)
        when its calls in flight have finished, or at ``drain_timeout``."""
        core = self.core
        gen.monitor.stop()
        drain = core.config.drain_timeout
        cap_at = None if drain is None else core.clock() + drain
        drained = gen.retire()
        with core.cond:
            core.counters.absorb(gen.monitor)
            self._retired.append(_Retiree(gen, cap_at, unavailable, lost))
            if drained:
                self._drained = True
        self._reap()

    def _reap(self) -> None:
        """Close the retired generations that have drained or reached their cap.
        Supervisor thread, no lock held."""
        core = self.core
        with core.cond:
            if not self._retired:
                return
            now = core.clock()
            self._drained = False
            due: list[tuple[_Retiree, bool]] = []
            keep: list[_Retiree] = []
            for retiree in self._retired:
                if retiree.gen.close_if_drained():
                    due.append((retiree, False))
                elif retiree.cap_at is not None and now >= retiree.cap_at:
                    if retiree.gen.close_if_drained(force=True):
                        due.append((retiree, True))
                else:
                    keep.append(retiree)
            self._retired = keep
        for retiree, forced in due:
            if forced:
                core.log.warning(
                    "drain_timeout_passed",
                    generation=retiree.gen.number,
                    calls_cut=retiree.gen.in_flight,
                )
            self._dispose(retiree.gen, retiree.unavailable if forced else None)

    def _dispose(self, gen: Generation, unavailable: str | None) -> None:
        monitor = gen.monitor
        monitor.stop()
        self.dialer.dispose(gen.channel, unavailable=unavailable)
        monitor.join(self.core.config.close_timeout)

    def _close_all(self) -> None:
        """Closing: close every generation now, calls in flight or not (they end with
        CANCELLED: the application closed the connection)."""
        core = self.core
        with core.cond:
            retired, self._retired = self._retired, []
            self._drained = False
            current, dropped = core.current, core.dropped
            core.current = core.dropped = None
        gens = [r.gen for r in retired] + [g for g in (current, dropped) if g is not None]
        for each in gens:
            each.monitor.stop()  # cancel every stream first, then close, then join
        for each in gens:
            if each.close_if_drained(force=True):
                self.dialer.dispose(each.channel)
        for each in gens:
            each.monitor.join(core.config.close_timeout)
        core.unbind()


def _aged(max_age: float) -> float:
    """``max_channel_age`` less up to a tenth, at random: connections made together (a
    hundred workers started at once) do not all rebuild their channels together."""
    return max_age * random.uniform(1.0 - _AGE_JITTER, 1.0)


def _stale_reason(monitor: Monitor, stale_after: float) -> str:
    if monitor.mode is LivenessMode.KEEPALIVE:
        return f"no keep-alive for {stale_after:g}s (kernel hung or network partitioned)"
    return (
        f"no answer to {monitor.mode.value} probes for {stale_after:g}s "
        "(server hung or network partitioned)"
    )
