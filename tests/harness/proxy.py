"""A TCP proxy for tests that can refuse, reset or silently swallow traffic on demand.

One daemon thread runs a ``selectors`` loop that owns every socket. Mode switches made
from other threads are handed to that loop and applied before the call returns, so a test
can rely on them: after ``refuse()`` returns nothing listens; after ``reset()`` returns the
RSTs are on the wire; after ``swallow()`` returns not one more byte is forwarded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import errno
import itertools
import selectors
import socket
import struct
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from .ports import check_loopback, family_of

__all__ = ["FaultProxy", "ProxyMode", "ProxyStats"]

_RECV_SIZE = 65536
_CALL_TIMEOUT = 5.0
_LINGER_RESET = struct.pack("ii", 1, 0)
_CLIENT = "client"
_UPSTREAM = "upstream"


class ProxyMode(enum.Enum):
    PASS_THROUGH = "pass_through"
    REFUSE = "refuse"
    SWALLOW = "swallow"


@dataclasses.dataclass(frozen=True)
class ProxyStats:
    """A snapshot of a proxy's counters."""

    mode: ProxyMode
    accepted: int
    active_connections: int
    bytes_up: int  # delivered to the upstream
    bytes_down: int  # delivered to clients
    bytes_swallowed: int  # read and thrown away while swallowing
    resets: int  # connections the proxy ended with RST, for any reason
    upstream_failures: int  # connections dropped because the upstream refused them


class _Pair:
    """One proxied connection: a client socket and its upstream socket."""

    def __init__(self, ident: int, client: socket.socket) -> None:
        self.ident = ident
        self.client = client
        self.upstream: socket.socket | None = None
        self.connecting = False  # non-blocking connect to the upstream in progress
        self.pending = {_CLIENT: bytearray(), _UPSTREAM: bytearray()}  # bytes owed to a side
        self.eof = {_CLIENT: False, _UPSTREAM: False}  # that side sent FIN
        self.shut = {_CLIENT: False, _UPSTREAM: False}  # we sent FIN to that side
        self.lost = False  # bytes or a FIN were dropped: the stream cannot resume

    def sock(self, side: str) -> socket.socket | None:
        return self.client if side == _CLIENT else self.upstream

    def sockets(self) -> list[socket.socket]:
        return [s for s in (self.client, self.upstream) if s is not None]


def _other(side: str) -> str:
    return _UPSTREAM if side == _CLIENT else _CLIENT


class FaultProxy:
    """A threaded TCP proxy on loopback whose behaviour tests switch at run time.

    Modes:
      * ``pass_through()``: forward bytes both ways, mirroring FIN and RST.
      * ``refuse()``: close the listening socket, so new connects are refused (RST);
        connections already open keep flowing. ``pass_through()`` (or ``swallow()``)
        listens again on the same port.
      * ``swallow(discard=True)``: a silent partition. Every socket stays open and new
        connections are accepted, but nothing is sent anywhere: no data, no FIN, no RST.
        With ``discard=True`` incoming bytes are read and thrown away; with
        ``discard=False`` nothing is read either (the kernel buffers fill up, as they
        would behind a real partition), so the streams can resume afterwards.
      * ``reset()``: a one-off action, not a mode: every live connection is closed with
        SO_LINGER 0 so both peers see ECONNRESET; new connections are still accepted
        (unless refusing).

    Leaving ``swallow`` for ``pass_through``: a connection that lost bytes (or a FIN) to
    the partition cannot carry a valid stream any more, so it is reset, as a peer that
    lost state would; a connection that lost nothing resumes.

    If the upstream refuses a connection, the client's connection is reset.

    Every public method is thread-safe. Mode switches block until the proxy thread has
    applied them (bounded: ``RuntimeError`` after 5 s). Use it as a context manager, or
    call ``start()`` and ``close()``.

    Args:
        upstream_host: ``127.0.0.1`` or ``::1``.
        upstream_port: the port to forward to.
        listen_host: ``127.0.0.1`` or ``::1``.
        listen_port: 0 (the default) lets the OS choose.
        max_connections: connections beyond this many are reset on accept.
        buffer_limit: per direction and connection; the proxy stops reading from a side
            whose peer is this far behind.
    """

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        listen_host: str = "127.0.0.1",
        *,
        listen_port: int = 0,
        max_connections: int = 256,
        buffer_limit: int = 1 << 20,
    ) -> None:
        self.upstream_host = check_loopback(upstream_host)
        self.upstream_port = int(upstream_port)
        self.listen_host = check_loopback(listen_host)
        if not 0 < self.upstream_port < 65536:
            raise ValueError(f"upstream_port out of range: {upstream_port!r}")
        if max_connections < 1 or buffer_limit < 1:
            raise ValueError("max_connections and buffer_limit must be positive")
        self._max_connections = max_connections
        self._buffer_limit = buffer_limit
        self._port = listen_port
        self._ids = itertools.count(1)

        self._cond = threading.Condition()
        # guarded by _cond (written by the proxy thread, or by any thread before start()):
        self._mode = ProxyMode.PASS_THROUGH
        self._discard = True
        self._counts = dict.fromkeys(
            (
                "accepted",
                "bytes_up",
                "bytes_down",
                "bytes_swallowed",
                "resets",
                "upstream_failures",
            ),
            0,
        )
        self._active = 0
        self._calls: deque[_Call] = deque()
        self._started = False
        self._closed = False
        self._crash: BaseException | None = None

        # owned by the proxy thread once started:
        self._selector: selectors.BaseSelector | None = None
        self._listener: socket.socket | None = None
        self._pairs: dict[int, _Pair] = {}
        self._interest: dict[socket.socket, int] = {}
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = False

    # -- public API ---------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The listening port (known after ``start()``; it survives ``refuse()``)."""
        return self._port

    @property
    def address(self) -> str:
        """``host:port`` for ``grpc.insecure_channel`` (IPv6 hosts in brackets)."""
        host = f"[{self.listen_host}]" if ":" in self.listen_host else self.listen_host
        return f"{host}:{self._port}"

    @property
    def mode(self) -> ProxyMode:
        with self._cond:
            return self._mode

    def start(self) -> FaultProxy:
        """Bind, listen and start the proxy thread. Returns ``self``. Not re-startable."""
        with self._cond:
            if self._started:
                raise RuntimeError("FaultProxy.start() called twice")
            self._started = True
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._listen()  # even when refusing from the start: that fixes the port to reuse
        if self._mode is ProxyMode.REFUSE:
            self._unlisten()
        self._thread = threading.Thread(
            target=self._run,
            name=f"FaultProxy[{self.address}->{self.upstream_host}:{self.upstream_port}]",
            daemon=True,
        )
        self._thread.start()
        return self

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread and close every socket (peers see FIN). Idempotent. Blocks.

        Raises:
            RuntimeError: the proxy thread crashed (the cause is chained) or did not stop.
        """
        with self._cond:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
            crash = self._crash
        if thread is not None and crash is None:
            self._wake()
            thread.join(timeout)
            if thread.is_alive():
                raise RuntimeError(f"{thread.name} did not stop within {timeout}s")
        for sock in (self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        if self._selector is not None:
            self._selector.close()
        if crash is not None:
            raise RuntimeError(f"FaultProxy {self.address} crashed") from crash

    def pass_through(self) -> None:
        """Forward both ways; listen again if refusing; heal a partition (see class doc)."""
        self._submit(self._do_pass_through)

    def refuse(self) -> None:
        """Stop listening: new connects are refused. Open connections are left alone."""
        self._submit(self._do_refuse)

    def swallow(self, *, discard: bool = True) -> None:
        """Partition silently: accept, keep everything open, deliver nothing."""
        self._submit(lambda: self._do_swallow(discard))

    def reset(self) -> int:
        """Reset every live connection (RST to both peers). Returns how many there were."""
        result: int = self._submit(self._do_reset_all)
        return result

    def stats(self) -> ProxyStats:
        with self._cond:
            return self._snapshot()

    def wait_for(self, predicate: Callable[[ProxyStats], bool], timeout: float) -> bool:
        """Block until ``predicate(stats)`` holds, at most ``timeout`` s; ``False`` if not.

        The predicate is evaluated whenever a counter changes, under the proxy's lock.
        """
        with self._cond:
            return bool(self._cond.wait_for(lambda: predicate(self._snapshot()), timeout))

    @property
    def accepted(self) -> int:
        return self.stats().accepted

    @property
    def active_connections(self) -> int:
        return self.stats().active_connections

    @property
    def bytes_up(self) -> int:
        return self.stats().bytes_up

    @property
    def bytes_down(self) -> int:
        return self.stats().bytes_down

    @property
    def bytes_swallowed(self) -> int:
        return self.stats().bytes_swallowed

    @property
    def resets(self) -> int:
        return self.stats().resets

    def __enter__(self) -> FaultProxy:
        if not self._started:
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"<FaultProxy {self.address} -> {self.upstream_host}:{self.upstream_port} "
            f"{self._mode.value}>"
        )

    # -- calls into the proxy thread ----------------------------------------------------

    def _snapshot(self) -> ProxyStats:
        return ProxyStats(mode=self._mode, active_connections=self._active, **self._counts)

    def _submit(self, fn: Callable[[], Any]) -> Any:
        with self._cond:
            if self._closed:
                raise RuntimeError(f"{self!r} is closed")
            if self._crash is not None:
                raise RuntimeError(f"FaultProxy {self.address} crashed") from self._crash
            if not self._started:
                # nothing to own yet: only the mode matters, applied by start()
                return fn()
            call = _Call(fn)
            self._calls.append(call)
        self._wake()
        if not call.done.wait(_CALL_TIMEOUT):
            raise RuntimeError(f"{self!r} did not apply a mode switch within {_CALL_TIMEOUT}s")
        if call.error is not None:
            raise RuntimeError(f"{self!r}: mode switch failed") from call.error
        return call.result

    def _wake(self) -> None:
        if self._wake_w is not None:
            with contextlib.suppress(OSError):  # already awake (buffer full), or closing
                self._wake_w.send(b"x")

    # -- the proxy thread ---------------------------------------------------------------

    def _run(self) -> None:
        assert self._selector is not None
        try:
            while True:
                with self._cond:
                    if self._closed:
                        break
                for key, mask in self._selector.select():
                    self._dispatch(key, mask)
                self._run_calls()
        except BaseException as exc:  # a harness bug: make close() and mode switches say so
            with self._cond:
                self._crash = exc
                calls = list(self._calls)
                self._calls.clear()
            for call in calls:
                call.error = exc
                call.done.set()
        finally:
            self._teardown()

    def _dispatch(self, key: selectors.SelectorKey, mask: int) -> None:
        if key.fileobj is self._wake_r:
            try:
                while self._wake_r.recv(4096):
                    pass
            except BlockingIOError:
                pass
        elif key.fileobj is self._listener:
            self._accept()
        else:
            pair, side = key.data
            if pair.ident not in self._pairs:
                return  # dropped earlier in this batch
            if mask & selectors.EVENT_WRITE:
                self._on_writable(pair, side)
            if mask & selectors.EVENT_READ and pair.ident in self._pairs:
                self._on_readable(pair, side)
            if pair.ident in self._pairs:
                self._settle(pair)

    def _run_calls(self) -> None:
        while True:
            with self._cond:
                if not self._calls:
                    return
                call = self._calls.popleft()
            try:
                call.result = call.fn()
            except Exception as exc:
                call.error = exc
            call.done.set()

    def _teardown(self) -> None:
        for pair in list(self._pairs.values()):
            self._drop(pair, reset=False)
        self._unlisten()

    # listening

    def _listen(self) -> None:
        assert self._selector is not None
        sock = socket.socket(family_of(self.listen_host), socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.listen_host, self._port))
            sock.listen(128)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._port = sock.getsockname()[1]
        self._listener = sock
        self._selector.register(sock, selectors.EVENT_READ, None)

    def _unlisten(self) -> None:
        if self._listener is not None:
            assert self._selector is not None
            self._selector.unregister(self._listener)
            self._listener.close()
            self._listener = None

    def _accept(self) -> None:
        assert self._listener is not None
        for _ in range(64):  # bounded per wake-up; the selector reports the rest
            try:
                client, _addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            client.setblocking(False)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pair = _Pair(next(self._ids), client)
            self._count(accepted=1)
            if len(self._pairs) >= self._max_connections:
                self._abort(client)
                self._count(resets=1)
                continue
            self._pairs[pair.ident] = pair
            self._set_active()
            if self._mode is not ProxyMode.SWALLOW:
                self._connect_upstream(pair)
            if pair.ident in self._pairs:
                self._settle(pair)

    def _connect_upstream(self, pair: _Pair) -> None:
        sock = socket.socket(family_of(self.upstream_host), socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pair.upstream = sock
        result = sock.connect_ex((self.upstream_host, self.upstream_port))
        if result in (errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN):
            pair.connecting = True
        elif result != 0:
            self._upstream_failed(pair)

    def _upstream_failed(self, pair: _Pair) -> None:
        self._count(upstream_failures=1)
        self._drop(pair, reset=True)

    # I/O

    def _on_writable(self, pair: _Pair, side: str) -> None:
        sock = pair.sock(side)
        assert sock is not None
        if side == _UPSTREAM and pair.connecting:
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0:
                self._upstream_failed(pair)
                return
            pair.connecting = False
        self._flush(pair, side)

    def _flush(self, pair: _Pair, side: str) -> None:
        """Send what is owed to ``side``, as much as its socket takes now."""
        buf = pair.pending[side]
        sock = pair.sock(side)
        if not buf or sock is None or (side == _UPSTREAM and pair.connecting):
            return
        if self._mode is ProxyMode.SWALLOW:
            return
        try:
            sent = sock.send(buf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # the peer is gone (EPIPE, ECONNRESET): make the other side see it
            self._drop(pair, reset=True)
            return
        del buf[:sent]
        self._count(**{"bytes_up" if side == _UPSTREAM else "bytes_down": sent})

    def _on_readable(self, pair: _Pair, side: str) -> None:
        sock = pair.sock(side)
        assert sock is not None
        try:
            data = sock.recv(_RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # reset by that peer
            if self._mode is ProxyMode.SWALLOW:
                pair.lost = True  # the other side must not learn of it now
                pair.eof[side] = True
                return
            self._drop(pair, reset=True)
            return
        swallowing = self._mode is ProxyMode.SWALLOW
        if not data:
            pair.eof[side] = True
            pair.lost = pair.lost or swallowing
            return
        if swallowing:
            pair.lost = True
            self._count(bytes_swallowed=len(data))
            return
        target = _other(side)
        pair.pending[target] += data
        self._flush(pair, target)

    def _settle(self, pair: _Pair) -> None:
        """Forward pending FINs, close a finished pair, and update what the loop waits for."""
        if self._mode is not ProxyMode.SWALLOW:
            for side in (_CLIENT, _UPSTREAM):
                target = _other(side)
                sock = pair.sock(target)
                if (
                    pair.eof[side]
                    and not pair.pending[target]
                    and not pair.shut[target]
                    and sock is not None
                    and not (target == _UPSTREAM and pair.connecting)
                ):
                    with contextlib.suppress(OSError):  # already gone; the read side will tell
                        sock.shutdown(socket.SHUT_WR)
                    pair.shut[target] = True
            if all(pair.eof.values()) and all(pair.shut.values()):
                self._drop(pair, reset=False)
                return
        for side in (_CLIENT, _UPSTREAM):
            sock = pair.sock(side)
            if sock is not None:
                self._set_interest(sock, self._interest_of(pair, side), (pair, side))

    def _interest_of(self, pair: _Pair, side: str) -> int:
        if self._mode is ProxyMode.SWALLOW:
            return selectors.EVENT_READ if self._discard and not pair.eof[side] else 0
        mask = 0
        if not pair.eof[side] and len(pair.pending[_other(side)]) < self._buffer_limit:
            mask |= selectors.EVENT_READ
        if pair.pending[side] or (side == _UPSTREAM and pair.connecting):
            mask |= selectors.EVENT_WRITE
        return mask

    def _set_interest(self, sock: socket.socket, mask: int, data: Any) -> None:
        assert self._selector is not None
        current = self._interest.get(sock, 0)
        if mask == current:
            return
        if current == 0:
            self._selector.register(sock, mask, data)
        elif mask == 0:
            self._selector.unregister(sock)
        else:
            self._selector.modify(sock, mask, data)
        if mask:
            self._interest[sock] = mask
        else:
            self._interest.pop(sock, None)

    def _drop(self, pair: _Pair, *, reset: bool) -> None:
        """Forget ``pair`` and close its sockets, with RST when ``reset``."""
        self._pairs.pop(pair.ident, None)
        for sock in pair.sockets():
            if self._interest.pop(sock, 0):
                assert self._selector is not None
                self._selector.unregister(sock)
            if reset:
                self._abort(sock)
            else:
                sock.close()
        if reset:
            self._count(resets=1)
        self._set_active()

    @staticmethod
    def _abort(sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        sock.close()

    def _count(self, **deltas: int) -> None:
        with self._cond:
            for name, delta in deltas.items():
                self._counts[name] += delta
            self._cond.notify_all()

    def _set_active(self) -> None:
        with self._cond:
            self._active = len(self._pairs)
            self._cond.notify_all()

    # mode switches, run on the proxy thread (or inline before start())

    def _set_mode(self, mode: ProxyMode, discard: bool | None = None) -> ProxyMode:
        with self._cond:
            previous, self._mode = self._mode, mode
            if discard is not None:
                self._discard = discard
            self._cond.notify_all()
        return previous

    def _do_pass_through(self) -> None:
        previous = self._set_mode(ProxyMode.PASS_THROUGH)
        if not self._started:
            return
        if self._listener is None:
            self._listen()
        if previous is ProxyMode.SWALLOW:
            for pair in list(self._pairs.values()):
                if pair.lost:
                    self._drop(pair, reset=True)
                elif pair.upstream is None:
                    self._connect_upstream(pair)
        for pair in list(self._pairs.values()):
            for side in (_CLIENT, _UPSTREAM):
                if pair.ident in self._pairs:
                    self._flush(pair, side)
            if pair.ident in self._pairs:
                self._settle(pair)

    def _do_refuse(self) -> None:
        self._set_mode(ProxyMode.REFUSE)
        if self._started:
            self._unlisten()

    def _do_swallow(self, discard: bool) -> None:
        self._set_mode(ProxyMode.SWALLOW, discard)
        if not self._started:
            return
        if self._listener is None:
            self._listen()
        for pair in list(self._pairs.values()):
            if discard and any(pair.pending.values()):
                pair.lost = True
                for buf in pair.pending.values():
                    buf.clear()
            self._settle(pair)

    def _do_reset_all(self) -> int:
        pairs = list(self._pairs.values())
        for pair in pairs:
            self._drop(pair, reset=True)
        return len(pairs)


class _Call:
    """A function handed to the proxy thread, and its outcome."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None
