"""Tests of the etcd harness (``tests/harness/etcd.py``): a real etcd, a Go gRPC server
nobody on this project wrote, as a test peer. Everything goes through raw gRPC channels
(no chronicle_conn), so a failure here is the harness's or etcd's, not the manager's.

Skipped when etcd is missing, except under ``CI=true`` where that fails.
"""

from __future__ import annotations

import contextlib
import queue
import signal
import socket
import time
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc  # type: ignore[import-untyped]

from tests.harness.etcd import (
    BINARY_ENV,
    PUT,
    STATUS,
    WATCH,
    EtcdError,
    EtcdProcess,
    EtcdStartError,
    decode_fields,
    encode_put,
    encode_watch_create,
    find_etcd,
    require_etcd,
    status_version,
)

LOCAL_POOL = [("grpc.use_local_subchannel_pool", 1)]
SERVING = health_pb2.HealthCheckResponse.SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
STREAM_TIMEOUT = 10.0  # every stream's deadline: a test can block on one for no longer
ENDS_WITHIN = 5.0  # a dead peer must end an open stream well before that


@pytest.fixture
def channel(etcd: EtcdProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(etcd.address, options=LOCAL_POOL) as chan:
        yield chan


@pytest.fixture
def etcd_binary() -> str:
    return require_etcd()


class KvWatch:
    """etcd's bidi ``Watch`` stream on one key, driven with raw bytes: a call that stays
    in flight until the peer goes away."""

    def __init__(self, chan: grpc.Channel, key: bytes) -> None:
        self._requests: queue.Queue[bytes | None] = queue.Queue()
        self._requests.put(encode_watch_create(key))
        self.call = chan.stream_stream(WATCH)(self._request_iter(), timeout=STREAM_TIMEOUT)

    def _request_iter(self) -> Iterator[bytes]:
        while (request := self._requests.get()) is not None:
            yield request

    def next_response(self) -> dict[int, list[int | bytes]]:
        return decode_fields(next(self.call))

    def close(self) -> None:
        self._requests.put(None)
        self.call.cancel()


@contextlib.contextmanager
def kv_watch(chan: grpc.Channel, key: bytes) -> Iterator[KvWatch]:
    watch = KvWatch(chan, key)
    try:
        yield watch
    finally:
        watch.close()


def check(chan: grpc.Channel, service: str = "", **kwargs: object) -> int:
    stub = health_pb2_grpc.HealthStub(chan)
    request = health_pb2.HealthCheckRequest(service=service)
    return int(stub.Check(request, timeout=kwargs.pop("timeout", 5.0), **kwargs).status)


def open_health_watch(chan: grpc.Channel) -> Iterator[health_pb2.HealthCheckResponse]:
    """An open ``Health/Watch`` on service ``""`` whose first message (SERVING) is read."""
    stub = health_pb2_grpc.HealthStub(chan)
    watch = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=STREAM_TIMEOUT)
    assert next(watch).status == SERVING
    return watch


def stream_error(stream: Iterator[object]) -> tuple[grpc.RpcError, float]:
    """Read ``stream`` until it fails; the error and how long that took. Bounded by the
    stream's own deadline (``STREAM_TIMEOUT``)."""
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        for _ in stream:
            pass
    return info.value, time.monotonic() - started


# -- serving -------------------------------------------------------------------------------


def test_etcd_serves_health_serving_through_a_raw_channel(etcd, channel) -> None:
    assert etcd.running
    assert etcd.address == f"127.0.0.1:{etcd.port}"
    assert etcd.last_start_seconds is not None
    assert etcd.last_start_seconds < 15

    assert check(channel) == SERVING
    with pytest.raises(grpc.RpcError) as unknown:
        check(channel, "no.such.Service")
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND

    stub = health_pb2_grpc.HealthStub(channel)
    watch = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=STREAM_TIMEOUT)
    assert next(watch).status == SERVING
    watch.cancel()
    watch = stub.Watch(health_pb2.HealthCheckRequest(service="nope"), timeout=STREAM_TIMEOUT)
    assert next(watch).status == SERVICE_UNKNOWN
    watch.cancel()


def test_unknown_methods_are_unimplemented_and_status_answers_raw_bytes(etcd, channel) -> None:
    for method, details in [
        ("/no.such.Service/Call", "unknown service no.such.Service"),
        ("/etcdserverpb.Maintenance/NoSuchMethod", "unknown method NoSuchMethod"),
    ]:
        with pytest.raises(grpc.RpcError) as info:
            channel.unary_unary(method)(b"", timeout=5)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert details in (info.value.details() or "")

    response = channel.unary_unary(STATUS)(b"", timeout=5)  # StatusRequest{}: no fields
    version = status_version(response)
    assert version.startswith("3."), version

    with pytest.raises(grpc.RpcError) as garbage:
        channel.unary_unary(STATUS)(b"\xff\xff\xff", timeout=5)
    assert garbage.value.code() == grpc.StatusCode.INTERNAL


def test_raw_kv_watch_stays_open_and_sees_a_put(etcd, channel) -> None:
    with kv_watch(channel, b"chronicle/key") as watch:
        created = watch.next_response()
        assert created.get(3) == [1]  # WatchResponse.created
        channel.unary_unary(PUT)(encode_put(b"chronicle/key", b"v1"), timeout=5)
        update = watch.next_response()
        events = update.get(11, [])  # WatchResponse.events
        assert len(events) == 1
        event = decode_fields(events[0])  # type: ignore[arg-type]
        kv = decode_fields(event[2][0])  # type: ignore[arg-type]  # Event.kv
        assert (kv[1], kv[5]) == ([b"chronicle/key"], [b"v1"])  # KeyValue.key / .value


# -- faults --------------------------------------------------------------------------------


def test_sigkill_fails_an_open_health_watch_with_unavailable(etcd, channel) -> None:
    health_watch = open_health_watch(channel)
    with kv_watch(channel, b"k") as watch:
        watch.next_response()

        assert etcd.kill() == -signal.SIGKILL
        assert not etcd.running

        for stream in (health_watch, watch.call):
            error, took = stream_error(stream)
            assert error.code() == grpc.StatusCode.UNAVAILABLE, error
            assert took < ENDS_WITHIN
    with pytest.raises(grpc.RpcError) as new_call:
        check(channel)  # fail-fast: nothing listens any more
    assert new_call.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", etcd.port), timeout=1).close()


@pytest.mark.parametrize("keep_data", [False, True], ids=["fresh-data", "same-data"])
def test_restart_serves_again_on_the_same_port(etcd, channel, keep_data: bool) -> None:
    port, pid = etcd.port, etcd.pid
    assert check(channel) == SERVING
    etcd.kill()
    with pytest.raises(grpc.RpcError):
        check(channel)

    etcd.restart(keep_data=keep_data)
    assert (etcd.port, etcd.running, etcd.starts) == (port, True, 2)
    assert etcd.pid != pid
    # the very channel that saw the peer die reconnects to the new process
    assert check(channel, wait_for_ready=True) == SERVING
    assert status_version(channel.unary_unary(STATUS)(b"", timeout=5)).startswith("3.")


@pytest.mark.parametrize("etcd", [{"log_level": "info"}], indirect=True)
def test_terminate_is_graceful_but_does_not_drain_open_streams(etcd, channel) -> None:
    """SIGTERM runs etcd's shutdown (logged at info) and it exits by re-raising the
    signal. etcd 3.4 sends GOAWAY but then closes its connections at once, so an open
    stream ends UNAVAILABLE as after SIGKILL: a peer for "killed", not for "drained"."""
    health_watch = open_health_watch(channel)
    with kv_watch(channel, b"k") as watch:
        watch.next_response()

        started = time.monotonic()
        assert etcd.terminate(timeout=10) == -signal.SIGTERM
        assert time.monotonic() - started < ENDS_WITHIN

        for stream in (health_watch, watch.call):
            error, took = stream_error(stream)
            assert error.code() == grpc.StatusCode.UNAVAILABLE, error
            assert took < ENDS_WITHIN
    stderr = etcd.stderr_text(current_only=True)
    assert '"received signal; shutting down"' in stderr
    assert '"closed etcd server"' in stderr
    with pytest.raises(grpc.RpcError) as new_call:
        check(channel)
    assert new_call.value.code() == grpc.StatusCode.UNAVAILABLE

    etcd.restart()
    assert check(channel, wait_for_ready=True) == SERVING


# -- the harness itself --------------------------------------------------------------------


def test_a_busy_client_port_fails_with_etcds_stderr_then_restart_serves(etcd) -> None:
    etcd.kill()
    with socket.create_server(("127.0.0.1", etcd.port)):
        with pytest.raises(EtcdStartError, match="bind: address already in use"):
            etcd.restart(timeout=10, bind_retry=0.0)
        assert etcd.bind_failures == 1
    etcd.restart(timeout=10)
    assert etcd.running
    assert "address already in use" not in etcd.stderr_text(current_only=True)
    with grpc.insecure_channel(etcd.address, options=LOCAL_POOL) as chan:
        assert check(chan) == SERVING


def test_a_bad_flag_fails_the_start_quickly_with_the_command_line(etcd_binary) -> None:
    with EtcdProcess(binary=etcd_binary, extra_args=["--no-such-flag"]) as proc:
        started = time.monotonic()
        with pytest.raises(EtcdStartError) as info:
            proc.start(timeout=10)
        assert time.monotonic() - started < 5
    message = str(info.value)
    assert "flag provided but not defined: -no-such-flag" in message
    assert "--listen-client-urls=http://127.0.0.1:" in message


def test_etcd_variables_in_the_environment_do_not_reach_etcd(monkeypatch, etcd_binary) -> None:
    # etcd refuses to start when an ETCD_<FLAG> variable shadows a command-line flag
    monkeypatch.setenv("ETCD_NAME", "someone-else")
    monkeypatch.setenv("ETCD_LOG_LEVEL", "debug")
    with EtcdProcess(binary=etcd_binary) as proc:
        proc.start(timeout=10)
        assert '"level":"debug"' not in proc.stderr_text()


def test_close_is_idempotent_kills_cleans_up_and_keeps_stderr(etcd_binary) -> None:
    proc = EtcdProcess(binary=etcd_binary)
    proc.start(timeout=10)
    data_dir = proc.data_dir
    assert data_dir is not None
    assert data_dir.is_dir()
    stderr = proc.stderr_text()
    proc.close()
    proc.close()
    assert not proc.running
    assert proc.returncode == -signal.SIGKILL
    assert not data_dir.exists()
    assert proc.stderr_text() == stderr
    with pytest.raises(EtcdError, match="closed"):
        proc.start()


def test_missing_etcd_skips_locally_but_fails_under_ci(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv(BINARY_ENV, str(tmp_path / "no-etcd-here"))
    assert find_etcd() is None
    for ci in (None, "false", "1"):
        if ci is None:
            monkeypatch.delenv("CI", raising=False)
        else:
            monkeypatch.setenv("CI", ci)
        with pytest.raises(pytest.skip.Exception, match="apt-get install -y etcd-server"):
            require_etcd()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        require_etcd()
    with pytest.raises(EtcdError, match="etcd not found"):
        EtcdProcess()
