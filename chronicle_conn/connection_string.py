"""Connection strings: ``chronicle://`` and ``chronicle+srv://`` URLs as frozen values.

::

    chronicle://[client_id[:secret]@]host[:port][,host[:port]...][/][?key=value&...]
    chronicle+srv://[client_id[:secret]@]service-name[/][?key=value&...]

:class:`ConnectionString` is an immutable, hashable value. It is validated whenever it
is built (by :meth:`ConnectionString.parse`, by direct construction and by
:func:`dataclasses.replace`), and every problem is reported as a
:class:`~chronicle_conn.errors.ConnectionStringError` whose message names the
offending part, says what to change, fits on one line and never contains the client
secret, the API key or the certificate password.

Parsing rules the grammar above leaves open:

* The scheme is matched case-insensitively; host names are lower-cased and IPv6
  literals are stored compressed (``[0:0::1]`` becomes ``::1``), without brackets.
* Ports are 1 to 5 ASCII digits in 1..65535; a missing port means
  :data:`DEFAULT_PORT`. A ``chronicle+srv`` service name takes no port; its single
  :class:`Endpoint` carries :data:`DEFAULT_PORT` as a placeholder (see
  :attr:`ConnectionString.service_name`).
* The same ``host:port`` listed twice is an error.
* User info and query keys and values are percent-decoded strictly: a ``%`` not
  followed by two hex digits, or bytes that are not UTF-8, are errors. ``+`` is a
  literal plus sign, not a space (API keys and paths contain ``+``).
* Raw whitespace, control characters and ``#`` are rejected anywhere in the text;
  decoded values may contain spaces but no control characters.
* An empty query (``host/?``) is allowed; an empty parameter (a stray ``&``), a key
  without ``=`` and an empty value are errors for every key.
* ``srvNameServer`` is only accepted with ``chronicle+srv``.
* Strings longer than :data:`MAX_LENGTH` characters are rejected before parsing, and
  so is any value whose full rendering would be longer (explicit ports and
  percent-encoding can make it longer than the text parsed), so that
  ``parse(value.render_as_string(hide_secrets=False)) == value`` always holds.
* A secret whose raw ``/``, ``?`` or ``:`` (or a forgotten ``@``) moves it into the
  host list or the query is still never quoted: non-numeric ports and malformed host
  entries are not echoed, and any error in a string with an ``@`` after the host list
  gets a message that quotes nothing. Errors are raised outside ``except`` blocks
  where the caught exception's text could quote a secret (no ``__context__``).

The canonical form has no trailing ``/``, explicit ports (except for a service
name), percent-encoded user info, and only the non-default query options, with keys
in their documented spelling, sorted. ``str()``, ``repr()`` and
:meth:`ConnectionString.redacted` show it with the client secret, ``apiKey`` and
``certificatePassword`` replaced by ``***`` (as SQLAlchemy 2.0 does for ``str(URL)``),
so that a connection string in an f-string or a log line gives nothing away;
:meth:`ConnectionString.render_as_string` with ``hide_secrets=False`` is the one way to
get the secrets back, for a round trip.

Every :class:`~chronicle_conn.errors.ConnectionStringError` has an ``option`` naming
what is at fault, from a fixed vocabulary:

* a query key in its documented spelling (one of :data:`QUERY_KEYS`, e.g.
  ``"disableTls"``, ``"caPath"``, ``"authPort"``) when the fault is in that key's value,
  the key is repeated or has no value, or the key contradicts another option (then
  ``option`` names the key to remove or change);
* ``"scheme"``: a missing or unknown scheme;
* ``"userinfo"``: the client id or client secret (before the ``@``);
* ``"host"``: the host list, a host or the ``chronicle+srv`` service name (also the
  ``hosts`` field and :class:`Endpoint` ``host``);
* ``"port"``: the port of a host (also :class:`Endpoint` ``port``);
* ``"query"``: the query's syntax: a stray ``&``, a malformed escape in a key, or an
  unknown key (the message quotes the key as written; ``option`` stays ``"query"`` so
  that it never collides with a part's name and never echoes text that may be a
  misplaced secret);
* ``"connection_string"``: the string as a whole: too long (as given or as rendered),
  whitespace, a control character or ``#`` anywhere, or a path after the hosts.

(:meth:`ConnectionString.parse` raises :class:`TypeError`, not a
``ConnectionStringError``, for an argument that is not a str.)
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import re
from dataclasses import KW_ONLY, dataclass
from typing import Any, Final
from urllib.parse import quote, unquote

from .errors import ConnectionStringError

__all__ = [
    "DEFAULT_LOAD_BALANCER",
    "DEFAULT_PORT",
    "DEVELOPMENT_CLIENT_ID",
    "DEVELOPMENT_CLIENT_SECRET",
    "LOAD_BALANCERS",
    "MAX_LENGTH",
    "QUERY_KEYS",
    "SCHEME",
    "SRV_SCHEME",
    "AuthenticationMode",
    "ConnectionString",
    "Endpoint",
]

DEFAULT_PORT: Final = 35000
"""The kernel's port, used when a host gives none."""

MAX_LENGTH: Final = 64 * 1024
"""Longest connection string :meth:`ConnectionString.parse` accepts, in characters."""

SCHEME: Final = "chronicle"
SRV_SCHEME: Final = "chronicle+srv"

DEVELOPMENT_CLIENT_ID: Final = "chronicle-dev-client"
DEVELOPMENT_CLIENT_SECRET: Final = "chronicle-dev-secret"

DEFAULT_LOAD_BALANCER: Final = "pick-first"
LOAD_BALANCERS: Final = ("pick-first", "round-robin")

_KEY_TO_FIELD: Final[dict[str, str]] = {
    "apiKey": "api_key",
    "auth": "auth",
    "authPort": "auth_port",
    "caPath": "ca_path",
    "certificatePassword": "certificate_password",
    "certificatePath": "certificate_path",
    "disableTls": "disable_tls",
    "keyPath": "key_path",
    "loadBalancer": "load_balancer",
    "skipTlsValidation": "skip_tls_validation",
    "srvNameServer": "srv_name_server",
}

QUERY_KEYS: Final = tuple(sorted(_KEY_TO_FIELD))
"""Every query key, in its documented spelling, sorted."""

_KEYS_BY_LOWER: Final = {key.lower(): key for key in QUERY_KEYS}
_SECRET_KEYS: Final = frozenset({"apiKey", "certificatePassword"})
_BOOL_KEYS: Final = frozenset({"disableTls", "skipTlsValidation"})
# Options that only make sense with TLS on; each contradicts disableTls=true.
_TLS_ONLY_KEYS: Final = ("caPath", "certificatePassword", "certificatePath", "keyPath")

# Patterns, compiled (and cached by re) on first use rather than at import.
_SCHEME_RE: Final = r"([A-Za-z][A-Za-z0-9+.-]*)://"
# Whitespace (Unicode), C0/C1 controls, DEL and lone surrogates.
_BAD_RAW_CHAR_RE: Final = r"[\s\x00-\x1f\x7f-\x9f\ud800-\udfff]"
_CONTROL_RE: Final = r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]"
_BAD_ESCAPE_RE: Final = r"%(?![0-9A-Fa-f]{2})"
_LABEL_RE: Final = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_DIGITS: Final = frozenset("0123456789")
_IPV6_CHARS: Final = frozenset("0123456789abcdefABCDEF:.")
_MAX_HOSTNAME: Final = 253
_MAX_SHOWN: Final = 60
_REDACTED: Final = "***"
# Characters left unescaped in query values of the canonical form, for readable paths.
# '@' stays escaped so that an '@' after the hosts always signals a malformed user info.
_QUERY_SAFE: Final = "/:"


class AuthenticationMode(str, enum.Enum):
    """How a connection authenticates, as given by :attr:`ConnectionString.authentication_mode`."""

    NONE = "none"
    API_KEY = "api_key"
    CLIENT_CREDENTIALS = "client_credentials"

    def __str__(self) -> str:
        # The value, the same on every Python (str-mixin enums format differently in 3.12).
        return str(self.value)


def _show(text: str) -> str:
    """Quote a (non-secret) part for an error message, shortened if long."""
    if len(text) > _MAX_SHOWN:
        text = text[:_MAX_SHOWN] + "..."
    return repr(text)


def _error(message: str, option: str) -> ConnectionStringError:
    """Build the error; ``option`` is a query key or a part (see the module docstring)."""
    return ConnectionStringError(message, option=option)


def _hostname_problem(host: str) -> str | None:
    """Say why ``host`` is neither a DNS name nor an IPv4 address, or return None."""
    if not host:
        return "is empty"
    if len(host) > _MAX_HOSTNAME:
        return f"is longer than {_MAX_HOSTNAME} characters"
    labels = host.split(".")
    for label in labels:
        if not label:
            return "has an empty label (stray '.')"
        if re.fullmatch(_LABEL_RE, label) is None:
            return (
                "is not a valid host name (letters, digits, '-', '_' and '.' only; labels "
                "of at most 63 characters that neither start nor end with '-')"
            )
    # An all-digit last label only makes sense in a dotted-quad IPv4 address.
    if labels[-1].isdigit():
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return "is neither a host name nor a valid IPv4 address"
    return None


def _normalize_host(host: str) -> str:
    """Validate a host (DNS name, IPv4 or bare IPv6 literal) and return its canonical form.

    Raises:
        ConnectionStringError: the host is invalid.
    """
    if ":" in host:
        if "%" in host:
            raise _error(
                f"IPv6 zone identifiers are not supported (host {_show(host)}); remove the '%...'",
                "host",
            )
        try:
            return ipaddress.IPv6Address(host).compressed
        except ValueError:
            pass
        # Raised outside the handler: ipaddress's message (the __context__) quotes the
        # text, which may be a misplaced 'client_id:secret'. Echoed only if it looks
        # like an address for the same reason.
        shown = f"host {_show(host)}" if _IPV6_CHARS.issuperset(host) else "a host"
        raise _error(f"{shown} is not a valid IPv6 address", "host")
    problem = _hostname_problem(host)
    if problem is not None:
        raise _error(f"host {_show(host)} {problem}", "host")
    return host.lower()


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _check_port(port: object, host: str) -> int:
    option = "port"
    if isinstance(port, bool) or not isinstance(port, int):
        raise _error(
            f"port of host {_show(host)} must be an int, not {type(port).__name__}", option
        )
    if not 1 <= port <= 65535:
        raise _error(f"port '{port}' of host {_show(host)} is out of range 1..65535", option)
    return port


def _parse_port(text: str, host: str, option: str = "port") -> int:
    """Turn the text after ``host:`` into a port number.

    Raises:
        ConnectionStringError: the port is empty, not ASCII digits, or out of range.
    """
    if not text:
        raise _error(f"empty port after ':' of host {_show(host)}", option)
    if not _DIGITS.issuperset(text):
        # Not echoed: a misplaced ':' in the user info puts part of the secret here.
        raise _error(f"the port of host {_show(host)} is not a number", option)
    # Bound the digit count before int(): huge numbers are simply out of range.
    if len(text) > 5 or not 1 <= int(text) <= 65535:
        raise _error(f"port {_show(text)} of host {_show(host)} is out of range 1..65535", option)
    return int(text)


def _split_host_port(
    text: str, where: str = "the host list", option: str = "host"
) -> tuple[str, str | None]:
    """Split ``host``, ``host:port``, ``[v6]`` or ``[v6]:port`` into (host, port text).

    The host comes back without brackets; the port text is None when there is no
    ``:``. Neither part is validated here beyond the bracket syntax. Messages name
    ``where`` rather than quote ``text``: when the user info holds a raw ``?`` or
    ``/``, the "host" is really ``client_id:secret``.

    Raises:
        ConnectionStringError: brackets are unbalanced or misplaced, or an IPv6
            address is not in brackets.
    """
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise _error(f"unclosed '[' in {where}", option)
        host, rest = text[1:end], text[end + 1 :]
        if ":" not in host:
            raise _error(
                f"only IPv6 addresses go in brackets, not {_show(host)} (in {where})", option
            )
        if not rest:
            return host, None
        if rest.startswith(":"):
            return host, rest[1:]
        raise _error(f"unexpected text after ']' in {where}", option)
    if "[" in text or "]" in text:
        raise _error(f"misplaced '[' or ']' in {where}", option)
    colons = text.count(":")
    if colons == 0:
        return text, None
    if colons == 1:
        host, _, port = text.partition(":")
        if not host:
            raise _error(f"a port without a host name before it in {where}", option)
        return host, port
    # Only echoed when it is an IPv6 address: otherwise it may hold a misplaced secret.
    shown = f" {_show(text)}" if _is_ip_literal(text) else ""
    raise _error(
        f"a host{shown} in {where} has several ':'; write IPv6 addresses in brackets, "
        "e.g. '[::1]:35000'",
        option,
    )


def _check_name_server(value: str) -> None:
    """Validate ``srvNameServer``: host, host:port, [v6], [v6]:port or a bare IPv6 literal.

    Raises:
        ConnectionStringError: the value is none of those.
    """
    option = "srvNameServer"
    try:
        if not value.startswith("[") and value.count(":") > 1:
            _normalize_host(value)
            return
        host, port_text = _split_host_port(value, "the value", option)
        port = DEFAULT_PORT if port_text is None else _parse_port(port_text, host, option)
        Endpoint(host, port)
    except ConnectionStringError as exc:
        raise _error(f"query key 'srvNameServer': {exc}", option) from exc


def _decode(raw: str, what: str, *, show: bool, option: str) -> str:
    """Percent-decode ``raw`` strictly; ``what`` names it in errors.

    Args:
        raw: the encoded text.
        what: the part's description for error messages.
        show: whether the error message may quote ``raw`` (False for secrets).
        option: the error's ``option``.

    Raises:
        ConnectionStringError: a malformed escape, or bytes that are not UTF-8.
    """
    shown = f" ({_show(raw)})" if show else ""
    if re.search(_BAD_ESCAPE_RE, raw) is not None:
        raise _error(f"{what}{shown} has a '%' not followed by two hex digits", option)
    try:
        return unquote(raw, errors="strict")
    except UnicodeDecodeError:
        pass
    # Raised outside the handler: the codec's message (the __context__) quotes the bytes.
    raise _error(f"{what}{shown} is not valid UTF-8 once percent-decoded", option)


def _check_text(value: object, what: str, *, secret: bool, option: str) -> None:
    """Check an optional text field: None, or a non-empty str without control characters."""
    if value is None:
        return
    if not isinstance(value, str):
        raise _error(f"{what} must be a str or None, not {type(value).__name__}", option)
    if not value:
        raise _error(f"{what} must not be empty", option)
    match = re.search(_CONTROL_RE, value)
    if match is not None:
        where = "" if secret else f" (at index {match.start()} of {_show(value)})"
        raise _error(f"{what} contains a control character{where}", option)


def _check_bool(value: object, key: str) -> None:
    if not isinstance(value, bool):
        raise _error(f"{key} must be a bool, not {type(value).__name__}", key)


def _choice(value: object, key: str, choices: tuple[str, ...]) -> str:
    """Normalize a case-insensitive enumerated option, or raise naming the valid values."""
    if isinstance(value, str) and value.lower() in choices:
        return value.lower()
    shown = _show(value) if isinstance(value, str) else type(value).__name__
    valid = ", ".join(repr(choice) for choice in choices)
    raise _error(f"{key} must be one of {valid}, not {shown}", key)


@dataclass(frozen=True)
class Endpoint:
    """One ``host:port`` of a connection string.

    ``host`` is a lower-cased DNS name, an IPv4 address or a compressed IPv6 address
    without brackets. Validated (and normalized) on construction.

    Raises:
        ConnectionStringError: the host or port is invalid.
    """

    host: str
    port: int = DEFAULT_PORT

    def __post_init__(self) -> None:
        host: object = self.host
        if not isinstance(host, str):
            raise _error(f"host must be a str, not {type(host).__name__}", "host")
        if host.startswith("[") and host.endswith("]"):
            raise _error(f"host {_show(host)}: give IPv6 addresses without brackets", "host")
        object.__setattr__(self, "host", _normalize_host(host))
        _check_port(self.port, self.host)

    @property
    def is_ipv6(self) -> bool:
        """Whether the host is an IPv6 address."""
        return ":" in self.host

    def __str__(self) -> str:
        """``host:port``, or ``[v6]:port`` for an IPv6 address."""
        if self.is_ipv6:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, repr=False)
class ConnectionString:
    """A parsed, validated connection string. Immutable, hashable and thread-safe.

    Build one with :meth:`parse`, :meth:`default` or :meth:`development`, or directly
    (the options after ``hosts`` are keyword-only); vary it with
    :func:`dataclasses.replace`, :meth:`with_credentials` or :meth:`with_api_key`.
    Every way of building one validates it.

    ``str()``, ``repr()`` and :meth:`redacted` show the secrets (client secret, ``apiKey``,
    ``certificatePassword``) as ``***``; :meth:`render_as_string` with
    ``hide_secrets=False`` is the only rendering that includes them.

    For ``chronicle+srv``, ``hosts`` holds exactly one :class:`Endpoint` whose host is
    the service name and whose port is :data:`DEFAULT_PORT` (a placeholder: the real
    targets come from the SRV records); :attr:`service_name` returns the name.

    Attributes:
        scheme: ``"chronicle"`` or ``"chronicle+srv"``.
        hosts: the endpoints, in the order given.
        client_id: OAuth client id, or None.
        client_secret: OAuth client secret, or None (secret; needs ``client_id``).
        disable_tls: ``disableTls``; True for plaintext.
        skip_tls_validation: ``skipTlsValidation``.
        ca_path: ``caPath``.
        certificate_path: ``certificatePath``.
        key_path: ``keyPath`` (needs ``certificate_path``).
        certificate_password: ``certificatePassword`` (secret; needs ``certificate_path``).
        api_key: ``apiKey`` (secret).
        auth_port: ``authPort``, the OAuth token endpoint's port, or None.
        auth: ``auth``; ``"none"`` or None.
        load_balancer: ``loadBalancer``; ``"pick-first"`` or ``"round-robin"``.
        srv_name_server: ``srvNameServer`` (``chronicle+srv`` only), or None.

    Raises:
        ConnectionStringError: on construction, when any field is invalid or two
            fields contradict each other. Messages use the query-key spelling, and
            ``option`` is the query key or the part at fault (see the module docstring).
    """

    scheme: str = SCHEME
    hosts: tuple[Endpoint, ...] = (Endpoint("localhost", DEFAULT_PORT),)
    _: KW_ONLY
    client_id: str | None = None
    client_secret: str | None = None
    disable_tls: bool = False
    skip_tls_validation: bool = False
    ca_path: str | None = None
    certificate_path: str | None = None
    key_path: str | None = None
    certificate_password: str | None = None
    api_key: str | None = None
    auth_port: int | None = None
    auth: str | None = None
    load_balancer: str = DEFAULT_LOAD_BALANCER
    srv_name_server: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "scheme", _choice(self.scheme, "scheme", (SCHEME, SRV_SCHEME)))
        self._check_hosts()
        self._check_credentials()
        _check_bool(self.disable_tls, "disableTls")
        _check_bool(self.skip_tls_validation, "skipTlsValidation")
        for key in ("caPath", "certificatePath", "keyPath", "certificatePassword", "apiKey"):
            value = getattr(self, _KEY_TO_FIELD[key])
            _check_text(value, key, secret=key in _SECRET_KEYS, option=key)
        port: object = self.auth_port
        if port is not None and (
            isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535
        ):
            raise _error(f"authPort must be an int in 1..65535, not {port!r}", "authPort")
        if self.auth is not None:
            object.__setattr__(self, "auth", _choice(self.auth, "auth", ("none",)))
        balancer = _choice(self.load_balancer, "loadBalancer", LOAD_BALANCERS)
        object.__setattr__(self, "load_balancer", balancer)
        self._check_name_server()
        self._check_tls_options()
        self._check_authentication()
        # So that every valid value round-trips through its full rendering.
        length = len(self.render_as_string(hide_secrets=False))
        if length > MAX_LENGTH:
            raise _error(
                f"the canonical form would be {length} characters long; the limit is "
                f"{MAX_LENGTH} (use fewer hosts or shorter values)",
                "connection_string",
            )

    def _check_hosts(self) -> None:
        hosts: object = self.hosts
        if not isinstance(hosts, tuple) or not hosts:
            raise _error("hosts must be a non-empty tuple of Endpoint", "host")
        seen: set[Endpoint] = set()
        for endpoint in hosts:
            if not isinstance(endpoint, Endpoint):
                raise _error(
                    f"hosts must hold Endpoint values, not {type(endpoint).__name__}", "host"
                )
            if endpoint in seen:
                raise _error(f"host '{endpoint}' is listed more than once; remove one", "host")
            seen.add(endpoint)
        if self.scheme == SRV_SCHEME:
            if len(hosts) != 1:
                raise _error(
                    f"{SRV_SCHEME} takes exactly one service name, not {len(hosts)}", "host"
                )
            (endpoint,) = hosts
            if _is_ip_literal(endpoint.host):
                raise _error(
                    f"{SRV_SCHEME} needs a DNS service name, not the address "
                    f"{_show(endpoint.host)} (use {SCHEME}:// for addresses)",
                    "host",
                )
            if endpoint.port != DEFAULT_PORT:
                raise _error(
                    f"port '{endpoint.port}' is not allowed: {SRV_SCHEME} takes a bare "
                    f"service name ({_show(endpoint.host)})",
                    "port",
                )

    def _check_credentials(self) -> None:
        _check_text(self.client_id, "client id", secret=False, option="userinfo")
        _check_text(self.client_secret, "client secret", secret=True, option="userinfo")
        if self.client_secret is not None and self.client_id is None:
            raise _error(
                "a client secret was given without a client id (write client_id:secret@)",
                "userinfo",
            )

    def _check_name_server(self) -> None:
        _check_text(self.srv_name_server, "srvNameServer", secret=False, option="srvNameServer")
        if self.srv_name_server is None:
            return
        if self.scheme != SRV_SCHEME:
            raise _error(f"srvNameServer only applies to {SRV_SCHEME}://", "srvNameServer")
        _check_name_server(self.srv_name_server)

    def _check_tls_options(self) -> None:
        if self.key_path is not None and self.certificate_path is None:
            raise _error("keyPath requires certificatePath", "keyPath")
        if self.certificate_password is not None and self.certificate_path is None:
            raise _error("certificatePassword requires certificatePath", "certificatePassword")
        if not self.disable_tls:
            return
        if self.skip_tls_validation:
            raise _error(
                "disableTls=true contradicts skipTlsValidation=true (no TLS, nothing to skip)",
                "skipTlsValidation",
            )
        for key in _TLS_ONLY_KEYS:
            if getattr(self, _KEY_TO_FIELD[key]) is not None:
                raise _error(f"disableTls=true contradicts {key} (a TLS option)", key)

    def _check_authentication(self) -> None:
        has_credentials = self.client_id is not None
        if self.auth == "none":
            if has_credentials:
                raise _error("auth=none contradicts the client credentials", "auth")
            if self.api_key is not None:
                raise _error("auth=none contradicts apiKey", "auth")
        if has_credentials and self.api_key is not None:
            raise _error("client credentials and apiKey were both given; use one of them", "apiKey")

    @classmethod
    def parse(cls, text: str) -> ConnectionString:
        """Parse a ``chronicle://`` or ``chronicle+srv://`` connection string.

        Args:
            text: the connection string, at most :data:`MAX_LENGTH` characters.

        Returns:
            The validated value.

        Raises:
            TypeError: ``text`` is not a str.
            ConnectionStringError: for any str that is not a valid connection string;
                the message names the offending part and contains no secret, and
                ``option`` is the query key or the part at fault (see the module
                docstring).
        """
        if not isinstance(text, str):
            raise TypeError(f"a connection string must be a str, not {type(text).__name__}")
        if len(text) > MAX_LENGTH:
            raise _error(
                f"connection string is {len(text)} characters long; the limit is {MAX_LENGTH}",
                "connection_string",
            )
        bad = re.search(_BAD_RAW_CHAR_RE, text)
        if bad is not None:
            raise _error(
                f"connection string contains whitespace or a control character at index "
                f"{bad.start()} (percent-encode it)",
                "connection_string",
            )
        if "#" in text:
            raise _error(
                "connection string contains '#' (percent-encode it as %23)", "connection_string"
            )
        match = re.match(_SCHEME_RE, text)
        if match is None:
            raise _error(
                f"missing scheme: a connection string starts with '{SCHEME}://' "
                f"or '{SRV_SCHEME}://'",
                "scheme",
            )
        scheme = match.group(1).lower()
        if scheme not in (SCHEME, SRV_SCHEME):
            raise _error(
                f"unknown scheme {_show(match.group(1))}; expected '{SCHEME}' or '{SRV_SCHEME}'",
                "scheme",
            )
        rest = text[match.end() :]
        # The authority runs to the first '/' or '?'.
        end = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
        authority, tail = rest[:end], rest[end:]
        tail = tail.removeprefix("/")
        if tail and not tail.startswith("?"):
            raise _error(
                "unexpected path after the hosts: only a single '/' may follow them",
                "connection_string",
            )
        userinfo, at, hostlist = authority.rpartition("@")
        if "@" in userinfo:
            raise _error("the user info contains '@'; percent-encode it as %40", "userinfo")
        client_id, client_secret = _parse_userinfo(userinfo) if at else (None, None)
        try:
            hosts = _parse_hosts(hostlist, srv=scheme == SRV_SCHEME)
            options = _parse_query(tail[1:])
            return cls(scheme, hosts, client_id=client_id, client_secret=client_secret, **options)
        except ConnectionStringError as exc:
            if "@" not in tail:
                raise
            # Every error raised here names a query key or a part, never quoted text.
            option = exc.option or "connection_string"
        # An '@' after the hosts most likely ends a user info whose raw '/' or '?' cut it
        # short, so the host list and the query may hold pieces of the secret: quote
        # nothing, and raise outside the handler so that no __context__ quotes it either.
        raise _error(
            "invalid connection string, and it has an '@' after the host list: "
            "percent-encode any '/', '?' or '@' in the user info and query values",
            option,
        )

    @classmethod
    def default(cls) -> ConnectionString:
        """Return ``chronicle://localhost:35000``: a local kernel, TLS on, no credentials."""
        return cls(SCHEME, (Endpoint("localhost", DEFAULT_PORT),))

    @classmethod
    def development(cls) -> ConnectionString:
        """Return :meth:`default` with the kernel's development client credentials and
        ``skipTlsValidation=true`` (a development kernel serves a self-signed
        certificate), as ``chronicle-conn dev-server --auth --tls`` expects."""
        return dataclasses.replace(
            cls.default().with_credentials(DEVELOPMENT_CLIENT_ID, DEVELOPMENT_CLIENT_SECRET),
            skip_tls_validation=True,
        )

    def with_credentials(self, client_id: str, secret: str | None = None) -> ConnectionString:
        """Return a copy with these client credentials (replacing any).

        Args:
            client_id: the OAuth client id.
            secret: the client secret, or None.

        Returns:
            The new value.

        Raises:
            ConnectionStringError: the credentials are invalid or contradict ``apiKey``
                or ``auth=none`` (which are kept, not dropped).
        """
        return dataclasses.replace(self, client_id=client_id, client_secret=secret)

    def with_api_key(self, api_key: str) -> ConnectionString:
        """Return a copy with this ``apiKey`` (replacing any).

        Args:
            api_key: the key.

        Returns:
            The new value.

        Raises:
            ConnectionStringError: the key is invalid or contradicts client credentials
                or ``auth=none`` (which are kept, not dropped).
        """
        return dataclasses.replace(self, api_key=api_key)

    @property
    def is_srv(self) -> bool:
        """Whether this is a ``chronicle+srv`` connection string."""
        return self.scheme == SRV_SCHEME

    @property
    def service_name(self) -> str | None:
        """The SRV service name for ``chronicle+srv``, else None."""
        return self.hosts[0].host if self.is_srv else None

    @property
    def tls_enabled(self) -> bool:
        """Whether the channel uses TLS (``not disable_tls``)."""
        return not self.disable_tls

    @property
    def authentication_mode(self) -> AuthenticationMode:
        """How the connection authenticates.

        ``auth=none`` gives NONE; a client id gives CLIENT_CREDENTIALS; an ``apiKey``
        gives API_KEY; nothing gives NONE. (Contradictions are rejected on
        construction.)
        """
        if self.auth == "none":
            return AuthenticationMode.NONE
        if self.client_id is not None:
            return AuthenticationMode.CLIENT_CREDENTIALS
        if self.api_key is not None:
            return AuthenticationMode.API_KEY
        return AuthenticationMode.NONE

    def render_as_string(self, *, hide_secrets: bool = True) -> str:
        """Return the canonical form, with or without the secrets.

        Non-blocking and thread-safe (the value is immutable).

        Args:
            hide_secrets: True (the default) shows the client secret, ``apiKey`` and
                ``certificatePassword`` as ``***``, as ``str()`` does. False writes them,
                percent-encoded, so that ``parse(cs.render_as_string(hide_secrets=False))
                == cs``: use it only where the secrets must go (never in a log line).

        Returns:
            The canonical connection string: no trailing ``/``, explicit ports (except
            for a service name), percent-encoded user info and only the non-default
            query options, keys in their documented spelling, sorted.
        """
        parts = [self.scheme, "://"]
        if self.client_id is not None:
            parts.append(quote(self.client_id, safe=""))
            if self.client_secret is not None:
                secret = _REDACTED if hide_secrets else quote(self.client_secret, safe="")
                parts += [":", secret]
            parts.append("@")
        if self.is_srv:
            parts.append(self.hosts[0].host)
        else:
            parts.append(",".join(str(endpoint) for endpoint in self.hosts))
        query: list[str] = []
        for key in QUERY_KEYS:
            value: object = getattr(self, _KEY_TO_FIELD[key])
            if value is None or value is False:
                continue
            if key == "loadBalancer" and value == DEFAULT_LOAD_BALANCER:
                continue
            if value is True:
                text = "true"
            elif hide_secrets and key in _SECRET_KEYS:
                text = _REDACTED
            else:
                text = quote(str(value), safe=_QUERY_SAFE)
            query.append(f"{key}={text}")
        if query:
            parts += ["?", "&".join(query)]
        return "".join(parts)

    def redacted(self) -> str:
        """Return :meth:`render_as_string` with the secrets shown as ``***`` (as ``str()``)."""
        return self.render_as_string()

    def __str__(self) -> str:
        """Return the canonical form with the secrets shown as ``***``.

        Safe for f-strings and log lines. It parses back with ``***`` as each secret:
        use :meth:`render_as_string` with ``hide_secrets=False`` for a round trip.
        """
        return self.render_as_string()

    def __repr__(self) -> str:
        return f"ConnectionString({self.render_as_string()!r})"


def _parse_userinfo(userinfo: str) -> tuple[str, str | None]:
    """Split and decode ``client_id[:secret]`` (the text before ``@``).

    Raises:
        ConnectionStringError: an empty part, or a malformed escape.
    """
    raw_id, colon, raw_secret = userinfo.partition(":")
    if not raw_id:
        if colon:
            raise _error(
                "a client secret was given without a client id (write client_id:secret@)",
                "userinfo",
            )
        raise _error("empty client id before '@' (write client_id@ or drop the '@')", "userinfo")
    client_id = _decode(raw_id, "the client id", show=False, option="userinfo")
    if not colon:
        return client_id, None
    if not raw_secret:
        raise _error(
            "empty client secret after ':' in the user info (give a secret or drop the ':')",
            "userinfo",
        )
    return client_id, _decode(raw_secret, "the client secret", show=False, option="userinfo")


def _parse_hosts(hostlist: str, *, srv: bool) -> tuple[Endpoint, ...]:
    """Parse the comma-separated host list (or the single SRV service name).

    Raises:
        ConnectionStringError: an empty or malformed host, a bad port, or for SRV more
            than one name or a port.
    """
    if not hostlist:
        example = (
            f"{SRV_SCHEME}://service.example" if srv else f"{SCHEME}://localhost:{DEFAULT_PORT}"
        )
        raise _error(f"no host given (e.g. '{example}')", "host")
    segments = hostlist.split(",")
    if srv and len(segments) > 1:
        raise _error(f"{SRV_SCHEME} takes exactly one service name, not a list of hosts", "host")
    endpoints: list[Endpoint] = []
    for segment in segments:
        if not segment:
            raise _error("empty host in the host list (stray ',')", "host")
        host, port_text = _split_host_port(segment)
        if srv:
            if port_text is not None:
                shown = f" {_show(port_text)}" if _DIGITS.issuperset(port_text) else ""
                raise _error(
                    f"a port{shown} is not allowed: {SRV_SCHEME} takes a bare "
                    f"service name ({_show(host)})",
                    "port",
                )
            endpoints.append(Endpoint(host))
        else:
            port = DEFAULT_PORT if port_text is None else _parse_port(port_text, host)
            endpoints.append(Endpoint(host, port))
    return tuple(endpoints)


def _parse_query(query: str) -> dict[str, Any]:
    """Parse ``key=value&...`` into ConnectionString keyword arguments.

    Raises:
        ConnectionStringError: an empty parameter, an unknown or repeated key, a missing
            or empty value, a malformed escape, or a value of the wrong kind.
    """
    options: dict[str, Any] = {}
    if not query:
        return options
    seen: set[str] = set()
    previous: str | None = None  # the key of the parameter before this one
    for param in query.split("&"):
        if not param:
            raise _error("empty query parameter (stray '&')", "query")
        raw_key, equals, raw_value = param.partition("=")
        # A "key" right after a secret may be the rest of that secret, cut at a raw '&':
        # it is never quoted then.
        after_secret = previous in _SECRET_KEYS
        key_text = _decode(raw_key, "query key", show=not after_secret, option="query")
        key = _KEYS_BY_LOWER.get(key_text.lower())
        if key is None:
            # "query", not the key as written: that may be a piece of a misplaced secret,
            # or collide with a part's name ('?host=x').
            shown = (
                f"after '{previous}' (write a '&' in its value as %26)"
                if after_secret
                else _show(key_text)
            )
            raise _error(f"unknown query key {shown}; valid keys: {', '.join(QUERY_KEYS)}", "query")
        previous = key
        if key in seen:
            raise _error(f"query key '{key}' is given more than once; keep one", key)
        seen.add(key)
        if not equals:
            raise _error(f"query key '{key}' has no value (write {key}=...)", key)
        if not raw_value:
            raise _error(f"query key '{key}' has an empty value", key)
        secret = key in _SECRET_KEYS
        value = _decode(raw_value, f"the value of query key '{key}'", show=not secret, option=key)
        options[_KEY_TO_FIELD[key]] = _convert(key, value)
    return options


def _convert(key: str, value: str) -> object:
    """Turn a decoded query value into the field's type (text values pass through)."""
    if key in _BOOL_KEYS:
        lowered = value.lower()
        if lowered not in ("true", "false"):
            raise _error(f"query key '{key}' must be 'true' or 'false', not {_show(value)}", key)
        return lowered == "true"
    if key == "authPort":
        if not _DIGITS.issuperset(value) or len(value) > 5 or not 1 <= int(value) <= 65535:
            raise _error(
                f"query key 'authPort' must be a port number 1..65535, not {_show(value)}", key
            )
        return int(value)
    return value
