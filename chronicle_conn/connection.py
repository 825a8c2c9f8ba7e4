"""``Connection``: one resilient gRPC channel to a Chronicle kernel (or any gRPC server)."""

from __future__ import annotations

import itertools
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import Any

import grpc

from ._supervisor import Clock, Generation, Supervisor
from .config import ConnectionConfig, LivenessMode, ReconnectPolicy
from .connection_string import ConnectionString
from .errors import ConfigurationError, NotConnectedError
from .managed_channel import ManagedChannel
from .registry import registry
from .states import ConnectionState, ConnectionStats, StateChange

__all__ = ["Connection"]

_S = ConnectionState
_sequence = itertools.count(1)

# Every live connection, so that a fork can reset them in the child.
_ALL: weakref.WeakSet[Connection] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for conn in list(_ALL):
        # The child runs only this thread now; a lock another thread of the parent held
        # at the fork would stay held for ever.
        conn._fork_lock = threading.Lock()
        conn._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class Connection:
    """A managed connection: a background supervisor keeps one channel connected.

    ``Connection(...)`` validates its options and (with ``auto_connect``, the default)
    starts dialing at once; it does not block. Every method is thread-safe. After
    ``fork()`` the child's connection starts over in IDLE with its own channel (and
    dials at once with ``auto_connect``); the parent's channel is never touched there.

    Args:
        connection_string: a ``str`` or :class:`ConnectionString`; default
            ``ConnectionString.default()``.
        server_address: ``"host:port"``, an alternative to a connection string (same
            defaults: TLS on).
        grpc_options: extra channel arguments (win over the library's own).
        retry_attempts: retries after a failed first attempt before FAILED; None: forever.
        reconnect_base_delay, reconnect_max_delay, reconnect_multiplier,
            reconnect_jitter: the backoff schedule (seconds; see :class:`ReconnectPolicy`).
        auto_connect: dial at construction; else stay IDLE until ``connect()``.
        name: register in :data:`chronicle_conn.registry` under this name.
        liveness: ``"auto"``, ``"keepalive"``, ``"health"`` or ``"transport"``.
        connect_fun: ``(target, options) -> grpc.Channel``, replaces channel creation.
        disconnect_fun: ``(channel) -> None``, replaces ``channel.close()``.
        on_retries_exhausted: ``(connection) -> None``, called when a budget runs out.
        logger: a structlog logger to use (default ``structlog.get_logger("chronicle_conn")``).
        attempt_timeout: bound on one attempt (a host that never answers), seconds.
        keepalive_stale_after: silence on the keep-alive stream that means "lost", seconds.
        max_channel_age: replace the channel after this many seconds (None: never).
        drain_timeout: how long a replaced channel may finish its calls, seconds.
        close_timeout: bound on joining the supervisor in ``close()``, seconds.
        clock: monotonic clock (a seam for tests).
        delay_factory: ``(ReconnectPolicy) -> Iterator[float]`` (a seam for tests).

    Raises:
        ConfigurationError: an option is invalid (``ConnectionStringError`` for the string).
    """

    def __init__(
        self,
        connection_string: str | ConnectionString | None = None,
        *,
        server_address: str | None = None,
        grpc_options: Sequence[tuple[str, Any]] | dict[str, Any] = (),
        retry_attempts: int | None = 5,
        reconnect_base_delay: float = 1.0,
        reconnect_max_delay: float = 10.0,
        reconnect_multiplier: float = 2.0,
        reconnect_jitter: float = 0.1,
        auto_connect: bool = True,
        name: str | None = None,
        liveness: str | LivenessMode = "auto",
        connect_fun: Callable[[str, Sequence[tuple[str, Any]]], grpc.Channel] | None = None,
        disconnect_fun: Callable[[grpc.Channel], None] | None = None,
        on_retries_exhausted: Callable[[Connection], None] | None = None,
        logger: Any = None,
        attempt_timeout: float = 5.0,
        keepalive_stale_after: float = 5.0,
        max_channel_age: float | None = None,
        drain_timeout: float = 1.0,
        close_timeout: float = 5.0,
        clock: Clock = time.monotonic,
        delay_factory: Callable[[ReconnectPolicy], Iterator[float]] | None = None,
    ) -> None:
        cs = _connection_string(connection_string, server_address)
        policy = ReconnectPolicy(
            retry_attempts=retry_attempts,
            base_delay=reconnect_base_delay,
            max_delay=reconnect_max_delay,
            multiplier=reconnect_multiplier,
            jitter=reconnect_jitter,
        )
        self._config = ConnectionConfig(
            connection_string=cs,
            grpc_options=grpc_options,  # type: ignore[arg-type]  # normalised by the config
            policy=policy,
            auto_connect=auto_connect,
            name=name,
            liveness=liveness,  # type: ignore[arg-type]  # normalised by the config
            attempt_timeout=attempt_timeout,
            keepalive_stale_after=keepalive_stale_after,
            max_channel_age=max_channel_age,
            drain_timeout=drain_timeout,
            close_timeout=close_timeout,
            connect_fun=connect_fun,
            disconnect_fun=disconnect_fun,
            on_retries_exhausted=on_retries_exhausted,
            logger=logger,
        )
        self._clock = clock
        self._label = name or f"{cs.hosts[0]}#{next(_sequence)}"
        self._supervisor = Supervisor(
            self, self._config, clock=clock, delay_factory=delay_factory, label=self._label
        )
        self._pid = os.getpid()
        self._fork_lock = threading.Lock()
        self._managed = ManagedChannel(self)
        if name is not None:
            registry.add(name, self)
        _ALL.add(self)
        # Dropped without close(): tell the supervisor to shut down (it holds only a
        # weak reference to this object, so nothing else would stop it).
        self._finalizer = _finalizer(self)
        if auto_connect:
            with self._supervisor.cond:
                self._supervisor.arm()

    # ------------------------------------------------------------------ fork
    #
    # Two guards: the ``os.register_at_fork`` hook swaps in a fresh supervisor in the
    # child at once, and every call off the hot path compares the pid too (a fork that
    # bypassed the hook). The hot paths (``channel()``, ``connected``, ``state``, calls
    # through the channel when connected) rely on the hook alone: ``os.getpid()`` is a
    # system call, slower than all the rest of ``channel()``, and a child's fresh
    # supervisor has no current generation, so the child always takes a slow path.

    def _check_fork(self) -> Supervisor:
        if self._pid != os.getpid():
            self._after_fork()
        return self._supervisor

    def _after_fork(self) -> None:
        """Child side of ``fork()``: a fresh supervisor, IDLE, the parent's channels parked."""
        with self._fork_lock:
            if self._pid == os.getpid():
                return
            self._finalizer.detach()  # the parent's supervisor is parked, not closed
            self._supervisor = self._supervisor.forked(self)
            self._finalizer = _finalizer(self)
            self._pid = os.getpid()
            if self._config.auto_connect:
                with self._supervisor.cond:
                    self._supervisor.arm()

    # ------------------------------------------------------------------ public API

    @property
    def config(self) -> ConnectionConfig:
        """The validated configuration (immutable)."""
        return self._config

    @property
    def name(self) -> str | None:
        return self._config.name

    @property
    def state(self) -> ConnectionState:
        """The current :class:`ConnectionState`. Non-blocking, lock-free."""
        return self._supervisor.state

    @property
    def connected(self) -> bool:
        """Whether the state is CONNECTED. Non-blocking, lock-free."""
        return self._supervisor.current is not None

    def connect(self, timeout: float | None = None) -> Connection:
        """Block until CONNECTED, then return ``self``.

        Returns at once when already connected. From IDLE or FAILED it arms the
        supervisor (a fresh retry budget). Failed attempts do not end the wait; success,
        exhaustion, ``close()`` or the deadline do. Thread-safe; any number of threads
        may wait at once.

        Args:
            timeout: seconds to wait; None waits as long as the retry budget lasts.

        Raises:
            ConnectTimeoutError: not connected within ``timeout`` (also a ``TimeoutError``).
            RetriesExhaustedError: the retry budget ran out (the last cause is chained).
            ConnectionClosedError: the connection is or was closed while waiting.
        """
        supervisor = self._check_fork()
        if supervisor.current is not None:
            return self
        deadline = None if timeout is None else self._clock() + timeout
        supervisor.wait_connected(deadline)
        return self

    def _wait_generation(self, deadline: float | None) -> Generation:
        return self._check_fork().wait_connected(deadline)

    def _demand_fail_fast(self) -> None:
        """A caller found us not connected: re-arm a FAILED or IDLE connection (no wait)."""
        supervisor = self._check_fork()
        with supervisor.cond:
            if supervisor.state in (_S.FAILED, _S.IDLE):
                supervisor.arm()

    def channel(self) -> ManagedChannel:
        """Return the connection's stable channel. Non-blocking.

        The same :class:`ManagedChannel` every time; stubs built on it stay valid for the
        life of the connection. On a FAILED connection this also re-arms it.

        Raises:
            NotConnectedError: not CONNECTED right now (``.state`` says what it is).
        """
        if self._supervisor.current is not None:
            return self._managed
        supervisor = self._check_fork()
        if supervisor.current is not None:
            return self._managed
        state = supervisor.state
        if state is _S.FAILED:
            self._demand_fail_fast()
        raise NotConnectedError(
            f"connection {self._label} is not connected (state {state.value}; "
            f"last error: {supervisor.last_error})",
            state=state,
        )

    @property
    def managed_channel(self) -> ManagedChannel:
        """The same stable channel as :meth:`channel`, whatever the state: never raises.

        For stubs made before the connection is up (at import time, say). Calls through
        it behave as documented on :class:`ManagedChannel`: while not connected,
        fail-fast calls get ``UNAVAILABLE`` and ``wait_for_ready`` calls wait.
        """
        return self._managed

    def get_channel(self) -> tuple[ManagedChannel, ConnectionConfig]:
        """Return ``(self.channel(), self.config)``. Raises like :meth:`channel`."""
        return self.channel(), self._config

    def add_listener(self, listener: Callable[[StateChange], None]) -> None:
        """Call ``listener(StateChange)`` on every transition.

        Listeners run on the supervisor thread (CLOSED: on the thread calling
        ``close()``), outside any lock, one at a time and in order. So they hear of a
        change a moment after it happened: ``connect()`` may return before they are told
        of CONNECTED. They must not block; an exception is logged and otherwise ignored.
        A listener may call ``close()``. Listeners added after construction miss the
        changes before (``auto_connect=False`` lets you add them first).
        """
        self._check_fork().add_listener(listener)

    def _add_listener_at(self, listener: Callable[[StateChange], None]) -> ConnectionState:
        """``add_listener``, returning the state the listener's changes start from."""
        return self._check_fork().add_listener(listener)

    def remove_listener(self, listener: Callable[[StateChange], None]) -> None:
        """Stop calling ``listener``. Unknown listeners are ignored."""
        self._check_fork().remove_listener(listener)

    def stats(self) -> ConnectionStats:
        """A consistent snapshot of state and counters. Non-blocking (a short lock)."""
        return self._check_fork().stats()

    def reconnect(self) -> None:
        """Drop the current channel and dial a fresh one (a new generation).

        Non-blocking. Calls already running on the old channel get ``drain_timeout`` to
        finish. On an IDLE or FAILED connection this arms it.
        """
        self._check_fork().request_reconnect()

    def close(self) -> None:
        """Close the connection: CLOSED, waiters fail, channels closed. Idempotent.

        Blocks until the supervisor has stopped (bounded by ``close_timeout``). Safe from
        any thread, including a listener (then it returns at once and the supervisor
        finishes when the listener returns).
        """
        supervisor = self._check_fork()
        supervisor.close()
        name = self._config.name
        if name is not None:
            registry._discard(name, self)

    disconnect = close

    def __enter__(self) -> Connection:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        supervisor = self._supervisor
        return (
            f"<Connection name={self._config.name!r} state={supervisor.state.value} "
            f"target={self._config.connection_string.redacted()!r}>"
        )

    def _threads(self) -> list[threading.Thread]:
        return self._supervisor.threads()


def _finalizer(conn: Connection) -> weakref.finalize[[], Connection]:
    finalizer = weakref.finalize(conn, conn._supervisor.abandon)
    # Only for garbage collection: at interpreter exit, waking supervisors to close
    # channels while Python tears itself down helps nobody.
    finalizer.atexit = False
    return finalizer


def _connection_string(
    connection_string: str | ConnectionString | None, server_address: str | None
) -> ConnectionString:
    if connection_string is not None and server_address is not None:
        raise ConfigurationError(
            "give connection_string or server_address, not both", option="server_address"
        )
    if server_address is not None:
        if not isinstance(server_address, str) or not server_address.strip():
            raise ConfigurationError(
                "server_address must be a 'host:port' string", option="server_address"
            )
        return ConnectionString.parse(f"chronicle://{server_address}")
    if connection_string is None:
        return ConnectionString.default()
    if isinstance(connection_string, ConnectionString):
        return connection_string
    if isinstance(connection_string, str):
        return ConnectionString.parse(connection_string)
    raise ConfigurationError(
        "connection_string must be a str or a ConnectionString, "
        f"not {type(connection_string).__name__}",
        option="connection_string",
    )
