"""Credentials on every call: an API key, or an OAuth2 token from a real HTTP endpoint.

The kernel is the embedded DevServer with an ``authenticator`` that checks (and
records) what each call carries; the token endpoint is a real ``http.server`` (over TLS
when the channel is), on its own port through ``authPort``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping

import grpc
import pytest
import structlog
import trustme

import chronicle_conn as cc
from chronicle_conn.devserver import DevServer, ServerTls
from tests.harness.ports import free_port
from tests.harness.tokens import TokenEndpoint
from tests.helpers import Capture, version, wait_for_generation

S = cc.ConnectionState
CONNECT = "/Cratis.Chronicle.Contracts.Clients.ConnectionService/Connect"
VERSION = "/Cratis.Chronicle.Contracts.Host.Server/GetVersionInfo"
API_KEY = "k3y-0f-the-app"
SECRET = "cl1ent-s3cret"


class Gate:
    """A DevServer authenticator that records every call and what it carried."""

    def __init__(self, check: object) -> None:
        self.check = check
        self.lock = threading.Lock()
        self.calls: list[tuple[str, bool]] = []  # (method, allowed)

    def __call__(self, method: str, metadata: Mapping[str, str]) -> bool:
        allowed = bool(self.check(metadata))  # type: ignore[operator]
        with self.lock:
            self.calls.append((method, allowed))
        return allowed

    def of(self, method: str) -> list[bool]:
        with self.lock:
            return [allowed for m, allowed in self.calls if m == method]

    def refused(self) -> int:
        with self.lock:
            return sum(1 for _, allowed in self.calls if not allowed)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def pki(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("pki")
    cert = ca.issue_cert("localhost", "127.0.0.1")
    ca_file, cert_file, key_file = root / "ca.pem", root / "cert.pem", root / "key.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    cert.private_key_pem.write_to_path(str(key_file))
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    tls = ServerTls(
        certificate_chain=b"".join(b.bytes() for b in cert.cert_chain_pems),
        private_key=cert.private_key_pem.bytes(),
    )
    return {"ca": str(ca_file), "cert": str(cert_file), "key": str(key_file), "tls": tls}


@pytest.fixture
def closing() -> Iterator[list[object]]:
    things: list[object] = []
    yield things
    for thing in reversed(things):
        thing.close() if isinstance(thing, cc.Connection) else thing.stop()  # type: ignore[attr-defined]


def _string(server: DevServer, tls: bool, pki: dict[str, object], query: str = "") -> str:
    options = f"caPath={pki['ca']}" if tls else "disableTls=true"
    return f"chronicle://{{userinfo}}127.0.0.1:{server.port}?{options}{query}"


# ---------------------------------------------------------------------------- api key


@pytest.mark.timeout(30)
@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "tls"])
def test_the_api_key_arrives_on_every_call_and_the_keepalive_stream(tls, pki, closing) -> None:
    gate = Gate(lambda metadata: metadata.get("api-key") == API_KEY)
    server = DevServer(
        keepalive_interval=0.2, authenticator=gate, tls=pki["tls"] if tls else None
    ).start()
    closing.append(server)
    text = _string(server, tls, pki, f"&apiKey={API_KEY}").format(userinfo="")
    conn = cc.Connection(text)
    closing.append(conn)
    conn.connect(timeout=10)
    assert conn.stats().liveness == "keepalive"
    for _ in range(20):
        version(conn.channel())
    assert gate.of(CONNECT) == [True]  # the library's own stream carried it too
    assert gate.of(VERSION) == [True] * 20
    assert gate.refused() == 0


@pytest.mark.timeout(30)
def test_a_refused_api_key_is_an_authentication_error_at_once(pki, closing, ca) -> None:
    gate = Gate(lambda metadata: metadata.get("api-key") == API_KEY)
    server = DevServer(keepalive_interval=0.2, authenticator=gate).start()
    closing.append(server)
    for query, words in (("&apiKey=wrong", "refused the apiKey"), ("", "requires credentials")):
        text = _string(server, False, pki, query).format(userinfo="")
        conn = cc.Connection(text, retry_attempts=None)
        closing.append(conn)
        started = time.monotonic()
        with pytest.raises(cc.AuthenticationError) as caught:
            conn.connect(timeout=10)
        assert time.monotonic() - started < 2.0
        assert words in str(caught.value)
        assert "wrong" not in str(caught.value)
        assert conn.state is S.FAILED
        assert conn.stats().failed_attempts == 1


# ---------------------------------------------------------------------------- tokens


def _token_setup(
    tls: bool, pki: dict[str, object], closing: list[object], lifetime: float = 3600.0
) -> tuple[DevServer, TokenEndpoint, Gate]:
    endpoint = TokenEndpoint(
        {"shop": SECRET},
        lifetime=lifetime,
        tls=(str(pki["cert"]), str(pki["key"])) if tls else None,
    ).start()
    closing.append(endpoint)
    gate = Gate(lambda metadata: endpoint.valid(metadata.get("authorization")))
    server = DevServer(
        keepalive_interval=0.2, authenticator=gate, tls=pki["tls"] if tls else None
    ).start()
    closing.append(server)
    return server, endpoint, gate


@pytest.mark.timeout(30)
@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "tls"])
def test_a_bearer_token_arrives_on_every_call(tls, pki, closing) -> None:
    server, endpoint, gate = _token_setup(tls, pki, closing)
    text = _string(server, tls, pki, f"&authPort={endpoint.port}")
    conn = cc.Connection(text.format(userinfo=f"shop:{SECRET}@"))
    closing.append(conn)
    conn.connect(timeout=10)
    for _ in range(20):
        version(conn.channel())
    assert gate.of(CONNECT) == [True]
    assert gate.of(VERSION) == [True] * 20
    assert endpoint.requests == [("shop", 200)]  # one token, cached
    assert [t.name for t in conn._threads() if "token" in t.name]  # renewing...
    conn.close()
    assert conn._threads() == []  # ...until closed


@pytest.mark.timeout(60)
@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "tls"])
def test_a_short_lived_token_turns_over_under_steady_calls_without_one_failure(
    tls, pki, closing
) -> None:
    server, endpoint, gate = _token_setup(tls, pki, closing, lifetime=1.2)
    text = _string(server, tls, pki, f"&authPort={endpoint.port}")
    conn = cc.Connection(text.format(userinfo=f"shop:{SECRET}@"))
    closing.append(conn)
    conn.connect(timeout=10)
    failures: list[BaseException] = []
    done = threading.Event()
    counts = [0] * 4

    def caller(index: int) -> None:
        while not done.is_set():
            try:
                version(conn.channel())
                counts[index] += 1
            except Exception as exc:  # counted, not raised: every failure is reported
                failures.append(exc)
            done.wait(0.005)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    # At least five renewals (one every 0.6 s, at half-life) while the calls go on.
    assert endpoint.wait_for(lambda: endpoint.issued() >= 6, 20), endpoint.requests
    done.set()
    for thread in threads:
        thread.join(10)
    assert failures == []
    assert sum(counts) > 100
    assert gate.refused() == 0
    assert conn.stats().connects == 1  # no reconnect was needed for a new token


@pytest.mark.timeout(30)
def test_wrong_credentials_are_an_authentication_error_within_a_second_or_two(pki, closing) -> None:
    server, endpoint, _ = _token_setup(False, pki, closing)
    text = _string(server, False, pki, f"&authPort={endpoint.port}")
    conn = cc.Connection(text.format(userinfo="shop:not-the-secret@"), retry_attempts=None)
    closing.append(conn)
    waiter_errors: list[BaseException] = []

    def waiter() -> None:
        try:
            conn.connect(timeout=20)
        except Exception as exc:
            waiter_errors.append(exc)

    thread = threading.Thread(target=waiter)
    thread.start()
    started = time.monotonic()
    with pytest.raises(cc.AuthenticationError) as caught:
        conn.connect(timeout=10)
    assert time.monotonic() - started < 2.0
    thread.join(5)
    assert [type(e) for e in waiter_errors] == [cc.AuthenticationError]  # waiters told
    assert "refused client 'shop'" in str(caught.value)
    assert "invalid_client" in str(caught.value)
    assert "not-the-secret" not in str(caught.value)
    assert conn.state is S.FAILED
    assert endpoint.requests == [("shop", 401)]  # asked once, not again and again


@pytest.mark.timeout(40)
def test_a_token_endpoint_that_is_down_is_retried_until_it_is_up(pki, closing) -> None:
    port = free_port()
    endpoint = TokenEndpoint({"shop": SECRET}, port=port)
    closing.append(endpoint)
    gate = Gate(lambda metadata: endpoint.valid(metadata.get("authorization")))
    server = DevServer(keepalive_interval=0.2, authenticator=gate).start()
    closing.append(server)
    text = _string(server, False, pki, f"&authPort={port}").format(userinfo=f"shop:{SECRET}@")
    conn = cc.Connection(
        text, retry_attempts=None, reconnect_base_delay=0.1, reconnect_max_delay=0.3
    )
    closing.append(conn)
    with conn._core.cond:
        assert conn._core.cond.wait_for(lambda: conn._core.counters.failed_attempts >= 3, 10)
    assert "token endpoint" in (conn.stats().last_error or "")
    assert conn.state is S.CONNECTING
    endpoint.start()
    conn.connect(timeout=10)
    version(conn.channel())
    assert endpoint.requests == [("shop", 200)]


@pytest.mark.timeout(30)
def test_credentials_revoked_while_connected_fail_the_connection(pki, closing) -> None:
    server, endpoint, _ = _token_setup(False, pki, closing, lifetime=1.0)
    text = _string(server, False, pki, f"&authPort={endpoint.port}")
    conn = cc.Connection(text.format(userinfo=f"shop:{SECRET}@"), retry_attempts=None)
    closing.append(conn)
    changes: list[cc.StateChange] = []
    conn.add_listener(changes.append)
    conn.connect(timeout=10)
    endpoint.clients.clear()  # revoked: the next renewal (at 0.5 s) is refused
    with conn._core.cond:
        assert conn._core.cond.wait_for(lambda: conn._core.state is S.FAILED, 5)
    with pytest.raises(cc.AuthenticationError):
        conn.connect(timeout=5)
    assert ("shop", 401) in endpoint.requests


@pytest.mark.timeout(30)
def test_auth_none_sends_nothing(pki, closing) -> None:
    seen: list[Mapping[str, str]] = []
    server = DevServer(
        keepalive_interval=0.2, authenticator=lambda m, md: seen.append(dict(md)) or True
    ).start()
    closing.append(server)
    conn = cc.Connection(_string(server, False, pki, "&auth=none").format(userinfo=""))
    closing.append(conn)
    conn.connect(timeout=10)
    version(conn.channel())
    assert seen
    assert not any("authorization" in md or "api-key" in md for md in seen)


# ---------------------------------------------------------------------------- secrets


@pytest.mark.timeout(60)
def test_no_secret_in_any_event_repr_message_or_stats_through_a_whole_cycle(pki, closing) -> None:
    capture = Capture()
    structlog.configure(processors=[capture])
    try:
        server, endpoint, gate = _token_setup(False, pki, closing, lifetime=1.0)
        port = server.port
        text = _string(server, False, pki, f"&authPort={endpoint.port}")
        conn = cc.Connection(text.format(userinfo=f"shop:{SECRET}@"), retry_attempts=None)
        closing.append(conn)
        conn.connect(timeout=10)
        shown: list[str] = [repr(conn), str(conn.stats()), repr(conn.stats())]
        assert endpoint.wait_for(lambda: endpoint.issued() >= 3, 10)  # renewals
        server.stop()  # a crash...
        with conn._core.cond:
            assert conn._core.cond.wait_for(lambda: not conn._core.current, 10)
        try:
            conn.channel()
        except cc.NotConnectedError as exc:
            shown.append(str(exc))
        try:
            version(conn.managed_channel, wait_for_ready=False)
        except grpc.RpcError as exc:
            shown.append(str(exc))
        server = DevServer(port=port, keepalive_interval=0.2, authenticator=gate).start()
        closing.append(server)
        wait_for_generation(conn, 2)
        version(conn.channel())
        endpoint.clients.clear()  # and finally refused
        with conn._core.cond:
            assert conn._core.cond.wait_for(lambda: conn._core.state is S.FAILED, 10)
        try:
            conn.connect(timeout=5)
        except cc.AuthenticationError as exc:
            shown.append(str(exc))
            shown.append(repr(exc))
        shown += [repr(conn), str(conn.stats()), repr(conn.config), str(conn.config)]
        shown += [repr(conn._supervisor.dialer.factory.token_source)]
        tokens = list(endpoint.tokens)
    finally:
        structlog.reset_defaults()
    events = [repr(event) for event in capture.events]
    assert any("token_refused" in e for e in events)
    assert len(tokens) >= 3
    for text in shown + events:
        assert SECRET not in text, text
        for token in tokens:
            assert token not in text, text


# ---------------------------------------------------------------------------- turning over


@pytest.mark.timeout(120)
def test_a_kernel_that_restarts_and_forgets_its_tokens_is_reconnected_30_times(
    pki, closing
) -> None:
    """A restarted kernel refuses the token it issued before: the connection fetches a
    new one and comes back, never FAILED (only a fresh token refused means the
    credentials are)."""
    server, endpoint, gate = _token_setup(False, pki, closing)
    port = server.port
    text = _string(server, False, pki, f"&authPort={endpoint.port}")
    conn = cc.Connection(
        text.format(userinfo=f"shop:{SECRET}@"),
        retry_attempts=None,
        reconnect_base_delay=0.05,
        reconnect_max_delay=0.2,
    )
    closing.append(conn)
    changes: list[cc.StateChange] = []
    conn.add_listener(changes.append)
    conn.connect(timeout=10)
    for cycle in range(30):
        server.stop()
        with endpoint.cond:
            endpoint.tokens.clear()  # the restarted kernel knows none of them
        with conn._core.cond:
            assert conn._core.cond.wait_for(lambda: conn._core.current is None, 10), cycle
        server = DevServer(port=port, keepalive_interval=0.2, authenticator=gate).start()
        closing.append(server)
        conn.connect(timeout=10)
        version(conn.channel())
    assert not [c for c in changes if c.new is S.FAILED], [str(c) for c in changes]
    assert endpoint.issued() == 31


@pytest.mark.timeout(30)
def test_after_a_refused_renewal_connect_asks_the_endpoint_again(pki, closing) -> None:
    server, endpoint, _ = _token_setup(False, pki, closing, lifetime=2.0)
    text = _string(server, False, pki, f"&authPort={endpoint.port}")
    conn = cc.Connection(text.format(userinfo=f"shop:{SECRET}@"), retry_attempts=None)
    closing.append(conn)
    conn.connect(timeout=10)
    endpoint.clients.clear()
    with conn._core.cond:
        assert conn._core.cond.wait_for(lambda: conn._core.state is S.FAILED, 10)
    asked = len(endpoint.requests)
    # Still revoked: refused again, by the endpoint (not a cached token that still works).
    with pytest.raises(cc.AuthenticationError):
        conn.connect(timeout=5)
    assert endpoint.requests[asked:] == [("shop", 401)]
    endpoint.clients["shop"] = SECRET  # restored: the next connect() works
    conn.connect(timeout=5)
    assert endpoint.requests[-1] == ("shop", 200)


@pytest.mark.timeout(60)
def test_an_expired_token_with_the_endpoint_down_is_renewed_with_backoff(pki, closing) -> None:
    server, endpoint, _ = _token_setup(False, pki, closing, lifetime=1.0)
    text = _string(server, False, pki, f"&authPort={endpoint.port}")
    conn = cc.Connection(text.format(userinfo=f"shop:{SECRET}@"), retry_attempts=None)
    closing.append(conn)
    conn.connect(timeout=10)
    source = conn._supervisor.dialer.factory.token_source
    endpoint.stop()
    before = source.fetches
    done = threading.Event()
    done.wait(8.0)  # eight token lifetimes with the endpoint down
    tries = source.fetches - before
    # Backing off (0.5, 1, 2, 4 s...): a handful, not 10 a second.
    assert 2 <= tries <= 8, tries


@pytest.mark.timeout(30)
def test_close_is_prompt_while_the_token_endpoint_hangs(pki, closing) -> None:
    import socket

    hung = socket.create_server(("127.0.0.1", 0))  # accepts, never answers
    closing.append(type("Closer", (), {"stop": lambda self: hung.close()})())
    server = DevServer(keepalive_interval=0.2).start()
    closing.append(server)
    text = _string(server, False, pki, f"&authPort={hung.getsockname()[1]}")
    conn = cc.Connection(text.format(userinfo=f"shop:{SECRET}@"), attempt_timeout=5.0)
    hung.settimeout(5)
    accepted, _ = hung.accept()  # the attempt is waiting for the token now
    closing.append(type("Closer", (), {"stop": lambda self: accepted.close()})())
    started = time.monotonic()
    conn.close()
    assert time.monotonic() - started < 1.0


# ---------------------------------------------------------------------------- the dev kernel


@pytest.mark.timeout(30)
def test_client_credentials_against_a_server_without_a_token_endpoint_say_so(closing) -> None:
    server = DevServer(keepalive_interval=0.2).start()  # no auth: gRPC only on its port
    closing.append(server)
    conn = cc.Connection(f"chronicle://shop:{SECRET}@{server.address}?disableTls=true")
    closing.append(conn)
    started = time.monotonic()
    with pytest.raises(cc.AuthenticationError) as caught:
        conn.connect(timeout=10)
    assert time.monotonic() - started < 2.0
    assert "no OAuth token endpoint" in str(caught.value)
    assert "authPort" in str(caught.value)
    assert "\\x00" not in str(caught.value)  # none of the HTTP/2 bytes it got


@pytest.mark.timeout(60)
def test_development_credentials_reach_the_dev_kernel_over_its_self_signed_tls(closing) -> None:
    """``ConnectionString.development()`` against ``DevServer(auth=True, tls=True)``:
    the token from the kernel's own port, over TLS it does not validate."""
    server = DevServer(keepalive_interval=0.2, auth=True, tls=True).start()
    closing.append(server)
    import dataclasses

    dev = cc.ConnectionString.development()
    here = dataclasses.replace(dev, hosts=(cc.Endpoint("127.0.0.1", server.port),))
    conn = cc.Connection(here)
    closing.append(conn)
    conn.connect(timeout=15)
    for _ in range(10):
        version(conn.channel())
    with server._cond:
        kinds = [kind for method, kind in server.authorized_calls if method != CONNECT]
        issued = [outcome for _, outcome, _ in server.token_requests]
    assert "refused" not in kinds
    assert kinds.count("bearer") >= 10
    assert issued == ["issued"]


@pytest.mark.timeout(60)
def test_the_token_comes_from_the_next_host_when_the_first_is_down(closing) -> None:
    first = DevServer(keepalive_interval=0.2, auth={"shop": SECRET}).start()
    second = DevServer(keepalive_interval=0.2, auth={"shop": SECRET}).start()
    closing += [first, second]
    text = (
        f"chronicle://shop:{SECRET}@127.0.0.1:{first.port},127.0.0.1:{second.port}?disableTls=true"
    )
    conn = cc.Connection(
        text, retry_attempts=None, reconnect_base_delay=0.1, reconnect_max_delay=0.5
    )
    closing.append(conn)
    conn.connect(timeout=15)
    assert first.wait_for(lambda: len(first.token_requests) == 1, 5)
    first.stop()  # lost: the next attempt's token must come from the second
    wait_for_generation(conn, 2)
    version(conn.channel())
    assert second.wait_for(lambda: len(second.token_requests) >= 1, 10)


@pytest.mark.timeout(240)
def test_development_string_survives_30_sigkills_of_a_dev_kernel_with_auth_and_tls(
    kernel_factory,
) -> None:
    """``chronicle-conn dev-server --auth --tls`` in a child process, SIGKILLed and
    restarted on its port 30 times: each new kernel has a new self-signed certificate
    and knows none of the old tokens. The development string comes back every time
    (never FAILED), and each kernel issued it one token and refused at most the stale
    one."""
    import dataclasses

    kernel = kernel_factory(keepalive_interval=0.2, extra_args=["--auth", "--tls"])
    dev = cc.ConnectionString.development()
    here = dataclasses.replace(dev, hosts=(cc.Endpoint("127.0.0.1", kernel.port),))
    conn = cc.Connection(
        here, retry_attempts=None, reconnect_base_delay=0.05, reconnect_max_delay=0.3
    )
    changes: list[cc.StateChange] = []
    conn.add_listener(changes.append)
    with conn:
        conn.connect(timeout=15)
        for cycle in range(31):
            version(conn.channel())
            stats = kernel.command("auth-stats")
            assert stats["token_requests"] == {"issued": 1}, (cycle, stats)
            # At most one: the keep-alive stream that offered the token the previous
            # kernel issued, which makes the connection fetch a new one.
            assert stats["authorized_calls"].get("refused", 0) <= min(cycle, 1), (cycle, stats)
            if cycle == 30:
                break
            kernel.kill()
            with conn._core.cond:
                assert conn._core.cond.wait_for(lambda: conn._core.current is None, 10), cycle
            kernel.restart()
            conn.connect(timeout=15)
    assert not [c for c in changes if c.new is S.FAILED], [str(c) for c in changes]
