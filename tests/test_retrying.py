"""``Connection.call`` (``chronicle_conn._retrying``): wait for the connection within one
deadline, run ``fn(channel)``, and retry only what certainly never reached a server.

Executions are counted on the server side, in the work servers' execution log, which
outlives the server processes that write it.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent import futures
from typing import Any

import grpc
import pytest

import chronicle_conn as cc
from chronicle_conn._retrying import NEVER_SENT_DETAILS, retryable
from tests.harness.appserver import WorkStub, work_request, work_response
from tests.harness.ports import free_port
from tests.helpers import plaintext

S = cc.ConnectionState
Code = grpc.StatusCode

FAST = {"reconnect_base_delay": 0.1, "reconnect_max_delay": 0.5, "keepalive_stale_after": 2.0}


class Calls:
    """Counts invocations of ``fn`` per id (fn runs on the caller's thread, or a pool's)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()

    def add(self, rid: str) -> int:
        with self._lock:
            self.counts[rid] += 1
            return self.counts[rid]

    def __getitem__(self, rid: str) -> int:
        with self._lock:
            return self.counts[rid]

    def total(self) -> int:
        with self._lock:
            return sum(self.counts.values())


def work(calls: Calls, rid: str, *, first_sleep: float = 0.0) -> Callable[[Any], dict[str, Any]]:
    """``fn`` for ``conn.call``: one unary work call named ``rid``; the first invocation
    sleeps ``first_sleep`` s on the server, later ones (retries) do not."""

    def fn(channel: Any) -> dict[str, Any]:
        n = calls.add(rid)
        sleep = first_sleep if n == 1 else 0.0
        request = work_request(rid, sleep=sleep)
        return work_response(WorkStub(channel).unary(request, timeout=sleep + 10))

    return fn


def raising(calls: Calls, rid: str, errors: Sequence[BaseException], answer: Any = "ok") -> Any:
    """``fn`` that raises ``errors`` one per invocation, then returns ``answer``."""

    def fn(channel: Any) -> Any:
        n = calls.add(rid)
        if n <= len(errors):
            raise errors[n - 1]
        return answer

    return fn


class FakeRpcError(grpc.RpcError):
    """A finished grpc error, as a call object raises it."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def noticed_outage(recorder: Any, since: int) -> None:
    """Wait until the connection's listener heard RECONNECTING (after index ``since``).

    The connection learns of a crash from its keep-alive stream, which grpc ends once
    its transport has read the end of the socket: from then on no call can be written
    to the dead socket. (A call made in the instant between the kill and grpc reading
    the end can be, and then fails like a call in flight: not retried unless
    idempotent. The test waits so that it is deterministic.)"""
    recorder.wait_for_event(lambda change: change.new is S.RECONNECTING, 15, since=since)


class Restarter:
    """Restarts ``server`` on a thread, while the test's next call waits for it."""

    def __init__(self, server: Any) -> None:
        self.error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, args=(server,), name="test-restarter", daemon=True
        )
        self._thread.start()

    def _run(self, server: Any) -> None:
        try:
            server.restart()
        except BaseException as exc:
            self.error = exc

    def join(self) -> None:
        self._thread.join(30)
        assert not self._thread.is_alive(), "the restart hung"
        if self.error is not None:
            raise self.error


# ------------------------------------------------------------------ 1. through crashes

#: Before which call the server is SIGKILLed, and whether it is back before that call
#: starts ("now") or comes back while the call waits for the connection ("later").
KILLS = {6: "later", 13: "now", 21: "later", 29: "now", 35: "later"}


@pytest.mark.timeout(240)
def test_sequential_calls_through_sigkills_each_run_exactly_once(
    app_server_factory, make_conn, recorder
):
    server = app_server_factory("kernel")
    conn = make_conn(plaintext(server.address), retry_attempts=None, **FAST)
    conn.add_listener(recorder)
    conn.connect(timeout=15)
    calls = Calls()
    answers: dict[str, dict[str, Any]] = {}
    ids = [f"seq-{i}" for i in range(40)]
    for i, rid in enumerate(ids):
        mode = KILLS.get(i)
        restarter: Restarter | None = None
        if mode is not None:
            since = len(recorder)
            server.kill()
            noticed_outage(recorder, since)
            if mode == "now":
                server.restart()
            else:
                restarter = Restarter(server)
        answers[rid] = conn.call(work(calls, rid), timeout=20)
        if restarter is not None:
            restarter.join()
    snapshot = server.log.read()
    executions = snapshot.executions()
    assert {rid: executions.get(rid, 0) for rid in ids if executions.get(rid, 0) != 1} == {}
    assert all(snapshot.outcomes(rid) == ["ok"] for rid in ids)
    # Every answer came from the process that logged the execution, and each kill
    # really fell in the middle of the sequence: one server process per stretch.
    pids = [answers[rid]["pid"] for rid in ids]
    assert pids == [snapshot.starts(rid)[0].pid for rid in ids]
    assert len(set(pids)) == len(KILLS) + 1
    assert calls.total() >= len(ids)  # more when a call was retried (never sent)


# ------------------------------------------------------------------ 2. in flight at a crash


@pytest.mark.timeout(180)
def test_a_call_in_flight_at_a_crash_is_retried_only_when_idempotent(app_server_factory, make_conn):
    server = app_server_factory("kernel")
    conn = make_conn(plaintext(server.address), retry_attempts=None, **FAST)
    conn.connect(timeout=15)
    calls = Calls()
    with futures.ThreadPoolExecutor(1) as pool:
        # Not idempotent: the server was running it when it died, so it may have had
        # effects; the error is the caller's.
        once = pool.submit(conn.call, work(calls, "once", first_sleep=30), timeout=60)
        assert server.log.wait_for(lambda snap: bool(snap.starts("once")), 15), server.log
        killed = server.pid
        server.kill()
        with pytest.raises(grpc.RpcError) as caught:
            once.result(timeout=30)
        assert caught.value.code() is Code.UNAVAILABLE
        assert not isinstance(caught.value, cc.CallError)  # grpc's own: it was sent
        assert calls["once"] == 1
        snapshot = server.log.read()
        assert [e.pid for e in snapshot.starts("once")] == [killed]
        assert snapshot.ends("once") == []  # killed mid-call

        # Idempotent: the same crash, and the call is run again on the next server.
        server.restart()
        conn.connect(timeout=30)
        twice = pool.submit(
            conn.call, work(calls, "twice", first_sleep=30), timeout=60, idempotent=True
        )
        assert server.log.wait_for(lambda snap: bool(snap.starts("twice")), 15), server.log
        killed = server.pid
        server.kill()
        server.restart()
        answer = twice.result(timeout=60)
    assert answer["pid"] == server.pid != killed
    assert calls["twice"] >= 2
    snapshot = server.log.read()
    assert [e.pid for e in snapshot.starts("twice")] == [killed, server.pid]
    assert snapshot.outcomes("twice") == ["ok"]
    assert snapshot.starts("once")[0].pid != server.pid
    assert len(snapshot.starts("once")) == 1  # never re-sent


# ------------------------------------------------------------------ 3. what is retried


@pytest.mark.timeout(60)
def test_never_sent_errors_are_retried_and_deadline_exceeded_is_not(app_server_factory, make_conn):
    server = app_server_factory("kernel")
    conn = make_conn(plaintext(server.address), retry_attempts=None, **FAST)
    conn.connect(timeout=15)
    calls = Calls()

    # A real CallError: a fail-fast call through a connection that is not connected.
    down = make_conn(plaintext(f"127.0.0.1:{free_port()}"), auto_connect=False)
    with pytest.raises(cc.CallError) as unsent:
        WorkStub(down.managed_channel).unary(b"{}")
    assert unsent.value.code() is Code.UNAVAILABLE
    # A real "failed to connect to all addresses": grpc's own fail-fast call to a port
    # nobody listens on.
    with (
        grpc.insecure_channel(f"127.0.0.1:{free_port()}") as raw,
        pytest.raises(grpc.RpcError) as refused,
    ):
        WorkStub(raw).unary(b"{}", timeout=5)
    assert str(refused.value.details()).startswith(NEVER_SENT_DETAILS[0])

    not_connected = cc.NotConnectedError("down", state=S.RECONNECTING)
    errors: list[BaseException] = [not_connected, unsent.value, refused.value]
    assert conn.call(raising(calls, "never-sent", errors), timeout=10) == "ok"
    assert calls["never-sent"] == 4

    # Retries run out: the last error itself propagates, after 1 + retries invocations.
    with pytest.raises(cc.CallError) as caught:
        conn.call(raising(calls, "exhausted", [unsent.value] * 10), timeout=10, retries=2)
    assert caught.value is unsent.value
    assert calls["exhausted"] == 3
    with pytest.raises(cc.CallError):
        conn.call(raising(calls, "no-retries", [unsent.value]), timeout=10, retries=0)
    assert calls["no-retries"] == 1

    # DEADLINE_EXCEEDED is never retried: the server may be running it still.
    def slow(channel: Any) -> Any:
        calls.add("deadline")
        return WorkStub(channel).unary(work_request("deadline", sleep=5), timeout=0.3)

    with pytest.raises(grpc.RpcError) as deadline:
        conn.call(slow, timeout=10, idempotent=True)
    assert deadline.value.code() is Code.DEADLINE_EXCEEDED
    assert calls["deadline"] == 1
    assert server.log.wait_for(lambda snap: bool(snap.ends("deadline")), 10), server.log
    assert server.log.executions()["deadline"] == 1

    # An UNAVAILABLE the server itself answered: it ran. Once when not idempotent,
    # 1 + retries times when it is.
    def unavailable(rid: str) -> Callable[[Any], Any]:
        def fn(channel: Any) -> Any:
            calls.add(rid)
            return WorkStub(channel).unary(work_request(rid, code="UNAVAILABLE"), timeout=5)

        return fn

    with pytest.raises(grpc.RpcError) as answered:
        conn.call(unavailable("answered"), timeout=10)
    assert answered.value.code() is Code.UNAVAILABLE
    with pytest.raises(grpc.RpcError):
        conn.call(unavailable("answered-idempotent"), timeout=10, retries=2, idempotent=True)
    assert (calls["answered"], calls["answered-idempotent"]) == (1, 3)
    executions = server.log.executions()
    assert (executions["answered"], executions["answered-idempotent"]) == (1, 3)


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("error", "plain", "idempotent"),
    [
        (cc.NotConnectedError("down"), True, True),
        (cc.ConnectionClosedError("closed"), False, False),
        (cc.CallError(Code.UNAVAILABLE, "chronicle_conn: not connected"), True, True),
        (cc.CallError(Code.DEADLINE_EXCEEDED, "Deadline Exceeded"), False, False),
        (cc.CallError(Code.CANCELLED, "chronicle_conn: the connection is closed"), False, False),
        (FakeRpcError(Code.UNAVAILABLE, f"{NEVER_SENT_DETAILS[0]}; last error: x"), True, True),
        (FakeRpcError(Code.UNAVAILABLE, f"{NEVER_SENT_DETAILS[1]}; last error: x"), True, True),
        (FakeRpcError(Code.UNAVAILABLE, "Socket closed"), False, True),
        (FakeRpcError(Code.UNAVAILABLE, "Stream removed"), False, True),
        (FakeRpcError(Code.UNAVAILABLE, "Connection reset by peer"), False, True),
        (FakeRpcError(Code.UNAVAILABLE, "ipv4:1.2.3.4:5: Connection refused"), False, True),
        (FakeRpcError(Code.UNAVAILABLE, "GOAWAY received"), False, True),
        (FakeRpcError(Code.DEADLINE_EXCEEDED, "Deadline Exceeded"), False, False),
        (FakeRpcError(Code.CANCELLED, "Locally cancelled by application!"), False, False),
        (FakeRpcError(Code.UNAUTHENTICATED, "bad token"), False, False),
        (FakeRpcError(Code.INTERNAL, NEVER_SENT_DETAILS[0]), False, False),
        (ValueError(NEVER_SENT_DETAILS[0]), False, False),
        (cc.RetriesExhaustedError("gave up", attempts=3), False, False),
    ],
    ids=repr,
)
def test_which_errors_are_retried(error, plain, idempotent):
    assert retryable(error, idempotent=False) is plain
    assert retryable(error, idempotent=True) is idempotent


class FakeSentCall:
    """The real grpc call a pending ``CallError`` became once sent: it failed."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def done(self) -> bool:
        return True

    def debug_error_string(self) -> str:
        return f"{self._code.name}:{self._details}"


@pytest.mark.timeout(10)
def test_a_call_error_that_was_sent_is_judged_as_grpc_s_own():
    """A ``wait_for_ready`` call object still waiting is no failure; once sent, its outcome
    is the real call's (here: ``UNAVAILABLE`` in flight), not an unsent failure."""
    real = FakeSentCall(Code.UNAVAILABLE, "Socket closed")
    pending = cc.CallError(issue=lambda gen, timeout: real, deadline=time.monotonic() + 60)
    assert pending.pending
    assert retryable(pending, idempotent=True) is False
    assert pending.send(object())  # type: ignore[arg-type]  # issue() ignores it
    assert pending.code() is Code.UNAVAILABLE
    assert retryable(pending, idempotent=False) is False
    assert retryable(pending, idempotent=True) is True


# ------------------------------------------------------------------ 4. the deadline


@pytest.mark.timing
@pytest.mark.timeout(30)
def test_the_deadline_is_kept_when_nobody_listens(make_conn):
    conn = make_conn(plaintext(f"127.0.0.1:{free_port()}"), retry_attempts=None)
    calls = Calls()
    started = time.monotonic()
    with pytest.raises(cc.ConnectTimeoutError) as caught:
        conn.call(raising(calls, "never", []), timeout=1)
    took = time.monotonic() - started
    assert 0.9 <= took < 2.0, took
    assert calls["never"] == 0
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("call gave up after 1 attempt within 1s: "), message
    assert isinstance(caught.value.__cause__, cc.ConnectTimeoutError)


@pytest.mark.timing
@pytest.mark.timeout(30)
def test_the_deadline_is_kept_while_waiting_after_a_failure(kernel, make_conn, recorder):
    """A never-sent failure, then the server is gone for good: the wait for the connection
    ends at the deadline, and the message says what happened."""
    conn = make_conn(plaintext(kernel.address), retry_attempts=None, **FAST)
    conn.add_listener(recorder)
    conn.connect(timeout=15)
    calls = Calls()
    unsent = cc.CallError(Code.UNAVAILABLE, "chronicle_conn: not connected")

    def crash(channel: Any) -> Any:
        calls.add("crash")
        since = len(recorder)
        kernel.kill()
        noticed_outage(recorder, since)
        raise unsent

    started = time.monotonic()
    with pytest.raises(cc.ConnectTimeoutError) as caught:
        conn.call(crash, timeout=2)
    took = time.monotonic() - started
    assert took < 3.0, took
    assert calls["crash"] == 1
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(
        "call gave up after 2 attempts within 2s; the last failed with UNAVAILABLE: "
    ), message


@pytest.mark.timing
@pytest.mark.timeout(30)
def test_retry_pauses_never_pass_the_deadline(app_server_factory, make_conn):
    """Retryable failures over and over with retries to spare: the last one propagates
    once the next pause would reach the deadline, not after it."""
    server = app_server_factory("kernel")
    conn = make_conn(plaintext(server.address), retry_attempts=None, **FAST)
    conn.connect(timeout=15)
    calls = Calls()
    unsent = cc.CallError(Code.UNAVAILABLE, "chronicle_conn: not connected")
    started = time.monotonic()
    with pytest.raises(cc.CallError) as caught:
        conn.call(raising(calls, "busy", [unsent] * 1000), timeout=1.5, retries=1000)
    took = time.monotonic() - started
    assert caught.value is unsent
    assert took < 1.5 + 0.5, took
    # Pauses of 25-50 ms, 50-100, 100-200, 200-400, 400-800, then 0.5-1 s: 4 to 6 fit
    # in 1.5 s (fewer when the machine is slow to wake a sleeper).
    assert 3 <= calls["busy"] <= 7, calls["busy"]


@pytest.mark.timeout(30)
def test_tls_against_a_plaintext_server_raises_at_once(kernel, make_conn):
    conn = make_conn(f"chronicle://{kernel.address}", ledger=False, retry_attempts=None)
    calls = Calls()
    started = time.monotonic()
    with pytest.raises(cc.TlsError) as caught:
        conn.call(raising(calls, "tls", []), timeout=20)
    assert time.monotonic() - started < 5.0  # not the 20 s budget
    assert "speaks plaintext" in str(caught.value)
    assert calls["tls"] == 0
    assert conn.state is S.FAILED
    with pytest.raises(cc.TlsError):  # and again: a later call tries once more
        conn.call(raising(calls, "tls", []), timeout=20)
    assert calls["tls"] == 0


@pytest.mark.timeout(30)
def test_a_closed_connection_raises_connection_closed(kernel, make_conn):
    conn = make_conn(plaintext(kernel.address))
    conn.connect(timeout=15)
    calls = Calls()

    def close_then_fail(channel: Any) -> Any:
        calls.add("closed")
        conn.close()
        return conn.channel()

    with pytest.raises(cc.ConnectionClosedError):
        conn.call(close_then_fail, timeout=10)
    assert calls["closed"] == 1
    with pytest.raises(cc.ConnectionClosedError):
        conn.call(close_then_fail, timeout=10)
    assert calls["closed"] == 1


# ------------------------------------------------------------------ 5. arguments


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("timeout", 0),
        ("timeout", -1),
        ("timeout", math.nan),
        ("timeout", math.inf),
        ("timeout", None),
        ("timeout", "5"),
        ("timeout", True),
        ("retries", -1),
        ("retries", 1.5),
        ("retries", None),
        ("retries", "3"),
        ("retries", True),
        ("idempotent", "yes"),
        ("idempotent", None),
    ],
    ids=repr,
)
def test_bad_arguments(make_conn, option, value):
    conn = make_conn(plaintext(f"127.0.0.1:{free_port()}"), auto_connect=False)
    calls = Calls()
    kwargs: dict[str, Any] = {"timeout": 5, "retries": 3, "idempotent": False, option: value}
    with pytest.raises(cc.ConfigurationError) as caught:
        conn.call(raising(calls, "bad", []), **kwargs)
    assert caught.value.option == option
    assert calls["bad"] == 0
    assert conn.state is S.IDLE  # refused before anything was dialed
