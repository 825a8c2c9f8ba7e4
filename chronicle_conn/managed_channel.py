"""``ManagedChannel``: the stable ``grpc.Channel`` a connection hands out.

Stubs are built on it once (at import time, before a fork, before an outage) and stay
valid for the life of the connection: each call goes to the connection's *current*
underlying channel (its "generation"). The inner multicallable is cached per generation,
so the per-call cost is two attribute reads and an identity check.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc

from .errors import (
    ChronicleConnError,
    ConnectionClosedError,
    ConnectTimeoutError,
    NotConnectedError,
    RetriesExhaustedError,
)
from .states import ConnectionState, StateChange

if TYPE_CHECKING:
    from ._supervisor import Generation
    from .connection import Connection

__all__ = ["ManagedChannel", "UnavailableError"]

# grpc's multicallables are generic only in the type stubs.
if TYPE_CHECKING:
    _UnaryUnaryBase = grpc.UnaryUnaryMultiCallable[Any, Any]
    _UnaryStreamBase = grpc.UnaryStreamMultiCallable[Any, Any]
    _StreamUnaryBase = grpc.StreamUnaryMultiCallable[Any, Any]
    _StreamStreamBase = grpc.StreamStreamMultiCallable[Any, Any]
else:
    _UnaryUnaryBase = grpc.UnaryUnaryMultiCallable
    _UnaryStreamBase = grpc.UnaryStreamMultiCallable
    _StreamUnaryBase = grpc.StreamUnaryMultiCallable
    _StreamStreamBase = grpc.StreamStreamMultiCallable

_S = ConnectionState
_CONNECTIVITY = {
    _S.IDLE: grpc.ChannelConnectivity.IDLE,
    _S.CONNECTING: grpc.ChannelConnectivity.CONNECTING,
    _S.CONNECTED: grpc.ChannelConnectivity.READY,
    _S.RECONNECTING: grpc.ChannelConnectivity.CONNECTING,
    _S.FAILED: grpc.ChannelConnectivity.TRANSIENT_FAILURE,
    _S.CLOSED: grpc.ChannelConnectivity.SHUTDOWN,
}


class UnavailableError(grpc.RpcError, grpc.Call, ChronicleConnError):
    """The ``grpc.RpcError`` a call through a ``ManagedChannel`` raises when the
    connection cannot take it: ``UNAVAILABLE`` (not connected, fail-fast; closed; retries
    exhausted) or ``DEADLINE_EXCEEDED`` (a ``wait_for_ready`` call's deadline passed while
    waiting for the connection). It quacks like the error gRPC itself raises, so gRPC
    error handling catches it, and it is a ``ChronicleConnError`` too."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def initial_metadata(self) -> tuple[()]:
        return ()

    def trailing_metadata(self) -> tuple[()]:
        return ()

    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> float:
        return 0.0

    def cancel(self) -> bool:
        return False

    def add_callback(self, callback: Callable[[], None]) -> bool:
        return False

    def __str__(self) -> str:
        return f"<{type(self).__name__} {self._code.name}: {self._details}>"


class _MultiCallable:
    """Dispatches to the current generation's multicallable (cached per generation)."""

    __slots__ = ("_cache", "_conn", "_kind", "_method", "_registered", "_req", "_resp")

    def __init__(
        self,
        conn: Connection,
        kind: str,
        method: str,
        request_serializer: Any,
        response_deserializer: Any,
        registered: bool,
    ) -> None:
        self._conn = conn
        self._kind = kind
        self._method = method
        self._req = request_serializer
        self._resp = response_deserializer
        self._registered = registered
        self._cache: tuple[object, Any] = (None, None)

    def _inner(self, gen: Generation) -> Any:
        cache = self._cache
        if cache[0] is gen:
            return cache[1]
        inner = getattr(gen.channel, self._kind)(
            self._method, self._req, self._resp, _registered_method=self._registered
        )
        # One tuple, replaced whole: a racing thread sees an old or a new pair, never a mix.
        self._cache = (gen, inner)
        return inner

    def _target(self, timeout: float | None, wait_for_ready: bool | None) -> tuple[Any, Any]:
        gen = self._conn._supervisor.current
        if gen is not None:
            return self._inner(gen), timeout
        gen, timeout = self._wait(timeout, wait_for_ready)
        return self._inner(gen), timeout

    def _wait(
        self, timeout: float | None, wait_for_ready: bool | None
    ) -> tuple[Generation, float | None]:
        """Not connected: fail fast, or wait (within ``timeout``) for a generation."""
        conn = self._conn
        if not wait_for_ready:
            conn._demand_fail_fast()
            raise UnavailableError(
                grpc.StatusCode.UNAVAILABLE,
                f"chronicle_conn: not connected (state {conn.state.value}; "
                f"last error: {conn._supervisor.last_error})",
            )
        clock = conn._clock
        deadline = None if timeout is None else clock() + timeout
        try:
            gen = conn._wait_generation(deadline)
        except ConnectTimeoutError:
            raise UnavailableError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                "chronicle_conn: deadline exceeded while waiting for the connection",
            ) from None
        except (RetriesExhaustedError, ConnectionClosedError, NotConnectedError) as exc:
            raise UnavailableError(grpc.StatusCode.UNAVAILABLE, f"chronicle_conn: {exc}") from exc
        if deadline is not None:
            timeout = max(0.0, deadline - clock())
        return gen, timeout

    def _dispatch(
        self,
        attribute: str | None,
        request: Any,
        timeout: float | None,
        metadata: Any,
        credentials: Any,
        wait_for_ready: bool | None,
        compression: Any,
    ) -> Any:
        """Call the current generation's callable (``attribute``: None for the call
        itself, or ``"with_call"``/``"future"``), after waiting for one if need be."""
        inner, timeout = self._target(timeout, wait_for_ready)
        method = inner if attribute is None else getattr(inner, attribute)
        return method(
            request,
            timeout=timeout,
            metadata=metadata,
            credentials=credentials,
            wait_for_ready=wait_for_ready,
            compression=compression,
        )

    def _surviving(self, request: Any, timeout: float | None, **kwargs: Any) -> Any:
        """A blocking ``wait_for_ready`` unary call that outlives its generation.

        Sent as a future that also watches its generation: if the generation is declared
        lost while the call is still waiting for it (so it never reached the server),
        the call is cancelled and sent again on the next generation, within the same
        deadline. A call that the server already had is never sent twice: it fails as
        it would on a plain channel. Returns the finished future (a ``grpc.Call``).
        """
        clock = self._conn._clock
        deadline = None if timeout is None else clock() + timeout
        while True:
            gen = self._conn._supervisor.current
            remaining = None if deadline is None else max(0.0, deadline - clock())
            if gen is None:
                gen, remaining = self._wait(remaining, True)
            woke = threading.Event()
            future = self._inner(gen).future(
                request, timeout=remaining, wait_for_ready=True, **kwargs
            )
            # Bound now: a cancelled future's callback runs late, and must not wake the
            # next attempt's event.
            future.add_done_callback(functools.partial(_set_event, woke))
            if gen.watch(woke):
                woke.wait()
                gen.unwatch(woke)
            if not future.done() and gen.resend and future.cancel():
                continue  # its generation was lost before it could be sent
            return future


def _set_event(event: threading.Event, _future: object) -> None:
    event.set()


class _UnaryUnary(_MultiCallable, _UnaryUnaryBase):
    __slots__ = ()

    def __call__(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: Any = None,
        wait_for_ready: bool | None = None,
        compression: Any = None,
    ) -> Any:
        if not wait_for_ready:
            # The hot path, inlined: connected, and the inner callable already cached.
            gen = self._conn._supervisor.current
            cache = self._cache
            if gen is not None and cache[0] is gen:
                return cache[1](request, timeout, metadata, credentials, None, compression)
            inner, timeout = self._target(timeout, wait_for_ready)
            return inner(request, timeout, metadata, credentials, wait_for_ready, compression)
        return self._surviving(
            request, timeout, metadata=metadata, credentials=credentials, compression=compression
        ).result()

    def with_call(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: Any = None,
        wait_for_ready: bool | None = None,
        compression: Any = None,
    ) -> Any:
        if wait_for_ready:
            future = self._surviving(
                request,
                timeout,
                metadata=metadata,
                credentials=credentials,
                compression=compression,
            )
            return future.result(), future
        return self._dispatch(
            "with_call", request, timeout, metadata, credentials, wait_for_ready, compression
        )

    def future(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: Any = None,
        wait_for_ready: bool | None = None,
        compression: Any = None,
    ) -> Any:
        return self._dispatch(
            "future", request, timeout, metadata, credentials, wait_for_ready, compression
        )


class _UnaryStream(_MultiCallable, _UnaryStreamBase):
    __slots__ = ()

    def __call__(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: Any = None,
        wait_for_ready: bool | None = None,
        compression: Any = None,
    ) -> Any:
        return self._dispatch(
            None, request, timeout, metadata, credentials, wait_for_ready, compression
        )


class _StreamUnary(_MultiCallable, _StreamUnaryBase):
    __slots__ = ()

    def __call__(
        self,
        request_iterator: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: Any = None,
        wait_for_ready: bool | None = None,
        compression: Any = None,
    ) -> Any:
        return self._dispatch(
            None, request_iterator, timeout, metadata, credentials, wait_for_ready, compression
        )

    def with_call(
        self,
        request_iterator: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: Any = None,
        wait_for_ready: bool | None = None,
        compression: Any = None,
    ) -> Any:
        return self._dispatch(
            "with_call",
            request_iterator,
            timeout,
            metadata,
            credentials,
            wait_for_ready,
            compression,
        )

    def future(
        self,
        request_iterator: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: Any = None,
        wait_for_ready: bool | None = None,
        compression: Any = None,
    ) -> Any:
        return self._dispatch(
            "future", request_iterator, timeout, metadata, credentials, wait_for_ready, compression
        )


class _StreamStream(_MultiCallable, _StreamStreamBase):
    __slots__ = ()

    def __call__(
        self,
        request_iterator: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: Any = None,
        wait_for_ready: bool | None = None,
        compression: Any = None,
    ) -> Any:
        return self._dispatch(
            None, request_iterator, timeout, metadata, credentials, wait_for_ready, compression
        )


class _Subscription:
    """One ``subscribe()`` callback: the state at subscription first, then every change
    after it, in order (the callback runs under this subscription's own lock)."""

    def __init__(self, callback: Callable[[grpc.ChannelConnectivity], None]) -> None:
        self._callback = callback
        self._lock = threading.Lock()
        self._started = False
        self._early: list[ConnectionState] = []  # changes seen before the first report

    def on_change(self, change: StateChange) -> None:
        with self._lock:
            if not self._started:
                self._early.append(change.new)
                return
            self._callback(_CONNECTIVITY[change.new])

    def start(self, state: ConnectionState) -> None:
        with self._lock:
            self._callback(_CONNECTIVITY[state])
            for later in self._early:
                self._callback(_CONNECTIVITY[later])
            self._early.clear()
            self._started = True


class ManagedChannel(grpc.Channel):
    """The connection's stable ``grpc.Channel`` (``conn.channel()``, or
    ``conn.managed_channel`` before the connection is up).

    - Calls go to the current underlying channel; stubs made once keep working across
      reconnects, ``reconnect()``, a maximum channel age and ``fork()``.
    - ``wait_for_ready=True`` calls first wait (within their own ``timeout``) for the
      connection, re-arming it if it had given up; fail-fast calls made while it is not
      connected raise :class:`UnavailableError` (``UNAVAILABLE``) at once. A
      ``wait_for_ready`` call that has to wait blocks in the call itself, also for
      ``future()`` and streaming calls.
    - A blocking ``wait_for_ready`` unary call (``__call__``, ``with_call``) that is still
      waiting on a channel when the server is found refusing connections is sent again
      on the next channel, within its deadline: it never reached the server. Calls the
      server may have had (in flight at a crash, or lost to a silent partition) are not
      sent twice; they fail as on a plain channel.
    - ``subscribe()`` reports the *connection's* state as ``grpc.ChannelConnectivity``
      (CONNECTED is READY, FAILED is TRANSIENT_FAILURE, CLOSED is SHUTDOWN), so
      ``grpc.channel_ready_future(conn.channel())`` works. The first report is made
      synchronously, in ``subscribe()``.
    - ``close()`` does nothing: the channel belongs to the shared connection, which
      ``Connection.close()`` closes.

    Thread-safe.
    """

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._lock = threading.Lock()
        self._subscriptions: dict[Callable[[grpc.ChannelConnectivity], None], _Subscription] = {}

    def unary_unary(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: bool = False,
    ) -> grpc.UnaryUnaryMultiCallable[Any, Any]:
        return _UnaryUnary(
            self._conn,
            "unary_unary",
            method,
            request_serializer,
            response_deserializer,
            _registered_method,
        )

    def unary_stream(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: bool = False,
    ) -> grpc.UnaryStreamMultiCallable[Any, Any]:
        return _UnaryStream(
            self._conn,
            "unary_stream",
            method,
            request_serializer,
            response_deserializer,
            _registered_method,
        )

    def stream_unary(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: bool = False,
    ) -> grpc.StreamUnaryMultiCallable[Any, Any]:
        return _StreamUnary(
            self._conn,
            "stream_unary",
            method,
            request_serializer,
            response_deserializer,
            _registered_method,
        )

    def stream_stream(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: bool = False,
    ) -> grpc.StreamStreamMultiCallable[Any, Any]:
        return _StreamStream(
            self._conn,
            "stream_stream",
            method,
            request_serializer,
            response_deserializer,
            _registered_method,
        )

    def subscribe(
        self, callback: Callable[[grpc.ChannelConnectivity], None], try_to_connect: bool = False
    ) -> None:
        subscription = _Subscription(callback)
        with self._lock:
            if callback in self._subscriptions:
                return
            self._subscriptions[callback] = subscription
        state = self._conn._add_listener_at(subscription.on_change)
        if try_to_connect:
            self._conn._demand_fail_fast()
        subscription.start(state)

    def unsubscribe(self, callback: Callable[[grpc.ChannelConnectivity], None]) -> None:
        with self._lock:
            subscription = self._subscriptions.pop(callback, None)
        if subscription is not None:
            self._conn.remove_listener(subscription.on_change)

    def close(self) -> None:
        """Does nothing: close the shared connection with ``Connection.close()``."""

    def __enter__(self) -> ManagedChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def __repr__(self) -> str:
        return f"<ManagedChannel of {self._conn!r}>"
