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
    for expected in (
        "state_changed",
        "attempt_started",
        "connected",
        "connection_lost",
        "reconnected",
    ):
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
    # Two connections' whole lives, one line per thing that happened, however many
    # attempts failed: connected; the outage; the recovery; closed; a connection that
    # cannot connect, gives up, and is closed.
    events = [line.split(":", 2)[2].split(" ", 1)[0] for line in lines]
    assert events == [
        "connected",
        "connection_lost",
        "reconnected",
        "closed",
        "connect_failing",
        "retries_exhausted",
        "closed",
    ], lines
    # Short reasons: a long grpc error is said once, in a few words.
    lost, back, failing, exhausted = lines[1], lines[2], lines[4], lines[5]
    assert "connection refused" in lost
    assert "failed to connect to all addresses" not in lost
    assert "outage_s=" in back
    assert "failed_attempts=" in back
    assert int(back.split("failed_attempts=")[1].split()[0]) >= 20
    assert "error='connection refused'" in failing
    assert "error='connection refused'" in exhausted
    assert max(len(line) for line in lines) < 300, lines


def test_a_state_change_reads_as_a_sentence():
    change = cc.StateChange(
        S.CONNECTED, S.RECONNECTING, time.time(), attempt=3, delay=2.0, error="stream ended"
    )
    assert str(change) == "connected -> reconnecting (attempt 3, next in 2.0 s): stream ended"
    assert str(cc.StateChange(S.IDLE, S.CONNECTING, time.time())) == "idle -> connecting"


def test_a_reconnect_says_how_long_the_connection_was_down():
    change = cc.StateChange(S.RECONNECTING, S.CONNECTED, time.time(), attempt=4, outage=2.25)
    assert str(change) == "reconnecting -> connected (attempt 4, down 2.2 s)"


@pytest.mark.parametrize(
    ("error", "short"),
    [
        (
            "keep-alive answer: UNAVAILABLE: Cancelling all calls; UNAVAILABLE: failed to "
            "connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:38869: Failed "
            "to connect to remote host: Connection refused",
            "keep-alive answer: connection refused",
        ),
        (
            "UNAVAILABLE: failed to connect to all addresses; last error: UNKNOWN: "
            "ipv4:10.0.0.1:35000: Failed to connect to remote host: Connection reset by peer",
            "connection reset",
        ),
        (
            "UNAVAILABLE: DNS resolution failed for kernel.invalid:35000: C-ares status is "
            "not ARES_SUCCESS qtype=A name=kernel.invalid is_balancer=0: Domain name not found",
            "name not resolved",
        ),
        (  # grpcio 1.85's words
            "UNAVAILABLE: errors resolving kernel.invalid:35000: [field:hostname lookup error:"
            "address lookup failed for kernel.invalid:35000: Domain name not found]",
            "name not resolved",
        ),
        ("keep-alive stream: UNAVAILABLE: Socket closed", None),  # short: kept whole
        (
            "the certificate of 127.0.0.1:35000 (for localhost) is not trusted by caPath "
            "'/etc/ca.pem': set caPath to the CA that signed it",
            None,  # a sentence of ours, no status code: kept whole up to its length
        ),
    ],
)
def test_long_grpc_errors_are_said_in_a_few_words(error, short):
    from chronicle_conn._log import brief

    result = brief(error)
    if short is None:
        assert result == error if len(error) <= 100 else result.endswith("\u2026")
    else:
        assert result == short


def test_a_long_run_of_identical_failures_is_summarised_a_bounded_number_of_times():
    from chronicle_conn._log import FailureStreak

    streak = FailureStreak(first_after=30, longest=600)
    summaries = [s for t in range(3600) if (s := streak.failed(float(t), "connection refused"))]
    # An hour of one failure a second: after 30 s, then 60, 120, 240, 480 and every 600 s.
    assert [s["seconds"] for s in summaries] == [30, 60, 120, 240, 480, 600, 600, 600, 600]
    # The first counts the streak's first failure too (t = 0 .. 30).
    assert summaries[0]["summary"] == "31 attempts failed the same way in 30 s: connection refused"
    assert sum(s["attempts"] for s in summaries) == 1 + 3330  # failures up to the last one
    assert streak.total == 3600
    mixed = FailureStreak(first_after=2)
    errors = ["refused", "refused", "reset", "refused"]
    got = [s for t, e in enumerate(errors) if (s := mixed.failed(float(t), e))]
    assert [s["summary"] for s in got] == [
        "3 attempts failed in 2 s, 2 different ways; last: reset"
    ]


@pytest.mark.timeout(60)
def test_a_long_outage_is_summarised_while_it_lasts(monkeypatch, capture):
    """Through a real connection to a port nobody listens on (the summary interval made
    short): connect_failing once, then still_failing summaries, bounded."""
    from chronicle_conn import _supervisor
    from chronicle_conn._log import FailureStreak

    monkeypatch.setattr(_supervisor, "FailureStreak", lambda: FailureStreak(0.3, 0.6))
    structlog.configure(processors=[capture])
    conn = cc.Connection(
        "chronicle://127.0.0.1:1?disableTls=true",
        retry_attempts=None,
        reconnect_base_delay=0.02,
        reconnect_max_delay=0.05,
    )
    try:
        deadline = time.monotonic() + 30
        while len(capture.named("still_failing")) < 3:
            assert time.monotonic() < deadline, capture.names()
            with conn._core.cond:
                conn._core.cond.wait(0.05)
    finally:
        conn.close()
    assert len(capture.named("connect_failing")) == 1
    first = capture.named("still_failing")[0]
    assert first["error"] == "connection refused"
    assert first["attempts"] >= 2
    assert "attempts failed the same way in" in first["summary"]


@pytest.mark.timeout(60)
def test_a_busy_app_re_arming_a_failed_connection_is_not_a_line_per_budget(capture):
    """An app that keeps calling connect() on a connection whose budget keeps running out
    (retry_attempts=3, a server that never comes): one connect_failing, one
    retries_exhausted; the rest are DEBUG, and still_failing summarises them."""
    structlog.configure(processors=[capture])
    conn = cc.Connection(
        "chronicle://127.0.0.1:1?disableTls=true",
        retry_attempts=3,
        reconnect_base_delay=0.01,
        reconnect_max_delay=0.02,
        auto_connect=False,
    )
    try:
        deadline = time.monotonic() + 3
        for _ in range(200):
            if time.monotonic() > deadline:
                break
            with pytest.raises(cc.ChronicleConnError):
                conn.connect(timeout=0.5)
    finally:
        conn.close()
    exhausted = capture.named("retries_exhausted")
    assert len(exhausted) >= 5  # the budget ran out again and again...
    assert [e["level"] for e in exhausted].count("warning") == 1  # ...said once
    failing = capture.named("connect_failing")
    assert len(failing) == 1
