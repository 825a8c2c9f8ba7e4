"""Tests of the test harness itself: the proxy's faults seen at the socket level and by a
gRPC channel, the kernel process's life cycle and control commands, the recorder, and the
application servers (the work service, its execution log, graceful stops and restarts,
and the dev server's ``handlers``)."""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc  # type: ignore[import-untyped]

from chronicle_conn.devserver import DevServer
from tests.harness import (
    EventRecorder,
    ExecutionLog,
    FaultProxy,
    KernelCommandError,
    KernelProcess,
    KernelStartError,
    LogEntry,
    ProxyMode,
    ServerCommandError,
    ServerStartError,
    WorkStub,
    free_port,
    wait_listening,
    work_request,
    work_response,
)
from tests.harness.appserver import WorkService

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


# -- application servers: the work service -------------------------------------------------

FLAVORS = ["kernel", "grpc-health", "plain"]
REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def work_stub(address: str) -> Iterator[WorkStub]:
    with grpc.insecure_channel(address, options=LOCAL_POOL) as channel:
        yield WorkStub(channel)


class HeldRequests:
    """A client's request stream that the test feeds: ``send(message)``, ``close()``.

    Until closed, the call stays in flight for as long as the test wants, with no timing
    assumption."""

    def __init__(self, *first: bytes) -> None:
        self._queue: queue.Queue[bytes | None] = queue.Queue()
        for message in first:
            self._queue.put(message)

    def __iter__(self) -> Iterator[bytes]:
        while (message := self._queue.get(timeout=30)) is not None:
            yield message

    def send(self, message: bytes) -> None:
        self._queue.put(message)

    def close(self) -> None:
        self._queue.put(None)


def started(log: ExecutionLog, *ids: str, timeout: float = 10.0) -> bool:
    return log.wait_for(lambda snap: all(snap.starts(i) for i in ids), timeout)


@pytest.mark.parametrize("flavor", FLAVORS)
def test_every_call_kind_executes_once_and_is_logged(app_server_factory, flavor) -> None:
    server = app_server_factory(flavor)
    with work_stub(server.address) as stub:
        unary = work_response(stub.unary(work_request("u"), timeout=10))
        streamed = [
            work_response(m) for m in stub.server_stream(work_request("s", count=3), timeout=10)
        ]
        client = work_response(
            stub.client_stream(iter([work_request("c"), b"{}", b'{"sleep": 0}']), timeout=10)
        )
        bidi = [
            work_response(m)
            for m in stub.bidi(iter([work_request("b", count=2), b'{"count": 1}']), timeout=10)
        ]
    pid = server.pid
    assert unary == {"id": "u", "pid": pid, "method": "Unary", "seq": 0}
    assert [(m["id"], m["pid"], m["seq"]) for m in streamed] == [("s", pid, i) for i in range(3)]
    assert (client["id"], client["pid"], client["received"]) == ("c", pid, 3)
    assert [(m["id"], m["method"], m["seq"]) for m in bidi] == [("b", "Bidi", i) for i in range(3)]
    # The end line is written before the call's status goes out: no need to wait for it.
    snap = server.log.read()
    assert snap.executions() == {"u": 1, "s": 1, "c": 1, "b": 1}
    for execution_id in "uscb":
        assert snap.starts(execution_id) == [LogEntry("start", execution_id, pid)]
        assert snap.ends(execution_id) == [LogEntry("end", execution_id, pid, "ok")]
    assert snap.unfinished() == {}
    stats = server.stats()
    assert (stats["flavor"], stats["pid"], stats["started"], stats["ended"]) == (flavor, pid, 4, 4)


def test_requested_failures_are_logged_and_invalid_requests_are_not(app_server_factory) -> None:
    server = app_server_factory("plain")
    with work_stub(server.address) as stub:
        with pytest.raises(grpc.RpcError) as failed:
            stub.unary(work_request("f", code="UNAVAILABLE"), timeout=10)
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        stream = stub.server_stream(work_request("g", count=2, code="ABORTED"), timeout=10)
        assert [work_response(next(stream))["seq"] for _ in range(2)] == [0, 1]
        with pytest.raises(grpc.RpcError) as aborted:
            next(stream)
        assert aborted.value.code() == grpc.StatusCode.ABORTED
        for bad in (b"not json", b"[]", b'{"id": "a b"}', b'{"id": "x", "sleep": -1}', b"{}"):
            with pytest.raises(grpc.RpcError) as invalid:
                stub.unary(bad, timeout=10)
            assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
        with pytest.raises(grpc.RpcError) as unknown_field:
            stub.unary(b'{"id": "x", "bogus": 1}', timeout=10)
        assert "bogus" in (unknown_field.value.details() or "")
        with pytest.raises(grpc.RpcError) as empty:
            stub.client_stream(iter([]), timeout=10)
        assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # A bad message later in a stream fails the execution that is already logged.
        with pytest.raises(grpc.RpcError) as later:
            list(stub.bidi(iter([work_request("h"), b'{"count": "x"}']), timeout=10))
        assert later.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    snap = server.log.read()
    assert snap.executions() == {"f": 1, "g": 1, "h": 1}
    assert snap.outcomes("f") == ["failed:UNAVAILABLE"]
    assert snap.outcomes("g") == ["failed:ABORTED"]
    assert snap.outcomes("h") == ["failed:INVALID_ARGUMENT"]


@pytest.mark.parametrize("kind", ["unary", "server_stream", "client_stream", "bidi", "deadline"])
def test_a_call_cancelled_by_the_client_logs_cancelled(app_server_factory, kind) -> None:
    server = app_server_factory("plain")
    held = HeldRequests(work_request("x", sleep=30))
    try:
        with work_stub(server.address) as stub:
            call: Any  # a future or a stream: both cancel()
            if kind == "unary":
                call = stub.unary.future(work_request("x", sleep=30), timeout=60)
            elif kind == "server_stream":
                call = stub.server_stream(work_request("x", sleep=30), timeout=60)
            elif kind == "client_stream":  # cancelled while the server reads
                call = stub.client_stream.future(iter(held), timeout=60)
            elif kind == "bidi":
                call = stub.bidi(iter(held), timeout=60)
            else:  # the client's deadline cancels it on the server too
                call = stub.unary.future(work_request("x", sleep=30), timeout=1.0)
            assert started(server.log, "x"), server.log
            if kind != "deadline":
                call.cancel()
            # Well before the 30 s sleep would end: the handler woke when the call ended.
            end = server.log.wait_for_end("x", timeout=10)
    finally:
        held.close()
    assert end == LogEntry("end", "x", server.pid, "cancelled")
    assert server.log.executions() == {"x": 1}


def test_the_log_survives_a_sigkill_of_the_server(app_server_factory) -> None:
    server = app_server_factory("plain")
    with work_stub(server.address) as stub:
        call = stub.unary.future(work_request("killed", sleep=30), timeout=60)
        assert started(server.log, "killed"), server.log
        old_pid = server.pid
        server.kill()
        with pytest.raises(grpc.RpcError) as lost:
            call.result(timeout=10)
        assert lost.value.code() == grpc.StatusCode.UNAVAILABLE
        assert server.log.starts("killed") == [LogEntry("start", "killed", old_pid)]
        assert server.log.unfinished() == {"killed": 1}

        server.restart()
        answer = work_response(stub.unary(work_request("after"), timeout=10, wait_for_ready=True))
    assert answer["pid"] == server.pid != old_pid
    snap = server.log.read()
    assert snap.executions() == {"killed": 1, "after": 1}
    assert snap.ends("killed") == []
    assert snap.outcomes("after") == ["ok"]


@pytest.mark.parametrize("flavor", FLAVORS)
def test_graceful_stop_finishes_the_call_in_flight_and_refuses_new_connections(
    app_server_factory, flavor
) -> None:
    server = app_server_factory(flavor)
    with work_stub(server.address) as stub:
        call = stub.unary.future(work_request("inflight", sleep=1.0), timeout=30)
        assert started(server.log, "inflight"), server.log
        old = server.stop_gracefully(grace=20)
        assert not server.running  # detached: the object has no current child
        assert old.answer["in_flight"] == 1
        # stop_gracefully() returns once the listener is closed.
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", server.port), timeout=2).close()
        with work_stub(server.address) as fresh, pytest.raises(grpc.RpcError) as refused:
            fresh.unary(work_request("refused"), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        answer = work_response(call.result(timeout=10))
    assert answer["pid"] == old.pid
    assert old.wait(timeout=10) == 0
    snap = server.log.read()
    assert snap.executions() == {"inflight": 1}
    assert snap.ends("inflight") == [LogEntry("end", "inflight", old.pid, "ok")]


@pytest.mark.parametrize("flavor", ["kernel", "plain"])
def test_a_call_that_outlasts_the_grace_is_cancelled_and_looks_unavailable(
    app_server_factory, flavor
) -> None:
    server = app_server_factory(flavor)
    with work_stub(server.address) as stub:
        call = stub.unary.future(work_request("long", sleep=30), timeout=60)
        assert started(server.log, "long"), server.log
        old = server.stop_gracefully(grace=0.5)
        with pytest.raises(grpc.RpcError) as cut:
            call.result(timeout=10)
    # Executed, then cut short: the client cannot tell it from "never reached a server".
    assert cut.value.code() == grpc.StatusCode.UNAVAILABLE
    assert cut.value.details() == "Cancelling all calls"
    assert old.wait(timeout=10) == 0
    assert server.log.ends("long") == [LogEntry("end", "long", old.pid, "cancelled")]


def test_a_graceful_stop_with_nothing_in_flight_answers_then_exits(app_server_factory) -> None:
    server = app_server_factory("plain")
    for _ in range(3):  # the stop completes at once: its answer must still come out first
        old = server.stop_gracefully(grace=5)
        assert old.answer["ok"] is True
        assert old.answer["in_flight"] == 0
        assert old.wait(timeout=10) == 0
        server.restart()


@pytest.mark.parametrize(("flavor", "how"), [("kernel", "restart"), ("plain", "second object")])
def test_a_new_server_serves_on_the_same_port_while_the_old_one_drains(
    app_server_factory, flavor, how
) -> None:
    server = app_server_factory(flavor)
    held = HeldRequests(work_request("old"))
    try:
        with work_stub(server.address) as stub:
            old_call = stub.bidi(iter(held), timeout=60)
            assert work_response(next(old_call))["pid"] == server.pid
            old = server.stop_gracefully(grace=30)
            if how == "restart":
                new_server = server.restart()
            else:
                new_server = app_server_factory(
                    flavor, port=server.port, work_log=server.log.path, bind_retry=5.0
                )
            assert new_server.address == server.address
            assert new_server.pid != old.pid
            with work_stub(new_server.address) as fresh:
                new = work_response(fresh.unary(work_request("new"), timeout=10))
            assert new["pid"] == new_server.pid
            # The draining channel moves on to the new server for new calls...
            moved = stub.unary(work_request("moved"), timeout=10, wait_for_ready=True)
            assert work_response(moved)["pid"] == new_server.pid
            # ...while the old server is still serving the call it had.
            assert old.running
            held.send(b'{"count": 2}')
            held.close()
            rest = [work_response(m) for m in old_call]
        assert [(m["pid"], m["seq"]) for m in rest] == [(old.pid, 1), (old.pid, 2)]
        assert old.wait(timeout=10) == 0
    finally:
        held.close()
    snap = server.log.read()
    assert snap.executions() == {"old": 1, "new": 1, "moved": 1}
    assert snap.ends("old") == [LogEntry("end", "old", old.pid, "ok")]
    assert {e.pid for e in snap.ends("new") + snap.ends("moved")} == {new_server.pid}


def ipv6_loopback_works() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not ipv6_loopback_works(), reason="no IPv6 loopback here")
def test_an_app_server_on_the_ipv6_loopback(app_server_factory) -> None:
    server = app_server_factory("plain", host="::1")
    assert server.address == f"[::1]:{server.port}"
    with work_stub(server.address) as stub:
        assert work_response(stub.unary(work_request("v6"), timeout=10))["pid"] == server.pid
        old = server.stop_gracefully(grace=5)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("::1", server.port), timeout=2).close()
    assert old.wait(timeout=10) == 0
    assert server.log.outcomes("v6") == ["ok"]


@pytest.mark.parametrize("flavor", ["kernel", "plain"])
def test_a_second_server_on_a_taken_port_fails_clearly(app_server_factory, flavor) -> None:
    first = app_server_factory(flavor)
    second = app_server_factory(flavor, port=first.port, start=False)
    with pytest.raises(ServerStartError, match="already in use"):
        second.start()
    assert first.stats()["ok"] is True
    with work_stub(first.address) as stub:
        assert work_response(stub.unary(work_request("a"), timeout=10))["pid"] == first.pid


@pytest.mark.parametrize("flavor", ["kernel", "grpc-health"])
def test_health_flavors_report_serving_and_not_serving(app_server_factory, flavor) -> None:
    server = app_server_factory(flavor)
    with grpc.insecure_channel(server.address, options=LOCAL_POOL) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=30)
        try:
            assert next(watch).status == SERVING
            assert health_status(server.address) == SERVING
            server.set_serving(False)
            assert next(watch).status == NOT_SERVING
            assert health_status(server.address) == NOT_SERVING
            server.set_serving(True)
            assert next(watch).status == SERVING
            assert health_status(server.address) == SERVING
        finally:
            watch.cancel()


def test_the_kernel_flavor_serves_the_kernel_next_to_the_work_service(app_server_factory) -> None:
    server = app_server_factory("kernel", keepalive_interval=0.2)
    with grpc.insecure_channel(server.address, options=LOCAL_POOL) as channel:
        connect = open_connect(channel, timeout=30)
        try:
            first = next(connect)
            assert b"cid" in first
            assert (
                work_response(WorkStub(channel).unary(work_request("w"), timeout=10))["id"] == "w"
            )
            stats = server.stats()
            assert stats["connection_ids"] == ["cid"]
            assert stats["connect_requests"] == 1
            assert (stats["started"], stats["ended"]) == (1, 1)
            next(connect)  # the next keep-alive, 0.2 s later
            assert server.stats()["keepalives_sent"] >= 2
            # The dev server's own tests cover what these do; here: they reach it.
            assert server.pause_keepalives() == {"ok": True}
            assert server.resume_keepalives() == {"ok": True}
            next(connect)
        finally:
            connect.cancel()


def test_the_plain_flavor_has_no_health_service(app_server_factory) -> None:
    server = app_server_factory("plain")
    with pytest.raises(grpc.RpcError) as unimplemented:
        health_status(server.address)
    assert unimplemented.value.code() == grpc.StatusCode.UNIMPLEMENTED
    with pytest.raises(ServerCommandError, match="no health service"):
        server.set_serving(False)
    with pytest.raises(ServerCommandError, match="no kernel"):
        server.pause_keepalives()
    with pytest.raises(ServerCommandError, match="grace in seconds"):
        server.command("stop soon")
    with pytest.raises(ServerCommandError, match="unknown command"):
        server.command("reboot")
    assert server.stats()["flavor"] == "plain"  # still serving after those


@pytest.mark.parametrize("flavor", ["kernel", "plain"])
def test_64_concurrent_streams_are_served_and_logged_whole(app_server_factory, flavor) -> None:
    server = app_server_factory(flavor)
    ids = [f"c{i}" for i in range(64)]
    streams = {execution_id: HeldRequests(work_request(execution_id)) for execution_id in ids}
    try:
        with work_stub(server.address) as stub:
            calls = [stub.bidi(iter(streams[i]), timeout=60) for i in ids]
            # All 64 are in flight at once: each has its first answer and none has ended.
            assert [work_response(next(call))["id"] for call in calls] == ids
            assert server.stats()["in_flight"] == 64
            for held in streams.values():
                held.close()
            assert all(list(call) == [] for call in calls)
    finally:
        for held in streams.values():
            held.close()
    snap = server.log.read()
    assert snap.executions() == dict.fromkeys(ids, 1)
    assert all(snap.outcomes(i) == ["ok"] for i in ids)


def test_end_of_input_stops_the_server_at_once_and_cancels_its_calls(tmp_path) -> None:
    log = ExecutionLog(tmp_path / "executions.log")
    port = free_port()
    argv = [sys.executable, "-m", "tests.harness.appserver", "--port", str(port)]
    argv += ["--work-log", str(log.path), "--flavor", "plain"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO, env=env
    )
    assert proc.stdin is not None
    assert proc.stdout is not None
    try:
        line = proc.stdout.readline()
        assert line == f"workbench plain server listening on 127.0.0.1:{port}\n"
        with work_stub(f"127.0.0.1:{port}") as stub:
            call = stub.unary.future(work_request("orphan", sleep=30), timeout=60)
            assert started(log, "orphan"), log
            proc.stdin.close()  # the controller is gone
            assert proc.wait(timeout=10) == 0
            with pytest.raises(grpc.RpcError):
                call.result(timeout=10)
        assert log.ends("orphan") == [LogEntry("end", "orphan", proc.pid, "cancelled")]
        assert proc.stdout.read() == ""  # nothing but the listening line
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        proc.stdout.close()


def test_execution_log_parses_counts_and_waits(tmp_path) -> None:
    log = ExecutionLog(tmp_path / "executions.log")
    assert log.executions() == {}  # no file yet: an empty log
    assert log.wait_for(lambda snap: bool(snap.entries), timeout=0.05) is False
    with open(log.path, "w") as file:
        file.write("start a 1\nend a 1 ok\nstart b 2\nstart a 3\nend a 3 cancelled\nstart c")
    snap = log.read()  # the unfinished last line is not read
    assert snap.executions() == {"a": 2, "b": 1}
    assert [e.pid for e in snap.starts("a")] == [1, 3]
    assert snap.outcomes("a") == ["ok", "cancelled"]
    assert snap.unfinished() == {"b": 1}

    def append() -> None:
        with open(log.path, "a") as file:
            file.write(" 4\nend b 2 failed:UNAVAILABLE\n")

    writer = threading.Thread(target=append)
    writer.start()
    assert log.wait_for(lambda snap: snap.ends("b") != [], timeout=10)
    writer.join(timeout=5)
    assert log.ends("b") == [LogEntry("end", "b", 2, "failed:UNAVAILABLE")]
    assert log.unfinished() == {"c": 1}
    with pytest.raises(AssertionError, match="no end of 'c'"):
        log.wait_for_end("c", timeout=0.05)
    with open(log.path, "a") as file:
        file.write("end c\n")  # not a line a work server writes
    with pytest.raises(ValueError, match="not an execution log line"):
        log.read()


# -- the dev server's handlers ---------------------------------------------------------------


def open_connect(channel: grpc.Channel, timeout: float) -> Any:
    """A raw kernel ``Connect`` stream; its first keep-alive comes at once."""
    connect: grpc.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(CONNECT)
    return connect(encode_connect_request("cid"), timeout=timeout)


def test_devserver_serves_handlers_next_to_the_kernel(tmp_path) -> None:
    log = ExecutionLog(tmp_path / "executions.log")
    impostor = grpc.method_handlers_generic_handler(
        "grpc.health.v1.Health",
        {"Check": grpc.unary_unary_rpc_method_handler(lambda request, context: b"\xff")},
    )
    # The kernel's own methods (health among them) win over a handler's claim.
    handlers = [impostor, WorkService(log.path).generic_handler()]
    with DevServer(handlers=handlers) as server, work_stub(server.address) as stub:
        answer = work_response(stub.unary(work_request("a"), timeout=5))
        assert health_status(server.address) == SERVING
        with grpc.insecure_channel(server.address, options=LOCAL_POOL) as channel:
            connect = open_connect(channel, timeout=5)
            assert b"cid" in next(connect)
            connect.cancel()
    assert answer["pid"] == os.getpid()
    assert log.outcomes("a") == ["ok"]


def test_devserver_handlers_must_be_generic_handlers(tmp_path) -> None:
    handler = WorkService(tmp_path / "executions.log").generic_handler()
    with pytest.raises(TypeError, match="sequence"):
        DevServer(handlers=handler)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="GenericRpcHandler"):
        DevServer(handlers=[handler, object()])  # type: ignore[list-item]


def test_devserver_handlers_are_guarded_by_the_authenticator(tmp_path) -> None:
    log = ExecutionLog(tmp_path / "executions.log")
    server = DevServer(
        authenticator=lambda method, metadata: metadata.get("authorization") == "Bearer ok",
        handlers=[WorkService(log.path).generic_handler()],
    )
    with server, work_stub(server.address) as stub:
        with pytest.raises(grpc.RpcError) as refused:
            stub.unary(work_request("denied"), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        metadata = (("authorization", "Bearer ok"),)
        assert work_response(stub.unary(work_request("allowed"), metadata=metadata, timeout=5))
    assert log.executions() == {"allowed": 1}


@pytest.mark.timing
def test_devserver_stop_ends_kernel_streams_at_once_and_gives_handler_calls_their_grace(
    tmp_path,
) -> None:
    log = ExecutionLog(tmp_path / "executions.log")
    server = DevServer(keepalive_interval=30, handlers=[WorkService(log.path).generic_handler()])
    server.start()
    stopper = threading.Thread(target=server.stop, args=(20.0,), name="devserver-stop")
    try:
        with grpc.insecure_channel(server.address, options=LOCAL_POOL) as channel:
            connect = open_connect(channel, timeout=30)
            next(connect)
            call = WorkStub(channel).unary.future(work_request("drain", sleep=1.0), timeout=30)
            assert started(log, "drain"), log
            stop_started = time.monotonic()
            stopper.start()
            with pytest.raises(grpc.RpcError) as ended:
                next(connect)
            assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
            assert not call.done()  # the kernel's stream ended first, at once
            assert work_response(call.result(timeout=10))["id"] == "drain"
            stopper.join(timeout=10)
            assert not stopper.is_alive()
            # stop() returned when the last call ended, long before the 20 s grace.
            assert time.monotonic() - stop_started < 10
    finally:
        server.stop(None)
    assert log.outcomes("drain") == ["ok"]


def test_a_second_devserver_stop_cuts_the_grace_short(tmp_path) -> None:
    log = ExecutionLog(tmp_path / "executions.log")
    server = DevServer(keepalive_interval=30, handlers=[WorkService(log.path).generic_handler()])
    server.start()
    stopper = threading.Thread(target=server.stop, args=(60.0,), name="devserver-stop")
    try:
        with grpc.insecure_channel(server.address, options=LOCAL_POOL) as channel:
            connect = open_connect(channel, timeout=30)
            next(connect)
            call = WorkStub(channel).unary.future(work_request("cut", sleep=30), timeout=60)
            assert started(log, "cut"), log
            stopper.start()
            with pytest.raises(grpc.RpcError):  # the first stop() has begun
                next(connect)
            server.stop(None)  # would wait out the 30 s call without the shorter grace
            stopper.join(timeout=10)
            assert not stopper.is_alive()
            with pytest.raises(grpc.RpcError) as cancelled:
                call.result(timeout=10)
            # What gRPC tells a client whose call the server cancels when it stops.
            assert cancelled.value.code() == grpc.StatusCode.UNAVAILABLE
            assert cancelled.value.details() == "Cancelling all calls"
    finally:
        server.stop(None)
    assert log.wait_for_end("cut", timeout=10).outcome == "cancelled"
