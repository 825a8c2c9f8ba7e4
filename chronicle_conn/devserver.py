"""An embedded stand-in for the Chronicle kernel, for tests, demos and local development.

:class:`DevServer` serves, on one port, what a chronicle_conn client talks to:

- ``Cratis.Chronicle.Contracts.Clients.ConnectionService``: ``Connect`` registers the
  client and streams ``ConnectionKeepAlive`` messages (the first at once, then one
  every ``keepalive_interval``), ``ConnectionKeepAlive`` records the client's answers,
  plus ``GetConnectedClients``, ``ObserveConnectedClients`` and ``GetDescriptorSet``;
- ``Cratis.Chronicle.Contracts.Host.Server/GetVersionInfo``;
- ``grpc.health.v1.Health`` (``Check`` and ``Watch``), which a real kernel does not have;
- any extra services given as ``handlers=`` (an application's own, say, so that tests
  can exercise one server that is both the kernel and the application).

It can be told to misbehave (:meth:`DevServer.pause_keepalives` simulates a hung kernel,
:meth:`DevServer.set_serving` flips health), and it records what clients did
(:attr:`DevServer.connect_requests`, :attr:`DevServer.keepalive_answers`) with a
:meth:`DevServer.wait_for` to observe it without sleeping. Optional TLS (``tls=``,
mutual when ``client_ca`` is set) and an optional per-call ``authenticator`` hook.

Example::

    with DevServer(keepalive_interval=0.2) as server:
        channel = grpc.insecure_channel(server.address)
        ...
        assert server.wait_for(lambda: len(server.keepalive_answers) >= 3, timeout=5)

The command line wraps it as ``chronicle-conn dev-server`` (see :mod:`chronicle_conn.cli`).
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent import futures
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc
import structlog
from google.protobuf import empty_pb2

from . import _health
from ._proto import clients_pb2, clients_pb2_grpc, host_pb2, host_pb2_grpc
from .errors import ChronicleConnError

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self is 3.11+

__all__ = [
    "Authenticator",
    "DevServer",
    "DevServerBindError",
    "ServerTls",
]

Authenticator: TypeAlias = Callable[[str, Mapping[str, str]], bool]
"""``authenticator(method, metadata) -> bool``: may this call proceed?

``method`` is the full path (``/Cratis.Chronicle.Contracts.Clients.ConnectionService/Connect``);
``metadata`` maps the call's text (non ``-bin``) metadata keys, lower-case, to their first
value, e.g. ``metadata.get("authorization") == "Bearer abc"``.
"""

CONNECTION_SERVICE = "Cratis.Chronicle.Contracts.Clients.ConnectionService"
HOST_SERVICE = "Cratis.Chronicle.Contracts.Host.Server"

# Methods that need no credentials, as on the kernel (GetDescriptorSet is anonymous
# there; health has no kernel counterpart and is kept open for probes).
_ANONYMOUS_METHODS = frozenset(
    {
        f"/{CONNECTION_SERVICE}/GetDescriptorSet",
        _health.CHECK_METHOD,
        _health.WATCH_METHOD,
    }
)

_logger = structlog.get_logger("chronicle_conn.devserver")


class DevServerBindError(ChronicleConnError, OSError):
    """The dev server could not listen on its address (most often: the port is taken).

    Attributes:
        address: the ``host:port`` it tried.
    """

    def __init__(self, message: str, *, address: str) -> None:
        super().__init__(message)
        self.address = address


@dataclasses.dataclass(frozen=True)
class ServerTls:
    """The dev server's TLS material, PEM-encoded.

    Attributes:
        certificate_chain: the server certificate (and intermediates).
        private_key: its private key.
        client_ca: when set, clients must present a certificate signed by one of these
            CAs (mutual TLS); when None, any client may connect.
    """

    certificate_chain: bytes
    private_key: bytes
    client_ca: bytes | None = None

    def __post_init__(self) -> None:
        for name in ("certificate_chain", "private_key", "client_ca"):
            value = getattr(self, name)
            if value is None and name == "client_ca":
                continue
            if not isinstance(value, bytes) or not value.strip():
                raise ValueError(f"ServerTls.{name} must be non-empty PEM bytes")

    @classmethod
    def from_files(
        cls,
        certificate_chain: str | Path,
        private_key: str | Path,
        client_ca: str | Path | None = None,
    ) -> ServerTls:
        """Read the PEM files. Raises ``OSError`` when one cannot be read."""
        return cls(
            certificate_chain=Path(certificate_chain).read_bytes(),
            private_key=Path(private_key).read_bytes(),
            client_ca=Path(client_ca).read_bytes() if client_ca is not None else None,
        )

    def server_credentials(self) -> grpc.ServerCredentials:
        """The ``grpc.ServerCredentials`` for ``server.add_secure_port``."""
        return grpc.ssl_server_credentials(
            [(self.private_key, self.certificate_chain)],
            root_certificates=self.client_ca,
            require_client_auth=self.client_ca is not None,
        )


@dataclasses.dataclass
class _Client:
    """A registered client: its request, its open stream, when it was last seen."""

    request: clients_pb2.ConnectRequest
    stream: threading.Event  # the stream's wake-up event; identifies the stream
    last_seen: datetime


class DevServer:
    """An embedded stand-in Chronicle kernel on ``host:port``; see the module docstring.

    Args:
        host: the address to listen on.
        port: the port; 0 picks a free one (read :attr:`port` after :meth:`start`).
        keepalive_interval: seconds between keep-alives on each ``Connect`` stream.
        tls: serve TLS with this material instead of plaintext.
        authenticator: when set, every call except ``GetDescriptorSet`` and health must
            pass ``authenticator(method, metadata)``, or fails with ``UNAUTHENTICATED``.
            It runs on the server's worker threads.
        version: what ``GetVersionInfo`` reports.
        max_workers: size of the server's thread pool. Every open stream (``Connect``,
            ``Watch``, ``ObserveConnectedClients``) holds one thread, and so does every
            call in flight on ``handlers``.
        logger: a structlog logger to use instead of ``chronicle_conn.devserver``.
        handlers: extra services to serve next to the kernel's, e.g. from
            ``grpc.method_handlers_generic_handler``. The kernel's own methods take
            precedence over a handler that claims the same path; ``authenticator``
            guards these calls too; :meth:`stop` gives their calls in flight its grace.

    Every method and property is thread-safe. :meth:`start` and :meth:`stop` block;
    the controls and readers do not.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        keepalive_interval: float = 1.0,
        tls: ServerTls | None = None,
        authenticator: Authenticator | None = None,
        version: str = "0.0.0-dev",
        max_workers: int = 64,
        logger: Any = None,
        handlers: Sequence[grpc.GenericRpcHandler] = (),
    ) -> None:
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be 0..65535, not {port!r}")
        if not keepalive_interval > 0:
            raise ValueError(f"keepalive_interval must be > 0, not {keepalive_interval!r}")
        if max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, not {max_workers!r}")
        if isinstance(handlers, grpc.GenericRpcHandler):
            raise TypeError("handlers is a sequence of grpc.GenericRpcHandler, not one")
        for handler in handlers:
            if not isinstance(handler, grpc.GenericRpcHandler):
                raise TypeError(f"handlers must be grpc.GenericRpcHandler, not {handler!r}")
        self._handlers = tuple(handlers)
        self._host = host
        self._requested_port = port
        self._keepalive_interval = float(keepalive_interval)
        self._tls = tls
        self._authenticator = authenticator
        self._version = version
        self._max_workers = max_workers
        self._log = logger if logger is not None else _logger
        self._health = _health.HealthServicer(
            {
                "": _health.SERVING,
                CONNECTION_SERVICE: _health.SERVING,
                HOST_SERVICE: _health.SERVING,
            }
        )
        # An RLock, so that wait_for() predicates may read the properties below.
        self._cond = threading.Condition(threading.RLock())
        # Guarded by _cond: lifecycle, controls, and the record of what clients did.
        self._server: grpc.Server | None = None
        self._port: int | None = None
        self._started = False
        self._stopping = False
        self._stopped = threading.Event()
        self._paused = False
        self._clients: dict[str, _Client] = {}  # open Connect streams, in connect order
        self._clients_generation = 0  # bumped when _clients gains or loses one
        self._connect_requests: list[clients_pb2.ConnectRequest] = []
        self._keepalive_answers: list[tuple[str, float]] = []
        self._keepalives_sent = 0

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> DevServer:
        """Bind and start serving; returns self. Blocks briefly.

        Raises:
            DevServerBindError: the address cannot be bound (the port is taken, or the
                host is not a local address).
            RuntimeError: the server was already started (or stopped).
        """
        with self._cond:
            if self._started or self._stopping:
                raise RuntimeError("a DevServer can be started only once")
            self._started = True
        server = grpc.server(
            futures.ThreadPoolExecutor(
                max_workers=self._max_workers, thread_name_prefix="chronicle-devserver"
            ),
            interceptors=[_AuthInterceptor(self._authenticator)] if self._authenticator else None,
            options=[
                # Fail clearly when another server holds the port, instead of sharing it.
                ("grpc.so_reuseport", 0),
                # Tolerate any client keepalive setting: the kernel does not police pings.
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_recv_ping_interval_without_data_ms", 1000),
                ("grpc.http2.max_ping_strikes", 0),
            ],
        )
        clients_pb2_grpc.add_ConnectionServiceServicer_to_server(_ConnectionService(self), server)
        host_pb2_grpc.add_ServerServicer_to_server(_HostService(self), server)
        server.add_generic_rpc_handlers((self._health.generic_handler(), *self._handlers))
        # OAuth token endpoint (POST /connect/token, see DESIGN.md section 4): not served
        # yet. It belongs here, next to the gRPC port, when the security work adds it.
        target = _join_host_port(self._host, self._requested_port)
        try:
            if self._tls is not None:
                port = server.add_secure_port(target, self._tls.server_credentials())
            else:
                port = server.add_insecure_port(target)
        except RuntimeError as exc:  # grpc only says "Failed to bind"
            server.stop(None)
            raise DevServerBindError(
                _bind_failure(self._host, self._requested_port), address=target
            ) from exc
        with self._cond:
            self._server = server
            self._port = port
        # A lazy proxy unless the caller gave a logger: binding would freeze structlog's
        # configuration of this moment.
        self._log = (
            self._log.bind(devserver=self.address)
            if self._log is not _logger
            else structlog.get_logger("chronicle_conn.devserver", devserver=self.address)
        )
        server.start()
        self._log.info(
            "devserver_started",
            tls=self._tls is not None,
            keepalive_interval=self._keepalive_interval,
        )
        return self

    def stop(self, grace: float | None = None) -> None:
        """Stop serving and wait until the server has stopped. Idempotent.

        The listening socket closes at once (new connections are refused) and clients
        are sent a GOAWAY. Open ``Connect``, ``Watch`` and ``ObserveConnectedClients``
        streams end at once with ``UNAVAILABLE``; other calls in flight (``handlers``
        calls among them) get ``grace`` seconds to finish, then are cancelled (None:
        cancelled at once), which their clients see as ``UNAVAILABLE`` too.

        As with ``grpc.Server.stop``, a call made while another is still waiting for
        the grace may shorten it: ``stop(None)`` from another thread cancels the calls
        in flight now, and both calls return once the server has stopped.
        """
        with self._cond:
            server = self._server
            first = not self._stopping
            self._stopping = True
            wakes = [client.stream for client in self._clients.values()]
            self._cond.notify_all()
        if server is None:
            self._stopped.set()
            return
        if not first:
            server.stop(grace)  # grpc keeps the shorter of the two graces
            self._stopped.wait()
            return
        for wake in wakes:
            wake.set()
        self._health.close()
        server.stop(grace).wait()
        self._stopped.set()
        self._log.info("devserver_stopped")

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- addresses -----------------------------------------------------------------------

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        """The bound port (the real one when constructed with ``port=0``).

        Raises:
            RuntimeError: before :meth:`start`.
        """
        with self._cond:
            if self._port is None:
                raise RuntimeError("DevServer is not started; its port is not bound yet")
            return self._port

    @property
    def address(self) -> str:
        """``host:port`` (IPv6 hosts in brackets), to hand to a channel."""
        return _join_host_port(self._host, self.port)

    @property
    def keepalive_interval(self) -> float:
        return self._keepalive_interval

    @property
    def version(self) -> str:
        return self._version

    # -- controls ------------------------------------------------------------------------

    def pause_keepalives(self) -> None:
        """Simulate a hung kernel: ``Connect`` streams stay open but send nothing."""
        with self._cond:
            self._paused = True
        self._log.info("keepalives_paused")

    def resume_keepalives(self) -> None:
        """Undo :meth:`pause_keepalives`; each stream sends again at its next tick."""
        with self._cond:
            self._paused = False
        self._log.info("keepalives_resumed")

    @property
    def keepalives_paused(self) -> bool:
        with self._cond:
            return self._paused

    def set_serving(self, serving: bool) -> None:
        """Make health report ``SERVING`` or ``NOT_SERVING`` (pushed to ``Watch`` streams)."""
        self._health.set_all(_health.SERVING if serving else _health.NOT_SERVING)
        self._log.info("serving_changed", serving=serving)

    # -- what clients did ----------------------------------------------------------------

    @property
    def connect_requests(self) -> list[clients_pb2.ConnectRequest]:
        """Every ``ConnectRequest`` received, oldest first (copies)."""
        with self._cond:
            return [_copy_request(request) for request in self._connect_requests]

    @property
    def keepalive_answers(self) -> list[tuple[str, float]]:
        """Every ``ConnectionKeepAlive`` answer: ``(connection_id, time.monotonic())``."""
        with self._cond:
            return list(self._keepalive_answers)

    @property
    def keepalives_sent(self) -> int:
        """How many keep-alives all ``Connect`` streams have sent."""
        with self._cond:
            return self._keepalives_sent

    @property
    def connection_ids(self) -> list[str]:
        """The connection ids of the open ``Connect`` streams, in connect order."""
        with self._cond:
            return list(self._clients)

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Block until ``predicate()`` is true, or ``timeout`` seconds pass.

        The predicate is re-evaluated whenever the server records something (a connect,
        a stream ending, a keep-alive sent, an answer); it may read this object's
        properties. Returns the predicate's last value.
        """
        with self._cond:
            return self._cond.wait_for(predicate, timeout)

    # -- serving (called by the servicers on worker threads) -----------------------------

    def _register(self, request: clients_pb2.ConnectRequest, stream: threading.Event) -> bool:
        with self._cond:
            if self._stopping:
                return False
            self._connect_requests.append(_copy_request(request))
            self._clients.pop(request.ConnectionId, None)
            self._clients[request.ConnectionId] = _Client(
                _copy_request(request), stream, datetime.now(timezone.utc)
            )
            self._clients_generation += 1
            self._cond.notify_all()
        return True

    def _unregister(self, connection_id: str, stream: threading.Event) -> None:
        with self._cond:
            client = self._clients.get(connection_id)
            # A reconnect with the same id may have replaced this stream already.
            if client is not None and client.stream is stream:
                del self._clients[connection_id]
                self._clients_generation += 1
            self._cond.notify_all()

    def _keepalive_stream(
        self, connection_id: str, stream: threading.Event, context: grpc.ServicerContext
    ) -> Iterator[clients_pb2.ConnectionKeepAlive]:
        interval = self._keepalive_interval
        next_due = time.monotonic()
        while True:
            # The stream's event is set on client cancel (context callback) and on stop().
            stream.clear()
            with self._cond:
                stopping, paused = self._stopping, self._paused
            if stopping:
                context.abort(grpc.StatusCode.UNAVAILABLE, "the dev server is stopping")
            if not context.is_active():
                return
            now = time.monotonic()
            if now >= next_due:
                if not paused:
                    # Counted before the yield, so that a client holding the message can
                    # never see a count that leaves it out.
                    with self._cond:
                        self._keepalives_sent += 1
                        self._cond.notify_all()
                    yield clients_pb2.ConnectionKeepAlive(ConnectionId=connection_id)
                next_due += interval
                now = time.monotonic()
                if next_due <= now:  # fell behind (a slow reader): no burst to catch up
                    next_due = now + interval
                continue
            stream.wait(next_due - now)

    def _record_answer(self, connection_id: str) -> None:
        with self._cond:
            self._keepalive_answers.append((connection_id, time.monotonic()))
            client = self._clients.get(connection_id)
            if client is not None:
                client.last_seen = datetime.now(timezone.utc)
            self._cond.notify_all()

    def _connected_clients(self) -> tuple[int, clients_pb2.IEnumerable_ConnectedClient]:
        silo = f"devserver@{self.address}"
        with self._cond:
            generation = self._clients_generation
            items = [
                clients_pb2.ConnectedClient(
                    ConnectionId=client.request.ConnectionId,
                    Version=client.request.ClientVersion,
                    LastSeen=clients_pb2.SerializableDateTimeOffset(
                        Value=client.last_seen.isoformat()
                    ),
                    IsRunningWithDebugger=client.request.IsRunningWithDebugger,
                    SiloAddress=silo,
                    ProcessId=client.request.ProcessId,
                    ProcessPath=client.request.ProcessPath,
                    MachineName=client.request.MachineName,
                    ClientType=client.request.ClientType,
                )
                for client in self._clients.values()
            ]
        return generation, clients_pb2.IEnumerable_ConnectedClient(items=items)

    def _clients_changed(self, generation: int, done: threading.Event) -> bool:
        return done.is_set() or self._stopping or self._clients_generation != generation

    def _observe_clients(
        self, context: grpc.ServicerContext
    ) -> Iterator[clients_pb2.IEnumerable_ConnectedClient]:
        done = threading.Event()

        def on_rpc_done() -> None:
            done.set()
            with self._cond:
                self._cond.notify_all()

        if not context.add_callback(on_rpc_done):
            return
        generation, clients = self._connected_clients()
        yield clients
        while True:
            with self._cond:
                self._cond.wait_for(functools.partial(self._clients_changed, generation, done))
                stopping = self._stopping
            if done.is_set():
                return
            if stopping:
                context.abort(grpc.StatusCode.UNAVAILABLE, "the dev server is stopping")
            generation, clients = self._connected_clients()
            yield clients


class _ConnectionService(clients_pb2_grpc.ConnectionServiceServicer):
    def __init__(self, server: DevServer) -> None:
        self._server = server

    def Connect(
        self, request: clients_pb2.ConnectRequest, context: grpc.ServicerContext
    ) -> Iterator[clients_pb2.ConnectionKeepAlive]:
        server = self._server
        connection_id = request.ConnectionId
        stream = threading.Event()
        if not server._register(request, stream):
            context.abort(grpc.StatusCode.UNAVAILABLE, "the dev server is stopping")
        server._log.info(
            "client_connected",
            connection_id=connection_id,
            client_type=request.ClientType,
            client_version=request.ClientVersion,
            peer=context.peer(),
        )
        try:
            if context.add_callback(stream.set):
                yield from server._keepalive_stream(connection_id, stream, context)
        finally:
            server._unregister(connection_id, stream)
            server._log.info("client_disconnected", connection_id=connection_id)

    def ConnectionKeepAlive(
        self, request: clients_pb2.ConnectionKeepAlive, context: grpc.ServicerContext
    ) -> empty_pb2.Empty:
        self._server._record_answer(request.ConnectionId)
        return empty_pb2.Empty()

    def GetConnectedClients(
        self, request: empty_pb2.Empty, context: grpc.ServicerContext
    ) -> clients_pb2.IEnumerable_ConnectedClient:
        return self._server._connected_clients()[1]

    def GetDescriptorSet(
        self, request: empty_pb2.Empty, context: grpc.ServicerContext
    ) -> clients_pb2.DescriptorSetResponse:
        return clients_pb2.DescriptorSetResponse(SchemaDefinition=CLIENTS_PROTO)

    def ObserveConnectedClients(
        self, request: empty_pb2.Empty, context: grpc.ServicerContext
    ) -> Iterator[clients_pb2.IEnumerable_ConnectedClient]:
        return self._server._observe_clients(context)


class _HostService(host_pb2_grpc.ServerServicer):
    def __init__(self, server: DevServer) -> None:
        self._server = server

    def GetVersionInfo(
        self, request: empty_pb2.Empty, context: grpc.ServicerContext
    ) -> host_pb2.ServerVersionInfo:
        return host_pb2.ServerVersionInfo(Version=self._server.version, CommitSha="devserver")


class _AuthInterceptor(grpc.ServerInterceptor):
    """Wraps every non-anonymous method so that the authenticator runs first.

    The check runs inside the wrapped behaviour (on a worker thread), not here: this
    method runs on gRPC's serving thread, which must not wait on user code.
    """

    def __init__(self, authenticator: Authenticator) -> None:
        self._authenticator = authenticator

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method in _ANONYMOUS_METHODS:
            return handler
        authenticator = self._authenticator

        def authenticate(context: grpc.ServicerContext) -> None:
            metadata: dict[str, str] = {}
            for key, value in context.invocation_metadata():
                if isinstance(value, str):
                    metadata.setdefault(key, value)
            if not authenticator(method, metadata):
                context.abort(
                    grpc.StatusCode.UNAUTHENTICATED, "the dev server refused the credentials"
                )

        return _guarded(handler, authenticate)


def _guarded(
    handler: grpc.RpcMethodHandler[Any, Any], guard: Callable[[grpc.ServicerContext], None]
) -> grpc.RpcMethodHandler[Any, Any]:
    """``handler`` with ``guard(context)`` run before its behaviour."""
    deserializer, serializer = handler.request_deserializer, handler.response_serializer
    if handler.unary_unary is not None:
        unary_unary = handler.unary_unary

        def guarded_unary_unary(request: Any, context: grpc.ServicerContext) -> Any:
            guard(context)
            return unary_unary(request, context)

        return grpc.unary_unary_rpc_method_handler(guarded_unary_unary, deserializer, serializer)
    if handler.unary_stream is not None:
        unary_stream = handler.unary_stream

        def guarded_unary_stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            guard(context)
            yield from unary_stream(request, context)

        return grpc.unary_stream_rpc_method_handler(guarded_unary_stream, deserializer, serializer)
    if handler.stream_unary is not None:
        stream_unary = handler.stream_unary

        def guarded_stream_unary(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            guard(context)
            return stream_unary(requests, context)

        return grpc.stream_unary_rpc_method_handler(guarded_stream_unary, deserializer, serializer)
    assert handler.stream_stream is not None
    stream_stream = handler.stream_stream

    def guarded_stream_stream(
        requests: Iterator[Any], context: grpc.ServicerContext
    ) -> Iterator[Any]:
        guard(context)
        yield from stream_stream(requests, context)

    return grpc.stream_stream_rpc_method_handler(guarded_stream_stream, deserializer, serializer)


def _copy_request(request: clients_pb2.ConnectRequest) -> clients_pb2.ConnectRequest:
    copy = clients_pb2.ConnectRequest()
    copy.CopyFrom(request)
    return copy


def _join_host_port(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def _bind_failure(host: str, port: int) -> str:
    """Say why gRPC could not bind (it only says that it could not)."""
    address = _join_host_port(host, port)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    probe = socket.socket(family, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host.strip("[]"), port))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return f"cannot listen on {address}: address already in use (another server?)"
        return f"cannot listen on {address}: {exc.strerror or exc}"
    finally:
        probe.close()
    return f"cannot listen on {address}: gRPC could not bind it"


# The text of protos/chronicle_conn/_proto/clients.proto, which GetDescriptorSet returns
# (as the kernel returns its own contract's proto text). Embedded so that it works from
# an installed wheel; tests/test_protos.py fails when it differs from the file.
CLIENTS_PROTO = """\
// The Chronicle kernel's client connection contract.
//
// Written from the kernel's code-first contracts (Cratis/Chronicle,
// Source/Kernel/Contracts/Clients); names and field numbers are the wire contract and
// must not change. Regenerate the Python modules with: python setup.py build_protos
syntax = "proto3";

package Cratis.Chronicle.Contracts.Clients;

import "google/protobuf/empty.proto";

service ConnectionService {
  // Registers the client; the kernel answers with a stream of keep-alives (the first at
  // once, then one every second) until the client goes away.
  rpc Connect(ConnectRequest)
      returns (stream .Cratis.Chronicle.Contracts.Clients.ConnectionKeepAlive);
  // The client's answer to each keep-alive on the Connect stream.
  rpc ConnectionKeepAlive(.Cratis.Chronicle.Contracts.Clients.ConnectionKeepAlive)
      returns (google.protobuf.Empty);
  rpc GetConnectedClients(google.protobuf.Empty) returns (IEnumerable_ConnectedClient);
  // Anonymous: needs no authorization header.
  rpc GetDescriptorSet(google.protobuf.Empty) returns (DescriptorSetResponse);
  rpc ObserveConnectedClients(google.protobuf.Empty) returns (stream IEnumerable_ConnectedClient);
}

message ConnectRequest {
  string ConnectionId = 1;
  string ClientVersion = 2;
  bool IsRunningWithDebugger = 3;
  // Fields 4-7 arrived in kernel v16.3; older kernels ignore them.
  int32 ProcessId = 4;
  string ProcessPath = 5;
  string MachineName = 6;
  string ClientType = 7;
}

message ConnectionKeepAlive {
  string ConnectionId = 1;
}

message DescriptorSetResponse {
  string SchemaDefinition = 1;
}

message SerializableDateTimeOffset {
  // ISO 8601 with offset.
  string Value = 1;
}

message ConnectedClient {
  string ConnectionId = 1;
  string Version = 2;
  SerializableDateTimeOffset LastSeen = 3;
  bool IsRunningWithDebugger = 4;
  string SiloAddress = 5;
  int32 ProcessId = 6;
  string ProcessPath = 7;
  string MachineName = 8;
  string ClientType = 9;
}

message IEnumerable_ConnectedClient {
  repeated ConnectedClient items = 1;
}
"""
