"""``Connection``: one resilient gRPC channel to a Chronicle kernel (or any gRPC server).

The public object wires the parts together and owns nothing slow itself: the core
(``_core``) holds the state, the supervisor (``_supervisor``) runs the loop, the managed
channel (``managed_channel``) is what callers use. Nothing in the package imports this
module but ``__init__``.
"""

from __future__ import annotations

import atexit
import dataclasses
import itertools
import math
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import Any, TypeVar

import grpc

from . import _fork, _liveness, _log, _metrics, _retrying, _schedule, _targets
from ._channel_factory import ChannelFactory
from ._core import Core
from ._log import connection_log
from ._supervisor import Supervisor
from .config import ConnectionConfig, LivenessMode, ReconnectPolicy
from .connection_string import ConnectionString
from .errors import ConfigurationError, NotConnectedError
from .managed_channel import ManagedChannel
from .registry import ConnectionRegistry
from .states import ConnectionState, ConnectionStats, StateChange

__all__ = ["Connection", "registry"]

_S = ConnectionState
_sequence = itertools.count(1)

#: The default registry that ``Connection(name=...)`` registers in.
registry: ConnectionRegistry[Connection] = ConnectionRegistry()

# Every live connection, so that a fork can reset them in the child.
_ALL: weakref.WeakSet[Connection] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for conn in list(_ALL):
        # The child runs only this thread now; a lock another thread of the parent held
        # at the fork would stay held for ever.
        conn._fork_lock = threading.Lock()
        conn._after_fork()


# Before the fork, the supervisors quiesce (``_fork``); after it, in the child, the
# supervisors reset their cores, then this resets the rest of each connection.
_fork.on_child(_after_fork_in_child)

#: The longest interpreter exit waits for open connections to close, all together.
_AT_EXIT_TIMEOUT = 3.0


def _close_at_exit() -> None:
    """At interpreter exit (a script ending, a gunicorn or uWSGI worker exiting): close
    the connections still open, so that the server sees the channel closed rather than
    a socket dropped by a dying process. Bounded (each ``close()`` itself by
    ``close_timeout``); a connection not yet reset after a fork (uWSGI without Python's
    fork hooks) is not touched: its channels are the parent's."""
    deadline = time.monotonic() + _AT_EXIT_TIMEOUT
    try:
        connections = list(_ALL)
    except RuntimeError:  # another thread built one at this very moment
        connections = list(_ALL)
    for conn in connections:
        if time.monotonic() >= deadline:
            return
        if conn._pid == os.getpid() and not conn._core.closing:
            try:
                conn.close()
            except Exception:  # exiting anyway: never turn an exit into a traceback
                continue


atexit.register(_close_at_exit)


def _refuse_gevent() -> None:
    """gevent's monkey-patched threading turns the supervisor into a greenlet that
    blocks on real gRPC calls: refuse at once rather than hang later."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None and monkey.is_module_patched("threading"):
        raise ConfigurationError(
            "gevent has monkey-patched threading, which chronicle_conn does not support: "
            "run gunicorn with gthread or sync workers (uWSGI: threads, not gevent)",
            option="gevent",
        )


_T = TypeVar("_T")


class Connection:
    """A managed connection: a background supervisor keeps one channel connected.

    ``Connection(...)`` validates its options and (with ``auto_connect``, the default)
    starts dialing at once; it does not block. Every method is thread-safe. After
    ``fork()`` the child's connection starts over in IDLE with its own channel (and
    dials at once with ``auto_connect``); the parent's channel is never touched there.
    After ``close()`` every method raises :class:`ConnectionClosedError`, except
    ``close()`` itself, ``remove_listener()`` (no-ops), ``stats()`` and the properties.

    Args:
        connection_string: a ``str`` or :class:`ConnectionString`; default
            ``ConnectionString.default()``.
        server_address: an alternative to a connection string: ``"host:port"`` (TLS on
            unless ``tls=False``), or one of gRPC's own targets, dialed as it is
            (``unix:/run/kernel.sock``, ``dns:///kernels:35000``, ``ipv4:...``,
            ``xds:///kernel``); a gRPC target needs ``tls`` said explicitly.
        tls: with ``server_address``: ``True`` (default root certificates), a
            ``grpc.ChannelCredentials``, or ``False`` for plaintext.
        retry_methods: the gRPC methods safe to run twice, which gRPC itself retries
            on ``UNAVAILABLE`` (``"package.Service/Method"``, ``"package.Service"``,
            ``"*"``); default: the kernel's read-only methods
            (:data:`~chronicle_conn.config.DEFAULT_RETRY_METHODS`); ``()``: none. The
            library's own calls (health, the keep-alive stream) are never retried;
            naming one is a ``ConfigurationError``.
        call_retries: how many times gRPC retries those (0 to 4).
        grpc_options: extra channel arguments (win over the library's own).
        retry_attempts: retries after a failed first attempt before FAILED; None: forever.
        reconnect_base_delay, reconnect_max_delay, reconnect_multiplier,
            reconnect_jitter: the backoff schedule (seconds; see :class:`ReconnectPolicy`).
        auto_connect: dial at construction; else stay IDLE until ``connect()`` (or a call).
        name: register in :data:`chronicle_conn.registry` under this name.
        liveness: ``"auto"``, ``"keepalive"``, ``"health"`` or ``"transport"``.
        connect_fun: ``(target, options) -> grpc.Channel``, replaces channel creation.
        disconnect_fun: ``(channel) -> None``, replaces ``channel.close()``.
        on_retries_exhausted: ``(connection) -> None``, called when a budget runs out.
        logger: a structlog logger to use (default: structlog's ``chronicle_conn`` logger
            when the application configured structlog, else standard ``logging``'s).
        meter_provider: the OpenTelemetry ``MeterProvider`` to report metrics to
            (default: OpenTelemetry's global one; used only when ``opentelemetry-api``
            is installed, the ``otel`` extra); ``False``: no metrics.
        attempt_timeout: bound on one attempt (a host that never answers), seconds.
        keepalive_stale_after: no sign of life for this long means lost, seconds.
        max_channel_age: replace the channel after this many seconds (None: never).
        drain_timeout: how long a replaced or lost channel may finish its calls before it
            is closed anyway, seconds (None: as long as they take).
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
        meter_provider: Any = None,
        tls: bool | grpc.ChannelCredentials | None = None,
        retry_methods: Sequence[str] | None = None,
        call_retries: int = 3,
        attempt_timeout: float = 5.0,
        keepalive_stale_after: float = 5.0,
        max_channel_age: float | None = None,
        drain_timeout: float | None = 30.0,
        close_timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        delay_factory: Callable[[ReconnectPolicy], Iterator[float]] | None = None,
    ) -> None:
        _refuse_gevent()
        cs, target = _connection_string(connection_string, server_address, tls)
        policy = ReconnectPolicy(
            retry_attempts=retry_attempts,
            base_delay=reconnect_base_delay,
            max_delay=reconnect_max_delay,
            multiplier=reconnect_multiplier,
            jitter=reconnect_jitter,
        )
        config = ConnectionConfig(
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
            meter_provider=meter_provider,
            target=target,
            credentials=tls if isinstance(tls, grpc.ChannelCredentials) else None,
            retry_methods=retry_methods,  # type: ignore[arg-type]  # normalised by the config
            call_retries=call_retries,
        )
        # Deferred from the package import (they cost as much as the rest of it), and
        # imported now, on the constructing thread: never first by a background thread.
        _schedule.load()
        _liveness.load()
        _log.load()
        self._config = config
        self._label = name or f"{target or cs.hosts[0]}#{next(_sequence)}"
        shown = config.shown_target
        log = connection_log(config.logger, connection=name or self._label, target=shown)
        factory = ChannelFactory(config, log=log, label=self._label)
        self._core = core = Core(config, clock=clock, label=self._label, log=log)
        self._supervisor = Supervisor(core, factory, delay_factory=delay_factory)
        self._managed = ManagedChannel(core)
        core.bind(self._supervisor.start, self)
        self._pid = os.getpid()
        self._fork_lock = threading.Lock()
        if name is not None:
            registry.add(name, self)
        # Once nothing can fail: a connection never built must not report.
        _metrics.attach(core, config.meter_provider, connection=name or self._label, target=shown)
        _ALL.add(self)
        # Dropped without close(): shut down. The managed channel is the last thing to
        # go (stubs keep it, and so the connection, alive); nothing refers back to it or
        # to this object, so plain reference counting runs this, even with the cycle
        # collector disabled or frozen.
        self._finalizer = weakref.finalize(self._managed, core.abandon)
        # At interpreter exit, waking supervisors to close channels while Python tears
        # itself down helps nobody.
        self._finalizer.atexit = False
        # A uWSGI master that forks without Python's fork hooks must have no thread at
        # the fork: dial in each worker instead (uwsgi.post_fork_hook, see _fork).
        if auto_connect and _fork.uwsgi_problem() is None:
            with core.cond:
                core.arm()

    # ------------------------------------------------------------------ fork
    #
    # Two guards: the ``os.register_at_fork`` hook resets every connection in the child
    # at once, and every call off the hot path compares the pid too (a fork that
    # bypassed the hook). The hot paths (``channel()``, ``connected``, ``state``, calls
    # through the channel when connected) rely on the hook alone: ``os.getpid()`` is a
    # system call, slower than all the rest of ``channel()``, and a child's reset core
    # has no current generation, so the child always takes a slow path.

    def _check_fork(self) -> Core:
        if self._pid != os.getpid():
            self._after_fork()
        return self._core

    def _after_fork(self) -> None:
        """Child side of ``fork()``: the inherited channels parked, IDLE, fresh locks."""
        with self._fork_lock:
            if self._pid == os.getpid():
                return
            core = self._core
            self._supervisor.fork_child()
            self._managed.reset_after_fork()
            self._pid = os.getpid()
            if self._config.auto_connect:
                with core.cond:
                    core.arm()

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
        return self._core.state

    @property
    def connected(self) -> bool:
        """Whether a channel is installed for calls (the state is CONNECTED; False from
        the moment ``close()`` is called). Non-blocking, lock-free."""
        return self._core.current is not None

    def connect(self, timeout: float | None = None) -> Connection:
        """Block until CONNECTED, then return ``self``.

        Returns at once when already connected. From IDLE or FAILED it arms the
        supervisor (a fresh retry budget). Failed attempts do not end the wait; success,
        exhaustion, ``close()`` or the deadline do. Thread-safe; any number of threads
        may wait at once.

        Args:
            timeout: seconds to wait (>= 0); None waits as long as the retry budget lasts.

        Raises:
            ConnectTimeoutError: not connected within ``timeout`` (also a ``TimeoutError``).
            RetriesExhaustedError: the retry budget ran out (the last cause is chained).
            ConnectionClosedError: the connection is or was closed while waiting.
            ConfigurationError: ``timeout`` is negative or NaN.
            TypeError: ``timeout`` is not a number.
        """
        core = self._check_fork()
        core.check_open()
        seconds = _timeout(timeout)
        if core.current is not None:
            return self
        core.wait_connected(None if seconds is None else core.clock() + seconds)
        return self

    def channel(self) -> ManagedChannel:
        """Return the connection's stable channel. Non-blocking.

        The same :class:`ManagedChannel` every time; stubs built on it stay valid for the
        life of the connection. While not connected this counts as demand (the
        supervisor dials sooner; a FAILED or IDLE connection is re-armed).

        Raises:
            NotConnectedError: not CONNECTED right now (``.state`` says what it is).
            ConnectionClosedError: the connection is closed (a ``NotConnectedError`` too).
        """
        if self._core.current is not None:
            return self._managed
        core = self._check_fork()
        if core.current is not None:
            return self._managed
        core.check_open()
        core.note_demand()
        state = core.state
        raise NotConnectedError(
            f"connection {self._label} is not connected ({core.describe()}); "
            "use connect(timeout) to wait, or managed_channel for stubs made before",
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

    def call(
        self,
        fn: Callable[[ManagedChannel], _T],
        *,
        timeout: float,
        retries: int = 3,
        idempotent: bool = False,
    ) -> _T:
        """Run ``fn(channel)`` within ``timeout`` seconds: wait for the connection, and
        retry only what certainly never reached a server.

        Each attempt waits for CONNECTED with what is left of ``timeout``, then calls
        ``fn(self.channel())`` (the channel is fetched again for every attempt). An
        outage is ridden out by that wait; ``retries`` counts failed attempts only. A
        retry runs ``fn`` again from its start: make one call in it, with its own
        ``timeout`` (the budget bounds waits and pauses, not a call already made).

        Retried, after a jittered pause of 25 ms growing to 1 s (never past the
        deadline): ``NotConnectedError``; a ``CallError`` ``UNAVAILABLE`` that was never
        sent (the fail-fast answer while not connected); grpc's ``UNAVAILABLE`` whose
        details begin "failed to connect to all addresses" or "connections to all
        backends failing" (grpc's load balancer had no connection: nothing was sent).
        With ``idempotent=True`` also every other ``UNAVAILABLE``: a call in flight when
        a server dies ends ``UNAVAILABLE`` though the server may have run it, so retry it
        only if running it twice is harmless. Never retried: ``DEADLINE_EXCEEDED``,
        ``CANCELLED``, any other status, ``ConnectionClosedError``, other exceptions.

        Args:
            fn: ``(ManagedChannel) -> T``; its result is returned.
            timeout: the whole budget in seconds (finite, > 0).
            retries: how many failed attempts may be retried (an int >= 0).
            idempotent: whether the call may safely run more than once.

        Raises:
            ConnectTimeoutError: not connected in time (one line: how many attempts,
                within what timeout, why).
            RetriesExhaustedError, TlsError, AuthenticationError, ConnectionClosedError:
                as ``connect()`` raises them, at once, never retried.
            ConfigurationError: ``timeout``, ``retries`` or ``idempotent`` is invalid.
            whatever ``fn`` raised last, the same object, when it is not retryable or
                retries or time ran out: ``except grpc.RpcError`` keeps working.
        """

        return _retrying.run(self, fn, timeout=timeout, retries=retries, idempotent=idempotent)

    def add_listener(self, listener: Callable[[StateChange], None]) -> None:
        """Call ``listener(StateChange)`` on every transition.

        Listeners run on the supervisor thread (CLOSED: on the thread calling
        ``close()``), outside any lock, one at a time and in order. So they hear of a
        change a moment after it happened: ``connect()`` may return before they are told
        of CONNECTED. They must not block; whatever one raises is logged and otherwise
        ignored. A listener may call ``close()``. Listeners added after construction
        miss the changes before (``auto_connect=False`` lets you add them first).

        Raises:
            ConnectionClosedError: the connection is closed.
        """
        self._check_fork().add_listener(listener)

    def remove_listener(self, listener: Callable[[StateChange], None]) -> None:
        """Stop calling ``listener``. Unknown listeners are ignored (also after close)."""
        self._check_fork().remove_listener(listener)

    def stats(self) -> ConnectionStats:
        """A consistent snapshot of state and counters (also after close). Non-blocking.

        Also what the channel dials: ``addresses`` (as resolved at the current
        channel's build; without one, at the latest attempt's), ``load_balancer``, and
        ``backends_ready``, how many of them have a ready transport now (from gRPC's
        channelz; None when it cannot tell).
        """
        core = self._check_fork()
        stats = core.stats()
        factory = self._supervisor.dialer.factory
        gen = core.current
        resolution = (gen and factory.resolution_of(gen.channel)) or factory.resolution
        return dataclasses.replace(
            stats,
            addresses=resolution.addresses if resolution is not None else (),
            load_balancer=self._config.connection_string.load_balancer,
            backends_ready=0 if gen is None else factory.backends_ready(gen.channel),
        )

    def reconnect(self) -> None:
        """Replace the channel with a freshly dialed one (a new generation). Non-blocking.

        Make-before-break: while connected, the new channel is dialed while the old one
        serves; calls then go to the new one, and the old one is closed once its calls
        in flight have finished (at most ``drain_timeout`` later). If the new one cannot
        be dialed, the old one stays. On an IDLE or FAILED connection this arms it; while
        reconnecting it makes the next attempt now.

        Raises:
            ConnectionClosedError: the connection is closed.
        """
        self._check_fork().request_reconnect()

    def close(self) -> None:
        """Close the connection: CLOSED, waiters fail, channels closed. Idempotent.

        Calls still in flight end with ``CANCELLED``. Blocks until the supervisor has
        stopped (bounded by ``close_timeout``). Safe from any thread, including a
        listener or a ``subscribe()`` callback (then it returns at once and the
        supervisor finishes when the listener returns). From a gRPC done-callback of a
        call on this connection it waits out ``close_timeout``: closing the channel
        waits for that callback's thread (a raw ``grpc.Channel`` would hang for ever).
        """
        self._check_fork()
        self._supervisor.close()
        self._finalizer.detach()
        name = self._config.name
        if name is not None:
            registry._discard(name, self)

    disconnect = close

    def __enter__(self) -> Connection:
        self._core.check_open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"<Connection name={self._config.name!r} state={self._core.state.value} "
            f"target={self._config.shown_target!r}>"
        )

    def _threads(self) -> list[threading.Thread]:
        """The threads this connection started that are still alive (tests, diagnosis)."""
        suffix = f"[{self._label}]"
        return [
            thread
            for thread in threading.enumerate()
            if thread.name.startswith("chronicle_conn-") and thread.name.endswith(suffix)
        ]


def _timeout(value: object) -> float | None:
    """Validate a ``timeout`` argument: None, or a number of seconds >= 0."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"timeout must be a number of seconds or None, not {type(value).__name__}")
    if math.isnan(value) or value < 0:
        raise ConfigurationError(
            f"timeout must be >= 0 seconds (or None to wait without a deadline), got {value!r}",
            option="timeout",
        )
    return None if math.isinf(value) else float(value)


def _connection_string(
    connection_string: str | ConnectionString | None,
    server_address: str | None,
    tls: bool | grpc.ChannelCredentials | None,
) -> tuple[ConnectionString, str | None]:
    """The connection string, and the gRPC target to dial as it is (or None)."""
    if connection_string is not None and server_address is not None:
        raise ConfigurationError(
            "give connection_string or server_address, not both", option="server_address"
        )
    if tls is not None and not isinstance(tls, (bool, grpc.ChannelCredentials)):
        raise ConfigurationError(
            f"tls must be True, False or a grpc.ChannelCredentials, not {type(tls).__name__}",
            option="tls",
        )
    if server_address is None:
        if tls is not None:
            raise ConfigurationError(
                "tls= goes with server_address; in a connection string say disableTls=true",
                option="tls",
            )
        return _parsed(connection_string), None
    if not isinstance(server_address, str) or not server_address.strip():
        raise ConfigurationError(
            "server_address must be a 'host:port' string or a gRPC target such as "
            "'unix:/run/kernel.sock'",
            option="server_address",
        )
    plaintext = "?disableTls=true" if tls is False else ""
    if not _targets.is_grpc_target(server_address):
        return ConnectionString.parse(f"chronicle://{server_address}{plaintext}"), None
    if tls is None:
        raise ConfigurationError(
            f"server_address {server_address!r} is a gRPC target: say tls=False for "
            "plaintext, or tls=True (or a grpc.ChannelCredentials) for TLS",
            option="tls",
        )
    return ConnectionString.parse(f"chronicle://localhost{plaintext}"), server_address.strip()


def _parsed(connection_string: str | ConnectionString | None) -> ConnectionString:
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
