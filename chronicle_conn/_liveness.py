"""Liveness monitors: how a connection notices that its server is gone.

A monitor belongs to one channel generation. The dialer starts it during an attempt and
waits until it is established; the supervisor then watches its ``status``,
``deadline()`` and ``suspect`` under the connection's Condition, and calls ``tick()``
when ``next_tick()`` is due. A monitor never calls into the supervisor and never holds
the lock during a gRPC call.

What each mode watches (every signal feeds the same Condition):

- ``keepalive``: the Chronicle kernel's ``Connect`` stream, read on a thread of its own,
  each keep-alive answered with the unary ``ConnectionKeepAlive``. The stream fails within
  milliseconds when the server dies; no keep-alive for ``stale_after`` means a hung kernel
  or a silent partition; an answer failing with ``UNAVAILABLE`` makes the transport
  suspect.
- ``health``: a ``grpc.health.v1.Health/Watch`` stream (NOT_SERVING pushed at once, the
  stream failing when the server dies), plus a ``Check`` every ``probe_interval`` with a
  deadline: a Watch stream alone cannot see a silent partition (no message is due on it),
  so no answer for ``stale_after`` means lost.
- ``transport``: a fail-fast ``Check`` on raw bytes every ``probe_interval``: any answer,
  even ``UNIMPLEMENTED``, proves the server there; ``UNAVAILABLE`` makes the transport
  suspect; no answer for ``stale_after`` means lost.

None of them subscribes to the channel's connectivity: grpc's connectivity poller holds
every ``close()`` of a channel it watches for up to 200 ms, costs a thread and wakes five
times a second; the in-flight stream or the probe sees a dead server as fast or faster.
"""

from __future__ import annotations

import enum
import os
import socket
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc

from . import _health
from ._log import QuietLog
from .config import LivenessMode

if TYPE_CHECKING:
    from ._proto import clients_pb2

__all__ = ["AUTO_ORDER", "Monitor", "MonitorStatus", "load", "make_monitor", "rpc_status"]


def load() -> None:
    """Import the generated messages the monitors use (and protobuf with them).

    Not imported with the package (protobuf costs as much as the rest of it): a
    ``Connection`` calls this on the thread that builds it, so that the monitors' own
    threads only ever find them already imported.
    """
    import uuid  # noqa: F401, PLC0415 - uuid imports platform: 5 ms

    from google.protobuf import empty_pb2  # noqa: F401, PLC0415

    from ._proto import clients_pb2  # noqa: F401, PLC0415

    _health.load()


CONNECT_METHOD = "/Cratis.Chronicle.Contracts.Clients.ConnectionService/Connect"
KEEPALIVE_METHOD = "/Cratis.Chronicle.Contracts.Clients.ConnectionService/ConnectionKeepAlive"

# Codes that mean "this server does not offer that liveness service" rather than "down".
_UNSUPPORTED = frozenset(
    {
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.NOT_FOUND,
    }
)

#: Codes of a probe that say nothing answered: the server is not (or no longer) there.
NO_ANSWER = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
    }
)


def rpc_status(error: BaseException) -> tuple[grpc.StatusCode | None, str | None]:
    """The status code and details of a gRPC error (also a ``grpc.Call``), if it has them."""
    call: Any = error
    try:
        return call.code(), call.details()
    except AttributeError:
        return None, str(error) or None


def describe(error: BaseException) -> str:
    """``CODE: details`` of a gRPC error, for messages and logs."""
    code, details = rpc_status(error)
    return f"{code.name if code else type(error).__name__}: {details}"


class MonitorStatus(enum.Enum):
    """What a monitor knows. Guarded by the connection's Condition."""

    PENDING = "pending"  # started, nothing heard yet
    ESTABLISHED = "established"  # the server answered: keep-alive seen / SERVING
    UNSUPPORTED = "unsupported"  # the server does not offer this service
    FAILED = "failed"  # failed before it was established (counts as a failed attempt)
    ENDED = "ended"  # the stream ended after it was established: verify the transport
    LOST = "lost"  # the server said it is gone (NOT_SERVING)
    STOPPED = "stopped"  # stopped by the supervisor


class Monitor:
    """Base, and the ``transport`` monitor: periodic fail-fast probes, no thread.

    Args:
        channel: the generation's channel.
        cond: the connection's Condition; every field below is guarded by it.
        clock: the connection's monotonic clock.
        thread_name: the name for a reader thread, if the mode has one.
        stale_after: no sign of life for this long means lost.
        probe_interval: seconds between periodic probes (modes that probe).
        log: the connection's logger.
        client_version: sent to the kernel in ``ConnectRequest``.
    """

    mode = LivenessMode.TRANSPORT
    probes = True
    #: The kernel's name for this client (keep-alive mode); a monitor restarted on the
    #: same channel (after a fork, a GOAWAY) keeps its predecessor's (``Dialer.establish``).
    connection_id: str | None = None
    #: For a monitor restarted on the same channel: the last sign of life before it. A
    #: monitor that is established without asking the server starts its staleness
    #: clock there, not now (a restart is no sign of life).
    seen_before: float | None = None

    def __init__(
        self,
        channel: grpc.Channel,
        cond: threading.Condition,
        clock: Callable[[], float],
        *,
        thread_name: str,
        stale_after: float,
        probe_interval: float,
        log: QuietLog,
        client_version: str = "",
    ) -> None:
        self._channel = channel
        self._cond = cond
        self._clock = clock
        self._thread_name = thread_name
        self._stale_after = stale_after
        self._probe_interval = probe_interval
        self._log = log
        self._client_version = client_version
        self._thread: threading.Thread | None = None
        # Guarded by cond:
        self.status = MonitorStatus.PENDING
        self.error: str | None = None
        #: The status code that ended the stream, if one did (UNAUTHENTICATED: refused).
        self.code: grpc.StatusCode | None = None
        self.last_seen: float | None = None
        # Signs of life, each under its own name (``ConnectionStats``):
        self.received = 0  # keep-alives received (keepalive mode)
        self.health_updates = 0  # SERVING messages on the Watch stream (health mode)
        self.probes_answered = 0  # periodic probes answered (every mode)
        self._taken = (0, 0, 0)  # of those, what the connection's counters hold already
        #: Set when a sign says the transport may be gone; the supervisor verifies it.
        self.suspect: str | None = None
        self._call: Any = None
        self._stopping = False
        self._probing = False
        self._next_probe: float | None = None
        #: Calls of this monitor's still in flight besides the stream: the periodic
        #: probe, keep-alive answers (``quiet()`` waits for them before a fork).
        self._pending: set[Any] = set()
        self._thread_done = False

    def start(self) -> None:
        """Begin watching. Does not block."""
        with self._cond:
            self._established()
            if self.seen_before is not None:
                self.last_seen = min(self.last_seen or self.seen_before, self.seen_before)
            self._cond.notify_all()

    def untaken(self) -> tuple[int, int, int]:
        """Keep-alives, health updates and probes answered not yet taken (lock held)."""
        k, h, p = self._taken
        return self.received - k, self.health_updates - h, self.probes_answered - p

    def take(self) -> tuple[int, int, int]:
        """Take the signs of life counted since the last take (lock held)."""
        taken = self.untaken()
        self._taken = (self.received, self.health_updates, self.probes_answered)
        return taken

    def _established(self) -> None:
        """Lock held."""
        now = self._clock()
        self.status = MonitorStatus.ESTABLISHED
        self.last_seen = now
        if self.probes:
            self._next_probe = now + self._probe_interval

    def deadline(self) -> float | None:
        """The clock time at which silence means loss, or None. Lock held."""
        if self.status is not MonitorStatus.ESTABLISHED or self.last_seen is None:
            return None
        return self.last_seen + self._stale_after

    def next_tick(self) -> float | None:
        """When :meth:`tick` is due, or None. Lock held."""
        if self.status is not MonitorStatus.ESTABLISHED or self._probing:
            return None
        return self._next_probe

    def tick(self) -> None:
        """Send the periodic probe (non-blocking; the answer arrives on a gRPC thread)."""
        with self._cond:
            if self._stopping or self._probing or self._next_probe is None:
                return
            self._probing = True
            self._next_probe = self._clock() + self._probe_interval
        try:
            future = self._probe()
        except Exception as exc:  # ValueError: the channel was closed under us
            with self._cond:
                self._probing = False
                self.suspect = f"probe: {exc}"
                self._cond.notify_all()
            return
        self._track(future, self._on_probe)

    def _track(self, future: Any, callback: Callable[[Any], None]) -> None:
        """Count ``future`` in flight until ``callback`` has run; cancel it at once if
        the monitor is stopping (a fork waits for it)."""
        with self._cond:
            self._pending.add(future)
            stopping = self._stopping

        def done(finished: Any) -> None:
            try:
                callback(finished)
            finally:
                with self._cond:
                    self._pending.discard(finished)
                    if self._stopping:
                        self._cond.notify_all()

        future.add_done_callback(done)
        if stopping:
            future.cancel()

    def quiet(self) -> bool:
        """Whether none of this monitor's calls is in flight and its thread is done
        (after ``stop()``). Lock held."""
        thread_done = self._thread is None or self._thread_done
        return thread_done and not self._pending and not self._probing

    def _probe(self) -> Any:
        return _health.probe_callable(self._channel).future(
            b"", timeout=self._stale_after, wait_for_ready=False
        )

    def _on_probe(self, future: Any) -> None:
        error = _exception(future)
        code = _code(error)
        with self._cond:
            self._probing = False
            if self._stopping:
                return
            if code not in NO_ANSWER:
                self._alive(future if error is None else None)
            elif code is grpc.StatusCode.UNAVAILABLE and error is not None:
                self.suspect = f"probe: {describe(error)}"
            self._cond.notify_all()

    def _alive(self, answer: Any) -> None:
        """A probe was answered (``answer``: the successful future, or None). Lock held."""
        self.probes_answered += 1
        self.last_seen = self._clock()

    def stop(self) -> None:
        """Stop watching: cancel the stream. Does not block; call ``join()`` after."""
        with self._cond:
            self._stopping = True
            if self.status in (MonitorStatus.PENDING, MonitorStatus.ESTABLISHED):
                self.status = MonitorStatus.STOPPED
            call = self._call
            pending = list(self._pending)
        if call is not None:
            call.cancel()
        for future in pending:
            future.cancel()

    def join(self, timeout: float) -> None:
        """Wait (bounded) for the monitor's thread to end."""
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    # -- helpers for the stream monitors --------------------------------------------

    def _spawn(self, target: Callable[[], None]) -> None:
        def run() -> None:
            try:
                target()
            finally:
                with self._cond:
                    self._thread_done = True
                    self._cond.notify_all()

        self._thread = threading.Thread(target=run, name=self._thread_name, daemon=True)
        self._thread.start()

    def _set_call(self, call: Any) -> bool:
        with self._cond:
            if self._stopping:
                cancel = True
            else:
                self._call = call
                cancel = False
        if cancel:
            call.cancel()
        return not cancel

    def _fail(self, what: str, exc: BaseException) -> None:
        """The stream could not even be started (a closed channel, say)."""
        with self._cond:
            if not self._stopping:
                self.status = MonitorStatus.FAILED
                self.error = f"{what}: {exc}"
                self._cond.notify_all()

    def _finish(self, error: grpc.RpcError | None, what: str) -> None:
        code, details = rpc_status(error) if error is not None else (None, None)
        with self._cond:
            if self._stopping:
                return
            self.code = code
            if self.status is MonitorStatus.PENDING:
                if code in _UNSUPPORTED:
                    self.status = MonitorStatus.UNSUPPORTED
                else:
                    self.status = MonitorStatus.FAILED
            elif self.status is MonitorStatus.ESTABLISHED:
                self.status = MonitorStatus.ENDED
            self.error = f"{what}: {code.name if code else 'ended'}" + (
                f" ({details})" if details else ""
            )
            self._cond.notify_all()


class KeepAliveMonitor(Monitor):
    """The Chronicle kernel's keep-alive: the ``Connect`` stream, each ping answered."""

    mode = LivenessMode.KEEPALIVE
    probes = False

    def start(self) -> None:
        import uuid  # noqa: PLC0415 - loaded by load()

        if self.connection_id is None:
            self.connection_id = str(uuid.uuid4())
        self._spawn(self._run)

    def _request(self) -> clients_pb2.ConnectRequest:
        from ._proto import clients_pb2  # noqa: PLC0415 - loaded by load()

        return clients_pb2.ConnectRequest(
            ConnectionId=self.connection_id or "",
            ClientVersion=self._client_version,
            IsRunningWithDebugger=sys.gettrace() is not None,
            ProcessId=os.getpid(),
            ProcessPath=sys.argv[0] if sys.argv and sys.argv[0] else sys.executable,
            MachineName=socket.gethostname(),
            ClientType="Python",
        )

    def _run(self) -> None:
        from google.protobuf import empty_pb2  # noqa: PLC0415 - loaded by load()

        from ._proto import clients_pb2  # noqa: PLC0415

        connect = self._channel.unary_stream(
            CONNECT_METHOD,
            request_serializer=clients_pb2.ConnectRequest.SerializeToString,
            response_deserializer=clients_pb2.ConnectionKeepAlive.FromString,
        )
        answer = self._channel.unary_unary(
            KEEPALIVE_METHOD,
            request_serializer=clients_pb2.ConnectionKeepAlive.SerializeToString,
            response_deserializer=empty_pb2.Empty.FromString,
        )
        error: grpc.RpcError | None = None
        try:
            call = connect(self._request(), wait_for_ready=False)
            if not self._set_call(call):
                return
            for ping in call:
                with self._cond:
                    if self._stopping:
                        return
                    if self.status is MonitorStatus.PENDING:
                        self._established()
                        self._cond.notify_all()
                    self.last_seen = self._clock()
                    self.received += 1
                # Answer without blocking the reader: a slow answer must not delay
                # noticing the next ping.
                self._track(answer.future(ping, timeout=self._stale_after), self._on_answer)
        except grpc.RpcError as exc:
            error = exc
        except ValueError as exc:  # "Cannot invoke RPC on closed channel!"
            self._fail("keep-alive stream", exc)
            return
        self._finish(error, "keep-alive stream")

    def _on_answer(self, future: Any) -> None:
        error = _exception(future)
        if error is None:
            return
        code = _code(error)
        with self._cond:
            if self._stopping:
                return
            if code is grpc.StatusCode.UNAVAILABLE and self.suspect is None:
                self.suspect = f"keep-alive answer: {describe(error)}"
                self._cond.notify_all()
        self._log.debug("keepalive_answer_failed", error=describe(error))


class HealthMonitor(Monitor):
    """A ``grpc.health.v1.Health/Watch`` stream on the whole server (``""``), plus a
    periodic ``Check`` with a deadline (the Watch stream cannot see a partition)."""

    mode = LivenessMode.HEALTH

    def start(self) -> None:
        self._spawn(self._run)

    def _run(self) -> None:
        serving = _health.SERVING
        error: grpc.RpcError | None = None
        try:
            call = _health.watch_callable(self._channel)(
                _health.load().HealthCheckRequest(service=""), wait_for_ready=False
            )
            if not self._set_call(call):
                return
            for response in call:
                with self._cond:
                    if self._stopping:
                        return
                    if response.status == serving:
                        if self.status is MonitorStatus.PENDING:
                            self._established()
                        self.last_seen = self._clock()
                        self.health_updates += 1
                    else:
                        self._not_serving(response.status)
                    self._cond.notify_all()
                    if self.status in _FINAL:
                        break
        except grpc.RpcError as exc:
            error = exc
        except ValueError as exc:
            self._fail("health watch", exc)
            return
        with self._cond:
            done = self.status in _FINAL
            call = self._call
        if done:
            if call is not None:
                call.cancel()
            return
        self._finish(error, "health watch")

    def _not_serving(self, status: _health.ServingStatus) -> None:
        """Lock held."""
        name = _health.status_name(status)
        self.error = f"health: {name}"
        if self.status is MonitorStatus.PENDING:
            # No status for the whole server is not "down": that server does not offer
            # whole-server health (``auto`` then falls back to transport).
            unknown = status in (_health.SERVICE_UNKNOWN, _health.UNKNOWN)
            self.status = MonitorStatus.UNSUPPORTED if unknown else MonitorStatus.FAILED
        elif self.status is MonitorStatus.ESTABLISHED:
            self.status = MonitorStatus.LOST

    def _probe(self) -> Any:
        return _health.check_callable(self._channel).future(
            _health.load().HealthCheckRequest(service=""),
            timeout=self._stale_after,
            wait_for_ready=False,
        )

    def _alive(self, answer: Any) -> None:
        if answer is None:
            # Answered with an error (UNIMPLEMENTED: Watch without Check): the server is
            # there, but this probe says nothing more; the Watch stream still watches.
            self.probes_answered += 1
            self.last_seen = self._clock()
            return
        status = answer.result().status
        if status == _health.SERVING:
            self.probes_answered += 1
            self.last_seen = self._clock()
        else:
            self._not_serving(status)


#: What a health answer can settle for good: the Watch stream is then cancelled.
_FINAL = (MonitorStatus.FAILED, MonitorStatus.LOST, MonitorStatus.UNSUPPORTED)


def _code(error: BaseException | None) -> grpc.StatusCode | None:
    """The status of a finished call: OK, its code, or CANCELLED for a cancelled future."""
    if error is None:
        return grpc.StatusCode.OK
    if isinstance(error, grpc.FutureCancelledError):
        return grpc.StatusCode.CANCELLED
    return rpc_status(error)[0]


def _exception(future: Any) -> BaseException | None:
    try:
        return future.exception()  # type: ignore[no-any-return]
    except grpc.FutureCancelledError as exc:
        return exc


_MONITORS: dict[LivenessMode, type[Monitor]] = {
    LivenessMode.KEEPALIVE: KeepAliveMonitor,
    LivenessMode.HEALTH: HealthMonitor,
    LivenessMode.TRANSPORT: Monitor,
}

#: The order ``liveness="auto"`` tries, best signal first.
AUTO_ORDER = (LivenessMode.KEEPALIVE, LivenessMode.HEALTH, LivenessMode.TRANSPORT)


def make_monitor(mode: LivenessMode, channel: grpc.Channel, **kwargs: Any) -> Monitor:
    """Return an unstarted monitor of ``mode`` (not AUTO) for ``channel``."""
    return _MONITORS[mode](channel, **kwargs)
