"""Tests of the test harness itself: the proxy's faults seen at the socket level and by a
gRPC channel, the kernel process's life cycle and control commands, and the recorder."""

from __future__ import annotations

import contextlib
import signal
import socket
import sys
import threading
import uuid
from collections.abc import Callable, Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc  # type: ignore[import-untyped]

from tests.harness import (
    EventRecorder,
    FaultProxy,
    KernelCommandError,
    KernelProcess,
    KernelStartError,
    ProxyMode,
    free_port,
    wait_listening,
)

LOCAL_POOL = [("grpc.use_local_subchannel_pool", 1)]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
CONNECT = "/Cratis.Chronicle.Contracts.Clients.ConnectionService/Connect"


# -- helpers -------------------------------------------------------------------------------


class EchoServer:
    """A threaded echo server on 127.0.0.1 that records what it got and how each of its
    connections ended (``"eof"`` or ``"reset"``)."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self.received = EventRecorder("echo received")  # each chunk, as bytes
        self.endings = EventRecorder("echo endings")
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._spawn(self._accept_loop, "echo-accept")

    def _spawn(self, target: Callable[..., None], name: str, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self._conns.append(conn)
            self._spawn(self._echo, "echo-conn", conn)

    def _echo(self, conn: socket.socket) -> None:
        try:
            while data := conn.recv(65536):
                self.received(data)
                conn.sendall(data)
        except OSError:
            self.endings("reset")
        else:
            self.endings("eof")
        finally:
            conn.close()

    def received_bytes(self) -> bytes:
        return b"".join(self.received.events)

    def close(self) -> None:
        # shutdown() wakes threads blocked in accept()/recv(); close() alone does not
        for sock in [self._listener, *self._conns]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout=5)
            assert not thread.is_alive(), f"{thread.name} did not stop"


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.close()


@pytest.fixture
def connect() -> Iterator[Callable[[int], socket.socket]]:
    """``connect(port)``: a client socket to 127.0.0.1 with a 5 s timeout, closed after."""
    made: list[socket.socket] = []

    def _connect(port: int) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        made.append(sock)
        return sock

    yield _connect
    for sock in made:
        sock.close()


def roundtrip(sock: socket.socket, payload: bytes) -> bytes:
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


def health_status(address: str, timeout: float = 5.0) -> int:
    with grpc.insecure_channel(address, options=LOCAL_POOL) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        return int(response.status)


def encode_connect_request(connection_id: str) -> bytes:
    """A ``ConnectRequest`` by hand (fields 1 ConnectionId, 7 ClientType), so this test does
    not depend on the generated modules' names."""

    def field(number: int, value: str) -> bytes:
        data = value.encode()
        assert len(data) < 128
        return bytes([number << 3 | 2, len(data)]) + data

    return field(1, connection_id) + field(7, "Python")


@contextlib.contextmanager
def port_freed_after_a_bind_failure(
    kernel: KernelProcess, squatter: socket.socket
) -> Iterator[threading.Event]:
    """Close ``squatter`` (from a watcher thread) as soon as ``kernel`` records its next
    failed bind, so a ``restart()`` inside the block must retry. The event it yields is
    set if that failure was seen (the port is freed after 15 s regardless)."""
    seen = threading.Event()
    target = kernel.bind_failures + 1

    def watch() -> None:
        try:
            if kernel.wait_for_bind_failures(target, timeout=15):
                seen.set()
        finally:
            squatter.close()

    watcher = threading.Thread(target=watch, name="port-releaser", daemon=True)
    watcher.start()
    try:
        yield seen
    finally:
        watcher.join(timeout=20)
        assert not watcher.is_alive(), "the port releaser did not finish"


# -- ports ---------------------------------------------------------------------------------


def test_free_port_is_bindable_and_wait_listening_sees_a_listener() -> None:
    port = free_port()
    with socket.create_server(("127.0.0.1", port)):
        wait_listening("127.0.0.1", port, timeout=2)


def test_wait_listening_times_out_on_a_closed_port() -> None:
    with pytest.raises(TimeoutError, match="nothing listening"):
        wait_listening("127.0.0.1", free_port(), timeout=0.3)


@pytest.mark.parametrize("host", ["0.0.0.0", "localhost", "10.0.0.1", ""])
def test_only_loopback_addresses_are_accepted(host: str) -> None:
    with pytest.raises(ValueError, match="only uses"):
        free_port(host)
    with pytest.raises(ValueError, match="only uses"):
        FaultProxy(host, 1)
    with pytest.raises(ValueError, match="only uses"):
        FaultProxy("127.0.0.1", 1, listen_host=host)


# -- proxy, socket level -------------------------------------------------------------------


def test_pass_through_echoes_both_ways(echo, proxy_factory, connect) -> None:
    proxy = proxy_factory("127.0.0.1", echo.port)
    client = connect(proxy.port)
    assert roundtrip(client, b"hello") == b"hello"
    assert roundtrip(client, b"x" * 200_000) == b"x" * 200_000
    # the client can read the last bytes just before the proxy thread counts them
    assert proxy.wait_for(lambda s: s.bytes_up == s.bytes_down == 200_005, timeout=5)
    stats = proxy.stats()
    assert stats.mode is ProxyMode.PASS_THROUGH
    assert (stats.accepted, stats.active_connections) == (1, 1)
    assert proxy.address == f"127.0.0.1:{proxy.port}"


def test_pass_through_mirrors_a_half_close(echo, proxy_factory, connect) -> None:
    proxy = proxy_factory("127.0.0.1", echo.port)
    client = connect(proxy.port)
    client.sendall(b"last words")
    client.shutdown(socket.SHUT_WR)
    assert echo.endings.wait_for_event(lambda e: True, timeout=5) == "eof"
    got = b""
    while chunk := client.recv(100):
        got += chunk
    assert got == b"last words"  # then EOF: the server's FIN came through
    assert proxy.wait_for(lambda s: s.active_connections == 0, timeout=5)


def test_refuse_then_pass_through_listens_again_on_the_same_port(
    echo, proxy_factory, connect
) -> None:
    proxy = proxy_factory("127.0.0.1", echo.port)
    before = connect(proxy.port)
    port = proxy.port

    proxy.refuse()
    assert proxy.mode is ProxyMode.REFUSE
    with pytest.raises(ConnectionRefusedError):
        connect(port)
    assert roundtrip(before, b"still open") == b"still open"

    proxy.pass_through()
    assert proxy.port == port
    assert roundtrip(connect(port), b"again") == b"again"
    assert proxy.accepted == 2


def test_reset_resets_both_peers_and_keeps_accepting(echo, proxy_factory, connect) -> None:
    proxy = proxy_factory("127.0.0.1", echo.port)
    client = connect(proxy.port)
    assert roundtrip(client, b"ping") == b"ping"

    assert proxy.reset() == 1
    with pytest.raises(ConnectionResetError):
        client.recv(100)
    # the upstream peer is reset too, not closed: a FIN would show as "eof"
    assert echo.endings.wait_for_event(lambda e: True, timeout=5) == "reset"
    assert (proxy.resets, proxy.active_connections) == (1, 0)

    assert roundtrip(connect(proxy.port), b"fresh") == b"fresh"


def test_swallow_is_a_silent_partition(echo, proxy_factory, connect) -> None:
    proxy = proxy_factory("127.0.0.1", echo.port)
    client = connect(proxy.port)
    assert roundtrip(client, b"before") == b"before"

    proxy.swallow()
    client.sendall(b"into the void")  # accepted by the kernel: no RST
    client.settimeout(0.5)
    with pytest.raises(TimeoutError):  # no data and no EOF
        client.recv(100)
    late = connect(proxy.port)  # new connections are still accepted ...
    late.sendall(b"hello?")
    late.settimeout(0.5)
    with pytest.raises(TimeoutError):  # ... and swallowed too
        late.recv(100)

    assert echo.received_bytes() == b"before"  # the upstream got nothing
    assert echo.endings.events == []  # and no FIN or RST either
    stats = proxy.stats()
    assert stats.bytes_swallowed == len(b"into the void") + len(b"hello?")
    assert (stats.active_connections, stats.resets) == (2, 0)


def test_leaving_swallow_resets_connections_that_lost_bytes(echo, proxy_factory, connect) -> None:
    proxy = proxy_factory("127.0.0.1", echo.port)
    damaged = connect(proxy.port)
    intact = connect(proxy.port)
    assert roundtrip(damaged, b"a") == b"a"
    assert roundtrip(intact, b"b") == b"b"

    proxy.swallow()
    damaged.sendall(b"lost")
    assert proxy.wait_for(lambda s: s.bytes_swallowed == 4, timeout=5)
    proxy.pass_through()

    with pytest.raises(ConnectionResetError):
        damaged.recv(100)
    assert roundtrip(intact, b"resumed") == b"resumed"


def test_swallow_without_discard_holds_bytes_until_pass_through(
    echo, proxy_factory, connect
) -> None:
    proxy = proxy_factory("127.0.0.1", echo.port)
    client = connect(proxy.port)
    assert roundtrip(client, b"a") == b"a"

    proxy.swallow(discard=False)
    client.sendall(b"held")
    client.settimeout(0.5)
    with pytest.raises(TimeoutError):
        client.recv(100)
    assert echo.received_bytes() == b"a"

    proxy.pass_through()
    client.settimeout(5)
    assert client.recv(100) == b"held"


def test_a_refusing_upstream_resets_the_client(proxy_factory, connect) -> None:
    proxy = proxy_factory("127.0.0.1", free_port())  # nothing listens there
    with pytest.raises(ConnectionResetError):
        # the RST can beat connect()'s own check of the handshake, or come after it
        connect(proxy.port).recv(100)
    assert proxy.wait_for(lambda s: s.upstream_failures == 1 and s.resets == 1, timeout=5)


def test_close_stops_everything(echo, connect) -> None:
    with FaultProxy("127.0.0.1", echo.port) as proxy:
        client = connect(proxy.port)
        assert roundtrip(client, b"x") == b"x"
        threads = [t for t in threading.enumerate() if t.name.startswith("FaultProxy[")]
        assert len(threads) == 1
    threads[0].join(timeout=1)
    assert not threads[0].is_alive()
    assert client.recv(100) == b""  # closed with FIN
    with pytest.raises(ConnectionRefusedError):
        connect(proxy.port)
    with pytest.raises(RuntimeError, match="closed"):
        proxy.refuse()
    proxy.close()  # idempotent


# -- proxy, seen by a gRPC channel to the kernel -------------------------------------------


def test_health_check_through_the_proxy(kernel, proxy_factory) -> None:
    proxy = proxy_factory(kernel.host, kernel.port)
    assert health_status(proxy.address) == SERVING
    assert proxy.bytes_up > 0
    assert proxy.bytes_down > 0


def test_swallow_makes_rpcs_miss_their_deadline_while_the_channel_stays_ready(
    kernel, proxy_factory
) -> None:
    proxy = proxy_factory(kernel.host, kernel.port)
    states = EventRecorder("connectivity")
    with grpc.insecure_channel(proxy.address, options=LOCAL_POOL) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest()
        assert stub.Check(request, timeout=5).status == SERVING
        channel.subscribe(states)
        try:
            states.wait_for_event(lambda s: s is grpc.ChannelConnectivity.READY, timeout=5)
            mark = len(states)

            proxy.swallow()
            with pytest.raises(grpc.RpcError) as info:
                stub.Check(request, timeout=0.5)
            assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            # nothing told the channel: it still believes it is connected
            grpc.channel_ready_future(channel).result(timeout=1)
            assert states.events[mark:] == []
            assert proxy.bytes_swallowed > 0

            proxy.pass_through()  # the damaged connection is reset; the channel recovers
            states.wait_for_event(
                lambda s: s is not grpc.ChannelConnectivity.READY, timeout=5, since=mark
            )
            response = stub.Check(request, timeout=5, wait_for_ready=True)
            assert response.status == SERVING
        finally:
            channel.unsubscribe(states)


def test_a_kernel_crash_behind_the_proxy_reaches_the_channel(kernel, proxy_factory) -> None:
    proxy = proxy_factory(kernel.host, kernel.port)
    states = EventRecorder("connectivity")
    with grpc.insecure_channel(proxy.address, options=LOCAL_POOL) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest()
        assert stub.Check(request, timeout=5).status == SERVING
        channel.subscribe(states)
        try:
            states.wait_for_event(lambda s: s is grpc.ChannelConnectivity.READY, timeout=5)
            mark = len(states)
            kernel.kill()  # the proxy passes the kernel's FIN/RST on to the channel
            states.wait_for_event(
                lambda s: s is not grpc.ChannelConnectivity.READY, timeout=5, since=mark
            )
            kernel.restart()
            assert stub.Check(request, timeout=10, wait_for_ready=True).status == SERVING
        finally:
            channel.unsubscribe(states)


# -- the kernel process --------------------------------------------------------------------


def test_kernel_starts_and_answers_stats_and_health(kernel) -> None:
    assert kernel.running
    assert kernel.pid is not None
    assert kernel.address == f"127.0.0.1:{kernel.port}"
    stats = kernel.stats()
    assert stats["ok"] is True
    for key in ("connect_requests", "keepalive_answers", "keepalives_sent"):
        assert stats[key] == 0
    assert stats["connection_ids"] == []
    assert health_status(kernel.address) == SERVING


def test_kill_refuses_connections_and_restart_serves_on_the_same_port(kernel) -> None:
    port, old_pid = kernel.port, kernel.pid
    assert kernel.kill() == -signal.SIGKILL
    assert not kernel.running

    with grpc.insecure_channel(kernel.address, options=LOCAL_POOL) as channel:
        ready = grpc.channel_ready_future(channel)
        with pytest.raises(grpc.FutureTimeoutError):
            ready.result(timeout=0.5)
        ready.cancel()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    with pytest.raises(KernelCommandError):
        kernel.stats()

    kernel.restart()
    assert (kernel.port, kernel.running) == (port, True)
    assert kernel.pid != old_pid
    assert health_status(kernel.address) == SERVING
    assert kernel.stats()["ok"] is True


def test_restart_waits_for_a_port_that_is_briefly_taken(kernel) -> None:
    kernel.kill()
    with socket.create_server(("127.0.0.1", kernel.port)) as squatter:
        with pytest.raises(KernelStartError, match="address already in use"):
            kernel.restart(bind_retry=0.0)
        starts, stderr_seen = kernel.starts, len(kernel.stderr_text())
        with port_freed_after_a_bind_failure(kernel, squatter) as freed:
            kernel.restart(bind_retry=10.0)
    assert freed.is_set(), "restart() never met the busy port"
    assert kernel.starts - starts >= 2  # a child that could not bind, then one that did
    assert "address already in use" in kernel.stderr_text()[stderr_seen:]
    assert "address already in use" not in kernel.stderr_text(current_only=True)
    assert health_status(kernel.address) == SERVING


def test_not_serving_shows_in_health_check(kernel) -> None:
    kernel.set_serving(False)
    assert health_status(kernel.address) == NOT_SERVING
    kernel.set_serving(True)
    assert health_status(kernel.address) == SERVING


def test_sigterm_and_stop_exit_cleanly(kernel_factory) -> None:
    first, second = kernel_factory(), kernel_factory()
    assert first.terminate() == 0
    assert second.stop() == 0
    assert not first.running
    assert not second.running


@pytest.mark.timing
def test_keepalives_flow_and_pause_on_the_connect_stream(kernel_factory) -> None:
    kernel = kernel_factory(keepalive_interval=0.2)
    connection_id = str(uuid.uuid4())
    keepalives = EventRecorder("keep-alives")
    with grpc.insecure_channel(kernel.address, options=LOCAL_POOL) as channel:
        connect: grpc.UnaryStreamMultiCallable[bytes, bytes]
        connect = channel.unary_stream(CONNECT)  # raw bytes in and out
        call = connect(encode_connect_request(connection_id), timeout=30)

        def pump() -> None:
            try:
                for message in call:
                    keepalives(message)
            except grpc.RpcError as exc:
                keepalives(exc.code())

        reader = threading.Thread(target=pump, name="keepalive-reader", daemon=True)
        reader.start()
        try:
            assert keepalives.wait_for_count(2, timeout=5), keepalives.events
            assert connection_id.encode() in keepalives.events[0]
            stats = kernel.stats()
            assert stats["connect_requests"] == 1
            assert connection_id in stats["connection_ids"]

            kernel.pause_keepalives()
            mark = len(keepalives)  # one may already be on its way
            assert not keepalives.wait_for(lambda e: len(e) > mark + 1, timeout=1.0)
            kernel.resume_keepalives()
            keepalives.wait_for_event(lambda e: isinstance(e, bytes), timeout=5, since=mark + 2)
        finally:
            call.cancel()
            reader.join(timeout=5)
    assert not reader.is_alive()


def test_start_failure_reports_the_childs_stderr(kernel_factory) -> None:
    kernel = kernel_factory(extra_args=["--no-such-option"], start=False)
    with pytest.raises(KernelStartError, match="before listening") as info:
        kernel.start(timeout=15)
    assert "--no-such-option" in str(info.value)
    assert not kernel.running


# -- KernelProcess mechanics, against a stand-in child -------------------------------------

FAKE_KERNEL = r"""
import json, socket, sys
port = int(sys.argv[sys.argv.index("--port") + 1])
listener = socket.create_server(("127.0.0.1", port))
print("starting up (noise)")
print(f"chronicle-conn dev-server listening on 127.0.0.1:{port}")
for line in sys.stdin:
    cmd = line.strip()
    if cmd == "stats":
        print("log line in the way")
        print(json.dumps({"ok": True, "connect_requests": 0, "keepalive_answers": 0,
                          "keepalives_sent": 0, "connection_ids": []}))
    elif cmd == "stop":
        print(json.dumps({"ok": True}))
        break
    else:
        print(json.dumps({"ok": False, "error": f"unknown command {cmd}"}))
"""


class FakeKernel(KernelProcess):
    def __init__(self, script: str = FAKE_KERNEL, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.script = script

    def build_argv(self) -> list[str]:
        return [sys.executable, "-c", self.script, "--port", str(self.port)]


def test_kernel_process_commands_skip_noise_and_check_ok() -> None:
    with FakeKernel() as kernel:
        assert kernel.stats()["connection_ids"] == []
        assert kernel.stdout_noise == ["starting up (noise)", "log line in the way"]
        with pytest.raises(KernelCommandError, match="unknown command"):
            kernel.command("bogus")
        assert kernel.command("bogus", check=False)["ok"] is False
        with pytest.raises(ValueError):
            kernel.command("two\nlines")
        assert kernel.stop() == 0
        with pytest.raises(KernelCommandError):
            kernel.stats()
    assert not kernel.running


def test_kernel_process_restart_keeps_the_port_and_retries_a_busy_one() -> None:
    with FakeKernel() as kernel:
        port, pid = kernel.port, kernel.pid
        kernel.restart()
        assert (kernel.port, kernel.starts) == (port, 2)
        assert kernel.pid != pid
        wait_listening("127.0.0.1", port, timeout=5)

        kernel.kill()
        with socket.create_server(("127.0.0.1", port)) as squatter:
            with pytest.raises(KernelStartError, match="before listening"):
                kernel.restart(bind_retry=0.0)
            starts, stderr_seen = kernel.starts, len(kernel.stderr_text())
            # the port frees up while restart() retries, after its first failed bind
            with port_freed_after_a_bind_failure(kernel, squatter) as freed:
                kernel.restart(bind_retry=10.0)
        assert freed.is_set(), "restart() never met the busy port"
        assert kernel.starts - starts >= 2
        assert kernel.running
        assert kernel.port == port
        assert "Address already in use" in kernel.stderr_text()[stderr_seen:]
        assert "Address already in use" not in kernel.stderr_text(current_only=True)


def test_kernel_process_start_times_out_and_kills_a_silent_child() -> None:
    kernel = FakeKernel(script="import sys; sys.stdin.read()")
    try:
        with pytest.raises(KernelStartError, match=r"no listening line within 1\.0s"):
            kernel.start(timeout=1.0)
        assert not kernel.running
        assert kernel.returncode == -signal.SIGKILL
    finally:
        kernel.close()


# -- recorder ------------------------------------------------------------------------------


def test_recorder_wait_for_event_sees_events_from_other_threads() -> None:
    recorder = EventRecorder()

    def produce() -> None:
        for i in range(100):
            recorder(i)

    producer = threading.Thread(target=produce)
    producer.start()
    assert recorder.wait_for_event(lambda e: e >= 42, timeout=5) == 42
    assert recorder.wait_for_count(100, timeout=5)
    producer.join(timeout=5)
    assert recorder.events == list(range(100))
    assert recorder.wait_for_event(lambda e: e % 10 == 0, timeout=0, since=35) == 40


def test_recorder_timeouts_report_what_was_seen() -> None:
    recorder = EventRecorder("states")
    recorder({"state": "CONNECTING"})
    assert recorder.wait_for(lambda events: len(events) > 1, timeout=0.05) is False
    with pytest.raises(AssertionError, match="states: no matching event") as info:
        recorder.wait_for_event(lambda e: e["state"] == "CONNECTED", timeout=0.05)
    assert "CONNECTING" in str(info.value)
    events = recorder.events
    events.append("not recorded")
    assert len(recorder) == 1
    recorder.clear()
    assert recorder.events == []
