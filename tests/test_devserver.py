"""The embedded stand-in kernel (chronicle_conn.devserver) and its command line, driven
over real gRPC on 127.0.0.1."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent import futures
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
import trustme
from google.protobuf import empty_pb2
from grpc_health.v1 import health as official_health  # type: ignore[import-untyped]
from grpc_health.v1 import health_pb2 as official_health_pb2
from grpc_health.v1 import health_pb2_grpc as official_health_pb2_grpc

import chronicle_conn as cc
from chronicle_conn import _health, cli
from chronicle_conn._proto import clients_pb2_grpc, host_pb2_grpc
from chronicle_conn.devserver import CLIENTS_PROTO, DevServer, DevServerBindError, ServerTls
from tests.helpers import StreamReader, connect_request

REPO = Path(__file__).resolve().parents[1]
LOCAL_POOL = [("grpc.use_local_subchannel_pool", 1)]
INTERVAL = 0.2
CONNECT = "/Cratis.Chronicle.Contracts.Clients.ConnectionService/Connect"


# -- fixtures and helpers ------------------------------------------------------------------


@pytest.fixture
def server() -> Iterator[DevServer]:
    with DevServer(keepalive_interval=INTERVAL) as srv:
        yield srv


@pytest.fixture
def channel(server: DevServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address, options=LOCAL_POOL) as ch:
        yield ch


# -- keep-alives ---------------------------------------------------------------------------


@pytest.mark.timing
def test_first_keepalive_comes_at_once_with_the_connection_id(open_stream) -> None:
    # A long interval: the first keep-alive must not wait for it.
    with (
        DevServer(keepalive_interval=30.0) as srv,
        grpc.insecure_channel(srv.address, options=LOCAL_POOL) as ch,
    ):
        request = connect_request()
        started = time.monotonic()
        stream = open_stream(clients_pb2_grpc.ConnectionServiceStub(ch).Connect(request))
        keepalive, arrived = stream.next(timeout=10)
        assert keepalive.ConnectionId == request.ConnectionId
        assert arrived - started < 5.0
        assert srv.wait_for(lambda: srv.keepalives_sent == 1, timeout=5)


@pytest.mark.timing
def test_keepalives_arrive_at_the_configured_interval(server, channel, open_stream) -> None:
    stream = open_stream(clients_pb2_grpc.ConnectionServiceStub(channel).Connect(connect_request()))
    arrivals = [stream.next()[1] for _ in range(6)]
    gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
    assert all(INTERVAL * 0.5 < gap < INTERVAL * 3 for gap in gaps), gaps
    assert INTERVAL * 0.75 < sum(gaps) / len(gaps) < INTERVAL * 1.75, gaps


def test_answers_are_recorded_with_their_connection_id(server, channel, open_stream) -> None:
    stub = clients_pb2_grpc.ConnectionServiceStub(channel)
    request = connect_request()
    started = time.monotonic()
    stream = open_stream(stub.Connect(request))
    windows = []  # (keep-alive arrived, answer returned): each answer is recorded between
    for _ in range(3):
        keepalive, arrived = stream.next()
        assert stub.ConnectionKeepAlive(keepalive, timeout=5) == empty_pb2.Empty()
        windows.append((arrived, time.monotonic()))
    assert server.wait_for(lambda: len(server.keepalive_answers) == 3, timeout=5)
    answers = server.keepalive_answers
    assert [connection_id for connection_id, _ in answers] == [request.ConnectionId] * 3
    times = [at for _, at in answers]
    assert started <= times[0]
    for at, (arrived, returned) in zip(times, windows, strict=True):
        assert arrived <= at <= returned, (at, arrived, returned)


def test_paused_keepalives_go_quiet_and_resume(server, channel, open_stream) -> None:
    stream = open_stream(clients_pb2_grpc.ConnectionServiceStub(channel).Connect(connect_request()))
    stream.next()
    read = 1
    server.pause_keepalives()
    assert server.keepalives_paused
    sent = server.keepalives_sent
    # At most one keep-alive may already be on its way when the pause lands.
    assert not server.wait_for(lambda: server.keepalives_sent > sent + 1, timeout=6 * INTERVAL)
    sent = server.keepalives_sent
    assert not server.wait_for(lambda: server.keepalives_sent > sent, timeout=5 * INTERVAL)
    # However many were sent before the pause landed, the client gets exactly those and
    # then nothing: a message (or the stream's end) beyond them would be left in the queue.
    for _ in range(sent - read):
        stream.next()
    assert stream.items.empty(), stream.items.queue
    assert server.keepalives_sent == sent
    assert server.connection_ids, "the stream must stay open while paused"

    server.resume_keepalives()
    stream.next(timeout=5 * INTERVAL + 2)
    assert server.wait_for(lambda: server.keepalives_sent > sent, timeout=5)


def test_client_cancel_ends_the_stream_on_the_server(server, channel) -> None:
    request = connect_request()
    call = clients_pb2_grpc.ConnectionServiceStub(channel).Connect(request)
    next(call)
    assert server.connection_ids == [request.ConnectionId]
    call.cancel()
    assert server.wait_for(lambda: not server.connection_ids, timeout=5)


# -- what clients did ----------------------------------------------------------------------


def test_connect_requests_are_recorded_with_their_fields(server, channel, open_stream) -> None:
    request = connect_request(
        ClientVersion="1.2.3",
        IsRunningWithDebugger=True,
        ProcessId=4242,
        ProcessPath="/usr/bin/python3",
        MachineName="build-7",
        ClientType="Python",
    )
    stream = open_stream(clients_pb2_grpc.ConnectionServiceStub(channel).Connect(request))
    stream.next()
    assert server.connect_requests == [request]
    assert server.connection_ids == [request.ConnectionId]
    server.connect_requests[0].ClientType = "changed"  # a copy
    assert server.connect_requests[0].ClientType == "Python"

    clients = clients_pb2_grpc.ConnectionServiceStub(channel).GetConnectedClients(
        empty_pb2.Empty(), timeout=5
    )
    (client,) = clients.items
    assert client.ConnectionId == request.ConnectionId
    assert client.Version == "1.2.3"
    assert client.IsRunningWithDebugger
    assert (client.ProcessId, client.ProcessPath) == (4242, "/usr/bin/python3")
    assert (client.MachineName, client.ClientType) == ("build-7", "Python")
    assert client.SiloAddress
    assert datetime.fromisoformat(client.LastSeen.Value).utcoffset() is not None


def test_observe_connected_clients_follows_connects_and_disconnects(
    server, channel, open_stream
) -> None:
    stub = clients_pb2_grpc.ConnectionServiceStub(channel)
    observer = open_stream(stub.ObserveConnectedClients(empty_pb2.Empty()))
    assert list(observer.next()[0].items) == []
    request = connect_request()
    connect = stub.Connect(request)
    next(connect)
    assert [c.ConnectionId for c in observer.next()[0].items] == [request.ConnectionId]
    connect.cancel()
    assert list(observer.next()[0].items) == []


def test_get_version_info(channel) -> None:
    info = host_pb2_grpc.ServerStub(channel).GetVersionInfo(empty_pb2.Empty(), timeout=5)
    assert info.Version == "0.0.0-dev"
    assert info.CommitSha


def test_get_version_info_reports_the_configured_version() -> None:
    with (
        DevServer(version="16.37.1") as srv,
        grpc.insecure_channel(srv.address, options=LOCAL_POOL) as ch,
    ):
        info = host_pb2_grpc.ServerStub(ch).GetVersionInfo(empty_pb2.Empty(), timeout=5)
    assert info.Version == "16.37.1"


def test_get_descriptor_set_returns_the_clients_proto(channel) -> None:
    response = clients_pb2_grpc.ConnectionServiceStub(channel).GetDescriptorSet(
        empty_pb2.Empty(), timeout=5
    )
    assert response.SchemaDefinition == CLIENTS_PROTO
    assert "service ConnectionService" in response.SchemaDefinition
    assert "package Cratis.Chronicle.Contracts.Clients;" in response.SchemaDefinition


def test_wait_for_returns_false_at_its_timeout(server) -> None:
    started = time.monotonic()
    assert not server.wait_for(lambda: server.keepalives_sent > 0, timeout=0.2)
    assert time.monotonic() - started >= 0.2


# -- health --------------------------------------------------------------------------------


def test_set_serving_is_seen_by_check_and_pushed_on_watch(server, channel, open_stream) -> None:
    assert _health.check(channel, timeout=5) == _health.SERVING
    watch = open_stream(_health.watch_callable(channel)(_health.HealthCheckRequest()))
    assert watch.next()[0].status == _health.SERVING

    server.set_serving(False)
    assert watch.next()[0].status == _health.NOT_SERVING
    assert _health.check(channel, timeout=5) == _health.NOT_SERVING
    assert (
        _health.check(channel, "Cratis.Chronicle.Contracts.Clients.ConnectionService", timeout=5)
        == _health.NOT_SERVING
    )
    server.set_serving(True)
    assert watch.next()[0].status == _health.SERVING
    assert _health.check(channel, timeout=5) == _health.SERVING


def test_health_of_an_unknown_service(channel, open_stream) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        _health.check(channel, "no.such.Service", timeout=5)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    request = _health.HealthCheckRequest(service="no.such.Service")
    watch = open_stream(_health.watch_callable(channel)(request))
    assert watch.next()[0].status == _health.SERVICE_UNKNOWN


def test_official_health_stub_against_the_devserver(server, channel, open_stream) -> None:
    stub = official_health_pb2_grpc.HealthStub(channel)
    request = official_health_pb2.HealthCheckRequest(service="")
    serving = official_health_pb2.HealthCheckResponse.SERVING
    not_serving = official_health_pb2.HealthCheckResponse.NOT_SERVING
    assert stub.Check(request, timeout=5).status == serving
    watch = open_stream(stub.Watch(request))
    assert watch.next()[0].status == serving
    server.set_serving(False)
    assert watch.next()[0].status == not_serving
    assert stub.Check(request, timeout=5).status == not_serving


def test_our_health_helpers_against_the_official_servicer(open_stream) -> None:
    servicer = official_health.HealthServicer()
    servicer.set("", official_health_pb2.HealthCheckResponse.SERVING)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    official_health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=LOCAL_POOL) as ch:
            assert _health.check(ch, timeout=5) == _health.SERVING
            with pytest.raises(grpc.RpcError) as caught:
                _health.check(ch, "unknown", timeout=5)
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
            watch = open_stream(_health.watch_callable(ch)(_health.HealthCheckRequest()))
            assert watch.next()[0].status == _health.SERVING
            servicer.set("", official_health_pb2.HealthCheckResponse.NOT_SERVING)
            assert watch.next()[0].status == _health.NOT_SERVING
            assert _health.check(ch, timeout=5) == _health.NOT_SERVING
            watch.close()
    finally:
        server.stop(None).wait()


def test_health_servicer_pushes_every_change_in_order() -> None:
    servicer = _health.HealthServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((servicer.generic_handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=LOCAL_POOL) as ch:
            reader = StreamReader(_health.watch_callable(ch)(_health.HealthCheckRequest()))
            assert reader.next()[0].status == _health.SERVING
            # Quick flips are all delivered, not collapsed to the latest value.
            for status in (_health.NOT_SERVING, _health.SERVING, _health.NOT_SERVING):
                servicer.set("", status)
            statuses = [reader.next()[0].status for _ in range(3)]
            assert statuses == [_health.NOT_SERVING, _health.SERVING, _health.NOT_SERVING]
            servicer.close()
            error = reader.end()
            assert error is not None
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            reader.close()
    finally:
        server.stop(None).wait()


# -- lifecycle -----------------------------------------------------------------------------


@pytest.mark.timing
def test_stop_ends_open_streams_promptly(open_stream) -> None:
    srv = DevServer(keepalive_interval=30.0).start()
    try:
        with grpc.insecure_channel(srv.address, options=LOCAL_POOL) as ch:
            stub = clients_pb2_grpc.ConnectionServiceStub(ch)
            connect = open_stream(stub.Connect(connect_request()))
            connect.next()
            watch = open_stream(_health.watch_callable(ch)(_health.HealthCheckRequest()))
            watch.next()
            observe = open_stream(stub.ObserveConnectedClients(empty_pb2.Empty()))
            observe.next()
            started = time.monotonic()
            srv.stop(grace=5.0)
            stopped_in = time.monotonic() - started
            for reader in (connect, watch, observe):
                error = reader.end(timeout=5)
                assert error is not None
                assert error.code() == grpc.StatusCode.UNAVAILABLE
            assert stopped_in < 2.0, f"stop() took {stopped_in:.2f}s"
    finally:
        srv.stop()
    srv.stop()  # idempotent


def test_port_property_before_start_and_start_twice() -> None:
    srv = DevServer()
    with pytest.raises(RuntimeError, match="not started"):
        srv.port  # noqa: B018
    srv.start()
    try:
        assert srv.port > 0
        assert srv.address == f"127.0.0.1:{srv.port}"
        with pytest.raises(RuntimeError):
            srv.start()
    finally:
        srv.stop()


def test_a_taken_port_raises_a_clear_error(server) -> None:
    with pytest.raises(DevServerBindError, match="already in use") as caught:
        DevServer(port=server.port).start()
    assert caught.value.address == server.address


def test_the_same_port_can_be_reused_after_stop() -> None:
    first = DevServer().start()
    port = first.port
    first.stop()
    with DevServer(port=port) as second:
        assert second.port == port


@pytest.mark.parametrize(
    "kwargs",
    [{"port": -1}, {"port": 70000}, {"keepalive_interval": 0}, {"max_workers": 0}],
)
def test_invalid_options(kwargs) -> None:
    with pytest.raises(ValueError):
        DevServer(**kwargs)


# -- security seams ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def test_tls(ca, open_stream) -> None:
    cert = ca.issue_cert("127.0.0.1", "localhost")
    tls = ServerTls(
        certificate_chain=cert.cert_chain_pems[0].bytes(),
        private_key=cert.private_key_pem.bytes(),
    )
    with DevServer(tls=tls, keepalive_interval=INTERVAL) as srv:
        credentials = grpc.ssl_channel_credentials(root_certificates=ca.cert_pem.bytes())
        with grpc.secure_channel(srv.address, credentials, options=LOCAL_POOL) as ch:
            stream = open_stream(
                clients_pb2_grpc.ConnectionServiceStub(ch).Connect(connect_request())
            )
            stream.next()
            assert _health.check(ch, timeout=5) == _health.SERVING
        with grpc.insecure_channel(srv.address, options=LOCAL_POOL) as plain:
            with pytest.raises(grpc.RpcError) as caught:
                _health.check(plain, timeout=3)
            assert caught.value.code() in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.DEADLINE_EXCEEDED,
            )


def test_mutual_tls_requires_a_client_certificate(ca) -> None:
    server_cert = ca.issue_cert("127.0.0.1")
    client_cert = ca.issue_cert("client@example.com")
    tls = ServerTls(
        certificate_chain=server_cert.cert_chain_pems[0].bytes(),
        private_key=server_cert.private_key_pem.bytes(),
        client_ca=ca.cert_pem.bytes(),
    )
    root = ca.cert_pem.bytes()
    with DevServer(tls=tls) as srv:
        with_cert = grpc.ssl_channel_credentials(
            root, client_cert.private_key_pem.bytes(), client_cert.cert_chain_pems[0].bytes()
        )
        with grpc.secure_channel(srv.address, with_cert, options=LOCAL_POOL) as ch:
            assert _health.check(ch, timeout=5) == _health.SERVING
        without = grpc.ssl_channel_credentials(root)
        with grpc.secure_channel(srv.address, without, options=LOCAL_POOL) as ch:
            with pytest.raises(grpc.RpcError) as caught:
                _health.check(ch, timeout=3)
            assert caught.value.code() in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.DEADLINE_EXCEEDED,
            )


def test_server_tls_validates_and_reads_files(ca, tmp_path) -> None:
    with pytest.raises(ValueError, match="certificate_chain"):
        ServerTls(certificate_chain=b"", private_key=b"key")
    with pytest.raises(ValueError, match="client_ca"):
        ServerTls(certificate_chain=b"cert", private_key=b"key", client_ca=b"  ")
    cert = ca.issue_cert("127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    tls = ServerTls.from_files(tmp_path / "cert.pem", tmp_path / "key.pem")
    assert tls.certificate_chain == cert.cert_chain_pems[0].bytes()
    assert tls.client_ca is None


def test_authenticator_rejects_with_unauthenticated(open_stream) -> None:
    seen: list[tuple[str, str | None]] = []

    def authenticator(method: str, metadata: Mapping[str, str]) -> bool:
        seen.append((method, metadata.get("authorization")))
        return metadata.get("authorization") == "Bearer good"

    with (
        DevServer(authenticator=authenticator, keepalive_interval=INTERVAL) as srv,
        grpc.insecure_channel(srv.address, options=LOCAL_POOL) as ch,
    ):
        stub = clients_pb2_grpc.ConnectionServiceStub(ch)
        host = host_pb2_grpc.ServerStub(ch)
        for bad in ((), (("authorization", "Bearer bad"),)):
            with pytest.raises(grpc.RpcError) as caught:
                host.GetVersionInfo(empty_pb2.Empty(), metadata=bad, timeout=5)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            error = open_stream(stub.Connect(connect_request(), metadata=bad)).end()
            assert error is not None
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert not srv.connect_requests

        good = (("authorization", "Bearer good"),)
        assert host.GetVersionInfo(empty_pb2.Empty(), metadata=good, timeout=5).Version
        stream = open_stream(stub.Connect(connect_request(), metadata=good))
        stream.next()
        # Anonymous, as on the kernel: the descriptor set and health.
        assert stub.GetDescriptorSet(empty_pb2.Empty(), timeout=5).SchemaDefinition
        assert _health.check(ch, timeout=5) == _health.SERVING
    assert (CONNECT, "Bearer good") in seen
    assert not any("GetDescriptorSet" in method or "Health" in method for method, _ in seen)


# -- the command line ----------------------------------------------------------------------


class CliProcess:
    """``python -m chronicle_conn ...`` with stdout read line by line on a thread."""

    def __init__(self, *args: str) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "chronicle_conn", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env=env,
        )
        assert self.proc.stdin
        assert self.proc.stdout
        assert self.proc.stderr
        self.stdin, self.stdout, self.stderr_pipe = (
            self.proc.stdin,
            self.proc.stdout,
            self.proc.stderr,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def line(self, timeout: float = 15.0) -> str | None:
        return self.lines.get(timeout=timeout)

    def command(self, command: str) -> dict[str, Any]:
        self.stdin.write(command + "\n")
        self.stdin.flush()
        line = self.line(timeout=5)
        assert line is not None, self.stderr()
        answer: dict[str, Any] = json.loads(line)
        return answer

    def listening_address(self) -> str:
        line = self.line()
        prefix = "chronicle-conn dev-server listening on "
        assert line is not None
        assert line.startswith(prefix), (line, self.stderr())
        return line[len(prefix) :]

    def stderr(self) -> str:
        """Its stderr, once it has exited (waits up to 5 s for that)."""
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return "(still running)"
        return self.stderr_pipe.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        for stream in (self.stdin, self.stdout, self.stderr_pipe):
            stream.close()


@pytest.fixture
def cli_process() -> Iterator[Callable[..., CliProcess]]:
    made: list[CliProcess] = []

    def make(*args: str) -> CliProcess:
        process = CliProcess(*args)
        made.append(process)
        return process

    yield make
    for process in made:
        process.close()


@pytest.mark.timing
def test_cli_dev_server_answers_control_commands_and_exits_0_on_sigterm(
    cli_process, open_stream
) -> None:
    kernel = cli_process(
        "dev-server", "--port", "0", "--control-stdin", "--keepalive-interval", "0.2"
    )
    address = kernel.listening_address()
    assert address.startswith("127.0.0.1:")
    with grpc.insecure_channel(address, options=LOCAL_POOL) as ch:
        stub = clients_pb2_grpc.ConnectionServiceStub(ch)
        request = connect_request(ClientType="Python")
        stream = open_stream(stub.Connect(request))
        stub.ConnectionKeepAlive(stream.next()[0], timeout=5)

        stats = kernel.command("stats")
        assert stats["ok"] is True
        assert stats["connect_requests"] == 1
        assert stats["keepalive_answers"] == 1
        assert stats["keepalives_sent"] >= 1
        assert stats["connection_ids"] == [request.ConnectionId]
        assert set(stats) == {
            "ok",
            "connect_requests",
            "keepalive_answers",
            "keepalives_sent",
            "connection_ids",
        }

        assert kernel.command("not-serving") == {"ok": True}
        assert _health.check(ch, timeout=5) == _health.NOT_SERVING
        assert kernel.command("serving") == {"ok": True}
        assert _health.check(ch, timeout=5) == _health.SERVING
        assert kernel.command("pause-keepalives") == {"ok": True}
        assert kernel.command("resume-keepalives") == {"ok": True}
        answer = kernel.command("reboot")
        assert answer["ok"] is False
        assert "reboot" in answer["error"]

    started = time.monotonic()
    kernel.proc.send_signal(signal.SIGTERM)
    assert kernel.proc.wait(timeout=10) == 0, kernel.stderr()
    assert time.monotonic() - started < 5
    assert kernel.line() is None  # nothing else on stdout


def test_cli_dev_server_stop_command_and_eof(cli_process) -> None:
    kernel = cli_process("dev-server", "--port", "0", "--control-stdin")
    kernel.listening_address()
    assert kernel.command("stop") == {"ok": True}
    assert kernel.proc.wait(timeout=10) == 0, kernel.stderr()
    assert kernel.line() is None

    # End of input: the controller is gone, so the server stops too (no orphans).
    kernel = cli_process("dev-server", "--port", "0", "--control-stdin")
    address = kernel.listening_address()
    with grpc.insecure_channel(address, options=LOCAL_POOL) as ch:
        assert _health.check(ch, timeout=5, wait_for_ready=True) == _health.SERVING
    kernel.stdin.close()
    assert kernel.proc.wait(timeout=10) == 0, kernel.stderr()
    assert kernel.line() is None

    # Without --control-stdin, stdin is not read at all: only a signal stops it.
    kernel = cli_process("dev-server", "--port", "0")
    address = kernel.listening_address()
    kernel.stdin.close()
    with grpc.insecure_channel(address, options=LOCAL_POOL) as ch:
        assert _health.check(ch, timeout=5, wait_for_ready=True) == _health.SERVING
    assert kernel.proc.poll() is None
    kernel.proc.send_signal(signal.SIGINT)
    assert kernel.proc.wait(timeout=10) == 0, kernel.stderr()


def test_cli_dev_server_restarts_on_the_same_port_after_sigkill(cli_process) -> None:
    first = cli_process(
        "dev-server", "--port", "0", "--control-stdin", "--keepalive-interval", "0.2"
    )
    address = first.listening_address()
    port = address.rsplit(":", 1)[1]
    with grpc.insecure_channel(address, options=LOCAL_POOL) as ch:
        # A client with an open Connect stream, as in the harness's outage tests.
        stub = clients_pb2_grpc.ConnectionServiceStub(ch)
        call = stub.Connect(connect_request())
        next(call)
        first.proc.kill()
        first.proc.wait(timeout=10)
        with pytest.raises(grpc.RpcError):
            next(call)

        second = cli_process("dev-server", "--port", port, "--control-stdin")
        assert second.listening_address() == address
        keepalive = next(stub.Connect(connect_request(), timeout=10))
        assert keepalive.ConnectionId

    # A port that is taken: exit 1, and stderr says why.
    third = cli_process("dev-server", "--port", port)
    assert third.proc.wait(timeout=15) == 1
    assert "already in use" in third.stderr()
    assert third.line() is None


def test_cli_dev_server_tls(cli_process, ca, tmp_path) -> None:
    cert = ca.issue_cert("127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    kernel = cli_process(
        "dev-server",
        "--port",
        "0",
        "--tls-cert",
        str(tmp_path / "cert.pem"),
        "--tls-key",
        str(tmp_path / "key.pem"),
    )
    address = kernel.listening_address()
    credentials = grpc.ssl_channel_credentials(ca.cert_pem.bytes())
    with grpc.secure_channel(address, credentials, options=LOCAL_POOL) as ch:
        assert _health.check(ch, timeout=5) == _health.SERVING
    kernel.proc.send_signal(signal.SIGTERM)
    assert kernel.proc.wait(timeout=10) == 0


@pytest.mark.timing
def test_cli_selfcheck_exits_0(cli_process) -> None:
    started = time.monotonic()
    check = cli_process("selfcheck")
    assert check.proc.wait(timeout=30) == 0, check.stderr()
    lines = []
    while (line := check.line()) is not None:
        lines.append(line)
    assert lines[-1] == "ok", lines
    assert any("keep-alives" in line for line in lines), lines
    assert time.monotonic() - started < 15


def test_cli_main_in_process(capsys) -> None:
    assert cli.main(["selfcheck", "--keepalives", "2"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == "ok"
    with pytest.raises(SystemExit) as caught:
        cli.main(["dev-server", "--tls-cert", "cert.pem"])
    assert caught.value.code == 2
    assert "--tls-key" in capsys.readouterr().err
    with pytest.raises(SystemExit) as caught:
        cli.main([])
    assert caught.value.code == 2


def test_cli_dev_server_max_workers_bounds_the_open_streams(cli_process, open_stream) -> None:
    """Every Connect stream holds a server thread: --max-workers sets how many clients
    the kernel serves at once (default 1024; more wait for a thread)."""
    kernel = cli_process("dev-server", "--port", "0", "--max-workers", "6")
    address = kernel.listening_address()
    with grpc.insecure_channel(address, options=LOCAL_POOL) as ch:
        stub = clients_pb2_grpc.ConnectionServiceStub(ch)
        streams = [open_stream(stub.Connect(connect_request())) for _ in range(8)]
        served = 0
        for stream in streams:
            with contextlib.suppress(queue.Empty):
                stream.next(timeout=2)
                served += 1
        assert served == 6  # the other two wait for a thread
    bad = cli_process("dev-server", "--port", "0", "--max-workers", "0")
    assert bad.proc.wait(timeout=10) == 2
    assert "max_workers" in bad.stderr()


@pytest.mark.timeout(120)
def test_five_hundred_clients_are_served_at_once() -> None:
    """500 open Connect streams, each holding a server thread, all get their first
    keep-alive (the default pool grows to 1024; it was 64)."""
    with DevServer(keepalive_interval=5.0) as srv:
        channels = [grpc.insecure_channel(srv.address, options=LOCAL_POOL) for _ in range(5)]
        calls = []
        try:
            for index in range(500):
                stub = clients_pb2_grpc.ConnectionServiceStub(channels[index % 5])
                call = stub.Connect(connect_request(), timeout=60)
                calls.append(call)
                next(call)  # its first keep-alive, sent at once by its server thread
            assert srv.wait_for(lambda: len(srv.connection_ids) == 500, 10)
        finally:
            for call in calls:
                call.cancel()
            for channel in channels:
                channel.close()


@pytest.mark.timeout(120)
def test_a_hundred_connections_to_one_dev_kernel_all_connect() -> None:
    with DevServer(keepalive_interval=1.0) as srv:
        conns = [
            cc.Connection(f"chronicle://{srv.address}?disableTls=true", retry_attempts=None)
            for _ in range(100)
        ]
        try:
            for conn in conns:
                conn.connect(timeout=30)
            assert srv.wait_for(lambda: len(srv.connection_ids) == 100, 10)
        finally:
            for conn in conns:
                conn.close()
