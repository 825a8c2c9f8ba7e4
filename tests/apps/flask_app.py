"""A Flask app with a module-level connection, for real pre-forking servers.

``gunicorn tests.apps.flask_app:app`` or ``uwsgi --module tests.apps.flask_app:app``.
The connection is built at import time: in the master with ``gunicorn --preload`` or
uWSGI without ``lazy-apps``, in each worker otherwise.

Environment:

- ``CHRONICLE_CONNECTION_STRING``: the kernel, e.g. ``chronicle://127.0.0.1:35000?disableTls=true``.
- ``CHRONICLE_TEST_LIVENESS``: the ``liveness`` option (default ``auto``).

Routes:

- ``GET /work``: one real RPC to the kernel, ``ConnectionService.ConnectionKeepAlive``
  (fail-fast, 5 s deadline). The dev kernel counts those (``stats``:
  ``keepalive_answers``), so a test can check that every 200 reached the kernel.
  Answers ``{"pid": <worker pid>, "rpc": "ConnectionKeepAlive"}``.
- ``GET /version``: ``Host.Server/GetVersionInfo`` the same way,
  ``{"pid": ..., "version": ...}``.
- ``GET /readyz``: the extension's readiness probe.

Every response carries the answering process's pid in ``X-Worker-Pid``.

An unavailable kernel gives 503 (the extension's error handlers).

structlog is configured to print one JSON object a line on stdout (info and up) with the
process id, so that a test can tell which process logged what (the master's connection
from the workers').
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import structlog
from flask import Flask, Response, jsonify
from google.protobuf import empty_pb2

from chronicle_conn._proto import clients_pb2, clients_pb2_grpc, host_pb2_grpc
from chronicle_conn.contrib.flask import Chronicle

#: The ``ConnectionId`` of the ``/work`` calls: ``flask-work-<pid>``.
WORK_ID_PREFIX = "flask-work-"
RPC_TIMEOUT = 5.0
#: Every response names the process that answered it (the readiness probe's too).
PID_HEADER = "X-Worker-Pid"


def _add_pid(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
    event["pid"] = os.getpid()
    return event


class _LineLogger:
    """Writes each event with one ``os.write()``: the master and the workers share the
    log file, and a line written in two pieces could be split by another process's."""

    def msg(self, message: str) -> None:
        line = (message + "\n").encode("utf-8", "replace")
        try:
            sys.stdout.flush()
            os.write(sys.stdout.fileno(), line)
        except (AttributeError, OSError, ValueError):  # no real stdout: best effort
            print(message, flush=True)

    log = debug = info = warning = warn = error = critical = exception = fatal = msg


structlog.configure(
    processors=[
        structlog.processors.add_log_level,
        _add_pid,
        structlog.processors.TimeStamper(fmt="iso"),
        structlog.processors.JSONRenderer(),
    ],
    wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
    logger_factory=lambda *_: _LineLogger(),
    cache_logger_on_first_use=False,
)

app = Flask(__name__)
app.config["CHRONICLE_CONNECTION_STRING"] = os.environ["CHRONICLE_CONNECTION_STRING"]
app.config["CHRONICLE_OPTIONS"] = {
    "liveness": os.environ.get("CHRONICLE_TEST_LIVENESS", "auto"),
    "retry_attempts": None,
}
chronicle = Chronicle(app)
app.register_blueprint(chronicle.readiness_blueprint())

# Stubs built once, at import time (in the master when the app is preloaded), on the
# managed channel: they must keep working in every forked worker.
_connection = chronicle.get_connection(app)
_kernel_clients = clients_pb2_grpc.ConnectionServiceStub(_connection.managed_channel)
_kernel_host = host_pb2_grpc.ServerStub(_connection.managed_channel)


@app.after_request
def _say_which_worker(response: Response) -> Response:
    response.headers[PID_HEADER] = str(os.getpid())
    return response


@app.get("/work")
def work() -> Any:
    pid = os.getpid()
    request = clients_pb2.ConnectionKeepAlive(ConnectionId=f"{WORK_ID_PREFIX}{pid}")
    _kernel_clients.ConnectionKeepAlive(request, timeout=RPC_TIMEOUT)
    return jsonify(pid=pid, rpc="ConnectionKeepAlive")


@app.get("/version")
def version() -> Any:
    reply = _kernel_host.GetVersionInfo(empty_pb2.Empty(), timeout=RPC_TIMEOUT)
    return jsonify(pid=os.getpid(), version=reply.Version)
