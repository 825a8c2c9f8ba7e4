"""SRV look-up (chronicle_conn._srv) against a real DNS server on loopback
(tests/harness/dns.py): ordering, weights, the additional section, failures, time bounds."""

from __future__ import annotations

import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import dns.nameserver
import dns.resolver
import pytest

from chronicle_conn import _srv
from chronicle_conn._srv import SrvLookupError, SrvTarget, lookup, require_dnspython
from chronicle_conn.connection_string import ConnectionString
from chronicle_conn.errors import ChronicleConnError, ConfigurationError
from tests.harness.dns import DnsServer

SERVICE = "kernels.example"
SRV_NAME = f"_chronicle._tcp.{SERVICE}"
TIMEOUT = 3.0


@pytest.fixture
def server() -> Iterator[DnsServer]:
    with DnsServer() as dns_server:
        yield dns_server


def _two_targets(server: DnsServer) -> None:
    server.set_srv(SRV_NAME, [(10, 50, 35000, "k1.example"), (10, 50, 35001, "k2.example")])
    server.set_a("k1.example", ["10.0.0.1"])
    server.set_aaaa("k1.example", ["fd00::1"])
    server.set_a("k2.example", ["10.0.0.2"])


def _fake_getaddrinfo(
    monkeypatch: pytest.MonkeyPatch,
    table: dict[str, list[str]],
    block: threading.Event | None = None,
) -> None:
    """Answer getaddrinfo for the names in ``table`` (``block``: names mapped to [] wait on
    it, then fail); other names go to the real one."""
    real = socket.getaddrinfo

    def fake(host, port, *args, **kwargs):
        if host not in table:
            return real(host, port, *args, **kwargs)
        if not table[host]:
            if block is not None:
                block.wait(10)
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [
            (
                socket.AF_INET6 if ":" in address else socket.AF_INET,
                socket.SOCK_STREAM,
                6,
                "",
                (address, port or 0, 0, 0) if ":" in address else (address, port or 0),
            )
            for address in table[host]
        ]

    monkeypatch.setattr(socket, "getaddrinfo", fake)


# -- results and order ---------------------------------------------------------------------


@pytest.mark.timeout(20)
def test_lookup_returns_targets_with_ipv4_and_ipv6_addresses(server: DnsServer) -> None:
    server.set_srv(SRV_NAME, [(10, 5, 35000, "k1.example")])
    server.set_a("k1.example", ["10.0.0.1", "10.0.0.11"])
    server.set_aaaa("k1.example", ["fd00::1"])

    (target,) = lookup(SERVICE, server.address, TIMEOUT)

    assert (target.host, target.port, target.priority, target.weight) == (
        "k1.example",
        35000,
        10,
        5,
    )
    # A records (in the answer's order, which DNS does not fix), then AAAA.
    assert sorted(target.addresses[:2]) == ["10.0.0.1", "10.0.0.11"]
    assert target.addresses[2:] == ("fd00::1",)


@pytest.mark.timeout(20)
def test_priorities_order_the_result(server: DnsServer) -> None:
    server.set_srv(
        SRV_NAME,
        [(30, 1, 3, "c.example"), (10, 1, 1, "a.example"), (20, 100, 2, "b.example")],
    )
    for index, name in enumerate(["a.example", "b.example", "c.example"], 1):
        server.set_a(name, [f"10.0.0.{index}"])

    for seed in range(5):
        targets = lookup(SERVICE, server.address, TIMEOUT, rng=random.Random(seed))
        assert [(t.priority, t.host, t.port) for t in targets] == [
            (10, "a.example", 1),
            (20, "b.example", 2),
            (30, "c.example", 3),
        ]


@pytest.mark.timeout(60)
def test_weights_pick_the_heavy_target_first_in_proportion(server: DnsServer) -> None:
    server.set_additional(True)  # one query per look-up
    server.set_srv(SRV_NAME, [(10, 90, 1, "heavy.example"), (10, 10, 2, "light.example")])
    server.set_a("heavy.example", ["10.0.0.1"])
    server.set_a("light.example", ["10.0.0.2"])
    rng = random.Random(2782)

    firsts = [lookup(SERVICE, server.address, TIMEOUT, rng=rng)[0].host for _ in range(300)]

    share = firsts.count("heavy.example") / len(firsts)
    assert 0.80 <= share <= 0.97, share
    assert "light.example" in firsts


@pytest.mark.timeout(60)
def test_weight_zero_targets_are_kept_and_can_come_first(server: DnsServer) -> None:
    server.set_additional(True)
    server.set_srv(SRV_NAME, [(10, 0, 1, "zero.example"), (10, 9, 2, "nine.example")])
    server.set_a("zero.example", ["10.0.0.1"])
    server.set_a("nine.example", ["10.0.0.2"])
    rng = random.Random(7)

    results = [lookup(SERVICE, server.address, TIMEOUT, rng=rng) for _ in range(300)]

    assert all(sorted(t.host for t in r) == ["nine.example", "zero.example"] for r in results)
    zero_first = sum(r[0].host == "zero.example" for r in results)
    # Selected first when the draw in 0..9 is 0: 1 in 10.
    assert 5 <= zero_first <= 70, zero_first


@pytest.mark.timeout(10)
def test_order_unit() -> None:
    record = _srv._Record
    records = [record(2, 0, 1, "b"), record(1, 0, 2, "a1"), record(1, 0, 3, "a2")]
    rng = random.Random(1)
    seen_first: set[str] = set()
    for _ in range(50):
        ordered = _srv._order(records, rng)
        assert sorted(r.target for r in ordered[:2]) == ["a1", "a2"]
        assert ordered[2].target == "b"
        seen_first.add(ordered[0].target)
    # All weights 0: any order within the priority.
    assert seen_first == {"a1", "a2"}
    assert _srv._order([], rng) == []


# -- where addresses come from ---------------------------------------------------------------


@pytest.mark.timeout(20)
def test_additional_section_is_used_when_present(server: DnsServer) -> None:
    _two_targets(server)
    server.set_additional(True)

    targets = lookup(SERVICE, server.address, TIMEOUT)

    assert {t.host: t.addresses for t in targets} == {
        "k1.example": ("10.0.0.1", "fd00::1"),
        "k2.example": ("10.0.0.2",),
    }
    assert server.query_count(SRV_NAME, "SRV") == 1
    for name in ("k1.example", "k2.example"):
        assert server.query_count(name, "A") == 0
        assert server.query_count(name, "AAAA") == 0


@pytest.mark.timeout(20)
def test_separate_address_queries_without_additional_section(server: DnsServer) -> None:
    _two_targets(server)

    targets = lookup(SERVICE, server.address, TIMEOUT)

    assert {t.host: t.addresses for t in targets} == {
        "k1.example": ("10.0.0.1", "fd00::1"),
        "k2.example": ("10.0.0.2",),
    }
    for name in ("k1.example", "k2.example"):
        assert server.query_count(name, "A") == 1
        assert server.query_count(name, "AAAA") == 1


@pytest.mark.timeout(20)
def test_only_targets_missing_from_the_additional_section_are_queried(server: DnsServer) -> None:
    server.set_additional(True)
    server.set_srv(SRV_NAME, [(10, 50, 35000, "k1.example"), (10, 50, 35001, "k3.example")])
    server.set_a("k1.example", ["10.0.0.1"])  # in the additional section; k3 has no record

    targets = lookup(SERVICE, server.address, TIMEOUT)

    assert [t.host for t in targets] == ["k1.example"]
    assert server.query_count("k1.example", "A") == 0
    assert server.query_count("k1.example", "AAAA") == 0
    assert server.query_count("k3.example", "A") == 1
    assert server.query_count("k3.example", "AAAA") == 0  # NXDOMAIN ends that name


@pytest.mark.timeout(20)
def test_truncated_answer_is_fetched_over_tcp(server: DnsServer) -> None:
    records = [(10, 1, 35000 + i, f"kernel-{i:02d}.a-rather-long-zone.example") for i in range(30)]
    server.set_srv(SRV_NAME, records)
    server.set_additional(True)
    for i in range(30):
        server.set_a(f"kernel-{i:02d}.a-rather-long-zone.example", [f"10.0.1.{i}"])

    targets = lookup(SERVICE, server.address, TIMEOUT)

    assert len(targets) == 30
    assert {t.addresses[0] for t in targets} == {f"10.0.1.{i}" for i in range(30)}
    assert server.query_count(SRV_NAME, "SRV") == 2  # UDP (truncated), then TCP
    assert server.tcp_query_count == 1


@pytest.mark.timeout(20)
def test_changed_records_change_the_next_lookup(server: DnsServer) -> None:
    _two_targets(server)
    assert {t.host for t in lookup(SERVICE, server.address, TIMEOUT)} == {
        "k1.example",
        "k2.example",
    }

    server.set_srv(SRV_NAME, [(10, 50, 36000, "k2.example")])
    server.set_a("k2.example", ["10.0.0.22"])
    assert lookup(SERVICE, server.address, TIMEOUT) == [
        SrvTarget("k2.example", 36000, 10, 50, ("10.0.0.22",))
    ]

    server.remove(SRV_NAME)
    with pytest.raises(SrvLookupError, match="no SRV record"):
        lookup(SERVICE, server.address, TIMEOUT)


@pytest.mark.timeout(20)
def test_targets_without_addresses_are_dropped(server: DnsServer) -> None:
    server.set_srv(
        SRV_NAME,
        [(1, 1, 1, "gone.example"), (2, 1, 2, "k1.example"), (3, 1, 3, "empty.example")],
    )
    server.set_a("k1.example", ["10.0.0.1"])
    server.set_srv("empty.example", [])  # the name exists, with no address

    assert [t.host for t in lookup(SERVICE, server.address, TIMEOUT)] == ["k1.example"]

    server.remove("k1.example")
    with pytest.raises(SrvLookupError) as caught:
        lookup(SERVICE, server.address, TIMEOUT)
    message = str(caught.value)
    assert "gone.example, k1.example, empty.example" in message
    assert SRV_NAME in message
    assert "\n" not in message


@pytest.mark.timeout(20)
def test_target_given_as_an_address_needs_no_query(server: DnsServer) -> None:
    server.set_srv(SRV_NAME, [(1, 1, 35000, "10.9.9.9")])  # not standard, but seen
    server.set_a("10.9.9.9", ["10.0.0.1"])  # would be wrong to use

    assert lookup(SERVICE, server.address, TIMEOUT)[0].addresses == ("10.9.9.9",)
    assert server.query_count("10.9.9.9", "A") == 0


# -- failures ------------------------------------------------------------------------------


@pytest.mark.timeout(20)
def test_missing_record_names_the_record_and_the_server(server: DnsServer) -> None:
    with pytest.raises(SrvLookupError) as caught:
        lookup("missing.example", server.address, TIMEOUT)

    message = str(caught.value)
    assert message == (
        f"no SRV record _chronicle._tcp.missing.example at {server.address}: "
        "set the record or use chronicle://host:port"
    )
    assert caught.value.name == "_chronicle._tcp.missing.example"
    assert caught.value.name_server == server.address
    assert isinstance(caught.value, ChronicleConnError)


@pytest.mark.timeout(20)
def test_name_without_srv_records(server: DnsServer) -> None:
    server.set_a(SRV_NAME, ["10.0.0.1"])  # exists, but no SRV

    with pytest.raises(SrvLookupError) as caught:
        lookup(SERVICE, server.address, TIMEOUT)

    message = str(caught.value)
    assert message.startswith(f"no SRV record {SRV_NAME} at {server.address} (the name exists")
    assert "\n" not in message


@pytest.mark.timeout(20)
def test_silent_name_server_fails_within_the_timeout(server: DnsServer) -> None:
    _two_targets(server)
    server.set_silent(True)
    timeout = 1.0

    started = time.monotonic()
    with pytest.raises(SrvLookupError) as caught:
        lookup(SERVICE, server.address, timeout)
    elapsed = time.monotonic() - started

    assert elapsed < timeout + 1.0, elapsed
    assert server.query_count(SRV_NAME, "SRV") >= 1
    assert str(caught.value) == (
        f"no answer for SRV {SRV_NAME} from {server.address} within 1s: "
        "check the name server, or use chronicle://host:port"
    )


@pytest.mark.timeout(20)
def test_name_server_that_comes_back_is_asked_again(server: DnsServer) -> None:
    _two_targets(server)
    server.set_additional(True)
    server.set_silent(True)
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(lookup(SERVICE, server.address, 6.0))
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert server.wait_for_queries(SRV_NAME, "SRV", 1, timeout=5.0)
    server.set_silent(False)  # the first query stays unanswered; the retry is not
    thread.join(10)

    assert not thread.is_alive()
    (result,) = outcome
    assert isinstance(result, list), result
    assert {t.host for t in result} == {"k1.example", "k2.example"}
    assert server.query_count(SRV_NAME, "SRV") >= 2


@pytest.mark.timeout(20)
def test_unanswered_address_queries_are_bounded_by_the_timeout(server: DnsServer) -> None:
    _two_targets(server)
    server.set_silent(True, names=["k1.example", "k2.example"])
    timeout = 1.0

    started = time.monotonic()
    with pytest.raises(SrvLookupError) as caught:
        lookup(SERVICE, server.address, timeout)
    elapsed = time.monotonic() - started

    assert elapsed < timeout + 1.0, elapsed
    assert server.query_count(SRV_NAME, "SRV") == 1
    message = str(caught.value)
    assert message.startswith(f"SRV {SRV_NAME} at {server.address}: no address for target(s) ")
    assert message.endswith(" within 1s")
    assert "k1.example" in message


@pytest.mark.timeout(20)
def test_failing_name_server(server: DnsServer) -> None:
    _two_targets(server)
    server.set_rcode("SERVFAIL")

    with pytest.raises(SrvLookupError) as caught:
        lookup(SERVICE, server.address, TIMEOUT)

    message = str(caught.value)
    assert f"SRV look-up of {SRV_NAME} failed at {server.address}" in message
    assert "SERVFAIL" in message
    assert "\n" not in message


@pytest.mark.timeout(20)
def test_target_dot_means_not_available(server: DnsServer) -> None:
    server.set_srv(SRV_NAME, [(0, 0, 0, ".")])

    with pytest.raises(SrvLookupError) as caught:
        lookup(SERVICE, server.address, TIMEOUT)

    assert str(caught.value) == (
        f"SRV {SRV_NAME} at {server.address} says the service is not available "
        "(target '.'): use chronicle://host:port"
    )


@pytest.mark.timeout(10)
@pytest.mark.parametrize("timeout", [0, -1.0, float("nan"), float("inf")])
def test_timeout_must_be_positive_and_finite(timeout: float) -> None:
    with pytest.raises(ValueError, match="timeout"):
        lookup(SERVICE, "127.0.0.1:1", timeout)


# -- name servers ----------------------------------------------------------------------------


@pytest.mark.timeout(20)
def test_ipv6_name_server() -> None:
    v6 = DnsServer("::1")
    try:
        v6.start()
    except OSError as exc:
        pytest.skip(f"cannot bind ::1 (no IPv6 loopback): {exc}")
    with v6:
        _two_targets(v6)
        assert v6.address.startswith("[::1]:")

        targets = lookup(SERVICE, v6.address, TIMEOUT)

        assert {t.host for t in targets} == {"k1.example", "k2.example"}
        assert v6.query_count("k1.example", "A") == 1


@pytest.mark.timeout(20)
def test_name_server_given_by_host_name(server: DnsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    _two_targets(server)
    _fake_getaddrinfo(monkeypatch, {"ns.test": ["127.0.0.1"]})

    targets = lookup(SERVICE, f"ns.test:{server.port}", TIMEOUT)

    assert {t.host for t in targets} == {"k1.example", "k2.example"}
    assert server.query_count(SRV_NAME, "SRV") == 1


@pytest.mark.timeout(20)
def test_name_server_host_name_that_does_not_resolve(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_getaddrinfo(monkeypatch, {"nowhere.test": []})

    with pytest.raises(SrvLookupError, match=r"srvNameServer host 'nowhere.test' does not resolve"):
        lookup(SERVICE, "nowhere.test:5353", TIMEOUT)


@pytest.fixture
def system_resolver_is(monkeypatch: pytest.MonkeyPatch):
    """Make the "system" resolver (dns.resolver.Resolver()) ask the given server."""

    def use(server: DnsServer) -> None:
        class Local(dns.resolver.Resolver):
            def __init__(self, filename: str = "", configure: bool = True) -> None:
                super().__init__(configure=False)
                if configure:
                    self.nameservers = [dns.nameserver.Do53Nameserver(server.host, server.port)]

        monkeypatch.setattr(dns.resolver, "Resolver", Local)

    return use


@pytest.mark.timeout(20)
def test_system_resolver_with_getaddrinfo_for_targets(
    server: DnsServer, monkeypatch: pytest.MonkeyPatch, system_resolver_is
) -> None:
    server.set_srv(SRV_NAME, [(1, 1, 1, "k1.test"), (2, 1, 2, "k2.test"), (3, 1, 3, "k3.test")])
    server.set_additional(True)
    server.set_a("k1.test", ["10.0.0.99"])  # ignored: no name server given, getaddrinfo asks
    system_resolver_is(server)
    _fake_getaddrinfo(
        monkeypatch, {"k1.test": ["10.0.0.1", "fd00::1"], "k2.test": ["10.0.0.2"], "k3.test": []}
    )

    targets = lookup(SERVICE, None, TIMEOUT)

    assert [(t.host, t.addresses) for t in targets] == [
        ("k1.test", ("10.0.0.1", "fd00::1")),
        ("k2.test", ("10.0.0.2",)),
    ]
    assert server.query_count("k1.test", "A") == 0


@pytest.mark.timeout(20)
def test_system_resolver_error_says_where(server: DnsServer, system_resolver_is) -> None:
    system_resolver_is(server)

    with pytest.raises(SrvLookupError) as caught:
        lookup(SERVICE, None, TIMEOUT)

    assert str(caught.value).startswith(f"no SRV record {SRV_NAME} at the system resolver:")
    assert caught.value.name_server is None


@pytest.mark.timeout(20)
def test_getaddrinfo_that_hangs_is_bounded_by_the_timeout(
    server: DnsServer, monkeypatch: pytest.MonkeyPatch, system_resolver_is
) -> None:
    server.set_srv(SRV_NAME, [(1, 1, 1, "hangs.test")])
    system_resolver_is(server)
    release = threading.Event()
    _fake_getaddrinfo(monkeypatch, {"hangs.test": []}, block=release)
    timeout = 1.0
    try:
        started = time.monotonic()
        with pytest.raises(SrvLookupError) as caught:
            lookup(SERVICE, None, timeout)
        elapsed = time.monotonic() - started
    finally:
        release.set()

    assert elapsed < timeout + 1.0, elapsed
    assert str(caught.value) == (
        f"SRV {SRV_NAME} at the system resolver: no address for target(s) hangs.test within 1s"
    )


@pytest.mark.timeout(20)
def test_harness_answers_over_tcp_and_counts(server: DnsServer) -> None:
    import dns.message
    import dns.query
    import dns.rcode

    server.set_a("h.example", ["10.0.0.7"])
    query = dns.message.make_query("H.Example.", "A")

    response = dns.query.tcp(query, server.host, timeout=5.0, port=server.port)
    missing = dns.query.udp(
        dns.message.make_query("nope.example.", "A"), server.host, timeout=5.0, port=server.port
    )

    assert [rdata.to_text() for rdata in response.answer[0]] == ["10.0.0.7"]
    assert missing.rcode() == dns.rcode.NXDOMAIN
    assert server.query_count("h.example", "a") == 1
    assert server.tcp_query_count == 1
    assert server.counts() == {("h.example", "A"): 1, ("nope.example", "A"): 1}


# -- srvNameServer forms -------------------------------------------------------------------


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1", ("127.0.0.1", 53)),
        ("127.0.0.1:5353", ("127.0.0.1", 5353)),
        ("ns.example", ("ns.example", 53)),
        ("ns.example:5353", ("ns.example", 5353)),
        ("::1", ("::1", 53)),
        ("2001:db8:0::53", ("2001:db8::53", 53)),
        ("[::1]", ("::1", 53)),
        ("[::1]:5353", ("::1", 5353)),
        ("[2001:db8::53]:53", ("2001:db8::53", 53)),
    ],
)
def test_name_server_forms(value: str, expected: tuple[str, int]) -> None:
    assert _srv.parse_name_server(value) == expected
    # The same text as the connection string accepts and keeps it.
    cs = ConnectionString.parse(f"chronicle+srv://svc.example?srvNameServer={value}")
    assert cs.srv_name_server is not None
    assert _srv.parse_name_server(cs.srv_name_server) == expected


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("", "has no host"),
        (":53", "has no host"),
        ("ns.example:", "not a number"),
        ("ns.example:x", "not a number"),
        ("ns.example:0", "out of range"),
        ("ns.example:65536", "out of range"),
        ("[::1", "unclosed"),
        ("[::1]x", "after ']'"),
        ("[ns.example]:53", "not IPv6"),
        ("::g", "IPv6"),
        ("[::1]:", "not a number"),
    ],
)
def test_bad_name_server_forms(value: str, fragment: str) -> None:
    with pytest.raises(ConfigurationError, match=fragment) as caught:
        _srv.parse_name_server(value)
    assert caught.value.option == "srvNameServer"


@pytest.mark.timeout(10)
def test_bad_name_server_fails_before_any_query() -> None:
    with pytest.raises(ConfigurationError, match="srvNameServer"):
        lookup(SERVICE, "[::1", TIMEOUT)


# -- without dnspython ---------------------------------------------------------------------


def _hide_dnspython(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [name for name in sys.modules if name == "dns" or name.startswith("dns.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "dns", None)


@pytest.mark.timeout(10)
def test_require_dnspython_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    require_dnspython()  # installed here: no error
    _hide_dnspython(monkeypatch)

    with pytest.raises(ConfigurationError) as caught:
        require_dnspython()
    assert str(caught.value) == (
        "chronicle+srv:// needs dnspython: pip install 'chronicle-conn[srv]'"
    )
    with pytest.raises(ConfigurationError, match=r"chronicle-conn\[srv\]"):
        lookup(SERVICE, "127.0.0.1:1", TIMEOUT)


@pytest.mark.timeout(10)
def test_require_dnspython_too_old(monkeypatch: pytest.MonkeyPatch) -> None:
    import dns.version

    monkeypatch.setattr(dns.version, "MINOR", 2)
    monkeypatch.setattr(dns.version, "MAJOR", 2)
    monkeypatch.setattr(dns.version, "version", "2.2.0")

    with pytest.raises(ConfigurationError, match=r"dnspython>=2\.4, found 2\.2\.0"):
        require_dnspython()


@pytest.mark.timeout(30)
def test_module_imports_without_dnspython() -> None:
    code = (
        "import sys; sys.modules['dns'] = None\n"
        "from chronicle_conn import _srv\n"
        "from chronicle_conn.errors import ConfigurationError\n"
        "try:\n"
        "    _srv.require_dnspython()\n"
        "except ConfigurationError as exc:\n"
        "    print('raised:', exc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=25, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        "raised: chronicle+srv:// needs dnspython: pip install 'chronicle-conn[srv]'"
    )
