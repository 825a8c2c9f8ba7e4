"""Liveness monitors: how a connection notices that its server is gone.

A monitor belongs to one channel generation. The supervisor starts it during an attempt
(``start()``), waits until it is established, and then watches its ``status`` and
``deadline()`` under the connection's Condition. Each stream monitor reads its stream on
a thread of its own and reports through that Condition; it never calls back into the
supervisor and never holds the lock during a gRPC call.
"""

from __future__ import annotations

import enum
import os
import socket
import sys
import threading
import uuid
from collections.abc import Callable
from typing import Any

import grpc
import structlog
from google.protobuf import empty_pb2

from ._proto import clients_pb2, health_pb2
from .config import LivenessMode

__all__ = ["Monitor", "MonitorStatus", "make_monitor", "rpc_status"]

_CONNECT = "/Cratis.Chronicle.Contracts.Clients.ConnectionService/Connect"
_KEEPALIVE = "/Cratis.Chronicle.Contracts.Clients.ConnectionService/ConnectionKeepAlive"
_HEALTH_WATCH = "/grpc.health.v1.Health/Watch"

# Codes that mean "this server does not offer that liveness service" rather than "down".
_UNSUPPORTED = frozenset(
    {
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.NOT_FOUND,
    }
)

_log = structlog.get_logger("chronicle_conn")


def rpc_status(error: BaseException) -> tuple[grpc.StatusCode | None, str | None]:
    """The status code and details of a gRPC error (also a ``grpc.Call``), if it has them."""
    call: Any = error
    try:
        return call.code(), call.details()
    except AttributeError:
        return None, str(error) or None


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
    """Base: the transport-only monitor, established at once, with nothing to watch."""

    mode = LivenessMode.TRANSPORT

    def __init__(
        self,
        channel: grpc.Channel,
        cond: threading.Condition,
        clock: Callable[[], float],
        *,
        thread_name: str,
        stale_after: float,
        answer_timeout: float = 2.0,
        client_version: str = "",
    ) -> None:
        self._channel = channel
        self._cond = cond
        self._clock = clock
        self._thread_name = thread_name
        self._stale_after = stale_after
        self._answer_timeout = answer_timeout
        self._client_version = client_version
        self._thread: threading.Thread | None = None
        # Guarded by cond:
        self.status = MonitorStatus.PENDING
        self.error: str | None = None
        self.last_seen: float | None = None
        self.received = 0
        self._call: Any = None
        self._stopping = False

    def start(self) -> None:
        """Begin watching. Does not block."""
        with self._cond:
            self.status = MonitorStatus.ESTABLISHED
            self._cond.notify_all()

    def deadline(self) -> float | None:
        """The clock time at which silence means loss, or None. Call under the lock."""
        return None

    def stop(self) -> None:
        """Stop watching: cancel the stream. Does not block; call ``join()`` after."""
        with self._cond:
            self._stopping = True
            if self.status in (MonitorStatus.PENDING, MonitorStatus.ESTABLISHED):
                self.status = MonitorStatus.STOPPED
            call = self._call
        if call is not None:
            call.cancel()

    def join(self, timeout: float) -> None:
        """Wait (bounded) for the monitor's thread to end."""
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    # -- helpers for the stream monitors --------------------------------------------

    def _spawn(self, target: Callable[[], None]) -> None:
        self._thread = threading.Thread(target=target, name=self._thread_name, daemon=True)
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

    def _finish(self, error: grpc.RpcError | None, what: str) -> None:
        code, details = rpc_status(error) if error is not None else (None, None)
        with self._cond:
            if self._stopping:
                return
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

    def start(self) -> None:
        self.connection_id = str(uuid.uuid4())
        self._spawn(self._run)

    def deadline(self) -> float | None:
        if self.status is not MonitorStatus.ESTABLISHED or self.last_seen is None:
            return None
        return self.last_seen + self._stale_after

    def _request(self) -> clients_pb2.ConnectRequest:
        return clients_pb2.ConnectRequest(
            ConnectionId=self.connection_id,
            ClientVersion=self._client_version,
            IsRunningWithDebugger=sys.gettrace() is not None,
            ProcessId=os.getpid(),
            ProcessPath=sys.argv[0] if sys.argv and sys.argv[0] else sys.executable,
            MachineName=socket.gethostname(),
            ClientType="Python",
        )

    def _run(self) -> None:
        connect = self._channel.unary_stream(
            _CONNECT,
            request_serializer=clients_pb2.ConnectRequest.SerializeToString,
            response_deserializer=clients_pb2.ConnectionKeepAlive.FromString,
        )
        answer = self._channel.unary_unary(
            _KEEPALIVE,
            request_serializer=clients_pb2.ConnectionKeepAlive.SerializeToString,
            response_deserializer=empty_pb2.Empty.FromString,
        )
        error: grpc.RpcError | None = None
        try:
            call = connect(self._request(), wait_for_ready=False)
            if not self._set_call(call):
                return
            for ping in call:
                now = self._clock()
                with self._cond:
                    if self._stopping:
                        return
                    self.last_seen = now
                    self.received += 1
                    if self.status is MonitorStatus.PENDING:
                        self.status = MonitorStatus.ESTABLISHED
                        self._cond.notify_all()
                # Answer without blocking the reader: a slow answer must not delay
                # noticing the next ping.
                answer.future(ping, timeout=self._answer_timeout).add_done_callback(
                    _log_answer_failure
                )
        except grpc.RpcError as exc:
            error = exc
        except ValueError as exc:  # "Cannot invoke RPC on closed channel!"
            with self._cond:
                if not self._stopping:
                    self.status = MonitorStatus.FAILED
                    self.error = f"keep-alive stream: {exc}"
                    self._cond.notify_all()
            return
        self._finish(error, "keep-alive stream")


def _log_answer_failure(future: Any) -> None:
    try:
        exc = future.exception()
    except grpc.FutureCancelledError:
        return
    if exc is not None:
        code, _ = rpc_status(exc)
        _log.debug("keepalive_answer_failed", code=code.name if code else repr(exc))


class HealthMonitor(Monitor):
    """A ``grpc.health.v1.Health/Watch`` stream on the overall service (``""``)."""

    mode = LivenessMode.HEALTH

    def start(self) -> None:
        self._spawn(self._run)

    def _run(self) -> None:
        watch = self._channel.unary_stream(
            _HEALTH_WATCH,
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        serving = health_pb2.HealthCheckResponse.SERVING
        error: grpc.RpcError | None = None
        try:
            call = watch(health_pb2.HealthCheckRequest(service=""), wait_for_ready=False)
            if not self._set_call(call):
                return
            for response in call:
                with self._cond:
                    if self._stopping:
                        return
                    self.last_seen = self._clock()
                    self.received += 1
                    if response.status == serving:
                        if self.status is MonitorStatus.PENDING:
                            self.status = MonitorStatus.ESTABLISHED
                    else:
                        name = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
                        self.error = f"health: {name}"
                        if self.status is MonitorStatus.PENDING:
                            self.status = MonitorStatus.FAILED
                        else:
                            self.status = MonitorStatus.LOST
                    self._cond.notify_all()
                    if self.status in (MonitorStatus.FAILED, MonitorStatus.LOST):
                        break
        except grpc.RpcError as exc:
            error = exc
        except ValueError as exc:
            with self._cond:
                if not self._stopping:
                    self.status = MonitorStatus.FAILED
                    self.error = f"health watch: {exc}"
                    self._cond.notify_all()
            return
        with self._cond:
            done = self.status in (MonitorStatus.FAILED, MonitorStatus.LOST)
        if done:
            call = self._call
            if call is not None:
                call.cancel()
            return
        self._finish(error, "health watch")


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
