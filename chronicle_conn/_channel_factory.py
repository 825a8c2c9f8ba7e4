"""Builds the gRPC channels of one connection: target, credentials and channel arguments.

One factory per connection; every generation and every candidate channel comes from
``ChannelFactory.build()``, so all of them share one set of arguments.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from typing import Any

import grpc

# grpc imports these lazily, inside insecure_channel(), secure_channel(),
# channel_ready_future() and intercept_channel(). Imported here, at package import, so
# that no background thread of ours is the first to import them: a module imported by a
# thread while another thread forks is left half-initialised in the child.
import grpc._channel
import grpc._interceptor
import grpc._utilities
from grpc._cython import cygrpc  # type: ignore[attr-defined]  # untyped

from .config import ConnectionConfig
from .connection_string import ConnectionString
from .errors import ConfigurationError

__all__ = ["ChannelFactory", "grpc_target"]

ConnectFun = Callable[[str, Sequence[tuple[str, Any]]], grpc.Channel]

_LB_POLICIES = {"pick-first": "pick_first", "round-robin": "round_robin"}


def _is_ip(host: str, version: int) -> bool:
    try:
        return ipaddress.ip_address(host).version == version
    except ValueError:
        return False


def grpc_target(cs: ConnectionString) -> str:
    """Return the gRPC target string for the hosts of ``cs``.

    One host becomes ``dns:///host:port`` (``ipv6:[addr]:port`` for an IPv6 literal);
    several IP literals of one family become an ``ipv4:``/``ipv6:`` address list that
    gRPC's own load-balancing policy spreads calls over.

    Raises:
        ConfigurationError: several hosts that are not all IP literals of one family,
            or a ``chronicle+srv`` string (SRV resolution is not available yet).
    """
    if cs.is_srv:
        raise ConfigurationError(
            "chronicle+srv connection strings are not supported by this version yet",
            option="connection_string",
        )
    hosts = cs.hosts
    if len(hosts) == 1:
        endpoint = hosts[0]
        if _is_ip(endpoint.host, 6):
            return f"ipv6:[{endpoint.host}]:{endpoint.port}"
        return f"dns:///{endpoint.host}:{endpoint.port}"
    if all(_is_ip(e.host, 4) for e in hosts):
        return "ipv4:" + ",".join(f"{e.host}:{e.port}" for e in hosts)
    if all(_is_ip(e.host, 6) for e in hosts):
        return "ipv6:" + ",".join(f"[{e.host}]:{e.port}" for e in hosts)
    raise ConfigurationError(
        "several hosts must all be IPv4 or all be IPv6 address literals in this version; "
        f"got {', '.join(str(e) for e in hosts)}",
        option="connection_string",
    )


def _read(path: str | None) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as handle:
        return handle.read()


class ChannelFactory:
    """Makes fresh channels for one connection. Thread-safe; ``build()`` does not block."""

    def __init__(self, config: ConnectionConfig) -> None:
        cs = config.connection_string
        self.target = grpc_target(cs)
        self._connect_fun: ConnectFun | None = config.connect_fun
        self._disconnect_fun = config.disconnect_fun
        policy = config.policy
        lb_policy = _LB_POLICIES[cs.load_balancer]
        service_config: dict[str, Any] = {"loadBalancingConfig": [{lb_policy: {}}]}
        own: list[tuple[str, Any]] = [
            # A private subchannel per channel: a new channel must not inherit the backoff
            # timer of an older one through gRPC's global subchannel pool.
            ("grpc.use_local_subchannel_pool", 1),
            # Core reconnects a channel by itself only while calls wait on it (a
            # wait_for_ready call caught on a lost channel): then it should be back as
            # soon as the server is (100 ms, the least core allows, growing by 1.6 up to
            # reconnect_max_delay), not after core's own 1 s..120 s.
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", max(100, int(policy.max_delay * 1000))),
            ("grpc.min_reconnect_backoff_ms", max(100, int(config.attempt_timeout * 1000))),
            ("grpc.service_config", _json(service_config)),
            ("grpc.primary_user_agent", "chronicle-conn"),
        ]
        # The user's options come last so that they win.
        self.options: tuple[tuple[str, Any], ...] = (*own, *config.grpc_options)
        self._credentials: grpc.ChannelCredentials | None = None
        if cs.tls_enabled:
            if cs.skip_tls_validation or cs.certificate_password is not None:
                raise ConfigurationError(
                    "skipTlsValidation and PKCS#12 certificates are not supported by this "
                    "version yet",
                    option="skipTlsValidation" if cs.skip_tls_validation else "certificatePassword",
                )
            self._credentials = grpc.ssl_channel_credentials(
                root_certificates=_read(cs.ca_path),
                private_key=_read(cs.key_path),
                certificate_chain=_read(cs.certificate_path),
            )

    def build(self) -> grpc.Channel:
        """Return a new, unconnected channel to the target."""
        if self._connect_fun is not None:
            return self._connect_fun(self.target, self.options)
        if self._credentials is None:
            return grpc.insecure_channel(self.target, options=self.options)
        return grpc.secure_channel(self.target, self._credentials, options=self.options)

    def dispose(self, channel: grpc.Channel, *, unavailable: str | None = None) -> None:
        """Close ``channel`` (through ``disconnect_fun`` when one is configured).

        Calls still in flight end with ``CANCELLED`` ("Channel closed!"), as on any
        closed channel; with ``unavailable``, they end with ``UNAVAILABLE`` and that text
        instead (a channel the library gave up on, not one the application closed), when
        the channel is one of grpc's own. Fast: the library's channels have no
        connectivity poller to wait for.
        """
        if self._disconnect_fun is not None:
            self._disconnect_fun(channel)
            return
        if unavailable is not None:
            _close_unavailable(channel, unavailable)
        channel.close()


def _close_unavailable(channel: grpc.Channel, details: str) -> None:
    """Close grpc's core channel with ``UNAVAILABLE`` so that its calls end that way.

    ``grpc.Channel.close()`` always cancels with ``CANCELLED``, which means "the client
    cancelled" and which retry code does not retry. The core channel's own ``close`` takes
    the status; the public ``close()`` that follows then finds it closed and only does
    its bookkeeping. Any other channel type is left to the public ``close()``.
    """
    core = getattr(channel, "_channel", None)
    if not isinstance(channel, grpc._channel.Channel) or core is None:
        return
    try:
        core.close(cygrpc.StatusCode.unavailable, details)
    except Exception:  # an unexpected grpc version: the public close() still runs
        return


def _json(value: Any) -> str:
    import json  # noqa: PLC0415 - on the constructing thread; not worth 3 ms at import

    return json.dumps(value)
