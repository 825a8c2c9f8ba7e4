"""The dev server's security: the OAuth token endpoint on the gRPC port (through the
same-port front), bearer tokens and API keys on every call, self-signed TLS, mutual
TLS, the connection string it advertises and the ``dev-server --auth --tls`` command
line. Real sockets on 127.0.0.1 only."""

from __future__ import annotations

import base64
import collections
import http.client
import json
import os
import queue
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import grpc
import pytest
import structlog
import trustme
from google.protobuf import empty_pb2

import chronicle_conn as cc
from chronicle_conn import _devfront, _health
from chronicle_conn._proto import clients_pb2_grpc, host_pb2_grpc
from chronicle_conn.connection_string import DEVELOPMENT_CLIENT_ID, DEVELOPMENT_CLIENT_SECRET
from chronicle_conn.devserver import TOKEN_PATH, DevServer, DevServerBindError, ServerTls
from tests.helpers import connect_request

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[1]
LOCAL_POOL = [("grpc.use_local_subchannel_pool", 1)]
INTERVAL = 0.2
API_KEY = "dev-api-key-0123456789"
CONNECT = "/Cratis.Chronicle.Contracts.Clients.ConnectionService/Connect"
KEEPALIVE = "/Cratis.Chronicle.Contracts.Clients.ConnectionService/ConnectionKeepAlive"
VERSION_INFO = "/Cratis.Chronicle.Contracts.Host.Server/GetVersionInfo"
DEV_FORM = {
    "grant_type": "client_credentials",
    "client_id": DEVELOPMENT_CLIENT_ID,
    "client_secret": DEVELOPMENT_CLIENT_SECRET,
}


# -- helpers -------------------------------------------------------------------------------


def client_ssl_context(server: DevServer) -> ssl.SSLContext | None:
    pem = server.tls_certificate_pem
    return None if pem is None else ssl.create_default_context(cadata=pem.decode("ascii"))


def http_request(
    server: DevServer,
    *,
    form: Mapping[str, str] | None = None,
    body: bytes | None = None,
    method: str = "POST",
    path: str = TOKEN_PATH,
    headers: Mapping[str, str] | None = None,
) -> tuple[int, Any, Any]:
    """One request with urllib: ``(status, decoded JSON body or None, headers)``."""
    scheme = "https" if server.tls_certificate_pem is not None else "http"
    data = body if form is None else urllib.parse.urlencode(form).encode()
    request = urllib.request.Request(
        f"{scheme}://{server.address}{path}", data=data, method=method, headers=dict(headers or {})
    )
    try:
        with urllib.request.urlopen(
            request, timeout=5, context=client_ssl_context(server)
        ) as response:
            raw = response.read()
            return response.status, json.loads(raw) if raw else None, response.headers
    except urllib.error.HTTPError as error:
        with error:
            raw = error.read()
            return error.code, json.loads(raw) if raw else None, error.headers


def fetch_token(server: DevServer) -> str:
    status, body, _ = http_request(server, form=DEV_FORM)
    assert status == 200, body
    token: str = body["access_token"]
    return token


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def open_channel(server: DevServer, target: str | None = None) -> grpc.Channel:
    target = target or server.address
    pem = server.tls_certificate_pem
    if pem is None:
        return grpc.insecure_channel(target, options=LOCAL_POOL)
    credentials = grpc.ssl_channel_credentials(root_certificates=pem)
    return grpc.secure_channel(target, credentials, options=LOCAL_POOL)


def version_info(channel: grpc.Channel, metadata: Any = ()) -> str:
    info = host_pb2_grpc.ServerStub(channel).GetVersionInfo(
        empty_pb2.Empty(), metadata=metadata, timeout=5
    )
    return str(info.Version)


def call_error(channel: grpc.Channel, metadata: Any = ()) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        version_info(channel, metadata)
    return caught.value


@pytest.fixture(params=["plaintext", "tls"])
def secured(request: pytest.FixtureRequest) -> Iterator[DevServer]:
    """A dev server with the development client and an API key, plaintext or self-signed TLS."""
    with DevServer(
        auth=True,
        api_keys=[API_KEY],
        tls=request.param == "tls",
        keepalive_interval=INTERVAL,
    ) as server:
        yield server


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


# -- the token endpoint --------------------------------------------------------------------


def test_token_endpoint_answers_on_the_grpc_port(secured: DevServer) -> None:
    status, body, headers = http_request(secured, form=DEV_FORM)
    assert status == 200
    assert set(body) == {"access_token", "token_type", "expires_in"}
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 3600
    assert len(body["access_token"]) >= 32
    assert headers["Content-Type"] == "application/json"
    assert headers["Cache-Control"] == "no-store"
    assert fetch_token(secured) != body["access_token"]  # a new one each time

    wrong_secret = dict(DEV_FORM, client_secret="not-the-secret")
    status, body, headers = http_request(secured, form=wrong_secret)
    assert (status, body["error"]) == (401, "invalid_client")
    assert headers["WWW-Authenticate"].startswith("Basic")
    status, body, _ = http_request(secured, form=dict(DEV_FORM, client_id="somebody-else"))
    assert (status, body["error"]) == (401, "invalid_client")
    status, body, _ = http_request(secured, form=dict(DEV_FORM, grant_type="password"))
    assert (status, body["error"]) == (400, "unsupported_grant_type")

    status, body, _ = http_request(secured, method="GET")
    assert (status, body["error"]) == (405, "method_not_allowed")
    status, body, _ = http_request(secured, form=DEV_FORM, path="/connect/authorize")
    assert (status, body["error"]) == (404, "not_found")
    status, _, _ = http_request(secured, method="GET", path="/")
    assert status == 404

    assert [(client, outcome) for client, outcome, _ in secured.token_requests] == [
        (DEVELOPMENT_CLIENT_ID, "issued"),
        (DEVELOPMENT_CLIENT_ID, "issued"),
        (DEVELOPMENT_CLIENT_ID, "invalid_client"),
        ("somebody-else", "invalid_client"),
        (DEVELOPMENT_CLIENT_ID, "unsupported_grant_type"),
    ]
    times = [at for _, _, at in secured.token_requests]
    assert times == sorted(times)


def test_token_endpoint_takes_http_basic_client_authentication() -> None:
    secret = "s3cr:t+/ %&="  # characters that form-encoding changes
    with DevServer(auth={"app": secret}) as server:

        def basic(user: str, password: str) -> dict[str, str]:
            raw = base64.b64encode(f"{user}:{password}".encode()).decode()
            return {"Authorization": f"Basic {raw}"}

        form = {"grant_type": "client_credentials"}
        # RFC 6749 2.3.1 form-encodes both inside Basic; many clients send them raw.
        encoded = urllib.parse.quote_plus(secret)
        for headers in (basic("app", secret), basic("app", encoded)):
            status, body, _ = http_request(server, form=form, headers=headers)
            assert status == 200, body
        status, body, _ = http_request(server, form=form, headers=basic("app", "wrong"))
        assert (status, body["error"]) == (401, "invalid_client")
        both = dict(form, client_secret=secret)
        status, body, _ = http_request(server, form=both, headers=basic("app", secret))
        assert (status, body["error"]) == (400, "invalid_request")
        status, body, _ = http_request(server, form=form, headers={"Authorization": "Bearer x"})
        assert (status, body["error"]) == (401, "invalid_client")
        status, body, _ = http_request(server, form={"client_id": "app", "client_secret": secret})
        assert (status, body["error"]) == (400, "invalid_request")  # no grant_type
        status, body, _ = http_request(server, form={"grant_type": "client_credentials"})
        assert (status, body["error"]) == (401, "invalid_client")  # no client at all
        json_body = json.dumps(DEV_FORM).encode()
        status, body, _ = http_request(
            server, body=json_body, headers={"Content-Type": "application/json"}
        )
        assert (status, body["error"]) == (400, "invalid_request")
        repeated = b"grant_type=client_credentials&grant_type=client_credentials"
        status, body, _ = http_request(server, body=repeated)
        assert (status, body["error"]) == (400, "invalid_request")
    outcomes = [outcome for _, outcome, _ in server.token_requests]
    assert outcomes.count("issued") == 2


def test_http_keep_alive_head_and_malformed_requests() -> None:
    with DevServer(auth=True) as server:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        try:
            form = urllib.parse.urlencode(DEV_FORM)
            form_type = {"Content-Type": "application/x-www-form-urlencoded"}
            connection.request("POST", TOKEN_PATH, body=form, headers=form_type)
            first = connection.getresponse()
            assert first.status == 200
            assert json.loads(first.read())["token_type"] == "Bearer"
            sock = connection.sock
            connection.request("HEAD", TOKEN_PATH)
            head = connection.getresponse()
            assert head.status == 405
            assert head.getheader("Allow") == "POST"
            assert head.read() == b""
            connection.request("POST", TOKEN_PATH + "?x=1", body=form, headers=form_type)
            assert connection.getresponse().read()
            assert connection.sock is sock  # one connection for all three
        finally:
            connection.close()

        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
            raw.sendall(b"NOT HTTP AT ALL\r\n\r\n")
            answer = read_until_eof(raw)
        assert answer.startswith(b"HTTP/1.1 400 ")
        assert b"Connection: close" in answer


# -- bearer tokens and API keys on gRPC calls ------------------------------------------------


def test_calls_need_a_valid_bearer_token_or_api_key(secured: DevServer) -> None:
    token = fetch_token(secured)
    with open_channel(secured) as channel:
        assert version_info(channel, bearer(token)) == secured.version
        assert version_info(channel, (("api-key", API_KEY),)) == secured.version

        for metadata in (
            (),
            bearer("forged-token"),
            (("authorization", f"Basic {token}"),),
            (("api-key", "not-a-key"),),
        ):
            error = call_error(channel, metadata)
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED, metadata
            assert token not in (error.details() or "")
            assert API_KEY not in (error.details() or "")
        assert "no credentials" in (call_error(channel).details() or "")

        # Anonymous, as on the kernel: the descriptor set and health.
        stub = clients_pb2_grpc.ConnectionServiceStub(channel)
        assert stub.GetDescriptorSet(empty_pb2.Empty(), timeout=5).SchemaDefinition
        assert _health.check(channel, timeout=5) == _health.SERVING

    calls = secured.authorized_calls
    assert calls[:6] == [
        (VERSION_INFO, "bearer"),
        (VERSION_INFO, "api_key"),
        (VERSION_INFO, "refused"),
        (VERSION_INFO, "refused"),
        (VERSION_INFO, "refused"),
        (VERSION_INFO, "refused"),
    ]
    kinds = {method.rsplit("/", 1)[1]: kind for method, kind in calls[6:]}
    assert kinds == {
        "GetVersionInfo": "refused",
        "GetDescriptorSet": "anonymous",
        "Check": "anonymous",
    }


def test_the_connect_stream_and_its_answers_carry_the_token(
    secured: DevServer, open_stream
) -> None:
    token = fetch_token(secured)
    with open_channel(secured) as channel:
        stub = clients_pb2_grpc.ConnectionServiceStub(channel)
        refused = open_stream(stub.Connect(connect_request())).end()
        assert refused is not None
        assert refused.code() == grpc.StatusCode.UNAUTHENTICATED

        request = connect_request()
        stream = open_stream(stub.Connect(request, metadata=bearer(token)))
        for _ in range(3):
            keepalive, _ = stream.next()
            assert keepalive.ConnectionId == request.ConnectionId
            stub.ConnectionKeepAlive(keepalive, metadata=bearer(token), timeout=5)
        assert secured.wait_for(lambda: len(secured.keepalive_answers) == 3, timeout=5)
    assert secured.connect_requests[0].ConnectionId == request.ConnectionId
    assert secured.authorized_calls == [
        (CONNECT, "refused"),
        (CONNECT, "bearer"),
        (KEEPALIVE, "bearer"),
        (KEEPALIVE, "bearer"),
        (KEEPALIVE, "bearer"),
    ]


class _Details(
    collections.namedtuple(
        "_Details",
        ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"),
    ),
    grpc.ClientCallDetails,
):
    pass


class _AddMetadata(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds fixed metadata to every unary and server-streaming call."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    def _details(self, details: Any) -> _Details:
        return _Details(
            details.method,
            details.timeout,
            (*(details.metadata or ()), *self._metadata),
            details.credentials,
            details.wait_for_ready,
            details.compression,
        )

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)


def test_a_managed_connection_keeps_alive_through_the_front() -> None:
    """A chronicle_conn.Connection (its own Connect stream and answers) through the front,
    its channel carrying a token from the endpoint."""
    with DevServer(auth=True, tls=True, keepalive_interval=INTERVAL) as server:
        token = fetch_token(server)
        pem = server.tls_certificate_pem
        assert pem is not None

        def connect_fun(target: str, options: Any) -> grpc.Channel:
            credentials = grpc.ssl_channel_credentials(root_certificates=pem)
            channel = grpc.secure_channel(target, credentials, options=list(options))
            return grpc.intercept_channel(channel, _AddMetadata(bearer(token)))

        connection = cc.Connection(
            f"chronicle://127.0.0.1:{server.port}",
            connect_fun=connect_fun,
            keepalive_stale_after=30.0,
        )
        try:
            connection.connect(timeout=15)
            assert server.wait_for(lambda: len(server.keepalive_answers) >= 3, timeout=10)
            assert version_info(connection.channel()) == server.version
        finally:
            connection.close()
    methods = {method for method, kind in server.authorized_calls if kind == "bearer"}
    assert {CONNECT, KEEPALIVE} <= methods
    assert all(kind != "refused" for _, kind in server.authorized_calls)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"auth": True},
        {"auth": True, "tls": True},
        {"api_keys": [API_KEY]},
        {"api_keys": [API_KEY], "tls": True},
    ],
    ids=["token", "token-tls", "api-key", "api-key-tls"],
)
def test_a_connection_from_the_advertised_connection_string(kwargs: dict[str, Any]) -> None:
    """End to end with the library's own client: its token fetch or API key, its
    skipTlsValidation against the self-signed certificate, its keep-alives."""
    with DevServer(keepalive_interval=INTERVAL, **kwargs) as server:
        connection = cc.Connection(server.connection_string)
        try:
            connection.connect(timeout=15)
            assert version_info(connection.channel()) == server.version
            assert server.wait_for(lambda: len(server.keepalive_answers) >= 3, timeout=10)
        finally:
            connection.close()
    kinds = {kind for _, kind in server.authorized_calls}
    assert "refused" not in kinds
    assert ("bearer" if "auth" in kwargs else "api_key") in kinds
    if "auth" in kwargs:
        assert [outcome for _, outcome, _ in server.token_requests] == ["issued"]


@pytest.mark.timing
def test_tokens_expire_after_their_lifetime() -> None:
    lifetime = 1.0
    with DevServer(auth=True, token_lifetime=lifetime) as server, open_channel(server) as channel:
        status, body, _ = http_request(server, form=DEV_FORM)
        assert (status, body["expires_in"]) == (200, 1)
        token = body["access_token"]
        issued_at = server.token_requests[-1][2]  # recorded after the token was made
        assert version_info(channel, bearer(token)) == server.version
        expired_at = issued_at + lifetime
        # Nothing notifies at the expiry: the wait ends by its timeout, just after it.
        assert server.wait_for(
            lambda: time.monotonic() >= expired_at,
            timeout=max(0.0, expired_at - time.monotonic()) + 0.05,
        )
        error = call_error(channel, bearer(token))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "expired" in (error.details() or "")
        assert token not in (error.details() or "")
        assert version_info(channel, bearer(fetch_token(server))) == server.version


def test_expires_in_is_the_lifetime_rounded_up_and_expire_tokens_ends_them() -> None:
    with DevServer(auth=True, token_lifetime=2.5) as server, open_channel(server) as channel:
        status, body, _ = http_request(server, form=DEV_FORM)
        assert (status, body["expires_in"]) == (200, 3)
        token = body["access_token"]
        assert version_info(channel, bearer(token)) == server.version
        server.expire_tokens()
        assert call_error(channel, bearer(token)).code() == grpc.StatusCode.UNAUTHENTICATED
        assert version_info(channel, bearer(fetch_token(server))) == server.version


def test_an_open_stream_outlives_its_token(open_stream) -> None:
    """Streams are authenticated once, at their start (as on the kernel)."""
    with DevServer(auth=True, keepalive_interval=INTERVAL) as server, open_channel(server) as ch:
        token = fetch_token(server)
        stub = clients_pb2_grpc.ConnectionServiceStub(ch)
        stream = open_stream(stub.Connect(connect_request(), metadata=bearer(token)))
        stream.next()
        server.expire_tokens()
        sent = server.keepalives_sent
        assert server.wait_for(lambda: server.keepalives_sent >= sent + 2, timeout=5)
        stream.next()


def test_api_keys_alone_need_no_front() -> None:
    with DevServer(api_keys=[API_KEY, "second-key"]) as server, open_channel(server) as channel:
        assert server._front is None  # grpc listens on the public port itself
        assert server.oauth_client_ids == ()
        assert version_info(channel, (("api-key", "second-key"),)) == server.version
        error = call_error(channel, bearer("anything"))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "api-key" in (error.details() or "")
        assert server.connection_string == (
            f"chronicle://127.0.0.1:{server.port}?apiKey={API_KEY}&disableTls=true"
        )
    assert server.authorized_calls == [(VERSION_INFO, "api_key"), (VERSION_INFO, "refused")]


def test_an_authenticator_and_auth_must_both_pass() -> None:
    def authenticator(method: str, metadata: Mapping[str, str]) -> bool:
        return metadata.get("x-tenant") == "acme"

    with (
        DevServer(auth=True, authenticator=authenticator) as server,
        open_channel(server) as channel,
    ):
        token = fetch_token(server)
        tenant = (("x-tenant", "acme"),)
        assert version_info(channel, (*bearer(token), *tenant)) == server.version
        for metadata in (bearer(token), tenant):
            assert call_error(channel, metadata).code() == grpc.StatusCode.UNAUTHENTICATED
    assert [kind for _, kind in server.authorized_calls] == ["bearer", "refused", "refused"]


# -- the front: TLS, mutual TLS, many connections, stopping -------------------------------


def test_mutual_tls_through_the_front(ca: trustme.CA) -> None:
    server_cert = ca.issue_cert("127.0.0.1", "localhost")
    client_cert = ca.issue_cert("client@example.com")
    tls = ServerTls(
        certificate_chain=server_cert.cert_chain_pems[0].bytes(),
        private_key=server_cert.private_key_pem.bytes(),
        client_ca=ca.cert_pem.bytes(),
    )
    root = ca.cert_pem.bytes()
    with DevServer(auth=True, tls=tls) as server:
        # The token endpoint, over the same mutual TLS.
        context = ssl.create_default_context(cadata=root.decode())
        with client_cert.private_key_and_cert_chain_pem.tempfile() as pem:
            context.load_cert_chain(pem)
        form = urllib.parse.urlencode(DEV_FORM).encode()
        url = f"https://{server.address}{TOKEN_PATH}"
        with urllib.request.urlopen(url, data=form, timeout=5, context=context) as response:
            token = json.loads(response.read())["access_token"]
        no_cert = ssl.create_default_context(cadata=root.decode())
        with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
            urllib.request.urlopen(url, data=form, timeout=5, context=no_cert).close()

        with_cert = grpc.ssl_channel_credentials(
            root, client_cert.private_key_pem.bytes(), client_cert.cert_chain_pems[0].bytes()
        )
        with grpc.secure_channel(server.address, with_cert, options=LOCAL_POOL) as channel:
            assert version_info(channel, bearer(token)) == server.version
        without = grpc.ssl_channel_credentials(root)
        with grpc.secure_channel(server.address, without, options=LOCAL_POOL) as channel:
            error = call_error(channel, bearer(token))
            assert error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        with grpc.insecure_channel(server.address, options=LOCAL_POOL) as plain:
            error = call_error(plain, bearer(token))
            assert error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def test_thirty_channels_through_the_front(open_stream) -> None:
    with DevServer(auth=True, tls=True, keepalive_interval=INTERVAL, max_workers=80) as server:
        token = fetch_token(server)
        # The local subchannel pool: one TCP connection per channel, each through the front.
        channels = [open_channel(server) for _ in range(30)]
        try:
            requests = [connect_request() for _ in channels]
            streams = [
                open_stream(
                    clients_pb2_grpc.ConnectionServiceStub(channel).Connect(
                        request, metadata=bearer(token)
                    )
                )
                for channel, request in zip(channels, requests, strict=True)
            ]
            for stream, request in zip(streams, requests, strict=True):
                assert stream.next(timeout=10)[0].ConnectionId == request.ConnectionId
            for channel in channels:
                assert version_info(channel, bearer(token)) == server.version
            assert sorted(server.connection_ids) == sorted(r.ConnectionId for r in requests)
        finally:
            for channel in channels:
                channel.close()


@pytest.mark.timing
@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "tls"])
def test_stop_reaches_connected_clients_promptly(tls: bool, open_stream) -> None:
    server = DevServer(auth=True, tls=tls, keepalive_interval=30.0).start()
    try:
        with open_channel(server) as channel:
            token = fetch_token(server)
            stub = clients_pb2_grpc.ConnectionServiceStub(channel)
            stream = open_stream(stub.Connect(connect_request(), metadata=bearer(token)))
            stream.next()
            idle_http = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            started = time.monotonic()
            server.stop(grace=5.0)
            stopped_in = time.monotonic() - started
            error = stream.end(timeout=5)
            assert error is not None
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            assert stopped_in < 3.0, f"stop() took {stopped_in:.2f}s"
            with idle_http:
                assert read_until_eof(idle_http) == b""
            assert call_error(channel, bearer(token)).code() == grpc.StatusCode.UNAVAILABLE
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", server.port), timeout=5).close()
    finally:
        server.stop()
    server.stop()  # idempotent


def test_a_goaway_goes_through_the_splice() -> None:
    """A raw HTTP/2 client: the grpc server's SETTINGS reach it through the front, and
    at stop its GOAWAY, then the end of the connection."""
    server = DevServer(auth=True).start()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
            empty_settings = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
            raw.sendall(_devfront.H2_PREFACE + empty_settings)
            first = raw.recv(9)
            assert len(first) == 9
            assert first[3] == 0x4  # SETTINGS
            server.stop()
            frames = frame_types(first + read_until_eof(raw))
        assert 0x7 in frames, frames  # GOAWAY
    finally:
        server.stop()


def test_a_taken_port_raises_a_clear_error_with_auth() -> None:
    with DevServer() as taken:
        with pytest.raises(DevServerBindError, match="already in use") as caught:
            DevServer(port=taken.port, auth=True).start()
        assert caught.value.address == taken.address
    with (
        DevServer(auth=True) as taken,
        pytest.raises(DevServerBindError, match="already in use"),
    ):
        DevServer(port=taken.port).start()


def test_the_same_port_serves_again_after_stop() -> None:
    first = DevServer(auth=True, keepalive_interval=INTERVAL).start()
    port = first.port
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        first.stop()
    with DevServer(port=port, auth=True) as second:
        assert fetch_token(second)


# -- connection strings, TLS material, configuration ------------------------------------------


def test_connection_strings() -> None:
    with DevServer() as plain:
        assert plain.connection_string == f"chronicle://127.0.0.1:{plain.port}?disableTls=true"
        assert plain.tls_certificate_pem is None
        assert plain._front is None
    with DevServer(auth=True, tls=True) as server:
        text = server.connection_string
        assert text == (
            f"chronicle://{DEVELOPMENT_CLIENT_ID}:{DEVELOPMENT_CLIENT_SECRET}"
            f"@127.0.0.1:{server.port}?skipTlsValidation=true"
        )
        parsed = cc.ConnectionString.parse(text)
        assert parsed.client_secret == DEVELOPMENT_CLIENT_SECRET
        assert DEVELOPMENT_CLIENT_SECRET not in parsed.redacted()
        assert server.tls_certificate_pem is not None
        assert server.tls_certificate_pem.startswith(b"-----BEGIN CERTIFICATE-----")
    with DevServer(host="0.0.0.0", auth={"app": "pw"}) as wildcard:
        assert wildcard.connection_string == (
            f"chronicle://app:pw@127.0.0.1:{wildcard.port}?disableTls=true"
        )
        assert fetch_token_for(wildcard, "app", "pw")
    with pytest.raises(RuntimeError, match="not started"):
        DevServer(auth=True).connection_string  # noqa: B018


def fetch_token_for(server: DevServer, client_id: str, secret: str) -> str:
    form = {"grant_type": "client_credentials", "client_id": client_id, "client_secret": secret}
    url = f"http://127.0.0.1:{server.port}{TOKEN_PATH}"
    with urllib.request.urlopen(url, data=urllib.parse.urlencode(form).encode(), timeout=5) as r:
        token: str = json.loads(r.read())["access_token"]
    return token


def test_the_self_signed_certificate_names_localhost_and_the_host() -> None:
    from cryptography import x509

    tls = ServerTls.self_signed(["my-dev-box", "10.1.2.3", "::"])
    certificate = x509.load_pem_x509_certificate(tls.certificate_chain)
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = names.get_values_for_type(x509.DNSName)
    ips = {str(address) for address in names.get_values_for_type(x509.IPAddress)}
    assert {"localhost", "my-dev-box", socket.gethostname()} <= set(dns)
    assert {"127.0.0.1", "::1", "10.1.2.3"} <= ips
    assert b"PRIVATE KEY" not in repr(tls).encode()
    assert "private_key" not in repr(tls)


def test_tls_true_without_cryptography_says_what_to_install(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "cryptography", None)
    with pytest.raises(ImportError, match=r"pip install 'chronicle-conn\[pkcs12\]'") as caught:
        DevServer(tls=True)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"auth": {}}, ValueError),
        ({"auth": {"app": ""}}, ValueError),
        ({"auth": {"app": "line\nbreak-XYZZY"}}, ValueError),
        ({"auth": {"XYZZY\n": "pw"}}, ValueError),
        ({"auth": "chronicle-dev-client"}, TypeError),
        ({"api_keys": "single-key-XYZZY"}, TypeError),
        ({"api_keys": [" padded-XYZZY "]}, ValueError),
        ({"api_keys": ["k\u00e9y-XYZZY"]}, ValueError),
        ({"token_lifetime": 0}, ValueError),
        ({"token_lifetime": float("nan")}, ValueError),
        ({"tls": "yes"}, TypeError),
    ],
)
def test_invalid_security_options(kwargs: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error) as caught:
        DevServer(**kwargs)
    message = str(caught.value)
    assert "XYZZY" not in message
    assert "\n" not in message


def test_no_secret_in_logs_reprs_or_errors(secured: DevServer) -> None:
    with structlog.testing.capture_logs() as events:
        token = fetch_token(secured)
        http_request(secured, form=dict(DEV_FORM, client_secret="wrong-secret-xyz"))
        http_request(secured, form=dict(DEV_FORM, client_id="pasted-secret-abc"))
        with open_channel(secured) as channel:
            version_info(channel, bearer(token))
            details = [
                call_error(channel, bearer(token + "x")).details(),
                call_error(channel, (("api-key", "wrong-key-xyz"),)).details(),
            ]
        secured.expire_tokens()
    text = repr(events) + repr(secured) + "".join(d or "" for d in details)
    for secret in (
        DEVELOPMENT_CLIENT_SECRET,
        token,
        API_KEY,
        "wrong-secret-xyz",
        "pasted-secret-abc",
        "wrong-key-xyz",
    ):
        assert secret not in text, secret
    names = [event["event"] for event in events]
    assert "token_issued" in names
    assert "token_refused" in names
    assert "call_refused" in names


# -- the command line ------------------------------------------------------------------------


def test_cli_dev_server_auth_tls_prints_a_redacted_connection_string(tmp_path: Path) -> None:
    certificate = tmp_path / "dev-cert.pem"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "chronicle_conn", "dev-server", "--auth", "--tls"),
            *("--port", "0", "--tls-cert-out", str(certificate)),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=env,
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    try:
        listening = lines.get(timeout=20)
        prefix = "chronicle-conn dev-server listening on "
        assert listening is not None
        assert listening.startswith(prefix), listening
        address = listening[len(prefix) :]
        hint = lines.get(timeout=5)
        assert hint is not None
        expected = (
            f"chronicle-conn dev-server connect with: chronicle://{DEVELOPMENT_CLIENT_ID}:***"
            f"@{address}?skipTlsValidation=true"
        )
        assert hint.startswith(expected), hint
        assert DEVELOPMENT_CLIENT_SECRET not in hint

        # The certificate it wrote validates the server, token endpoint and gRPC alike.
        context = ssl.create_default_context(cafile=str(certificate))
        form = urllib.parse.urlencode(DEV_FORM).encode()
        url = f"https://{address}{TOKEN_PATH}"
        with urllib.request.urlopen(url, data=form, timeout=5, context=context) as response:
            token = json.loads(response.read())["access_token"]
        credentials = grpc.ssl_channel_credentials(certificate.read_bytes())
        with grpc.secure_channel(address, credentials, options=LOCAL_POOL) as channel:
            assert version_info(channel, bearer(token)) == "0.0.0-dev"
            assert call_error(channel).code() == grpc.StatusCode.UNAUTHENTICATED

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert lines.get(timeout=5) is None  # nothing else on stdout
        assert proc.stderr is not None
        stderr = proc.stderr.read()
        assert "token_issued" in stderr
        assert DEVELOPMENT_CLIENT_SECRET not in stderr
        assert token not in stderr
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def test_cli_rejects_contradicting_tls_options(capsys) -> None:
    from chronicle_conn import cli

    for argv, message in (
        (["--tls", "--tls-cert", "c.pem", "--tls-key", "k.pem"], "--tls makes its own"),
        (["--tls-cert-out", "out.pem"], "add --tls"),
        (["--tls-client-ca", "ca.pem"], "--tls-client-ca needs"),
    ):
        with pytest.raises(SystemExit) as caught:
            cli.main(["dev-server", "--port", "0", *argv])
        assert caught.value.code == 2
        assert message in capsys.readouterr().err


# -- raw socket helpers -------------------------------------------------------------------------


def read_until_eof(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """Everything ``sock`` receives until its peer closes (a reset counts as closed)."""
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    data = b""
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk
    raise AssertionError(f"the connection stayed open for {timeout}s ({len(data)} bytes)")


def frame_types(data: bytes) -> list[int]:
    """The types of the HTTP/2 frames in ``data`` (whole frames only)."""
    types = []
    while len(data) >= 9:
        length = struct.unpack(">I", b"\x00" + data[:3])[0]
        types.append(data[3])
        data = data[9 + length :]
    return types
