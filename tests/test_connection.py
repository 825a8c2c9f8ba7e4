"""The connection manager against real servers: the dev kernel in a child process (SIGKILL,
restart), the in-process dev kernel, the fault proxy and plain gRPC servers."""

from __future__ import annotations

import contextlib
import gc
import itertools
import os
import threading
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from google.protobuf import empty_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

import chronicle_conn as cc
from chronicle_conn._proto import host_pb2_grpc
from chronicle_conn.devserver import DevServer
from chronicle_conn.states import ALLOWED_TRANSITIONS
from tests.harness.ports import free_port
from tests.harness.recorder import EventRecorder
from tests.helpers import (
    ChannelLedger,
    became,
    check_history,
    connect,
    plaintext,
    version,
    wait_for_generation,
)

S = cc.ConnectionState

FAST = {
    "reconnect_base_delay": 0.1,
    "reconnect_max_delay": 0.5,
    "attempt_timeout": 3.0,
    "keepalive_stale_after": 1.5,
}


@pytest.fixture
def devserver() -> Iterator[DevServer]:
    server = DevServer(keepalive_interval=0.2).start()
    yield server
    server.stop(0)


# ---------------------------------------------------------------------------- basics


def test_connect_channel_and_stats(make_conn, devserver, recorder):
    conn = make_conn(plaintext(devserver.address), name="basics", auto_connect=False, **FAST)
    conn.add_listener(recorder)
    assert conn.connect(timeout=10) is conn
    assert conn.connected
    assert conn.state is S.CONNECTED
    channel = conn.channel()
    assert channel is conn.channel()  # the same stable facade every time
    same, config = conn.get_channel()
    assert same is channel
    assert config.connection_string.hosts[0].port == devserver.port
    assert version(channel) == devserver.version
    assert cc.registry.get("basics") is conn

    stats = conn.stats()
    assert stats.state is S.CONNECTED
    assert stats.connects == 1
    assert stats.generation == 1
    assert stats.liveness == "keepalive"
    assert devserver.wait_for(lambda: len(devserver.keepalive_answers) >= 2, 5)
    assert conn.stats().keepalives_received >= 2
    assert conn.stats().health_updates_received == 0  # keep-alive mode: no Watch stream

    request = devserver.connect_requests[0]
    assert request.ClientType == "Python"
    assert request.ProcessId == os.getpid()
    assert request.ClientVersion == cc.__version__
    assert request.MachineName

    conn.close()
    assert conn.state is S.CLOSED
    assert "basics" not in cc.registry
    conn.close()  # idempotent
    recorder.wait_for_event(became(S.CLOSED), 5)
    assert [c.new for c in recorder.events] == [S.CONNECTING, S.CONNECTED, S.CLOSED]
    check_history(recorder)
    with pytest.raises(cc.NotConnectedError) as info:
        conn.channel()
    assert info.value.state is S.CLOSED
    with pytest.raises(cc.ConnectionClosedError):
        conn.connect(timeout=1)


def test_repr_and_errors_are_redacted(make_conn):
    secret = "s3cr3t"
    conn = make_conn(
        f"chronicle://client:{secret}@127.0.0.1:{free_port()}?disableTls=true",
        auto_connect=False,
        name="r",
        retry_attempts=1,
        delay_factory=lambda policy: itertools.repeat(0.01),
    )
    text = repr(conn)
    assert "'r'" in text
    assert "idle" in text
    assert "client:***@" in text
    # Through a real failure: every message, its cause, stats and repr.
    with pytest.raises(cc.RetriesExhaustedError) as exhausted:
        conn.connect(timeout=20)
    with pytest.raises(cc.NotConnectedError) as not_connected:
        conn.channel()
    with pytest.raises(grpc.RpcError) as rpc:
        conn.managed_channel.unary_unary("/x.Y/Z")(b"", timeout=1)
    stats = conn.stats()
    assert stats.last_error  # there is an error to show...
    shown = [
        repr(conn),
        repr(stats),
        str(exhausted.value),
        repr(exhausted.value.__cause__),
        str(not_connected.value),
        str(rpc.value),
        rpc.value.details(),
    ]
    for text in shown:
        assert secret not in text  # ...and no secret in any of it


def test_duplicate_name_is_refused(make_conn):
    make_conn(server_address="127.0.0.1:1", auto_connect=False, name="dup")
    with pytest.raises(cc.DuplicateNameError):
        cc.Connection(server_address="127.0.0.1:1", auto_connect=False, name="dup")


def test_bad_options_raise_configuration_errors():
    with pytest.raises(cc.ConfigurationError, match="reconnect_base_delay"):
        cc.Connection(server_address="127.0.0.1:1", reconnect_base_delay=0, auto_connect=False)
    with pytest.raises(cc.ConfigurationError, match="liveness"):
        cc.Connection(server_address="127.0.0.1:1", liveness="sometimes", auto_connect=False)
    with pytest.raises(cc.ConfigurationError, match="server_address"):
        cc.Connection("chronicle://a", server_address="b:1")


def test_auto_connect_false_stays_idle_until_connect(make_conn, devserver, recorder):
    conn = make_conn(plaintext(devserver.address), auto_connect=False, **FAST)
    conn.add_listener(recorder)
    assert conn.state is S.IDLE
    assert conn._threads() == []  # nothing runs until asked
    with pytest.raises(cc.NotConnectedError) as info:
        conn.channel()
    assert info.value.state is S.IDLE
    conn.connect(timeout=10)
    # Listeners hear of CONNECTED on the supervisor thread, just after connect() returns.
    recorder.wait_for_event(became(S.CONNECTED), 5)
    assert [c.new for c in recorder.events] == [S.CONNECTING, S.CONNECTED]


def test_context_manager_closes(devserver):
    with cc.Connection(plaintext(devserver.address), **FAST) as conn:
        conn.connect(timeout=10)
    assert conn.state is S.CLOSED
    assert conn._threads() == []


def test_idle_close(make_conn, recorder):
    conn = make_conn(server_address="127.0.0.1:1", auto_connect=False)
    conn.add_listener(recorder)
    conn.close()
    assert [(c.old, c.new) for c in recorder.events] == [(S.IDLE, S.CLOSED)]


def test_illegal_transition_is_impossible(make_conn):
    conn = make_conn(server_address="127.0.0.1:1", auto_connect=False)
    core = conn._core
    with core.cond, pytest.raises(AssertionError, match="illegal transition"):
        core.transition(S.CONNECTED)  # IDLE -> CONNECTED skips CONNECTING
    assert conn.state is S.IDLE
    conn.close()
    with core.cond, pytest.raises(AssertionError):
        core.transition(S.CONNECTING)  # CLOSED is terminal
    assert ALLOWED_TRANSITIONS[S.CLOSED] == frozenset()


# ---------------------------------------------------------------------------- failure


def test_exhaustion_fails_waiters_then_connect_rearms(make_conn, recorder):
    port = free_port()
    exhausted = EventRecorder("exhausted")
    conn = make_conn(
        plaintext(f"127.0.0.1:{port}"),
        retry_attempts=2,
        delay_factory=lambda policy: itertools.repeat(0.01),
        on_retries_exhausted=exhausted,
        liveness="transport",
        auto_connect=False,
    )
    conn.add_listener(recorder)
    with pytest.raises(cc.RetriesExhaustedError) as info:
        conn.connect(timeout=20)
    assert info.value.attempts == 3
    assert isinstance(info.value.__cause__, Exception)
    assert "refused" in str(info.value).lower() or "failed to connect" in str(info.value).lower()
    assert conn.state is S.FAILED
    assert exhausted.wait_for_count(1, 5)
    assert exhausted.events == [conn]
    stats = conn.stats()
    assert stats.attempts == 3
    assert stats.failed_attempts == 3
    recorder.wait_for_event(became(S.FAILED), 5)

    # connect() re-arms a fresh budget: FAILED -> CONNECTING -> ... -> FAILED again.
    with pytest.raises(cc.RetriesExhaustedError):
        conn.connect(timeout=20)
    assert conn.stats().attempts == 6
    assert recorder.wait_for_count(4, 5)
    news = [c.new for c in recorder.events]
    assert news == [S.CONNECTING, S.FAILED, S.CONNECTING, S.FAILED]
    check_history(recorder)


def test_failed_connection_recovers_on_demand(make_conn, kernel_factory, recorder):
    port = free_port()
    conn = make_conn(
        plaintext(f"127.0.0.1:{port}"),
        retry_attempts=0,
        delay_factory=lambda policy: itertools.repeat(0.01),
        **FAST,
    )
    conn.add_listener(recorder)
    recorder.wait_for_event(became(S.FAILED), 10)
    kernel_factory(port=port, keepalive_interval=0.2)
    # A fail-fast use of a FAILED connection re-arms it without blocking.
    with pytest.raises(cc.NotConnectedError):
        conn.channel()
    recorder.wait_for_event(became(S.CONNECTED), 10)
    assert version(conn.channel()) == "0.0.0-dev"


@pytest.mark.timing
def test_connect_timeout_is_a_timeout_error(make_conn):
    conn = make_conn(
        plaintext(f"127.0.0.1:{free_port()}"), retry_attempts=None, **FAST, auto_connect=False
    )
    started = time.monotonic()
    with pytest.raises(cc.ConnectTimeoutError) as info:
        conn.connect(timeout=0.5)
    assert isinstance(info.value, TimeoutError)
    assert time.monotonic() - started < 5
    assert conn.state in (S.CONNECTING, S.RECONNECTING)


@pytest.mark.timing
def test_close_interrupts_backoff_at_once(make_conn, recorder):
    conn = make_conn(
        plaintext(f"127.0.0.1:{free_port()}"),
        retry_attempts=None,
        delay_factory=lambda policy: itertools.repeat(30.0),
    )
    conn.add_listener(recorder)
    deadline = time.monotonic() + 10
    while conn.stats().current_delay is None:  # the first attempt fails in milliseconds
        assert time.monotonic() < deadline
        with conn._core.cond:
            conn._core.cond.wait(0.05)
    started = time.monotonic()
    conn.close()
    took = time.monotonic() - started
    assert conn._threads() == []
    assert took < 5.0  # generous on a loaded machine; the benchmark measures the real figure
    check_history(recorder)


# ---------------------------------------------------------------------------- waiters


@pytest.mark.timeout(120)
def test_hundreds_of_waiters_released_on_success(make_conn, kernel_factory):
    port = free_port()
    conn = make_conn(
        plaintext(f"127.0.0.1:{port}"), retry_attempts=None, auto_connect=False, **FAST
    )
    results: list[object] = []
    lock = threading.Lock()
    started = threading.Barrier(301)

    def wait() -> None:
        started.wait(30)
        try:
            conn.connect(timeout=60)
            outcome: object = "ok"
        except Exception as exc:
            outcome = exc
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=wait) for _ in range(300)]
    for thread in threads:
        thread.start()
    started.wait(30)
    deadline = time.monotonic() + 30
    while conn.stats().waiters < 300:  # all of them are waiting...
        assert time.monotonic() < deadline, conn.stats()
        with conn._core.cond:
            conn._core.cond.wait(0.05)
    failed_before = conn.stats().failed_attempts
    # ...while several attempts fail; none of them fails a waiter.
    while conn.stats().failed_attempts < failed_before + 3:
        assert time.monotonic() < deadline
        with conn._core.cond:
            conn._core.cond.wait(0.05)
    assert results == []
    kernel_factory(port=port, keepalive_interval=0.2)
    for thread in threads:
        thread.join(60)
    assert results == ["ok"] * 300


@pytest.mark.timeout(120)
@pytest.mark.parametrize("ending", ["exhaustion", "close", "deadline"])
def test_hundreds_of_waiters_released_on_failure(make_conn, ending):
    conn = make_conn(
        plaintext(f"127.0.0.1:{free_port()}"),
        retry_attempts=None if ending != "exhaustion" else 20,
        delay_factory=lambda policy: itertools.repeat(0.05),
        auto_connect=False,
    )
    results: list[object] = []
    lock = threading.Lock()
    ready = threading.Barrier(201)

    def wait() -> None:
        ready.wait(30)
        try:
            conn.connect(timeout=3.0 if ending == "deadline" else 60)
            outcome: object = "ok"
        except Exception as exc:
            outcome = exc
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=wait) for _ in range(200)]
    for thread in threads:
        thread.start()
    ready.wait(30)
    if ending == "close":
        deadline = time.monotonic() + 20
        while conn.stats().waiters < 200:
            assert time.monotonic() < deadline
            with conn._core.cond:
                conn._core.cond.wait(0.05)
        conn.close()
    for thread in threads:
        thread.join(60)
    expected = {
        "exhaustion": cc.RetriesExhaustedError,
        "close": cc.ConnectionClosedError,
        "deadline": cc.ConnectTimeoutError,
    }[ending]
    assert len(results) == 200
    assert all(type(r) is expected for r in results), {type(r) for r in results}


# ---------------------------------------------------------------------------- detection


@pytest.mark.timing
def test_sigkill_detected_and_recovered_stub_survives(make_conn, kernel, recorder):
    conn = make_conn(plaintext(kernel.address), retry_attempts=None, **FAST)
    conn.add_listener(recorder)
    mark = connect(conn, recorder)
    stub = host_pb2_grpc.ServerStub(conn.channel())  # made before the outage
    assert stub.GetVersionInfo(empty_pb2.Empty(), timeout=5).Version

    killed_at = time.monotonic()
    kernel.kill()
    lost = recorder.wait_for_event(became(S.RECONNECTING), 10, since=mark)
    detected = time.monotonic() - killed_at
    assert "refused" in (lost.error or "").lower() or "unavailable" in (lost.error or "").lower()
    assert detected < 5.0  # loose: the benchmark measures the real latency
    assert not conn.connected
    # A fail-fast call during the outage fails fast with UNAVAILABLE.
    with pytest.raises(grpc.RpcError) as info:
        stub.GetVersionInfo(empty_pb2.Empty(), timeout=5)
    assert info.value.code() is grpc.StatusCode.UNAVAILABLE

    kernel.restart()
    # A wait_for_ready call made during the outage rides it out on the same old stub.
    assert stub.GetVersionInfo(empty_pb2.Empty(), timeout=20, wait_for_ready=True).Version
    assert conn.connected
    stats = conn.stats()
    assert stats.disconnects == 1
    assert stats.generation >= 2
    check_history(recorder)


@pytest.mark.timing
def test_hung_kernel_detected_within_stale_threshold(make_conn, kernel_factory, recorder):
    kernel = kernel_factory(keepalive_interval=0.2)
    conn = make_conn(plaintext(kernel.address), retry_attempts=None, **FAST)
    conn.add_listener(recorder)
    mark = connect(conn, recorder)
    paused_at = time.monotonic()  # before the command: its round trip adds to "took"
    kernel.pause_keepalives()
    lost = recorder.wait_for_event(became(S.RECONNECTING), 10, since=mark)
    took = time.monotonic() - paused_at
    assert "keep-alive" in lost.error
    # stale 1.5 s after the last keep-alive, which came at most one interval (0.2 s)
    # before the pause; generous above for a loaded machine
    assert 1.5 - 0.2 - 0.1 < took < 1.5 + 3.0
    kernel.resume_keepalives()
    recorder.wait_for_event(became(S.CONNECTED), 15, since=mark)
    check_history(recorder)


def test_silent_partition_detected(make_conn, kernel_factory, proxy_factory, recorder):
    kernel = kernel_factory(keepalive_interval=0.2)
    proxy = proxy_factory("127.0.0.1", kernel.port)
    conn = make_conn(plaintext(proxy.address), retry_attempts=None, **FAST)
    conn.add_listener(recorder)
    mark = connect(conn, recorder)
    proxy.swallow(discard=False)  # packets vanish; nothing is refused or reset
    lost = recorder.wait_for_event(became(S.RECONNECTING), 10, since=mark)
    assert "keep-alive" in lost.error
    proxy.pass_through()
    recorder.wait_for_event(became(S.CONNECTED), 20, since=mark)
    assert version(conn.channel(), wait_for_ready=True) == "0.0.0-dev"


def test_proxy_reset_detected_and_recovered(make_conn, kernel, proxy_factory, recorder):
    proxy = proxy_factory("127.0.0.1", kernel.port)
    conn = make_conn(plaintext(proxy.address), retry_attempts=None, **FAST)
    conn.add_listener(recorder)
    mark = connect(conn, recorder)
    proxy.refuse()
    proxy.reset()
    recorder.wait_for_event(became(S.RECONNECTING), 10, since=mark)
    proxy.pass_through()
    recorder.wait_for_event(became(S.CONNECTED), 20, since=mark)


def test_not_serving_detected_with_health(make_conn, devserver, recorder):
    conn = make_conn(plaintext(devserver.address), liveness="health", retry_attempts=None, **FAST)
    conn.add_listener(recorder)
    mark = connect(conn, recorder)
    assert conn.stats().liveness == "health"
    devserver.set_serving(False)
    lost = recorder.wait_for_event(became(S.RECONNECTING), 10, since=mark)
    assert "NOT_SERVING" in lost.error
    # NOT_SERVING servers do not count as connected: attempts fail until it serves again.
    with pytest.raises(cc.ConnectTimeoutError):
        conn.connect(timeout=1.0)
    devserver.set_serving(True)
    conn.connect(timeout=10)


def _plain_server(with_health: bool) -> tuple[grpc.Server, int, object]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    echo = grpc.method_handlers_generic_handler(
        "test.Echo",
        {
            "Say": grpc.unary_unary_rpc_method_handler(lambda request, context: request),
            "Twice": grpc.unary_stream_rpc_method_handler(
                lambda request, context: iter((request, request))
            ),
            "Join": grpc.stream_unary_rpc_method_handler(
                lambda requests, context: b"".join(requests)
            ),
            "Each": grpc.stream_stream_rpc_method_handler(
                lambda requests, context: (r.upper() for r in requests)
            ),
        },
    )
    server.add_generic_rpc_handlers((echo,))
    servicer = None
    if with_health:
        servicer = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port, servicer


@pytest.mark.parametrize(("with_health", "expected"), [(False, "transport"), (True, "health")])
def test_plain_grpc_server_works(make_conn, with_health, expected, recorder):
    server, port, servicer = _plain_server(with_health)
    try:
        conn = make_conn(plaintext(f"127.0.0.1:{port}"), retry_attempts=None, **FAST)
        conn.add_listener(recorder)
        connect(conn, recorder)
        assert conn.stats().liveness == expected
        say = conn.channel().unary_unary("/test.Echo/Say")
        assert say(b"hello", timeout=5) == b"hello"
        # Each sign of life under its own name: no keep-alives from a plain server.
        core = conn._core
        with core.cond:
            # (the lock is held: read the monitor, not stats())
            assert core.cond.wait_for(
                lambda: core.current is not None and core.current.monitor.probes_answered >= 1,
                10,
            )
        stats = conn.stats()
        assert stats.keepalives_received == 0
        if servicer is None:
            assert stats.health_updates_received == 0
        else:
            assert stats.health_updates_received >= 1
        if servicer is not None:
            mark = len(recorder)
            servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
            recorder.wait_for_event(became(S.RECONNECTING), 10, since=mark)
            servicer.set("", health_pb2.HealthCheckResponse.SERVING)
            recorder.wait_for_event(became(S.CONNECTED), 10, since=mark)
        mark = len(recorder)
        server.stop(0)
        recorder.wait_for_event(became(S.RECONNECTING), 10, since=mark)
    finally:
        server.stop(0)


def test_every_kind_of_call_goes_through_the_managed_channel(make_conn, recorder):
    server, port, _ = _plain_server(with_health=False)
    try:
        conn = make_conn(plaintext(f"127.0.0.1:{port}"), auto_connect=False, **FAST)
        conn.add_listener(recorder)
        connect(conn, recorder)
        channel = conn.channel()
        say = channel.unary_unary("/test.Echo/Say")
        twice = channel.unary_stream("/test.Echo/Twice")
        join = channel.stream_unary("/test.Echo/Join")
        each = channel.stream_stream("/test.Echo/Each")
        for wait in (None, True):
            assert say(b"a", timeout=5, wait_for_ready=wait) == b"a"
            reply, call = say.with_call(b"b", timeout=5, wait_for_ready=wait)
            assert reply == b"b"
            assert call.code() is grpc.StatusCode.OK
            assert say.future(b"c", timeout=5, wait_for_ready=wait).result() == b"c"
            assert list(twice(b"d", timeout=5, wait_for_ready=wait)) == [b"d", b"d"]
            assert join(iter([b"e", b"f"]), timeout=5, wait_for_ready=wait) == b"ef"
            reply, call = join.with_call(iter([b"g"]), timeout=5, wait_for_ready=wait)
            assert reply == b"g"
            assert join.future(iter([b"h", b"i"]), timeout=5, wait_for_ready=wait).result() == b"hi"
            assert list(each(iter([b"j", b"k"]), timeout=5, wait_for_ready=wait)) == [b"J", b"K"]
        # Errors of the server come through as they are.
        with pytest.raises(grpc.RpcError) as info:
            channel.unary_unary("/test.Echo/Nope")(b"", timeout=5)
        assert info.value.code() is grpc.StatusCode.UNIMPLEMENTED
        # After a reconnect() the same multicallables use the new generation.
        conn.reconnect()
        wait_for_generation(conn, 2)
        assert list(each(iter([b"z"]), timeout=5, wait_for_ready=True)) == [b"Z"]
        assert say(b"y", timeout=5) == b"y"
    finally:
        server.stop(0)


# ---------------------------------------------------------------------------- generations


def test_reconnect_gives_new_generation_and_old_stubs_work(make_conn, devserver, recorder):
    conn = make_conn(plaintext(devserver.address), **FAST)
    conn.add_listener(recorder)
    mark = connect(conn, recorder)
    stub = host_pb2_grpc.ServerStub(conn.channel())
    stub.GetVersionInfo(empty_pb2.Empty(), timeout=5)
    before = conn.stats().generation
    ids_before = set(devserver.connection_ids)
    conn.reconnect()
    wait_for_generation(conn, before + 1)
    # Make-before-break: the connection never stopped being CONNECTED.
    assert recorder.events[mark:] == []
    assert conn.connected
    assert stub.GetVersionInfo(empty_pb2.Empty(), timeout=5).Version
    # A fresh kernel connection id for the new generation.
    assert devserver.wait_for(lambda: set(devserver.connection_ids) - ids_before, 5)


def test_max_channel_age_rotates_without_state_change(make_conn, devserver, recorder):
    conn = make_conn(plaintext(devserver.address), max_channel_age=0.5, auto_connect=False, **FAST)
    conn.add_listener(recorder)
    connect(conn, recorder)
    stub = host_pb2_grpc.ServerStub(conn.channel())
    deadline = time.monotonic() + 20
    while conn.stats().generation < 3:
        assert stub.GetVersionInfo(empty_pb2.Empty(), timeout=5).Version
        assert time.monotonic() < deadline
        with conn._core.cond:
            conn._core.cond.wait(0.1)
    assert [c.new for c in recorder.events] == [S.CONNECTING, S.CONNECTED]


@pytest.mark.timing
def test_wait_for_ready_call_waits_within_its_deadline(make_conn):
    conn = make_conn(
        plaintext(f"127.0.0.1:{free_port()}"), retry_attempts=None, **FAST, auto_connect=False
    )
    channel = conn.managed_channel  # conn.channel() raises while not connected
    with pytest.raises(cc.NotConnectedError):
        conn.channel()
    call = channel.unary_unary("/test.Echo/Say")
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        call(b"x", timeout=0.5, wait_for_ready=True)
    assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0.4 < time.monotonic() - started < 5
    with pytest.raises(grpc.RpcError) as info:
        call(b"x", timeout=5)
    assert info.value.code() is grpc.StatusCode.UNAVAILABLE


def test_channel_ready_future_on_managed_channel(make_conn, devserver):
    conn = make_conn(plaintext(devserver.address), **FAST)
    grpc.channel_ready_future(conn.managed_channel).result(timeout=10)
    assert conn.connected


# ---------------------------------------------------------------------------- listeners


def test_listener_that_raises_breaks_nothing(make_conn, devserver, recorder):
    def bad(change: cc.StateChange) -> None:
        raise RuntimeError("listener bug")

    conn = make_conn(plaintext(devserver.address), **FAST, auto_connect=False)
    conn.add_listener(bad)
    conn.add_listener(recorder)
    conn.connect(timeout=10)
    recorder.wait_for_event(became(S.CONNECTED), 5)
    conn.remove_listener(bad)
    assert version(conn.channel())


def test_close_inside_listener_does_not_deadlock(devserver):
    closed = threading.Event()
    holder: list[cc.Connection] = []

    def on_change(change: cc.StateChange) -> None:
        if change.new is S.CONNECTED:
            holder[0].close()
            closed.set()

    conn = cc.Connection(plaintext(devserver.address), **FAST, auto_connect=False)
    holder.append(conn)
    conn.add_listener(on_change)
    # The listener may close it before connect() gets to return: that is a closed wait.
    with contextlib.suppress(cc.ConnectionClosedError):
        conn.connect(timeout=10)
    assert closed.wait(10)
    assert conn.state is S.CLOSED
    supervisor_thread = conn._core.thread
    assert supervisor_thread is not None
    supervisor_thread.join(10)
    assert conn._threads() == []


# ---------------------------------------------------------------------------- fork


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
@pytest.mark.timeout(60)
def test_stub_made_before_fork_works_in_child(make_conn, kernel, recorder):
    # The kernel in a process of its own: a gRPC server in this process would be inside
    # gRPC at the fork (its own threads), which makes gRPC skip its fork handlers.
    conn = make_conn(plaintext(kernel.address), auto_connect=False, **FAST)
    conn.add_listener(recorder)
    connect(conn, recorder)
    stub = host_pb2_grpc.ServerStub(conn.channel())
    assert stub.GetVersionInfo(empty_pb2.Empty(), timeout=5).Version
    parent_generation = conn._core.current
    mark = len(recorder)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            reply = stub.GetVersionInfo(empty_pb2.Empty(), timeout=15, wait_for_ready=True)
            news = [(c.old, c.new) for c in recorder.events[mark:]]
            ok = (
                reply.Version == "0.0.0-dev"
                and news[:3]
                == [(S.CONNECTED, S.IDLE), (S.IDLE, S.CONNECTING), (S.CONNECTING, S.CONNECTED)]
                and "fork" in (recorder.events[mark].error or "")
                and conn._core.current is not parent_generation
            )
            code = 0 if ok else 2
        finally:
            os._exit(code)
    deadline = time.monotonic() + 40
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        assert time.monotonic() < deadline, "child hung"
        with conn._core.cond:
            conn._core.cond.wait(0.05)
    assert os.waitstatus_to_exitcode(status) == 0
    assert version(conn.channel())  # the parent is untouched
    assert conn._core.current is parent_generation
    assert len(recorder) == mark


@pytest.mark.timeout(120)
def test_every_transition_of_the_table_happens(make_conn, kernel_factory, recorder):
    """Drive connections through every allowed transition but the fork-only ones
    (X -> IDLE, covered by the fork test) and check each was taken, and nothing else."""
    port = free_port()
    target = plaintext(f"127.0.0.1:{port}")
    fast = {"delay_factory": lambda policy: itertools.repeat(0.05), "auto_connect": False}

    def wait_for(state: cc.ConnectionState, mark: int) -> int:
        recorder.wait_for_event(became(state), 20, since=mark)
        return len(recorder)

    # A bounded budget: IDLE -> CONNECTING -> FAILED -> CONNECTING -> CONNECTED
    # -> RECONNECTING -> FAILED -> CLOSED
    bounded = make_conn(target, retry_attempts=1, **fast, **FAST)
    bounded.add_listener(recorder)
    with pytest.raises(cc.RetriesExhaustedError):
        bounded.connect(timeout=20)
    kernel = kernel_factory(port=port, keepalive_interval=0.2)
    mark = connect(bounded, recorder)
    kernel.kill()
    wait_for(S.FAILED, mark)
    bounded.close()

    # Unbounded: RECONNECTING -> CONNECTED, and RECONNECTING -> CLOSED
    kernel.restart()
    forever = make_conn(target, retry_attempts=None, **fast, **FAST)
    forever.add_listener(recorder)
    mark = connect(forever, recorder)
    kernel.kill()
    mark = wait_for(S.RECONNECTING, mark)
    kernel.restart()
    mark = wait_for(S.CONNECTED, mark)
    kernel.kill()
    wait_for(S.RECONNECTING, mark)
    forever.close()

    # IDLE -> CLOSED
    idle = make_conn(target, **fast)
    idle.add_listener(recorder)
    idle.close()

    # CONNECTING -> CLOSED (nobody listening on that port)
    dialing = make_conn(plaintext(f"127.0.0.1:{free_port()}"), retry_attempts=None, **fast)
    dialing.add_listener(recorder)
    with pytest.raises(cc.ConnectTimeoutError):
        dialing.connect(timeout=0.3)
    dialing.close()

    # CONNECTED -> CLOSED
    kernel.restart()
    up = make_conn(target, **fast, **FAST)
    up.add_listener(recorder)
    connect(up, recorder)
    up.close()

    seen = {(c.old, c.new) for c in recorder.events}
    expected = {
        (old, new)
        for old, targets in ALLOWED_TRANSITIONS.items()
        for new in targets
        if new is not S.IDLE
    }
    assert expected - seen == set()
    assert seen <= expected


# ---------------------------------------------------------------------------- robustness


def test_replaced_channel_is_closed_while_connected(make_conn, devserver):
    ledger = ChannelLedger()
    conn = make_conn(
        plaintext(devserver.address),
        connect_fun=ledger.connect,
        disconnect_fun=ledger.disconnect,
        drain_timeout=0.2,
        **FAST,
    )
    conn.connect(timeout=10)
    conn.reconnect()
    deadline = time.monotonic() + 10
    # Still connected, and the old channel is closed once its drain is over.
    while not (conn.stats().generation == 2 and len(ledger.open) == 1):
        assert time.monotonic() < deadline, (conn.stats(), ledger.open)
        with conn._core.cond:
            conn._core.cond.wait(0.05)
    assert conn.connected
    assert ledger.built == 2


@pytest.mark.timing
def test_supervisor_is_quiet_while_connected(make_conn, devserver):
    conn = make_conn(plaintext(devserver.address), drain_timeout=0.1, **FAST)
    conn.connect(timeout=10)
    conn.reconnect()  # leaves a retired channel to close: the wait must not spin on it
    conn.connect(timeout=10)
    started_cpu, started = time.process_time(), time.monotonic()
    threading.Event().wait(2.0)  # the measurement needs wall-clock time to pass
    used = time.process_time() - started_cpu
    assert used < 0.5 * (time.monotonic() - started), f"{used:.2f}s of CPU in 2s"


class BrokenLogger:
    """A logger whose sink is gone: every call raises."""

    def bind(self, **context: object) -> BrokenLogger:
        return self

    def __getattr__(self, name: str):
        def fail(*args: object, **kwargs: object) -> None:
            raise BrokenPipeError("stdout is closed")

        return fail


def test_a_broken_log_sink_does_not_break_the_connection(make_conn, devserver, recorder):
    conn = make_conn(
        plaintext(devserver.address), logger=BrokenLogger(), auto_connect=False, **FAST
    )
    conn.add_listener(recorder)
    connect(conn, recorder)
    conn.reconnect()
    wait_for_generation(conn, 2)
    assert version(conn.channel())
    conn.close()  # does not raise the logger's error
    assert conn._threads() == []


def test_concurrent_close_calls_all_wait_for_the_shutdown(make_conn, devserver):
    conn = make_conn(plaintext(devserver.address), **FAST)
    conn.connect(timeout=10)
    leftovers: list[list[threading.Thread]] = []
    start = threading.Barrier(4)

    def close() -> None:
        start.wait(10)
        conn.close()
        leftovers.append(conn._threads())

    closers = [threading.Thread(target=close) for _ in range(4)]
    for closer in closers:
        closer.start()
    for closer in closers:
        closer.join(30)
    assert leftovers == [[], [], [], []]


def test_a_listener_cannot_wait_for_the_connection(make_conn, recorder):
    refusals = EventRecorder("refusals")

    def impatient(change: cc.StateChange) -> None:
        if change.new is S.CONNECTING:
            try:
                conn.connect()  # no timeout: it would wait for its own thread
            except cc.NotConnectedError as exc:
                refusals(exc)

    conn = make_conn(plaintext(f"127.0.0.1:{free_port()}"), auto_connect=False, **FAST)
    conn.add_listener(impatient)
    with pytest.raises(cc.ConnectTimeoutError):
        conn.connect(timeout=0.5)
    assert refusals.wait_for_count(1, 5)
    assert refusals.events[0].state is S.CONNECTING


def test_a_listener_added_late_gets_only_later_changes(make_conn, recorder):
    conn = make_conn(plaintext(f"127.0.0.1:{free_port()}"), auto_connect=False)
    core = conn._core
    with core.cond:
        core.transition(S.CONNECTING)  # queued, not yet delivered
    assert core.add_listener(recorder) is S.CONNECTING
    core.deliver()
    assert recorder.events == []  # the older change is not replayed to it
    conn.close()
    assert [(c.old, c.new) for c in recorder.events] == [(S.CONNECTING, S.CLOSED)]


def test_subscribe_reports_the_current_state_first_then_changes(make_conn, devserver):
    conn = make_conn(plaintext(devserver.address), auto_connect=False, **FAST)
    reports = EventRecorder("connectivity")
    conn.managed_channel.subscribe(reports)
    assert reports.events == [grpc.ChannelConnectivity.IDLE]
    conn.connect(timeout=10)
    assert reports.wait_for(lambda r: r[-1] is grpc.ChannelConnectivity.READY, 5)
    assert reports.events == [
        grpc.ChannelConnectivity.IDLE,
        grpc.ChannelConnectivity.CONNECTING,
        grpc.ChannelConnectivity.READY,
    ]
    conn.managed_channel.unsubscribe(reports)
    conn.close()
    assert reports.events[-1] is grpc.ChannelConnectivity.READY  # no report after unsubscribe


@pytest.mark.parametrize("collector", ["on", "disabled", "frozen"])
def test_a_connection_dropped_without_close_shuts_down(devserver, collector):
    """No reference cycle keeps a dropped connection alive: reference counting alone
    shuts it down, so it works with the cycle collector disabled or everything frozen
    (gunicorn --preload apps often do either)."""
    ledger = ChannelLedger()
    conn = cc.Connection(
        plaintext(devserver.address),
        connect_fun=ledger.connect,
        disconnect_fun=ledger.disconnect,
        **FAST,
    )
    conn.connect(timeout=10)
    version(conn.channel())
    core = conn._core
    thread = core.thread
    assert thread is not None
    label = conn._label
    was_enabled = gc.isenabled()
    try:
        if collector == "disabled":
            gc.disable()
        elif collector == "frozen":
            gc.freeze()
        del conn
        thread.join(10)
    finally:
        if collector == "frozen":
            gc.unfreeze()
        if was_enabled:
            gc.enable()
    assert not thread.is_alive()
    assert core.state is S.CLOSED
    assert ledger.open == {}
    assert [t.name for t in threading.enumerate() if t.name.endswith(f"[{label}]")] == []


def test_a_stub_alone_keeps_its_connection_alive(devserver):
    conn = cc.Connection(plaintext(devserver.address), **FAST)
    conn.connect(timeout=10)
    stub = host_pb2_grpc.ServerStub(conn.managed_channel)
    core = conn._core
    del conn
    gc.collect()
    assert core.state is S.CONNECTED
    assert stub.GetVersionInfo(empty_pb2.Empty(), timeout=5).Version
    thread = core.thread
    del stub
    gc.collect()
    assert thread is not None
    thread.join(10)
    assert core.state is S.CLOSED
