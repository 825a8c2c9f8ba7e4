"""OpenTelemetry metrics (the ``otel`` extra), read back through the SDK's in-memory
reader: a kernel in a child process killed and restarted, a global provider set after
the connection was made, and a process without OpenTelemetry."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

import chronicle_conn as cc
from tests.helpers import became, connect, plaintext

S = cc.ConnectionState

FAST = {"reconnect_base_delay": 0.05, "reconnect_max_delay": 0.2, "keepalive_stale_after": 2.0}


def _points(reader: InMemoryMetricReader) -> dict[str, list]:
    """Metric name -> its data points, from one collection."""
    found: dict[str, list] = {}
    data = reader.get_metrics_data()
    for resource in data.resource_metrics if data else ():
        for scope in resource.scope_metrics:
            assert scope.scope.name == "chronicle_conn"
            for metric in scope.metrics:
                found.setdefault(metric.name, []).extend(metric.data.data_points)
    return found


def _value(points: dict[str, list], name: str, connection: str) -> float:
    [point] = [p for p in points[name] if p.attributes["chronicle_conn.connection"] == connection]
    return point.value


def _state(points: dict[str, list], connection: str) -> dict[str, int]:
    return {
        p.attributes["chronicle_conn.state"]: p.value
        for p in points["chronicle_conn.connection.state"]
        if p.attributes["chronicle_conn.connection"] == connection
    }


@pytest.mark.timeout(90)
def test_a_crash_and_a_recovery_are_counted_and_the_outage_measured(kernel, make_conn, recorder):
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    try:
        conn = make_conn(
            plaintext(kernel.address),
            name="metered",
            retry_attempts=None,
            meter_provider=provider,
            **FAST,
        )
        conn.add_listener(recorder)
        seen_by_listener: list[int] = []
        conn.add_listener(lambda change: seen_by_listener.append(conn.stats().keepalives_received))
        mark = connect(conn, recorder)
        core = conn._core
        with core.cond:  # a few keep-alives first (the lock is held: read the monitor)
            assert core.cond.wait_for(lambda: core.current.monitor.received >= 3, 10)
        before = _points(reader)
        assert _state(before, "metered") == {s.value: int(s is S.CONNECTED) for s in S}
        assert _value(before, "chronicle_conn.connection.connects", "metered") == 1
        assert _value(before, "chronicle_conn.connection.disconnects", "metered") == 0
        assert "chronicle_conn.connection.outage.duration" not in before  # nothing yet

        kept = conn.stats().keepalives_received
        kernel.kill()
        recorder.wait_for_event(became(S.RECONNECTING), 10, since=mark)
        # Counters never go back: not while the lost channel is being retired...
        assert seen_by_listener[-1] >= kept
        down = _points(reader)
        assert _value(down, "chronicle_conn.connection.keepalives", "metered") >= kept
        assert _state(down, "metered")["reconnecting"] == 1
        assert _state(down, "metered")["connected"] == 0
        kernel.restart()
        back = recorder.wait_for_event(became(S.CONNECTED), 20, since=mark)
        assert back.outage is not None
        assert back.outage > 0

        after = _points(reader)
        stats = conn.stats()
        assert _state(after, "metered")["connected"] == 1
        assert _value(after, "chronicle_conn.connection.connects", "metered") == 2
        assert _value(after, "chronicle_conn.connection.disconnects", "metered") == 1
        attempts = _value(after, "chronicle_conn.connection.attempts", "metered")
        assert attempts >= 2
        assert attempts <= stats.attempts  # stats() was read a moment later
        assert _value(after, "chronicle_conn.connection.keepalives", "metered") >= 1
        [outage] = after["chronicle_conn.connection.outage.duration"]
        assert outage.count == 1
        assert outage.sum == pytest.approx(back.outage)
        assert outage.attributes == {
            "chronicle_conn.connection": "metered",
            "chronicle_conn.target": conn.config.connection_string.redacted(),
        }
        # ...nor after close().
        last = conn.stats().keepalives_received
        conn.close()
        assert conn.stats().keepalives_received >= last
        # Counters are cumulative and monotonic, as exporters expect.
        metrics = reader.get_metrics_data().resource_metrics[0].scope_metrics[0].metrics
        connects = next(m for m in metrics if m.name == "chronicle_conn.connection.connects")
        assert connects.data.is_monotonic
    finally:
        provider.shutdown()


@pytest.mark.timeout(60)
def test_each_connection_is_its_own_series_and_no_secret_is_an_attribute(make_conn):
    from chronicle_conn.devserver import DevServer

    server = DevServer(auth={"client": "s3cr3t!"}).start()
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    try:
        with_secret = make_conn(
            f"chronicle://client:s3cr3t%21@{server.address}?disableTls=true",
            name="a",
            meter_provider=provider,
        )
        other = make_conn(plaintext("127.0.0.1:1"), name="b", meter_provider=provider, **FAST)
        with_secret.connect(timeout=10)
        points = _points(reader)
        assert _state(points, "a")["connected"] == 1
        assert _state(points, "b")["connected"] == 0
        assert _value(points, "chronicle_conn.connection.connects", "b") == 0
        assert "s3cr3t" not in repr(points)
        assert "client:***@" in repr(points)
        other.close()
        assert _state(_points(reader), "b")["closed"] == 1
    finally:
        provider.shutdown()
        server.stop(0)


_SCRIPT = """
import sys
if sys.argv[1] == "absent":
    sys.modules["opentelemetry"] = None  # as if the otel extra were not installed
import chronicle_conn as cc
from chronicle_conn import _metrics
from chronicle_conn.devserver import DevServer

server = DevServer().start()
conn = cc.Connection(f"chronicle://{server.address}?disableTls=true", name="app")
if sys.argv[1] == "absent":
    conn.connect(timeout=10)
    assert "opentelemetry" not in {m.split(".")[0] for m in sys.modules if sys.modules[m]}
    print("connected without opentelemetry")
else:
    # The application sets its provider after the connection exists (made at import).
    from opentelemetry import metrics
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    metrics.set_meter_provider(provider)
    conn.connect(timeout=10)
    # The same provider by name: one set of instruments, both connections in it.
    other = cc.Connection(
        f"chronicle://{server.address}?disableTls=true", name="other", meter_provider=provider
    )
    other.connect(timeout=10)
    # A connection whose constructor fails (the name is taken) reports nothing.
    try:
        cc.Connection(f"chronicle://{server.address}?disableTls=true", name="app")
    except cc.DuplicateNameError:
        pass
    names = {
        m.name: m
        for r in reader.get_metrics_data().resource_metrics
        for s in r.scope_metrics
        for m in s.metrics
    }
    points = names["chronicle_conn.connection.connects"].data.data_points
    print("connects", sorted(
        (p.attributes["chronicle_conn.connection"], p.value) for p in points
    ))
    states = names["chronicle_conn.connection.state"].data.data_points
    print("app", [
        p.attributes["chronicle_conn.state"] for p in states
        if p.attributes["chronicle_conn.connection"] == "app" and p.value == 1
    ])
    other.close()
conn.close()
server.stop(0)
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("global", "connects [('app', 1), ('other', 1)]\napp ['connected']"),
        ("absent", "connected without opentelemetry"),
    ],
)
def test_the_global_provider_and_a_process_without_opentelemetry(mode, expected):
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_SCRIPT), mode],
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
        cwd=str(Path(__file__).resolve().parents[1]),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == expected


@pytest.mark.timeout(30)
def test_a_no_op_provider_keeps_a_connection_out_of_the_metrics(make_conn):
    from opentelemetry.metrics import NoOpMeterProvider

    from chronicle_conn.devserver import DevServer

    server = DevServer().start()
    reader = InMemoryMetricReader()
    counted = MeterProvider(metric_readers=[reader])
    try:
        quiet = make_conn(
            plaintext(server.address), name="quiet", meter_provider=NoOpMeterProvider()
        )
        loud = make_conn(plaintext(server.address), name="loud", meter_provider=counted)
        quiet.connect(timeout=10)
        loud.connect(timeout=10)
        points = _points(reader)
        assert _state(points, "loud")["connected"] == 1
        assert _state(points, "quiet") == {}
    finally:
        counted.shutdown()
        server.stop(0)
