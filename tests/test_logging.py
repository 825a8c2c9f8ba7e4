"""structlog events: names, context, redaction, and configuration made after the fact."""

from __future__ import annotations

import threading
import time

import pytest
import structlog

import chronicle_conn as cc
from chronicle_conn.devserver import DevServer
from tests.harness.recorder import EventRecorder

S = cc.ConnectionState


class Capture:
    """A structlog processor that keeps every event dict and drops it."""

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


@pytest.fixture
def capture():
    yield Capture()
    structlog.reset_defaults()


def test_events_follow_a_configuration_made_after_the_connection(capture):
    server = DevServer(keepalive_interval=0.2, auth={"client": "s3cr3t!"}).start()
    recorder = EventRecorder()
    # Created first, as an app does at import time...
    conn = cc.Connection(
        f"chronicle://client:s3cr3t%21@{server.address}?disableTls=true",
        name="logged",
        auto_connect=False,
        reconnect_base_delay=0.1,
        reconnect_max_delay=0.2,
        retry_attempts=None,
    )
    try:
        # ...and structlog configured later, in main().
        structlog.configure(processors=[capture])
        conn.add_listener(recorder)
        conn.connect(timeout=10)
        recorder.wait_for_event(lambda c: c.new is S.CONNECTED, 5)
        port = server.port
        server.stop(0)
        recorder.wait_for_event(lambda c: c.new is S.RECONNECTING, 10)
        deadline = time.monotonic() + 10
        while conn.stats().failed_attempts < 1:  # the kernel is down: attempts fail
            assert time.monotonic() < deadline
            with conn._core.cond:
                conn._core.cond.wait(0.05)
        server = DevServer(port=port, keepalive_interval=0.2, auth={"client": "s3cr3t!"}).start()
        conn.connect(timeout=10)
    finally:
        conn.close()
        server.stop(0)

    names = capture.names()
    for expected in ("state_changed", "attempt_started", "connected", "connection_lost"):
        assert expected in names, names
    assert "attempt_failed" in names, sorted(set(names))
    redacted = conn.config.connection_string.redacted()
    assert "client:***@" in redacted
    mine = [e for e in capture.events if e.get("connection") == "logged"]
    assert len(mine) >= 5
    assert all(event["target"] == redacted for event in mine)
    for event in capture.events:
        assert "s3cr3t" not in repr(event)
    changes = [(e["old"], e["new"]) for e in capture.events if e["event"] == "state_changed"]
    assert ("connected", "reconnecting") in changes
    assert changes[-1] == ("connected", "closed")


def test_a_given_logger_is_used_and_bound(capture):
    structlog.configure(processors=[capture])
    mine = structlog.get_logger("app").bind(app="shop")
    conn = cc.Connection(
        "chronicle://127.0.0.1:1?disableTls=true", auto_connect=False, logger=mine, name="own"
    )
    conn.close()
    closing = [e for e in capture.events if e["event"] == "state_changed"]
    assert closing
    assert closing[-1]["app"] == "shop"
    assert closing[-1]["connection"] == "own"
