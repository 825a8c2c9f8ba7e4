"""``ManagedChannel``: the stable ``grpc.Channel`` a connection hands out.

Stubs are built on it once (at import time, before a fork, before an outage) and stay
valid for the life of the connection: each call goes to the connection's *current*
underlying channel (its "generation"). The inner multicallable is cached per
generation, so a call costs a few attribute reads, an identity check and the
generation's in-flight bookkeeping (a small lock, twice) on top of grpc's own.

Every call kind returns exactly what gRPC returns, and reports errors the way gRPC
does: blocking calls raise a ``grpc.RpcError``; ``future()`` and streaming calls return a
call object that carries the error. When the connection has no channel to send on, that
object is a :class:`~chronicle_conn.CallError` (see ``_calls``).
"""

from __future__ import annotations

import collections
import functools
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc

from ._calls import CallError
from ._core import Core
from ._generation import Generation
from ._log import module_log, swallow
from .errors import (
    ConnectionClosedError,
    ConnectTimeoutError,
    NotConnectedError,
    RetriesExhaustedError,
)
from .states import ConnectionState, StateChange

__all__ = ["ManagedChannel"]

_S = ConnectionState
_Code = grpc.StatusCode
_CONNECTIVITY = {
    _S.IDLE: grpc.ChannelConnectivity.IDLE,
    _S.CONNECTING: grpc.ChannelConnectivity.CONNECTING,
    _S.CONNECTED: grpc.ChannelConnectivity.READY,
    _S.RECONNECTING: grpc.ChannelConnectivity.CONNECTING,
    _S.FAILED: grpc.ChannelConnectivity.TRANSIENT_FAILURE,
    _S.CLOSED: grpc.ChannelConnectivity.SHUTDOWN,
}

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


def _closed() -> CallError:
    return CallError(_Code.CANCELLED, "chronicle_conn: the connection is closed")


def _cut_short(core: Core, gen: Generation) -> CallError:
    """A call that entered ``gen`` but found its channel closed before it could start."""
    if core.closing:
        return _closed()
    return CallError(
        _Code.UNAVAILABLE,
        f"chronicle_conn: channel generation {gen.number} was closed before the call "
        "could start (drain_timeout passed)",
    )


class _MultiCallable:
    """Dispatches to the current generation's multicallable (cached per generation).

    Holds the facade, so that a stub alone keeps its connection alive.
    """

    __slots__ = ("_cache", "_core", "_facade", "_kind", "_method", "_registered", "_req", "_resp")

    def __init__(
        self,
        facade: ManagedChannel,
        kind: str,
        method: str,
        request_serializer: Any,
        response_deserializer: Any,
        registered: bool,
    ) -> None:
        self._facade = facade
        self._core: Core = facade._core
        self._kind = kind
        self._method = method
        self._req = request_serializer
        self._resp = response_deserializer
        self._registered = registered
        self._cache: tuple[object, Any] = (None, None)

    def _inner(self, gen: Generation) -> Any:
        """The generation's multicallable. Call only after ``gen.enter()``: never on a
        closed channel."""
        cache = self._cache
        if cache[0] is gen:
            return cache[1]
        inner = getattr(gen.channel, self._kind)(
            self._method, self._req, self._resp, _registered_method=self._registered
        )
        # One tuple, replaced whole: a racing thread sees an old or a new pair, never a mix.
        self._cache = (gen, inner)
        return inner

    def _unconnected(self, wait_for_ready: bool | None) -> CallError | None:
        """Not connected: the error to report now, or None (a wait_for_ready call waits)."""
        core = self._core
        if core.closing:
            return _closed()
        if wait_for_ready:
            return None
        core.note_demand()
        return CallError(_Code.UNAVAILABLE, f"chronicle_conn: not connected ({core.describe()})")

    # ------------------------------------------------------------------ blocking calls

    def _blocking(
        self,
        attribute: str | None,
        request: Any,
        timeout: float | None,
        metadata: Any,
        credentials: Any,
        wait_for_ready: bool | None,
        compression: Any,
    ) -> Any:
        """``__call__`` or ``with_call`` (``attribute``), off the hot path: wait for a
        generation if the call may, then make it there. Failures raise."""
        core = self._core
        deadline: float | None = None
        while True:
            gen = core.current
            if gen is not None:
                if not gen.enter(bool(wait_for_ready)):
                    continue  # retired under us: read the current one again
                return self._invoke(
                    gen,
                    attribute,
                    request,
                    timeout,
                    metadata,
                    credentials,
                    wait_for_ready,
                    compression,
                )
            failure = self._unconnected(wait_for_ready)
            if failure is not None:
                raise failure
            if deadline is None and timeout is not None:
                deadline = core.clock() + timeout
            _wait(core, deadline)
            if deadline is not None:
                timeout = max(0.0, deadline - core.clock())

    def _invoke(
        self,
        gen: Generation,
        attribute: str | None,
        request: Any,
        timeout: float | None,
        metadata: Any,
        credentials: Any,
        wait_for_ready: bool | None,
        compression: Any,
    ) -> Any:
        """Make a blocking call on ``gen`` (entered), and leave it when the call is over."""
        try:
            inner = self._inner(gen)
            method = inner if attribute is None else getattr(inner, attribute)
            return method(request, timeout, metadata, credentials, wait_for_ready, compression)
        except grpc.RpcError as error:
            gen.failed(error)
            raise
        except ValueError:
            if gen.closed:
                raise _cut_short(self._core, gen) from None
            raise
        finally:
            gen.leave(bool(wait_for_ready))

    # ------------------------------------------------------------------ call objects

    def _start(
        self,
        attribute: str | None,
        request: Any,
        timeout: float | None,
        metadata: Any,
        credentials: Any,
        wait_for_ready: bool | None,
        compression: Any,
    ) -> Any:
        """``future()`` or a streaming call: never raises a call failure; returns grpc's
        call object, or a :class:`CallError` (failed, or pending a generation)."""
        core = self._core
        while True:
            gen = core.current
            if gen is not None:
                if not gen.enter(bool(wait_for_ready)):
                    continue
                try:
                    return self._issue(
                        gen,
                        attribute,
                        request,
                        timeout,
                        metadata,
                        credentials,
                        wait_for_ready,
                        compression,
                    )
                except BaseException:
                    gen.leave(bool(wait_for_ready))
                    raise
            failure = self._unconnected(wait_for_ready)
            if failure is not None:
                return failure
            pending = CallError(
                issue=functools.partial(
                    self._send_pending,
                    attribute,
                    request,
                    metadata,
                    credentials,
                    wait_for_ready,
                    compression,
                ),
                deadline=None if timeout is None else time.monotonic() + timeout,
            )
            while True:
                try:
                    gen = core.defer(pending)
                except ConnectionClosedError:
                    pending.finish(_Code.CANCELLED, "chronicle_conn: the connection is closed")
                    return pending
                if gen is None:
                    return pending  # sent by the supervisor when a generation is up
                if gen.enter(True):  # connected in the meantime
                    if not pending.send(gen):
                        gen.leave(True)
                    return pending

    def _send_pending(
        self,
        attribute: str | None,
        request: Any,
        metadata: Any,
        credentials: Any,
        wait_for_ready: bool | None,
        compression: Any,
        gen: Generation,
        timeout: float | None,
    ) -> Any:
        return self._issue(
            gen, attribute, request, timeout, metadata, credentials, wait_for_ready, compression
        )

    def _issue(
        self,
        gen: Generation,
        attribute: str | None,
        request: Any,
        timeout: float | None,
        metadata: Any,
        credentials: Any,
        wait_for_ready: bool | None,
        compression: Any,
    ) -> Any:
        """Make the call on ``gen`` (entered) and have it leave when it finishes. If this
        raises, the caller leaves."""
        inner = self._inner(gen)
        try:
            if attribute == "future":
                call = inner.future(
                    request, timeout, metadata, credentials, wait_for_ready, compression
                )
                call.add_done_callback(
                    functools.partial(gen.finished, waiting=bool(wait_for_ready))
                )
                return call
            call = inner(request, timeout, metadata, credentials, wait_for_ready, compression)
        except ValueError:
            if gen.closed:
                return _cut_short(self._core, gen)
            raise
        waiting = bool(wait_for_ready)
        if isinstance(call, grpc.Future):  # also tells of UNAVAILABLE
            call.add_done_callback(functools.partial(gen.finished, waiting=waiting))
        elif not call.add_callback(functools.partial(gen.leave, waiting)):
            gen.leave(waiting)
        return call


def _wait(core: Core, deadline: float | None) -> None:
    """A ``wait_for_ready`` blocking call waits for the connection within its deadline.

    Raises:
        CallError: DEADLINE_EXCEEDED, UNAVAILABLE (gave up) or CANCELLED (closed).
    """
    try:
        core.wait_connected(deadline)
    except ConnectTimeoutError:
        raise CallError(
            _Code.DEADLINE_EXCEEDED,
            f"Deadline Exceeded (chronicle_conn: not connected in time; {core.describe()})",
        ) from None
    except ConnectionClosedError:
        raise _closed() from None
    except (RetriesExhaustedError, NotConnectedError) as exc:
        raise CallError(_Code.UNAVAILABLE, f"chronicle_conn: {exc}") from exc


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
        gen = self._core.current  # the hot path: connected
        if gen is not None and gen.enter(bool(wait_for_ready)):
            return self._invoke(
                gen, None, request, timeout, metadata, credentials, wait_for_ready, compression
            )
        return self._blocking(
            None, request, timeout, metadata, credentials, wait_for_ready, compression
        )

    def with_call(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: Any = None,
        wait_for_ready: bool | None = None,
        compression: Any = None,
    ) -> Any:
        return self._blocking(
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
        return self._start(
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
        return self._start(
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
        return self._blocking(
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
        return self._blocking(
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
        return self._start(
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
        return self._start(
            None, request_iterator, timeout, metadata, credentials, wait_for_ready, compression
        )


class _Subscription:
    """One ``subscribe()`` callback: the state at subscription first, then every change
    after it, in order, one report at a time.

    Reports are queued, and whoever finds nobody delivering delivers them, outside the
    lock: a callback may call ``close()`` (whose CLOSED report is queued and delivered
    by the loop already running) or anything else without deadlocking.
    """

    def __init__(self, callback: Callable[[grpc.ChannelConnectivity], None]) -> None:
        self._callback = callback
        self._lock = threading.Lock()
        # Guarded by _lock:
        self._queue: collections.deque[grpc.ChannelConnectivity] = collections.deque()
        self._started = False  # the first report (the state at subscription) is queued
        self._delivering = False

    def on_change(self, change: StateChange) -> None:
        with self._lock:
            self._queue.append(_CONNECTIVITY[change.new])
            if not self._started or self._delivering:
                return
            self._delivering = True
        self._drain()

    def start(self, state: ConnectionState) -> None:
        with self._lock:
            self._queue.appendleft(_CONNECTIVITY[state])
            self._started = True
            self._delivering = True
        self._drain()

    def _drain(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    self._delivering = False
                    return
                connectivity = self._queue.popleft()
            try:
                self._callback(connectivity)
            except BaseException as exc:  # as grpc does: logged, never propagated
                swallow(exc)
                module_log().exception("subscribe_callback_failed", callback=repr(self._callback))

    def reset_after_fork(self) -> None:
        self._lock = threading.Lock()
        self._delivering = False


class _WeakListener:
    """The listener the core holds for a subscription: weakly, so that whatever the
    callback refers to (a ``channel_ready_future`` holds the channel) does not keep the
    managed channel, and so the connection, alive from the core's side."""

    __slots__ = ("_ref",)

    def __init__(self, subscription: _Subscription) -> None:
        self._ref = weakref.WeakMethod(subscription.on_change)

    def __call__(self, change: StateChange) -> None:
        on_change = self._ref()
        if on_change is not None:
            on_change(change)


class ManagedChannel(grpc.Channel):
    """The connection's stable ``grpc.Channel`` (``conn.channel()``, or
    ``conn.managed_channel`` before the connection is up).

    - Calls go to the current underlying channel; stubs made once keep working across
      outages, ``reconnect()``, a maximum channel age and ``fork()``.
    - Every call kind returns what a ``grpc.Channel`` returns and reports errors as it
      does (blocking calls raise a ``grpc.RpcError``; ``future()`` and streams return
      a call object that carries the error), also under ``grpc.intercept_channel``.
    - While connected, calls go straight to the channel. While not connected, fail-fast
      calls (the default) fail with ``UNAVAILABLE``, and ``wait_for_ready=True`` calls
      wait for the connection within their own deadline (``DEADLINE_EXCEEDED`` if it
      passes; ``future()`` and streams return at once and wait in the background), re-
      arming a connection that had given up; after ``close()`` calls fail with
      ``CANCELLED``.
    - A call is never sent twice by the library: a call that was sent stays on its
      channel, which is closed only once its calls have finished (or ``drain_timeout``
      after it was replaced or lost: survivors then end with ``UNAVAILABLE``).
    - ``subscribe()`` reports the *connection's* state as ``grpc.ChannelConnectivity``
      (CONNECTED is READY, FAILED is TRANSIENT_FAILURE, CLOSED is SHUTDOWN), so
      ``grpc.channel_ready_future(conn.managed_channel)`` works; the first report is made
      synchronously, in ``subscribe()``. After ``close()`` it raises
      ``ConnectionClosedError``.
    - ``close()`` does nothing: the channel belongs to the shared connection, which
      ``Connection.close()`` closes.

    Thread-safe.
    """

    def __init__(self, core: Core) -> None:
        self._core = core
        self._lock = threading.Lock()
        # Guarded by _lock: what each subscribed callback's reports go through.
        self._subscriptions: dict[
            Callable[[grpc.ChannelConnectivity], None], tuple[_Subscription, _WeakListener]
        ] = {}

    def unary_unary(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: bool = False,
    ) -> grpc.UnaryUnaryMultiCallable[Any, Any]:
        return _UnaryUnary(
            self,
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
            self,
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
            self,
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
            self,
            "stream_stream",
            method,
            request_serializer,
            response_deserializer,
            _registered_method,
        )

    def subscribe(
        self, callback: Callable[[grpc.ChannelConnectivity], None], try_to_connect: bool = False
    ) -> None:
        """Report the connection's state to ``callback`` (see the class docstring).

        Raises:
            ConnectionClosedError: the connection is closed.
        """
        subscription = _Subscription(callback)
        listener = _WeakListener(subscription)
        with self._lock:
            if callback in self._subscriptions:
                return
            self._subscriptions[callback] = (subscription, listener)
        try:
            state = self._core.add_listener(listener)
        except ConnectionClosedError:
            with self._lock:
                self._subscriptions.pop(callback, None)
            raise
        if try_to_connect and state is not _S.CONNECTED:
            self._core.note_demand()
        subscription.start(state)

    def unsubscribe(self, callback: Callable[[grpc.ChannelConnectivity], None]) -> None:
        with self._lock:
            entry = self._subscriptions.pop(callback, None)
        if entry is not None:
            self._core.remove_listener(entry[1])

    def close(self) -> None:
        """Does nothing: close the shared connection with ``Connection.close()``."""

    def __enter__(self) -> ManagedChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def reset_after_fork(self) -> None:
        """In a forked child: fresh locks (the parent's may have been held)."""
        self._lock = threading.Lock()
        for subscription, _ in self._subscriptions.values():
            subscription.reset_after_fork()

    def __repr__(self) -> str:
        core = self._core
        return (
            f"<ManagedChannel of connection {core.label!r} state={core.state.value} "
            f"target={core.config.shown_target!r}>"
        )
