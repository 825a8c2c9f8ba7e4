"""``chronicle-conn check`` through a real subprocess, against the dev kernel in a child
process and a plain grpcio server with the standard health servicer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2_grpc

from tests.harness.ports import free_port

REPO = Path(__file__).resolve().parents[1]
SECRET = "chronicle-dev-secret"


def check(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k != "CHRONICLE_CONNECTION_STRING"}
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "chronicle_conn", "check", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=str(REPO),
        env=environment,
    )


@pytest.fixture
def grpcio_server() -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(4))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(None)


@pytest.mark.timeout(60)
def test_a_ready_kernel_exits_0_and_reports(kernel) -> None:
    text = f"chronicle://{kernel.address}?disableTls=true"
    proc = check(text)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"{text}: ready\n")
    assert "kernel version  0.0.0-dev" in proc.stdout
    assert "liveness        keepalive" in proc.stdout
    report = json.loads(check(text, "--json").stdout)
    assert report["ready"] is True
    assert report["target"] == text
    assert (report["tls"], report["auth"], report["liveness"]) == ("off", "none", "keepalive")
    assert report["version"] == "0.0.0-dev"
    assert report["health"] == "SERVING"
    assert report["ready_ms"] > 0
    assert report["round_trip_ms"] > 0


@pytest.mark.timeout(60)
def test_a_plain_grpcio_server_is_ready_without_a_kernel_version(grpcio_server) -> None:
    proc = check(f"chronicle://{grpcio_server}?disableTls=true", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["version"] is None  # not served there
    assert report["health"] == "SERVING"
    assert report["liveness"] == "health"


@pytest.mark.timeout(60)
def test_the_string_comes_from_the_environment(kernel) -> None:
    text = f"chronicle://{kernel.address}?disableTls=true"
    proc = check("--json", env={"CHRONICLE_CONNECTION_STRING": text})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["target"] == text


@pytest.mark.timeout(60)
def test_nothing_there_exits_1_within_the_timeout() -> None:
    started = time.monotonic()
    proc = check(f"chronicle://127.0.0.1:{free_port()}?disableTls=true", "--timeout", "1")
    assert proc.returncode == 1
    assert time.monotonic() - started < 15  # the interpreter's start-up, plus 1 s
    assert "NOT READY" in proc.stdout
    assert "Traceback" not in proc.stderr


@pytest.mark.timeout(60)
def test_tls_against_a_plaintext_server_exits_1_with_the_reason(grpcio_server) -> None:
    proc = check(f"chronicle://{grpcio_server}", "--json")
    assert proc.returncode == 1
    assert "add disableTls=true" in json.loads(proc.stdout)["error"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "args",
    [
        ("chronicle://host?bogus=1",),
        ("http://host",),
        ("chronicle://h?disableTls=maybe",),
        ("chronicle://127.0.0.1:1", "--timeout", "0"),
        ("chronicle://127.0.0.1:1", "--timeout", "abc"),
        ("--bogus",),
        ("chronicle://a", "chronicle://b"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_no_traceback(args) -> None:
    proc = check(*args)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("chronicle-conn check: ")


@pytest.mark.timeout(90)
def test_refused_credentials_exit_3_and_no_secret_is_printed(kernel_factory) -> None:
    kernel = kernel_factory(extra_args=["--auth", "--tls"])
    good = f"chronicle://chronicle-dev-client:{SECRET}@{kernel.address}?skipTlsValidation=true"
    proc = check(good, "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["auth"] == "client_credentials"
    assert report["tls"] == "on, validation skipped"
    bad = good.replace(SECRET, "not-the-secret")
    refused = check(bad)
    assert refused.returncode == 3
    assert "refused client 'chronicle-dev-client'" in refused.stdout
    for output in (proc.stdout, proc.stderr, refused.stdout, refused.stderr):
        assert SECRET not in output
        assert "not-the-secret" not in output
