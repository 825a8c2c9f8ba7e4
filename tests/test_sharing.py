"""One connection shared by many threads while its kernel dies and comes back: no
deadlock, and nothing but the documented errors."""

from __future__ import annotations

import collections
import random
import threading
import time
from collections.abc import Callable

import grpc
import pytest
from google.protobuf import empty_pb2

import chronicle_conn as cc
from chronicle_conn._proto import host_pb2_grpc
from tests.helpers import S, plaintext, wait_state

THREADS = 64


def version(channel: grpc.Channel, **kwargs: object) -> str:
    stub = host_pb2_grpc.ServerStub(channel)
    return str(stub.GetVersionInfo(empty_pb2.Empty(), **kwargs).Version)  # type: ignore[arg-type]


#: What a caller may meet while the kernel is down (README, "Errors").
_DOCUMENTED_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


@pytest.mark.timeout(180)
def test_64_threads_through_kernel_kills_and_restarts(make_conn, kernel):
    conn = make_conn(plaintext(kernel.address), retry_attempts=None, liveness="keepalive")
    conn.connect(timeout=10)
    managed = conn.managed_channel
    stop = threading.Event()
    lock = threading.Condition()
    outcomes: collections.Counter[str] = collections.Counter()
    undocumented: list[str] = []

    def record(what: str) -> None:
        with lock:
            outcomes[what] += 1
            lock.notify_all()

    def failures() -> int:
        return sum(outcomes[k] for k in ("NotConnectedError", "ConnectTimeoutError", "UNAVAILABLE"))

    def successes() -> int:
        return sum(outcomes[k] for k in ("channel+call", "fail-fast call", "wait_for_ready call"))

    def wait_more(count: Callable[[], int], more: int) -> None:
        """Until ``count()`` grew by ``more``: each phase really met the threads."""
        with lock:
            start = count()
            assert lock.wait_for(lambda: count() >= start + more, 20), dict(outcomes)

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(100_000):
            if stop.is_set():
                return
            op = rng.random()
            try:
                if op < 0.2:
                    conn.connect(timeout=0.5)
                    record("connect")
                elif op < 0.45:
                    version(conn.channel(), timeout=2)
                    record("channel+call")
                elif op < 0.7:
                    version(managed, timeout=2)
                    record("fail-fast call")
                elif op < 0.85:
                    version(managed, timeout=3, wait_for_ready=True)
                    record("wait_for_ready call")
                elif op < 0.99:
                    stats = conn.stats()
                    assert stats.state in set(S)
                    record("stats")
                else:
                    conn.reconnect()
                    record("reconnect")
            except (cc.NotConnectedError, cc.ConnectTimeoutError) as exc:
                record(type(exc).__name__)
            except grpc.RpcError as exc:
                code = exc.code()  # type: ignore[attr-defined]
                if code in _DOCUMENTED_CODES:
                    record(code.name)
                else:
                    with lock:
                        undocumented.append(f"{code}: {exc.details()}")  # type: ignore[attr-defined]
            except BaseException as exc:
                with lock:
                    undocumented.append(repr(exc))

    threads = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(THREADS)]
    for thread in threads:
        thread.start()
    try:
        for _ in range(5):
            wait_more(successes, 200)
            kernel.kill()
            wait_state(conn, S.RECONNECTING, timeout=15)
            wait_more(failures, 200)
            kernel.restart()
            conn.connect(timeout=15)
        wait_more(successes, 200)
    finally:
        stop.set()
    deadline = time.monotonic() + 60
    for thread in threads:
        thread.join(max(0.1, deadline - time.monotonic()))
    stuck = [t.name for t in threads if t.is_alive()]
    assert stuck == [], f"deadlocked threads: {stuck}"
    assert undocumented == [], undocumented[:10]
    assert version(conn.channel(), timeout=5)
    assert len(conn._threads()) <= 3


@pytest.mark.timeout(30)
def test_registry_close_all_closes_outside_its_lock():
    """A connection's close() may use the registry (a listener, say): close_all() must
    not hold the registry's lock while it closes."""
    registry: cc.ConnectionRegistry[object] = cc.ConnectionRegistry()
    seen: list[list[str]] = []

    class Closeable:
        def close(self) -> None:
            seen.append(registry.names())  # would deadlock under the lock

    for n in range(3):
        registry.add(f"c{n}", Closeable())
    registry.close_all()
    assert seen == [[], [], []]
    assert len(registry) == 0


@pytest.mark.timeout(60)
def test_registry_under_32_threads():
    registry: cc.ConnectionRegistry[object] = cc.ConnectionRegistry()
    errors: list[BaseException] = []

    class Closeable:
        def close(self) -> None:
            pass

    def churn(n: int) -> None:
        try:
            for i in range(500):
                name = f"t{n}-{i}"
                item = Closeable()
                registry.add(name, item)
                assert registry.get(name) is item
                assert name in registry
                assert registry.remove(name) is item
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=churn, args=(n,)) for n in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert registry.names() == []
