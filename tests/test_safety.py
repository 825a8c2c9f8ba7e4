"""Safety claims, each repeated enough times to catch a 1-in-20 failure and counted on the
server side (an execution log that survives the server's death):

- a graceful server stop (GOAWAY, calls in flight finish) with slow calls in flight,
  and a new server on the same port moments later: every call runs exactly once and
  succeeds, as on a raw channel;
- a SIGKILL with slow calls in flight: no call runs twice; the calls in flight fail as
  they do on a raw channel, and calls made during the outage run once when it is over;
- a soak: many threads, every call kind, fail-fast and ``wait_for_ready``, while the
  server is killed or stopped gracefully at random: no hung call, no call run twice,
  only documented errors, thread and fd counts flat. CI runs a short soak; set
  ``CHRONICLE_SOAK_CYCLES=300`` for the full one.
"""

from __future__ import annotations

import itertools
import os
import random
import threading
import time
from typing import Any

import grpc
import pytest

import chronicle_conn as cc
from tests.harness.appserver import WorkStub, work_request, work_response
from tests.helpers import plaintext

S = cc.ConnectionState
Code = grpc.StatusCode

TRIALS = 30
FAST = {"reconnect_base_delay": 0.1, "reconnect_max_delay": 0.5, "keepalive_stale_after": 2.0}


def result_of(future: Any, timeout: float) -> tuple[Any, ...]:
    """How a future ended: ("ok", server pid) or ("error", code)."""
    try:
        return ("ok", work_response(future.result(timeout=timeout))["pid"])
    except grpc.RpcError as error:
        return ("error", error.code())


@pytest.mark.timeout(300)
@pytest.mark.parametrize("flavor", ["kernel", "grpc-health"])
def test_graceful_stop_with_calls_in_flight_runs_each_call_once(app_server_factory, flavor):
    """The kernel (keep-alive liveness) or a plain grpc.server with grpcio-health-checking
    (health liveness) is stopped with grace while four slow wait_for_ready calls are in
    flight; a new server starts on the same port 0.2-1 s later. A raw channel rides the
    same restarts as the control."""
    rng = random.Random(6)
    server = app_server_factory(flavor)
    conn = cc.Connection(plaintext(server.address), retry_attempts=None, **FAST)
    raw_channel = grpc.insecure_channel(server.address)
    ours, raw = WorkStub(conn.managed_channel), WorkStub(raw_channel)
    outcomes: dict[str, tuple[Any, ...]] = {}
    late_outcomes: dict[str, tuple[Any, ...]] = {}
    try:
        conn.connect(timeout=15)
        for trial in range(TRIALS):
            conn.connect(timeout=30)
            ids = [f"t{trial}-ours-{i}" for i in range(4)] + [f"t{trial}-raw"]
            calls = [
                (stub.unary.future)(
                    work_request(rid, sleep=rng.uniform(0.6, 1.2)), timeout=30, wait_for_ready=True
                )
                for rid, stub in zip(ids, [ours] * 4 + [raw], strict=True)
            ]
            # Every call is running in the server before it is told to stop.
            assert server.log.wait_for(lambda snap, ids=ids: all(snap.starts(i) for i in ids), 15)
            old = server.stop_gracefully(grace=5)
            # Calls made during the gap wait for the next server. One made in the very
            # moment the old server starts its shutdown can race its GOAWAY and be
            # cancelled by that server unexecuted: raw channels see that too (about 1
            # in 75 here), so it is allowed on both sides, and counted.
            late_ids = (f"t{trial}-late", f"t{trial}-late-raw")
            lates = [
                stub.unary.future(work_request(rid), timeout=30, wait_for_ready=True)
                for rid, stub in zip(late_ids, (ours, raw), strict=True)
            ]
            threading.Event().wait(rng.uniform(0.2, 1.0))
            server.restart()
            for rid, call in zip(ids, calls, strict=True):
                outcomes[rid] = result_of(call, 30)
                assert outcomes[rid] == ("ok", old.pid), (rid, outcomes[rid])
            for rid, call in zip(late_ids, lates, strict=True):
                late_outcomes[rid] = result_of(call, 30)
                assert late_outcomes[rid][0] == "ok" or late_outcomes[rid] == (
                    "error",
                    Code.CANCELLED,
                ), (rid, late_outcomes[rid])
            assert old.wait(15) == 0
    finally:
        raw_channel.close()
        conn.close()
    ran = server.log.executions()
    assert {rid: ran.get(rid, 0) for rid in outcomes if ran.get(rid, 0) != 1} == {}
    assert len(outcomes) == TRIALS * 5
    # Late calls: once if they succeeded, never if they were cancelled.
    expected = {rid: 1 if result[0] == "ok" else 0 for rid, result in late_outcomes.items()}
    assert {rid: ran.get(rid, 0) for rid in late_outcomes} == expected
    ours_cancelled = sum(1 for rid, r in late_outcomes.items() if r[0] != "ok" and "raw" not in rid)
    raw_cancelled = sum(1 for rid, r in late_outcomes.items() if r[0] != "ok" and "raw" in rid)
    # A rare race, as on raw channels (in the same run: a loaded machine widens the race
    # for both; measured 0-2 of 30 on each side with the CPU saturated).
    assert ours_cancelled <= raw_cancelled + 4, (
        f"ours cancelled {ours_cancelled}, raw {raw_cancelled} of {TRIALS}"
    )


@pytest.mark.timeout(300)
def test_sigkill_with_calls_in_flight_never_runs_a_call_twice(app_server_factory):
    rng = random.Random(9)
    server = app_server_factory("kernel")
    conn = cc.Connection(plaintext(server.address), retry_attempts=None, **FAST)
    raw_channel = grpc.insecure_channel(server.address)
    ours, raw = WorkStub(conn.managed_channel), WorkStub(raw_channel)
    in_flight: list[str] = []
    during: dict[str, tuple[Any, ...]] = {}
    try:
        conn.connect(timeout=15)
        for trial in range(TRIALS):
            conn.connect(timeout=30)
            ids = [f"k{trial}-ours-{i}" for i in range(4)] + [f"k{trial}-raw"]
            calls = [
                stub.unary.future(work_request(rid, sleep=5), timeout=30, wait_for_ready=True)
                for rid, stub in zip(ids, [ours] * 4 + [raw], strict=True)
            ]
            assert server.log.wait_for(lambda snap, ids=ids: all(snap.starts(i) for i in ids), 15)
            server.kill()
            # In flight at the crash: they fail as on a raw channel, and are not re-sent.
            for rid, call in zip(ids, calls, strict=True):
                assert result_of(call, 15) == ("error", Code.UNAVAILABLE), rid
            in_flight += ids[:4]
            # Made during the outage: they wait, and run once on the next server. One
            # made in the very moment the client learns of the crash can still be written
            # to the dying connection and fail UNAVAILABLE unexecuted ("Stream removed"):
            # raw channels do that too, so it is allowed on both sides, and counted.
            late_ids = [f"k{trial}-late-{i}" for i in range(2)] + [f"k{trial}-late-raw"]
            late = [
                stub.unary.future(work_request(rid), timeout=30, wait_for_ready=True)
                for rid, stub in zip(late_ids, (ours, ours, raw), strict=True)
            ]
            threading.Event().wait(rng.uniform(0.1, 0.6))
            server.restart()
            for rid, call in zip(late_ids, late, strict=True):
                during[rid] = result_of(call, 30)
                assert during[rid][0] == "ok" or during[rid] == (
                    "error",
                    Code.UNAVAILABLE,
                ), (rid, during[rid], call.details())
    finally:
        raw_channel.close()
        conn.close()
    snapshot = server.log.read()
    assert {
        rid: len(snapshot.starts(rid)) for rid in in_flight if len(snapshot.starts(rid)) != 1
    } == {}
    assert all(snapshot.ends(rid) == [] for rid in in_flight)  # killed mid-call
    expected = {rid: 1 if result[0] == "ok" else 0 for rid, result in during.items()}
    assert {rid: len(snapshot.starts(rid)) for rid in during} == expected
    ours_failed = sum(1 for rid, r in during.items() if r[0] != "ok" and "raw" not in rid)
    assert ours_failed <= 3, during  # a rare race, as on raw channels


# ---------------------------------------------------------------------------- soak

SOAK_CYCLES = int(os.environ.get("CHRONICLE_SOAK_CYCLES", "12"))
#: UNAVAILABLE: in flight at a crash, or fail-fast while down; DEADLINE_EXCEEDED: a
#: wait_for_ready call whose deadline passed while down; CANCELLED: a call made in the
#: instant a server begins a graceful stop, cancelled by that server unexecuted (raw
#: channels meet it too, see the graceful-stop test).
DOCUMENTED = {Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED, Code.CANCELLED}


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.mark.slow
@pytest.mark.timeout(max(300, SOAK_CYCLES * 6))
def test_soak_crashes_and_graceful_stops_under_load(app_server_factory):
    """16 threads through one connection, every call kind, fail-fast and wait_for_ready,
    while the kernel is SIGKILLed or stopped gracefully at random."""
    rng = random.Random(1234)
    server = app_server_factory("kernel")
    conn = cc.Connection(plaintext(server.address), retry_attempts=None, **FAST)
    stub = WorkStub(conn.managed_channel)
    conn.connect(timeout=15)
    stop = threading.Event()
    lock = threading.Lock()
    results: dict[str, tuple[str, Any]] = {}
    overdue: list[str] = []

    def call(kind: str, rid: str, wait: bool) -> tuple[str, Any]:
        request = work_request(rid, sleep=0.02)
        timeout = 3.0
        if kind == "uu":
            return ("ok", work_response(stub.unary(request, timeout=timeout, wait_for_ready=wait)))
        if kind == "future":
            future = stub.unary.future(request, timeout=timeout, wait_for_ready=wait)
            return ("ok", work_response(future.result(timeout=timeout + 5)))
        if kind == "us":
            return ("ok", list(stub.server_stream(request, timeout=timeout, wait_for_ready=wait)))
        if kind == "su":
            return ("ok", stub.client_stream(iter([request]), timeout=timeout, wait_for_ready=wait))
        return ("ok", list(stub.bidi(iter([request]), timeout=timeout, wait_for_ready=wait)))

    def worker(index: int) -> None:
        local = random.Random(index)
        for n in itertools.count():
            if stop.is_set() or n > 100_000:
                return
            kind = local.choice(["uu", "uu", "future", "us", "su", "ss"])
            wait = local.random() < 0.5
            rid = f"w{index}-{n}"
            started = time.monotonic()
            try:
                result = call(kind, rid, wait)
            except grpc.RpcError as error:
                result = ("error", error.code())
            except grpc.FutureTimeoutError:
                result = ("hung", kind)
            except Exception as exc:  # anything but an RpcError is a defect
                result = ("exception", repr(exc))
            took = time.monotonic() - started
            with lock:
                results[rid] = result
                if took > 3.0 + 5.0:
                    overdue.append(rid)
            if result[0] != "ok":
                threading.Event().wait(0.01)  # a real app would not spin on failures

    workers = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(16)]
    threading.Event().wait(0.2)
    baseline_fds, baseline_threads = _fds(), _threads()
    for worker_thread in workers:
        worker_thread.start()
    try:
        for _cycle in range(SOAK_CYCLES):
            threading.Event().wait(rng.uniform(0.2, 0.6))
            if rng.random() < 0.5:
                server.kill()
            else:
                old = server.stop_gracefully(grace=2)
                old.wait(10)
            threading.Event().wait(rng.uniform(0.05, 0.5))
            server.restart()
            conn.connect(timeout=30)
    finally:
        stop.set()
        for worker_thread in workers:
            worker_thread.join(30)
    assert not any(w.is_alive() for w in workers), "a call hung"
    assert overdue == []
    bad = {rid: r for rid, r in results.items() if r[0] != "ok" and r[1] not in DOCUMENTED}
    assert bad == {}
    ok = [rid for rid, r in results.items() if r[0] == "ok"]
    assert len(ok) > 100 * SOAK_CYCLES / 12  # the load really ran
    snapshot = server.log.read()
    twice = {rid: n for rid, n in snapshot.executions().items() if n > 1}
    assert twice == {}
    cancelled = [rid for rid, r in results.items() if r == ("error", Code.CANCELLED)]
    assert [rid for rid in cancelled if snapshot.outcomes(rid) not in ([], ["cancelled"])] == []
    assert all(len(snapshot.starts(rid)) == 1 for rid in ok)
    # Threads and fds flat: what the outages made is gone once the connection is idle.
    core = conn._core
    with core.cond:
        assert core.cond.wait_for(lambda: _threads() <= baseline_threads + 4, 15), (
            _threads(),
            baseline_threads,
        )
    assert _fds() <= baseline_fds + 8, (_fds(), baseline_fds)
    conn.close()
