"""Builds the gRPC channels of one connection: target, credentials and channel arguments.

One factory per connection; every generation and every candidate channel comes from
``ChannelFactory.build()``, so all of them share one set of arguments.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import grpc

# grpc imports these lazily, inside insecure_channel(), secure_channel(),
# channel_ready_future() and intercept_channel(). Imported here, at package import, so
# that no background thread of ours is the first to import them: a module imported by a
# thread while another thread forks is left half-initialised in the child.
import grpc._channel
import grpc._interceptor
import grpc._utilities
from grpc._cython import cygrpc  # type: ignore[attr-defined]  # untyped

from . import _channelz, _targets
from ._log import QuietLog, Silent
from ._targets import Resolution
from .config import ConnectionConfig
from .connection_string import ConnectionString

if TYPE_CHECKING:
    import ssl

__all__ = ["ChannelFactory", "token_urls"]

# The address grpc names in a failure: "ipv4:127.0.0.1:35000", "ipv6:[::1]:35000".
_ADDRESS = re.compile(r"ipv[46]:(?:(?:\[|%5B)([0-9a-fA-F:.%]+?)(?:\]|%5D)|([0-9.]+)):(\d+)")

ConnectFun = Callable[[str, Sequence[tuple[str, Any]]], grpc.Channel]

_LB_POLICIES = {"pick-first": "pick_first", "round-robin": "round_robin"}


class _Pin(NamedTuple):
    """A certificate pinned for ``skipTlsValidation``, and the channel options it adds."""

    pem: bytes
    options: tuple[tuple[str, Any], ...]


def token_urls(cs: ConnectionString, servers: Sequence[tuple[str, int]] | None = None) -> list[str]:
    """The OAuth token endpoint of each host (``servers``: SRV targets instead), on
    ``authPort`` or the gRPC port; https with TLS, http without (as a Chronicle kernel
    serves it)."""
    scheme = "https" if cs.tls_enabled else "http"
    urls: list[str] = []
    pairs = servers if servers is not None else [(e.host, e.port) for e in cs.hosts]
    for name, grpc_port in pairs:
        host = f"[{name}]" if ":" in name else name
        port = cs.auth_port if cs.auth_port is not None else grpc_port
        url = f"{scheme}://{host}:{port}/connect/token"
        if url not in urls:
            urls.append(url)
    return urls


class ChannelFactory:
    """Makes fresh channels for one connection. Thread-safe.

    Security is settled here, on the constructing thread: the TLS files are read and
    checked, and credentials become an interceptor that every channel carries.
    :meth:`resolve`, :meth:`fetch_pin`, :meth:`authenticate` and :meth:`diagnose` do
    I/O (the dialer runs them on a short-lived thread of their own); ``build()`` does
    none.

    Args:
        config: the connection's configuration.
        log: the connection's logger.
        label: the connection's label (for thread names).

    Raises:
        ConfigurationError: a TLS file cannot be read or used (naming the file), or
            ``chronicle+srv`` without dnspython (the ``srv`` extra).
    """

    def __init__(self, config: ConnectionConfig, *, log: Any = None, label: str = "") -> None:
        cs = config.connection_string
        self._cs = cs
        self._grpc_target = config.target
        if cs.is_srv and config.target is None:
            from . import _srv  # noqa: PLC0415 - the optional extra

            _srv.require_dnspython()
        #: The target when it needs no look-up, else None (see :meth:`resolve`).
        self.static = _targets.static(cs, config.target)
        #: The latest resolution (the attempt in progress, or the last one).
        self.resolution: Resolution | None = self.static
        self.round_robin = cs.load_balancer == "round-robin"
        #: Whether the server serves ``grpc.health.v1`` (None: not known yet). With
        #: round robin, channels built once it is known turn on gRPC's client-side
        #: health checking, so a NOT_SERVING backend gets no calls.
        self.serves_health: bool | None = None
        #: Whether the latest build had client-side health checking on.
        self.built_with_health = False
        #: What each channel was built to dial, and in which process (``stats()``;
        #: ``backends_ready``).
        self._built: weakref.WeakKeyDictionary[grpc.Channel, tuple[Resolution, int]] = (
            weakref.WeakKeyDictionary()
        )
        self._pid = os.getpid()
        self._log: Any = log if log is not None else QuietLog(Silent())
        self._connect_fun: ConnectFun | None = config.connect_fun
        self._disconnect_fun = config.disconnect_fun
        self._attempt_timeout = config.attempt_timeout
        policy = config.policy
        self._lb_policy = _LB_POLICIES[cs.load_balancer]
        self._method_config = config.method_config()
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
            ("grpc.primary_user_agent", "chronicle-conn"),
        ]
        # The user's options come last so that they win.
        self._own = tuple(own)
        self._user_options = config.grpc_options
        user_keys = {key for key, _ in config.grpc_options}
        self._user_name_override = "grpc.ssl_target_name_override" in user_keys
        self._user_authority = "grpc.default_authority" in user_keys
        self.tls = cs.tls_enabled
        self.material: Any = None  # _tls.TlsMaterial when TLS is on
        # On the constructing thread: the supervisor uses it to diagnose failures.
        from . import _tls  # noqa: PLC0415 - not worth its import time for the package

        self._tls_module: Any = _tls
        if cs.tls_enabled:
            self.material = _tls.load_material(
                ca_path=cs.ca_path,
                certificate_path=cs.certificate_path,
                key_path=cs.key_path,
                certificate_password=cs.certificate_password,
            )
        self.token_source: Any = None  # _auth.TokenSource with client credentials
        self._interceptor: Any = None
        headers = self._headers_function(cs, config.attempt_timeout, label)
        if headers is not None:
            from . import _auth  # noqa: PLC0415

            # An interceptor on TLS channels too, not grpc call credentials: those run a
            # Python plugin on another thread for every call, which halved the
            # throughput of 4 calling threads (tests/benchmarks/bench_auth.py).
            self._interceptor = _auth.MetadataInterceptor(headers)
        self._credentials: grpc.ChannelCredentials | None = None
        if config.credentials is not None:
            self._credentials = config.credentials
        elif cs.tls_enabled and not cs.skip_tls_validation:
            self._credentials = self._channel_credentials(self.material.root_certificates)

    def _headers_function(
        self, cs: ConnectionString, timeout: float, label: str
    ) -> Callable[[], Sequence[tuple[str, str]]] | None:
        """What every call carries: ``api-key``, a bearer token, or nothing."""
        if cs.api_key is not None:
            api_key = (("api-key", cs.api_key),)
            return lambda: api_key
        if cs.client_id is None or cs.auth == "none":
            return None
        from . import _auth  # noqa: PLC0415

        source = _auth.TokenSource(
            token_urls(cs),
            cs.client_id,
            cs.client_secret,
            context=self._token_context(cs) if cs.tls_enabled else None,
            timeout=timeout,
            log=self._log,
            label=label,
        )
        self.token_source = source

        def bearer() -> Sequence[tuple[str, str]]:
            header = source.header()
            return (("authorization", header),) if header is not None else ()

        return bearer

    def _token_context(self, cs: ConnectionString) -> ssl.SSLContext:
        """TLS for the token endpoint: the channel's trust and client certificate."""
        import ssl  # noqa: PLC0415

        context = ssl.create_default_context(cafile=cs.ca_path)
        if cs.skip_tls_validation:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        material = self.material
        if material is not None and material.has_client_certificate:
            self._tls_module.load_client_certificate(context, material)
        return context

    def _channel_credentials(self, roots: bytes | None) -> grpc.ChannelCredentials:
        material = self.material
        return grpc.ssl_channel_credentials(
            root_certificates=roots,
            private_key=material.private_key,
            certificate_chain=material.certificate_chain,
        )

    @property
    def pins(self) -> bool:
        """Whether ``build()`` needs :meth:`fetch_pin` first (``skipTlsValidation``)."""
        return self.tls and self._cs.skip_tls_validation and self._connect_fun is None

    @property
    def refused(self) -> BaseException | None:
        """The credentials were refused while renewing the token (then give up)."""
        source = self.token_source
        return source.refused if source is not None else None

    @property
    def options(self) -> tuple[tuple[str, Any], ...]:
        """The channel arguments of the next build (the user's last, so that they win)."""
        return self.options_for(self.resolution)

    def service_config(self) -> dict[str, Any]:
        """gRPC's service config: the load-balancing policy, the retry policy of the
        methods safe to retry, and with round robin and a server that serves health,
        client-side health checking."""
        config: dict[str, Any] = {"loadBalancingConfig": [{self._lb_policy: {}}]}
        if self.round_robin and self.serves_health:
            config["healthCheckConfig"] = {"serviceName": ""}
        if self._method_config:
            config["methodConfig"] = self._method_config
        return config

    def options_for(
        self, resolution: Resolution | None, pin: _Pin | None = None
    ) -> tuple[tuple[str, Any], ...]:
        own = [*self._own, ("grpc.service_config", _json(self.service_config()))]
        if pin is not None and pin.options:
            # A name the pinned certificates carry: gRPC checks it, and sends it as the
            # authority (ours would be one the certificates lack).
            own.extend(pin.options)
        elif resolution is not None and resolution.authority and not self._user_authority:
            # Resolved addresses lost the name: TLS checks the certificate against it.
            own.append(("grpc.default_authority", resolution.authority))
        return (*own, *self._user_options)

    def resolve(self, deadline: float) -> Resolution:
        """This build's target: resolves the names now when there are any (blocking,
        until ``deadline``, a ``time.monotonic()`` value).

        Raises:
            _targets.UnresolvedError: no host has an address now.
        """
        resolution = self.static or _targets.resolve(self._cs, deadline)
        self.resolution = resolution
        if resolution.servers and self.token_source is not None:
            # chronicle+srv: each kernel serves its token endpoint. With TLS it is asked
            # by the name SRV gives (its certificate carries it; the system's resolver
            # must know it); without, at the address the look-up found.
            pairs = resolution.servers if self.tls else resolution.endpoints
            self.token_source.set_urls(token_urls(self._cs, pairs))
        return resolution

    def build(self, pin: Any = None, resolution: Resolution | None = None) -> grpc.Channel:
        """Return a new, unconnected channel to ``resolution``'s target (default: the
        latest). Does not block.

        ``pin``: with ``skipTlsValidation``, what :meth:`fetch_pin` found (required).
        """
        resolution = resolution or self.resolution
        if resolution is None:
            raise ValueError("build() needs the target resolved first (resolve())")
        target = resolution.target
        pinned = self.tls and self._cs.skip_tls_validation and self._grpc_target is None
        options = self.options_for(resolution, pin if pinned and pin is not None else None)
        self.built_with_health = self.round_robin and bool(self.serves_health)
        if self._connect_fun is not None:
            channel = self._connect_fun(target, options)
        elif not self.tls:
            channel = grpc.insecure_channel(target, options=options)
        else:
            if self._cs.skip_tls_validation and self._grpc_target is None:
                if pin is None:
                    raise ValueError("skipTlsValidation: build() needs the pinned certificate")
                credentials = self._channel_credentials(pin.pem)
            else:
                assert self._credentials is not None
                credentials = self._credentials
            channel = grpc.secure_channel(target, credentials, options=options)
        if self._interceptor is not None:
            channel = grpc.intercept_channel(channel, self._interceptor)
        # (A connect_fun's channel may not be weakly referable: then it is not known.)
        with contextlib.suppress(TypeError):
            self._built[channel] = (resolution, os.getpid())
        return channel

    def resolution_of(self, channel: grpc.Channel) -> Resolution | None:
        """What ``channel`` was built to dial (None: unknown)."""
        try:
            built = self._built.get(channel)
        except TypeError:
            return None
        return None if built is None else built[0]

    def backends_ready(self, channel: grpc.Channel) -> int | None:
        """How many of ``channel``'s backends have a ready transport (None: unknown)."""
        try:
            built = self._built.get(channel)
        except TypeError:
            return None
        if built is None:
            return None
        resolution, pid = built
        # Built in a forked child: the channels copied from the parent are older.
        forked = pid != self._pid
        return _channelz.backends_ready(resolution.target, newest=forked)

    def fetch_pin(self, deadline: float, resolution: Resolution | None = None) -> _Pin:
        """``skipTlsValidation``: the certificates the hosts of ``resolution`` (default:
        the latest) present now, to trust exactly those under a name they carry
        (blocks, until ``deadline``, a ``time.monotonic()`` value). Every host is asked
        at once, for at most half the time left, so that the attempt keeps time to
        dial; one that does not answer is left out (it cannot be dialed then). Logs a
        warning each time.

        One channel checks every server against one name: the name it would check
        anyway (the authority: the first host) if every certificate fetched carries it,
        else a name they all carry, else a name the first answering host's carries
        (then the servers whose certificate lacks it are refused; each kernel's
        certificate should carry a common name, as a development kernel's
        ``localhost``).

        Raises:
            OSError: no host presented a certificate (the last host's error).
        """
        tls = self._tls_module
        resolution = resolution or self.resolution
        endpoints = resolution.endpoints if resolution is not None else ()
        now = time.monotonic()
        until = now + max(0.0, deadline - now) / 2

        def fetch(endpoint: tuple[str, int]) -> Any:
            remaining = max(0.001, until - time.monotonic())
            return tls.fetch_certificate(*endpoint, remaining, material=self.material)

        found = _targets.each_at_once(fetch, endpoints, until, "chronicle_conn-pin")
        fetched = [(e, info) for e, info in found.items() if isinstance(info, tls.CertificateInfo)]
        if not fetched:
            errors = [info for info in found.values() if isinstance(info, Exception)]
            error = errors[-1] if errors else "no host answered in time"
            raise OSError(f"skipTlsValidation: could not fetch the server's certificate: {error}")
        infos = [info for _, info in fetched]
        # The name the channel checks without an override: its authority's host.
        checked = (
            authority_host(resolution.authority)
            if resolution is not None and resolution.authority
            else endpoints[0][0]
        )
        common = tuple(n for n in infos[0].names if all(n in i.names for i in infos[1:]))
        (first_host, _), first = fetched[0]
        # The checked name when all carry it, else a name (DNS first) they all carry.
        name: str | None = (
            tls.target_name(checked, common) if common else tls.target_name(first_host, first.names)
        )
        self._log.warning(
            "tls_validation_skipped",
            host=", ".join(_targets.address(h, p) for (h, p), _ in fetched),
            certificate_for="; ".join(", ".join(i.names) or "unknown" for i in infos),
            hint="skipTlsValidation=true trusts whatever certificate the server presents",
        )
        pems = list(dict.fromkeys(info.pem for info in infos))
        options: tuple[tuple[str, Any], ...] = ()
        if name is not None and name != checked and not self._user_name_override:
            options = (("grpc.ssl_target_name_override", name),)
        return _Pin(b"\n".join(pems), options)

    def authenticate(self, deadline: float, *, fresh: bool = False) -> bool:
        """Have a token at hand before the channel is used (client credentials only);
        ``fresh``: a new one (the server refused ours). Returns whether one was fetched.

        Raises:
            AuthenticationError: the token endpoint refused the credentials.
            TokenUnavailable (``_auth``): the endpoint could not be asked; try again.
        """
        if self.token_source is None:
            return False
        return bool(self.token_source.ensure(deadline, fresh=fresh))

    def diagnose(self, details: str, deadline: float) -> Any:
        """What is wrong with the configuration (a ``_tls.Diagnosis``), after an attempt
        failed with grpc's ``details`` (a TLS handshake failure, a connection closed at
        once), or None if nothing is known. May handshake with the server (bounded by
        ``deadline``)."""
        if self._connect_fun is not None or self._grpc_target is not None:
            return None
        host, port = self._failed_address(details)
        tls = self._tls_module
        material = self.material if self.material is not None else tls.TlsMaterial()
        resolution = self.resolution
        options = dict(self.options)
        # The name gRPC checks the certificate against: an override, else the authority
        # (the first name, with resolved addresses), else the address dialed.
        server_name = options.get("grpc.ssl_target_name_override")
        authority = options.get("grpc.default_authority")
        if server_name is None and isinstance(authority, str):
            server_name = authority_host(authority) or None
        shown = None
        if resolution is not None and len(resolution.endpoints) == 1:
            shown = resolution.authority or resolution.addresses[0]
        problem: Any = tls.diagnose(
            details,
            pinned=self._cs.skip_tls_validation,
            several=len(self._endpoints()) > 1,
            host=host,
            port=port,
            tls=self.tls,
            material=material,
            ca_path=self._cs.ca_path,
            server_name=server_name,
            timeout=max(0.05, min(2.0, deadline - time.monotonic())),
            shown=shown,
        )
        return problem

    def _failed_address(self, details: str) -> tuple[str, int]:
        """The address grpc names in ``details`` (``ipv4:127.0.0.1:35000``), else the
        first host."""
        match = _ADDRESS.search(details)
        if match is not None:
            return match.group(1) or match.group(2), int(match.group(3))
        endpoints = self._endpoints()
        if endpoints:
            return endpoints[0]
        first = self._cs.hosts[0]
        return first.host, first.port

    def _endpoints(self) -> tuple[tuple[str, int], ...]:
        return self.resolution.endpoints if self.resolution is not None else ()

    def close(self) -> None:
        """Stop renewing the token."""
        if self.token_source is not None:
            self.token_source.close()

    def fork_child(self) -> None:
        """In a forked child: the token source gets a fresh lock and thread."""
        if self.token_source is not None:
            self.token_source.fork_child()

    def bare(self, channel: grpc.Channel) -> grpc.Channel:
        """``channel`` without the interceptor that adds the credentials: calls on it
        carry what gRPC's own calls (client-side health checking) carry."""
        if self._interceptor is not None and isinstance(channel, grpc._interceptor._Channel):
            return channel._channel
        return channel

    def dispose(self, channel: grpc.Channel, *, unavailable: str | None = None) -> None:
        """Close ``channel`` (through ``disconnect_fun`` when one is configured).

        Calls still in flight end with ``CANCELLED`` ("Channel closed!"), as on any
        closed channel; with ``unavailable``, they end with ``UNAVAILABLE`` and that text
        instead (a channel the library gave up on, not one the application closed), when
        the channel is one of grpc's own. Fast: the library's channels have no
        connectivity poller to wait for.
        """
        channel = self.bare(channel)  # the one build() made, and disconnect_fun knows
        if self._disconnect_fun is not None:
            self._disconnect_fun(channel)
            return
        if unavailable is not None:
            _close_unavailable(channel, unavailable)
        channel.close()


def authority_host(authority: str) -> str:
    """The host of an authority: ``kernel:35000`` -> ``kernel``, ``[::1]:35000`` ->
    ``::1``; one without a port is all host."""
    if authority.startswith("["):
        return authority[1 : authority.find("]")] if "]" in authority else authority
    host, colon, port = authority.rpartition(":")
    return host if colon and port.isdigit() and ":" not in host else authority


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
