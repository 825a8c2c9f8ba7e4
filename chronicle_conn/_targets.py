"""What a connection dials: the gRPC target of each channel, resolved at each build.

gRPC's own resolver and load-balancing policies are the engine; this module only turns
a connection string into one target gRPC understands:

- one host by name: ``dns:///host:port`` (gRPC resolves it, and re-resolves it itself);
- IP literals: an ``ipv4:`` / ``ipv6:`` address list (several: the first address is
  the authority, the name TLS checks);
- several hosts, some by name: each name resolved now (both families) into one address
  list, in the order the hosts were given (what ``pick_first`` tries first). IPv4 and
  IPv6 together become an ``ipv6:`` list with IPv4-mapped addresses, which gRPC dials
  as IPv4. The first name becomes the channel's authority, so TLS checks the
  certificate against it;
- ``chronicle+srv://name``: the SRV records of ``_chronicle._tcp.<name>`` (extra
  ``srv``), in priority and weight order, their targets' addresses as above; the
  authority is the first target by priority, then by name (stable across look-ups);
- a gRPC target given as ``server_address`` (``dns:``, ``unix:``, ``unix-abstract:``,
  ``ipv4:``, ``ipv6:``, ``xds:``...): used as it is.

Names are resolved at every channel build (every reconnect and every
``max_channel_age`` rotation), so a change in DNS is followed by the next channel.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from .connection_string import ConnectionString

__all__ = [
    "GRPC_SCHEMES",
    "Resolution",
    "UnresolvedError",
    "address",
    "each_at_once",
    "is_grpc_target",
    "lookup_many",
    "resolve",
    "static",
]

_T = TypeVar("_T", bound=Hashable)
_R = TypeVar("_R")

#: The target forms of grpc's own resolvers that ``server_address`` accepts as they are.
GRPC_SCHEMES = ("dns:", "unix:", "unix-abstract:", "ipv4:", "ipv6:", "xds:", "vsock:")


class UnresolvedError(OSError):
    """No address for any of the hosts (a name that does not resolve, an SRV look-up
    that failed): the attempt fails and is retried like any other."""


@dataclass(frozen=True)
class Resolution:
    """One build's target.

    Attributes:
        target: the gRPC target string.
        addresses: the addresses it holds (``host:port``), or the name gRPC resolves.
        endpoints: ``(host, port)`` to reach each server directly (a certificate fetch,
            a TLS diagnosis), in order.
        authority: the channel's ``grpc.default_authority`` when the target lost the
            host name (resolved addresses) or lists several addresses, else None.
        servers: an SRV look-up's targets, ``(name, port)`` in its order (where the
            kernels' token endpoints are); empty otherwise.
    """

    target: str
    addresses: tuple[str, ...]
    endpoints: tuple[tuple[str, int], ...]
    authority: str | None = None
    servers: tuple[tuple[str, int], ...] = ()


def is_grpc_target(text: str) -> bool:
    """Whether ``text`` is one of grpc's own target forms (``unix:/run/k.sock``...)."""
    lowered = text.strip().lower()
    return any(lowered.startswith(scheme) for scheme in GRPC_SCHEMES)


def _version(host: str) -> int | None:
    try:
        return ipaddress.ip_address(host).version
    except ValueError:
        return None


def address(host: str, port: int) -> str:
    """``host:port``, with brackets around an IPv6 address."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _address_list(endpoints: list[tuple[str, int]]) -> str:
    """``ipv4:a:p,b:p``, ``ipv6:[a]:p,...``, or both as an ``ipv6:`` list (IPv4-mapped)."""
    if all(_version(host) == 4 for host, _ in endpoints):
        return "ipv4:" + ",".join(address(h, p) for h, p in endpoints)
    mapped = [(h if _version(h) == 6 else f"::ffff:{h}", p) for h, p in endpoints]
    return "ipv6:" + ",".join(address(h, p) for h, p in mapped)


def static(cs: ConnectionString, grpc_target: str | None = None) -> Resolution | None:
    """The target when no look-up is needed (one host, IP literals, a gRPC target);
    None when names must be resolved now (:func:`resolve`)."""
    if grpc_target is not None:
        return Resolution(grpc_target, (grpc_target,), ())
    if cs.is_srv:
        return None
    hosts = cs.hosts
    endpoints = [(e.host, e.port) for e in hosts]
    if len(hosts) == 1 and _version(hosts[0].host) is None:
        host, port = endpoints[0]
        return Resolution(f"dns:///{address(host, port)}", (address(host, port),), (endpoints[0],))
    if all(_version(host) is not None for host, _ in endpoints):
        addresses = tuple(address(h, p) for h, p in endpoints)
        # Several addresses: the first is the authority (the TLS name checked), as for
        # several names; gRPC would otherwise use the whole list's text.
        authority = addresses[0] if len(addresses) > 1 else None
        return Resolution(_address_list(endpoints), addresses, tuple(endpoints), authority)
    return None


def resolve(cs: ConnectionString, deadline: float) -> Resolution:
    """Resolve the names of ``cs`` now (blocking; ``deadline`` a ``time.monotonic()``).
    Names are looked up in parallel; one with no answer within half the time left is
    left out like one that does not resolve.

    Raises:
        UnresolvedError: no host had an address (the message names them and why).
    """
    fixed = static(cs)
    if fixed is not None:
        return fixed
    if cs.is_srv:
        return _srv(cs, deadline)
    names = list(dict.fromkeys(e.host for e in cs.hosts if _version(e.host) is None))
    # In parallel, and for at most half the time left: a name whose resolver hangs is
    # left out, and the attempt keeps time to dial the others.
    now = time.monotonic()
    found = lookup_many(names, socket.SOCK_STREAM, now + max(0.0, deadline - now) / 2)
    endpoints: list[tuple[str, int]] = []
    first_name: tuple[str, int] | None = None
    problems: list[str] = []
    for endpoint in cs.hosts:
        if _version(endpoint.host) is not None:
            endpoints.append((endpoint.host, endpoint.port))
            continue
        if first_name is None:
            first_name = (endpoint.host, endpoint.port)
        addresses = found[endpoint.host]
        if isinstance(addresses, list) and addresses:
            endpoints.extend((ip, endpoint.port) for ip in addresses)
        else:
            reason = "no answer in time" if addresses is None else addresses or "no address"
            problems.append(f"{endpoint}: {reason}")
    return _resolution(endpoints, first_name, problems)


def lookup_many(
    hosts: Sequence[str], socktype: int, deadline: float
) -> dict[str, list[str] | str | None]:
    """Resolve ``hosts`` with :func:`socket.getaddrinfo`, in parallel, until ``deadline``
    (a ``time.monotonic()`` value).

    getaddrinfo has no timeout of its own, so each runs on a daemon thread; one still
    running at the deadline is left to finish alone (its name counts as unresolved).
    Returns, per host, its IPv4 and IPv6 addresses in the resolver's order without
    repeats, the error's text, or None (no answer in time).
    """

    def addresses(host: str) -> list[str]:
        found: list[str] = []
        for family, _, _, _, sockaddr in socket.getaddrinfo(host, None, type=socktype):
            ip = str(sockaddr[0]).split("%", 1)[0]
            if family in (socket.AF_INET, socket.AF_INET6) and ip not in found:
                found.append(ip)
        return found

    results = each_at_once(addresses, hosts, deadline, "chronicle_conn-resolve")
    return {host: _outcome(result) for host, result in results.items()}


def _outcome(result: list[str] | Exception | None) -> list[str] | str | None:
    if not isinstance(result, Exception):
        return result
    text = str(result.strerror or result) if isinstance(result, OSError) else repr(result)
    return " ".join(text.split())[:120]


def each_at_once(
    work: Callable[[_T], _R], items: Sequence[_T], deadline: float, name: str
) -> dict[_T, _R | Exception | None]:
    """``work(item)`` for every item, each on a daemon thread of its own (socket I/O
    with no timeout of its own, or one to cut short), until ``deadline`` (a
    ``time.monotonic()`` value). Returns, per item in order, its result, the exception
    it raised, or None (still running then: left to finish alone)."""
    results: dict[_T, _R | Exception] = {}
    lock = threading.Lock()

    def run(item: _T) -> None:
        outcome: _R | Exception
        try:
            outcome = work(item)
        except Exception as exc:  # never out of the thread: the caller judges it
            outcome = exc
        with lock:
            results[item] = outcome

    threads = [threading.Thread(target=run, args=(i,), name=name, daemon=True) for i in items]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    with lock:
        return {item: results.get(item) for item in items}


def _resolution(
    endpoints: list[tuple[str, int]], name: tuple[str, int] | None, problems: list[str]
) -> Resolution:
    unique: list[tuple[str, int]] = []
    for endpoint in endpoints:
        if endpoint not in unique:
            unique.append(endpoint)
    if not unique:
        raise UnresolvedError(f"no address for any host ({'; '.join(problems)})")
    authority = address(*name) if name is not None else None
    addresses = tuple(address(h, p) for h, p in unique)
    return Resolution(_address_list(unique), addresses, tuple(unique), authority)


def _srv(cs: ConnectionString, deadline: float) -> Resolution:
    from . import _srv  # noqa: PLC0415 - the optional extra, checked at construction

    service = cs.service_name
    assert service is not None
    timeout = max(0.05, deadline - time.monotonic())
    try:
        targets = _srv.lookup(service, cs.srv_name_server, timeout)
    except _srv.SrvLookupError as exc:
        raise UnresolvedError(str(exc)) from None
    endpoints = [(address, t.port) for t in targets for address in t.addresses]
    # The authority (the name TLS checks every kernel's certificate against) must not
    # follow the weighted shuffle: the first target by priority, then by name.
    stable = min(targets, key=lambda t: (t.priority, t.host, t.port), default=None)
    first = (stable.host, stable.port) if stable is not None else None
    found = _resolution(endpoints, first, [f"{t.host}: no address" for t in targets])
    return dataclasses.replace(found, servers=tuple((t.host, t.port) for t in targets))
