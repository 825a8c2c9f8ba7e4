"""SRV look-up for ``chronicle+srv://name``: the targets of ``_chronicle._tcp.<name>``.

:func:`lookup` queries the SRV records with dnspython (extra ``srv``), at the
``srvNameServer`` when one is given, else at the system resolver, and resolves each
target's addresses: at the same name server (from the additional section of the SRV
answer when it holds them, else with A and AAAA queries), or with
:func:`socket.getaddrinfo` when there is no name server. The targets come back in
RFC 2782 order: ascending priority, and within a priority the weighted random
selection (weight 0 first in the candidate list, still selectable).

dnspython is imported lazily, inside the functions: the package imports without it.
Every failure is a :class:`SrvLookupError` with a one-line message.
"""

# dnspython is the optional extra "srv": it is imported inside the functions that use it.
# ruff: noqa: PLC0415

from __future__ import annotations

import ipaddress
import math
import random
import socket
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from ._targets import lookup_many
from .errors import ChronicleConnError, ConfigurationError

if TYPE_CHECKING:
    import dns.name
    import dns.resolver

__all__ = ["SrvLookupError", "SrvTarget", "lookup", "require_dnspython"]

#: The SRV service and protocol labels queried in front of the service name.
SERVICE_PREFIX: Final = "_chronicle._tcp"

#: The port of a ``srvNameServer`` that gives none.
DNS_PORT: Final = 53

_EXTRA_HINT: Final = "pip install 'chronicle-conn[srv]'"
_FALLBACK_HINT: Final = "use chronicle://host:port"
_MIN_DNSPYTHON: Final = (2, 4)
_MAX_REASON: Final = 120

# System default for weighted selection: no state, so forked workers do not all make
# the same choices.
_SYSTEM_RNG: Final = random.SystemRandom()


@dataclass(frozen=True)
class SrvTarget:
    """One SRV record's target with its addresses."""

    host: str  # the SRV target name, without the trailing dot
    port: int
    priority: int
    weight: int
    addresses: tuple[str, ...]  # IP address strings (IPv4 and IPv6), in resolver order


class SrvLookupError(ChronicleConnError):
    """The SRV look-up failed: no such record, no answer, a name server that does not
    answer, the service declared unavailable (target ``.``), or targets without
    addresses. The message is one line.

    Attributes:
        name: the SRV name queried (``_chronicle._tcp.<service>``), without the final
            dot (None when not given).
        name_server: the ``srvNameServer`` as ``host:port``, or None for the system
            resolver.
    """

    def __init__(
        self, message: str, *, name: str | None = None, name_server: str | None = None
    ) -> None:
        super().__init__(message)
        self.name = name
        self.name_server = name_server


@dataclass(frozen=True)
class _Record:
    priority: int
    weight: int
    port: int
    target: str  # without the final dot; "." when the service is not available


class _Expired(Exception):
    """The look-up's deadline passed."""


def require_dnspython() -> None:
    """Check that dnspython (at least 2.4) can be imported.

    Raises:
        ConfigurationError: it is missing or too old; the message names the extra.
    """
    _import_dns()


def _import_dns() -> None:
    try:
        import dns.version
    except ImportError:
        pass
    else:
        found = (dns.version.MAJOR, dns.version.MINOR)
        if found >= _MIN_DNSPYTHON:
            return
        raise ConfigurationError(
            f"chronicle+srv:// needs dnspython>=2.4, found {dns.version.version}: "
            f"pip install -U 'chronicle-conn[srv]'"
        )
    # Raised outside the handler: the ImportError adds nothing to the message.
    raise ConfigurationError(f"chronicle+srv:// needs dnspython: {_EXTRA_HINT}")


def parse_name_server(value: str) -> tuple[str, int]:
    """Split a ``srvNameServer`` value into (host, port).

    Accepts ``host``, ``host:port``, ``[v6]``, ``[v6]:port`` and a bare IPv6 literal;
    the port defaults to :data:`DNS_PORT`. The host comes back without brackets.

    Raises:
        ConfigurationError: none of those forms (``option`` is ``"srvNameServer"``).
    """
    host, port_text = _split_name_server(value)
    if not host:
        raise _bad_name_server(value, "has no host")
    if ":" in host:
        try:
            host = ipaddress.IPv6Address(host).compressed
        except ValueError:
            raise _bad_name_server(value, "is not a valid IPv6 address") from None
    elif any(char.isspace() or char in "/[]@" for char in host):
        raise _bad_name_server(value, "is not a host name or address")
    if port_text is None:
        return host, DNS_PORT
    if not port_text.isascii() or not port_text.isdigit() or len(port_text) > 5:
        raise _bad_name_server(value, "has a port that is not a number")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise _bad_name_server(value, "has a port out of range 1..65535")
    return host, port


def _split_name_server(value: str) -> tuple[str, str | None]:
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            raise _bad_name_server(value, "has an unclosed '['")
        rest = value[end + 1 :]
        if rest and not rest.startswith(":"):
            raise _bad_name_server(value, "has text after ']'")
        host = value[1:end]
        if ":" not in host:
            raise _bad_name_server(value, "has brackets around something not IPv6")
        return host, rest[1:] if rest else None
    if value.count(":") > 1:  # a bare IPv6 literal
        return value, None
    host, colon, port_text = value.partition(":")
    return host, port_text if colon else None


def _bad_name_server(value: str, problem: str) -> ConfigurationError:
    return ConfigurationError(
        f"srvNameServer {value!r} {problem} (write host, host:port, [v6] or [v6]:port)",
        option="srvNameServer",
    )


def _show_server(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def lookup(
    service_name: str,
    name_server: str | None,
    timeout: float,
    *,
    rng: random.Random | None = None,
) -> list[SrvTarget]:
    """Look up ``_chronicle._tcp.<service_name>`` SRV and the addresses of its targets.

    Args:
        service_name: the service name of the ``chronicle+srv`` connection string.
        name_server: the ``srvNameServer`` (``host``, ``host:port``, ``[v6]``,
            ``[v6]:port`` or a bare IPv6 literal; port 53 by default; a host name is
            resolved with :func:`socket.getaddrinfo`), or None for the system resolver.
        timeout: seconds for the whole look-up, every query included.
        rng: the source of the weighted selection (default: :class:`random.SystemRandom`).

    Returns:
        The targets with at least one address, in RFC 2782 order.

    Raises:
        SrvLookupError: no SRV record (NXDOMAIN or no answer), no answer in time, a
            failing name server, the service declared unavailable (target ``.``), or no
            target with an address.
        ConfigurationError: dnspython is missing, or ``name_server`` or
            ``service_name`` is malformed.
        ValueError: ``timeout`` is not a positive finite number.
    """
    if not (timeout > 0 and math.isfinite(timeout)):
        raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
    deadline = time.monotonic() + timeout
    _import_dns()
    import dns.exception
    import dns.name
    import dns.resolver

    service = service_name.rstrip(".")
    shown_name = f"{SERVICE_PREFIX}.{service}"
    try:
        qname = dns.name.from_text(shown_name)
    except dns.exception.DNSException as exc:
        raise ConfigurationError(
            f"service name {service_name!r} is not a valid DNS name ({exc})", option="host"
        ) from None
    server = None if name_server is None else parse_name_server(name_server)
    where = "the system resolver" if server is None else _show_server(*server)
    shown_server = None if server is None else where

    def fail(message: str) -> SrvLookupError:
        return SrvLookupError(message, name=shown_name, name_server=shown_server)

    if server is None:
        try:
            resolver = dns.resolver.Resolver()  # configured from /etc/resolv.conf
        except dns.exception.DNSException as exc:
            raise fail(
                f"no system DNS configuration to look up SRV {shown_name} "
                f"({_one_line(str(exc))}): set srvNameServer=host:port or {_FALLBACK_HINT}"
            ) from exc
    else:
        host, port = server
        if _is_ip(host):
            addresses = [host]
        else:
            found = lookup_many([host], socket.SOCK_DGRAM, deadline)[host]
            if not isinstance(found, list) or not found:
                reason = "no answer in time" if found is None else found or "no IP address"
                raise fail(f"srvNameServer host {host!r} does not resolve: {reason}")
            addresses = found
        resolver = _resolver_for(addresses, port)

    try:
        answer = _resolve(resolver, qname, "SRV", deadline, raise_on_no_answer=True)
    except _Expired:
        raise fail(
            f"no answer for SRV {shown_name} from {where} within {timeout:g}s: "
            f"check the name server, or {_FALLBACK_HINT}"
        ) from None
    except dns.resolver.NXDOMAIN as exc:
        raise fail(
            f"no SRV record {shown_name} at {where}: set the record or {_FALLBACK_HINT}"
        ) from exc
    except dns.resolver.NoAnswer as exc:
        raise fail(
            f"no SRV record {shown_name} at {where} (the name exists, without SRV "
            f"records): set the record or {_FALLBACK_HINT}"
        ) from exc
    except dns.resolver.NoNameservers as exc:
        raise fail(
            f"SRV look-up of {shown_name} failed at {where} ({_failure_reason(exc)}): "
            f"check the name server, or {_FALLBACK_HINT}"
        ) from exc
    except dns.exception.DNSException as exc:
        raise fail(f"SRV look-up of {shown_name} failed at {where}: {_one_line(str(exc))}") from exc

    records = _records(answer)
    available = [record for record in records if record.target != "."]
    if not available:
        raise fail(
            f"SRV {shown_name} at {where} says the service is not available (target '.'): "
            f"{_FALLBACK_HINT}"
        )
    ordered = _order(available, rng if rng is not None else _SYSTEM_RNG)

    names = list(dict.fromkeys(record.target for record in ordered if not _is_ip(record.target)))
    unresolved: list[str] = []
    if server is None:
        addresses_of = _addresses_by_getaddrinfo(names, deadline)
    else:
        addresses_of = _addresses_from_additional(answer)
        missing = [name for name in names if name.lower() not in addresses_of]
        addresses_of.update(_addresses_by_query(resolver, missing, deadline))
    targets: list[SrvTarget] = []
    for record in ordered:
        found_addresses = (
            [record.target] if _is_ip(record.target) else addresses_of.get(record.target.lower())
        )
        if not found_addresses:
            if record.target not in unresolved:
                unresolved.append(record.target)
            continue
        targets.append(
            SrvTarget(
                host=record.target,
                port=record.port,
                priority=record.priority,
                weight=record.weight,
                addresses=tuple(found_addresses),
            )
        )
    if not targets:
        timed_out = time.monotonic() >= deadline
        raise fail(
            f"SRV {shown_name} at {where}: no address for target(s) {', '.join(unresolved)}"
            + (f" within {timeout:g}s" if timed_out else "")
        )
    return targets


def _order(records: Sequence[_Record], rng: random.Random) -> list[_Record]:
    """Order SRV records as RFC 2782 says: ascending priority; within a priority,
    repeatedly pick one at random with probability by weight (weight 0 records are
    placed first in the candidate list, where a draw of 0 selects them)."""
    by_priority: dict[int, list[_Record]] = {}
    for record in records:
        by_priority.setdefault(record.priority, []).append(record)
    ordered: list[_Record] = []
    for priority in sorted(by_priority):
        pending = list(by_priority[priority])
        rng.shuffle(pending)  # "in any order"
        pending.sort(key=lambda record: record.weight != 0)  # stable: weight 0 first
        while pending:
            pick = rng.randint(0, sum(record.weight for record in pending))
            running = 0
            chosen = len(pending) - 1
            for index, record in enumerate(pending):
                running += record.weight
                if running >= pick:
                    chosen = index
                    break
            ordered.append(pending.pop(chosen))
    return ordered


def _resolver_for(addresses: Sequence[str], port: int) -> dns.resolver.Resolver:
    import dns.nameserver
    import dns.resolver

    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [dns.nameserver.Do53Nameserver(address, port) for address in addresses]
    return resolver


def _resolve(
    resolver: dns.resolver.Resolver,
    qname: dns.name.Name,
    rdtype: str,
    deadline: float,
    *,
    raise_on_no_answer: bool,
) -> dns.resolver.Answer:
    """``resolver.resolve`` bounded by ``deadline``.

    Each call makes one round over the name servers (its lifetime one per-try timeout
    per server), repeated until the deadline: dnspython's own retry rounds pause for up
    to 2 s between rounds, and a pause can start just before the lifetime ends.

    Raises:
        _Expired: the deadline passed without an answer.
        dns.exception.DNSException: NXDOMAIN, NoAnswer, NoNameservers...
    """
    import dns.resolver

    per_round = max(resolver.timeout, 0.1) * max(1, len(resolver.nameservers))
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Expired
        try:
            return resolver.resolve(
                qname,
                rdtype,
                lifetime=min(remaining, per_round),
                search=False,
                raise_on_no_answer=raise_on_no_answer,
            )
        except dns.resolver.LifetimeTimeout:
            continue


def _records(answer: dns.resolver.Answer) -> list[_Record]:
    import dns.rdtypes.IN.SRV

    records: list[_Record] = []
    for rdata in answer.rrset or ():
        if isinstance(rdata, dns.rdtypes.IN.SRV.SRV):
            target = rdata.target.to_text(omit_final_dot=True)
            records.append(_Record(rdata.priority, rdata.weight, rdata.port, target or "."))
    return records


def _addresses_from_additional(answer: dns.resolver.Answer) -> dict[str, list[str]]:
    """A and AAAA records of the SRV answer's additional section, by lower-case name."""
    import dns.rdtypes.IN.A
    import dns.rdtypes.IN.AAAA

    found: dict[str, list[str]] = {}
    for rrset in answer.response.additional:
        for rdata in rrset:
            if isinstance(rdata, dns.rdtypes.IN.A.A | dns.rdtypes.IN.AAAA.AAAA):
                name = rrset.name.to_text(omit_final_dot=True).lower()
                _add(found.setdefault(name, []), [rdata.address])
    return found


def _addresses_by_query(
    resolver: dns.resolver.Resolver, names: Iterable[str], deadline: float
) -> dict[str, list[str]]:
    """A then AAAA addresses of each name, asked at ``resolver``'s name servers, until
    the deadline; names with no address (NXDOMAIN, no record, a failing server) are left
    out."""
    import dns.exception
    import dns.name
    import dns.rdtypes.IN.A
    import dns.rdtypes.IN.AAAA
    import dns.resolver

    found: dict[str, list[str]] = {}
    for name in names:
        addresses: list[str] = []
        for rdtype in ("A", "AAAA"):
            try:
                answer = _resolve(
                    resolver, dns.name.from_text(name), rdtype, deadline, raise_on_no_answer=False
                )
            except _Expired:
                return found
            except dns.resolver.NXDOMAIN:
                break  # no such name: no AAAA either
            except dns.exception.DNSException:
                continue
            _add(
                addresses,
                [
                    rdata.address
                    for rdata in answer.rrset or ()
                    if isinstance(rdata, dns.rdtypes.IN.A.A | dns.rdtypes.IN.AAAA.AAAA)
                ],
            )
        if addresses:
            found[name.lower()] = addresses
    return found


def _addresses_by_getaddrinfo(names: Sequence[str], deadline: float) -> dict[str, list[str]]:
    found = lookup_many(names, socket.SOCK_STREAM, deadline)
    return {
        name.lower(): addresses
        for name, addresses in found.items()
        if isinstance(addresses, list) and addresses
    }


def _add(into: list[str], addresses: Iterable[str]) -> None:
    for address in addresses:
        if address not in into:
            into.append(address)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _failure_reason(exc: Exception) -> str:
    """What the last name server said, from a ``NoNameservers``' error list."""
    errors = getattr(exc, "kwargs", {}).get("errors") or []
    if not errors:
        return "no usable name server"
    problem = errors[-1][3]  # an rcode's text, or the exception of a failed query
    if isinstance(problem, Exception):
        return _one_line(f"{type(problem).__name__}: {problem}".rstrip(": "))
    return _one_line(f"it answered {problem}")


def _one_line(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MAX_REASON else text[: _MAX_REASON - 3] + "..."
