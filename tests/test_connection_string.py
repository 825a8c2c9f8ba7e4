"""Tests for chronicle_conn.connection_string."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import logging
import pickle
import re
from collections.abc import Iterator
from urllib.parse import quote, unquote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chronicle_conn import ConnectionStringError
from chronicle_conn import connection_string as cs_module
from chronicle_conn.connection_string import (
    DEFAULT_LOAD_BALANCER,
    DEFAULT_PORT,
    DEVELOPMENT_CLIENT_ID,
    DEVELOPMENT_CLIENT_SECRET,
    LOAD_BALANCERS,
    MAX_LENGTH,
    QUERY_KEYS,
    SCHEME,
    SRV_SCHEME,
    AuthenticationMode,
    ConnectionString,
    Endpoint,
)

SECRET = "Sup3rS3cretValue"
API_KEY = "ApiK3yValue"
CERT_PASSWORD = "CertPassw0rdValue"

# What ConnectionStringError.option may be: a query key, or a part of the string.
_CONTROL_CHAR_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")

PARTS = frozenset({"scheme", "userinfo", "host", "port", "query", "connection_string"})
OPTIONS = PARTS | frozenset(QUERY_KEYS)


def parse(text: str) -> ConnectionString:
    return ConnectionString.parse(text)


def full(value: ConnectionString) -> str:
    """The rendering with the secrets, for a round trip."""
    return value.render_as_string(hide_secrets=False)


def check_error(exc: ConnectionStringError, option: str | None) -> str:
    """Check what every ConnectionStringError promises; return its message."""
    assert type(exc) is ConnectionStringError
    assert isinstance(exc, ValueError)
    assert exc.option in OPTIONS, exc.option
    if option is not None:
        assert exc.option == option, (exc.option, str(exc))
    message = str(exc)
    assert message
    assert "\n" not in message
    assert "\r" not in message
    return message


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def expect_error(
    text: str, *fragments: str, option: str | None = None, secrets: tuple[str, ...] = ()
) -> str:
    """Parse ``text``, expecting exactly a ConnectionStringError naming every fragment.

    Its ``option`` must be in OPTIONS, and equal ``option`` when that is given.
    """
    with pytest.raises(ConnectionStringError) as info:
        parse(text)
    exc = info.value
    message = check_error(exc, option)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    for secret in (SECRET, API_KEY, CERT_PASSWORD, *secrets):
        assert secret not in str(exc.option), (secret, exc.option)
        for link in _chain(exc):
            assert secret not in str(link), (secret, message)
            assert secret not in repr(link), (secret, message)
    return message


def expect_construction_error(*fragments: str, option: str | None = None, **kwargs: object) -> None:
    with pytest.raises(ConnectionStringError) as info:
        ConnectionString(**kwargs)  # type: ignore[arg-type]
    check_error(info.value, option)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))
    for secret in (SECRET, API_KEY, CERT_PASSWORD):
        assert secret not in str(info.value)


# --------------------------------------------------------------------------- defaults


def test_defaults_of_a_bare_host() -> None:
    cs = parse("chronicle://example.com")
    assert cs.scheme == SCHEME
    assert cs.hosts == (Endpoint("example.com", DEFAULT_PORT),)
    assert cs.client_id is None
    assert cs.client_secret is None
    assert cs.disable_tls is False
    assert cs.skip_tls_validation is False
    assert cs.ca_path is None
    assert cs.certificate_path is None
    assert cs.key_path is None
    assert cs.certificate_password is None
    assert cs.api_key is None
    assert cs.auth_port is None
    assert cs.auth is None
    assert cs.load_balancer == DEFAULT_LOAD_BALANCER == "pick-first"
    assert cs.srv_name_server is None
    assert cs.tls_enabled is True
    assert cs.is_srv is False
    assert cs.service_name is None
    assert cs.authentication_mode is AuthenticationMode.NONE


def test_default_and_development() -> None:
    default = ConnectionString.default()
    assert str(default) == "chronicle://localhost:35000"
    assert default == ConnectionString() == parse("chronicle://localhost")
    dev = ConnectionString.development()
    assert (DEVELOPMENT_CLIENT_ID, DEVELOPMENT_CLIENT_SECRET) == (
        "chronicle-dev-client",
        "chronicle-dev-secret",
    )
    assert dev.client_id == DEVELOPMENT_CLIENT_ID
    assert dev.client_secret == DEVELOPMENT_CLIENT_SECRET
    assert dev.hosts == default.hosts
    # A development kernel's certificate is self-signed.
    assert dev.skip_tls_validation is True
    plain = dataclasses.replace(dev, client_id=None, client_secret=None, skip_tls_validation=False)
    assert plain == default
    assert str(dev) == "chronicle://chronicle-dev-client:***@localhost:35000?skipTlsValidation=true"
    assert full(dev) == (
        "chronicle://chronicle-dev-client:chronicle-dev-secret@localhost:35000"
        "?skipTlsValidation=true"
    )
    assert dev.authentication_mode is AuthenticationMode.CLIENT_CREDENTIALS


def test_exports() -> None:
    for name in cs_module.__all__:
        assert hasattr(cs_module, name), name
    assert {"ConnectionString", "Endpoint", "AuthenticationMode", "DEFAULT_PORT"} <= set(
        cs_module.__all__
    )
    assert DEFAULT_PORT == 35000
    assert MAX_LENGTH == 64 * 1024
    assert list(QUERY_KEYS) == sorted(QUERY_KEYS)
    assert LOAD_BALANCERS == ("pick-first", "round-robin")


# --------------------------------------------------------------------------- query keys


@pytest.mark.parametrize(
    ("query", "field", "expected"),
    [
        ("disableTls=true", "disable_tls", True),
        ("disableTls=false", "disable_tls", False),
        ("disableTls=TRUE", "disable_tls", True),
        ("disableTls=False", "disable_tls", False),
        ("skipTlsValidation=true", "skip_tls_validation", True),
        ("skipTlsValidation=false", "skip_tls_validation", False),
        ("skipTlsValidation=tRuE", "skip_tls_validation", True),
        ("caPath=/etc/ca.pem", "ca_path", "/etc/ca.pem"),
        ("certificatePath=/c.pem", "certificate_path", "/c.pem"),
        ("certificatePath=/c.pem&keyPath=/k.pem", "key_path", "/k.pem"),
        ("certificatePath=/c.p12&certificatePassword=pw", "certificate_password", "pw"),
        ("apiKey=abc", "api_key", "abc"),
        ("authPort=1", "auth_port", 1),
        ("authPort=8080", "auth_port", 8080),
        ("authPort=65535", "auth_port", 65535),
        ("auth=none", "auth", "none"),
        ("auth=NONE", "auth", "none"),
        ("loadBalancer=pick-first", "load_balancer", "pick-first"),
        ("loadBalancer=round-robin", "load_balancer", "round-robin"),
        ("loadBalancer=Round-Robin", "load_balancer", "round-robin"),
    ],
)
def test_each_query_key(query: str, field: str, expected: object) -> None:
    cs = parse(f"chronicle://h?{query}")
    assert getattr(cs, field) == expected
    assert type(getattr(cs, field)) is type(expected)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("ns.example", "ns.example"),
        ("ns.example:5353", "ns.example:5353"),
        ("8.8.8.8", "8.8.8.8"),
        ("8.8.8.8:53", "8.8.8.8:53"),
        ("2001:4860:4860::8888", "2001:4860:4860::8888"),
        ("[2001:4860:4860::8888]", "[2001:4860:4860::8888]"),
        ("[::1]:53", "[::1]:53"),
        ("%5B::1%5D:53", "[::1]:53"),
    ],
)
def test_srv_name_server(value: str, expected: str) -> None:
    cs = parse(f"chronicle+srv://svc.example?srvNameServer={value}")
    assert cs.srv_name_server == expected
    assert parse(full(cs)) == cs


@pytest.mark.parametrize(
    "key", ["DISABLETLS", "disabletls", "DisableTLS", "disableTls", "dIsAbLeTlS"]
)
def test_keys_are_case_insensitive(key: str) -> None:
    assert parse(f"chronicle://h?{key}=true").disable_tls is True


@pytest.mark.parametrize(
    ("query", "field", "expected"),
    [
        ("APIKEY=k", "api_key", "k"),
        ("capath=/ca", "ca_path", "/ca"),
        ("CERTIFICATEPATH=/c&KEYPATH=/k", "key_path", "/k"),
        ("certificatepath=/c&certificatepassword=p", "certificate_password", "p"),
        ("AuthPort=9", "auth_port", 9),
        ("AUTH=none", "auth", "none"),
        ("LOADBALANCER=round-robin", "load_balancer", "round-robin"),
        ("SKIPTLSVALIDATION=TRUE", "skip_tls_validation", True),
    ],
)
def test_other_keys_are_case_insensitive(query: str, field: str, expected: object) -> None:
    assert getattr(parse(f"chronicle://h?{query}"), field) == expected


def test_srv_name_server_key_is_case_insensitive() -> None:
    assert parse("chronicle+srv://s?SRVNAMESERVER=ns").srv_name_server == "ns"


def test_keys_are_percent_decoded() -> None:
    assert parse("chronicle://h?%61piKey=k").api_key == "k"


def test_all_keys_together() -> None:
    cs = parse(
        "chronicle://h?skipTlsValidation=true&caPath=/ca&certificatePath=/c&keyPath=/k"
        "&certificatePassword=pw&authPort=2&loadBalancer=round-robin&apiKey=key"
    )
    assert (cs.skip_tls_validation, cs.ca_path, cs.certificate_path, cs.key_path) == (
        True,
        "/ca",
        "/c",
        "/k",
    )
    assert (cs.certificate_password, cs.auth_port, cs.load_balancer, cs.api_key) == (
        "pw",
        2,
        "round-robin",
        "key",
    )
    assert parse(full(cs)) == cs


# --------------------------------------------------------------------------- hosts


@pytest.mark.parametrize(
    ("text", "hosts"),
    [
        ("chronicle://[::1]:35001", (("::1", 35001),)),
        ("chronicle://[::1]", (("::1", DEFAULT_PORT),)),
        ("chronicle://[0:0:0:0:0:0:0:1]:7", (("::1", 7),)),
        ("chronicle://[2001:DB8::1]", (("2001:db8::1", DEFAULT_PORT),)),
        ("chronicle://[::ffff:1.2.3.4]", (("::ffff:102:304", DEFAULT_PORT),)),
        ("chronicle://127.0.0.1:1", (("127.0.0.1", 1),)),
        ("chronicle://Example.COM", (("example.com", DEFAULT_PORT),)),
        ("chronicle://my_host-1.example", (("my_host-1.example", DEFAULT_PORT),)),
        ("chronicle://a:1,b:2", (("a", 1), ("b", 2))),
        ("chronicle://a,b,c/", (("a", 35000), ("b", 35000), ("c", 35000))),
        ("chronicle://a:1,[::1]:2,10.0.0.1", (("a", 1), ("::1", 2), ("10.0.0.1", 35000))),
        ("chronicle://a:00080", (("a", 80),)),
        ("chronicle://a:65535", (("a", 65535),)),
    ],
)
def test_hosts(text: str, hosts: tuple[tuple[str, int], ...]) -> None:
    cs = parse(text)
    assert tuple((e.host, e.port) for e in cs.hosts) == hosts
    assert parse(full(cs)) == cs


def test_endpoint() -> None:
    v6 = Endpoint("::1", 1)
    assert v6.is_ipv6
    assert str(v6) == "[::1]:1"
    v4 = Endpoint("10.0.0.1")
    assert not v4.is_ipv6
    assert v4.port == DEFAULT_PORT
    assert str(v4) == "10.0.0.1:35000"
    assert Endpoint("HOST") == Endpoint("host")
    assert hash(Endpoint("HOST", 5)) == hash(Endpoint("host", 5))
    assert Endpoint("0::1", 1) == v6
    with pytest.raises(dataclasses.FrozenInstanceError):
        v6.port = 2  # type: ignore[misc]


@pytest.mark.parametrize(
    ("host", "port", "option", "fragment"),
    [
        ("", 1, "host", "is empty"),
        ("a b", 1, "host", "'a b'"),
        ("[::1]", 1, "host", "'[::1]'"),
        ("-a", 1, "host", "'-a'"),
        ("a..b", 1, "host", "empty label"),
        ("x" * 64, 1, "host", "not a valid host name"),
        (("a." * 127) + "b", 1, "host", "longer than 253"),
        ("1.2.3.256", 1, "host", "IPv4"),
        ("::g", 1, "host", "IPv6"),
        ("fe80::1%eth0", 1, "host", "zone"),
        ("a", 0, "port", "out of range"),
        ("a", 65536, "port", "out of range"),
        ("a", True, "port", "int"),
        ("a", "80", "port", "int"),
        (b"a", 1, "host", "str"),
    ],
)
def test_endpoint_validation(host: object, port: object, option: str, fragment: str) -> None:
    with pytest.raises(ConnectionStringError) as info:
        Endpoint(host, port)  # type: ignore[arg-type]
    check_error(info.value, option)
    assert fragment in str(info.value)


def test_srv() -> None:
    cs = parse("chronicle+srv://user:pw@Kernel.Example/?loadBalancer=round-robin")
    assert cs.scheme == SRV_SCHEME
    assert cs.is_srv
    assert cs.service_name == "kernel.example"
    assert cs.hosts == (Endpoint("kernel.example", DEFAULT_PORT),)
    assert cs.client_id == "user"
    assert full(cs) == "chronicle+srv://user:pw@kernel.example?loadBalancer=round-robin"
    assert str(cs) == "chronicle+srv://user:***@kernel.example?loadBalancer=round-robin"
    assert parse("CHRONICLE+SRV://svc") == ConnectionString(SRV_SCHEME, (Endpoint("svc"),))


@pytest.mark.parametrize(
    ("text", "option", "fragments"),
    [
        ("chronicle+srv://svc:35000", "port", ("port '35000'", "'svc'")),
        ("chronicle+srv://svc:", "port", ("port ''",)),
        ("chronicle+srv://a,b", "host", ("exactly one service name",)),
        ("chronicle+srv://a,", "host", ("exactly one service name",)),
        ("chronicle+srv://", "host", ("no host",)),
        ("chronicle+srv://[::1]", "host", ("DNS service name",)),
        ("chronicle+srv://10.0.0.1", "host", ("DNS service name",)),
        (
            "chronicle+srv://svc?srvNameServer=a:b",
            "srvNameServer",
            ("srvNameServer", "not a number"),
        ),
        (
            "chronicle+srv://svc?srvNameServer=a:99999",
            "srvNameServer",
            ("srvNameServer", "out of range"),
        ),
        ("chronicle+srv://svc?srvNameServer=[::1", "srvNameServer", ("srvNameServer", "unclosed")),
        ("chronicle+srv://svc?srvNameServer=::g", "srvNameServer", ("srvNameServer", "IPv6")),
        ("chronicle+srv://svc?srvNameServer=", "srvNameServer", ("srvNameServer", "empty value")),
        ("chronicle://h?srvNameServer=ns", "srvNameServer", ("srvNameServer", "chronicle+srv")),
    ],
)
def test_srv_errors(text: str, option: str, fragments: tuple[str, ...]) -> None:
    expect_error(text, *fragments, option=option)


# --------------------------------------------------------------------------- user info


@pytest.mark.parametrize(
    ("userinfo", "client_id", "secret"),
    [
        ("id", "id", None),
        ("id:secret", "id", "secret"),
        ("i%40d:s%3Ae%2Fc%25", "i@d", "s:e/c%"),
        ("id:a:b", "id", "a:b"),
        ("%C3%A9t%C3%A9:%E2%82%AC", "été", "€"),
        ("id:p+q", "id", "p+q"),
        ("caf\u00e9:s", "caf\u00e9", "s"),
    ],
)
def test_userinfo_decoding(userinfo: str, client_id: str, secret: str | None) -> None:
    cs = parse(f"chronicle://{userinfo}@h")
    assert (cs.client_id, cs.client_secret) == (client_id, secret)
    assert parse(full(cs)) == cs


def test_query_values_are_percent_decoded_and_plus_is_literal() -> None:
    cs = parse("chronicle://h?caPath=/my%20certs/ca%2Bx.pem&apiKey=a+b%3D%26")
    assert cs.ca_path == "/my certs/ca+x.pem"
    assert cs.api_key == "a+b=&"
    assert parse("chronicle://h?apiKey=a=b").api_key == "a=b"
    assert parse("chronicle://h?caPath=/a?b").ca_path == "/a?b"


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("text", "option", "fragments"),
    [
        # scheme
        ("", "scheme", ("missing scheme",)),
        ("localhost:35000", "scheme", ("missing scheme",)),
        ("://h", "scheme", ("missing scheme",)),
        ("http://h", "scheme", ("unknown scheme 'http'",)),
        ("chronicle+tls://h", "scheme", ("unknown scheme 'chronicle+tls'",)),
        ("chronicle:/h", "scheme", ("missing scheme",)),
        # characters
        ("chronicle://h\x00", "connection_string", ("control character", "index 13")),
        ("chronicle://\x7fh", "connection_string", ("control character",)),
        (" chronicle://h", "connection_string", ("whitespace", "index 0")),
        ("chronicle://h ", "connection_string", ("whitespace",)),
        ("chronicle://h\n", "connection_string", ("whitespace",)),
        ("chronicle://h?caPath=a b", "connection_string", ("whitespace",)),
        ("chronicle://h\u00a0", "connection_string", ("whitespace",)),
        ("chronicle://h\ud800", "connection_string", ("control character",)),
        ("chronicle://h#frag", "connection_string", ("'#'",)),
        # hosts
        ("chronicle://", "host", ("no host",)),
        ("chronicle:///", "host", ("no host",)),
        ("chronicle://?apiKey=x", "host", ("no host",)),
        ("chronicle://id@", "host", ("no host",)),
        ("chronicle://a,,b", "host", ("stray ','",)),
        ("chronicle://,a", "host", ("stray ','",)),
        ("chronicle://a,", "host", ("stray ','",)),
        ("chronicle://a:1,a:1", "host", ("'a:1'", "more than once")),
        ("chronicle://A,a", "host", ("'a:35000'", "more than once")),
        ("chronicle://:35000", "host", ("port without a host name",)),
        ("chronicle://a:", "port", ("empty port", "'a'")),
        ("chronicle://a:0", "port", ("port '0' of host 'a' is out of range 1..65535",)),
        ("chronicle://a:99999", "port", ("port '99999' of host 'a' is out of range 1..65535",)),
        ("chronicle://a:65536", "port", ("port '65536'", "out of range")),
        ("chronicle://a:99999999999999999999", "port", ("port '99999999999999999999'", "range")),
        ("chronicle://a:" + "9" * 5000, "port", ("out of range",)),
        ("chronicle://a:-1", "port", ("the port of host 'a' is not a number",)),
        ("chronicle://a:+1", "port", ("the port of host 'a' is not a number",)),
        ("chronicle://a:1e3", "port", ("the port of host 'a' is not a number",)),
        ("chronicle://a:\u0661\u0662", "port", ("not a number",)),
        ("chronicle://a:1:2", "host", ("several ':'",)),
        ("chronicle://::1", "host", ("a host '::1' in the host list has several ':'", "brackets")),
        ("chronicle://[::1", "host", ("unclosed '['",)),
        ("chronicle://[::1]x", "host", ("after ']'",)),
        ("chronicle://[::1]]", "host", ("after ']'",)),
        ("chronicle://[]", "host", ("only IPv6 addresses go in brackets",)),
        ("chronicle://[a]", "host", ("only IPv6 addresses go in brackets",)),
        ("chronicle://[1.2.3.4]:1", "host", ("only IPv6",)),
        ("chronicle://a]", "host", ("misplaced '[' or ']'",)),
        ("chronicle://a[::1]", "host", ("misplaced '[' or ']'",)),
        ("chronicle://[::g]", "host", ("a host is not a valid IPv6",)),
        ("chronicle://[::12345]", "host", ("host '::12345' is not a valid IPv6",)),
        ("chronicle://[:::1]", "host", ("not a valid IPv6",)),
        ("chronicle://[fe80::1%25eth0]", "host", ("zone",)),
        ("chronicle://[::1]:99999", "port", ("port '99999' of host '::1'", "out of range")),
        ("chronicle://a..b", "host", ("empty label",)),
        ("chronicle://.a", "host", ("empty label",)),
        ("chronicle://a.", "host", ("empty label",)),
        ("chronicle://-a", "host", ("'-a'", "not a valid host name")),
        ("chronicle://a-", "host", ("not a valid host name",)),
        ("chronicle://a%41", "host", ("not a valid host name",)),
        ("chronicle://h\u00e9", "host", ("not a valid host name",)),
        ("chronicle://" + "a" * 64, "host", ("not a valid host name",)),
        ("chronicle://" + "a." * 130 + "b", "host", ("longer than 253",)),
        ("chronicle://1.2.3.256", "host", ("IPv4",)),
        ("chronicle://123", "host", ("IPv4",)),
        ("chronicle://a.123", "host", ("IPv4",)),
        ("chronicle://01.2.3.4", "host", ("IPv4",)),
        # path
        ("chronicle://h/db", "connection_string", ("unexpected path",)),
        ("chronicle://h//", "connection_string", ("unexpected path",)),
        # user info
        ("chronicle://@h", "userinfo", ("empty client id",)),
        ("chronicle://:pw@h", "userinfo", ("secret was given without a client id",)),
        ("chronicle://id:@h", "userinfo", ("empty client secret",)),
        ("chronicle://a@b@h", "userinfo", ("'@'", "%40")),
        ("chronicle://i%zzd@h", "userinfo", ("client id", "'%'")),
        ("chronicle://i%ffd@h", "userinfo", ("client id", "UTF-8")),
        ("chronicle://i%00d@h", "userinfo", ("client id", "control character")),
        # query
        ("chronicle://h?&", "query", ("stray '&'",)),
        ("chronicle://h?apiKey=k&", "query", ("stray '&'",)),
        ("chronicle://h?&apiKey=k", "query", ("stray '&'",)),
        ("chronicle://h?apiKey=k&&auth=none", "query", ("stray '&'",)),
        ("chronicle://h?foo=1", "query", ("unknown query key 'foo'; valid keys: apiKey, auth,",)),
        ("chronicle://h?=1", "query", ("unknown query key ''",)),
        ("chronicle://h?fo%zz=1", "query", ("query key", "'fo%zz'", "'%'")),
        ("chronicle://h?disableTls", "disableTls", ("'disableTls'", "no value")),
        ("chronicle://h?disableTls=", "disableTls", ("'disableTls'", "empty value")),
        ("chronicle://h?caPath=", "caPath", ("'caPath'", "empty value")),
        ("chronicle://h?apiKey=", "apiKey", ("'apiKey'", "empty value")),
        (
            "chronicle://h?disableTls=true&disableTls=true",
            "disableTls",
            ("'disableTls'", "more than once"),
        ),
        (
            "chronicle://h?disableTls=true&DISABLETLS=false",
            "disableTls",
            ("'disableTls'", "more than once"),
        ),
        ("chronicle://h?disableTls=maybe", "disableTls", ("'disableTls'", "'maybe'")),
        ("chronicle://h?skipTlsValidation=1", "skipTlsValidation", ("'skipTlsValidation'", "'1'")),
        ("chronicle://h?disableTls=yes", "disableTls", ("'disableTls'", "'yes'")),
        ("chronicle://h?authPort=0", "authPort", ("'authPort'", "'0'")),
        ("chronicle://h?authPort=65536", "authPort", ("'authPort'", "'65536'")),
        ("chronicle://h?authPort=abc", "authPort", ("'authPort'", "'abc'")),
        ("chronicle://h?authPort=-5", "authPort", ("'authPort'", "'-5'")),
        ("chronicle://h?authPort=99999999999999999999", "authPort", ("'authPort'", "1..65535")),
        ("chronicle://h?auth=oauth", "auth", ("auth", "'none'", "'oauth'")),
        (
            "chronicle://h?loadBalancer=random",
            "loadBalancer",
            ("loadBalancer", "'random'", "'round-robin'"),
        ),
        ("chronicle://h?caPath=%zz", "caPath", ("'caPath'", "'%zz'", "'%'")),
        ("chronicle://h?caPath=%C3", "caPath", ("'caPath'", "UTF-8")),
        ("chronicle://h?caPath=a%0Ab", "caPath", ("caPath", "control character")),
        ("chronicle://h?keyPath=/k", "keyPath", ("keyPath requires certificatePath",)),
        (
            "chronicle://h?certificatePassword=p",
            "certificatePassword",
            ("certificatePassword requires certificatePath",),
        ),
        # contradictions
        (
            "chronicle://h?disableTls=true&skipTlsValidation=true",
            "skipTlsValidation",
            ("disableTls", "skipTlsValidation"),
        ),
        ("chronicle://h?disableTls=true&caPath=/ca", "caPath", ("disableTls", "caPath")),
        (
            "chronicle://h?disableTls=true&certificatePath=/c",
            "certificatePath",
            ("disableTls", "certificatePath"),
        ),
        (
            "chronicle://h?disableTls=true&certificatePath=/c&keyPath=/k",
            "certificatePath",
            ("disableTls", "certificatePath"),
        ),
        ("chronicle://id@h?auth=none", "auth", ("auth=none", "client credentials")),
        ("chronicle://h?auth=none&apiKey=k", "auth", ("auth=none", "apiKey")),
        ("chronicle://id@h?apiKey=k", "apiKey", ("client credentials", "apiKey")),
    ],
)
def test_errors(text: str, option: str, fragments: tuple[str, ...]) -> None:
    """Every raise site of parse(), with the message and the option it gives."""
    expect_error(text, *fragments, option=option)


@pytest.mark.parametrize(
    ("text", "option"),
    [
        ("chronicle://id:se?cret@h", "port"),  # the host list is 'id:se'
        ("chronicle://id:12?cret@h", "query"),  # an unknown key 'cret@h'
        ("chronicle://id:s@e?cret=1@h", "query"),
        ("chronicle://h?caPath=/a@b&disableTls=maybe", "disableTls"),
    ],
)
def test_at_sign_after_the_host_list_gives_a_message_that_quotes_nothing(
    text: str, option: str
) -> None:
    message = expect_error(text, "'@' after the host list", "percent-encode", option=option)
    assert "cret" not in message
    assert message.startswith("invalid connection string, and it has an '@'")


def test_at_sign_in_a_query_value_is_fine_when_valid() -> None:
    cs = parse("chronicle://h?caPath=/a@b")
    assert cs.ca_path == "/a@b"
    assert str(cs) == "chronicle://h:35000?caPath=/a%40b"


def test_error_option_attribute_names_the_key() -> None:
    with pytest.raises(ConnectionStringError) as info:
        parse("chronicle://h?disableTls=maybe")
    assert info.value.option == "disableTls"
    with pytest.raises(ConnectionStringError) as info:
        parse("chronicle://h?disableTls=true&caPath=/x")
    assert info.value.option == "caPath"


@pytest.mark.parametrize(
    "key", ["host", "port", "scheme", "userinfo", "connection_string", "apikey2", "Host"]
)
def test_an_unknown_key_gives_option_query_whatever_its_name(key: str) -> None:
    # Never the key as written: '?host=x' must not look like a fault in the host.
    message = expect_error(f"chronicle://h?{key}=x", "unknown query key", option="query")
    assert repr(key) in message


def test_a_key_spelled_differently_gives_its_documented_spelling() -> None:
    expect_error("chronicle://h?DISABLETLS=maybe", "'disableTls'", option="disableTls")
    expect_error("chronicle://h?apikey=a&APIKEY=b", "more than once", option="apiKey")
    expect_error("chronicle://h?caPATH", "no value", option="caPath")


def test_every_raise_goes_through_error_with_an_option() -> None:
    """Statically: _error requires an option, and every raise in the module uses it.

    (mypy --strict then checks each call passes a str; the error tables above check
    the values.) The exceptions: a bare re-raise, and parse()'s TypeError for a non-str.
    """
    signature = inspect.signature(cs_module._error)
    assert signature.parameters["option"].default is inspect.Parameter.empty
    assert signature.parameters["option"].annotation == "str"
    tree = ast.parse(inspect.getsource(cs_module))
    others = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Raise) or node.exc is None:
            continue
        call = node.exc
        if isinstance(call, ast.Call) and isinstance(call.func, ast.Name):
            if call.func.id == "_error":
                assert len(call.args) == 2 or any(k.arg == "option" for k in call.keywords)
                continue
            others.append(call.func.id)
        else:
            others.append(ast.dump(call))
    assert others == ["TypeError"]


def test_length_is_bounded() -> None:
    prefix = "chronicle://h:35000?caPath="
    fits = prefix + "a" * (MAX_LENGTH - len(prefix))
    assert len(fits) == MAX_LENGTH
    assert parse(fits).ca_path == "a" * (MAX_LENGTH - len(prefix))
    assert str(parse(fits)) == fits
    message = expect_error(
        fits + "a", "characters long", str(MAX_LENGTH), option="connection_string"
    )
    assert len(message) < 200
    expect_error("chronicle://" + "a" * 10_000_000, "characters long", option="connection_string")


def test_canonical_form_is_bounded_too() -> None:
    hosts = ",".join(f"h{i}" for i in range(7000))
    assert len("chronicle://" + hosts) < MAX_LENGTH
    expect_error(
        "chronicle://" + hosts, "canonical form", str(MAX_LENGTH), option="connection_string"
    )
    expect_construction_error(
        "canonical form", option="connection_string", ca_path="\u00e9" * 20_000
    )
    fits = ConnectionString(ca_path="a" * 60_000)
    assert parse(full(fits)) == fits


def test_long_parts_are_shortened_in_messages() -> None:
    message = expect_error("chronicle://h?caPath=%zz" + "a" * 5000, "caPath")
    assert len(message) < 300


def test_parse_rejects_non_str() -> None:
    with pytest.raises(TypeError):
        ConnectionString.parse(b"chronicle://h")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        ConnectionString.parse(None)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- secrets


@pytest.mark.parametrize(
    "text",
    [
        f"chronicle://id:{SECRET}%zz@h",
        f"chronicle://id:{SECRET}%ff@h",
        f"chronicle://id:{SECRET}%0A@h",
        f"chronicle://id:{SECRET}@h:99999",
        f"chronicle://id:{SECRET}@",
        f"chronicle://id:{SECRET}@h?apiKey={API_KEY}",
        f"chronicle://id:{SECRET}@h?auth=none",
        f"chronicle://id:{SECRET}@h?foo=1",
        f"chronicle://id:{SECRET}@h,,",
        f"chronicle://id:{SECRET}@@h",
        f"chronicle://:{SECRET}@h",
        # A forgotten '@' or host, or a raw '/', '?' or ':' in the user info, moves the
        # secret into the host list or the query: still never echoed.
        f"chronicle://id:{SECRET}",
        f"chronicle://:{SECRET}",
        f"chronicle://id:{SECRET}:x",
        f"chronicle://id:{SECRET}]",
        f"chronicle://id:{SECRET}[",
        f"chronicle://id:{SECRET},h",
        f"chronicle://[id:{SECRET}]",
        f"chronicle+srv://id:{SECRET}",
        f"chronicle://id:se?{SECRET}@h",
        f"chronicle://id:12?{SECRET}=x@h",
        f"chronicle://id:1?{SECRET}@h",
        f"chronicle://id:s:e?{SECRET}@h",
        f"chronicle://id:se/{SECRET}@h",
        f"chronicle://id:s@e?{SECRET}@h",
        f"chronicle://id:s@e?{SECRET}=1@h",
        f"chronicle://h?apiKey={API_KEY}%zz",
        f"chronicle://h?apiKey={API_KEY}%C3",
        f"chronicle://h?apiKey={API_KEY}%00",
        f"chronicle://h?apiKey={API_KEY}&apiKey={API_KEY}",
        f"chronicle://h?apiKey={API_KEY}&auth=none",
        f"chronicle://h?apiKey={API_KEY}&disableTls=maybe",
        f"chronicle://h?certificatePassword={CERT_PASSWORD}",
        f"chronicle://h?certificatePassword={CERT_PASSWORD}%zz",
        f"chronicle://h?certificatePassword={CERT_PASSWORD}%1F&certificatePath=/c",
        f"chronicle://h?disableTls=true&certificatePath=/c&certificatePassword={CERT_PASSWORD}",
    ],
)
def test_errors_never_contain_secrets(text: str) -> None:
    expect_error(text)  # expect_error checks the message and the cause chain


def test_construction_errors_never_contain_secrets() -> None:
    expect_construction_error("client secret", client_secret=SECRET)
    expect_construction_error("control character", client_id="i", client_secret=SECRET + "\n")
    expect_construction_error("apiKey", api_key=API_KEY + "\x00")
    expect_construction_error("apiKey", client_id="i", client_secret=SECRET, api_key=API_KEY)
    expect_construction_error("certificatePassword", certificate_password=CERT_PASSWORD + "\x7f")


def test_str_repr_and_redacted_hide_the_secrets() -> None:
    cs = parse(f"chronicle://id:{SECRET}@h?certificatePath=/c&certificatePassword={CERT_PASSWORD}")
    hidden = "chronicle://id:***@h:35000?certificatePassword=***&certificatePath=/c"
    assert str(cs) == cs.redacted() == cs.render_as_string() == hidden
    assert cs.render_as_string(hide_secrets=True) == hidden
    assert repr(cs) == f"ConnectionString({hidden!r})"
    assert full(cs) == (
        f"chronicle://id:{SECRET}@h:35000?certificatePassword={CERT_PASSWORD}&certificatePath=/c"
    )
    api = parse(f"chronicle://h?apiKey={API_KEY}")
    assert str(api) == api.redacted() == "chronicle://h:35000?apiKey=***"
    assert full(api) == f"chronicle://h:35000?apiKey={API_KEY}"
    for value in (cs, api):
        for text in (
            str(value),
            repr(value),
            value.redacted(),
            value.render_as_string(),
            str([value]),
            f"{value}",
            f"{value!s}",
            f"{value!r}",
            f"{value:}",
            "%s" % value,  # noqa: UP031 - the logging module formats this way
            "{}".format(value),  # noqa: UP032
            format(value),
        ):
            assert SECRET not in text
            assert API_KEY not in text
            assert CERT_PASSWORD not in text
        assert parse(full(value)) == value


def test_str_in_a_log_line_hides_the_secrets(caplog: pytest.LogCaptureFixture) -> None:
    cs = parse(f"chronicle://id:{SECRET}@h")
    logger = logging.getLogger("tests.connection_string")
    with caplog.at_level(logging.INFO, logger=logger.name):
        logger.info("connecting to %s", cs)
        logger.info(f"connecting to {cs}")  # what users write
    assert [record.getMessage() for record in caplog.records] == [
        "connecting to chronicle://id:***@h:35000"
    ] * 2
    assert SECRET not in caplog.text


def test_render_as_string_takes_hide_secrets_by_keyword_only() -> None:
    cs = ConnectionString.development()
    with pytest.raises(TypeError):
        cs.render_as_string(False)  # type: ignore[call-arg]


def test_the_redacted_form_parses_with_stars_as_the_secrets() -> None:
    # As with SQLAlchemy's URL: parse(str(cs)) loses the secrets. Round trips need
    # render_as_string(hide_secrets=False).
    cs = parse(f"chronicle://id:{SECRET}@h?certificatePath=/c&certificatePassword={CERT_PASSWORD}")
    again = parse(str(cs))
    assert (again.client_secret, again.certificate_password) == ("***", "***")
    assert again != cs
    assert parse(full(cs)) == cs


def test_a_secret_of_stars_is_not_confused_with_redaction() -> None:
    cs = ConnectionString(client_id="i", client_secret="***")
    assert full(cs) == "chronicle://i:%2A%2A%2A@localhost:35000"
    assert parse(full(cs)) == cs
    assert str(cs) == cs.redacted() == "chronicle://i:***@localhost:35000"


# --------------------------------------------------------------------------- canonical form


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("chronicle://h", "chronicle://h:35000"),
        ("chronicle://h/", "chronicle://h:35000"),
        ("chronicle://h/?", "chronicle://h:35000"),
        ("chronicle://h?", "chronicle://h:35000"),
        ("ChRoNiClE://H:1", "chronicle://h:1"),
        ("chronicle://[::1]", "chronicle://[::1]:35000"),
        ("chronicle://b,a:2", "chronicle://b:35000,a:2"),
        ("chronicle://h?disableTls=false&skipTlsValidation=false", "chronicle://h:35000"),
        ("chronicle://h?loadBalancer=PICK-FIRST", "chronicle://h:35000"),
        (
            "chronicle://h?loadBalancer=round-robin&disableTls=TRUE&auth=none&authPort=9",
            "chronicle://h:35000?auth=none&authPort=9&disableTls=true&loadBalancer=round-robin",
        ),
        (
            "chronicle://h?skipTlsValidation=true&apiKey=a%20b+c/d&caPath=/x%3Fy",
            "chronicle://h:35000?apiKey=a%20b%2Bc/d&caPath=/x%3Fy&skipTlsValidation=true",
        ),
        (
            "chronicle://h?keyPath=k&certificatePath=c&certificatePassword=p",
            "chronicle://h:35000?certificatePassword=p&certificatePath=c&keyPath=k",
        ),
        ("chronicle://a%3Ab:c%40d@h", "chronicle://a%3Ab:c%40d@h:35000"),
        ("chronicle://%C3%A9@h", "chronicle://%C3%A9@h:35000"),
        ("chronicle://\u00e9@h", "chronicle://%C3%A9@h:35000"),
        (
            "chronicle+srv://svc/?srvNameServer=[::1]:53",
            "chronicle+srv://svc?srvNameServer=%5B::1%5D:53",
        ),
    ],
)
def test_canonical_form(text: str, canonical: str) -> None:
    cs = parse(text)
    assert full(cs) == canonical
    assert parse(canonical) == cs
    assert full(parse(canonical)) == canonical
    # str() is the same text with the secrets' places shown as ***.
    assert str(cs) == _secret_places(canonical, "***")[0]


def test_canonical_keys_are_sorted_and_spelled_as_documented() -> None:
    cs = parse(
        "chronicle+srv://s?SRVNAMESERVER=ns&skiptlsvalidation=TRUE&LoadBalancer=round-robin"
        "&keypath=k&certificatepath=c&CAPATH=ca&authport=1&APIKEY=a"
        "&certificatePASSWORD=p"
    )
    query = str(cs).split("?", 1)[1]
    keys = [param.split("=", 1)[0] for param in query.split("&")]
    assert keys == sorted(keys)
    assert set(keys) == set(QUERY_KEYS) - {"auth", "disableTls"}


# --------------------------------------------------------------------------- value semantics


def test_equality_and_hashing() -> None:
    a = parse("chronicle://h:1?apiKey=k")
    b = parse("CHRONICLE://H:1/?APIKEY=k")
    assert a == b
    assert hash(a) == hash(b)
    assert len({a, b}) == 1
    c = parse("chronicle://h:2?apiKey=k")
    assert a != c
    assert {a: 1}[b] == 1
    text: object = "chronicle://h:1?apiKey=k"
    assert a != text
    assert parse("chronicle://a,b") != parse("chronicle://b,a")
    assert pickle.loads(pickle.dumps(a)) == a


def test_frozen() -> None:
    cs = ConnectionString.default()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cs.client_id = "x"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cs.hosts = ()  # type: ignore[misc]
    assert cs == ConnectionString.default()


def test_with_credentials() -> None:
    base = parse("chronicle://h?caPath=/ca")
    cs = base.with_credentials("id", SECRET)
    assert (cs.client_id, cs.client_secret, cs.ca_path) == ("id", SECRET, "/ca")
    assert base.client_id is None
    assert cs.authentication_mode is AuthenticationMode.CLIENT_CREDENTIALS
    replaced = cs.with_credentials("other")
    assert (replaced.client_id, replaced.client_secret) == ("other", None)
    with pytest.raises(ConnectionStringError, match="empty"):
        base.with_credentials("")
    with pytest.raises(ConnectionStringError, match="apiKey") as info:
        base.with_api_key(API_KEY).with_credentials("id", SECRET)
    assert SECRET not in str(info.value)
    assert API_KEY not in str(info.value)
    with pytest.raises(ConnectionStringError, match="auth=none"):
        parse("chronicle://h?auth=none").with_credentials("id", SECRET)


def test_with_api_key() -> None:
    base = ConnectionString.default()
    cs = base.with_api_key(API_KEY)
    assert cs.api_key == API_KEY
    assert cs.authentication_mode is AuthenticationMode.API_KEY
    assert cs.with_api_key("other").api_key == "other"
    assert parse(full(cs)) == cs
    with pytest.raises(ConnectionStringError, match="apiKey"):
        ConnectionString.development().with_api_key(API_KEY)
    with pytest.raises(ConnectionStringError, match="empty"):
        base.with_api_key("")
    with pytest.raises(ConnectionStringError, match="str"):
        base.with_api_key(5)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "mode"),
    [
        ("chronicle://h", AuthenticationMode.NONE),
        ("chronicle://h?auth=none", AuthenticationMode.NONE),
        ("chronicle://id@h", AuthenticationMode.CLIENT_CREDENTIALS),
        ("chronicle://id:s@h", AuthenticationMode.CLIENT_CREDENTIALS),
        ("chronicle://h?apiKey=k", AuthenticationMode.API_KEY),
        ("chronicle+srv://s?apiKey=k", AuthenticationMode.API_KEY),
    ],
)
def test_authentication_mode(text: str, mode: AuthenticationMode) -> None:
    assert parse(text).authentication_mode is mode


def test_authentication_mode_values() -> None:
    assert [m.value for m in AuthenticationMode] == ["none", "api_key", "client_credentials"]
    api_key: object = AuthenticationMode.API_KEY
    assert api_key == "api_key"
    assert isinstance(api_key, str)
    assert str(AuthenticationMode.CLIENT_CREDENTIALS) == "client_credentials"
    assert f"{AuthenticationMode.NONE}" == "none"
    assert AuthenticationMode("api_key") is AuthenticationMode.API_KEY


def test_tls_enabled() -> None:
    assert parse("chronicle://h").tls_enabled is True
    assert parse("chronicle://h?disableTls=true").tls_enabled is False


# --------------------------------------------------------------------------- construction


def test_direct_construction_normalizes() -> None:
    cs = ConnectionString(
        "CHRONICLE", (Endpoint("H", 1),), auth="None", load_balancer="ROUND-ROBIN"
    )
    assert cs.scheme == SCHEME
    assert cs.auth == "none"
    assert cs.load_balancer == "round-robin"
    assert cs == parse("chronicle://h:1?auth=none&loadBalancer=round-robin")


@pytest.mark.parametrize(
    ("kwargs", "option", "fragment"),
    [
        ({"scheme": "http"}, "scheme", "scheme"),
        ({"scheme": 1}, "scheme", "scheme"),
        ({"hosts": ()}, "host", "non-empty tuple"),
        ({"hosts": [Endpoint("a")]}, "host", "tuple"),
        ({"hosts": ("a:1",)}, "host", "Endpoint"),
        ({"hosts": (Endpoint("a"), Endpoint("A"))}, "host", "more than once"),
        ({"scheme": SRV_SCHEME, "hosts": (Endpoint("a"), Endpoint("b"))}, "host", "exactly one"),
        ({"scheme": SRV_SCHEME, "hosts": (Endpoint("a", 1),)}, "port", "port '1'"),
        ({"scheme": SRV_SCHEME, "hosts": (Endpoint("::1"),)}, "host", "DNS service name"),
        ({"client_id": ""}, "userinfo", "client id"),
        ({"client_id": 5}, "userinfo", "client id"),
        ({"client_id": "a\x00"}, "userinfo", "control character"),
        ({"client_secret": "s"}, "userinfo", "without a client id"),
        ({"client_id": "i", "client_secret": ""}, "userinfo", "client secret"),
        ({"disable_tls": "true"}, "disableTls", "disableTls"),
        ({"skip_tls_validation": 1}, "skipTlsValidation", "skipTlsValidation"),
        ({"ca_path": ""}, "caPath", "caPath"),
        ({"ca_path": b"/x"}, "caPath", "caPath"),
        ({"certificate_path": "c\x00"}, "certificatePath", "certificatePath"),
        ({"key_path": "k"}, "keyPath", "keyPath requires certificatePath"),
        ({"certificate_password": "p"}, "certificatePassword", "requires certificatePath"),
        ({"api_key": ""}, "apiKey", "apiKey"),
        ({"auth_port": 0}, "authPort", "authPort"),
        ({"auth_port": 70000}, "authPort", "authPort"),
        ({"auth_port": True}, "authPort", "authPort"),
        ({"auth_port": "80"}, "authPort", "authPort"),
        ({"auth": "basic"}, "auth", "auth"),
        ({"load_balancer": "random"}, "loadBalancer", "loadBalancer"),
        ({"load_balancer": None}, "loadBalancer", "loadBalancer"),
        ({"srv_name_server": "ns"}, "srvNameServer", "chronicle+srv"),
        ({"srv_name_server": ""}, "srvNameServer", "srvNameServer"),
        ({"scheme": SRV_SCHEME, "srv_name_server": "a b:c"}, "srvNameServer", "srvNameServer"),
        ({"scheme": SRV_SCHEME, "srv_name_server": "::g"}, "srvNameServer", "IPv6"),
        ({"disable_tls": True, "skip_tls_validation": True}, "skipTlsValidation", "skipTls"),
        ({"disable_tls": True, "ca_path": "/ca"}, "caPath", "caPath"),
        ({"auth": "none", "api_key": "k"}, "auth", "auth=none"),
        ({"auth": "none", "client_id": "i"}, "auth", "auth=none"),
        ({"client_id": "i", "api_key": "k"}, "apiKey", "apiKey"),
        ({"ca_path": "\u00e9" * 20_000}, "connection_string", "canonical form"),
    ],
)
def test_direct_construction_is_validated(
    kwargs: dict[str, object], option: str, fragment: str
) -> None:
    expect_construction_error(fragment, option=option, **kwargs)


def test_replace_is_validated() -> None:
    cs = parse("chronicle://h?caPath=/ca")
    with pytest.raises(ConnectionStringError, match="caPath"):
        dataclasses.replace(cs, disable_tls=True)
    with pytest.raises(ConnectionStringError, match="authPort"):
        dataclasses.replace(cs, auth_port=0)
    moved = dataclasses.replace(cs, hosts=(Endpoint("::1", 2),))
    assert str(moved) == "chronicle://[::1]:2?caPath=/ca"


def test_srv_name_server_direct_construction() -> None:
    cs = ConnectionString(SRV_SCHEME, (Endpoint("svc"),), srv_name_server="2001:db8::53")
    assert parse(full(cs)) == cs


# --------------------------------------------------------------------------- properties

_SAFE_TEXT = st.text(st.characters(exclude_categories=("Cc", "Cs")), min_size=1, max_size=12)
_LABEL = st.from_regex(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,8}[A-Za-z0-9_])?", fullmatch=True)
_LAST_LABEL = st.from_regex(r"[A-Za-z]([A-Za-z0-9_-]{0,8}[A-Za-z0-9_])?", fullmatch=True)
_HOSTNAMES = st.builds(
    lambda labels, last: ".".join([*labels, last]), st.lists(_LABEL, max_size=3), _LAST_LABEL
)
_IPV4 = st.ip_addresses(v=4).map(str)
_IPV6 = st.ip_addresses(v=6).map(str)
_PORTS = st.integers(1, 65535)
_ENDPOINTS = st.builds(Endpoint, st.one_of(_HOSTNAMES, _IPV4, _IPV6), _PORTS)
_NAME_SERVERS = st.one_of(
    _HOSTNAMES,
    _IPV4,
    _IPV6,
    st.builds(lambda h, p: f"{h}:{p}", st.one_of(_HOSTNAMES, _IPV4), _PORTS),
    st.builds(lambda h, p: f"[{h}]:{p}", _IPV6, _PORTS),
)


def _optional(strategy: st.SearchStrategy[str]) -> st.SearchStrategy[str | None]:
    return st.none() | strategy


@st.composite
def connection_strings(
    draw: st.DrawFn,
    texts: st.SearchStrategy[str] = _SAFE_TEXT,
    secrets: st.SearchStrategy[str] = _SAFE_TEXT,
) -> ConnectionString:
    """Valid ConnectionString values, built from their components.

    ``texts`` gives the client id and the paths; ``secrets`` the client secret, the
    API key and the certificate password.
    """
    srv = draw(st.booleans())
    if srv:
        hosts: tuple[Endpoint, ...] = (Endpoint(draw(_HOSTNAMES)),)
        name_server = draw(_optional(_NAME_SERVERS))
    else:
        hosts = tuple(draw(st.lists(_ENDPOINTS, min_size=1, max_size=4, unique=True)))
        name_server = None
    client_id = client_secret = api_key = auth = None
    mode = draw(st.sampled_from(["nothing", "auth-none", "client", "api-key"]))
    if mode == "auth-none":
        auth = "none"
    elif mode == "client":
        client_id = draw(texts)
        client_secret = draw(_optional(secrets))
    elif mode == "api-key":
        api_key = draw(secrets)
    disable_tls = draw(st.booleans())
    skip = False
    ca_path = certificate_path = key_path = certificate_password = None
    if not disable_tls:
        skip = draw(st.booleans())
        ca_path = draw(_optional(texts))
        certificate_path = draw(_optional(texts))
        if certificate_path is not None:
            key_path = draw(_optional(texts))
            certificate_password = draw(_optional(secrets))
    return ConnectionString(
        SRV_SCHEME if srv else SCHEME,
        hosts,
        client_id=client_id,
        client_secret=client_secret,
        disable_tls=disable_tls,
        skip_tls_validation=skip,
        ca_path=ca_path,
        certificate_path=certificate_path,
        key_path=key_path,
        certificate_password=certificate_password,
        api_key=api_key,
        auth_port=draw(st.none() | _PORTS),
        auth=auth,
        load_balancer=draw(st.sampled_from(LOAD_BALANCERS)),
        srv_name_server=name_server,
    )


_SECRET_FIELDS = ("client_secret", "api_key", "certificate_password")
_SECRET_QUERY_KEYS = {"apiKey": "api_key", "certificatePassword": "certificate_password"}


def _secret_places(text: str, replacement: str) -> tuple[str, dict[str, str]]:
    """Split a canonical connection string at its secrets' places.

    Returns ``text`` with the client secret and the values of ``apiKey`` and
    ``certificatePassword`` replaced by ``replacement``, and what each place held, by field.
    (Canonical text percent-encodes ``:@?&=`` inside user info and query values.)
    """
    scheme, sep, rest = text.partition("://")
    authority, question, query = rest.partition("?")
    userinfo, at, hosts = authority.rpartition("@")
    held: dict[str, str] = {}
    user, colon, password = userinfo.partition(":")
    if colon:
        held["client_secret"] = password
        userinfo = f"{user}:{replacement}"
    pairs = []
    for pair in query.split("&") if query else []:
        key, _, value = pair.partition("=")
        if key in _SECRET_QUERY_KEYS:
            held[_SECRET_QUERY_KEYS[key]] = value
            value = replacement
        pairs.append(f"{key}={value}")
    return scheme + sep + userinfo + at + hosts + question + "&".join(pairs), held


@settings(max_examples=500, deadline=None, database=None)
@given(connection_strings())
def test_round_trip(value: ConnectionString) -> None:
    text = value.render_as_string(hide_secrets=False)
    assert text.isascii()
    assert not any(c.isspace() for c in text)
    parsed = ConnectionString.parse(text)
    assert parsed == value
    assert hash(parsed) == hash(value)
    assert parsed.render_as_string(hide_secrets=False) == text
    redacted = value.redacted()
    assert str(value) == value.render_as_string() == redacted
    assert repr(value) == f"ConnectionString({redacted!r})"
    # Only the secrets' places change, and each shows ***.
    expected, held = _secret_places(text, "***")
    assert redacted == expected
    _, shown = _secret_places(redacted, "")
    public, _ = _secret_places(text, "")  # everything but the secrets
    unredacted = ConnectionString.parse(redacted)
    for field in _SECRET_FIELDS:
        secret = getattr(value, field)
        if secret is None:
            assert field not in shown
            assert getattr(unredacted, field) is None
            continue
        assert shown[field] == "***", (field, redacted)
        assert getattr(unredacted, field) == "***", (field, redacted)
        encoded = held[field]  # how the full rendering writes the secret
        assert unquote(encoded) == secret
        if encoded not in public:  # else it is also (part of) a host, the id or an option
            assert encoded not in redacted, (field, redacted)


# Every secret holds MARKER, which no other field can: then a rendering that contains
# MARKER, raw or percent-encoded, shows (part of) a secret.
_MARKER = "\u2603"
_MARKED_SECRETS = st.builds(lambda a, b: a + _MARKER + b, _SAFE_TEXT, st.text(max_size=3)).filter(
    lambda secret: _CONTROL_CHAR_RE.search(secret) is None
)
_UNMARKED_TEXT = _SAFE_TEXT.filter(lambda text: _MARKER not in text)


@settings(max_examples=500, deadline=None, database=None)
@given(connection_strings(texts=_UNMARKED_TEXT, secrets=_MARKED_SECRETS))
def test_str_repr_and_redacted_never_contain_a_secret(value: ConnectionString) -> None:
    secrets = [getattr(value, field) for field in _SECRET_FIELDS]
    secrets = [secret for secret in secrets if secret is not None]
    encoded_marker = quote(_MARKER)
    rendered = value.render_as_string(hide_secrets=False)
    if secrets:  # the marker test is meaningful: the full rendering does show them
        assert encoded_marker in rendered
    for text in (str(value), repr(value), value.redacted(), f"{value}", "%s" % value):  # noqa: UP031
        assert _MARKER not in text
        assert encoded_marker not in text
        for secret in secrets:
            assert secret not in text
            assert quote(secret, safe="") not in text
    assert ConnectionString.parse(rendered) == value


@settings(max_examples=300, deadline=None, database=None)
@given(connection_strings())
def test_without_secrets_str_is_the_full_rendering(value: ConnectionString) -> None:
    value = dataclasses.replace(value, client_secret=None, api_key=None, certificate_password=None)
    text = value.render_as_string(hide_secrets=False)
    assert str(value) == value.redacted() == value.render_as_string() == text
    assert repr(value) == f"ConnectionString({text!r})"
    assert ConnectionString.parse(str(value)) == value


_URL_ALPHABET = "abcAZ09:/@[]?&=%,.-_+#~!$'()*; \x00\t\n\u00e9\u0661\ud800ABCDEFabcdef0123456789"
_TOKENS = [
    "chronicle://",
    "chronicle+srv://",
    "CHRONICLE://",
    "http://",
    "[",
    "]",
    "::1",
    "::",
    "fe80::1%25eth0",
    ":",
    "@",
    ",",
    ",,",
    "/",
    "?",
    "&",
    "=",
    "%",
    "%zz",
    "%41",
    "%C3",
    "%C3%A9",
    "%FF",
    "%00",
    "%2",
    "localhost",
    "a",
    "h.example",
    "-",
    ".",
    "1.2.3.4",
    "256",
    "0",
    "35000",
    "65536",
    "99999999999999999999",
    "id",
    "secret",
    "true",
    "FALSE",
    "maybe",
    "none",
    "round-robin",
    "pick-first",
    " ",
    "\x00",
    "#",
    *QUERY_KEYS,
    *(key.upper() for key in QUERY_KEYS),
]
_PREFIXES = st.sampled_from(["chronicle://", "chronicle+srv://", "Chronicle://", ""])
# Pieces that are mostly valid, so that the parser gets past the early checks.
_MESSY = st.text(alphabet="abcAZ09:/@[]?&=%,.-_+~!$'()*;\u00e9", max_size=6)
_GOOD_USER = st.sampled_from(["", "", "", "id@", "id:pw@", "i%C3%A9:p%2F@"])
_STRUCTURED_USER = st.one_of(
    _GOOD_USER,
    _GOOD_USER,
    _GOOD_USER,
    st.sampled_from([":pw@", "i%zz@", "@", "id:@"]),
    _MESSY.map(lambda text: text + "@"),
)
_GOOD_HOST = st.sampled_from(
    ["localhost", "a", "b", "A.Example", "[::1]", "[::1]:1", "1.2.3.4", "h:1"]
)
_STRUCTURED_HOST = st.one_of(
    _GOOD_HOST,
    _GOOD_HOST,
    _GOOD_HOST,
    st.sampled_from(
        [
            "localhost",
            "a",
            "A.Example",
            "[::1]",
            "[::1]:1",
            "1.2.3.4",
            "h:0",
            "h:65535",
            "h:65536",
            "h:99999999999999999999",
            "",
            "[::1",
            "::1",
            "h.example:35000",
            "a..b",
        ]
    ),
    _MESSY,
)
_STRUCTURED_VALUE = st.one_of(
    st.sampled_from(["true", "false", "none", "round-robin", "/x", "1", "ns:53"]),
    st.sampled_from(
        [
            "true",
            "false",
            "TRUE",
            "maybe",
            "none",
            "round-robin",
            "Pick-First",
            "0",
            "1",
            "65535",
            "65536",
            "99999999999999999999",
            "/x",
            "%zz",
            "%C3",
            "%00",
            "%41",
            "",
            "a@b",
            "[::1]:53",
            "ns:53",
            "::1",
        ]
    ),
    _MESSY,
)
_STRUCTURED_QUERY = st.lists(
    st.builds(
        lambda key, equals, value: key + equals + value,
        st.sampled_from([*QUERY_KEYS, *(k.upper() for k in QUERY_KEYS), "foo", "", "a%zz"]),
        st.sampled_from(["=", "=", "=", "", "=="]),
        _STRUCTURED_VALUE,
    ),
    max_size=6,
).map("&".join)
_STRUCTURED = st.builds(
    lambda scheme, user, hosts, slash, query: f"{scheme}{user}{hosts}{slash}{query}",
    st.sampled_from(["chronicle://"] * 3 + ["chronicle+srv://", "CHRONICLE://", "chronicle:/"]),
    _STRUCTURED_USER,
    st.lists(_STRUCTURED_HOST, max_size=3).map(",".join),
    st.sampled_from(["", "", "", "/", "/", "//"]),
    st.one_of(st.just(""), st.just("?"), _STRUCTURED_QUERY.map(lambda query: "?" + query)),
)
_ARBITRARY_TEXT = st.one_of(
    st.text(),
    _STRUCTURED,
    st.builds(lambda p, s: p + s, _PREFIXES, st.text(alphabet=_URL_ALPHABET)),
    st.builds(lambda p, parts: p + "".join(parts), _PREFIXES, st.lists(st.sampled_from(_TOKENS))),
)


def _parse_or_error(text: str) -> ConnectionString | ConnectionStringError:
    """Parse ``text``; any exception other than ConnectionStringError propagates."""
    try:
        return ConnectionString.parse(text)
    except ConnectionStringError as exc:
        return exc


def _check_arbitrary(text: str) -> None:
    value = _parse_or_error(text)
    if isinstance(value, ConnectionStringError):
        check_error(value, None)  # option is in OPTIONS, one-line message
        return
    assert isinstance(value, ConnectionString)
    rendered = value.render_as_string(hide_secrets=False)
    again = ConnectionString.parse(rendered)
    assert again == value
    assert again.render_as_string(hide_secrets=False) == rendered
    assert str(again) == str(value)
    assert repr(value).startswith("ConnectionString(")


@settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(_ARBITRARY_TEXT)
def test_arbitrary_text_only_raises_connection_string_error(text: str) -> None:
    _check_arbitrary(text)


@pytest.mark.slow
@pytest.mark.timeout(300)
@settings(
    max_examples=10_000,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(_ARBITRARY_TEXT)
def test_arbitrary_text_only_raises_connection_string_error_many(text: str) -> None:
    _check_arbitrary(text)


_MESSY_TAIL = st.lists(st.sampled_from(_TOKENS)).map("".join)


@settings(max_examples=300, deadline=None, database=None)
@given(
    st.sampled_from(
        [
            f"chronicle://id:{SECRET}@",
            f"chronicle://id:{SECRET}",
            f"chronicle://:{SECRET}",
            f"chronicle://id:se?{SECRET}@",
            f"chronicle://id:1?{SECRET}@",
            f"chronicle://id:se/{SECRET}@",
            f"chronicle://id:s:e?{SECRET}@",
            f"chronicle://h?apiKey={API_KEY}",
            f"chronicle://h?certificatePath=/c&certificatePassword={CERT_PASSWORD}",
        ]
    ),
    _MESSY_TAIL,
)
def test_errors_never_echo_secrets(prefix: str, tail: str) -> None:
    value = _parse_or_error(prefix + tail)
    if isinstance(value, ConnectionStringError):
        for link in _chain(value):
            for secret in (SECRET, API_KEY, CERT_PASSWORD):
                assert secret not in str(link)
                assert secret not in repr(link)
        return
    for secret in (SECRET, API_KEY, CERT_PASSWORD):
        assert secret not in repr(value)
        assert secret not in value.redacted()


@pytest.mark.parametrize("secret_key", ["apiKey", "certificatePassword"])
def test_a_secret_cut_at_a_raw_ampersand_is_not_quoted(secret_key):
    """``?apiKey=abc&def``: the "unknown key" is the rest of the secret; never quote it."""
    text = f"chronicle://h?disableTls=false&{secret_key}=abc&Sekr3tRest"
    if secret_key == "certificatePassword":
        text = f"chronicle://h?certificatePath=/x.p12&{secret_key}=abc&Sekr3tRest"
    with pytest.raises(ConnectionStringError) as info:
        ConnectionString.parse(text)
    assert "Sekr3tRest" not in str(info.value)
    assert info.value.option == "query"
    assert "%26" in str(info.value)  # and it says what to change
    with pytest.raises(ConnectionStringError) as info:
        ConnectionString.parse(f"chronicle://h?{secret_key}=abc&Sekr%zzRest")
    assert "Sekr" not in str(info.value)
