"""``chronicle-conn check``: connect with the library and report, like ``pg_isready``.

Exit codes: 0 ready; 1 not reachable in time (or TLS cannot work as configured); 2 a bad
connection string or option (one line, no traceback); 3 credentials refused. Usable as
a container health check. The report never contains a secret: the target is redacted.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, TextIO

import grpc
from google.protobuf import empty_pb2

from . import _health
from ._log import Silent
from ._proto import host_pb2_grpc
from .connection import Connection
from .connection_string import ConnectionString
from .errors import (
    AuthenticationError,
    ChronicleConnError,
    ConfigurationError,
    ConnectTimeoutError,
    RetriesExhaustedError,
    TlsError,
)

__all__ = ["ENV_VAR", "EXIT_AUTH", "EXIT_BAD_INPUT", "EXIT_DOWN", "EXIT_READY", "run_check"]

ENV_VAR = "CHRONICLE_CONNECTION_STRING"
EXIT_READY, EXIT_DOWN, EXIT_BAD_INPUT, EXIT_AUTH = 0, 1, 2, 3


def _tls_mode(cs: ConnectionString) -> str:
    if not cs.tls_enabled:
        return "off"
    if cs.skip_tls_validation:
        return "on, validation skipped"
    if cs.certificate_path is not None:
        return "mutual"
    return "on, caPath" if cs.ca_path is not None else "on, default roots"


def _version(channel: grpc.Channel, timeout: float) -> str | None:
    try:
        info = host_pb2_grpc.ServerStub(channel).GetVersionInfo(empty_pb2.Empty(), timeout=timeout)
    except grpc.RpcError as exc:
        if exc.code() in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.NOT_FOUND):
            return None
        return f"unknown ({exc.code().name})"
    return str(info.Version)


def _health_status(channel: grpc.Channel, timeout: float) -> str | None:
    try:
        status = _health.check(channel, timeout=timeout)
    except grpc.RpcError as exc:
        if exc.code() in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.NOT_FOUND):
            return None
        return f"unknown ({exc.code().name})"
    return str(_health.status_name(status))


def run_check(text: str | None, timeout: float, as_json: bool, out: TextIO = sys.stdout) -> int:
    """Check the server ``text`` names (default: ``$CHRONICLE_CONNECTION_STRING``, else
    ``ConnectionString.default()``); print the report; return the exit code."""
    err = sys.stderr
    # An empty variable counts as unset; an empty argument is a bad string.
    source = text if text is not None else (os.environ.get(ENV_VAR) or None)
    report: dict[str, Any] = {"ready": False}
    try:
        if not timeout > 0:
            raise ConfigurationError(f"--timeout must be > 0 seconds, not {timeout!r}")
        cs = ConnectionString.parse(source) if source is not None else ConnectionString.default()
        report.update(
            target=cs.redacted(),
            tls=_tls_mode(cs),
            auth=cs.authentication_mode.value,
        )
        conn = Connection(cs, retry_attempts=None, logger=Silent(), name=None)
    except ConfigurationError as exc:
        print(f"chronicle-conn check: {exc}", file=err)
        return EXIT_BAD_INPUT
    code = EXIT_READY
    try:
        started = time.monotonic()
        try:
            conn.connect(timeout=timeout)
        except AuthenticationError as exc:
            code, report["error"] = EXIT_AUTH, str(exc)
        except (TlsError, ConnectTimeoutError, RetriesExhaustedError) as exc:
            code, report["error"] = EXIT_DOWN, str(exc)
        else:
            report["ready"] = True
            report["ready_ms"] = round((time.monotonic() - started) * 1000, 1)
            stats = conn.stats()
            report["liveness"] = stats.liveness
            channel = conn.channel()
            left = max(1.0, timeout - (time.monotonic() - started))
            call_started = time.monotonic()
            report["version"] = _version(channel, left)
            report["round_trip_ms"] = round((time.monotonic() - call_started) * 1000, 1)
            report["health"] = _health_status(channel, left)
    except ChronicleConnError as exc:  # anything else the library says, in one line
        code, report["error"] = EXIT_DOWN, str(exc)
    finally:
        conn.close()
    _print(report, as_json, out)
    return code


def _print(report: dict[str, Any], as_json: bool, out: TextIO) -> None:
    if as_json:
        out.write(json.dumps(report) + "\n")
        return
    state = "ready" if report["ready"] else "NOT READY"
    lines = [f"{report['target']}: {state}"]
    for key, label in (
        ("tls", "TLS"),
        ("auth", "auth"),
        ("ready_ms", "ready in (ms)"),
        ("liveness", "liveness"),
        ("version", "kernel version"),
        ("round_trip_ms", "round trip (ms)"),
        ("health", "health"),
        ("error", "error"),
    ):
        if key in report:
            value = report[key]
            lines.append(f"  {label:<16}{'not served' if value is None else value}")
    out.write("\n".join(lines) + "\n")
