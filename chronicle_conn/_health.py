"""The ``grpc.health.v1.Health`` service, without grpcio-health-checking.

chronicle_conn must not depend on grpcio-health-checking, nor register
``grpc.health.v1.*`` names in protobuf's default descriptor pool (a user's process may
import grpcio-health-checking too, and the pool refuses a second definition). So the two
messages live under a private proto package (``chronicle_conn.health``, generated into
:mod:`chronicle_conn._proto.health_pb2`) with the same field numbers and enum values —
identical on the wire — and this module wires them to the real method paths by hand.

Client side: :func:`check_callable` and :func:`watch_callable` build the
multicallables on any channel; :func:`probe_callable` is ``Check`` on raw bytes (an empty
request asks about the whole server), which any server answers somehow; :func:`check` is
a one-call convenience.
Server side: :class:`HealthServicer` keeps the statuses and serves ``Check`` and
``Watch`` through :meth:`HealthServicer.generic_handler`.

The generated messages (and protobuf with them) are imported on first use, not with the
package: :func:`load` imports them, and a ``Connection`` calls it on the thread that
builds it, so that none of the library's background threads is the first to import
anything. ``HealthCheckRequest`` and ``HealthCheckResponse`` are module attributes
resolved on first access.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, TypeAlias, cast

import grpc

if TYPE_CHECKING:
    from ._proto.health_pb2 import HealthCheckRequest, HealthCheckResponse

__all__ = [
    "CHECK_METHOD",
    "NOT_SERVING",
    "SERVICE_NAME",
    "SERVICE_UNKNOWN",
    "SERVING",
    "UNKNOWN",
    "WATCH_METHOD",
    "HealthCheckRequest",
    "HealthCheckResponse",
    "HealthServicer",
    "ServingStatus",
    "check",
    "check_callable",
    "load",
    "probe_callable",
    "status_name",
    "watch_callable",
]

SERVICE_NAME = "grpc.health.v1.Health"
CHECK_METHOD = f"/{SERVICE_NAME}/Check"
WATCH_METHOD = f"/{SERVICE_NAME}/Watch"

ServingStatus: TypeAlias = "HealthCheckResponse.ServingStatus.ValueType"
# The enum's wire values (grpc/health/v1/health.proto); a test checks them against the
# generated module.
UNKNOWN = cast("ServingStatus", 0)
SERVING = cast("ServingStatus", 1)
NOT_SERVING = cast("ServingStatus", 2)
SERVICE_UNKNOWN = cast("ServingStatus", 3)


def load() -> Any:
    """Import the generated health messages (and protobuf); return their module."""
    from ._proto import health_pb2  # noqa: PLC0415 - deferred, see the module docstring

    return health_pb2


def __getattr__(name: str) -> Any:
    if name in ("HealthCheckRequest", "HealthCheckResponse"):
        return getattr(load(), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def status_name(status: int) -> str:
    """``SERVING``, ``NOT_SERVING``... for a status value (its number if unknown: proto3
    enums are open, a server may send a value this client does not know)."""
    try:
        return str(load().HealthCheckResponse.ServingStatus.Name(status))
    except ValueError:
        return f"status {status}"


def check_callable(
    channel: grpc.Channel,
) -> grpc.UnaryUnaryMultiCallable[HealthCheckRequest, HealthCheckResponse]:
    """Return the ``/grpc.health.v1.Health/Check`` multicallable on ``channel``."""
    messages = load()
    return channel.unary_unary(
        CHECK_METHOD,
        request_serializer=messages.HealthCheckRequest.SerializeToString,
        response_deserializer=messages.HealthCheckResponse.FromString,
    )


def probe_callable(channel: grpc.Channel) -> grpc.UnaryUnaryMultiCallable[bytes, bytes]:
    """Return ``Check`` on raw bytes: an empty request is ``service=""`` on the wire.

    Any answer (even ``UNIMPLEMENTED`` from a server without health) proves the server
    reachable; ``UNAVAILABLE`` says the transport is down, and why.
    """
    return channel.unary_unary(
        CHECK_METHOD, request_serializer=_identity, response_deserializer=_identity
    )


def _identity(data: bytes) -> bytes:
    return data


def watch_callable(
    channel: grpc.Channel,
) -> grpc.UnaryStreamMultiCallable[HealthCheckRequest, HealthCheckResponse]:
    """Return the ``/grpc.health.v1.Health/Watch`` multicallable on ``channel``."""
    messages = load()
    return channel.unary_stream(
        WATCH_METHOD,
        request_serializer=messages.HealthCheckRequest.SerializeToString,
        response_deserializer=messages.HealthCheckResponse.FromString,
    )


def check(
    channel: grpc.Channel,
    service: str = "",
    *,
    timeout: float | None = None,
    wait_for_ready: bool | None = None,
) -> ServingStatus:
    """Call ``Check`` once and return the status. Blocks; thread-safe.

    Raises:
        grpc.RpcError: as the call does (``NOT_FOUND`` for an unknown service,
            ``UNIMPLEMENTED`` when the server has no health service).
    """
    response = check_callable(channel)(
        load().HealthCheckRequest(service=service), timeout=timeout, wait_for_ready=wait_for_ready
    )
    return response.status


class HealthServicer:
    """Serving statuses per service name, served as ``grpc.health.v1.Health``.

    Behaves like grpcio-health-checking's servicer: ``Check`` of an unknown service
    fails with ``NOT_FOUND``; ``Watch`` sends the current status at once
    (``SERVICE_UNKNOWN`` for an unknown service) and then every change, until the
    client cancels or :meth:`close` is called (the stream then ends with
    ``UNAVAILABLE``). Every method is thread-safe; none blocks except ``Watch``.

    Args:
        statuses: the initial statuses; default ``{"": SERVING}`` (the whole server).
    """

    def __init__(self, statuses: Mapping[str, ServingStatus] | None = None) -> None:
        self._cond = threading.Condition()
        # Guarded by _cond: the statuses, one queue of pending changes per open Watch
        # (so a quick flip is still seen as two changes), and the closed flag.
        self._statuses: dict[str, ServingStatus] = dict(
            statuses if statuses is not None else {"": SERVING}
        )
        self._watchers: dict[str, list[deque[ServingStatus]]] = {}
        self._closed = False

    def status(self, service: str = "") -> ServingStatus | None:
        """The current status of ``service``, or None when it is unknown."""
        with self._cond:
            return self._statuses.get(service)

    def set(self, service: str, status: ServingStatus) -> None:
        """Set ``service``'s status and push it to its watchers (if it changed).

        Ignored after :meth:`close`.
        """
        with self._cond:
            if self._closed or self._statuses.get(service) == status:
                return
            self._statuses[service] = status
            for queue in self._watchers.get(service, ()):
                queue.append(status)
            self._cond.notify_all()

    def set_all(self, status: ServingStatus) -> None:
        """Set every known service to ``status``."""
        with self._cond:
            services = list(self._statuses)
        for service in services:
            self.set(service, status)

    def close(self) -> None:
        """End every open ``Watch`` stream (with ``UNAVAILABLE``); idempotent."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def check(
        self, request: HealthCheckRequest, context: grpc.ServicerContext
    ) -> HealthCheckResponse:
        """The ``Check`` method."""
        status = self.status(request.service)
        if status is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        response: HealthCheckResponse = load().HealthCheckResponse(status=status)
        return response

    def watch(
        self, request: HealthCheckRequest, context: grpc.ServicerContext
    ) -> Iterator[HealthCheckResponse]:
        """The ``Watch`` method (server streaming)."""
        service = request.service
        queue: deque[ServingStatus] = deque()
        done = threading.Event()

        def on_rpc_done() -> None:
            done.set()
            with self._cond:
                self._cond.notify_all()

        with self._cond:
            queue.append(self._statuses.get(service, SERVICE_UNKNOWN))
            self._watchers.setdefault(service, []).append(queue)
        try:
            if not context.add_callback(on_rpc_done):
                return
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: bool(queue) or self._closed or done.is_set())
                    closed = self._closed
                    pending = list(queue)
                    queue.clear()
                if done.is_set():
                    return
                if closed:
                    context.abort(grpc.StatusCode.UNAVAILABLE, "health service is shutting down")
                for status in pending:
                    yield load().HealthCheckResponse(status=status)
        finally:
            with self._cond:
                watchers = self._watchers[service]
                watchers.remove(queue)
                if not watchers:
                    del self._watchers[service]

    def generic_handler(self) -> grpc.GenericRpcHandler:
        """A handler serving ``grpc.health.v1.Health`` for ``server.add_generic_rpc_handlers``."""
        messages = load()
        return grpc.method_handlers_generic_handler(
            SERVICE_NAME,
            {
                "Check": grpc.unary_unary_rpc_method_handler(
                    self.check,
                    request_deserializer=messages.HealthCheckRequest.FromString,
                    response_serializer=messages.HealthCheckResponse.SerializeToString,
                ),
                "Watch": grpc.unary_stream_rpc_method_handler(
                    self.watch,
                    request_deserializer=messages.HealthCheckRequest.FromString,
                    response_serializer=messages.HealthCheckResponse.SerializeToString,
                ),
            },
        )
