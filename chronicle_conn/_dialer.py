"""One attempt: a fresh candidate channel, proven ready, its liveness established.

An attempt builds a candidate from the connection's channel factory (every candidate has
its own subchannel pool, so no backoff timer of an older channel delays it) and sends it
a fail-fast probe (``grpc.health.v1.Health/Check`` on raw bytes). The probe is the
readiness check: it makes the channel connect now, comes back within milliseconds when
the connection is refused or the TLS handshake fails (with grpc's reason in its
details), is answered somehow by any server that is there (``UNIMPLEMENTED`` counts),
and its deadline bounds a black-holed host. Then the liveness monitor is started and
the attempt waits until it is established. ``channel_ready_future`` is not used: it
has no failure outcome, and it starts grpc's connectivity poller, whose 200 ms watch
then holds the channel's ``close()`` for as long.

Every wait here ends early when the connection is closed. A ``fork()`` being prepared
(see ``_fork``) interrupts it (:class:`Interrupted`: its calls are cancelled and waited
for, so that none is in flight at the fork): a probe at once, a monitor being
established only after ``_ESTABLISH_GRACE`` (that normally takes milliseconds, and a
stream cancelled as it starts can deadlock a server built on grpcio-health-checking's
servicer, grpc/grpc#43403).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import grpc

from . import _health
from ._channel_factory import ChannelFactory
from ._core import Core
from ._generation import Generation
from ._liveness import AUTO_ORDER, Monitor, MonitorStatus, describe, make_monitor, rpc_status
from ._version import __version__
from .config import LivenessMode
from .errors import AuthenticationError, ChronicleConnError, TlsError

__all__ = ["AttemptFailed", "Dialer", "Interrupted", "Refused", "Unreachable"]

#: How often health and transport monitors probe, at most (see ``Dialer.probe_interval``).
PROBE_INTERVAL = 1.0


class AttemptFailed(Exception):
    """Why one attempt (or a verification) failed; chained as the cause of
    ``RetriesExhaustedError``."""


class Unreachable(AttemptFailed):
    """A probe came back ``UNAVAILABLE``: the transport is down."""


class Refused(AttemptFailed):
    """A failure retrying cannot fix (TLS misconfigured, credentials refused): the
    connection goes FAILED at once and waiters get ``error``."""

    def __init__(self, error: ChronicleConnError) -> None:
        super().__init__(str(error))
        self.error = error


class Interrupted(AttemptFailed):
    """Cut short because a ``fork()`` is being prepared: says nothing about the server."""

    def __init__(self) -> None:
        super().__init__("interrupted by fork()")


#: How long an interrupted probe may take to report its cancellation (normally at once).
_CANCEL_WAIT = 1.0

#: A fork interrupts a monitor being established only once it has waited this long.
_ESTABLISH_GRACE = 0.2

#: How long past its deadline socket work (see ``Dialer._io``) may take to report.
_IO_GRACE = 0.5

#: How long close() waits for socket work it cut short (``Dialer.join_io``).
_IO_JOIN = 0.5


MakeGeneration = Callable[[grpc.Channel, Monitor], Generation]


class Dialer:
    """Makes attempts for one connection. Used by the supervisor thread only.

    Args:
        core: the connection's core (its Condition, clock, config, closing flag).
        factory: builds and disposes of the channels.
        make_generation: wraps a ready channel and its established monitor.
    """

    def __init__(
        self, core: Core, factory: ChannelFactory, make_generation: MakeGeneration
    ) -> None:
        self._core = core
        self._factory = factory
        self._make_generation = make_generation
        config = core.config
        self._attempt_timeout = config.attempt_timeout
        self._stale_after = config.keepalive_stale_after
        #: Periodic probes come at least three times within ``keepalive_stale_after``.
        self.probe_interval = min(PROBE_INTERVAL, config.keepalive_stale_after / 3)
        #: Socket work still running on its own thread (see ``_io``); supervisor only.
        self._io_threads: list[threading.Thread] = []

    @property
    def factory(self) -> ChannelFactory:
        return self._factory

    def attempt(self, number: int) -> Generation | AttemptFailed:
        """Dial once: a Generation (connected, liveness established) or why not."""
        core = self._core
        deadline = core.clock() + self._attempt_timeout
        wall_deadline = time.monotonic() + self._attempt_timeout  # for socket timeouts
        factory = self._factory
        resolution = factory.static
        if resolution is None:  # names to resolve (several hosts, SRV): at every build
            resolution = self._io(lambda: factory.resolve(wall_deadline), wall_deadline)
            if isinstance(resolution, AttemptFailed):
                return resolution
            if isinstance(resolution, OSError):
                return Unreachable(f"resolving the hosts: {resolution}")
            if isinstance(resolution, BaseException):
                return AttemptFailed(f"could not resolve the hosts: {resolution!r}")
        pin = None
        if factory.pins:  # skipTlsValidation: the server's certificate, first
            pin = self._io(lambda: factory.fetch_pin(wall_deadline, resolution), wall_deadline)
            if isinstance(pin, AttemptFailed):
                return pin
            if isinstance(pin, OSError):
                return self._diagnosed(Unreachable(str(pin)), wall_deadline)
            if isinstance(pin, BaseException):
                return AttemptFailed(f"could not fetch the server's certificate: {pin!r}")
        try:
            channel = factory.build(pin, resolution)
        except Exception as exc:
            return AttemptFailed(f"could not build the channel: {exc!r}")
        failure: AttemptFailed | None
        try:
            failure = self.probe(channel, deadline, readiness=True)
            if isinstance(failure, Unreachable):
                failure = self._diagnosed(failure, wall_deadline)
            fetched = False
            if failure is None:
                failure, fetched = self._authenticate(wall_deadline)
            if failure is None:
                monitor, failure = self.establish(channel, deadline)
                if (
                    isinstance(failure, Refused)
                    and isinstance(failure.error, AuthenticationError)
                    and factory.token_source is not None
                    and not fetched
                ):
                    # The server refused a token it may have forgotten (a restarted
                    # kernel): only a fresh one being refused means the credentials are.
                    failure, _ = self._authenticate(wall_deadline, fresh=True)
                    if failure is None:
                        monitor, failure = self.establish(channel, deadline)
                if monitor is not None:
                    if factory.round_robin and factory.serves_health is None:
                        factory.serves_health = self._serves_health(channel, deadline)
                    return self._make_generation(channel, monitor)
        except Exception as exc:
            failure = AttemptFailed(f"attempt {number} failed: {exc!r}")
        self.dispose(channel)
        return failure or AttemptFailed("attempt failed")

    def _io(self, work: Callable[[], Any], deadline: float, blocks: bool = True) -> Any:
        """Run ``work`` (socket I/O of the standard library's, which close() cannot cut
        short) on a short-lived thread while this one waits, interruptibly: returns its
        result or the exception it raised, or an :class:`AttemptFailed` when close() or
        a fork came first (the thread then ends by itself within its own timeout).
        ``blocks=False``: ``work`` does no I/O, run it here."""
        if not blocks:
            try:
                return work()
            except Exception as exc:
                return exc
        core = self._core
        box: list[Any] = []

        def run() -> None:
            try:
                result: Any = work()
            except Exception as exc:
                result = exc
            with core.cond:
                box.append(result)
                core.cond.notify_all()

        thread = threading.Thread(target=run, name=f"chronicle_conn-io[{core.label}]", daemon=True)
        self._io_threads = [t for t in self._io_threads if t.is_alive()]
        self._io_threads.append(thread)
        thread.start()
        with core.cond:
            core.cond.wait_for(
                lambda: bool(box) or core.closing or core.abandoned or core.fork_hold > 0,
                max(0.0, deadline - time.monotonic()) + _IO_GRACE,
            )
            if box:
                return box[0]
            if core.closing or core.abandoned:
                return AttemptFailed("connection closed")
            if core.fork_hold:
                return Interrupted()
        return AttemptFailed(f"no answer within {self._attempt_timeout:g}s")

    def join_io(self) -> None:
        """On close: give socket work cut short by close() a moment (``_IO_JOIN``) to
        end. Work against a peer that hangs ends later, within its own timeout."""
        until = time.monotonic() + _IO_JOIN
        for thread in self._io_threads:
            thread.join(max(0.0, until - time.monotonic()))
        self._io_threads = [t for t in self._io_threads if t.is_alive()]

    def _diagnosed(self, failure: Unreachable, deadline: float) -> AttemptFailed:
        """A transport failure that is really a configuration mistake (TLS against a
        plaintext server, an untrusted certificate...) becomes :class:`Refused`; one
        that may be (a server that closes the connection after the handshake) keeps
        being retried, with the likely reason in its message."""
        details = str(failure)
        if not _looks_misconfigured(details):
            return failure
        factory = self._factory
        found = self._io(lambda: factory.diagnose(details, deadline), deadline)
        if isinstance(found, AttemptFailed):
            return found
        if isinstance(found, BaseException):  # a diagnosis must never break an attempt
            self._core.log.debug("tls_diagnosis_failed", error=repr(found))
            return failure
        if found is None:
            return failure
        if found.definite:
            return Refused(TlsError(found.message))
        return Unreachable(f"{details} ({found.message})")

    def _authenticate(
        self, deadline: float, *, fresh: bool = False
    ) -> tuple[AttemptFailed | None, bool]:
        """Client credentials: a token before the first call that needs one. Returns
        why not, and whether a token was fetched."""
        factory = self._factory
        source = factory.token_source
        if source is None:
            return None, False
        blocks = fresh or source.needs_fetch()
        result = self._io(lambda: factory.authenticate(deadline, fresh=fresh), deadline, blocks)
        if isinstance(result, AttemptFailed):
            return result, False
        if isinstance(result, AuthenticationError):
            return Refused(result), True
        if isinstance(result, BaseException):  # the endpoint is down or answered nonsense
            return AttemptFailed(str(result)), False
        return None, bool(result)

    def dispose(self, channel: grpc.Channel, *, unavailable: str | None = None) -> None:
        """Close a channel (never raises: a failure is logged)."""
        try:
            self._factory.dispose(channel, unavailable=unavailable)
        except Exception:
            self._core.log.exception("channel_close_failed")

    def probe(
        self, channel: grpc.Channel, deadline: float, *, readiness: bool = False
    ) -> AttemptFailed | None:
        """Is the server behind ``channel`` there? None if it answered (anything, even
        ``UNIMPLEMENTED``); :class:`Unreachable` if the transport is down; else why not.

        A fail-fast call makes an IDLE channel connect at once and fails within
        milliseconds against a server that refuses connections. Ends early on close().
        """
        core = self._core
        timeout = max(0.001, deadline - core.clock())
        try:
            future = _health.probe_callable(channel).future(
                b"", timeout=timeout, wait_for_ready=False
            )
        except ValueError as exc:  # closed channel
            return AttemptFailed(f"probe: {exc}")
        if not self._await(future, deadline):
            future.cancel()
            if core.closing or core.abandoned:
                return AttemptFailed("connection closed")
            if core.fork_hold:
                # No call of ours may be in flight at the fork: wait for the cancellation.
                self._await(future, core.clock() + _CANCEL_WAIT, interruptible=False)
                return Interrupted()
            return AttemptFailed(self._timed_out(readiness))
        error = future.exception()
        if error is None:
            return None
        if not isinstance(error, grpc.RpcError):  # a closed (intercepted) channel, say
            return AttemptFailed(f"probe: {error!r}")
        code, _ = rpc_status(error)
        if code is grpc.StatusCode.UNAVAILABLE:
            return Unreachable(describe(error))
        if code is grpc.StatusCode.DEADLINE_EXCEEDED:
            return AttemptFailed(self._timed_out(readiness))
        return None  # the server answered (UNIMPLEMENTED, UNAUTHENTICATED, ...)

    def _serves_health(self, channel: grpc.Channel, deadline: float) -> bool | None:
        """Whether the server serves ``grpc.health.v1`` (None: could not tell now). With
        round robin, the next channels then turn on gRPC's client-side health checking
        (``ChannelFactory.service_config``).

        Asked without the connection's credentials (``apiKey``, a token): gRPC's health
        watch carries none, so a server whose health service wants them would look
        unhealthy on every backend; it counts as not serving health."""
        core = self._core
        factory = self._factory
        bare = factory.bare(channel)
        if core.liveness == LivenessMode.HEALTH.value and bare is channel:
            return True
        deadline = min(deadline, core.clock() + 1.0)
        try:
            future = _health.check_callable(bare).future(
                _health.load().HealthCheckRequest(service=""),
                timeout=max(0.001, deadline - core.clock()),
                wait_for_ready=False,
            )
        except ValueError:  # closed channel
            return None
        if not self._await(future, deadline):
            future.cancel()
            return None
        error = future.exception()
        if error is None:
            # Whole-server health that says SERVING or NOT_SERVING (client-side health
            # checking takes any other answer, and no answer, for "not serving").
            return future.result().status in (_health.SERVING, _health.NOT_SERVING)
        code, _ = rpc_status(error)
        if code in (
            grpc.StatusCode.UNIMPLEMENTED,  # no health service
            grpc.StatusCode.NOT_FOUND,  # none for the whole server
            grpc.StatusCode.UNAUTHENTICATED,  # only with credentials
            grpc.StatusCode.PERMISSION_DENIED,
        ):
            return False
        return None

    def _timed_out(self, readiness: bool) -> str:
        if readiness:
            return (
                f"no answer within {self._attempt_timeout:g}s "
                "(host unreachable, or the server too busy to answer)"
            )
        return f"no answer within {self._attempt_timeout:g}s"

    def _await(self, future: Any, deadline: float, *, interruptible: bool = True) -> bool:
        """Wait until ``future`` is done (True), or the deadline, close() or (when
        ``interruptible``) a fork being prepared (False)."""
        core = self._core
        cond = core.cond
        done: list[bool] = []

        def settle(_: object) -> None:
            with cond:
                done.append(True)
                cond.notify_all()

        def settled() -> bool:
            if done or core.closing or core.abandoned:
                return True
            return interruptible and core.fork_hold > 0

        future.add_done_callback(settle)
        with cond:
            cond.wait_for(settled, max(0.0, deadline - core.clock()))
            return bool(done)

    def _wait_settled(self, monitor: Monitor, started: float, deadline: float) -> bool:
        """Lock held: wait until ``monitor`` knows, the deadline or close(). True if a
        fork interrupted it (pending for ``_ESTABLISH_GRACE`` and a fork waiting)."""
        core = self._core
        while not _settled(core, monitor):
            now = core.clock()
            if now >= deadline:
                return False
            wake = deadline
            if core.fork_hold:
                if now >= started + _ESTABLISH_GRACE:
                    return True
                wake = min(wake, started + _ESTABLISH_GRACE)
            core.cond.wait(wake - now)
        return False

    def establish(
        self,
        channel: grpc.Channel,
        deadline: float,
        *,
        previous: Monitor | None = None,
        alive_at: float | None = None,
    ) -> tuple[Monitor | None, AttemptFailed | None]:
        """Start the liveness monitor (``auto``: the best the server offers) and wait
        until it is established. Returns the monitor, or why none could be.

        ``previous``: the monitor this one replaces on the same channel; its mode is
        tried first, and a keep-alive monitor keeps its connection id. ``alive_at``:
        the last sign of life, which a monitor established without asking the server
        (``transport``) starts from.
        """
        core = self._core
        mode = core.config.liveness
        modes: tuple[LivenessMode, ...] = AUTO_ORDER if mode is LivenessMode.AUTO else (mode,)
        if previous is not None and previous.mode in modes:
            modes = (previous.mode, *(m for m in modes if m is not previous.mode))
        last: str | None = None
        for candidate in modes:
            monitor = make_monitor(
                candidate,
                channel,
                cond=core.cond,
                clock=core.clock,
                thread_name=f"chronicle_conn-{candidate.value}[{core.label}]",
                stale_after=self._stale_after,
                probe_interval=self.probe_interval,
                log=core.log,
                client_version=__version__,
            )
            if previous is not None and previous.mode is candidate:
                monitor.connection_id = previous.connection_id
            monitor.seen_before = alive_at
            started = core.clock()
            monitor.start()
            with core.cond:
                interrupted = self._wait_settled(monitor, started, deadline)
                status = monitor.status
                error = monitor.error
                if status is MonitorStatus.ESTABLISHED:
                    core.liveness = candidate.value
            if status is MonitorStatus.ESTABLISHED:
                return monitor, None
            monitor.stop()
            monitor.join(core.config.close_timeout)
            if interrupted:
                with core.cond:
                    core.cond.wait_for(monitor.quiet, _CANCEL_WAIT)
                return None, Interrupted()
            if monitor.code is grpc.StatusCode.UNAUTHENTICATED:
                return None, Refused(AuthenticationError(self._refused_message(error)))
            if monitor.code is grpc.StatusCode.UNAVAILABLE:  # the transport is down
                return None, Unreachable(error or f"{candidate.value}: unavailable")
            if status is MonitorStatus.UNSUPPORTED:
                core.log.debug("liveness_unsupported", mode=candidate.value, error=error)
                last = error
                continue
            if status is MonitorStatus.PENDING:
                if core.closing or core.abandoned:
                    return None, AttemptFailed("connection closed")
                waited = max(0.0, core.clock() - started)
                return None, AttemptFailed(f"{candidate.value}: no answer within {waited:.1f}s")
            return None, AttemptFailed(error or f"{candidate.value} failed")
        return None, AttemptFailed(f"no liveness mode available: {last}")

    def _refused_message(self, error: str | None) -> str:
        cs = self._core.config.connection_string
        said = f" ({error})" if error else ""
        if cs.api_key is not None:
            return f"the server refused the apiKey{said}: check the key"
        if cs.client_id is not None and cs.auth != "none":
            return (
                f"the server refused the token of client {cs.client_id!r}{said}: check that "
                "the client may use this server"
            )
        return (
            f"the server requires credentials{said}: give client credentials "
            "(chronicle://client_id:secret@host) or apiKey"
        )


# grpc's words for a connection that failed in a way a configuration may explain.
_MISCONFIGURED = (
    "TLS",
    "SSL",
    "HANDSHAKE",
    "CERTIFICATE",
    "VERIFICATION",
    "SOCKET CLOSED",
    "CONNECTION RESET",
)


def _looks_misconfigured(details: str) -> bool:
    text = details.upper()
    return any(word in text for word in _MISCONFIGURED)


def _settled(core: Core, monitor: Monitor) -> bool:
    """Lock held: the monitor knows (or the connection is closing)."""
    return monitor.status is not MonitorStatus.PENDING or core.closing or core.abandoned
