"""Tests for chronicle_conn.connection_string."""

from __future__ import annotations

import dataclasses
import pickle
from collections.abc import Iterator
from urllib.parse import unquote

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


def parse(text: str) -> ConnectionString:
    return ConnectionString.parse(text)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def expect_error(text: str, *fragments: str, secrets: tuple[str, ...] = ()) -> str:
    """Parse ``text``, expecting exactly a ConnectionStringError naming every fragment."""
    with pytest.raises(ConnectionStringError) as info:
        parse(text)
    exc = info.value
    assert type(exc) is ConnectionStringError
    assert isinstance(exc, ValueError)
    message = str(exc)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    for secret in (SECRET, API_KEY, CERT_PASSWORD, *secrets):
        for link in _chain(exc):
            assert secret not in str(link), (secret, message)
            assert secret not in repr(link), (secret, message)
    return message


def expect_construction_error(*fragments: str, **kwargs: object) -> None:
    with pytest.raises(ConnectionStringError) as info:
        ConnectionString(**kwargs)  # type: ignore[arg-type]
    assert type(info.value) is ConnectionStringError
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
    assert dataclasses.replace(dev, client_id=None, client_secret=None) == default
    assert str(dev) == "chronicle://chronicle-dev-client:chronicle-dev-secret@localhost:35000"
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
    assert parse(str(cs)) == cs


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
    assert parse(str(cs)) == cs


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
    assert parse(str(cs)) == cs


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
    ("host", "port", "fragment"),
    [
        ("", 1, "is empty"),
        ("a b", 1, "'a b'"),
        ("[::1]", 1, "'[::1]'"),
        ("-a", 1, "'-a'"),
        ("a..b", 1, "empty label"),
        ("x" * 64, 1, "not a valid host name"),
        (("a." * 127) + "b", 1, "longer than 253"),
        ("1.2.3.256", 1, "IPv4"),
        ("::g", 1, "IPv6"),
        ("fe80::1%eth0", 1, "zone"),
        ("a", 0, "out of range"),
        ("a", 65536, "out of range"),
        ("a", True, "int"),
        ("a", "80", "int"),
        (b"a", 1, "str"),
    ],
)
def test_endpoint_validation(host: object, port: object, fragment: str) -> None:
    with pytest.raises(ConnectionStringError) as info:
        Endpoint(host, port)  # type: ignore[arg-type]
    assert fragment in str(info.value)


def test_srv() -> None:
    cs = parse("chronicle+srv://user:pw@Kernel.Example/?loadBalancer=round-robin")
    assert cs.scheme == SRV_SCHEME
    assert cs.is_srv
    assert cs.service_name == "kernel.example"
    assert cs.hosts == (Endpoint("kernel.example", DEFAULT_PORT),)
    assert cs.client_id == "user"
    assert str(cs) == "chronicle+srv://user:pw@kernel.example?loadBalancer=round-robin"
    assert parse("CHRONICLE+SRV://svc") == ConnectionString(SRV_SCHEME, (Endpoint("svc"),))


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("chronicle+srv://svc:35000", ("port '35000'", "'svc'")),
        ("chronicle+srv://svc:", ("port ''",)),
        ("chronicle+srv://a,b", ("exactly one service name",)),
        ("chronicle+srv://a,", ("exactly one service name",)),
        ("chronicle+srv://", ("no host",)),
        ("chronicle+srv://[::1]", ("DNS service name",)),
        ("chronicle+srv://10.0.0.1", ("DNS service name",)),
        ("chronicle+srv://svc?srvNameServer=a:b", ("srvNameServer", "not a number")),
        ("chronicle+srv://svc?srvNameServer=a:99999", ("srvNameServer", "out of range")),
        ("chronicle+srv://svc?srvNameServer=[::1", ("srvNameServer", "unclosed")),
        ("chronicle+srv://svc?srvNameServer=::g", ("srvNameServer", "IPv6")),
        ("chronicle+srv://svc?srvNameServer=", ("srvNameServer", "empty value")),
        ("chronicle://h?srvNameServer=ns", ("srvNameServer", "chronicle+srv")),
    ],
)
def test_srv_errors(text: str, fragments: tuple[str, ...]) -> None:
    expect_error(text, *fragments)


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
    assert parse(str(cs)) == cs


def test_query_values_are_percent_decoded_and_plus_is_literal() -> None:
    cs = parse("chronicle://h?caPath=/my%20certs/ca%2Bx.pem&apiKey=a+b%3D%26")
    assert cs.ca_path == "/my certs/ca+x.pem"
    assert cs.api_key == "a+b=&"
    assert parse("chronicle://h?apiKey=a=b").api_key == "a=b"
    assert parse("chronicle://h?caPath=/a?b").ca_path == "/a?b"


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        # scheme
        ("", ("missing scheme",)),
        ("localhost:35000", ("missing scheme",)),
        ("://h", ("missing scheme",)),
        ("http://h", ("unknown scheme 'http'",)),
        ("chronicle+tls://h", ("unknown scheme 'chronicle+tls'",)),
        ("chronicle:/h", ("missing scheme",)),
        # characters
        ("chronicle://h\x00", ("control character", "index 13")),
        ("chronicle://\x7fh", ("control character",)),
        (" chronicle://h", ("whitespace", "index 0")),
        ("chronicle://h ", ("whitespace",)),
        ("chronicle://h\n", ("whitespace",)),
        ("chronicle://h?caPath=a b", ("whitespace",)),
        ("chronicle://h\u00a0", ("whitespace",)),
        ("chronicle://h\ud800", ("control character",)),
        ("chronicle://h#frag", ("'#'",)),
        # hosts
        ("chronicle://", ("no host",)),
        ("chronicle:///", ("no host",)),
        ("chronicle://?apiKey=x", ("no host",)),
        ("chronicle://id@", ("no host",)),
        ("chronicle://a,,b", ("stray ','",)),
        ("chronicle://,a", ("stray ','",)),
        ("chronicle://a,", ("stray ','",)),
        ("chronicle://a:1,a:1", ("'a:1'", "more than once")),
        ("chronicle://A,a", ("'a:35000'", "more than once")),
        ("chronicle://:35000", ("port without a host name",)),
        ("chronicle://a:", ("empty port", "'a'")),
        ("chronicle://a:0", ("port '0' of host 'a' is out of range 1..65535",)),
        ("chronicle://a:99999", ("port '99999' of host 'a' is out of range 1..65535",)),
        ("chronicle://a:65536", ("port '65536'", "out of range")),
        ("chronicle://a:99999999999999999999", ("port '99999999999999999999'", "range")),
        ("chronicle://a:" + "9" * 5000, ("out of range",)),
        ("chronicle://a:-1", ("the port of host 'a' is not a number",)),
        ("chronicle://a:+1", ("the port of host 'a' is not a number",)),
        ("chronicle://a:1e3", ("the port of host 'a' is not a number",)),
        ("chronicle://a:\u0661\u0662", ("not a number",)),
        ("chronicle://a:1:2", ("several ':'",)),
        ("chronicle://::1", ("a host '::1' in the host list has several ':'", "brackets")),
        ("chronicle://[::1", ("unclosed '['",)),
        ("chronicle://[::1]x", ("after ']'",)),
        ("chronicle://[::1]]", ("after ']'",)),
        ("chronicle://[]", ("only IPv6 addresses go in brackets",)),
        ("chronicle://[a]", ("only IPv6 addresses go in brackets",)),
        ("chronicle://[1.2.3.4]:1", ("only IPv6",)),
        ("chronicle://a]", ("misplaced '[' or ']'",)),
        ("chronicle://a[::1]", ("misplaced '[' or ']'",)),
        ("chronicle://[::g]", ("a host is not a valid IPv6",)),
        ("chronicle://[::12345]", ("host '::12345' is not a valid IPv6",)),
        ("chronicle://[:::1]", ("not a valid IPv6",)),
        ("chronicle://[fe80::1%25eth0]", ("zone",)),
        ("chronicle://[::1]:99999", ("port '99999' of host '::1'", "out of range")),
        ("chronicle://a..b", ("empty label",)),
        ("chronicle://.a", ("empty label",)),
        ("chronicle://a.", ("empty label",)),
        ("chronicle://-a", ("'-a'", "not a valid host name")),
        ("chronicle://a-", ("not a valid host name",)),
        ("chronicle://a%41", ("not a valid host name",)),
        ("chronicle://h\u00e9", ("not a valid host name",)),
        ("chronicle://" + "a" * 64, ("not a valid host name",)),
        ("chronicle://" + "a." * 130 + "b", ("longer than 253",)),
        ("chronicle://1.2.3.256", ("IPv4",)),
        ("chronicle://123", ("IPv4",)),
        ("chronicle://a.123", ("IPv4",)),
        ("chronicle://01.2.3.4", ("IPv4",)),
        # path
        ("chronicle://h/db", ("unexpected path",)),
        ("chronicle://h//", ("unexpected path",)),
        # user info
        ("chronicle://@h", ("empty client id",)),
        ("chronicle://:pw@h", ("secret was given without a client id",)),
        ("chronicle://id:@h", ("empty client secret",)),
        ("chronicle://a@b@h", ("'@'", "%40")),
        ("chronicle://i%zzd@h", ("client id", "'%'")),
        ("chronicle://i%ffd@h", ("client id", "UTF-8")),
        ("chronicle://i%00d@h", ("client id", "control character")),
        # query
        ("chronicle://h?&", ("stray '&'",)),
        ("chronicle://h?apiKey=k&", ("stray '&'",)),
        ("chronicle://h?&apiKey=k", ("stray '&'",)),
        ("chronicle://h?apiKey=k&&auth=none", ("stray '&'",)),
        ("chronicle://h?foo=1", ("unknown query key 'foo'; valid keys: apiKey, auth,",)),
        ("chronicle://h?=1", ("unknown query key ''",)),
        ("chronicle://h?fo%zz=1", ("query key", "'fo%zz'", "'%'")),
        ("chronicle://h?disableTls", ("'disableTls'", "no value")),
        ("chronicle://h?disableTls=", ("'disableTls'", "empty value")),
        ("chronicle://h?caPath=", ("'caPath'", "empty value")),
        ("chronicle://h?apiKey=", ("'apiKey'", "empty value")),
        ("chronicle://h?disableTls=true&disableTls=true", ("'disableTls'", "more than once")),
        ("chronicle://h?disableTls=true&DISABLETLS=false", ("'disableTls'", "more than once")),
        ("chronicle://h?disableTls=maybe", ("'disableTls'", "'maybe'")),
        ("chronicle://h?skipTlsValidation=1", ("'skipTlsValidation'", "'1'")),
        ("chronicle://h?disableTls=yes", ("'disableTls'", "'yes'")),
        ("chronicle://h?authPort=0", ("'authPort'", "'0'")),
        ("chronicle://h?authPort=65536", ("'authPort'", "'65536'")),
        ("chronicle://h?authPort=abc", ("'authPort'", "'abc'")),
        ("chronicle://h?authPort=-5", ("'authPort'", "'-5'")),
        ("chronicle://h?authPort=99999999999999999999", ("'authPort'", "1..65535")),
        ("chronicle://h?auth=oauth", ("auth", "'none'", "'oauth'")),
        ("chronicle://h?loadBalancer=random", ("loadBalancer", "'random'", "'round-robin'")),
        ("chronicle://h?caPath=%zz", ("'caPath'", "'%zz'", "'%'")),
        ("chronicle://h?caPath=%C3", ("'caPath'", "UTF-8")),
        ("chronicle://h?caPath=a%0Ab", ("caPath", "control character")),
        ("chronicle://h?keyPath=/k", ("keyPath requires certificatePath",)),
        ("chronicle://h?certificatePassword=p", ("certificatePassword requires certificatePath",)),
        # contradictions
        (
            "chronicle://h?disableTls=true&skipTlsValidation=true",
            ("disableTls", "skipTlsValidation"),
        ),
        ("chronicle://h?disableTls=true&caPath=/ca", ("disableTls", "caPath")),
        ("chronicle://h?disableTls=true&certificatePath=/c", ("disableTls", "certificatePath")),
        (
            "chronicle://h?disableTls=true&certificatePath=/c&keyPath=/k",
            ("disableTls", "certificatePath"),
        ),
        ("chronicle://id@h?auth=none", ("auth=none", "client credentials")),
        ("chronicle://h?auth=none&apiKey=k", ("auth=none", "apiKey")),
        ("chronicle://id@h?apiKey=k", ("client credentials", "apiKey")),
    ],
)
def test_errors(text: str, fragments: tuple[str, ...]) -> None:
    expect_error(text, *fragments)


@pytest.mark.parametrize(
    "text",
    [
        "chronicle://id:se?cret@h",
        "chronicle://id:12?cret@h",
        "chronicle://id:s@e?cret=1@h",
        "chronicle://h?caPath=/a@b&disableTls=maybe",
    ],
)
def test_at_sign_after_the_host_list_gives_a_message_that_quotes_nothing(text: str) -> None:
    message = expect_error(text, "'@' after the host list", "percent-encode")
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


def test_length_is_bounded() -> None:
    prefix = "chronicle://h:35000?caPath="
    fits = prefix + "a" * (MAX_LENGTH - len(prefix))
    assert len(fits) == MAX_LENGTH
    assert parse(fits).ca_path == "a" * (MAX_LENGTH - len(prefix))
    assert str(parse(fits)) == fits
    message = expect_error(fits + "a", "characters long", str(MAX_LENGTH))
    assert len(message) < 200
    expect_error("chronicle://" + "a" * 10_000_000, "characters long")


def test_canonical_form_is_bounded_too() -> None:
    hosts = ",".join(f"h{i}" for i in range(7000))
    assert len("chronicle://" + hosts) < MAX_LENGTH
    expect_error("chronicle://" + hosts, "canonical form", str(MAX_LENGTH))
    expect_construction_error("canonical form", ca_path="\u00e9" * 20_000)
    fits = ConnectionString(ca_path="a" * 60_000)
    assert parse(str(fits)) == fits


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


def test_str_redacted_and_repr() -> None:
    cs = parse(f"chronicle://id:{SECRET}@h?certificatePath=/c&certificatePassword={CERT_PASSWORD}")
    assert SECRET in str(cs)
    assert CERT_PASSWORD in str(cs)
    assert cs.redacted() == (
        "chronicle://id:***@h:35000?certificatePassword=***&certificatePath=/c"
    )
    assert repr(cs) == f"ConnectionString({cs.redacted()!r})"
    api = parse(f"chronicle://h?apiKey={API_KEY}")
    assert api.redacted() == "chronicle://h:35000?apiKey=***"
    for value in (cs, api):
        for text in (repr(value), value.redacted(), repr([value]), f"{value!r}"):
            assert SECRET not in text
            assert API_KEY not in text
            assert CERT_PASSWORD not in text


def test_a_secret_of_stars_is_not_confused_with_redaction() -> None:
    cs = ConnectionString(client_id="i", client_secret="***")
    assert str(cs) == "chronicle://i:%2A%2A%2A@localhost:35000"
    assert parse(str(cs)) == cs
    assert cs.redacted() == "chronicle://i:***@localhost:35000"


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
def test_canonical_str(text: str, canonical: str) -> None:
    cs = parse(text)
    assert str(cs) == canonical
    assert parse(canonical) == cs
    assert str(parse(canonical)) == canonical


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
    assert parse(str(cs)) == cs
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
    ("kwargs", "fragment"),
    [
        ({"scheme": "http"}, "scheme"),
        ({"scheme": 1}, "scheme"),
        ({"hosts": ()}, "non-empty tuple"),
        ({"hosts": [Endpoint("a")]}, "tuple"),
        ({"hosts": ("a:1",)}, "Endpoint"),
        ({"hosts": (Endpoint("a"), Endpoint("A"))}, "more than once"),
        ({"scheme": SRV_SCHEME, "hosts": (Endpoint("a"), Endpoint("b"))}, "exactly one"),
        ({"scheme": SRV_SCHEME, "hosts": (Endpoint("a", 1),)}, "port '1'"),
        ({"scheme": SRV_SCHEME, "hosts": (Endpoint("::1"),)}, "DNS service name"),
        ({"client_id": ""}, "client id"),
        ({"client_id": 5}, "client id"),
        ({"client_id": "a\x00"}, "control character"),
        ({"disable_tls": "true"}, "disableTls"),
        ({"skip_tls_validation": 1}, "skipTlsValidation"),
        ({"ca_path": ""}, "caPath"),
        ({"ca_path": b"/x"}, "caPath"),
        ({"certificate_path": "c\x00"}, "certificatePath"),
        ({"key_path": "k"}, "keyPath requires certificatePath"),
        ({"auth_port": 0}, "authPort"),
        ({"auth_port": 70000}, "authPort"),
        ({"auth_port": True}, "authPort"),
        ({"auth_port": "80"}, "authPort"),
        ({"auth": "basic"}, "auth"),
        ({"load_balancer": "random"}, "loadBalancer"),
        ({"load_balancer": None}, "loadBalancer"),
        ({"srv_name_server": "ns"}, "chronicle+srv"),
        ({"scheme": SRV_SCHEME, "srv_name_server": "a b:c"}, "srvNameServer"),
        ({"disable_tls": True, "skip_tls_validation": True}, "skipTlsValidation"),
        ({"disable_tls": True, "ca_path": "/ca"}, "caPath"),
        ({"auth": "none", "api_key": "k"}, "auth=none"),
        ({"auth": "none", "client_id": "i"}, "auth=none"),
    ],
)
def test_direct_construction_is_validated(kwargs: dict[str, object], fragment: str) -> None:
    expect_construction_error(fragment, **kwargs)


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
    assert parse(str(cs)) == cs


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
def connection_strings(draw: st.DrawFn) -> ConnectionString:
    """Valid ConnectionString values, built from their components."""
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
        client_id = draw(_SAFE_TEXT)
        client_secret = draw(_optional(_SAFE_TEXT))
    elif mode == "api-key":
        api_key = draw(_SAFE_TEXT)
    disable_tls = draw(st.booleans())
    skip = False
    ca_path = certificate_path = key_path = certificate_password = None
    if not disable_tls:
        skip = draw(st.booleans())
        ca_path = draw(_optional(_SAFE_TEXT))
        certificate_path = draw(_optional(_SAFE_TEXT))
        if certificate_path is not None:
            key_path = draw(_optional(_SAFE_TEXT))
            certificate_password = draw(_optional(_SAFE_TEXT))
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
    text = str(value)
    assert text.isascii()
    assert not any(c.isspace() for c in text)
    parsed = ConnectionString.parse(text)
    assert parsed == value
    assert hash(parsed) == hash(value)
    assert str(parsed) == text
    redacted = value.redacted()
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
        encoded = held[field]  # how str() writes the secret
        assert unquote(encoded) == secret
        if encoded not in public:  # else it is also (part of) a host, the id or an option
            assert encoded not in redacted, (field, redacted)


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
        assert type(value) is ConnectionStringError
        assert isinstance(value, ValueError)
        assert str(value)
        return
    assert isinstance(value, ConnectionString)
    again = ConnectionString.parse(str(value))
    assert again == value
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
