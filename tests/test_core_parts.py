"""The small parts of the core on their own: a generation's in-flight bookkeeping, the
call objects for calls the connection cannot send yet, the deadline timer."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

import chronicle_conn as cc
from chronicle_conn._calls import CallError
from chronicle_conn._generation import Generation
from chronicle_conn._timer import Timer
from tests.harness.recorder import EventRecorder

Code = grpc.StatusCode


def make_generation():
    drained = EventRecorder("drained")
    suspects = EventRecorder("suspects")
    gen = Generation(
        1,
        None,  # type: ignore[arg-type]
        None,
        on_drained=lambda: drained("drained"),
        on_suspect=lambda g, reason: suspects(reason),
    )
    return gen, drained, suspects


# ---------------------------------------------------------------------------- Generation


def test_a_retired_generation_takes_no_new_call_and_drains():
    gen, drained, _ = make_generation()
    assert gen.enter()
    assert gen.enter()
    assert gen.in_flight == 2
    assert not gen.retire()  # two calls still in flight
    assert not gen.enter()  # new calls go elsewhere
    assert not gen.close_if_drained()
    gen.leave()
    assert drained.events == []
    gen.leave()
    assert drained.events == ["drained"]  # the last one out tells the owner
    assert gen.close_if_drained()
    assert not gen.close_if_drained()  # closed exactly once
    assert gen.closed


def test_an_idle_generation_retires_drained_and_force_closes_once():
    gen, drained, _ = make_generation()
    assert gen.retire()
    assert drained.events == []  # nothing was in flight: the retire() answer says so
    other, _, _ = make_generation()
    assert other.enter()
    other.retire()
    assert other.close_if_drained(force=True)  # the cap: closed with a call in flight
    assert not other.close_if_drained(force=True)
    other.leave()  # the cut call finishing later is harmless


def test_enter_and_leave_are_consistent_under_contention():
    gen, _, _ = make_generation()
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            if gen.enter():
                gen.leave()

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for thread in threads:
        thread.start()
    threading.Event().wait(0.2)
    gen.retire()
    stop.set()
    for thread in threads:
        thread.join(10)
    assert gen.in_flight == 0
    assert gen.close_if_drained()


def test_only_unavailable_makes_a_generation_suspect():
    gen, _, suspects = make_generation()

    class Failed(grpc.RpcError):
        def __init__(self, code):
            self._code = code

        def code(self):
            return self._code

    gen.failed(Failed(Code.UNIMPLEMENTED))
    gen.failed(Failed(Code.DEADLINE_EXCEEDED))
    assert suspects.events == []
    gen.failed(Failed(Code.UNAVAILABLE))
    assert suspects.events == ["a call failed with UNAVAILABLE"]
    gen.retire()
    gen.failed(Failed(Code.UNAVAILABLE))  # a retired generation is nobody's concern
    assert len(suspects.events) == 1


# ---------------------------------------------------------------------------- CallError


def test_a_failed_call_is_an_rpc_error_a_call_and_a_future():
    error = CallError(Code.UNAVAILABLE, "not connected")
    assert isinstance(error, grpc.RpcError)
    assert isinstance(error, grpc.Call)
    assert isinstance(error, grpc.Future)
    assert isinstance(error, cc.ChronicleConnError)
    assert error.code() is Code.UNAVAILABLE
    assert error.details() == "not connected"
    assert error.done()
    assert not error.running()
    assert not error.cancelled()
    assert not error.is_active()
    assert error.exception() is error
    with pytest.raises(CallError) as info:
        error.result()
    assert info.value is error
    with pytest.raises(CallError):
        next(iter(error))  # a stream that failed: the iterator raises it
    assert not error.cancel()  # nothing to cancel any more
    seen = EventRecorder("done")
    error.add_done_callback(seen)
    assert seen.events == [error]  # at once, with the future itself
    assert not error.add_callback(lambda: None)
    assert error.initial_metadata() == ()
    assert "UNAVAILABLE" in str(error)


def test_a_pending_call_waits_then_becomes_the_real_call():
    gen, _, _ = make_generation()

    class Real:
        """Stands in for grpc's call object; records what was delegated to it."""

        def __init__(self):
            self.callbacks = []
            self.cancelled_ = False

        def add_done_callback(self, fn):
            self.callbacks.append(fn)

        def add_callback(self, fn):
            return True

        def result(self, timeout=None):
            return b"reply"

        def code(self):
            return Code.OK

        def cancel(self):
            self.cancelled_ = True
            return True

        def done(self):
            return True

        def __next__(self):
            return b"item"

    real_call = Real()
    issued = []

    def issue(generation, timeout):
        issued.append((generation, timeout))
        return real_call

    pending = CallError(issue=issue, deadline=time.monotonic() + 30)
    assert pending.pending
    assert pending.running()
    assert not pending.done()
    assert pending.is_active()
    assert 25 < pending.time_remaining() <= 30
    done = EventRecorder("done")
    pending.add_done_callback(done)
    with pytest.raises(grpc.FutureTimeoutError):
        pending.result(timeout=0.05)  # still waiting for the connection
    assert gen.enter()
    assert pending.send(gen)
    assert issued[0][0] is gen
    assert 25 < issued[0][1] <= 30
    assert not pending.pending
    assert pending.result() == b"reply"
    assert pending.code() is Code.OK
    assert next(pending) == b"item"
    # Callbacks added before it was sent are forwarded, and report the pending object.
    (forward,) = real_call.callbacks
    forward(real_call)
    assert done.events == [pending]
    assert not pending.send(gen)  # sent once, never twice
    assert pending.cancel()
    assert real_call.cancelled_


def test_a_pending_call_ends_at_its_deadline_with_callbacks():
    pending = CallError(issue=lambda gen, timeout: None, deadline=time.monotonic() + 0.2)
    done = EventRecorder("done")
    ended = EventRecorder("rpc callbacks")
    pending.add_done_callback(done)
    assert pending.add_callback(lambda: ended("ended"))
    assert done.wait_for_count(1, 10)  # nobody blocks on it: the timer ends it
    assert ended.events == ["ended"]
    assert pending.code() is Code.DEADLINE_EXCEEDED
    assert pending.details() == "Deadline Exceeded"
    gen, _, _ = make_generation()
    assert not pending.send(gen)  # too late: never sent


def test_a_pending_call_cancelled_is_never_sent():
    pending = CallError(issue=lambda gen, timeout: pytest.fail("sent"), deadline=None)
    assert pending.cancel()
    assert pending.cancelled()
    assert pending.code() is Code.CANCELLED
    with pytest.raises(grpc.FutureCancelledError):
        pending.result()
    gen, _, _ = make_generation()
    assert not pending.send(gen)


def test_a_pending_call_that_cannot_be_sent_fails_internal():
    def broken(generation, timeout):
        raise TypeError("bad request object")

    pending = CallError(issue=broken, deadline=None)
    gen, _, _ = make_generation()
    assert not pending.send(gen)
    assert pending.code() is Code.INTERNAL
    assert "bad request object" in pending.details()


def test_a_callback_that_raises_breaks_nothing():
    pending = CallError(issue=lambda gen, timeout: None, deadline=None)
    after = EventRecorder("after")

    def bad(_future):
        raise SystemExit("a callback's bug")

    pending.add_done_callback(bad)
    pending.add_done_callback(after)
    assert pending.finish(Code.UNAVAILABLE, "gave up")
    assert after.events == [pending]


# ---------------------------------------------------------------------------- Timer


def test_the_timer_runs_callbacks_in_order_and_skips_cancelled_ones():
    timer = Timer()
    ran = EventRecorder("ran")
    now = time.monotonic()
    timer.schedule(now + 0.2, lambda: ran("late"))
    cancelled = timer.schedule(now + 0.1, lambda: ran("cancelled"))
    timer.schedule(now + 0.05, lambda: ran("early"))
    cancelled.cancel()
    assert ran.wait_for_count(2, 10)
    assert ran.events == ["early", "late"]


def test_the_timer_thread_ends_when_idle_and_comes_back(monkeypatch):
    import chronicle_conn._timer as timer_module

    monkeypatch.setattr(timer_module, "_IDLE_EXIT", 0.1)
    timer = Timer()
    ran = EventRecorder("ran")
    timer.schedule(time.monotonic(), lambda: ran(1))
    assert ran.wait_for_count(1, 10)
    thread = timer._thread
    assert thread is not None
    thread.join(10)
    assert not thread.is_alive()
    timer.schedule(time.monotonic(), lambda: ran(2))  # a new thread for a new deadline
    assert ran.wait_for_count(2, 10)


# ---------------------------------------------------------------------------- imports


def test_the_health_status_values_are_the_generated_enums():
    from chronicle_conn import _health
    from chronicle_conn._proto import health_pb2

    response = health_pb2.HealthCheckResponse
    assert _health.UNKNOWN == response.UNKNOWN
    assert _health.SERVING == response.SERVING
    assert _health.NOT_SERVING == response.NOT_SERVING
    assert _health.SERVICE_UNKNOWN == response.SERVICE_UNKNOWN
    assert _health.status_name(_health.NOT_SERVING) == "NOT_SERVING"


def test_heavy_imports_wait_for_the_first_connection_and_happen_on_its_thread():
    """``import chronicle_conn`` leaves backoff, structlog and protobuf alone; building a
    Connection imports them, on the constructing thread, before any thread of its own."""
    import subprocess
    import sys

    script = """
import sys, threading
import chronicle_conn as cc
heavy = ("backoff", "structlog", "google.protobuf", "chronicle_conn._proto.clients_pb2")
print(sorted(m for m in heavy if m in sys.modules))
started = []
original = threading.Thread.start
def start(self):
    started.append((self.name, sorted(m for m in heavy if m not in sys.modules)))
    return original(self)
threading.Thread.start = start
conn = cc.Connection("chronicle://127.0.0.1:1?disableTls=true", auto_connect=True)
conn.close()
print(started[:1])
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    # (structlog, unconfigured, prints the connection's events too)
    before, first_thread = [line for line in result.stdout.splitlines() if line.startswith("[")]
    assert before == "[]"
    assert "chronicle_conn-supervisor" in first_thread
    assert first_thread.endswith(", [])]")  # nothing left to import when it started
