"""The dev server's same-port front: gRPC and HTTP/1.1 on one port, as on a v16+ kernel.

A v16+ kernel answers gRPC (HTTP/2) and HTTP/1.1 (its OAuth token endpoint
``POST /connect/token``) on one port. grpcio serves HTTP/2 only, so when
:class:`~chronicle_conn.devserver.DevServer` serves the token endpoint, its public port
is a :class:`Front` instead, and the grpc server listens in plaintext on an ephemeral
port of 127.0.0.1:

- Each accepted connection is classified. With TLS (terminated here, by the stdlib's
  ``ssl``; ALPN offers ``h2`` and ``http/1.1``), the ALPN protocol the handshake selected
  decides: ``h2`` is gRPC, ``http/1.1`` is HTTP/1.1. In plaintext, or when the client
  offered no ALPN, its first bytes decide: the HTTP/2 client preface
  (:data:`H2_PREFACE`) is gRPC, anything else HTTP/1.1.
- A gRPC connection is spliced byte for byte to the grpc server. An end of stream on
  either side is passed on to the other (a GOAWAY is just bytes), a side that closes
  closes the other, and flow control holds each side while the other's buffer is full.
- An HTTP/1.1 connection is served here: requests (``Content-Length`` bodies only,
  keep-alive, pipelining) are parsed and answered by a handler function.

All of it runs on one asyncio event loop in one daemon thread, however many connections
there are: asyncio's TLS transport reads and writes one TLS connection from one thread,
which OpenSSL requires.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import email.utils
import errno
import functools
import http
import json
import os
import socket
import ssl
import tempfile
import threading
from collections.abc import Callable, Mapping
from typing import Any

from ._log import QuietLog

__all__ = [
    "H2_PREFACE",
    "Front",
    "HttpHandler",
    "HttpRequest",
    "HttpResponse",
    "bind_listeners",
    "server_ssl_context",
]

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
"""The HTTP/2 client connection preface (RFC 9113 section 3.4)."""

_MAX_HEAD = 16 * 1024  # request line and headers
_MAX_BODY = 64 * 1024
_FIRST_BYTES_TIMEOUT = 10.0  # a plaintext client that connects and says nothing
_HTTP_IDLE_TIMEOUT = 30.0  # an HTTP/1.1 connection between (or inside) requests
_HANDSHAKE_TIMEOUT = 10.0
_START_TIMEOUT = 10.0
_CLOSE_GRACE = 1.0  # close(): how long closing connections may flush before being reset
_ACCEPT_RETRY_DELAY = 0.1
_ACCEPT_BATCH = 32  # accept() calls per readiness event, so that one port cannot starve
_BACKLOG = 128


@dataclasses.dataclass(frozen=True)
class HttpRequest:
    """One HTTP/1.1 request, as the handler sees it.

    Attributes:
        method: the method, as sent (``"POST"``).
        target: the request target, as sent (``"/connect/token?x=1"``).
        path: the target's path (``"/connect/token"``).
        headers: lower-case names to values (repeated headers joined with ``", "``).
        body: the body (empty when there is none).
        peer: the client's ``host:port``.
        tls: whether the connection is TLS.
    """

    method: str
    target: str
    path: str
    headers: Mapping[str, str] = dataclasses.field(repr=False)
    body: bytes = dataclasses.field(repr=False)
    peer: str
    tls: bool


@dataclasses.dataclass(frozen=True)
class HttpResponse:
    """What the handler answers; the front adds the framing headers."""

    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


HttpHandler = Callable[[HttpRequest], HttpResponse]
"""``handler(request) -> response``. Runs on the front's event loop: it must not block."""


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def bind_listeners(host: str, port: int) -> list[socket.socket]:
    """Bind and listen on every address of ``host`` (two for ``localhost``) at ``port``.

    With ``port=0`` the first address picks a free port and the others use the same.
    An address family the machine lacks is skipped when another was bound. Sets
    ``SO_REUSEADDR`` (a restart on the same port is not blocked by connections in
    TIME_WAIT) but not ``SO_REUSEPORT`` (a second server on the port fails clearly).

    Raises:
        OSError: the address cannot be resolved or bound; nothing stays open.
    """
    infos = socket.getaddrinfo(
        host or None, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
    )
    addresses: list[tuple[socket.AddressFamily, tuple[Any, ...]]] = []
    for info in infos:
        if all(info[4][0] != seen[0] for _, seen in addresses):
            addresses.append((info[0], info[4]))
    both_families = len({family for family, _ in addresses}) > 1
    sockets: list[socket.socket] = []
    try:
        for family, address in addresses:
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6 and both_families:
                    # The IPv4 address has its own socket.
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind((address[0], port, *address[2:]))
                sock.listen(_BACKLOG)
            except OSError as exc:
                sock.close()
                if sockets and exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                    continue
                raise
            sockets.append(sock)
            port = sock.getsockname()[1]
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def server_ssl_context(
    certificate_chain: bytes, private_key: bytes, client_ca: bytes | None
) -> ssl.SSLContext:
    """A server ``SSLContext`` offering ALPN ``h2`` and ``http/1.1``, TLS 1.2 or later.

    With ``client_ca``, clients must present a certificate signed by it (mutual TLS).

    Raises:
        ssl.SSLError: the material does not load (a key that does not match, say).
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["h2", "http/1.1"])
    # load_cert_chain reads files only: the key goes to a private file, removed at once.
    with tempfile.TemporaryDirectory(prefix="chronicle-devfront-") as directory:
        cert_path = os.path.join(directory, "cert.pem")
        key_path = os.path.join(directory, "key.pem")
        for path, data in ((cert_path, certificate_chain), (key_path, private_key)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
        context.load_cert_chain(cert_path, key_path)
    if client_ca is not None:
        context.load_verify_locations(cadata=client_ca.decode("ascii", "replace"))
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class Front:
    """The public listener: classifies connections, splices gRPC, serves HTTP/1.1.

    Args:
        sockets: listening sockets from :func:`bind_listeners`; the front owns them.
        backend: ``(host, port)`` of the plaintext grpc server.
        ssl_context: terminate TLS with it (see :func:`server_ssl_context`), or None.
        handler: answers each HTTP/1.1 request.
        logger: a structlog logger.

    :meth:`start`, :meth:`close_listeners` and :meth:`close` block (bounded) and are
    thread-safe; everything else happens on the front's thread.
    """

    def __init__(
        self,
        sockets: list[socket.socket],
        *,
        backend: tuple[str, int],
        ssl_context: ssl.SSLContext | None,
        handler: HttpHandler,
        logger: Any,
    ) -> None:
        if not sockets:
            raise ValueError("Front needs at least one listening socket")
        self._sockets = sockets
        self._backend = backend
        self._ssl = ssl_context
        self._handler = handler
        self._log = QuietLog(logger)  # a broken log sink must not break the event loop
        self.port: int = sockets[0].getsockname()[1]
        self._lock = threading.Lock()
        # Guarded by _lock: the loop and its thread, once started; closed once closing.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        # Touched on the loop's thread only. Every accepted socket is owned either by an
        # adopting task (TLS handshake, connection_made pending) or by a connection.
        self._listening: list[socket.socket] = []
        self._adopting: set[asyncio.Task[None]] = set()
        self._connections: set[_Connection] = set()
        self._all_gone: asyncio.Event | None = None

    # -- lifecycle (any thread) ---------------------------------------------------------

    def start(self) -> None:
        """Start the event loop's thread and accept connections. Blocks briefly.

        Raises:
            RuntimeError: started twice, or after :meth:`close`.
            OSError: the loop could not take over the sockets (the front is closed).
        """
        loop = asyncio.new_event_loop()
        loop.set_exception_handler(self._on_loop_error)
        thread = threading.Thread(
            target=self._run, args=(loop,), name=f"chronicle-devfront[{self.port}]", daemon=True
        )
        with self._lock:
            if self._loop is not None or self._closed:
                loop.close()
                raise RuntimeError("a Front can be started only once")
            self._loop, self._thread = loop, thread
        thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._serve(), loop).result(_START_TIMEOUT)
        except BaseException:
            self.close()
            raise

    def close_listeners(self) -> None:
        """Stop accepting: the listening sockets close; open connections carry on."""
        with self._lock:
            loop = self._loop
        if loop is None:
            self._close_unstarted_sockets()
            return
        self._run_in_loop(loop, self._close_listeners())

    def close(self) -> None:
        """Close the listeners and every connection, stop the thread. Idempotent.

        Connections get a short grace to flush what they hold (a GOAWAY, a last
        status), then are reset. Returns within a few seconds whatever the peers do.
        """
        with self._lock:
            loop, thread = self._loop, self._thread
            first = not self._closed
            self._closed = True
        if loop is None:
            self._close_unstarted_sockets()
            return
        if first:
            self._run_in_loop(loop, self._shutdown(), timeout=_CLOSE_GRACE + 2.0)
            with contextlib.suppress(RuntimeError):  # the loop is closed already
                loop.call_soon_threadsafe(loop.stop)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5.0)

    def _close_unstarted_sockets(self) -> None:
        for sock in self._sockets:
            sock.close()

    @staticmethod
    def _run_in_loop(loop: asyncio.AbstractEventLoop, coroutine: Any, timeout: float = 5.0) -> None:
        try:
            future = asyncio.run_coroutine_threadsafe(coroutine, loop)
        except RuntimeError:  # the loop is closed
            coroutine.close()
            return
        with contextlib.suppress(
            concurrent.futures.TimeoutError, concurrent.futures.CancelledError
        ):
            future.result(timeout)

    # -- the loop's thread ----------------------------------------------------------------

    def _run(self, loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            self._stop_listening(loop)
            # Cancelled tasks close their sockets (handshaking ones, pending backends).
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            if tasks:
                loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            for connection in list(self._connections):
                connection.abort()
            loop.run_until_complete(asyncio.sleep(0))  # let the aborts run
            loop.close()

    def _stop_listening(self, loop: asyncio.AbstractEventLoop) -> None:
        for sock in self._listening:
            loop.remove_reader(sock.fileno())
            sock.close()
        self._listening.clear()

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        # A reader callback rather than a task in sock_accept(): cancelling that task
        # after its accept() succeeded would drop the accepted socket on the floor.
        for sock in self._sockets:
            sock.setblocking(False)
            loop.add_reader(sock.fileno(), self._accept_ready, sock)
            self._listening.append(sock)

    def _accept_ready(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(_ACCEPT_BATCH):
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of file descriptors, say: pause, then go on
                self._log.warning("front_accept_failed", error=exc.strerror or str(exc))
                loop.remove_reader(sock.fileno())
                loop.call_later(_ACCEPT_RETRY_DELAY, self._resume_accepting, sock)
                return
            task = loop.create_task(self._adopt(conn))
            self._adopting.add(task)
            task.add_done_callback(functools.partial(self._adopted, conn))

    def _resume_accepting(self, sock: socket.socket) -> None:
        if sock in self._listening:
            asyncio.get_running_loop().add_reader(sock.fileno(), self._accept_ready, sock)

    async def _adopt(self, conn: socket.socket) -> None:
        """Wrap an accepted socket in a transport (after the TLS handshake, if any)."""
        loop = asyncio.get_running_loop()
        extra: dict[str, Any] = {}
        if self._ssl is not None:
            extra = {"ssl": self._ssl, "ssl_handshake_timeout": _HANDSHAKE_TIMEOUT}
        try:
            await loop.connect_accepted_socket(lambda: _Connection(self), conn, **extra)
        except OSError as exc:  # a failed handshake (a refused client certificate), a reset
            self._log.debug("front_handshake_failed", error=type(exc).__name__)

    def _adopted(self, conn: socket.socket, task: asyncio.Task[None]) -> None:
        self._adopting.discard(task)
        # Cancelled (perhaps before it ever ran) or failed: nothing else owns the socket.
        # (Closing it again after its transport did is harmless.)
        if task.cancelled() or task.exception() is not None:
            conn.close()

    async def _close_listeners(self) -> None:
        self._stop_listening(asyncio.get_running_loop())

    async def _shutdown(self) -> None:
        await self._close_listeners()
        adopting = list(self._adopting)
        for task in adopting:
            task.cancel()
        await asyncio.gather(*adopting, return_exceptions=True)
        if self._connections:
            self._all_gone = asyncio.Event()
            for connection in list(self._connections):
                connection.close()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._all_gone.wait(), _CLOSE_GRACE)
        for connection in list(self._connections):
            connection.abort()
        await asyncio.sleep(0)  # the aborts' connection_lost callbacks run now

    def _forget(self, connection: _Connection) -> None:
        self._connections.discard(connection)
        if not self._connections and self._all_gone is not None:
            self._all_gone.set()

    def _on_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        # Resets, refused handshakes and timeouts are the peers' business.
        level = "debug" if isinstance(exc, OSError) else "warning"
        getattr(self._log, level)(
            "front_error",
            message=context.get("message"),
            error=type(exc).__name__ if exc is not None else None,
        )

    def _handle(self, request: HttpRequest) -> HttpResponse:
        try:
            return self._handler(request)
        except Exception as exc:
            self._log.warning("http_handler_failed", path=request.path, error=type(exc).__name__)
            return HttpResponse(500, b'{"error":"server_error"}')


class _Connection(asyncio.Protocol):
    """One accepted connection: sniffing, then a gRPC splice or HTTP/1.1 service."""

    def __init__(self, front: Front) -> None:
        self._front = front
        self._transport: asyncio.Transport | None = None
        self._mode = "new"  # new, sniff, grpc, http, done (nothing more is read), closed
        self._buffer = bytearray()
        self._tls = False
        self._peer = ""
        self._timer: asyncio.TimerHandle | None = None
        # gRPC: the backend connection, once connected.
        self._backend: asyncio.Transport | None = None
        self._eof_pending = False  # the client's end of stream came before the backend
        # HTTP/1.1: whether "100 Continue" was sent for the request being read.
        self._continued = False

    # -- from the client ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._front._connections.add(self)
        peer = transport.get_extra_info("peername")
        self._peer = _format_peer(peer)
        ssl_object = transport.get_extra_info("ssl_object")
        self._mode = "sniff"
        if ssl_object is not None:
            self._tls = True
            protocol = ssl_object.selected_alpn_protocol()
            if protocol == "h2":
                self._to_grpc(b"")
                return
            if protocol is not None:  # http/1.1
                self._to_http(b"")
                return
        self._arm_timer(_FIRST_BYTES_TIMEOUT)

    def data_received(self, data: bytes) -> None:
        mode = self._mode
        if mode == "grpc":
            if self._backend is not None:
                self._backend.write(data)
            else:
                self._buffer += data
        elif mode == "http":
            self._buffer += data
            self._serve_http()
        elif mode == "sniff":
            self._buffer += data
            head = bytes(self._buffer[: len(H2_PREFACE)])
            if len(head) == len(H2_PREFACE) or not H2_PREFACE.startswith(head):
                first = bytes(self._buffer)
                self._buffer.clear()
                if first.startswith(H2_PREFACE):
                    self._to_grpc(first)
                else:
                    self._to_http(first)

    def eof_received(self) -> bool | None:
        if self._mode != "grpc":
            return False  # close
        if self._backend is None:
            self._eof_pending = True
        elif self._backend.can_write_eof():
            self._backend.write_eof()
        # Plaintext: keep receiving what the backend still has to say. (asyncio's TLS
        # transport cannot half-close; it closes, and the backend with it.)
        return not self._tls

    def connection_lost(self, exc: Exception | None) -> None:
        self._mode = "closed"
        self._cancel_timer()
        self._front._forget(self)
        if self._backend is not None:
            self._backend.close()  # flushes what the client sent, then closes

    def pause_writing(self) -> None:
        if self._backend is not None:
            self._backend.pause_reading()

    def resume_writing(self) -> None:
        if self._backend is not None:
            self._backend.resume_reading()

    # -- closing (from the front) -------------------------------------------------------

    def close(self) -> None:
        """Flush and close both sides."""
        if self._transport is not None:
            self._transport.close()
        if self._backend is not None:
            self._backend.close()

    def abort(self) -> None:
        """Reset both sides now."""
        if self._transport is not None:
            self._transport.abort()
        if self._backend is not None:
            self._backend.abort()

    # -- gRPC -------------------------------------------------------------------------------

    def _to_grpc(self, first: bytes) -> None:
        assert self._transport is not None
        self._mode = "grpc"
        self._cancel_timer()
        self._buffer = bytearray(first)
        self._transport.pause_reading()  # until the backend is connected
        self._front._log.debug("front_connection", peer=self._peer, protocol="grpc", tls=self._tls)
        asyncio.get_running_loop().create_task(self._connect_backend())

    async def _connect_backend(self) -> None:
        loop = asyncio.get_running_loop()
        host, port = self._front._backend
        try:
            backend, _ = await loop.create_connection(lambda: _Backend(self), host, port)
        except OSError as exc:
            self._front._log.warning("front_backend_unreachable", error=exc.strerror or str(exc))
            if self._transport is not None:
                self._transport.abort()
            return
        assert isinstance(backend, asyncio.Transport)
        if self._mode == "closed":  # the client went away meanwhile
            backend.close()
            return
        self._backend = backend
        if self._buffer:
            backend.write(bytes(self._buffer))
            self._buffer.clear()
        if self._eof_pending:
            if backend.can_write_eof():
                backend.write_eof()
        elif self._transport is not None:
            self._transport.resume_reading()

    def _from_backend(self, data: bytes) -> None:
        if self._transport is not None and self._mode != "closed":
            self._transport.write(data)

    def _backend_eof(self) -> bool:
        transport = self._transport
        if transport is None or self._mode == "closed":
            return False
        if transport.can_write_eof():
            transport.write_eof()
            return True  # the client may still be sending
        transport.close()
        return False

    def _backend_lost(self) -> None:
        if self._transport is not None and self._mode != "closed":
            self._transport.close()  # flushes what the backend sent, then closes

    def _pause_client(self) -> None:
        if self._transport is not None and self._mode != "closed":
            self._transport.pause_reading()

    def _resume_client(self) -> None:
        if self._transport is not None and self._mode != "closed":
            self._transport.resume_reading()

    # -- HTTP/1.1 --------------------------------------------------------------------------

    def _to_http(self, first: bytes) -> None:
        self._mode = "http"
        self._front._log.debug("front_connection", peer=self._peer, protocol="http", tls=self._tls)
        self._arm_timer(_HTTP_IDLE_TIMEOUT)
        self._buffer = bytearray(first)
        self._serve_http()

    def _serve_http(self) -> None:
        """Answer every complete request in the buffer, in order."""
        buffer = self._buffer
        while self._mode == "http":
            while buffer[:2] == b"\r\n":  # RFC 9112 section 2.2: empty lines before one
                del buffer[:2]
            end = buffer.find(b"\r\n\r\n")
            if end < 0 or end > _MAX_HEAD:
                if len(buffer) > _MAX_HEAD:
                    self._http_error(431, "the request head is too large")
                return
            try:
                method, target, version, headers = _parse_head(bytes(buffer[:end]))
                length = _content_length(headers)
            except _BadRequest as exc:
                self._http_error(exc.status, exc.message)
                return
            total = end + 4 + length
            if len(buffer) < total:
                if headers.get("expect", "").lower() == "100-continue" and not self._continued:
                    self._continued = True
                    self._write(b"HTTP/1.1 100 Continue\r\n\r\n")
                return
            body = bytes(buffer[end + 4 : total])
            del buffer[:total]
            self._continued = False
            path = target.split("?", 1)[0]
            request = HttpRequest(method, target, path, headers, body, self._peer, self._tls)
            response = self._front._handle(request)
            tokens = {token.strip().lower() for token in headers.get("connection", "").split(",")}
            keep_alive = version == "HTTP/1.1" and "close" not in tokens
            self._respond(response, keep_alive=keep_alive, head=method == "HEAD")
            if keep_alive:
                self._arm_timer(_HTTP_IDLE_TIMEOUT)

    def _http_error(self, status: int, message: str) -> None:
        body = json.dumps({"error": "invalid_request", "error_description": message}).encode()
        self._respond(HttpResponse(status, body), keep_alive=False, head=False)

    def _respond(self, response: HttpResponse, *, keep_alive: bool, head: bool) -> None:
        try:
            reason = http.HTTPStatus(response.status).phrase
        except ValueError:
            reason = ""
        lines = [
            f"HTTP/1.1 {response.status} {reason}",
            f"Date: {email.utils.formatdate(usegmt=True)}",
            "Server: chronicle-conn-devserver",
            f"Content-Type: {response.content_type}",
            f"Content-Length: {len(response.body)}",
        ]
        lines += [f"{name}: {value}" for name, value in response.headers]
        if not keep_alive:
            lines.append("Connection: close")
        data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self._write(data if head else data + response.body)
        if not keep_alive and self._transport is not None:
            self._mode = "done"
            self._cancel_timer()
            self._transport.close()

    def _write(self, data: bytes) -> None:
        if self._transport is not None and self._mode != "closed":
            self._transport.write(data)

    # -- timers ----------------------------------------------------------------------------

    def _arm_timer(self, seconds: float) -> None:
        self._cancel_timer()
        self._timer = asyncio.get_running_loop().call_later(seconds, self._on_timeout)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timeout(self) -> None:
        self._timer = None
        if self._mode in ("sniff", "http") and self._transport is not None:
            self._mode = "done"
            self._transport.close()


class _Backend(asyncio.Protocol):
    """The connection to the grpc server, for one spliced client connection."""

    def __init__(self, connection: _Connection) -> None:
        self._connection = connection

    def data_received(self, data: bytes) -> None:
        self._connection._from_backend(data)

    def eof_received(self) -> bool | None:
        return self._connection._backend_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        self._connection._backend_lost()

    def pause_writing(self) -> None:
        self._connection._pause_client()

    def resume_writing(self) -> None:
        self._connection._resume_client()


def _parse_head(head: bytes) -> tuple[str, str, str, dict[str, str]]:
    """Parse the request line and headers (without the blank line).

    Raises:
        _BadRequest: a malformed request line or header, or an unsupported version.
    """
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[0].isalpha() or not parts[1]:
        raise _BadRequest(400, "malformed request line")
    method, target, version = parts
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise _BadRequest(505, "only HTTP/1.1 and HTTP/1.0 are served here")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip() or line[0] in " \t":
            raise _BadRequest(400, "malformed header line")
        key = name.lower()
        value = value.strip(" \t")
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return method, target, version, headers


def _content_length(headers: Mapping[str, str]) -> int:
    if "transfer-encoding" in headers:
        raise _BadRequest(501, "send the body with Content-Length, not Transfer-Encoding")
    text = headers.get("content-length")
    if text is None:
        return 0
    values = {value.strip() for value in text.split(",")}
    if len(values) != 1:
        raise _BadRequest(400, "conflicting Content-Length headers")
    (value,) = values
    if not value.isdigit() or not value.isascii():
        raise _BadRequest(400, "Content-Length is not a number")
    if int(value) > _MAX_BODY:
        raise _BadRequest(413, f"the body is larger than {_MAX_BODY} bytes")
    return int(value)


def _format_peer(peer: Any) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = str(peer[0])
        return f"[{host}]:{peer[1]}" if ":" in host else f"{host}:{peer[1]}"
    return str(peer)
