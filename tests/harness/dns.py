"""A small authoritative DNS server for tests, on a loopback address.

It answers UDP and TCP on the same random port, from records that tests change at run
time (``set_srv``, ``set_a``, ``set_aaaa``, ``remove``; ``set_rcode`` makes it fail every
query with an error such as SERVFAIL): NXDOMAIN for a name it has no
record of, an empty answer for a known name without records of the type asked. A UDP
answer too large for the client (512 bytes, or its EDNS payload size) goes out
truncated (TC), so that the client asks again over TCP. With ``additional`` on, an
SRV answer carries the A and AAAA records of its targets in the additional section.
In silent mode it receives (and counts) queries and never answers: a name server that
is down or cut off. Every query is counted per (name, type); tests wait on the counts
(:meth:`DnsServer.wait_for_queries`) rather than sleep.

One daemon thread runs a ``selectors`` loop that owns every socket.
"""

from __future__ import annotations

import collections
import contextlib
import selectors
import socket
import threading
from collections.abc import Iterable
from types import TracebackType

import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset

from .ports import check_loopback, family_of

__all__ = ["DnsServer"]

_STOP_TIMEOUT = 5.0
_BIND_ATTEMPTS = 20
_SELECT_INTERVAL = 0.5
_SEND_TIMEOUT = 1.0
_UDP_DEFAULT_SIZE = 512
_MAX_MESSAGE = 65535


def _key(name: str) -> str:
    """A name as the store keys it: lower case, no final dot."""
    return name.rstrip(".").lower()


def _absolute(name: str) -> str:
    return name if name.endswith(".") else name + "."


class DnsServer:
    """An authoritative DNS server on ``host`` (``127.0.0.1`` or ``::1``), UDP and TCP.

    Use as a context manager, or call :meth:`start` and :meth:`stop`.
    """

    def __init__(self, host: str = "127.0.0.1", *, additional: bool = False, ttl: int = 30):
        self.host = check_loopback(host)
        self.ttl = ttl
        self._lock = threading.Condition()
        self._records: dict[str, dict[str, list[str]]] = {}
        self._additional = additional
        self._silent = False
        self._silent_names: set[str] = set()
        self._rcode: str | None = None
        self._counts: collections.Counter[tuple[str, str]] = collections.Counter()
        self._tcp_queries = 0
        self._udp: socket.socket | None = None
        self._listener: socket.socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.port = 0

    # -- life cycle --------------------------------------------------------------------

    @property
    def address(self) -> str:
        """``host:port`` (``[::1]:port`` for IPv6), as ``srvNameServer`` takes it."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def start(self) -> DnsServer:
        """Bind UDP and TCP on one free port and start answering.

        Raises:
            OSError: the address cannot be bound (e.g. no IPv6 loopback).
        """
        if self._thread is not None:
            raise RuntimeError("DnsServer already started")
        family = family_of(self.host)
        last_error: OSError | None = None
        for _ in range(_BIND_ATTEMPTS):
            udp = socket.socket(family, socket.SOCK_DGRAM)
            try:
                udp.bind((self.host, 0))
                port = udp.getsockname()[1]
                listener = socket.socket(family, socket.SOCK_STREAM)
                try:
                    listener.bind((self.host, port))
                    listener.listen(16)
                except OSError as exc:
                    listener.close()
                    raise exc
            except OSError as exc:
                udp.close()
                last_error = exc
                continue
            break
        else:
            assert last_error is not None
            raise last_error
        udp.setblocking(False)
        listener.setblocking(False)
        self._udp, self._listener, self.port = udp, listener, port
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._thread = threading.Thread(
            target=self._run, name=f"dns-server[{self.address}]", daemon=True
        )
        self._thread.start()
        return self

    def stop(self, timeout: float = _STOP_TIMEOUT) -> None:
        """Stop answering and close the sockets; joins the thread for at most ``timeout``.

        Raises:
            RuntimeError: the thread did not end in time.
        """
        thread = self._thread
        if thread is None or self._stopping.is_set():
            return
        self._stopping.set()
        if self._wake_w is not None:
            with contextlib.suppress(OSError):
                self._wake_w.send(b"x")
        thread.join(timeout)
        if thread.is_alive():
            raise RuntimeError(f"DNS server thread {thread.name} did not stop in {timeout}s")

    def __enter__(self) -> DnsServer:
        """Start the server unless it already is."""
        return self if self._thread is not None else self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- records -----------------------------------------------------------------------

    def set_srv(self, name: str, records: Iterable[tuple[int, int, int, str]]) -> None:
        """Replace ``name``'s SRV records with ``(priority, weight, port, target)`` tuples;
        target ``"."`` declares the service not available. An empty list keeps the name
        with no SRV record (an empty answer, not NXDOMAIN)."""
        texts = [
            f"{priority} {weight} {port} {'.' if target in ('.', '') else _absolute(target)}"
            for priority, weight, port, target in records
        ]
        self._set(name, "SRV", texts)

    def set_a(self, name: str, addresses: Iterable[str]) -> None:
        """Replace ``name``'s A records."""
        self._set(name, "A", list(addresses))

    def set_aaaa(self, name: str, addresses: Iterable[str]) -> None:
        """Replace ``name``'s AAAA records."""
        self._set(name, "AAAA", list(addresses))

    def remove(self, name: str) -> None:
        """Forget every record of ``name``: it gets NXDOMAIN from now on."""
        with self._lock:
            self._records.pop(_key(name), None)

    def set_additional(self, enabled: bool) -> None:
        """Whether SRV answers carry their targets' A and AAAA records as additional data."""
        with self._lock:
            self._additional = enabled

    def set_silent(self, silent: bool, *, names: Iterable[str] | None = None) -> None:
        """In silent mode queries are received and counted but never answered.

        ``names``: only queries for these names go unanswered (``silent=False`` answers
        them again); None switches the whole server.
        """
        with self._lock:
            if names is None:
                self._silent = silent
                self._silent_names.clear()
            elif silent:
                self._silent_names.update(_key(name) for name in names)
            else:
                self._silent_names.difference_update(_key(name) for name in names)

    def set_rcode(self, rcode: str | None) -> None:
        """Answer every query with this error rcode (e.g. ``"SERVFAIL"``, ``"REFUSED"``)
        and no records; None goes back to answering from the records."""
        if rcode is not None:
            dns.rcode.from_text(rcode)  # fail here on a typo
        with self._lock:
            self._rcode = rcode

    def _set(self, name: str, rdtype: str, texts: list[str]) -> None:
        # Built once now, so that a malformed record fails the test here, not in the loop.
        if texts:
            dns.rrset.from_text(_absolute(name), self.ttl, "IN", rdtype, *texts)
        with self._lock:
            self._records.setdefault(_key(name), {})[rdtype] = texts

    # -- counters ----------------------------------------------------------------------

    def query_count(self, name: str, rdtype: str) -> int:
        """How many queries for (``name``, ``rdtype``) arrived, over UDP and TCP."""
        with self._lock:
            return self._counts[(_key(name), rdtype.upper())]

    def counts(self) -> dict[tuple[str, str], int]:
        """A snapshot of every (name, type) count."""
        with self._lock:
            return dict(self._counts)

    @property
    def tcp_query_count(self) -> int:
        """How many queries arrived over TCP."""
        with self._lock:
            return self._tcp_queries

    def reset_counts(self) -> None:
        with self._lock:
            self._counts.clear()
            self._tcp_queries = 0

    def wait_for_queries(
        self, name: str, rdtype: str, count: int = 1, timeout: float = 5.0
    ) -> bool:
        """Wait until at least ``count`` queries for (``name``, ``rdtype``) arrived;
        returns whether they did within ``timeout``."""
        key = (_key(name), rdtype.upper())
        with self._lock:
            return self._lock.wait_for(lambda: self._counts[key] >= count, timeout)

    # -- the loop ----------------------------------------------------------------------

    def _run(self) -> None:
        assert self._udp is not None
        assert self._listener is not None
        assert self._wake_r is not None
        selector = selectors.DefaultSelector()
        buffers: dict[socket.socket, bytearray] = {}
        selector.register(self._udp, selectors.EVENT_READ, "udp")
        selector.register(self._listener, selectors.EVENT_READ, "accept")
        selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        try:
            while not self._stopping.is_set():
                for key, _ in selector.select(_SELECT_INTERVAL):
                    if key.data == "udp":
                        self._on_udp()
                    elif key.data == "accept":
                        self._on_accept(selector, buffers)
                    elif key.data == "tcp":
                        self._on_tcp(key.fileobj, selector, buffers)  # type: ignore[arg-type]
        finally:
            for conn in list(buffers):
                self._close(conn, selector, buffers)
            selector.close()
            for sock in (self._udp, self._listener, self._wake_r, self._wake_w):
                if sock is not None:
                    sock.close()

    def _on_udp(self) -> None:
        assert self._udp is not None
        try:
            wire, peer = self._udp.recvfrom(_MAX_MESSAGE)
        except OSError:  # BlockingIOError, or an ICMP error reported late
            return
        reply = self._reply(wire, tcp=False)
        if reply is not None:
            with contextlib.suppress(OSError):
                self._udp.sendto(reply, peer)

    def _on_accept(
        self, selector: selectors.BaseSelector, buffers: dict[socket.socket, bytearray]
    ) -> None:
        assert self._listener is not None
        try:
            conn, _ = self._listener.accept()
        except OSError:
            return
        conn.settimeout(_SEND_TIMEOUT)  # recv after select does not wait; sendall is bounded
        buffers[conn] = bytearray()
        selector.register(conn, selectors.EVENT_READ, "tcp")

    def _on_tcp(
        self,
        conn: socket.socket,
        selector: selectors.BaseSelector,
        buffers: dict[socket.socket, bytearray],
    ) -> None:
        try:
            data = conn.recv(_MAX_MESSAGE)
        except OSError:
            data = b""
        if not data:
            self._close(conn, selector, buffers)
            return
        buffer = buffers[conn]
        buffer += data
        # Each message is prefixed by its 2-byte length; the loop consumes the buffer.
        while len(buffer) >= 2:
            size = int.from_bytes(buffer[:2], "big")
            if len(buffer) < 2 + size:
                break
            wire = bytes(buffer[2 : 2 + size])
            del buffer[: 2 + size]
            reply = self._reply(wire, tcp=True)
            if reply is None:
                continue
            try:
                conn.sendall(len(reply).to_bytes(2, "big") + reply)
            except OSError:
                self._close(conn, selector, buffers)
                return

    @staticmethod
    def _close(
        conn: socket.socket,
        selector: selectors.BaseSelector,
        buffers: dict[socket.socket, bytearray],
    ) -> None:
        buffers.pop(conn, None)
        with contextlib.suppress(KeyError, ValueError):
            selector.unregister(conn)
        conn.close()

    def _reply(self, wire: bytes, *, tcp: bool) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        if not query.question:
            return None
        question = query.question[0]
        name = _key(question.name.to_text())
        rdtype = dns.rdatatype.to_text(question.rdtype)
        with self._lock:
            self._counts[(name, rdtype)] += 1
            if tcp:
                self._tcp_queries += 1
            self._lock.notify_all()
            if self._silent or name in self._silent_names:
                return None
            records = {n: dict(types) for n, types in self._records.items()}
            additional = self._additional
            rcode = self._rcode
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if rcode is not None:
            response.set_rcode(dns.rcode.from_text(rcode))
        elif name not in records:
            response.set_rcode(dns.rcode.NXDOMAIN)
        else:
            texts = records[name].get(rdtype)
            if texts:
                response.answer.append(self._rrset(name, rdtype, texts))
            if texts and rdtype == "SRV" and additional:
                for target in dict.fromkeys(_key(text.split()[3]) for text in texts):
                    for address_type in ("A", "AAAA"):
                        addresses = records.get(target, {}).get(address_type)
                        if addresses:
                            response.additional.append(self._rrset(target, address_type, addresses))
        if tcp:
            limit = _MAX_MESSAGE
        else:
            limit = max(query.payload, _UDP_DEFAULT_SIZE) if query.edns >= 0 else _UDP_DEFAULT_SIZE
        try:
            return response.to_wire(max_size=limit)
        except dns.exception.TooBig:
            truncated = dns.message.make_response(query)
            truncated.flags |= dns.flags.AA | dns.flags.TC
            return truncated.to_wire()

    def _rrset(self, name: str, rdtype: str, texts: list[str]) -> dns.rrset.RRset:
        return dns.rrset.from_text(_absolute(name), self.ttl, "IN", rdtype, *texts)
