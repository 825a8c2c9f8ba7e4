"""structlog events: names, context, redaction, and configuration made after the fact."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import structlog

import chronicle_conn as cc
from chronicle_conn.devserver import DevServer
from tests.harness.recorder import EventRecorder
from tests.helpers import Capture

S = cc.ConnectionState


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


_QUIET_SCRIPT = """
import logging, sys
logging.basicConfig(level=getattr(logging, sys.argv[1]))
import chronicle_conn as cc
from chronicle_conn.devserver import DevServer

server = DevServer(keepalive_interval=0.2).start()
port = server.port
conn = cc.Connection(
    f"chronicle://127.0.0.1:{port}?disableTls=true",
    retry_attempts=None, reconnect_base_delay=0.02, reconnect_max_delay=0.05,
)
conn.connect(timeout=10)
server.stop(0)
core = conn._core
with core.cond:  # an outage of at least 20 failed attempts
    assert core.cond.wait_for(lambda: core.counters.failed_attempts >= 20, 30)
server = DevServer(port=port, keepalive_interval=0.2).start()
conn.connect(timeout=10)
conn.close()
server.stop(0)
gone = cc.Connection("chronicle://127.0.0.1:1?disableTls=true", retry_attempts=1,
                     reconnect_base_delay=0.02)
try:
    gone.connect(timeout=10)
except cc.RetriesExhaustedError:
    pass
gone.close()
"""


def _quiet_run(level: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _QUIET_SCRIPT, level],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=str(Path(__file__).resolve().parents[1]),
    )


@pytest.mark.timeout(90)
def test_unconfigured_structlog_follows_standard_logging_and_never_prints_to_stdout():
    """A script with logging.basicConfig(level=WARNING) and no structlog configuration,
    through connect, an outage of 20 failed attempts, recovery and exhaustion: nothing
    on stdout, and on stderr only the library's WARNING lines (no grpc lines either)."""
    proc = _quiet_run("WARNING")
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert lines, "the outage and the exhaustion are warnings"
    assert all(line.startswith("WARNING:chronicle_conn:") for line in lines), lines
    events = [line.split(":", 2)[2].split(" ", 1)[0] for line in lines]
    assert events.count("connection_lost") == 1
    assert events.count("retries_exhausted") == 1


@pytest.mark.timeout(90)
def test_an_outage_of_20_failed_attempts_is_a_bounded_number_of_info_events():
    proc = _quiet_run("INFO")
    assert proc.stdout == ""
    lines = [line for line in proc.stderr.splitlines() if ":chronicle_conn:" in line]
    assert not [line for line in lines if line.startswith("DEBUG")]
    assert not [line for line in lines if " attempt_failed " in f" {line} "]
    # Two connections' whole lives: about a dozen lines, however many attempts failed.
    assert 5 <= len(lines) <= 16, lines


def test_a_state_change_reads_as_a_sentence():
    change = cc.StateChange(
        S.CONNECTED, S.RECONNECTING, time.time(), attempt=3, delay=2.0, error="stream ended"
    )
    assert str(change) == "connected -> reconnecting (attempt 3, next in 2.0 s): stream ended"
    assert str(cc.StateChange(S.IDLE, S.CONNECTING, time.time())) == "idle -> connecting"
