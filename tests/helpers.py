"""Small helpers shared by the connection tests (fixtures live in conftest.py)."""

from __future__ import annotations

import itertools
import queue
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import grpc
import structlog
from google.protobuf import empty_pb2

import chronicle_conn as cc
from chronicle_conn._proto import clients_pb2, host_pb2_grpc
from chronicle_conn.states import ALLOWED_TRANSITIONS
from tests.harness.recorder import EventRecorder

S = cc.ConnectionState


def plaintext(address: str) -> str:
    """A connection string for a plaintext server at ``address``."""
    return f"chronicle://{address}?disableTls=true"


def became(state: cc.ConnectionState) -> Callable[[cc.StateChange], bool]:
    return lambda change: change.new is state


def version(channel: grpc.Channel, **kwargs: Any) -> str:
    """The kernel's version, through ``channel`` (5 s deadline)."""
    stub = host_pb2_grpc.ServerStub(channel)
    return str(stub.GetVersionInfo(empty_pb2.Empty(), timeout=5, **kwargs).Version)


def connect(conn: cc.Connection, recorder: EventRecorder, timeout: float = 10) -> int:
    """Connect, wait until the listener has heard of it, and return a mark for ``since=``.

    Listeners are called on the supervisor thread, so ``connect()`` can return a moment
    before they hear of CONNECTED."""
    conn.connect(timeout=timeout)
    assert recorder.wait_for(lambda events: bool(events) and events[-1].new is S.CONNECTED, 5)
    return len(recorder)


def check_history(recorder: EventRecorder) -> None:
    """Every recorded change is in the transition table and continues the previous one."""
    changes = recorder.events
    for change in changes:
        assert change.new in ALLOWED_TRANSITIONS[change.old], change
    for before, after in itertools.pairwise(changes):
        assert after.old is before.new, (before, after)


def wait_state(conn: cc.Connection, state: cc.ConnectionState, timeout: float = 15) -> None:
    """Wait on the connection's Condition until it is in ``state``."""
    core = conn._core
    with core.cond:
        assert core.cond.wait_for(lambda: core.state is state, timeout), conn.stats()


def wait_for_generation(conn: cc.Connection, number: int, timeout: float = 15) -> None:
    """Wait on the connection's Condition until its generation is at least ``number``."""
    core = conn._core
    with core.cond:
        assert core.cond.wait_for(
            lambda: core.counters.generation >= number and core.current is not None, timeout
        ), conn.stats()


class ChannelLedger:
    """``connect_fun``/``disconnect_fun`` that count: every channel built must be closed."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.open: dict[int, str] = {}
        self.built = 0
        # Kept, not raised: disconnect_fun runs on the supervisor, which logs and goes on.
        self.errors: list[str] = []

    def connect(self, target: str, options: Any) -> grpc.Channel:
        channel = grpc.insecure_channel(target, options=options)
        with self.lock:
            self.built += 1
            self.open[id(channel)] = target
        return channel

    def disconnect(self, channel: grpc.Channel) -> None:
        with self.lock:
            if self.open.pop(id(channel), None) is None:
                self.errors.append(f"closed twice or unknown: {channel!r}")
        channel.close()


def connect_request(**fields) -> clients_pb2.ConnectRequest:
    fields.setdefault("ConnectionId", str(uuid.uuid4()))
    return clients_pb2.ConnectRequest(**fields)


class StreamReader:
    """Reads a server stream on a thread; every message lands in a queue with its arrival
    time (``time.monotonic()``); the stream's end lands as ``(None, error_or_None)``."""

    def __init__(self, call) -> None:
        self.call = call
        self.items: queue.Queue[tuple[Any, Any]] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="test-stream-reader", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for message in self.call:
                self.items.put((message, time.monotonic()))
        except grpc.RpcError as exc:
            self.items.put((None, exc))
        else:
            self.items.put((None, None))

    def next(self, timeout: float = 5.0):
        """The next ``(message, arrival)``; fails the test if the stream ended."""
        message, info = self.items.get(timeout=timeout)
        assert message is not None, f"stream ended: {info!r}"
        return message, info

    def end(self, timeout: float = 5.0):
        """Wait for the stream's end, skipping messages; return its error (or None).

        ``timeout`` bounds the whole wait, so a stream that keeps sending fails the test.
        """
        deadline = time.monotonic() + timeout
        skipped = 0
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                message, info = self.items.get(timeout=remaining)
            except queue.Empty:
                break
            if message is None:
                return info
            skipped += 1
        raise AssertionError(f"the stream did not end within {timeout}s ({skipped} messages)")

    def close(self) -> None:
        self.call.cancel()
        self._thread.join(timeout=5)


class Capture:
    """A structlog processor that keeps every event dict (with its ``level``) and drops it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.events: list[dict[str, object]] = []

    def __call__(self, logger: object, method: str, event: dict[str, object]) -> None:
        with self.lock:
            self.events.append({**event, "level": method})
        raise structlog.DropEvent

    def names(self) -> list[object]:
        with self.lock:
            return [e["event"] for e in self.events]

    def named(self, name: str) -> list[dict[str, object]]:
        with self.lock:
            return [e for e in self.events if e["event"] == name]
