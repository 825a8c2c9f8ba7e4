"""Validated, frozen configuration values: the reconnect policy and the connection config."""

from __future__ import annotations

import enum
import math
import os
import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .connection_string import ConnectionString
from .errors import ConfigurationError

if TYPE_CHECKING:
    import grpc

__all__ = [
    "DEFAULT_RETRY_METHODS",
    "ConnectionConfig",
    "LivenessMode",
    "ReconnectPolicy",
]

GrpcOptions = tuple[tuple[str, Any], ...]


class LivenessMode(str, enum.Enum):
    """How a connection notices that its server is gone.

    ``TRANSPORT``: the channel's own connectivity only. ``KEEPALIVE``: the Chronicle
    kernel's ``Connect`` keep-alive stream. ``HEALTH``: a ``grpc.health.v1`` Watch.
    ``AUTO``: keep-alive if the server implements it, else health, else transport.
    """

    AUTO = "auto"
    KEEPALIVE = "keepalive"
    HEALTH = "health"
    TRANSPORT = "transport"

    def __str__(self) -> str:
        return self.value


def _number(option: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigurationError(
            f"{option} must be a number of seconds, not {type(value).__name__}", option=option
        )
    if math.isnan(value) or math.isinf(value):
        raise ConfigurationError(f"{option} must be finite, got {value!r}", option=option)
    return float(value)


def _positive(option: str, value: object) -> float:
    number = _number(option, value)
    if number <= 0:
        raise ConfigurationError(f"{option} must be > 0 seconds, got {value!r}", option=option)
    return number


@dataclass(frozen=True)
class ReconnectPolicy:
    """When to dial again after a failed attempt: capped exponential backoff with jitter.

    The n-th delay (n from 0) is ``min(base_delay * multiplier ** n, max_delay)``,
    then moved by a random fraction of itself in ``[-jitter, +jitter]``.

    Attributes:
        retry_attempts: how many times to retry after a failed first attempt before
            giving up (state FAILED); ``None`` retries forever. ``0`` makes one attempt.
        base_delay: the first delay, seconds (> 0).
        max_delay: the largest delay before jitter, seconds (>= base_delay).
        multiplier: growth factor per attempt (>= 1).
        jitter: the random spread as a fraction of the delay (0..1).
    """

    retry_attempts: int | None = 5
    base_delay: float = 1.0
    max_delay: float = 10.0
    multiplier: float = 2.0
    jitter: float = 0.1

    def __post_init__(self) -> None:
        attempts = self.retry_attempts
        if attempts is not None and (
            isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 0
        ):
            raise ConfigurationError(
                f"retry_attempts must be None (retry forever) or an int >= 0, got {attempts!r}",
                option="retry_attempts",
            )
        base = _positive("reconnect_base_delay", self.base_delay)
        top = _positive("reconnect_max_delay", self.max_delay)
        if top < base:
            raise ConfigurationError(
                f"reconnect_max_delay ({top:g}) must be >= reconnect_base_delay ({base:g})",
                option="reconnect_max_delay",
            )
        multiplier = _number("reconnect_multiplier", self.multiplier)
        if multiplier < 1:
            raise ConfigurationError(
                f"reconnect_multiplier must be >= 1, got {multiplier:g}",
                option="reconnect_multiplier",
            )
        jitter = _number("reconnect_jitter", self.jitter)
        if not 0 <= jitter <= 1:
            raise ConfigurationError(
                f"reconnect_jitter must be in 0..1 (a fraction of the delay), got {jitter:g}",
                option="reconnect_jitter",
            )

    @property
    def max_attempts(self) -> int | None:
        """Attempts in one budget (the first plus the retries), or None for no bound."""
        return None if self.retry_attempts is None else self.retry_attempts + 1

    def delays(self, rng: random.Random | None = None) -> Iterator[float]:
        """Yield the delays of one budget, forever (the caller counts the attempts).

        The schedule comes from ``backoff.expo``; jitter is applied here as a fraction
        of each delay (``backoff``'s own jitters are full or random-plus-one).
        Thread-safe to call; the iterator itself belongs to one thread. ``backoff`` is
        imported here, not with the package (it costs as much as the rest of it); a
        ``Connection`` imports it when it is built, on the constructing thread.
        """
        import backoff  # noqa: PLC0415 - deferred, see the docstring

        schedule = backoff.expo(
            base=self.multiplier, factor=self.base_delay, max_value=self.max_delay
        )
        next(schedule)  # backoff's generators are primed with one bare next()
        return _jittered(schedule, self.jitter, rng or random.Random())


def _jittered(schedule: Iterator[float], jitter: float, rng: random.Random) -> Iterator[float]:
    for value in schedule:
        spread = value * jitter
        yield max(0.0, value + rng.uniform(-spread, spread))


@dataclass(frozen=True)
class ConnectionConfig:
    """Everything a :class:`~chronicle_conn.Connection` was configured with, validated.

    Built by ``Connection(...)`` from its keyword options; ``conn.get_channel()``
    returns it. Vary it with :func:`dataclasses.replace` (which validates again).

    Attributes:
        connection_string: where and how to connect.
        grpc_options: extra channel arguments, applied after the library's own.
        policy: the reconnect policy.
        auto_connect: start dialing at construction (else stay IDLE until ``connect()``).
        name: registry name, if any.
        liveness: how loss is detected (see :class:`LivenessMode`).
        attempt_timeout: bound on one attempt against a host that never answers.
        keepalive_stale_after: no keep-alive for this long means the connection is lost.
        max_channel_age: replace the channel after this long (None: never).
        drain_timeout: how long a replaced or lost channel may finish the calls already
            on it before it is closed anyway (None: as long as they take).
        close_timeout: bound on joining the supervisor in ``close()``.
        connect_fun: ``(target, options) -> grpc.Channel``, replaces channel creation.
        disconnect_fun: ``(channel) -> None``, replaces ``channel.close()``.
        on_retries_exhausted: ``(connection) -> None``, called when the budget runs out
            (with the ``Connection``).
        logger: a structlog-style logger to use instead of the module's.
        meter_provider: the OpenTelemetry ``MeterProvider`` for metrics (None: the
            global one, when ``opentelemetry-api`` is installed; False: none).
        target: a gRPC target (``unix:/run/kernel.sock``, ``dns:///kernels:35000``,
            ``xds:///kernel``...) dialed as it is, instead of the connection string's
            hosts; the connection string then only says whether TLS is on.
        credentials: ``grpc.ChannelCredentials`` for a ``target`` with TLS (None: the
            default root certificates).
        retry_methods: the gRPC methods safe to run twice (idempotent), which gRPC
            retries on ``UNAVAILABLE`` through the channel's service config:
            ``"package.Service/Method"``, ``"package.Service"`` (all its methods) or
            ``"*"`` (every method). Default: :data:`DEFAULT_RETRY_METHODS`. The
            library's own calls (health ``Check`` and ``Watch``, the keep-alive stream)
            are never retried.
        call_retries: how many times gRPC retries one of them (0..4; 0: never).
    """

    connection_string: ConnectionString
    grpc_options: GrpcOptions = ()
    policy: ReconnectPolicy = field(default_factory=ReconnectPolicy)
    auto_connect: bool = True
    name: str | None = None
    liveness: LivenessMode = LivenessMode.AUTO
    attempt_timeout: float = 5.0
    keepalive_stale_after: float = 5.0
    max_channel_age: float | None = None
    drain_timeout: float | None = 30.0
    close_timeout: float = 5.0
    connect_fun: Callable[[str, Sequence[tuple[str, Any]]], grpc.Channel] | None = field(
        default=None, compare=False, repr=False
    )
    disconnect_fun: Callable[[grpc.Channel], None] | None = field(
        default=None, compare=False, repr=False
    )
    on_retries_exhausted: Callable[[Any], None] | None = field(
        default=None, compare=False, repr=False
    )
    logger: Any = field(default=None, compare=False, repr=False)
    meter_provider: Any = field(default=None, compare=False, repr=False)
    target: str | None = None
    credentials: grpc.ChannelCredentials | None = field(default=None, compare=False, repr=False)
    retry_methods: tuple[str, ...] | None = None  # None: DEFAULT_RETRY_METHODS
    call_retries: int = 3

    @property
    def shown_target(self) -> str:
        """What logs, ``stats()`` and ``repr()`` call the target: the gRPC target when one
        was given, else the redacted connection string."""
        return self.target if self.target is not None else self.connection_string.redacted()

    def __post_init__(self) -> None:
        if not isinstance(self.connection_string, ConnectionString):
            raise ConfigurationError(
                "connection_string must be a ConnectionString "
                f"(got {type(self.connection_string).__name__})",
                option="connection_string",
            )
        if not isinstance(self.policy, ReconnectPolicy):
            raise ConfigurationError("policy must be a ReconnectPolicy", option="policy")
        object.__setattr__(self, "grpc_options", _grpc_options(self.grpc_options))
        try:
            object.__setattr__(self, "liveness", LivenessMode(self.liveness))
        except ValueError:
            valid = ", ".join(m.value for m in LivenessMode)
            raise ConfigurationError(
                f"liveness must be one of {valid}; got {self.liveness!r}", option="liveness"
            ) from None
        if not isinstance(self.auto_connect, bool):
            raise ConfigurationError("auto_connect must be a bool", option="auto_connect")
        if self.name is not None and (not isinstance(self.name, str) or not self.name.strip()):
            raise ConfigurationError("name must be a non-empty str or None", option="name")
        for option in ("attempt_timeout", "keepalive_stale_after", "close_timeout"):
            _positive(option, getattr(self, option))
        if self.max_channel_age is not None:
            _positive("max_channel_age", self.max_channel_age)
        if self.drain_timeout is not None and _number("drain_timeout", self.drain_timeout) < 0:
            raise ConfigurationError(
                f"drain_timeout must be >= 0 seconds, got {self.drain_timeout!r}",
                option="drain_timeout",
            )
        for option in ("connect_fun", "disconnect_fun", "on_retries_exhausted"):
            value = getattr(self, option)
            if value is not None and not callable(value):
                raise ConfigurationError(f"{option} must be callable or None", option=option)
        object.__setattr__(self, "retry_methods", _retry_methods(self.retry_methods))
        retries = self.call_retries
        if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= 4:
            raise ConfigurationError(
                f"call_retries must be an int from 0 to 4 (gRPC allows 5 attempts), "
                f"got {retries!r}",
                option="call_retries",
            )
        self._check_files()

    def method_config(self) -> list[dict[str, Any]]:
        """The service config's ``methodConfig``: the retry policy for ``retry_methods``,
        and an entry without one for the library's own methods (:data:`LIBRARY_METHODS`),
        which wins over ``"*"`` and whole services."""
        if not self.retry_methods or not self.call_retries:
            return []
        names: list[dict[str, str]] = []
        for method in self.retry_methods:
            if method == "*":
                names = [{}]
                break
            service, _, name = method.partition("/")
            names.append({"service": service, "method": name} if name else {"service": service})
        policy = {
            "maxAttempts": self.call_retries + 1,
            "initialBackoff": "0.1s",
            "maxBackoff": "1s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"],
        }
        # The library's own calls (probes, the keep-alive stream) are never retried, even
        # under "*" or their whole service: a method's own entry wins over those.
        own = [
            {"service": service, "method": name}
            for service, _, name in (m.partition("/") for m in LIBRARY_METHODS)
        ]
        return [{"name": names, "retryPolicy": policy}, {"name": own}]

    def _check_files(self) -> None:
        cs = self.connection_string
        for key, path in (
            ("caPath", cs.ca_path),
            ("certificatePath", cs.certificate_path),
            ("keyPath", cs.key_path),
        ):
            if path is not None and not os.path.isfile(path):
                raise ConfigurationError(
                    f"{key} {path!r} does not exist or is not a file", option=key
                )


#: The methods gRPC retries by default: the kernel's read-only ones, which are safe to run
#: twice. Others may have run on a server that died before answering. (Not health's
#: ``Check``: the library probes with it, and a probe must fail fast.)
DEFAULT_RETRY_METHODS: tuple[str, ...] = (
    "Cratis.Chronicle.Contracts.Host.Server/GetVersionInfo",
    "Cratis.Chronicle.Contracts.Clients.ConnectionService/GetConnectedClients",
    "Cratis.Chronicle.Contracts.Clients.ConnectionService/GetDescriptorSet",
)

#: The methods the library calls itself, which must fail fast: gRPC never retries them.
LIBRARY_METHODS: tuple[str, ...] = (
    "grpc.health.v1.Health/Check",
    "grpc.health.v1.Health/Watch",
    "Cratis.Chronicle.Contracts.Clients.ConnectionService/Connect",
    "Cratis.Chronicle.Contracts.Clients.ConnectionService/ConnectionKeepAlive",
)

_METHOD = re.compile(r"^(\*|[A-Za-z_][\w.]*(/[A-Za-z_]\w*)?)$")


def _retry_methods(value: object) -> tuple[str, ...]:
    if value is None:
        return DEFAULT_RETRY_METHODS
    if isinstance(value, str) or not isinstance(value, (tuple, list)):
        raise ConfigurationError(
            "retry_methods must be a list of 'package.Service/Method' names, got "
            f"{type(value).__name__}",
            option="retry_methods",
        )
    for method in value:
        if not isinstance(method, str) or not _METHOD.match(method):
            raise ConfigurationError(
                f"retry_methods: {method!r} is not 'package.Service/Method', "
                "'package.Service' or '*'",
                option="retry_methods",
            )
        if method in LIBRARY_METHODS:
            raise ConfigurationError(
                f"retry_methods: {method} is called by the library itself, which must "
                "see its failures at once: leave it out",
                option="retry_methods",
            )
    return tuple(dict.fromkeys(value))  # a name twice would make the service config invalid


def _grpc_options(options: object) -> GrpcOptions:
    if isinstance(options, dict):
        options = tuple(options.items())
    if isinstance(options, (str, bytes)) or not isinstance(options, (tuple, list)):
        raise ConfigurationError(
            "grpc_options must be a sequence of (name, value) pairs or a dict",
            option="grpc_options",
        )
    result: list[tuple[str, Any]] = []
    for item in options:
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)):
            raise ConfigurationError(
                f"grpc_options entries must be (str, value) pairs, got {item!r}",
                option="grpc_options",
            )
        result.append((item[0], item[1]))
    return tuple(result)
