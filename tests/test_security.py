"""TLS as users meet it: real certificates made at test time, servers nobody here wrote.

Every server is a plain ``grpc.server`` with grpcio-health-checking's servicer, on
127.0.0.1. A mistake in the configuration (a plaintext server, an untrusted
certificate, another name, a missing client certificate) must be reported at once, in
one sentence that says what to change; a server that is merely down or restarting must
still be retried.
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
import sys
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import structlog
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

import chronicle_conn as cc
from tests.harness.ports import free_port
from tests.helpers import Capture, wait_for_generation

S = cc.ConnectionState
PASSWORD = "p12-s3cret"


@pytest.fixture
def capture() -> Iterator[Capture]:
    capture = Capture()
    structlog.configure(processors=[capture])
    yield capture
    structlog.reset_defaults()


class Server:
    """A grpc.server with the standard health servicer (SERVING), TLS or plaintext."""

    def __init__(self, credentials: grpc.ServerCredentials | None, port: int = 0) -> None:
        self.credentials = credentials
        self.port = port
        self.server: grpc.Server | None = None
        self.start()

    def start(self) -> None:
        server = grpc.server(futures.ThreadPoolExecutor(4), options=[("grpc.so_reuseport", 0)])
        health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
        address = f"127.0.0.1:{self.port}"
        if self.credentials is None:
            self.port = server.add_insecure_port(address)
        else:
            self.port = server.add_secure_port(address, self.credentials)
        server.start()
        self.server = server

    def stop(self, grace: float | None = None) -> None:
        if self.server is not None:
            self.server.stop(grace).wait(10)
            self.server = None


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    made: list[Server] = []
    yield made
    for server in made:
        server.stop()


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def files(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """PEM and PKCS#12 files: the CA, another CA, client certificates (good, from
    another CA, a key that is not theirs), a PKCS#12 bundle, a self-signed server."""
    root = tmp_path_factory.mktemp("certs")
    other = trustme.CA()
    client = ca.issue_cert("client.example")
    stranger = other.issue_cert("client.example")
    paths = {
        "ca": root / "ca.pem",
        "other_ca": root / "other.pem",
        "client_cert": root / "client.pem",
        "client_key": root / "client.key",
        "stranger_cert": root / "stranger.pem",
        "stranger_key": root / "stranger.key",
        "p12": root / "client.p12",
        "garbage": root / "garbage.pem",
    }
    ca.cert_pem.write_to_path(str(paths["ca"]))
    other.cert_pem.write_to_path(str(paths["other_ca"]))
    client.cert_chain_pems[0].write_to_path(str(paths["client_cert"]))
    client.private_key_pem.write_to_path(str(paths["client_key"]))
    stranger.cert_chain_pems[0].write_to_path(str(paths["stranger_cert"]))
    stranger.private_key_pem.write_to_path(str(paths["stranger_key"]))
    key = serialization.load_pem_private_key(client.private_key_pem.bytes(), None)
    cert = x509.load_pem_x509_certificate(client.cert_chain_pems[0].bytes())
    paths["p12"].write_bytes(
        pkcs12.serialize_key_and_certificates(
            b"client",
            key,  # type: ignore[arg-type]
            cert,
            None,
            serialization.BestAvailableEncryption(PASSWORD.encode()),
        )
    )
    paths["garbage"].write_text("not a certificate\n")
    return {name: str(path) for name, path in paths.items()}


def _server_credentials(
    cert: trustme.LeafCert, client_ca: trustme.CA | None = None
) -> grpc.ServerCredentials:
    chain = b"".join(blob.bytes() for blob in cert.cert_chain_pems)
    return grpc.ssl_server_credentials(
        [(cert.private_key_pem.bytes(), chain)],
        root_certificates=client_ca.cert_pem.bytes() if client_ca is not None else None,
        require_client_auth=client_ca is not None,
    )


def _self_signed(names: list[str], *, key_ids: bool = False) -> tuple[bytes, bytes]:
    """(key, certificate) PEM of a self-signed certificate, as a development kernel has
    (``key_ids``: with subject and authority key identifiers, as ``dotnet dev-certs``
    makes them)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    alt: list[x509.GeneralName] = []
    for name in names:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt.append(x509.DNSName(name))
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
    )
    if key_ids:
        public = key.public_key()
        builder = builder.add_extension(
            x509.SubjectKeyIdentifier.from_public_key(public), critical=False
        ).add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
    cert = builder.sign(key, hashes.SHA256())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


def _check(channel: grpc.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    answer = stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


def _refused(conn: cc.Connection, kind: type[Exception], timeout: float = 10) -> Exception:
    """connect() must raise ``kind`` promptly (well before ``timeout``): FAILED at once."""
    started = time.monotonic()
    with pytest.raises(kind) as caught:
        conn.connect(timeout=timeout)
    took = time.monotonic() - started
    assert took < 2.0, f"{kind.__name__} took {took:.2f}s"
    assert conn.state is S.FAILED
    stats = conn.stats()
    assert stats.last_error == str(caught.value)
    return caught.value


# ---------------------------------------------------------------------------- mistakes


@pytest.mark.timeout(30)
def test_tls_against_a_plaintext_server_says_add_disable_tls(servers, capture) -> None:
    server = Server(None)
    servers.append(server)
    with cc.Connection(f"chronicle://127.0.0.1:{server.port}", retry_attempts=None) as conn:
        error = _refused(conn, cc.TlsError)
        assert "speaks plaintext" in str(error)
        assert "disableTls=true" in str(error)
        assert "\n" not in str(error)
        assert conn.stats().failed_attempts == 1  # not retried: retrying cannot help
        refused = capture.named("connect_refused")
        assert len(refused) == 1
        assert refused[0]["error"] == str(error)
        # A later connect() tries again (the server may have been fixed), and fails alike.
        _refused(conn, cc.TlsError)
    # Compared with raw grpc: the same server over plaintext is fine.
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        _check(channel)


@pytest.mark.timeout(30)
def test_plaintext_against_a_tls_server_says_remove_disable_tls(servers, ca) -> None:
    server = Server(_server_credentials(ca.issue_cert("localhost", "127.0.0.1")))
    servers.append(server)
    with cc.Connection(f"chronicle://127.0.0.1:{server.port}?disableTls=true") as conn:
        error = _refused(conn, cc.TlsError)
        assert "speaks TLS" in str(error)
        assert "remove disableTls=true" in str(error)


@pytest.mark.timeout(30)
def test_an_untrusted_certificate_says_set_ca_path(servers, ca, files) -> None:
    server = Server(_server_credentials(ca.issue_cert("localhost", "127.0.0.1")))
    servers.append(server)
    with cc.Connection(f"chronicle://localhost:{server.port}") as conn:
        error = str(_refused(conn, cc.TlsError))
        assert f"certificate of localhost:{server.port} (for localhost, 127.0.0.1)" in error
        assert "not trusted by the default root certificates" in error
        assert "set caPath" in error
    with cc.Connection(f"chronicle://localhost:{server.port}?caPath={files['other_ca']}") as conn:
        error = str(_refused(conn, cc.TlsError))
        assert f"not trusted by caPath '{files['other_ca']}'" in error
    # The right CA connects, and calls go through.
    with cc.Connection(f"chronicle://localhost:{server.port}?caPath={files['ca']}") as conn:
        conn.connect(timeout=10)
        _check(conn.channel())


@pytest.mark.timeout(30)
def test_a_name_mismatch_names_the_certificates_names(servers, ca, files) -> None:
    server = Server(_server_credentials(ca.issue_cert("kernel.example")))
    servers.append(server)
    with cc.Connection(f"chronicle://127.0.0.1:{server.port}?caPath={files['ca']}") as conn:
        error = str(_refused(conn, cc.TlsError))
        assert error.startswith("name mismatch:")
        assert "is for kernel.example, not 127.0.0.1" in error
    # Raw grpc fails the same way, with less to go on.
    channel = grpc.secure_channel(
        f"127.0.0.1:{server.port}", grpc.ssl_channel_credentials(Path(files["ca"]).read_bytes())
    )
    with channel, pytest.raises(grpc.RpcError) as raw:
        _check(channel)
    assert raw.value.code() is grpc.StatusCode.UNAVAILABLE


# ---------------------------------------------------------------------------- mutual TLS


@pytest.mark.timeout(40)
def test_mutual_tls_accepts_the_client_certificate_and_refuses_without(servers, ca, files) -> None:
    server = Server(_server_credentials(ca.issue_cert("localhost"), client_ca=ca))
    servers.append(server)
    base = f"chronicle://localhost:{server.port}?caPath={files['ca']}"
    with cc.Connection(
        f"{base}&certificatePath={files['client_cert']}&keyPath={files['client_key']}"
    ) as conn:
        conn.connect(timeout=10)
        _check(conn.channel())
    # grpc's server just closes the connection after the handshake, as a TLS terminator
    # whose backend restarts does too: a likely reason, retried, not a verdict.
    with cc.Connection(base, retry_attempts=None) as conn:
        with pytest.raises(cc.ConnectTimeoutError) as caught:
            conn.connect(timeout=2)
        error = str(caught.value)
        assert "may require a client certificate" in error
        assert "certificatePath and keyPath" in error
        assert conn.state is S.CONNECTING
    with cc.Connection(
        f"{base}&certificatePath={files['stranger_cert']}&keyPath={files['stranger_key']}",
        retry_attempts=None,
    ) as conn:
        with pytest.raises(cc.ConnectTimeoutError) as caught:
            conn.connect(timeout=2)
        assert "may not accept the client certificate" in str(caught.value)


@pytest.mark.timeout(40)
def test_pkcs12_with_the_right_password_connects_and_the_wrong_one_is_refused_at_once(
    servers, ca, files
) -> None:
    server = Server(_server_credentials(ca.issue_cert("localhost"), client_ca=ca))
    servers.append(server)
    base = (
        f"chronicle://localhost:{server.port}?caPath={files['ca']}&certificatePath={files['p12']}"
    )
    with cc.Connection(f"{base}&certificatePassword={PASSWORD}") as conn:
        conn.connect(timeout=10)
        _check(conn.channel())
    with pytest.raises(cc.ConfigurationError) as caught:
        cc.Connection(f"{base}&certificatePassword=wrong-{PASSWORD}")
    assert caught.value.option == "certificatePassword"
    assert files["p12"] in str(caught.value)
    assert PASSWORD not in str(caught.value)
    assert caught.value.__context__ is None or PASSWORD not in repr(caught.value.__context__)


def test_pkcs12_without_cryptography_names_the_extra(files, monkeypatch) -> None:
    for name in [n for n in sys.modules if n.split(".")[0] == "cryptography"]:
        monkeypatch.setitem(sys.modules, name, None)  # as if it were not installed
    with pytest.raises(cc.ConfigurationError) as caught:
        cc.Connection(
            f"chronicle://localhost:1?certificatePath={files['p12']}"
            f"&certificatePassword={PASSWORD}",
            auto_connect=False,
        )
    assert "chronicle-conn[pkcs12]" in str(caught.value)


@pytest.mark.parametrize(
    ("query", "option", "words"),
    [
        ("caPath={missing}", "caPath", "does not exist"),
        ("caPath={garbage}", "caPath", "holds no usable PEM certificate"),
        ("certificatePath={client_cert}&keyPath={stranger_key}", "keyPath", "is not the key of"),
        ("certificatePath={client_cert}&keyPath={missing}", "keyPath", "does not exist"),
        ("caPath={directory}", "caPath", "does not exist or is not a file"),
        ("certificatePath={garbage}&keyPath={client_key}", "certificatePath", "is not a PEM"),
        ("certificatePath={client_cert}", "keyPath", "holds no private key"),
    ],
)
def test_unusable_files_are_a_configuration_error_naming_the_file(
    files, tmp_path, query, option, words
) -> None:
    values = {**files, "missing": str(tmp_path / "missing.pem"), "directory": str(tmp_path)}
    text = f"chronicle://localhost:1?{query.format(**values)}"
    with pytest.raises(cc.ConfigurationError) as caught:
        cc.Connection(text, auto_connect=False)
    message = str(caught.value)
    assert caught.value.option == option, message
    assert words in message
    assert "\n" not in message
    named = [path for key, path in values.items() if f"{{{key}}}" in query]
    assert any(path in message for path in named), message


# ---------------------------------------------------------------------------- skip validation


@pytest.mark.timeout(60)
@pytest.mark.parametrize("first", [True, False], ids=["name-first", "address-first"])
def test_skip_tls_validation_pins_every_host_s_certificate(servers, capture, first) -> None:
    """Several development kernels, each with a self-signed certificate of its own for
    localhost and 127.0.0.1 (and one more name): every host's certificate is trusted,
    not only the first's, so round robin uses them all."""
    for name in ("kernel-a.local", "kernel-b.local", "kernel-c.local"):
        key, cert = _self_signed(
            [name, "localhost", "127.0.0.1"][:: 1 if first else -1], key_ids=not first
        )
        servers.append(Server(grpc.ssl_server_credentials([(key, cert)])))
    hosts = ",".join(f"127.0.0.1:{server.port}" for server in servers)
    text = f"chronicle://{hosts}?skipTlsValidation=true&loadBalancer=round-robin"
    with cc.Connection(text, reconnect_base_delay=0.05, reconnect_max_delay=0.5) as conn:
        conn.connect(timeout=10)
        deadline = time.monotonic() + 10
        while conn.stats().backends_ready != 3 and time.monotonic() < deadline:
            _check(conn.channel())
        assert conn.stats().backends_ready == 3
        for _ in range(9):
            _check(conn.channel())
    [warning] = capture.named("tls_validation_skipped")[:1]
    assert all(f"127.0.0.1:{server.port}" in warning["host"] for server in servers)


@pytest.mark.timeout(60)
def test_skip_tls_validation_fails_over_past_a_dead_first_host(servers) -> None:
    """The first host (by name) is down; the live one's certificate names its address
    and another name, not the first host's: the channel checks it against a name it
    carries (not the authority it lacks), and pick-first reaches it."""
    key, cert = _self_signed(["127.0.0.1", "kernel-b.local"], key_ids=True)
    live = Server(grpc.ssl_server_credentials([(key, cert)]))
    servers.append(live)
    with socket.socket() as spare:  # a port nobody listens on
        spare.bind(("127.0.0.1", 0))
        dead = spare.getsockname()[1]
    text = f"chronicle://localhost:{dead},127.0.0.1:{live.port}?skipTlsValidation=true"
    with cc.Connection(text, reconnect_base_delay=0.05, reconnect_max_delay=0.5) as conn:
        conn.connect(timeout=10)
        for _ in range(5):
            _check(conn.channel())


@pytest.mark.timeout(60)
def test_skip_tls_validation_is_not_held_up_by_a_silent_host(servers) -> None:
    """A host that accepts the TCP connection and never answers the TLS handshake: the
    certificates are fetched for at most half the attempt, and round robin connects to
    the host that answers."""
    key, cert = _self_signed(["localhost", "127.0.0.1"], key_ids=True)
    live = Server(grpc.ssl_server_credentials([(key, cert)]))
    servers.append(live)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)  # never accepted: the handshake gets no answer
        hosts = f"127.0.0.1:{silent.getsockname()[1]},127.0.0.1:{live.port}"
        text = f"chronicle://{hosts}?skipTlsValidation=true&loadBalancer=round-robin"
        with cc.Connection(
            text, attempt_timeout=2.0, reconnect_base_delay=0.05, reconnect_max_delay=0.5
        ) as conn:
            conn.connect(timeout=15)
            for _ in range(5):
                _check(conn.channel())


@pytest.mark.timeout(30)
def test_skip_tls_validation_reaches_a_self_signed_server(servers, capture) -> None:
    key, cert = _self_signed(["kernel.local"])  # not even the name we dial
    server = Server(grpc.ssl_server_credentials([(key, cert)]))
    servers.append(server)
    with cc.Connection(f"chronicle://127.0.0.1:{server.port}") as conn:
        assert "not trusted" in str(_refused(conn, cc.TlsError))
    with cc.Connection(f"chronicle://127.0.0.1:{server.port}?skipTlsValidation=true") as conn:
        conn.connect(timeout=10)
        _check(conn.channel())
        conn.reconnect()  # every channel built warns
        wait_for_generation(conn, 2)
    warnings = capture.named("tls_validation_skipped")
    assert len(warnings) >= 2
    assert all(w["level"] == "warning" for w in warnings)
    assert warnings[0]["certificate_for"] == "kernel.local"


# ---------------------------------------------------------------------------- still retried


@pytest.mark.timeout(120)
def test_a_tls_server_that_restarts_is_retried_not_refused(servers, ca, files) -> None:
    """30 graceful stops and restarts of a mutual-TLS server on the same port: the
    connection comes back every time, and never mistakes a stopping server for a
    configuration mistake (which would make it FAILED)."""
    server = Server(_server_credentials(ca.issue_cert("localhost"), client_ca=ca))
    servers.append(server)
    changes: list[cc.StateChange] = []
    conn = cc.Connection(
        f"chronicle://localhost:{server.port}?caPath={files['ca']}"
        f"&certificatePath={files['client_cert']}&keyPath={files['client_key']}",
        retry_attempts=None,
        reconnect_base_delay=0.05,
        reconnect_max_delay=0.2,
        liveness="health",
        keepalive_stale_after=2.0,
    )
    conn.add_listener(changes.append)
    with conn:
        conn.connect(timeout=10)
        for cycle in range(30):
            server.stop(grace=0.05 if cycle % 2 else None)
            with conn._core.cond:
                assert conn._core.cond.wait_for(lambda: not conn.connected, 10), cycle
            server.start()
            conn.connect(timeout=15)
            _check(conn.channel())
    assert not [c for c in changes if c.new is S.FAILED], [str(c) for c in changes]
    assert conn.stats().connects == 31


@pytest.mark.timeout(30)
def test_a_server_that_is_down_is_retried_as_before() -> None:
    port = free_port()
    conn = cc.Connection(
        f"chronicle://127.0.0.1:{port}",
        retry_attempts=2,
        reconnect_base_delay=0.05,
    )
    with conn, pytest.raises(cc.RetriesExhaustedError):
        conn.connect(timeout=20)
    # Retried (the budget's 3, plus any a waiting caller's demand added), not refused.
    assert conn.stats().failed_attempts >= 3


# ---------------------------------------------------------------------------- a Go server


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "etcd_tls",
    [pytest.param(True, id="etcd-tls"), pytest.param(False, id="etcd-plaintext")],
)
def test_against_etcd_the_mistakes_are_named_as_against_grpcio(
    etcd_tls, ca, files, tmp_path
) -> None:
    """etcd (Debian's etcd-server, grpc-go): the same sentences, and the right
    configuration connects."""
    from tests.harness.etcd import EtcdProcess, require_etcd

    tls = None
    if etcd_tls:
        cert = ca.issue_cert("localhost", "127.0.0.1")
        cert_file, key_file = tmp_path / "etcd.pem", tmp_path / "etcd.key"
        cert.cert_chain_pems[0].write_to_path(str(cert_file))
        cert.private_key_pem.write_to_path(str(key_file))
        tls = (str(cert_file), str(key_file), files["ca"])
    with EtcdProcess(binary=require_etcd(), tls=tls) as etcd:
        etcd.start()
        where = f"chronicle://localhost:{etcd.port}"
        if etcd_tls:
            mistakes = [
                (f"{where}?disableTls=true", "speaks TLS, not plaintext"),
                (where, "is not trusted by the default root certificates"),
            ]
            right = f"{where}?caPath={files['ca']}"
        else:
            mistakes = [(where, "speaks plaintext, not TLS")]
            right = f"{where}?disableTls=true"
        for text, words in mistakes:
            with cc.Connection(text) as conn:
                assert words in str(_refused(conn, cc.TlsError))
        with cc.Connection(right) as conn:
            conn.connect(timeout=10)
            _check(conn.channel())


@pytest.mark.timeout(30)
def test_skip_tls_validation_against_a_plaintext_server_says_add_disable_tls(servers) -> None:
    server = Server(None)
    servers.append(server)
    with cc.Connection(f"chronicle://127.0.0.1:{server.port}?skipTlsValidation=true") as conn:
        assert "speaks plaintext" in str(_refused(conn, cc.TlsError))


@pytest.mark.timeout(120)
def test_skip_tls_validation_follows_a_server_that_restarts_with_a_new_certificate(
    servers,
) -> None:
    """30 restarts on the same port, each with a fresh self-signed certificate (a
    development kernel's life): the pinned certificate is fetched again each time,
    and a certificate that changed between fetch and connect is retried, not FAILED."""
    key, cert = _self_signed(["localhost"])
    server = Server(grpc.ssl_server_credentials([(key, cert)]))
    servers.append(server)
    changes: list[cc.StateChange] = []
    conn = cc.Connection(
        f"chronicle://127.0.0.1:{server.port}?skipTlsValidation=true",
        retry_attempts=None,
        reconnect_base_delay=0.05,
        reconnect_max_delay=0.2,
        liveness="health",
    )
    conn.add_listener(changes.append)
    with conn:
        conn.connect(timeout=10)
        for cycle in range(30):
            server.stop()
            with conn._core.cond:
                assert conn._core.cond.wait_for(lambda: not conn.connected, 10), cycle
            server.credentials = grpc.ssl_server_credentials([_self_signed(["localhost"])])
            server.start()
            conn.connect(timeout=15)
            _check(conn.channel())
    assert not [c for c in changes if c.new is S.FAILED], [str(c) for c in changes]


@pytest.mark.timeout(30)
def test_an_expired_certificate_says_renew_it(servers, ca, files) -> None:
    expired = ca.issue_cert(
        "localhost",
        not_before=datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc),
        not_after=datetime.datetime(2021, 1, 1, tzinfo=datetime.timezone.utc),
    )
    server = Server(_server_credentials(expired))
    servers.append(server)
    with cc.Connection(f"chronicle://localhost:{server.port}?caPath={files['ca']}") as conn:
        error = str(_refused(conn, cc.TlsError))
        assert "is not valid now" in error
        assert "renew the server's certificate" in error


def test_the_failed_address_is_read_from_grpcs_words() -> None:
    from chronicle_conn._channel_factory import _ADDRESS

    for details, host, port in (
        ("last error: UNKNOWN: ipv4:127.0.0.1:35000: Tls handshake failed", "127.0.0.1", 35000),
        ("last error: UNAVAILABLE: ipv6:%5B::1%5D:43601: Socket closed", "::1", 43601),
        ("last error: UNAVAILABLE: ipv6:[::1]:43601: Socket closed", "::1", 43601),
    ):
        match = _ADDRESS.search(details)
        assert match is not None
        assert (match.group(1) or match.group(2), int(match.group(3))) == (host, port)
