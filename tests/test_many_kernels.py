"""Several kernels behind one connection: hosts by name, gRPC's round robin and pick
first, client-side health checking, and gRPC's own target forms (a Unix socket).

The kernels are app servers in child processes (the dev kernel with the work service,
whose answers name the process that ran them), killed and restarted on their ports.
"""

from __future__ import annotations

import collections
import json
import socket
import threading
import time
from concurrent import futures

import grpc
import pytest
import trustme
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

import chronicle_conn as cc
from tests.harness.appserver import WorkStub, work_request, work_response
from tests.helpers import connect

S = cc.ConnectionState

FAST = {
    "reconnect_base_delay": 0.05,
    "reconnect_max_delay": 0.5,
    "keepalive_stale_after": 3.0,
    "retry_attempts": None,
}


def _by_name(*servers, options: str = "") -> str:
    hosts = ",".join(f"localhost:{s.port}" for s in servers)
    return f"chronicle://{hosts}?disableTls=true{options}"


def _localhost(port: int) -> tuple[str, ...]:
    """The addresses ``localhost:port`` stands for on this machine (127.0.0.1, and ::1
    where the system's resolver gives it too)."""
    found: list[str] = []
    for family, _, _, _, sockaddr in socket.getaddrinfo("localhost", port, type=socket.SOCK_STREAM):
        text = f"[{sockaddr[0]}]:{port}" if family == socket.AF_INET6 else f"{sockaddr[0]}:{port}"
        if text not in found:
            found.append(text)
    return tuple(found)


def _pids(stub: WorkStub, n: int, prefix: str, *, wait: bool = True) -> collections.Counter:
    """Which server process answered each of ``n`` calls (all must succeed)."""
    seen: collections.Counter = collections.Counter()
    for i in range(n):
        answer = work_response(
            stub.unary(work_request(f"{prefix}-{i}"), timeout=10, wait_for_ready=wait)
        )
        seen[answer["pid"]] += 1
    return seen


def _until(predicate, timeout: float, what: str, step=None) -> None:
    """Run ``step`` (an action that takes time by itself, such as a call) until
    ``predicate()``, within ``timeout`` s."""
    deadline = time.monotonic() + timeout
    for _ in range(10_000):
        if predicate():
            return
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        if step is not None:
            step()
        else:
            threading.Event().wait(0.05)
    raise AssertionError(f"gave up: {what}")


@pytest.mark.timeout(180)
def test_round_robin_over_three_kernels_by_name(app_server_factory, make_conn, recorder):
    servers = [app_server_factory("kernel", keepalive_interval=0.2) for _ in range(3)]
    conn = make_conn(_by_name(*servers, options="&loadBalancer=round-robin"), **FAST)
    conn.add_listener(recorder)
    connect(conn, recorder)
    stats = conn.stats()
    assert stats.load_balancer == "round-robin"
    assert stats.addresses == tuple(a for s in servers for a in _localhost(s.port))
    stub = WorkStub(conn.channel())
    # Calls go to all three (each is a different process).
    pids = [s.stats()["pid"] for s in servers]
    spread = _pids(stub, 60, "before")
    assert set(spread) == set(pids), spread
    assert min(spread.values()) >= 10, spread
    assert conn.stats().backends_ready == 3

    # One killed: no wait_for_ready call issued after the kill is lost, and the manager
    # stays CONNECTED (the others are ready).
    mark = len(recorder)
    servers[1].kill()
    after = _pids(stub, 60, "after-kill")
    assert set(after) <= {pids[0], pids[2]}, after
    assert sum(after.values()) == 60
    _until(lambda: conn.stats().backends_ready == 2, 10, "2 backends ready")
    assert conn.state is S.CONNECTED
    changes = recorder.events[mark:]
    assert not [c for c in changes if c.old is S.CONNECTED], changes
    for server in servers:  # each call ran exactly once, on the server that answered it
        assert set(server.log.read().executions().values()) <= {1}

    # Back on the same port: back in rotation.
    servers[1].restart()
    new_pid = servers[1].stats()["pid"]
    back: collections.Counter = collections.Counter()
    _until(
        lambda: back[new_pid] > 0,
        20,
        "the restarted kernel gets calls again",
        step=lambda: back.update(_pids(stub, 3, "rejoin")),
    )
    assert conn.stats().backends_ready == 3


@pytest.mark.timeout(180)
def test_a_not_serving_kernel_gets_no_calls_with_round_robin(app_server_factory, make_conn):
    servers = [app_server_factory("kernel", keepalive_interval=0.2) for _ in range(3)]
    conn = make_conn(_by_name(*servers, options="&loadBalancer=round-robin"), **FAST)
    conn.connect(timeout=10)
    # The server serves grpc.health.v1: the channel is rebuilt with gRPC's client-side
    # health checking on (make-before-break, once).
    _until(lambda: conn.stats().generation >= 2, 10, "the channel rebuilt with health checks")
    stub = WorkStub(conn.channel())
    pids = [s.stats()["pid"] for s in servers]
    servers[2].set_serving(False)
    # Health is pushed on the Watch stream: calls stop reaching it at once, or nearly.
    recent: collections.deque = collections.deque(maxlen=15)
    _until(
        lambda: len(recent) == 15 and pids[2] not in recent,
        10,
        "15 calls in a row avoid the NOT_SERVING kernel",
        step=lambda: recent.extend(_pids(stub, 1, "flip").elements()),
    )
    later = _pids(stub, 60, "not-serving")
    assert pids[2] not in later, later
    assert set(later) == {pids[0], pids[1]}, later
    assert conn.state is S.CONNECTED
    servers[2].set_serving(True)
    again: collections.Counter = collections.Counter()
    _until(
        lambda: again[pids[2]] > 0,
        10,
        "SERVING again: back in rotation",
        step=lambda: again.update(_pids(stub, 3, "serving")),
    )


@pytest.mark.timeout(120)
def test_pick_first_fails_over_to_the_next_host(app_server_factory, make_conn, recorder):
    first, second = (app_server_factory("kernel", keepalive_interval=0.2) for _ in range(2))
    conn = make_conn(_by_name(first, second), **FAST)
    conn.add_listener(recorder)
    connect(conn, recorder)
    assert conn.stats().load_balancer == "pick-first"
    stub = WorkStub(conn.channel())
    assert set(_pids(stub, 10, "first")) == {first.stats()["pid"]}
    second_pid = second.stats()["pid"]
    first.kill()
    # wait_for_ready calls issued after the kill go to the next host.
    assert set(_pids(stub, 20, "failover")) == {second_pid}
    assert conn.state is S.CONNECTED


@pytest.mark.timeout(60)
def test_a_name_that_does_not_resolve_is_left_out(app_server_factory, make_conn, recorder):
    server = app_server_factory("kernel", keepalive_interval=0.2)
    text = f"chronicle://kernel.invalid:35000,localhost:{server.port}?disableTls=true"
    conn = make_conn(text, **FAST)
    conn.add_listener(recorder)
    connect(conn, recorder)
    assert conn.stats().addresses == _localhost(server.port)
    assert set(_pids(WorkStub(conn.channel()), 3, "one")) == {server.stats()["pid"]}


@pytest.mark.timeout(60)
def test_no_host_resolving_is_an_attempt_that_fails_and_is_retried(make_conn):
    conn = make_conn(
        "chronicle://kernel-a.invalid:35000,kernel-b.invalid:35000?disableTls=true",
        retry_attempts=1,
        reconnect_base_delay=0.05,
    )
    with pytest.raises(cc.RetriesExhaustedError) as raised:
        conn.connect(timeout=30)
    assert "kernel-a.invalid:35000" in str(raised.value)
    assert "kernel-b.invalid:35000" in str(raised.value)
    assert conn.stats().attempts == 2


def _tls_servers(count: int, ca: trustme.CA, name: str = "localhost"):
    cert = ca.issue_cert(name)
    credentials = grpc.ssl_server_credentials(
        [(cert.private_key_pem.bytes(), cert.cert_chain_pems[0].bytes())]
    )
    made = []
    for _ in range(count):
        server = grpc.server(futures.ThreadPoolExecutor(4))
        servicer = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        port = server.add_secure_port("127.0.0.1:0", credentials)
        server.start()
        made.append((server, port))
    return made


@pytest.mark.timeout(60)
def test_several_names_with_tls_check_the_certificate_against_the_name(make_conn, tmp_path):
    """Resolved to addresses, the channel still checks the certificate against the
    host name (its authority), on a plain grpcio server with a certificate for it."""
    ca = trustme.CA()
    ca_path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    servers = _tls_servers(2, ca)
    try:
        hosts = ",".join(f"localhost:{port}" for _, port in servers)
        conn = make_conn(
            f"chronicle://{hosts}?caPath={ca_path}&loadBalancer=round-robin", ledger=False, **FAST
        )
        conn.connect(timeout=10)
        assert conn.stats().liveness == "health"
        assert len(conn.stats().addresses) == 2
        check = health_pb2_grpc.HealthStub(conn.channel()).Check
        assert check(health_pb2.HealthCheckRequest(service=""), timeout=5).status == 1
        # The same servers under a name the certificate does not carry: refused.
        wrong = make_conn(
            f"chronicle://{hosts.replace('localhost', '127.0.0.1')}?caPath={ca_path}",
            retry_attempts=0,
            ledger=False,
        )
        with pytest.raises((cc.TlsError, cc.RetriesExhaustedError)):
            wrong.connect(timeout=10)
    finally:
        for server, _ in servers:
            server.stop(0)


class _NeedsKey(grpc.ServerInterceptor):
    """Every method, health included, wants ``api-key: secret``."""

    def intercept_service(self, continuation, details):
        if ("api-key", "secret") in tuple(details.invocation_metadata):
            return continuation(details)

        def refuse(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "api-key required")

        return grpc.unary_unary_rpc_method_handler(refuse)


@pytest.mark.timeout(60)
def test_round_robin_with_health_that_needs_credentials(make_conn):
    """gRPC's client-side health watch carries no credentials: on servers whose health
    service wants them, health checking stays off (else every backend would look
    unhealthy and every call fail), and calls with the key reach both servers."""
    made = []
    for _ in range(2):
        server = grpc.server(futures.ThreadPoolExecutor(4), interceptors=(_NeedsKey(),))
        health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
        made.append((server, server.add_insecure_port("127.0.0.1:0")))
        server.start()
    try:
        hosts = ",".join(f"127.0.0.1:{port}" for _, port in made)
        conn = make_conn(
            f"chronicle://{hosts}?disableTls=true&loadBalancer=round-robin&apiKey=secret", **FAST
        )
        conn.connect(timeout=10)
        assert conn.stats().liveness == "health"
        factory = conn._supervisor.dialer.factory
        assert factory.serves_health is False
        request = health_pb2.HealthCheckRequest(service="")
        for _ in range(30):
            check = health_pb2_grpc.HealthStub(conn.channel()).Check
            assert check(request, timeout=5).status == health_pb2.HealthCheckResponse.SERVING
        assert not factory.built_with_health
        _until(lambda: conn.stats().backends_ready == 2, 10, "both backends ready")
    finally:
        for server, _ in made:
            server.stop(0)


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.timeout(60)
@pytest.mark.skipif(not _ipv6_loopback(), reason="this machine has no IPv6 loopback")
def test_ipv4_and_ipv6_hosts_together(make_conn):
    made = []
    for host in ("127.0.0.1", "[::1]"):
        server = grpc.server(futures.ThreadPoolExecutor(2))
        health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
        made.append((server, server.add_insecure_port(f"{host}:0"), host))
        server.start()
    try:
        hosts = ",".join(f"{host}:{port}" for _, port, host in made)
        conn = make_conn(f"chronicle://{hosts}?disableTls=true&loadBalancer=round-robin", **FAST)
        conn.connect(timeout=10)
        assert conn.stats().addresses == (f"127.0.0.1:{made[0][1]}", f"[::1]:{made[1][1]}")
        _until(lambda: conn.stats().backends_ready == 2, 10, "both backends ready")
    finally:
        for server, _, _ in made:
            server.stop(0)


@pytest.mark.timeout(60)
def test_a_unix_socket_server_through_server_address(make_conn, tmp_path):
    path = tmp_path / "kernel.sock"
    server = grpc.server(futures.ThreadPoolExecutor(2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    echo = grpc.method_handlers_generic_handler(
        "test.Echo", {"Say": grpc.unary_unary_rpc_method_handler(lambda r, c: r)}
    )
    server.add_generic_rpc_handlers((echo,))
    server.add_insecure_port(f"unix:{path}")
    server.start()
    try:
        conn = make_conn(server_address=f"unix:{path}", tls=False, **FAST)
        conn.connect(timeout=10)
        assert conn.channel().unary_unary("/test.Echo/Say")(b"hi", timeout=5) == b"hi"
        stats = conn.stats()
        assert stats.target == f"unix:{path}"
        assert stats.addresses == (f"unix:{path}",)
        assert stats.liveness == "health"
        assert f"unix:{path}" in repr(conn)
        server.stop(0)
        _until(lambda: conn.state is S.RECONNECTING, 10, "the socket's server gone")
    finally:
        server.stop(0)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"server_address": "unix:/run/k.sock"}, "tls=False"),
        ({"server_address": "dns:///kernel:35000"}, "gRPC target"),
        ({"server_address": "unix:/run/k.sock", "tls": "yes"}, "tls must be"),
        ({"connection_string": "chronicle://h:1", "tls": False}, "disableTls"),
    ],
)
def test_a_grpc_target_needs_tls_said_explicitly(kwargs, words):
    with pytest.raises(cc.ConfigurationError) as raised:
        cc.Connection(auto_connect=False, **kwargs)
    assert words in str(raised.value)
    assert "\n" not in str(raised.value)


def test_server_address_with_tls_false_is_plaintext():
    conn = cc.Connection(server_address="127.0.0.1:1", tls=False, auto_connect=False)
    try:
        assert not conn.config.connection_string.tls_enabled
    finally:
        conn.close()


def test_the_service_config_names_the_policy_and_health_checking(make_conn):
    conn = make_conn(
        "chronicle://127.0.0.1:1,127.0.0.1:2?disableTls=true&loadBalancer=round-robin",
        auto_connect=False,
    )
    factory = conn._supervisor.dialer.factory
    config = json.loads(dict(factory.options)["grpc.service_config"])
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    assert "healthCheckConfig" not in config  # not known yet to serve health
    factory.serves_health = True
    config = json.loads(dict(factory.options)["grpc.service_config"])
    assert config["healthCheckConfig"] == {"serviceName": ""}


def _flaky_server(failures: int):
    """A server whose ``test.Flaky/Get`` and ``test.Flaky/Put`` answer UNAVAILABLE the
    first ``failures`` times for each request, and count every execution."""
    runs: collections.Counter = collections.Counter()
    lock = threading.Lock()

    def behaviour(method: str):
        def handle(request: bytes, context: grpc.ServicerContext) -> bytes:
            with lock:
                runs[(method, request)] += 1
                count = runs[(method, request)]
            if count <= failures:
                context.abort(grpc.StatusCode.UNAVAILABLE, "try again")
            return request

        return grpc.unary_unary_rpc_method_handler(handle)

    server = grpc.server(futures.ThreadPoolExecutor(4))
    flaky = grpc.method_handlers_generic_handler(
        "test.Flaky", {"Get": behaviour("Get"), "Put": behaviour("Put")}
    )
    server.add_generic_rpc_handlers((flaky,))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port, runs


@pytest.mark.timeout(60)
def test_grpc_retries_only_the_methods_said_to_be_safe(make_conn):
    server, port, runs = _flaky_server(failures=2)
    try:
        conn = make_conn(
            f"chronicle://127.0.0.1:{port}?disableTls=true",
            retry_methods=["test.Flaky/Get"],
            call_retries=3,
            **FAST,
        )
        conn.connect(timeout=10)
        channel = conn.channel()
        for i in range(30):  # each Get runs 3 times on the server, then succeeds
            request = f"get-{i}".encode()
            assert channel.unary_unary("/test.Flaky/Get")(request, timeout=10) == request
            assert runs[("Get", request)] == 3
        for i in range(30):  # Put is not listed: one run, and its error reaches the caller
            request = f"put-{i}".encode()
            with pytest.raises(grpc.RpcError) as raised:
                channel.unary_unary("/test.Flaky/Put")(request, timeout=10)
            assert raised.value.code() is grpc.StatusCode.UNAVAILABLE
            assert runs[("Put", request)] == 1
        none = make_conn(f"chronicle://127.0.0.1:{port}?disableTls=true", retry_methods=(), **FAST)
        none.connect(timeout=10)
        with pytest.raises(grpc.RpcError):
            none.channel().unary_unary("/test.Flaky/Get")(b"once", timeout=10)
        assert runs[("Get", b"once")] == 1
    finally:
        server.stop(0)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"retry_methods": "test.Flaky/Get"}, "list"),
        ({"retry_methods": ["no spaces/allowed here"]}, "package.Service/Method"),
        ({"retry_methods": ["grpc.health.v1.Health/Check"]}, "leave it out"),
        ({"call_retries": 5}, "0 to 4"),
        ({"call_retries": True}, "0 to 4"),
    ],
)
def test_retry_options_are_checked(kwargs, words):
    with pytest.raises(cc.ConfigurationError) as raised:
        cc.Connection("chronicle://h:1?disableTls=true", auto_connect=False, **kwargs)
    assert words in str(raised.value)


def test_the_default_retry_policy_covers_the_kernels_read_only_methods(make_conn):
    conn = make_conn("chronicle://127.0.0.1:1?disableTls=true", auto_connect=False)
    config = json.loads(dict(conn._supervisor.dialer.factory.options)["grpc.service_config"])
    method_config, own = config["methodConfig"]
    names = {f"{n['service']}/{n['method']}" for n in method_config["name"]}
    assert names == set(cc.config.DEFAULT_RETRY_METHODS)
    assert method_config["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert method_config["retryPolicy"]["maxAttempts"] == 4
    # The library's own methods have an entry of their own, without a retry policy.
    assert {f"{n['service']}/{n['method']}" for n in own["name"]} == set(cc.config.LIBRARY_METHODS)
    assert "retryPolicy" not in own


def _unavailable_everywhere():
    """A server where every method, health's Check included, answers UNAVAILABLE and
    counts its runs."""
    runs: collections.Counter = collections.Counter()
    lock = threading.Lock()

    class Refuse(grpc.GenericRpcHandler):
        def service(self, details):
            method = details.method

            def handle(request: bytes, context: grpc.ServicerContext) -> bytes:
                with lock:
                    runs[method] += 1
                context.abort(grpc.StatusCode.UNAVAILABLE, "try again")

            return grpc.unary_unary_rpc_method_handler(handle)

    server = grpc.server(futures.ThreadPoolExecutor(4))
    server.add_generic_rpc_handlers((Refuse(),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port, runs


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "methods",
    [["*"], ["grpc.health.v1.Health", "test.Any"], ["test.Any/Get", "test.Any/Get"]],
)
def test_the_library_s_own_calls_are_never_retried(make_conn, methods):
    """Under "*" or health's whole service, gRPC retries the application's methods but
    not the library's probe (which must fail fast); a name given twice is once."""
    server, port, runs = _unavailable_everywhere()
    try:
        conn = make_conn(
            f"chronicle://127.0.0.1:{port}?disableTls=true",
            retry_methods=methods,
            call_retries=2,
            auto_connect=False,
        )
        options = conn._supervisor.dialer.factory.options
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
            for i in range(30):
                for method in ("/test.Any/Get", "/grpc.health.v1.Health/Check"):
                    with pytest.raises(grpc.RpcError) as raised:
                        channel.unary_unary(method)(f"{i}".encode(), timeout=10)
                    assert raised.value.code() is grpc.StatusCode.UNAVAILABLE
        assert runs["/test.Any/Get"] == 30 * 3  # the service config is valid and applies
        assert runs["/grpc.health.v1.Health/Check"] == 30
    finally:
        server.stop(0)


@pytest.fixture
def dns_server():
    from tests.harness.dns import DnsServer

    with DnsServer() as server:
        yield server


def _srv_string(dns_server, options: str = "") -> str:
    return (
        f"chronicle+srv://kernels.test?disableTls=true&srvNameServer={dns_server.address}{options}"
    )


@pytest.mark.timeout(120)
def test_srv_records_name_the_kernels(app_server_factory, make_conn, dns_server):
    servers = [app_server_factory("kernel", keepalive_interval=0.2) for _ in range(2)]
    dns_server.set_srv(
        "_chronicle._tcp.kernels.test",
        [
            (10, 50, servers[0].port, "k0.kernels.test"),
            (10, 50, servers[1].port, "k1.kernels.test"),
        ],
    )
    dns_server.set_a("k0.kernels.test", ["127.0.0.1"])
    dns_server.set_a("k1.kernels.test", ["127.0.0.1"])
    conn = make_conn(_srv_string(dns_server, "&loadBalancer=round-robin"), **FAST)
    try:
        conn.connect(timeout=10)
        assert sorted(conn.stats().addresses) == sorted(f"127.0.0.1:{s.port}" for s in servers)
        spread = _pids(WorkStub(conn.channel()), 30, "srv")
        assert set(spread) == {s.stats()["pid"] for s in servers}, spread
        assert dns_server.query_count("_chronicle._tcp.kernels.test", "SRV") >= 1
    finally:
        conn.close()  # while the DNS server still answers (it stops first)


@pytest.mark.timeout(60)
def test_a_missing_srv_record_is_a_clear_error(make_conn, dns_server):
    conn = make_conn(_srv_string(dns_server), retry_attempts=0)
    with pytest.raises(cc.RetriesExhaustedError) as raised:
        conn.connect(timeout=10)
    text = str(raised.value)
    assert "no SRV record _chronicle._tcp.kernels.test" in text
    assert dns_server.address in text
    assert "\n" not in text


def test_srv_without_dnspython_names_the_extra(monkeypatch):
    import sys

    for module in [m for m in sys.modules if m == "dns" or m.startswith("dns.")]:
        monkeypatch.delitem(sys.modules, module)
    monkeypatch.setitem(sys.modules, "dns", None)
    with pytest.raises(cc.ConfigurationError) as raised:
        cc.Connection("chronicle+srv://kernels.test", auto_connect=False)
    assert "pip install 'chronicle-conn[srv]'" in str(raised.value)


@pytest.mark.timeout(180)
def test_rotation_follows_dns_without_a_failed_call(app_server_factory, make_conn, dns_server):
    """A steady stream of calls (fail-fast and wait_for_ready) while max_channel_age
    rotates the channel and the SRV records move from one kernel to another: the
    calls move with them, none fails, and each ran exactly once."""
    old, new = (app_server_factory("kernel", keepalive_interval=0.2) for _ in range(2))
    name = "_chronicle._tcp.kernels.test"
    dns_server.set_srv(name, [(10, 10, old.port, "k.kernels.test")])
    dns_server.set_a("k.kernels.test", ["127.0.0.1"])
    conn = make_conn(_srv_string(dns_server), max_channel_age=0.5, **FAST)
    conn.connect(timeout=10)
    stub = WorkStub(conn.channel())
    old_pid, new_pid = old.stats()["pid"], new.stats()["pid"]
    answered: collections.Counter = collections.Counter()
    failures: list[str] = []
    stop = threading.Event()
    sent: list[str] = []

    def caller(kind: str) -> None:
        for i in range(100_000):
            if stop.is_set():
                return
            rid = f"{kind}-{i}"
            sent.append(rid)
            try:
                answer = work_response(
                    stub.unary(work_request(rid), timeout=10, wait_for_ready=kind == "wfr")
                )
                answered[answer["pid"]] += 1
            except grpc.RpcError as exc:
                failures.append(f"{rid}: {exc.code()}: {exc.details()}")

    threads = [threading.Thread(target=caller, args=(kind,)) for kind in ("ff", "wfr")]
    for thread in threads:
        thread.start()
    try:
        _until(lambda: answered[old_pid] >= 20, 20, "calls reach the first kernel")
        rotations = conn.stats().generation
        dns_server.set_srv(name, [(10, 10, new.port, "k.kernels.test")])
        _until(lambda: answered[new_pid] >= 20, 30, "calls follow the record to the second kernel")
        assert conn.stats().generation > rotations  # rotations did it, not a loss
    finally:
        stop.set()
        for thread in threads:
            thread.join(15)
        conn.close()  # while the DNS server still answers (it stops first)
    assert failures == []
    assert conn.stats().disconnects == 0
    executions = collections.Counter(old.log.read().executions())
    executions.update(new.log.read().executions())
    assert set(executions) == set(sent)
    assert set(executions.values()) == {1}


@pytest.mark.timeout(300)
def test_thirty_kills_of_one_kernel_in_three_lose_no_call_issued_after(
    app_server_factory, make_conn, recorder
):
    """30 trials: one of three round-robin kernels (a different one each time) is
    SIGKILLed; wait_for_ready calls issued once gRPC has seen its transport close all
    succeed on the other two, the connection stays CONNECTED, and the kernel comes back
    into rotation on its port; each call id runs exactly once, counted in the servers'
    execution logs.

    A call issued in the instant between the kill and gRPC noticing it (milliseconds)
    can still be written to the dead kernel's socket and end UNAVAILABLE, as on any
    gRPC channel: such calls are counted, and must not have run anywhere."""
    servers = [app_server_factory("kernel", keepalive_interval=0.2) for _ in range(3)]
    conn = make_conn(_by_name(*servers, options="&loadBalancer=round-robin"), **FAST)
    conn.add_listener(recorder)
    mark = connect(conn, recorder)
    stub = WorkStub(conn.channel())
    issued: list[str] = []
    racing: list[str] = []  # issued at once after the kill, and failed UNAVAILABLE

    def call(rid: str) -> dict:
        issued.append(rid)
        return work_response(stub.unary(work_request(rid), timeout=10, wait_for_ready=True))

    for trial in range(30):
        _until(lambda: conn.stats().backends_ready == 3, 20, f"trial {trial}: all three ready")
        victim = servers[trial % 3]
        others = {s.stats()["pid"] for s in servers if s is not victim}
        victim.kill()
        code = None
        try:  # at once: may race gRPC noticing the kill
            assert call(f"t{trial}-now")["pid"] in others, trial
        except grpc.RpcError as exc:
            code = exc.code()
            racing.append(f"t{trial}-now")
        assert code in (None, grpc.StatusCode.UNAVAILABLE), code
        _until(lambda: conn.stats().backends_ready == 2, 10, f"trial {trial}: kill seen")
        for i in range(6):
            assert call(f"t{trial}-{i}")["pid"] in others, trial
        victim.restart()
    changes = recorder.events[mark:]
    assert not [c for c in changes if c.old is S.CONNECTED], changes
    ran: collections.Counter = collections.Counter()
    for server in servers:
        ran.update(server.log.read().executions())
    assert {rid: ran[rid] for rid in racing if ran[rid]} == {}  # failed: never ran
    assert {rid: ran[rid] for rid in issued if rid not in racing and ran[rid] != 1} == {}
    assert len(racing) <= 5, racing  # measured 0 in 180 trials under a CPU burner


@pytest.mark.timeout(60)
def test_srv_with_client_credentials_asks_the_kernels_it_names_for_tokens(make_conn, dns_server):
    from chronicle_conn.devserver import DevServer

    server = DevServer(auth={"shop": "s3cr3t"}).start()
    try:
        dns_server.set_srv(
            "_chronicle._tcp.kernels.test", [(10, 10, server.port, "k.kernels.test")]
        )
        dns_server.set_a("k.kernels.test", ["127.0.0.1"])
        conn = make_conn(
            f"chronicle+srv://shop:s3cr3t@kernels.test?disableTls=true"
            f"&srvNameServer={dns_server.address}",
            **FAST,
        )
        conn.connect(timeout=10)
        assert [(client, outcome) for client, outcome, _ in server.token_requests] == [
            ("shop", "issued")
        ]
        assert server.authorized_calls  # the keep-alive stream carried the token
        conn.close()  # while the kernel and the DNS server are still there
    finally:
        server.stop(0)


@pytest.mark.timeout(60)
def test_a_failed_replacement_leaves_stats_on_the_current_channel(
    app_server_factory, make_conn, dns_server
):
    """The records move to a port where nothing listens: the replacement fails, the
    connection stays on its channel, and stats() still shows what that channel dials."""
    server = app_server_factory("kernel", keepalive_interval=0.2)
    name = "_chronicle._tcp.kernels.test"
    dns_server.set_srv(name, [(10, 10, server.port, "k.kernels.test")])
    dns_server.set_a("k.kernels.test", ["127.0.0.1"])
    conn = make_conn(_srv_string(dns_server), **FAST)
    try:
        conn.connect(timeout=10)
        here = (f"127.0.0.1:{server.port}",)
        assert conn.stats().addresses == here
        with socket.socket() as spare:  # a port nobody listens on
            spare.bind(("127.0.0.1", 0))
            dead = spare.getsockname()[1]
        dns_server.set_srv(name, [(10, 10, dead, "k.kernels.test")])
        before = conn.stats().last_error
        conn.reconnect()
        _until(lambda: conn.stats().last_error != before, 10, "the replacement failed")
        stats = conn.stats()
        assert stats.state is S.CONNECTED
        assert stats.addresses == here
        assert stats.backends_ready == 1
    finally:
        conn.close()  # while the DNS server still answers (it stops first)


def test_the_srv_authority_is_stable_across_look_ups(dns_server):
    """With TLS every kernel's certificate is checked against one name: the first target
    by priority, then by name, whatever order the weighted shuffle gives."""
    from chronicle_conn import _targets

    dns_server.set_srv(
        "_chronicle._tcp.kernels.test",
        [
            (20, 10, 35000, "a.kernels.test"),
            (10, 10, 35001, "k2.kernels.test"),
            (10, 10, 35002, "k1.kernels.test"),
        ],
    )
    for host in ("a", "k1", "k2"):
        dns_server.set_a(f"{host}.kernels.test", ["127.0.0.1"])
    cs = cc.ConnectionString.parse(_srv_string(dns_server))
    seen = set()
    for _ in range(30):
        found = _targets.resolve(cs, time.monotonic() + 5)
        seen.add(found.servers[0])
        assert found.authority == "k1.kernels.test:35002"
    assert len(seen) == 2  # the shuffle did vary the order


@pytest.mark.timeout(30)
def test_a_name_whose_resolver_hangs_is_left_out_in_time(monkeypatch, make_conn):
    """Names are resolved in parallel with a deadline: one that never answers does not
    hold up the others (the attempt keeps half its time to dial them)."""
    from chronicle_conn import _targets

    release = threading.Event()
    real = socket.getaddrinfo

    def hangs(host, *args, **kwargs):
        if host == "hangs.test":
            release.wait(20)
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", hangs)
    server = grpc.server(futures.ThreadPoolExecutor(2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        cs = cc.ConnectionString.parse(f"chronicle://hangs.test:1,localhost:{port}?disableTls=true")
        started = time.monotonic()
        found = _targets.resolve(cs, started + 2.0)
        assert time.monotonic() - started < 1.8
        assert found.addresses == _localhost(port)
        assert found.authority == "hangs.test:1"  # the first name, though left out
        conn = make_conn(
            f"chronicle://hangs.test:1,localhost:{port}?disableTls=true",
            attempt_timeout=2.0,
            **FAST,
        )
        conn.connect(timeout=10)
        assert conn.stats().addresses == _localhost(port)
    finally:
        release.set()
        server.stop(0)


@pytest.mark.timeout(60)
def test_several_ip_addresses_with_tls_check_the_first_one(make_conn, tmp_path):
    """IP literals give no name: the first address is the authority, so a certificate
    for that address is accepted by every server (before, grpc checked the whole list's
    text and refused)."""
    ca = trustme.CA()
    ca_path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    servers = _tls_servers(2, ca, "127.0.0.1")
    try:
        hosts = ",".join(f"127.0.0.1:{port}" for _, port in servers)
        conn = make_conn(
            f"chronicle://{hosts}?caPath={ca_path}&loadBalancer=round-robin", ledger=False, **FAST
        )
        conn.connect(timeout=10)
        _until(lambda: conn.stats().backends_ready == 2, 10, "both backends ready")
        check = health_pb2_grpc.HealthStub(conn.channel()).Check
        for _ in range(10):
            assert check(health_pb2.HealthCheckRequest(service=""), timeout=5).status == 1
    finally:
        for server, _ in servers:
            server.stop(0)
