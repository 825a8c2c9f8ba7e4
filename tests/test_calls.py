"""Calls through the managed channel behave exactly as on a raw ``grpc.Channel``.

Every call kind, in every situation a user meets (connected; the server down, fail-fast
and ``wait_for_ready``; a server coming back while calls wait; across ``reconnect()``
and ``max_channel_age`` rotations under a steady stream of calls), is made on a raw
channel and on the managed channel side by side, against the same real server in a
child process, and the outcomes are compared. The server's execution log (which
survives its death) says how many times each call ran.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

import chronicle_conn as cc
from tests.harness.appserver import WorkStub, work_request, work_response
from tests.harness.recorder import EventRecorder
from tests.helpers import plaintext, wait_state

S = cc.ConnectionState
Code = grpc.StatusCode

FAST = {"reconnect_base_delay": 0.1, "reconnect_max_delay": 0.5, "keepalive_stale_after": 2.0}

#: name -> (is a "call object" kind that must never raise at the call site, how to call)
KINDS = ("uu", "uu.with_call", "uu.future", "us", "su", "su.with_call", "su.future", "ss")
OBJECT_KINDS = {"uu.future", "us", "su.future", "ss"}


def make_call(stub: WorkStub, kind: str, rid: str, **kwargs: Any) -> Any:
    """Start one call of ``kind``; return what the call site returned."""
    request = work_request(rid, count=2)
    if kind == "uu":
        return stub.unary(request, **kwargs)
    if kind == "uu.with_call":
        return stub.unary.with_call(request, **kwargs)
    if kind == "uu.future":
        return stub.unary.future(request, **kwargs)
    if kind == "us":
        return stub.server_stream(request, **kwargs)
    if kind == "su":
        return stub.client_stream(iter([request]), **kwargs)
    if kind == "su.with_call":
        return stub.client_stream.with_call(iter([request]), **kwargs)
    if kind == "su.future":
        return stub.client_stream.future(iter([request]), **kwargs)
    assert kind == "ss"
    return stub.bidi(iter([request]), **kwargs)


def outcome(stub: WorkStub, kind: str, rid: str, **kwargs: Any) -> tuple[Any, ...]:
    """Make a call and describe how it ended, the way a user's code sees it."""
    try:
        returned = make_call(stub, kind, rid, **kwargs)
    except grpc.RpcError as error:
        if kind in OBJECT_KINDS:
            return ("raised at the call site", error.code())  # never right
        if not isinstance(error, grpc.Call):
            return ("raised an RpcError that is not a grpc.Call", error.code())
        return ("error", error.code())
    if kind in ("uu", "su"):
        return ("ok", work_response(returned)["id"])
    if kind in ("uu.with_call", "su.with_call"):
        response, call = returned
        return ("ok", work_response(response)["id"], call.code())
    assert isinstance(returned, grpc.Call), type(returned)
    assert isinstance(returned, grpc.Future), type(returned)
    try:
        if kind.endswith("future"):
            return ("ok", work_response(returned.result())["id"])
        return ("ok", [work_response(item)["seq"] for item in returned])
    except grpc.RpcError as error:
        if kind.endswith("future") and (returned.exception() is None or returned.cancelled()):
            return ("a failed future that says otherwise", error.code())
        if returned.code() is not error.code():
            return ("a call object that disagrees with its error", error.code())
        return ("error", error.code())


def compare(raw: WorkStub, managed: WorkStub, label: str, **kwargs: Any) -> dict[str, Any]:
    """Every kind on both; assert the outcomes match (ids aside); return ours."""
    ours = {}
    for kind in KINDS:
        theirs = outcome(raw, kind, f"{label}-{kind}-raw", **kwargs)
        mine = outcome(managed, kind, f"{label}-{kind}-ours", **kwargs)
        assert _without_ids(mine) == _without_ids(theirs), (kind, label, mine, theirs)
        ours[kind] = mine
    return ours


def _without_ids(result: tuple[Any, ...]) -> tuple[Any, ...]:
    if result[0] == "ok" and isinstance(result[1], str):
        return (result[0], *result[2:])
    return result


class PassThrough(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """An interceptor that only passes calls on (what a tracing interceptor does)."""

    def __init__(self) -> None:
        self.seen = 0

    def _pass(self, continuation, details, request):
        self.seen += 1
        return continuation(details, request)

    intercept_unary_unary = _pass
    intercept_unary_stream = _pass
    intercept_stream_unary = _pass
    intercept_stream_stream = _pass


@pytest.fixture
def conns() -> Iterator[Callable[..., cc.Connection]]:
    made: list[cc.Connection] = []

    def make(*args: Any, **kwargs: Any) -> cc.Connection:
        conn = cc.Connection(*args, **kwargs)
        made.append(conn)
        return conn

    yield make
    for conn in made:
        conn.close()
    for conn in made:
        assert conn._threads() == []


# ---------------------------------------------------------------------------- the matrix


@pytest.mark.timeout(120)
@pytest.mark.parametrize("flavor", ["kernel", "plain"])
@pytest.mark.parametrize("intercepted", [False, True], ids=["bare", "intercept_channel"])
def test_every_call_kind_matches_a_raw_channel(app_server_factory, conns, flavor, intercepted):
    server = app_server_factory(flavor)
    conn = conns(plaintext(server.address), retry_attempts=None, **FAST)
    conn.connect(timeout=15)
    raw_channel = grpc.insecure_channel(server.address)
    channel: grpc.Channel = conn.managed_channel
    interceptor = PassThrough()
    if intercepted:
        channel = grpc.intercept_channel(channel, interceptor)
        raw_channel = grpc.intercept_channel(raw_channel, PassThrough())
    raw, managed = WorkStub(raw_channel), WorkStub(channel)
    try:
        # Connected: every kind succeeds, on both.
        results = compare(raw, managed, "up", timeout=10)
        assert all(r[0] == "ok" for r in results.values()), results

        # Down, fail-fast: every kind fails with UNAVAILABLE through its call object.
        server.kill()
        wait_state(conn, S.RECONNECTING)
        results = compare(raw, managed, "down", timeout=5)
        assert set(results.values()) == {("error", Code.UNAVAILABLE)}

        # Down, wait_for_ready with a short deadline: DEADLINE_EXCEEDED.
        results = compare(raw, managed, "late", timeout=0.3, wait_for_ready=True)
        assert set(results.values()) == {("error", Code.DEADLINE_EXCEEDED)}

        # Down, wait_for_ready: the calls wait, the server comes back, they all succeed.
        outcomes: dict[str, tuple[Any, ...]] = {}
        lock = threading.Lock()

        def run(stub: WorkStub, kind: str, rid: str) -> None:
            result = outcome(stub, kind, rid, timeout=30, wait_for_ready=True)
            with lock:
                outcomes[rid] = result

        waiting = [
            threading.Thread(target=run, args=(stub, kind, f"back-{kind}-{side}"))
            for kind in KINDS
            for side, stub in (("raw", raw), ("ours", managed))
        ]
        for thread in waiting:
            thread.start()
        assert conn.state is not S.CONNECTED
        server.restart()
        for thread in waiting:
            thread.join(40)
        assert len(outcomes) == 2 * len(KINDS)
        assert all(r[0] == "ok" for r in outcomes.values()), outcomes
    finally:
        raw_channel.close()
    if intercepted:
        assert interceptor.seen >= 4 * len(KINDS)
    # Each call ran on the server exactly as often as it succeeded: once.
    ran = server.log.executions()
    assert {rid: n for rid, n in ran.items() if n != 1} == {}
    assert set(outcomes) <= set(ran)


def test_after_close_every_call_kind_fails_cancelled(app_server_factory, conns):
    server = app_server_factory("plain")
    conn = conns(plaintext(server.address), **FAST)
    conn.connect(timeout=15)
    managed = WorkStub(conn.managed_channel)
    conn.close()
    for wait in (None, True):
        for kind in KINDS:
            result = outcome(managed, kind, f"closed-{kind}", timeout=5, wait_for_ready=wait)
            assert result == ("error", Code.CANCELLED), (kind, result)
    assert server.log.executions() == {}


def test_a_closed_call_object_is_an_error_not_a_cancellation(app_server_factory, conns):
    """gRPC's rule: only the application's cancel() makes cancelled() true."""
    server = app_server_factory("plain")
    conn = conns(plaintext(server.address), retry_attempts=None, **FAST)
    conn.connect(timeout=15)
    managed = WorkStub(conn.managed_channel)
    server.kill()
    wait_state(conn, S.RECONNECTING)
    pending = managed.unary.future(work_request("p"), timeout=30, wait_for_ready=True)
    mine = managed.unary.future(work_request("q"), timeout=30, wait_for_ready=True)
    assert not pending.done()
    assert mine.cancel()
    assert mine.cancelled()
    with pytest.raises(grpc.FutureCancelledError):
        mine.result()
    conn.close()
    assert pending.code() is Code.CANCELLED
    assert not pending.cancelled()
    assert isinstance(pending.exception(), grpc.RpcError)
    with pytest.raises(grpc.RpcError):
        pending.result()


# ---------------------------------------------------------------------------- generations


def _steady_stream(
    managed: WorkStub, threads: int, seconds: float, while_running: Callable[[], None]
) -> tuple[list[tuple[str, Any]], list[str]]:
    """``threads`` threads cycle through every call kind (fail-fast, 5 s deadline,
    slowish server work) until ``seconds`` pass; ``while_running`` runs meanwhile.
    Returns (the failures, every request id made)."""
    stop = threading.Event()
    failures: list[tuple[str, Any]] = []
    made: list[str] = []
    lock = threading.Lock()

    def work(index: int) -> None:
        for n in itertools.count():
            if stop.is_set() or n >= 10_000:
                return
            kind = KINDS[(index + n) % len(KINDS)]
            rid = f"s{index}-{n}-{kind}"
            with lock:
                made.append(rid)
            try:
                result = outcome(managed, kind, rid, timeout=5)
            except Exception as exc:  # anything else than an RpcError: a defect
                result = ("exception", repr(exc))
            if result[0] != "ok":
                with lock:
                    failures.append((rid, result))

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    started = time.monotonic()
    try:
        while_running()
        threading.Event().wait(max(0.0, seconds - (time.monotonic() - started)))
    finally:
        stop.set()
        for worker in workers:
            worker.join(30)
    return failures, made


@pytest.mark.timeout(120)
@pytest.mark.parametrize("flavor", ["kernel", "plain"])
def test_rotation_and_reconnect_under_a_steady_stream_lose_no_call(
    app_server_factory, conns, flavor
):
    server = app_server_factory(flavor)
    conn = conns(plaintext(server.address), max_channel_age=0.4, **FAST)
    recorder = EventRecorder("changes")
    conn.connect(timeout=15)
    conn.add_listener(recorder)
    managed = WorkStub(conn.managed_channel)

    def reconnect_now_and_then() -> None:
        for _ in range(10):
            conn.reconnect()
            threading.Event().wait(0.15)

    failures, made = _steady_stream(managed, 6, 4.0, reconnect_now_and_then)
    assert failures == []  # no CANCELLED, no UNAVAILABLE, no ValueError: nothing at all
    assert conn.stats().generation >= 8
    assert recorder.events == []  # rotations and reconnects never leave CONNECTED
    assert server.log.wait_for(lambda snap: not snap.unfinished(), 10)
    ran = server.log.executions()
    assert {rid: n for rid, n in ran.items() if n != 1} == {}
    assert set(made) == set(ran)


@pytest.mark.timeout(120)
def test_a_replaced_channel_is_never_called_after_it_closed(app_server_factory, conns):
    """drain_timeout=0: every replaced channel is closed at once, calls in flight or not.
    Those calls end with UNAVAILABLE; a call never meets a closed channel (no
    ``ValueError: Cannot invoke RPC on closed channel!``) and never ends CANCELLED."""
    server = app_server_factory("plain")
    conn = conns(plaintext(server.address), drain_timeout=0.0, **FAST)
    conn.connect(timeout=15)
    managed = WorkStub(conn.managed_channel)

    def reconnect_often() -> None:
        for _ in range(30):
            conn.reconnect()
            threading.Event().wait(0.05)

    failures, _ = _steady_stream(managed, 8, 3.0, reconnect_often)
    kinds = {result for _, result in failures}
    assert kinds <= {("error", Code.UNAVAILABLE)}, kinds


# ---------------------------------------------------------------------------- regressions


def test_a_subscribe_callback_may_close_the_connection(app_server_factory):
    server = app_server_factory("plain")
    conn = cc.Connection(plaintext(server.address), auto_connect=False, **FAST)
    reports = EventRecorder("reports")

    def callback(connectivity: grpc.ChannelConnectivity) -> None:
        reports(connectivity)
        if connectivity is grpc.ChannelConnectivity.IDLE:
            conn.close()

    done = threading.Event()
    subscriber = threading.Thread(
        target=lambda: (conn.managed_channel.subscribe(callback), done.set())
    )
    subscriber.start()
    assert done.wait(10), "subscribe() deadlocked"
    assert reports.events == [grpc.ChannelConnectivity.IDLE, grpc.ChannelConnectivity.SHUTDOWN]
    assert conn.state is S.CLOSED


def test_close_inside_a_listener_takes_the_channel_away_at_once(app_server_factory):
    server = app_server_factory("plain")
    conn = cc.Connection(plaintext(server.address), auto_connect=False, **FAST)
    seen: list[tuple[bool, str]] = []

    def listener(change: cc.StateChange) -> None:
        if change.new is S.CONNECTED:
            conn.close()
            try:
                conn.channel()
                seen.append((conn.connected, "channel() returned"))
            except cc.ConnectionClosedError:
                seen.append((conn.connected, "closed"))

    conn.add_listener(listener)
    # connect() may return before the listener runs, or see it close the connection.
    with contextlib.suppress(cc.ConnectionClosedError):
        conn.connect(timeout=15)
    thread = conn._core.thread
    assert thread is not None
    thread.join(10)
    assert seen == [(False, "closed")]


def test_a_dropped_pending_call_does_not_keep_the_connection_alive(app_server_factory):
    server = app_server_factory("plain")
    server.kill()
    conn = cc.Connection(plaintext(server.address), retry_attempts=None, **FAST)
    managed = WorkStub(conn.managed_channel)
    pending = managed.unary.future(work_request("dropped"), timeout=60, wait_for_ready=True)
    ready = grpc.channel_ready_future(conn.managed_channel)
    with pytest.raises(grpc.FutureTimeoutError):
        ready.result(timeout=0.2)  # grpc's idiom, timed out and never unsubscribed
    assert not pending.done()
    core = conn._core
    thread = core.thread
    assert thread is not None
    del conn, managed, pending, ready
    gc.collect()
    thread.join(10)
    assert not thread.is_alive()
    assert core.state is S.CLOSED


def _health_server(statuses: dict[str, int]) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    servicer = health.HealthServicer()
    for service, status in statuses.items():
        servicer.set(service, status)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    echo = grpc.method_handlers_generic_handler(
        "test.Echo", {"Say": grpc.unary_unary_rpc_method_handler(lambda r, c: r)}
    )
    server.add_generic_rpc_handlers((echo,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def test_auto_falls_back_when_health_has_no_status_for_the_whole_server(conns):
    """A health service that knows only named services answers Watch("") with
    SERVICE_UNKNOWN: that is "no whole-server health", not "down". (grpcio's servicer
    reports "" as SERVING unless told otherwise; this one is told.)"""
    server, port = _health_server(
        {
            "": health_pb2.HealthCheckResponse.SERVICE_UNKNOWN,
            "my.Service": health_pb2.HealthCheckResponse.SERVING,
        }
    )
    try:
        conn = conns(plaintext(f"127.0.0.1:{port}"), retry_attempts=2, **FAST)
        conn.connect(timeout=15)
        assert conn.stats().liveness == "transport"
        assert conn.channel().unary_unary("/test.Echo/Say")(b"hi", timeout=5) == b"hi"
        explicit = conns(
            plaintext(f"127.0.0.1:{port}"), liveness="health", retry_attempts=0, **FAST
        )
        with pytest.raises(cc.RetriesExhaustedError, match="SERVICE_UNKNOWN"):
            explicit.connect(timeout=15)
    finally:
        server.stop(0)


class WaitingInterceptor(grpc.UnaryUnaryClientInterceptor):
    """Waits for each call's outcome before returning it, as logging and retry
    interceptors do: a queued call's future is then already done when it is sent."""

    def intercept_unary_unary(self, continuation, details, request):
        outcome = continuation(details, request)
        outcome.exception()
        return outcome


def test_a_raising_done_callback_on_a_queued_call_breaks_nothing(app_server_factory, conns):
    server = app_server_factory("plain")
    server.kill()

    def connect_fun(target, options):
        return grpc.intercept_channel(
            grpc.insecure_channel(target, options=options), WaitingInterceptor()
        )

    conn = conns(plaintext(server.address), connect_fun=connect_fun, retry_attempts=None, **FAST)
    managed = WorkStub(conn.managed_channel)
    ran_on: list[str] = []

    def raising(_future: Any) -> None:
        ran_on.append(threading.current_thread().name)
        raise RuntimeError("the application's callback fails")

    first = managed.unary.future(work_request("first"), timeout=20, wait_for_ready=True)
    first.add_done_callback(raising)
    rest = [
        managed.unary.future(work_request(f"then-{i}"), timeout=20, wait_for_ready=True)
        for i in range(3)
    ]
    server.restart()
    assert first.exception(timeout=20) is None
    assert [call.exception(timeout=20) for call in rest] == [None, None, None]
    assert ran_on  # it did run, and what it raised went nowhere
    assert conn.stats().disconnects == 0  # the fresh channel was not thrown away


def test_a_pending_call_cancelled_while_being_sent_is_cancelled():
    """cancel() in the moment send() issues the call: the real call is cancelled."""
    from chronicle_conn._calls import CallError
    from chronicle_conn._generation import Generation

    class Real:
        cancelled_ = False

        def cancel(self) -> bool:
            self.cancelled_ = True
            return True

        def add_done_callback(self, fn: Any) -> None:
            return None

    real = Real()
    answers: list[bool] = []

    def issue(gen: Any, timeout: Any) -> Real:
        canceller = threading.Thread(target=lambda: answers.append(pending.cancel()))
        canceller.start()
        canceller.join(10)
        return real

    pending = CallError(issue=issue, deadline=None)
    gen = Generation(1, None, None, on_drained=lambda: None, on_suspect=lambda g, r: None)  # type: ignore[arg-type]
    assert gen.enter(True)
    assert pending.send(gen)
    assert answers == [True]
    assert real.cancelled_
