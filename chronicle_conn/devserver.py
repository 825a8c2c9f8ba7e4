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
:meth:`DevServer.set_serving` flips health, :meth:`DevServer.expire_tokens` ends every
token's life), and it records what clients did (:attr:`DevServer.connect_requests`,
:attr:`DevServer.keepalive_answers`, :attr:`DevServer.token_requests`,
:attr:`DevServer.authorized_calls`) with a :meth:`DevServer.wait_for` to observe it
without sleeping.

Security, as on a v16+ kernel:

- TLS: ``tls=ServerTls(...)`` (mutual when ``client_ca`` is set), or ``tls=True`` for a
  self-signed certificate made on the fly (:meth:`ServerTls.self_signed`; needs the
  ``cryptography`` package), which :attr:`DevServer.tls_certificate_pem` hands to clients.
- ``auth=True`` (the kernel's development client ``chronicle-dev-client`` /
  ``chronicle-dev-secret``) or ``auth={client_id: secret}``: the OAuth2
  client-credentials token endpoint ``POST /connect/token`` is served over HTTP/1.1 on
  the gRPC port itself, and every call except ``GetDescriptorSet`` and health needs
  ``authorization: Bearer <token>`` with a token it issued and that has not expired.
  ``api_keys=`` accepts ``api-key: <key>`` metadata too (or alone, without ``auth``).
  Anything else fails with ``UNAUTHENTICATED``. Streams are checked once, when they
  start.
- ``authenticator=``: a per-call hook of your own, on top of (or instead of) the above.

With ``auth``, the public port is a small front (:mod:`chronicle_conn._devfront`) that
tells HTTP/2 from HTTP/1.1 on each connection (by ALPN with TLS, by the HTTP/2 preface
in plaintext) and splices gRPC to the grpc server listening on 127.0.0.1; without it,
grpc listens on the public port itself. :attr:`DevServer.connection_string` is the
connection string a client should use. Client secrets, tokens and API keys never
appear in this module's log events, reprs or exceptions.

Example::

    with DevServer(keepalive_interval=0.2) as server:
        channel = grpc.insecure_channel(server.address)
        ...
        assert server.wait_for(lambda: len(server.keepalive_answers) >= 3, timeout=5)

    with DevServer(auth=True, tls=True) as server:
        connection = chronicle_conn.Connection(server.connection_string)

The command line wraps it as ``chronicle-conn dev-server`` (see :mod:`chronicle_conn.cli`).
"""

from __future__ import annotations

import base64
import dataclasses
import errno
import functools
import hmac
import ipaddress
import json
import math
import re
import secrets
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from concurrent import futures
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc
from google.protobuf import empty_pb2

from . import _devfront, _health, _log
from ._proto import clients_pb2, clients_pb2_grpc, host_pb2, host_pb2_grpc
from .connection_string import (
    DEVELOPMENT_CLIENT_ID,
    DEVELOPMENT_CLIENT_SECRET,
    ConnectionString,
    Endpoint,
)
from .errors import ChronicleConnError

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self is 3.11+

__all__ = [
    "TOKEN_PATH",
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

TOKEN_PATH = "/connect/token"
"""The OAuth2 token endpoint's path, on the gRPC port (as on a v16+ kernel)."""

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

# Where grpc listens when the front has the public port.
_BACKEND_HOST = "127.0.0.1"

# structlog if the application configured it, else standard logging (see _log).
_logger = _log.Router("chronicle_conn.devserver")


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
        private_key: its private key (left out of ``repr()``).
        client_ca: when set, clients must present a certificate signed by one of these
            CAs (mutual TLS); when None, any client may connect.
    """

    certificate_chain: bytes
    private_key: bytes = dataclasses.field(repr=False)
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

    @classmethod
    def self_signed(cls, hosts: Iterable[str] = (), *, client_ca: bytes | None = None) -> ServerTls:
        """Make a self-signed certificate (ECDSA P-256, valid for 30 days) and its key.

        Its subject alternative names are ``localhost``, ``127.0.0.1`` and ``::1`` plus
        ``hosts`` (names or addresses; the wildcard addresses ``0.0.0.0`` and ``::`` are
        replaced by this machine's host name). A client trusts it by taking
        ``certificate_chain`` as its root (``caPath``), or with ``skipTlsValidation``.

        Args:
            hosts: more names the certificate is for (e.g. the address served on).
            client_ca: as for the constructor (mutual TLS).

        Raises:
            ImportError: the ``cryptography`` package is not installed.
        """
        certificate, key = _make_self_signed(hosts)
        return cls(certificate_chain=certificate, private_key=key, client_ca=client_ca)

    def server_credentials(self) -> grpc.ServerCredentials:
        """The ``grpc.ServerCredentials`` for ``server.add_secure_port``."""
        return grpc.ssl_server_credentials(
            [(self.private_key, self.certificate_chain)],
            root_certificates=self.client_ca,
            require_client_auth=self.client_ca is not None,
        )


@dataclasses.dataclass(frozen=True)
class _Token:
    """An access token the token endpoint issued (the token itself is the dict key)."""

    client_id: str
    expires_at: float  # time.monotonic()


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
        tls: serve TLS with this material instead of plaintext; True: with a
            self-signed certificate made now (:meth:`ServerTls.self_signed`, for
            ``localhost``, the loopback addresses and ``host``).
        authenticator: when set, every call except ``GetDescriptorSet`` and health must
            pass ``authenticator(method, metadata)``, or fails with ``UNAUTHENTICATED``.
            It runs on the server's worker threads. With ``auth`` or ``api_keys`` too,
            a call must pass both.
        auth: serve the OAuth2 client-credentials token endpoint ``POST
            /connect/token`` on the same port and require its bearer tokens on every
            call but the anonymous ones. True: the kernel's development client
            (``chronicle-dev-client`` / ``chronicle-dev-secret``); a mapping: client id
            to secret. None or False: no token endpoint.
        api_keys: accept ``api-key: <key>`` metadata with one of these keys, instead of
            a bearer token; given without ``auth``, calls need one of them.
        token_lifetime: seconds an issued token is valid (``expires_in`` says it
            rounded up; the server enforces the exact value).
        version: what ``GetVersionInfo`` reports.
        max_workers: size of the server's thread pool, and so the number of streams and
            calls it serves at once: every open stream (``Connect``, ``Watch``,
            ``ObserveConnectedClients``) holds one thread, and so does every call in
            flight on ``handlers``; more wait. Threads are made as needed (default 1024:
            a thousand connected clients).
        logger: a structlog logger to use instead of ``chronicle_conn.devserver``.
        handlers: extra services to serve next to the kernel's, e.g. from
            ``grpc.method_handlers_generic_handler``. The kernel's own methods take
            precedence over a handler that claims the same path; ``auth``, ``api_keys``
            and ``authenticator`` guard these calls too; :meth:`stop` gives their calls
            in flight its grace.

    Every method and property is thread-safe. :meth:`start` and :meth:`stop` block;
    the controls and readers do not.

    Raises:
        ValueError: an option is out of range, or ``auth`` / ``api_keys`` hold an empty
            or malformed credential (the message never quotes a secret).
        TypeError: ``handlers``, ``auth``, ``api_keys`` or ``tls`` has the wrong type.
        ImportError: ``tls=True`` without the ``cryptography`` package.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        keepalive_interval: float = 1.0,
        tls: ServerTls | bool | None = None,
        authenticator: Authenticator | None = None,
        auth: bool | Mapping[str, str] | None = None,
        api_keys: Collection[str] = (),
        token_lifetime: float = 3600.0,
        version: str = "0.0.0-dev",
        max_workers: int = 1024,
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
        if not (isinstance(token_lifetime, (int, float)) and 0 < token_lifetime < math.inf):
            raise ValueError(
                f"token_lifetime must be a number of seconds > 0, not {token_lifetime!r}"
            )
        self._oauth_clients = _check_auth(auth)  # client id -> secret
        self._api_keys = _check_api_keys(api_keys)
        self._token_lifetime = float(token_lifetime)
        self._handlers = tuple(handlers)
        self._host = host
        self._requested_port = port
        self._keepalive_interval = float(keepalive_interval)
        if tls is True:
            tls = ServerTls.self_signed([host])
        elif tls is False:
            tls = None
        elif tls is not None and not isinstance(tls, ServerTls):
            raise TypeError(f"tls must be a ServerTls, True or None, not {type(tls).__name__}")
        self._tls: ServerTls | None = tls
        self._authenticator = authenticator
        self._version = version
        self._max_workers = max_workers
        _log.load()  # so that the router sees whether structlog is configured
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
        self._front: _devfront.Front | None = None
        self._tokens: dict[str, _Token] = {}  # issued, by token
        self._token_requests: list[tuple[str | None, str, float]] = []
        self._authorized_calls: list[tuple[str, str]] = []

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> DevServer:
        """Bind and start serving; returns self. Blocks briefly.

        Raises:
            DevServerBindError: the address cannot be bound (the port is taken, or the
                host is not a local address).
            RuntimeError: the server was already started (or stopped).
            ValueError: with ``auth`` and ``tls``, the certificate and key do not load.
        """
        with self._cond:
            if self._started or self._stopping:
                raise RuntimeError("a DevServer can be started only once")
            self._started = True
        # Before anything is bound: material that does not load fails here.
        ssl_context = self._front_ssl_context() if self._oauth_clients else None
        guarded = bool(self._oauth_clients or self._api_keys or self._authenticator)
        server = grpc.server(
            futures.ThreadPoolExecutor(
                max_workers=self._max_workers, thread_name_prefix="chronicle-devserver"
            ),
            interceptors=[_AuthInterceptor(self._admit, self._record_anonymous)]
            if guarded
            else None,
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
        target = _join_host_port(self._host, self._requested_port)
        sockets: list[socket.socket] = []
        backend_port = 0
        if self._oauth_clients:
            # The token endpoint shares the port: the front listens there, and grpc
            # behind it on the loopback.
            sockets, backend_port = self._bind_behind_front(server, target)
            port = sockets[0].getsockname()[1]
        else:
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
        self._log = self._log.bind(devserver=self.address)
        front = None
        if sockets:
            try:
                front = _devfront.Front(
                    sockets,
                    backend=(_BACKEND_HOST, backend_port),
                    ssl_context=ssl_context,
                    handler=self._serve_http,
                    logger=self._log,
                )
            except BaseException:
                for sock in sockets:
                    sock.close()
                server.stop(None)
                raise
            with self._cond:
                self._front = front
        server.start()
        if front is not None:
            try:
                front.start()
            except BaseException:
                front.close()
                server.stop(None)
                raise
        self._log.info(
            "devserver_started",
            tls=self._tls is not None,
            keepalive_interval=self._keepalive_interval,
            **self._security_summary(),
        )
        return self

    def _bind_behind_front(
        self, server: grpc.Server, target: str
    ) -> tuple[list[socket.socket], int]:
        """Bind grpc on the loopback and the front's sockets on ``target``."""
        backend = _join_host_port(_BACKEND_HOST, 0)
        try:
            backend_port = server.add_insecure_port(backend)
        except RuntimeError as exc:
            server.stop(None)
            raise DevServerBindError(
                f"cannot listen on {backend} (gRPC behind the token endpoint's front): "
                "gRPC could not bind it",
                address=target,
            ) from exc
        try:
            sockets = _devfront.bind_listeners(self._host, self._requested_port)
        except OSError as exc:
            server.stop(None)
            raise DevServerBindError(_os_bind_failure(target, exc), address=target) from exc
        return sockets, backend_port

    def _front_ssl_context(self) -> ssl.SSLContext | None:
        tls = self._tls
        if tls is None:
            return None
        try:
            return _devfront.server_ssl_context(
                tls.certificate_chain, tls.private_key, tls.client_ca
            )
        except ssl.SSLError as exc:
            # The reason is OpenSSL's ("KEY_VALUES_MISMATCH"): it quotes no key material.
            raise ValueError(
                f"the TLS certificate and key do not load ({exc.reason or 'ssl error'}): "
                "give a PEM certificate chain and its matching private key"
            ) from None

    def _security_summary(self) -> dict[str, object]:
        """What a log line or a repr may say about the credentials (never a secret)."""
        return {
            "mutual_tls": self._tls is not None and self._tls.client_ca is not None,
            "oauth_clients": sorted(self._oauth_clients),
            "api_keys": len(self._api_keys),
            "authenticator": self._authenticator is not None,
        }

    def stop(self, grace: float | None = None) -> None:
        """Stop serving and wait until the server has stopped. Idempotent.

        The listening socket closes at once (new connections are refused) and clients
        are sent a GOAWAY. Open ``Connect``, ``Watch`` and ``ObserveConnectedClients``
        streams end at once with ``UNAVAILABLE``; other calls in flight (``handlers``
        calls among them) get ``grace`` seconds to finish, then are cancelled (None:
        cancelled at once), which their clients see as ``UNAVAILABLE`` too. With
        ``auth``, the front's connections (spliced gRPC and HTTP/1.1 alike) are closed
        once grpc has stopped.

        As with ``grpc.Server.stop``, a call made while another is still waiting for
        the grace may shorten it: ``stop(None)`` from another thread cancels the calls
        in flight now, and both calls return once the server has stopped.
        """
        with self._cond:
            server, front = self._server, self._front
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
        if front is not None:
            front.close_listeners()
        for wake in wakes:
            wake.set()
        self._health.close()
        server.stop(grace).wait()
        if front is not None:
            # After grpc's stop: its GOAWAYs and last statuses have gone through.
            front.close()
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

    @property
    def tls_certificate_pem(self) -> bytes | None:
        """The server's certificate chain (PEM) when it serves TLS, else None.

        With ``tls=True``, the self-signed certificate: what a client takes as its root
        (write it to a file for ``caPath``).
        """
        return self._tls.certificate_chain if self._tls is not None else None

    @property
    def token_lifetime(self) -> float:
        return self._token_lifetime

    @property
    def oauth_client_ids(self) -> tuple[str, ...]:
        """The client ids the token endpoint knows (empty: no token endpoint)."""
        return tuple(self._oauth_clients)

    @property
    def connection_string(self) -> str:
        """The connection string a client should use, secrets included.

        ``chronicle://<host>:<port>`` with: ``disableTls=true`` in plaintext,
        ``skipTlsValidation=true`` with TLS (a dev certificate is seldom one a client
        can validate; use ``caPath`` with :attr:`tls_certificate_pem` instead to
        validate it), the first ``auth`` client's id and secret, or else the first API
        key. A wildcard host becomes the loopback address. Mutual TLS needs the
        client's ``certificatePath`` and ``keyPath`` on top.

        It holds the secret: log ``ConnectionString.parse(s).redacted()`` instead.

        Raises:
            RuntimeError: before :meth:`start`.
        """
        value = ConnectionString(
            hosts=(Endpoint(_client_host(self._host), self.port),),
            disable_tls=self._tls is None,
            skip_tls_validation=self._tls is not None,
        )
        if self._oauth_clients:
            client_id, secret = next(iter(self._oauth_clients.items()))
            value = value.with_credentials(client_id, secret)
        elif self._api_keys:
            value = value.with_api_key(self._api_keys[0])
        return value.render_as_string(hide_secrets=False)

    def __repr__(self) -> str:
        with self._cond:
            port, started, stopping = self._port, self._started, self._stopping
        state = "stopped" if stopping else "started" if started else "not started"
        where = _join_host_port(self._host, self._requested_port if port is None else port)
        tls = "off" if self._tls is None else "mutual" if self._tls.client_ca else "on"
        return (
            f"<DevServer {where} {state} tls={tls} "
            f"oauth_clients={sorted(self._oauth_clients)} api_keys={len(self._api_keys)}>"
        )

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

    def expire_tokens(self) -> None:
        """End the life of every token issued so far, as if their lifetimes had run out.

        Calls that carry one fail with ``UNAUTHENTICATED`` until the client fetches a
        new token; streams that are open already stay open (they were checked when
        they started).
        """
        with self._cond:
            count = len(self._tokens)
            self._tokens.clear()
            self._cond.notify_all()
        self._log.info("tokens_expired", tokens=count)

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

    @property
    def token_requests(self) -> list[tuple[str | None, str, float]]:
        """Every ``POST /connect/token``: ``(client_id, outcome, time.monotonic())``.

        Oldest first. ``client_id`` is the one the request gave (None if it gave none);
        ``outcome`` is ``"issued"`` or the OAuth error answered: ``"invalid_request"``,
        ``"unsupported_grant_type"`` or ``"invalid_client"``.
        """
        with self._cond:
            return list(self._token_requests)

    @property
    def authorized_calls(self) -> list[tuple[str, str]]:
        """Every call the credential check saw: ``(method, kind)``, oldest first.

        ``kind`` is ``"bearer"`` (a valid token), ``"api_key"``, ``"anonymous"`` (a
        method that needs no credentials), ``"authenticator"`` (admitted by the
        ``authenticator`` alone, when there is neither ``auth`` nor ``api_keys``) or
        ``"refused"`` (failed with ``UNAUTHENTICATED``). Empty when the server checks no
        credentials at all.
        """
        with self._cond:
            return list(self._authorized_calls)

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

    # -- credentials (the interceptor on worker threads, the token endpoint on the front's)

    def _admit(self, method: str, metadata: Mapping[str, str]) -> str | None:
        """Check one call's credentials; return why it is refused, or None."""
        kind, refusal = self._check_credentials(metadata)
        authenticator = self._authenticator
        if refusal is None and authenticator is not None and not authenticator(method, metadata):
            kind, refusal = "refused", "the dev server refused the credentials"
        with self._cond:
            self._authorized_calls.append((method, kind))
            self._cond.notify_all()
        if refusal is not None:
            self._log.info("call_refused", method=method, reason=refusal)
        return refusal

    def _record_anonymous(self, method: str) -> None:
        with self._cond:
            self._authorized_calls.append((method, "anonymous"))
            self._cond.notify_all()

    def _check_credentials(self, metadata: Mapping[str, str]) -> tuple[str, str | None]:
        """``(kind, refusal)`` for the bearer token or API key in ``metadata``."""
        if not self._oauth_clients and not self._api_keys:
            return "authenticator", None
        problem: str | None = None
        header = metadata.get("authorization") if self._oauth_clients else None
        if header is not None:
            scheme, _, token = header.strip().partition(" ")
            token = token.strip()
            if scheme.lower() != "bearer" or not token:
                problem = "the authorization metadata is not 'Bearer <token>'"
            elif self._token_valid(token):
                return "bearer", None
            else:
                problem = (
                    "the bearer token is unknown or expired: fetch one from POST /connect/token"
                )
        key = metadata.get("api-key") if self._api_keys else None
        if key is not None:
            if _matches_any(key, self._api_keys):
                return "api_key", None
            problem = problem or "the api-key is not one this server accepts"
        if problem is None:
            wanted = []
            if self._oauth_clients:
                wanted.append("'authorization: Bearer <token>' (token from POST /connect/token)")
            if self._api_keys:
                wanted.append("'api-key: <key>'")
            problem = "no credentials: send " + " or ".join(wanted)
        return "refused", problem

    def _token_valid(self, token: str) -> bool:
        now = time.monotonic()
        with self._cond:
            issued = self._tokens.get(token)
            if issued is None:
                return False
            if now >= issued.expires_at:
                del self._tokens[token]
                return False
            return True

    def _serve_http(self, request: _devfront.HttpRequest) -> _devfront.HttpResponse:
        """Answer an HTTP/1.1 request that reached the front: the token endpoint."""
        if request.path != TOKEN_PATH:
            return _json_response(
                404,
                {"error": "not_found", "error_description": f"only POST {TOKEN_PATH} is here"},
            )
        if request.method != "POST":
            return _json_response(
                405,
                {"error": "method_not_allowed", "error_description": f"use POST {TOKEN_PATH}"},
                (("Allow", "POST"),),
            )
        client_id, outcome, response = self._token_response(request)
        with self._cond:
            self._token_requests.append((client_id, outcome, time.monotonic()))
            self._cond.notify_all()
        # An unknown client id is not logged: it may be a secret pasted in the wrong place.
        known = client_id if client_id in self._oauth_clients else None
        if outcome == "issued":
            self._log.info("token_issued", client_id=known, lifetime=self._token_lifetime)
        else:
            self._log.info("token_refused", client_id=known, error=outcome, peer=request.peer)
        return response

    def _token_response(
        self, request: _devfront.HttpRequest
    ) -> tuple[str | None, str, _devfront.HttpResponse]:
        """``(client_id, outcome, response)`` for a ``POST /connect/token`` (RFC 6749 4.4)."""
        content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if content_type != "application/x-www-form-urlencoded":
            return _oauth_error(
                None,
                "invalid_request",
                "send the parameters as application/x-www-form-urlencoded",
            )
        try:
            pairs = urllib.parse.parse_qsl(
                request.body.decode("utf-8"),
                keep_blank_values=True,
                errors="strict",
                max_num_fields=_MAX_FORM_FIELDS,
            )
        except ValueError:  # not UTF-8, or too many fields; the text is not quoted
            return _oauth_error(None, "invalid_request", "the form body does not parse")
        params: dict[str, str] = {}
        for name, value in pairs:
            if name in params:
                shown = repr(name) if name in _OAUTH_PARAMETERS else "a parameter"
                return _oauth_error(None, "invalid_request", f"{shown} is given more than once")
            params[name] = value
        client_id = params.get("client_id")
        header = request.headers.get("authorization")
        if header is not None:
            if "client_secret" in params:
                return _oauth_error(
                    client_id,
                    "invalid_request",
                    "use one client authentication: HTTP Basic or client_secret, not both",
                )
            basic = _parse_basic(header)
            if basic is None:
                return _oauth_error(
                    client_id, "invalid_client", "the authorization header is not HTTP Basic"
                )
            # RFC 6749 2.3.1 form-encodes id and secret inside Basic; many clients do not.
            candidates = [basic, _form_decoded(basic)]
            if client_id is not None and client_id not in (basic[0], candidates[1][0]):
                return _oauth_error(
                    client_id, "invalid_request", "client_id differs from the Basic user name"
                )
            client_id = candidates[1][0] if candidates[1][0] in self._oauth_clients else basic[0]
        elif client_id is None:
            return _oauth_error(
                None, "invalid_client", "send client_id and client_secret (or HTTP Basic)"
            )
        else:
            candidates = [(client_id, params.get("client_secret", ""))]
        grant_type = params.get("grant_type")
        if grant_type is None:
            return _oauth_error(
                client_id, "invalid_request", "grant_type is missing: send client_credentials"
            )
        if grant_type != "client_credentials":
            return _oauth_error(
                client_id, "unsupported_grant_type", "only client_credentials is supported"
            )
        if not any(self._secret_matches(cid, secret) for cid, secret in candidates):
            return _oauth_error(client_id, "invalid_client", "unknown client or wrong secret")
        token = secrets.token_urlsafe(32)
        now = time.monotonic()
        with self._cond:
            for stale in [key for key, issued in self._tokens.items() if issued.expires_at <= now]:
                del self._tokens[stale]
            self._tokens[token] = _Token(client_id, now + self._token_lifetime)
        body = {
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": math.ceil(self._token_lifetime),
        }
        return client_id, "issued", _json_response(200, body)

    def _secret_matches(self, client_id: str, secret: str) -> bool:
        expected = self._oauth_clients.get(client_id)
        # Compared for an unknown client too, so that the time taken tells nothing.
        same = hmac.compare_digest(
            (expected if expected is not None else "\0").encode(), secret.encode()
        )
        return same and expected is not None

    # -- keep-alives -------------------------------------------------------------------

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
    """Wraps every method so that the credential check runs first.

    ``admit(method, metadata)`` returns why a call is refused (it then fails with
    ``UNAUTHENTICATED`` and that message), or None; the anonymous methods only call
    ``note_anonymous(method)``. The check runs inside the wrapped behaviour (on a
    worker thread), not here: this method runs on gRPC's serving thread, which must not
    wait on user code. A stream is checked once, when it starts.
    """

    def __init__(
        self,
        admit: Callable[[str, Mapping[str, str]], str | None],
        note_anonymous: Callable[[str], None],
    ) -> None:
        self._admit = admit
        self._note_anonymous = note_anonymous

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None:
            return handler
        if method in _ANONYMOUS_METHODS:
            note_anonymous = self._note_anonymous
            return _guarded(handler, lambda context: note_anonymous(method))
        admit = self._admit

        def authenticate(context: grpc.ServicerContext) -> None:
            metadata: dict[str, str] = {}
            for key, value in context.invocation_metadata():
                if isinstance(value, str):
                    metadata.setdefault(key, value)
            refusal = admit(method, metadata)
            if refusal is not None:
                context.abort(grpc.StatusCode.UNAUTHENTICATED, refusal)

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


_MAX_FORM_FIELDS = 32
_OAUTH_PARAMETERS = frozenset({"grant_type", "client_id", "client_secret", "scope"})
# gRPC metadata values: printable ASCII, no space at either end.
_METADATA_VALUE = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?")


def _check_auth(auth: object) -> dict[str, str]:
    """The ``auth`` option as ``{client_id: secret}`` (empty: no token endpoint)."""
    if auth is None or auth is False:
        return {}
    if auth is True:
        return {DEVELOPMENT_CLIENT_ID: DEVELOPMENT_CLIENT_SECRET}
    if not isinstance(auth, Mapping):
        raise TypeError(
            f"auth must be True, None or a mapping of client id to secret, "
            f"not {type(auth).__name__}"
        )
    if not auth:
        raise ValueError(
            "auth is an empty mapping: give {client_id: secret}, or auth=True for the "
            "development client"
        )
    clients: dict[str, str] = {}
    for client_id, secret in auth.items():
        if not isinstance(client_id, str) or not client_id or not client_id.isprintable():
            raise ValueError("auth: every client id must be a non-empty printable str")
        if not isinstance(secret, str) or not secret or not secret.isprintable():
            raise ValueError(
                f"auth: the secret of client {client_id!r} must be a non-empty printable str"
            )
        clients[client_id] = secret
    return clients


def _check_api_keys(api_keys: object) -> tuple[str, ...]:
    if isinstance(api_keys, (str, bytes)):
        raise TypeError("api_keys is a collection of keys, not one key: write api_keys=[key]")
    if not isinstance(api_keys, Iterable):
        raise TypeError(f"api_keys must be a collection of str, not {type(api_keys).__name__}")
    keys: list[str] = []
    for key in api_keys:
        if not isinstance(key, str) or _METADATA_VALUE.fullmatch(key) is None:
            raise ValueError(
                "api_keys must be non-empty strs of printable ASCII without spaces at the "
                "ends (they travel as gRPC metadata)"
            )
        if key not in keys:
            keys.append(key)
    return tuple(keys)


def _matches_any(given: str, accepted: Sequence[str]) -> bool:
    # Every key is compared, so that the time taken tells nothing.
    encoded = given.encode()
    matches = [hmac.compare_digest(encoded, key.encode()) for key in accepted]
    return any(matches)


def _parse_basic(header: str) -> tuple[str, str] | None:
    """``(user, password)`` from an HTTP Basic authorization header, or None."""
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except ValueError:  # binascii.Error, UnicodeDecodeError
        return None
    user, colon, password = decoded.partition(":")
    return (user, password) if colon and user else None


def _form_decoded(credentials: tuple[str, str]) -> tuple[str, str]:
    user, password = credentials
    return urllib.parse.unquote_plus(user), urllib.parse.unquote_plus(password)


def _json_response(
    status: int, body: Mapping[str, object], headers: tuple[tuple[str, str], ...] = ()
) -> _devfront.HttpResponse:
    # RFC 6749 5.1: token responses must not be cached.
    return _devfront.HttpResponse(
        status,
        json.dumps(body).encode(),
        headers=(("Cache-Control", "no-store"), ("Pragma", "no-cache"), *headers),
    )


def _oauth_error(
    client_id: str | None, error: str, description: str
) -> tuple[str | None, str, _devfront.HttpResponse]:
    """An OAuth error answer (RFC 6749 5.2): 401 for ``invalid_client``, else 400."""
    body = {"error": error, "error_description": description}
    if error == "invalid_client":
        challenge = (("WWW-Authenticate", 'Basic realm="chronicle-devserver"'),)
        return client_id, error, _json_response(401, body, challenge)
    return client_id, error, _json_response(400, body)


def _client_host(host: str) -> str:
    """The host a client on this machine dials for a server bound to ``host``."""
    bare = host.strip("[]")
    if not bare:
        return "localhost"
    try:
        address = ipaddress.ip_address(bare)
    except ValueError:
        return bare
    if address.is_unspecified:
        return "127.0.0.1" if address.version == 4 else "::1"
    return address.compressed


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
        return _os_bind_failure(address, exc)
    finally:
        probe.close()
    return f"cannot listen on {address}: gRPC could not bind it"


def _os_bind_failure(address: str, exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return f"cannot listen on {address}: address already in use (another server?)"
    return f"cannot listen on {address}: {exc.strerror or exc}"


_CRYPTOGRAPHY_MISSING = (
    "a self-signed certificate (tls=True, dev-server --tls) needs the cryptography "
    "package: pip install 'chronicle-conn[pkcs12]'"
)


def _make_self_signed(hosts: Iterable[str]) -> tuple[bytes, bytes]:
    """A self-signed server certificate for localhost and ``hosts``: ``(cert, key)`` PEM."""
    try:
        from cryptography import x509  # noqa: PLC0415 - an optional extra
        from cryptography.hazmat.primitives import hashes, serialization  # noqa: PLC0415
        from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: PLC0415
    except ImportError as exc:
        raise ImportError(_CRYPTOGRAPHY_MISSING) from exc
    names: list[str] = []
    for host in ("localhost", "127.0.0.1", "::1", *hosts):
        name = host.strip("[]")
        if name in ("", "0.0.0.0", "::"):
            name = socket.gethostname()
        if name and name not in names:
            names.append(name)
    alternative_names: list[x509.GeneralName] = []
    for name in names:
        try:
            alternative_names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alternative_names.append(x509.DNSName(name))
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "chronicle dev server")])
    now = datetime.now(timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName(alternative_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return (
        certificate.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


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
