"""Recovery and robustness of a connection against real servers.

Demand-driven reconnects (fail-fast calls and ``channel()`` count as demand; an idle
connection keeps to the exponential schedule), supervision that survives whatever a
listener or a log sink raises and restarts after the supervisor thread died anyway,
``close()``, the threads an idle connection costs, silent partitions in every liveness
mode, NOT_SERVING, graceful server stops, etcd as a peer nobody here wrote, and
``reconnect()`` with calls in flight.

Servers are child processes (the dev kernel, the work app servers, etcd) listening on
127.0.0.1, except where a test needs to control a ``grpc.server`` in ways the harness
does not offer (a graceful stop without NOT_SERVING). State is observed through
listeners, ``EventRecorder`` and the connection's Condition; every loop is bounded.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc
import pytest
from google.protobuf import empty_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc  # type: ignore[import-untyped]

import chronicle_conn as cc
from chronicle_conn._proto import host_pb2_grpc
from tests.harness.appserver import WorkStub, work_request, work_response
from tests.harness.etcd import STATUS, status_version
from tests.harness.recorder import EventRecorder
from tests.helpers import became, check_history, connect, plaintext, version

S = cc.ConnectionState
Code = grpc.StatusCode

pytestmark = pytest.mark.timeout(60)

FAST = {
    "reconnect_base_delay": 0.1,
    "reconnect_max_delay": 0.5,
    "attempt_timeout": 3.0,
    "keepalive_stale_after": 1.5,
}


# ---------------------------------------------------------------------------- helpers


def wait_until(conn: cc.Connection, predicate: Callable[[], bool], timeout: float) -> bool:
    """Wait on the connection's Condition (notified on every change of its state) until
    ``predicate()`` holds, re-checking at least every 50 ms for what is not notified.
    ``predicate`` runs with the connection's lock held: it must not take it again."""
    core = conn._core
    deadline = time.monotonic() + timeout
    with core.cond:
        for _ in range(int(timeout / 0.05) + 2):
            remaining = deadline - time.monotonic()
            if core.cond.wait_for(predicate, max(0.0, min(0.05, remaining))):
                return True
            if remaining <= 0:
                break
    return False


def wait_closed(channel: grpc.Channel, timeout: float) -> bool:
    """Wait (bounded) until a raw grpc channel is closed: an RPC on it raises
    ``ValueError`` (an open one answers ``UNIMPLEMENTED`` or fails)."""
    pause = threading.Event()  # never set: a closing channel sends no event to wait on
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / 0.05) + 1):
        try:
            nothing: Any = channel.unary_unary("/chronicle.test.Nothing/Here")
            nothing(b"", timeout=1)
        except ValueError:
            return True
        except grpc.RpcError:
            pass
        if time.monotonic() >= deadline:
            break
        pause.wait(0.05)
    return False


class Caller:
    """Calls ``use()`` on a thread of its own every ``interval`` seconds, recording
    ``(time.monotonic() after the call, what use() returned)`` in ``outcomes``, until
    ``stop()``; bounded by ``limit`` seconds and ``max_calls`` calls. ``use`` returns
    a description of the outcome and must not raise; if it does, the exception is
    recorded as the outcome."""

    def __init__(
        self,
        use: Callable[[], object],
        *,
        interval: float = 0.02,
        limit: float = 40.0,
        max_calls: int = 2000,
    ) -> None:
        self.outcomes = EventRecorder("calls")
        self._use = use
        self._interval = interval
        self._limit = limit
        self._max_calls = max_calls
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="test-caller", daemon=True)

    def start(self) -> Caller:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        assert not self._thread.is_alive()

    def _run(self) -> None:
        deadline = time.monotonic() + self._limit
        for _ in range(self._max_calls):
            if self._stop.is_set() or time.monotonic() > deadline:
                return
            try:
                outcome = self._use()
            except BaseException as exc:
                outcome = exc
            self.outcomes((time.monotonic(), outcome))
            self._stop.wait(self._interval)

    def first(self, predicate: Callable[[object], bool], after: float, timeout: float) -> float:
        """When the first outcome matching ``predicate`` recorded after ``after`` came."""
        at, _ = self.outcomes.wait_for_event(
            lambda event: event[0] >= after and predicate(event[1]), timeout
        )
        return float(at)

    def between(self, start: float, end: float) -> list[object]:
        return [outcome for at, outcome in self.outcomes.events if start <= at < end]


def rpc_outcome(call: Callable[[], object]) -> Callable[[], object]:
    """``use`` for a :class:`Caller`: OK, or the status code the call failed with."""

    def use() -> object:
        try:
            call()
        except grpc.RpcError as error:
            return error.code()
        return Code.OK

    return use


# ---------------------------------------------------------------------------- demand


@pytest.mark.timing
def test_fail_fast_traffic_is_demand(make_conn, kernel, recorder):
    """A busy app whose only traffic is fail-fast calls recovers within the demand
    cadence, not the exponential schedule; an idle connection in the same outage stays on
    the exponential schedule."""
    busy = make_conn(plaintext(kernel.address), retry_attempts=None, auto_connect=False)
    idle = make_conn(plaintext(kernel.address), retry_attempts=None, auto_connect=False)
    idle_changes = EventRecorder("idle")
    busy.add_listener(recorder)
    idle.add_listener(idle_changes)
    mark = connect(busy, recorder)
    idle_mark = connect(idle, idle_changes)
    stub = host_pb2_grpc.ServerStub(busy.managed_channel)
    caller = Caller(rpc_outcome(lambda: stub.GetVersionInfo(empty_pb2.Empty(), timeout=1)))
    caller.start()
    try:
        caller.first(lambda outcome: outcome is Code.OK, 0, 10)
        busy_before, idle_before = busy.stats().attempts, idle.stats().attempts

        killed_at = time.monotonic()
        kernel.kill()
        dead_at = time.monotonic()
        recorder.wait_for_event(became(S.RECONNECTING), 10, since=mark)
        idle_changes.wait_for_event(became(S.RECONNECTING), 10, since=idle_mark)

        def calling_until(moment: float) -> bool:
            return caller.outcomes.wait_for(
                lambda events: bool(events) and events[-1][0] >= moment, 15
            )

        # The control, 3 s into the outage: the idle connection keeps to the exponential
        # schedule (1, 2, 4, 8 s, jitter 10 %: attempts at about 0, 1 and 3 s).
        assert calling_until(killed_at + 3.0)
        idle_early = idle.stats().attempts - idle_before
        early = time.monotonic() - killed_at
        # The kernel takes about a second to restart. Restarted 7.5 s into the outage,
        # after the schedule's attempt at about 7 s and long before the next (13.5 s at
        # the earliest), it is in use soon only if the failing calls count as demand.
        assert calling_until(killed_at + 7.5)
        kernel.restart()
        restarted_at = time.monotonic()
        outage = restarted_at - killed_at
        busy_attempts = busy.stats().attempts - busy_before
        idle_attempts = idle.stats().attempts - idle_before

        recovered_at = caller.first(lambda outcome: outcome is Code.OK, restarted_at, 15)
    finally:
        caller.stop()
    during = caller.between(dead_at + 0.05, restarted_at)
    assert during, "no call was made during the outage"
    assert set(during) == {Code.UNAVAILABLE}, set(during)
    recovery = recovered_at - restarted_at
    stats = busy.stats()
    assert recovery < 2.0, (
        f"first successful call {recovery:.2f}s after the restart; {busy_attempts} attempts "
        f"in the {outage:.1f}s outage; {stats}"
    )
    assert busy_attempts <= 12 * outage + 1, f"{busy_attempts} attempts in {outage:.1f}s"
    assert idle_early <= 4, f"idle connection: {idle_early} attempts in {early:.1f}s"
    assert idle_attempts <= 5, f"idle connection: {idle_attempts} attempts in {outage:.1f}s"
    check_history(recorder)


@pytest.mark.timing
def test_channel_while_not_connected_is_demand(make_conn, kernel, recorder):
    """``channel()`` raising NotConnectedError is demand: the connection recovers within
    the demand cadence, long before its exponential schedule's next attempt (8 s)."""
    conn = make_conn(
        plaintext(kernel.address),
        retry_attempts=None,
        reconnect_base_delay=8.0,
        reconnect_max_delay=10.0,
        auto_connect=False,
    )
    conn.add_listener(recorder)
    mark = connect(conn, recorder)
    failed_before = conn.stats().failed_attempts
    kernel.kill()
    recorder.wait_for_event(became(S.RECONNECTING), 10, since=mark)
    # The first attempt after the loss fails at once; the schedule's next is 8 s later.
    assert wait_until(conn, lambda: conn._core.counters.failed_attempts > failed_before, 10)

    def use_channel() -> object:
        try:
            channel = conn.channel()
        except cc.ConnectionClosedError:
            return "closed"
        except cc.NotConnectedError as exc:
            return exc.state
        assert channel is conn.managed_channel
        return "ok"

    caller = Caller(use_channel).start()
    try:
        kernel.restart()
        restarted_at = time.monotonic()
        recovered_at = caller.first(lambda outcome: outcome == "ok", restarted_at, 15)
    finally:
        caller.stop()
    refused = caller.between(0, restarted_at)
    assert refused, "channel() was not called while the kernel was down"
    assert set(refused) == {S.RECONNECTING}, set(refused)
    recovery = recovered_at - restarted_at
    assert recovery < 2.0, f"channel() worked {recovery:.2f}s after the restart; {conn.stats()}"
    assert version(conn.channel())
    check_history(recorder)


# ---------------------------------------------------------------------------- supervision


class RaisingLogger:
    """A structlog-like logger whose every method raises ``SystemExit``."""

    def __init__(self) -> None:
        self.raised = 0
        self._lock = threading.Lock()

    def bind(self, **context: object) -> RaisingLogger:
        return self

    def __getattr__(self, name: str) -> Callable[..., None]:
        def fail(*args: object, **kwargs: object) -> None:
            with self._lock:
                self.raised += 1
            raise SystemExit(f"log sink gone ({name})")

        return fail


@pytest.mark.parametrize(
    "culprit", ["listener-SystemExit", "listener-KeyboardInterrupt", "logger-SystemExit"]
)
def test_what_a_listener_or_log_sink_raises_does_not_end_supervision(
    make_conn, kernel, recorder, culprit
):
    raised = EventRecorder("raised")
    options: dict[str, Any] = {}
    logger = RaisingLogger()
    if culprit == "logger-SystemExit":
        options["logger"] = logger

    def exiting(change: cc.StateChange) -> None:
        raised(change)
        raise SystemExit(2)

    def interrupting(change: cc.StateChange) -> None:
        # From the supervisor thread only: on the main thread (close() delivers CLOSED
        # there) a KeyboardInterrupt is the user's Ctrl-C, and is meant to propagate.
        if threading.current_thread() is not threading.main_thread():
            raised(change)
            raise KeyboardInterrupt

    conn = make_conn(
        plaintext(kernel.address), retry_attempts=None, auto_connect=False, **FAST, **options
    )
    if culprit == "listener-SystemExit":
        conn.add_listener(exiting)
    elif culprit == "listener-KeyboardInterrupt":
        conn.add_listener(interrupting)
    conn.add_listener(recorder)  # after the culprit: it must still be told of everything
    mark = connect(conn, recorder)
    thread = conn._core.thread
    assert thread is not None
    assert thread.is_alive()
    if culprit.startswith("listener"):
        assert raised.wait_for_count(2, 5)  # CONNECTING and CONNECTED
    else:
        assert logger.raised >= 2

    kernel.kill()
    recorder.wait_for_event(became(S.RECONNECTING), 10, since=mark)
    kernel.restart()
    recorder.wait_for_event(became(S.CONNECTED), 20, since=mark)
    assert conn._core.thread is thread, "the supervisor thread was replaced"
    assert thread.is_alive()
    assert version(conn.channel())
    assert [c.new for c in recorder.events] == [
        S.CONNECTING,
        S.CONNECTED,
        S.RECONNECTING,
        S.CONNECTED,
    ]
    check_history(recorder)
    if culprit.startswith("listener"):
        assert raised.wait_for_count(4, 5)  # it was called for every change, and raised


def die_once(monkeypatch: Any, supervisor: Any, method: str) -> list[object]:
    """Make the supervisor thread die (a BaseException) the next time it runs
    ``method``; later calls run it as usual. Returns the record of the death."""
    original = getattr(supervisor, method)
    crashes: list[object] = []

    def crash_once(*args: Any) -> Any:
        if not crashes:
            crashes.append(args)
            raise BaseException("simulated death of the supervisor thread")
        return original(*args)

    monkeypatch.setattr(supervisor, method, crash_once)
    return crashes


@pytest.mark.parametrize(
    "next_use", ["connect", "wait_for_ready", "wait_for_ready_future", "fail_fast", "channel"]
)
def test_a_dead_supervisor_is_restarted_by_the_next_use(
    make_conn, kernel, recorder, monkeypatch, next_use
):
    conn = make_conn(plaintext(kernel.address), retry_attempts=None, auto_connect=False, **FAST)
    conn.add_listener(recorder)
    mark = connect(conn, recorder)
    stub = host_pb2_grpc.ServerStub(conn.managed_channel)
    assert stub.GetVersionInfo(empty_pb2.Empty(), timeout=5).Version
    crashes = die_once(monkeypatch, conn._supervisor, "_serve")
    first_thread = conn._core.thread
    assert first_thread is not None
    generation = conn.stats().generation
    # reconnect() makes the loop serve the replacement: that _serve dies.
    conn.reconnect()
    first_thread.join(10)
    assert not first_thread.is_alive()
    assert crashes
    assert conn.stats().generation == generation + 1
    # Once the thread is gone, nothing claims a channel.
    assert not conn.connected
    assert conn.state is not S.CONNECTED
    assert conn._core.current is None
    lost = recorder.wait_for_event(became(S.RECONNECTING), 5, since=mark)
    assert "supervisor" in (lost.error or "")
    assert conn._core.thread is None or not conn._core.thread.is_alive()

    if next_use == "connect":
        conn.connect(timeout=10)
    elif next_use == "wait_for_ready":
        assert stub.GetVersionInfo(empty_pb2.Empty(), timeout=10, wait_for_ready=True).Version
    elif next_use == "wait_for_ready_future":
        call = stub.GetVersionInfo.future(empty_pb2.Empty(), timeout=10, wait_for_ready=True)
        assert call.result(timeout=15).Version
    elif next_use == "fail_fast":
        caller = Caller(rpc_outcome(lambda: stub.GetVersionInfo(empty_pb2.Empty(), timeout=2)))
        caller.start()
        try:
            caller.first(lambda outcome: outcome is Code.OK, 0, 10)
        finally:
            caller.stop()
        assert caller.outcomes.events[0][1] is Code.UNAVAILABLE
    else:
        with pytest.raises(cc.NotConnectedError) as info:
            conn.channel()
        assert info.value.state is S.RECONNECTING
        assert wait_until(conn, lambda: conn.connected, 10), conn.stats()
        assert conn.channel() is conn.managed_channel
    recorder.wait_for_event(became(S.CONNECTED), 10, since=mark)
    second_thread = conn._core.thread
    assert second_thread is not None
    assert second_thread is not first_thread
    assert second_thread.is_alive()
    assert conn.connected
    assert stub.GetVersionInfo(empty_pb2.Empty(), timeout=5).Version
    assert [c.new for c in recorder.events] == [
        S.CONNECTING,
        S.CONNECTED,
        S.RECONNECTING,
        S.CONNECTED,
    ]
    check_history(recorder)


@pytest.mark.parametrize("waiting", ["connect", "wait_for_ready_future"])
def test_a_dead_supervisor_is_restarted_for_callers_already_waiting(
    make_conn, kernel, recorder, monkeypatch, waiting
):
    """The supervisor dies during an outage while a caller already waits for the
    connection: a thread in ``connect()``, or a ``wait_for_ready`` future (queued until
    a channel is up). Both are demand; once the server is back, the wait must end with
    the connection, not at the caller's deadline."""
    conn = make_conn(plaintext(kernel.address), retry_attempts=None, auto_connect=False, **FAST)
    conn.add_listener(recorder)
    mark = connect(conn, recorder)
    stub = host_pb2_grpc.ServerStub(conn.managed_channel)
    kernel.kill()
    recorder.wait_for_event(became(S.RECONNECTING), 10, since=mark)
    core = conn._core
    outcome = EventRecorder("connect()")
    waiter: threading.Thread | None = None
    call: Any = None
    if waiting == "connect":

        def wait() -> None:
            try:
                conn.connect(timeout=20)
            except Exception as exc:
                outcome(exc)
            else:
                outcome("connected")

        waiter = threading.Thread(target=wait, name="test-waiter", daemon=True)
        waiter.start()
        assert wait_until(conn, lambda: core.waiters == 1, 5)
    else:
        call = stub.GetVersionInfo.future(empty_pb2.Empty(), timeout=10, wait_for_ready=True)
        assert wait_until(conn, lambda: len(core.deferred) == 1, 5)

    first_thread = core.thread
    assert first_thread is not None
    crashes = die_once(monkeypatch, conn._supervisor, "_backoff")  # after the next failed attempt
    first_thread.join(10)
    assert not first_thread.is_alive()
    assert crashes
    assert not conn.connected
    kernel.restart()

    if waiting == "connect":
        assert outcome.wait_for_count(1, 20)
        assert outcome.events == ["connected"], outcome.events
        assert waiter is not None
        waiter.join(5)
    else:
        error: Any = call.exception(timeout=15)
        assert error is None, (
            f"the waiting wait_for_ready call ended {error.code().name} "
            f"({error.details()}) although the kernel was back; supervisor thread "
            f"{core.thread}, state {conn.state.value}"
        )
        assert call.result().Version
    recorder.wait_for_event(became(S.CONNECTED), 10, since=mark)
    assert core.thread is not None
    assert core.thread is not first_thread
    assert core.thread.is_alive()
    check_history(recorder)


# ---------------------------------------------------------------------------- close


@pytest.mark.timing
@pytest.mark.parametrize("mode", ["keepalive", "health", "transport"])
def test_close_of_a_connected_connection_is_quick_and_leaves_no_thread(
    make_conn, kernel_factory, app_server_factory, mode
):
    address, call = work_server(mode, kernel_factory, app_server_factory)
    threads_before = threading.active_count()
    conns = [
        make_conn(plaintext(address), liveness=mode, auto_connect=False, **FAST) for _ in range(21)
    ]
    for conn in conns:
        conn.connect(timeout=10)
        assert conn._threads()
    assert call(conns[0].channel())
    started = time.monotonic()
    conns[0].close()
    took = time.monotonic() - started
    assert conns[0]._threads() == []
    assert took < 0.5, f"close() took {took:.3f}s"

    started = time.monotonic()
    for conn in conns[1:]:
        conn.close()
        assert conn._threads() == []
    took = time.monotonic() - started
    assert took < 5.0, f"closing 20 connections took {took:.2f}s"
    # grpc's own Python threads of those channels (a channel's spin thread) end too.
    pause = threading.Event()  # never set: grpc's threads end on their own
    for _ in range(100):
        if threading.active_count() <= threads_before:
            break
        pause.wait(0.05)
    assert threading.active_count() <= threads_before, threading.enumerate()


def test_close_ends_calls_in_flight_with_cancelled(make_conn, app_server_factory):
    server = app_server_factory("kernel")
    conn = make_conn(plaintext(server.address), auto_connect=False, **FAST)
    conn.connect(timeout=10)
    stub = WorkStub(conn.channel())
    future = stub.unary.future(work_request("future", sleep=8), timeout=20)
    stream: Any = stub.server_stream(work_request("stream", sleep=8), timeout=20)
    assert server.log.wait_for(lambda log: log.starts("future") and log.starts("stream"), 10)
    conn.close()
    error: Any = future.exception(timeout=5)
    assert isinstance(error, grpc.RpcError), error
    assert error.code() is Code.CANCELLED, error
    assert not future.cancelled()  # not cancelled by the caller
    with pytest.raises(grpc.RpcError) as info:
        next(stream)
    assert info.value.code() is Code.CANCELLED
    assert not stream.cancelled()


def test_after_close(make_conn, kernel, recorder):
    conn = make_conn(plaintext(kernel.address), auto_connect=False, **FAST)
    conn.add_listener(recorder)
    connect(conn, recorder)
    conn.close()
    assert conn.state is S.CLOSED
    assert not conn.connected
    for use in (
        conn.connect,
        lambda: conn.connect(timeout=1),
        conn.channel,
        conn.reconnect,
        lambda: conn.add_listener(print),
    ):
        with pytest.raises(cc.ConnectionClosedError) as info:
            use()
        assert isinstance(info.value, cc.NotConnectedError)
    with pytest.raises(cc.ConnectionClosedError), conn:
        pytest.fail("entered a closed connection")
    conn.remove_listener(recorder)  # no-ops
    conn.remove_listener(print)
    conn.close()
    stats = conn.stats()
    assert stats.state is S.CLOSED
    assert stats.connects == 1
    started = time.monotonic()
    with pytest.raises(cc.ConnectionClosedError):
        # grpc's future subscribes to the channel at once: that raises, there is no wait.
        grpc.channel_ready_future(conn.managed_channel).result(timeout=5)
    assert time.monotonic() - started < 4
    # The managed channel fails calls with CANCELLED, as a closed connection's should.
    with pytest.raises(grpc.RpcError) as rpc:
        version(conn.managed_channel)
    assert rpc.value.code() is Code.CANCELLED
    assert [c.new for c in recorder.events] == [S.CONNECTING, S.CONNECTED, S.CLOSED]


def test_connect_timeout_is_validated(make_conn):
    conn = make_conn(server_address="127.0.0.1:1", auto_connect=False)
    with pytest.raises(cc.ConfigurationError) as info:
        conn.connect(timeout=-5)
    assert info.value.option == "timeout"
    with pytest.raises(cc.ConfigurationError):
        conn.connect(timeout=float("nan"))
    with pytest.raises(TypeError, match="timeout"):
        conn.connect(timeout="3")
    assert conn.state is S.IDLE  # none of them armed it
    assert conn._threads() == []


# ---------------------------------------------------------------------------- threads


def thread_counts() -> tuple[int, ...]:
    """(Python threads, OS threads of this process, OS threads that are not Python
    threads). The OS count includes grpc's C-core threads (its event engine's pool,
    timers): a pool that starts with the first channel and does not grow with the number
    of channels."""
    python = threading.active_count()
    tasks = len(os.listdir("/proc/self/task"))
    return python, tasks, tasks - python


def sample_threads(seconds: float) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The least and the most of each of :func:`thread_counts` over ``seconds``
    (sampled every 20 ms)."""
    low = high = thread_counts()
    pause = threading.Event()  # never set: measuring takes wall-clock time
    deadline = time.monotonic() + seconds
    for _ in range(int(seconds / 0.02) + 1):
        if time.monotonic() >= deadline:
            break
        pause.wait(0.02)
        now = thread_counts()
        low = tuple(map(min, low, now))
        high = tuple(map(max, high, now))
    return low, high


@pytest.mark.parametrize("mode", ["keepalive", "health", "transport"])
def test_threads_per_idle_connection(make_conn, kernel_factory, app_server_factory, mode):
    """What is counted: Python threads (``threading.active_count()``, which includes
    grpc's own Python threads, e.g. a channel's spin thread while a stream or a future is
    open) must grow by at most 3 per connection, at their most over 1.5 s of idling
    (through periodic probes and keep-alives). OS threads (``/proc/self/task``) include
    grpc's C-core pool: the threads that are not Python threads may grow once when
    channels appear (seen: +6), but not with the number of connections."""
    if mode == "keepalive":
        address = kernel_factory().address
    else:
        flavor = "grpc-health" if mode == "health" else "plain"
        address = app_server_factory(flavor).address
    target = plaintext(address)
    # Warm up: grpc's C-core starts its pools with the first channel.
    warm = make_conn(target, liveness=mode, auto_connect=False)
    warm.connect(timeout=10)
    warm.close()
    assert warm._threads() == []
    base, _ = sample_threads(0.5)

    conns: list[cc.Connection] = []
    highs = []
    for _ in range(2):
        batch = [make_conn(target, liveness=mode, auto_connect=False) for _ in range(10)]
        for conn in batch:
            conn.connect(timeout=10)
        conns += batch
        assert all(conn.connected for conn in conns)
        assert {conn.stats().liveness for conn in conns} == {mode}
        _, high = sample_threads(1.5)
        highs.append(high)
    (py10, _, native10), (py20, os20, native20) = highs
    counts = f"(python, os, native): least before {base}, most with 10 {highs[0]}, 20 {highs[1]}"
    assert py10 - base[0] <= 3 * 10, counts
    assert py20 - base[0] <= 3 * 20, counts
    assert native20 - base[2] <= 16, counts  # grpc's pool, started once
    assert native20 - native10 <= 4, counts  # ...and not per connection
    assert os20 - base[1] <= 3 * 20 + 16, counts
    assert all(conn.connected for conn in conns)


# ---------------------------------------------------------------------------- detection


def work_server(mode: str, kernel_factory: Any, app_server_factory: Any) -> tuple[str, Any]:
    """A server for ``mode``: the dev kernel (keep-alives every 0.2 s), grpcio-health-
    checking's servicer on a plain grpc.server, or a plain grpc.server. Returns its
    address and a ``call(channel, **kwargs)`` that checks one RPC."""
    if mode == "keepalive":
        kernel = kernel_factory(keepalive_interval=0.2)
        return kernel.address, version
    flavor = "grpc-health" if mode == "health" else "plain"
    server = app_server_factory(flavor)

    def call(channel: grpc.Channel, **kwargs: Any) -> str:
        answer = work_response(WorkStub(channel).unary(work_request("ping"), timeout=5, **kwargs))
        return str(answer["id"])

    return server.address, call


@pytest.mark.timing
@pytest.mark.parametrize("mode", ["keepalive", "health", "transport"])
def test_silent_partition_detected_in_every_liveness_mode(
    make_conn, kernel_factory, app_server_factory, proxy_factory, recorder, mode
):
    address, call = work_server(mode, kernel_factory, app_server_factory)
    host, port = address.rsplit(":", 1)
    proxy = proxy_factory(host, int(port))
    conn = make_conn(
        plaintext(proxy.address), liveness=mode, retry_attempts=None, auto_connect=False, **FAST
    )
    conn.add_listener(recorder)
    mark = connect(conn, recorder)
    assert conn.stats().liveness == mode
    assert call(conn.channel())
    swallowed_at = time.monotonic()
    proxy.swallow(discard=False)  # bytes vanish; nothing is refused or reset
    lost = recorder.wait_for_event(became(S.RECONNECTING), 15, since=mark)
    took = time.monotonic() - swallowed_at
    # keepalive_stale_after (1.5 s) + 1 s expected; generous for a loaded machine.
    assert took < 6.0, f"noticed after {took:.2f}s: {lost.error}"
    # Only silence tells of a partition: nothing was refused, reset or answered.
    assert "1.5s" in (lost.error or ""), lost
    proxy.pass_through()
    recorder.wait_for_event(became(S.CONNECTED), 20, since=mark)
    assert call(conn.channel(), wait_for_ready=True)
    check_history(recorder)


def test_not_serving_with_grpc_health_checking(make_conn, app_server_factory, recorder):
    server = app_server_factory("grpc-health")
    conn = make_conn(
        plaintext(server.address),
        liveness="health",
        retry_attempts=None,
        auto_connect=False,
        **FAST,
    )
    conn.add_listener(recorder)
    mark = connect(conn, recorder)
    assert conn.stats().liveness == "health"
    server.set_serving(False)
    lost = recorder.wait_for_event(became(S.RECONNECTING), 10, since=mark)
    assert "NOT_SERVING" in (lost.error or ""), lost
    # A NOT_SERVING server does not count as connected: attempts fail until it serves.
    with pytest.raises(cc.ConnectTimeoutError):
        conn.connect(timeout=1)
    assert not conn.connected
    assert conn.stats().failed_attempts >= 1
    server.set_serving(True)
    conn.connect(timeout=10)
    recorder.wait_for_event(became(S.CONNECTED), 5, since=mark)
    stub = WorkStub(conn.channel())
    assert work_response(stub.unary(work_request("back"), timeout=5))["id"] == "back"
    check_history(recorder)


def _echo_server(port: int, answer: bytes) -> tuple[grpc.Server, int]:
    """A plain grpc.server on 127.0.0.1:``port`` (0: any) with grpcio-health-checking's
    servicer (SERVING) and ``/test.Echo/Who`` answering ``answer``; and its port."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    who = grpc.method_handlers_generic_handler(
        "test.Echo", {"Who": grpc.unary_unary_rpc_method_handler(lambda request, ctx: answer)}
    )
    server.add_generic_rpc_handlers((who,))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    assert port in (0, bound), (bound, port)
    server.start()
    return server, bound


@pytest.mark.timing
def test_graceful_stop_with_the_health_stream_open_is_noticed(make_conn, recorder):
    """``server.stop(grace)`` without NOT_SERVING first: the Watch stream is a call in
    flight, so it stays open through the grace (5 s); the periodic probe (every 1 s with
    the default ``keepalive_stale_after``) must notice the loss well before that, and a
    new server on the same port is used once it is up. In-process servers: the app
    server's grpc-health flavor always sends NOT_SERVING before it stops."""
    first, port = _echo_server(0, b"first")
    second: grpc.Server | None = None
    try:
        conn = make_conn(
            plaintext(f"127.0.0.1:{port}"),
            liveness="health",
            retry_attempts=None,
            auto_connect=False,
            reconnect_base_delay=0.1,
            reconnect_max_delay=0.5,
        )
        conn.add_listener(recorder)
        mark = connect(conn, recorder)
        who = conn.managed_channel.unary_unary("/test.Echo/Who")
        assert who(b"", timeout=5) == b"first"
        stopped_at = time.monotonic()
        done = first.stop(grace=5)  # GOAWAY; the Watch stream may run on for 5 s
        lost = recorder.wait_for_event(became(S.RECONNECTING), 10, since=mark)
        took = time.monotonic() - stopped_at
        assert took < 4.0, f"noticed after {took:.2f}s ({lost.error})"
        second, _ = _echo_server(port, b"second")
        conn.connect(timeout=10)
        assert who(b"", timeout=5) == b"second"
        assert done.wait(10)
        check_history(recorder)
    finally:
        first.stop(0)
        if second is not None:
            second.stop(0)


@pytest.mark.timing
def test_graceful_stop_of_an_app_server_is_noticed(make_conn, app_server_factory, recorder):
    """The grpc-health app server stopped gracefully (it sends NOT_SERVING first, then
    GOAWAY) while the connection is idle; a new server on the port is used after."""
    server = app_server_factory("grpc-health")
    conn = make_conn(
        plaintext(server.address),
        liveness="health",
        retry_attempts=None,
        auto_connect=False,
        reconnect_base_delay=0.1,
        reconnect_max_delay=0.5,
    )
    conn.add_listener(recorder)
    mark = connect(conn, recorder)
    stub = WorkStub(conn.managed_channel)
    first_pid = work_response(stub.unary(work_request("a"), timeout=5))["pid"]
    stopped_at = time.monotonic()
    old = server.stop_gracefully(grace=5)
    lost = recorder.wait_for_event(became(S.RECONNECTING), 10, since=mark)
    took = time.monotonic() - stopped_at
    assert took < 4.0, f"noticed after {took:.2f}s ({lost.error})"
    server.restart()
    conn.connect(timeout=10)
    second_pid = work_response(stub.unary(work_request("b"), timeout=5))["pid"]
    assert second_pid == server.pid != first_pid
    assert old.wait(10) == 0
    check_history(recorder)


# ---------------------------------------------------------------------------- etcd


@pytest.mark.parametrize(("liveness", "expected"), [("auto", "health"), ("transport", "transport")])
def test_etcd_as_a_peer(make_conn, etcd, recorder, liveness, expected):
    conn = make_conn(
        plaintext(etcd.address),
        liveness=liveness,
        retry_attempts=None,
        auto_connect=False,
        **FAST,
    )
    conn.add_listener(recorder)
    mark = connect(conn, recorder)
    assert conn.stats().liveness == expected
    status = conn.managed_channel.unary_unary(STATUS)  # raw bytes: StatusRequest{}
    assert status_version(status(b"", timeout=5)).startswith("3.")
    etcd.kill()
    lost = recorder.wait_for_event(became(S.RECONNECTING), 10, since=mark)
    assert lost.error
    with pytest.raises(grpc.RpcError) as info:
        status(b"", timeout=5)
    assert info.value.code() is Code.UNAVAILABLE
    etcd.restart()
    recorder.wait_for_event(became(S.CONNECTED), 20, since=mark)
    assert status_version(status(b"", timeout=5)).startswith("3.")
    assert conn.stats().liveness == expected
    check_history(recorder)


# ---------------------------------------------------------------------------- reconnect()


def test_reconnect_keeps_connected_and_calls_in_flight_finish(
    make_conn, app_server_factory, recorder
):
    server = app_server_factory("kernel")
    conn = make_conn(plaintext(server.address), auto_connect=False, **FAST)
    conn.add_listener(recorder)
    mark = connect(conn, recorder)
    stub = WorkStub(conn.channel())
    old = conn._core.current
    assert old is not None
    generation = conn.stats().generation
    ids = [f"slow-{i}" for i in range(3)]
    calls = [stub.unary.future(work_request(rid, sleep=1), timeout=10) for rid in ids]
    assert server.log.wait_for(lambda log: all(log.starts(rid) for rid in ids), 10)
    conn.reconnect()
    assert wait_until(
        conn, lambda: conn._core.counters.generation == generation + 1 and conn.connected, 10
    )
    assert conn._core.current is not old
    assert conn.state is S.CONNECTED
    for rid, call in zip(ids, calls, strict=True):
        assert work_response(call.result(timeout=10))["id"] == rid
    assert recorder.events[mark:] == []  # make-before-break: no state change
    # New calls go to the new generation; the old one is closed once drained.
    assert work_response(stub.unary(work_request("after"), timeout=5))["id"] == "after"
    assert wait_until(conn, lambda: old.closed, 10), old
    assert server.log.outcomes("slow-0") == ["ok"]


def test_reconnect_drain_timeout_ends_a_long_call_with_unavailable(
    make_conn, app_server_factory, recorder
):
    server = app_server_factory("kernel")
    # The library's own channel disposal (no disconnect_fun): it closes a channel it gave
    # up on with UNAVAILABLE.
    conn = make_conn(
        plaintext(server.address), drain_timeout=0.2, auto_connect=False, ledger=False, **FAST
    )
    conn.add_listener(recorder)
    mark = connect(conn, recorder)
    stub = WorkStub(conn.channel())
    old = conn._core.current
    assert old is not None
    generation = conn.stats().generation
    call = stub.unary.future(work_request("long", sleep=2), timeout=10)
    assert server.log.wait_for(lambda log: log.starts("long"), 10)
    reconnected_at = time.monotonic()
    conn.reconnect()
    assert wait_until(conn, lambda: conn._core.counters.generation == generation + 1, 10)
    error: Any = call.exception(timeout=10)
    ended = time.monotonic() - reconnected_at
    assert error is not None, "the call finished: drain_timeout did not cut it"
    assert error.code() is Code.UNAVAILABLE, (error.code(), error.details())
    assert not call.cancelled()
    assert ended < 1.9, f"ended {ended:.2f}s after reconnect()"
    assert wait_closed(old.channel, 5), "the replaced channel is still open"
    assert conn.state is S.CONNECTED
    assert recorder.events[mark:] == []
    assert work_response(stub.unary(work_request("after"), timeout=5))["id"] == "after"


@pytest.mark.timing
def test_a_fail_fast_stream_left_on_a_lost_channel_is_not_demand(make_conn, app_server_factory):
    """Health says NOT_SERVING (the server is alive), and a long fail-fast stream still
    runs on the lost channel: attempts follow the exponential schedule, the server is not
    hammered (only wait_for_ready calls caught on a lost channel are demand)."""
    server = app_server_factory("grpc-health")
    conn = make_conn(
        plaintext(server.address),
        liveness="health",
        retry_attempts=None,
        reconnect_base_delay=1.0,
        reconnect_max_delay=8.0,
        ledger=False,
    )
    conn.connect(timeout=15)
    stream = WorkStub(conn.managed_channel).server_stream(
        work_request("long", sleep=0.1, count=100), timeout=30
    )
    assert next(stream)
    server.set_serving(False)
    assert wait_until(conn, lambda: conn.state is S.RECONNECTING, 10), conn.stats()
    before = conn.stats().attempts
    threading.Event().wait(3.0)
    assert conn.stats().attempts - before <= 4, conn.stats()
    assert stream.is_active()  # still running on the lost channel
    stream.cancel()
