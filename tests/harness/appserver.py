"""Application servers for the safety tests: a "work" service that logs every execution to
a file that outlives the server process, served by three flavors of server.

Run as::

    python -m tests.harness.appserver --host 127.0.0.1 --port P --work-log PATH \\
        [--flavor kernel|grpc-health|plain] [--keepalive-interval S]

Flavors:

- ``kernel``: the library's :class:`~chronicle_conn.devserver.DevServer` (the kernel's
  ``ConnectionService`` with keep-alives, our own ``grpc.health.v1``) with the work
  service next to it (``handlers=``); ``--keepalive-interval`` is its keep-alive interval.
- ``grpc-health``: a plain ``grpc.server`` with grpcio-health-checking's own
  ``HealthServicer`` (SERVING for ``""``) and the work service.
- ``plain``: a plain ``grpc.server`` with the work service only.

The work service ``workbench.Work`` has no ``.proto``: generic handlers on raw bytes, one
method per call kind (``Unary``, ``ServerStream``, ``ClientStream``, ``Bidi``). Each
request message is a JSON object (:class:`WorkRequest`, built with :func:`work_request`):

``id`` (str, required, no whitespace)
    the execution's name in the log. For ``ClientStream`` and ``Bidi`` the first
    message names the execution; later messages may leave it out.
``sleep`` (seconds, default 0)
    ``Unary``: before answering; ``ClientStream``: after the client's last message,
    before answering; ``ServerStream`` and ``Bidi``: before each response message.
    A sleep ends early when the call is cancelled (by the client, its deadline, or a
    server stop whose grace ran out).
``count`` (int, default 1)
    ``ServerStream``: how many messages to send; ``Bidi``: how many to send for this
    request message. Ignored by the unary-response methods.
``code`` (a ``grpc.StatusCode`` name, optional)
    end the call with this status (e.g. ``"UNAVAILABLE"``) instead of OK, after the
    sleeps and messages.

Each response message is a JSON object: ``id``, ``pid`` (the server process),
``method``, ``seq`` (0, 1, ... within the call) and, for ``ClientStream``, ``received``
(how many request messages it read).

Every execution appends ``start <id> <pid>`` when its handler begins and
``end <id> <pid> <outcome>`` when it ends, where outcome is ``ok``, ``cancelled``,
``failed:<CODE>`` (asked for with ``code``) or ``error:<ExceptionType>``, to the log file,
opened ``O_WRONLY|O_APPEND|O_CREAT`` and written with one ``os.write`` per line: lines from
several server processes sharing the file never interleave, and every line written is
in the file even if the process is SIGKILLed a moment later. ``ok`` means the handler
finished while the call was still active; the client can still miss that answer.
A request that is not valid JSON or not a valid :class:`WorkRequest` fails with
``INVALID_ARGUMENT`` before anything is logged: it is not an execution.

Control (stdin, one command a line, one JSON object a line on stdout, as the dev-server):
``stop [GRACE]`` (graceful stop, GRACE seconds, default 0; answered once the listening
socket is closed; the process exits 0 when the calls in flight have finished or were
cancelled at the end of the grace; a second ``stop`` with a shorter grace ends it
sooner), ``serving`` / ``not-serving`` (health status; not for ``plain``), ``stats``
(executions in this process; the kernel flavor adds the dev-server's counters), and for
the kernel flavor ``pause-keepalives`` / ``resume-keepalives``. End of input stops the
server at once, cancelling calls in flight, and exits: no orphan servers. Exactly one
line, ``workbench <flavor> server listening on HOST:PORT``, is printed once the server
listens.

In the test process, :class:`AppServerProcess` runs such a server and
:class:`ExecutionLog` reads its log.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import logging
import math
import os
import re
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar

import grpc
from grpc_health.v1 import health as official_health  # type: ignore[import-untyped]
from grpc_health.v1 import health_pb2, health_pb2_grpc

from chronicle_conn.cli import _LineWriter, _stderr_logger, _stdin_lines, _Wakeup
from chronicle_conn.devserver import DevServer, DevServerBindError, _bind_failure

from .kernel import ServerProcess, StoppingServer
from .ports import check_loopback

__all__ = [
    "APP_LISTENING",
    "BIDI",
    "CLIENT_STREAM",
    "FLAVORS",
    "SERVER_STREAM",
    "SERVICE",
    "UNARY",
    "AppServerProcess",
    "ExecutionLog",
    "LogEntry",
    "LogSnapshot",
    "WorkRequest",
    "WorkService",
    "WorkStub",
    "main",
    "work_request",
    "work_response",
]

SERVICE = "workbench.Work"
UNARY = f"/{SERVICE}/Unary"
SERVER_STREAM = f"/{SERVICE}/ServerStream"
CLIENT_STREAM = f"/{SERVICE}/ClientStream"
BIDI = f"/{SERVICE}/Bidi"
FLAVORS = ("kernel", "grpc-health", "plain")
APP_LISTENING = re.compile(
    r"^workbench (?P<flavor>[\w-]+) server listening on (?P<host>\S+):(?P<port>\d+)$"
)
# Every call in flight holds a server thread: 64 concurrent work streams, plus health
# Watch and Connect streams, plus room to spare.
WORKERS = 128
_PROG = "workbench app-server"


# -- requests and responses -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class WorkRequest:
    """One request message of the work service; see the module docstring.

    Raises:
        ValueError: from the constructor and :meth:`parse`, for an invalid request.
    """

    id: str
    sleep: float = 0.0
    count: int = 1
    code: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id or len(self.id.split()) != 1:
            raise ValueError(f"id must be a non-empty string without whitespace: {self.id!r}")
        if (
            isinstance(self.sleep, bool)
            or not isinstance(self.sleep, (int, float))
            or not (math.isfinite(self.sleep) and self.sleep >= 0)
        ):
            raise ValueError(f"sleep must be a number of seconds >= 0, not {self.sleep!r}")
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 0:
            raise ValueError(f"count must be an int >= 0, not {self.count!r}")
        if self.code is not None and self.code not in _FAILURE_CODES:
            raise ValueError(f"code must be a grpc.StatusCode name other than OK: {self.code!r}")

    @classmethod
    def parse(cls, data: bytes, *, default_id: str | None = None) -> WorkRequest:
        """Decode a request message (``default_id`` stands in for a missing ``id``)."""
        try:
            fields = json.loads(data)
        except ValueError as exc:
            raise ValueError(f"not JSON: {data[:80]!r}") from exc
        if not isinstance(fields, dict):
            raise ValueError(f"not a JSON object: {data[:80]!r}")
        unknown = set(fields) - {field.name for field in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown fields {sorted(unknown)}")
        if default_id is not None:
            fields.setdefault("id", default_id)
        if "id" not in fields:
            raise ValueError("id is missing")
        return cls(**fields)

    def encode(self) -> bytes:
        fields = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        return json.dumps(fields).encode()


_FAILURE_CODES = {code.name: code for code in grpc.StatusCode if code is not grpc.StatusCode.OK}


def work_request(id: str, *, sleep: float = 0.0, count: int = 1, code: str | None = None) -> bytes:
    """A request message, as bytes for a raw multicallable."""
    return WorkRequest(id, sleep, count, code).encode()


def work_response(data: bytes) -> dict[str, Any]:
    """Decode a response message."""
    value = json.loads(data)
    if not isinstance(value, dict):
        raise ValueError(f"not a JSON object: {data!r}")
    return value


class WorkStub:
    """The four work methods on a channel, as raw-bytes multicallables.

    Example::

        stub = WorkStub(channel)
        answer = work_response(stub.unary(work_request("a", sleep=0.1), timeout=5))
    """

    def __init__(self, channel: grpc.Channel) -> None:
        self.unary: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(UNARY)
        self.server_stream: grpc.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(
            SERVER_STREAM
        )
        self.client_stream: grpc.StreamUnaryMultiCallable[bytes, bytes] = channel.stream_unary(
            CLIENT_STREAM
        )
        self.bidi: grpc.StreamStreamMultiCallable[bytes, bytes] = channel.stream_stream(BIDI)


# -- the work service (runs in the server process) ------------------------------------------


class WorkService:
    """The ``workbench.Work`` handlers, logging every execution to ``log_path``.

    Thread-safe: the handlers run on the server's worker threads.
    """

    def __init__(self, log_path: str | os.PathLike[str]) -> None:
        # One write per line on an O_APPEND descriptor: atomic appends, no buffer that a
        # SIGKILL could lose. Never closed: a handler thread may still be ending while
        # the process exits, and the kernel closes it then.
        self._fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._started = 0  # guarded by _lock, with _ended
        self._ended = 0

    def generic_handler(self) -> grpc.GenericRpcHandler:
        """The handler to add to a server (no serializers: requests and responses are bytes)."""
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Unary": grpc.unary_unary_rpc_method_handler(self._unary),
                "ServerStream": grpc.unary_stream_rpc_method_handler(self._server_stream),
                "ClientStream": grpc.stream_unary_rpc_method_handler(self._client_stream),
                "Bidi": grpc.stream_stream_rpc_method_handler(self._bidi),
            },
        )

    def counts(self) -> dict[str, int]:
        """``started``, ``ended`` and ``in_flight`` executions in this process."""
        with self._lock:
            started, ended = self._started, self._ended
        return {"started": started, "ended": ended, "in_flight": started - ended}

    # -- the handlers ------------------------------------------------------------------

    def _unary(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        work = _parse_or_abort(request, context)
        with _Execution(self, work.id, "Unary", context) as execution:
            if not execution.sleep(work.sleep):
                return b""  # cancelled: nobody reads it
            execution.finish(work.code)
            return self._response(work.id, "Unary", 0)

    def _server_stream(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        work = _parse_or_abort(request, context)
        with _Execution(self, work.id, "ServerStream", context) as execution:
            for seq in range(work.count):
                if not execution.sleep(work.sleep):
                    return
                yield self._response(work.id, "ServerStream", seq)
            execution.finish(work.code)

    def _client_stream(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        first = _first_or_abort(requests, context)
        with _Execution(self, first.id, "ClientStream", context) as execution:
            received = 1
            for message in execution.read(requests):
                execution.parse(message)
                received += 1
            if execution.cancelled or not execution.sleep(first.sleep):
                return b""
            execution.finish(first.code)
            return self._response(first.id, "ClientStream", 0, received=received)

    def _bidi(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        work = _first_or_abort(requests, context)
        execution_id = work.id
        with _Execution(self, execution_id, "Bidi", context) as execution:
            seq = 0
            while True:
                for _ in range(work.count):
                    if not execution.sleep(work.sleep):
                        return
                    yield self._response(execution_id, "Bidi", seq)
                    seq += 1
                execution.finish(work.code)
                message = next(execution.read(requests), None)
                if message is None:
                    return
                work = execution.parse(message)

    # -- bookkeeping -------------------------------------------------------------------

    def _response(self, execution_id: str, method: str, seq: int, **extra: Any) -> bytes:
        fields = {"id": execution_id, "pid": self._pid, "method": method, "seq": seq, **extra}
        return json.dumps(fields).encode()

    def _log(self, line: str) -> None:
        data = (line + "\n").encode()
        written = os.write(self._fd, data)
        if written != len(data):  # never seen on a local file; fail loudly if it happens
            raise OSError(errno.EIO, f"short write to the work log: {written}/{len(data)}")

    def _begin(self, execution_id: str) -> None:
        with self._lock:
            self._started += 1
        self._log(f"start {execution_id} {self._pid}")

    def _end(self, execution_id: str, outcome: str) -> None:
        self._log(f"end {execution_id} {self._pid} {outcome}")
        with self._lock:
            self._ended += 1


class _Execution:
    """One execution of a work call: logs ``start`` on entry, ``end <outcome>`` on exit.

    The RPC's termination callback (``context.add_callback``) sets an event, so a sleep
    ends as soon as the call is cancelled, and the outcome says whether it was.
    """

    def __init__(
        self, service: WorkService, execution_id: str, method: str, context: grpc.ServicerContext
    ) -> None:
        self._service = service
        self._id = execution_id
        self._context = context
        self._terminated = threading.Event()
        self._failed: str | None = None
        self._read_cancelled = False

    def __enter__(self) -> _Execution:
        # Registered before "start" is logged: a cancellation at any later moment wakes us.
        if not self._context.add_callback(self._terminated.set):
            self._terminated.set()  # the RPC has terminated already
        self._service._begin(self._id)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._failed is not None:
            outcome = f"failed:{self._failed}"
        elif self.cancelled or exc_type is GeneratorExit:
            outcome = "cancelled"  # GeneratorExit: gRPC closed a stream handler mid-way
        elif exc_type is not None:
            outcome = f"error:{exc_type.__name__}"
        else:
            outcome = "ok"
        self._service._end(self._id, outcome)

    @property
    def cancelled(self) -> bool:
        """The RPC ended before the handler did (client cancel, deadline, server stop)."""
        return self._read_cancelled or self._terminated.is_set() or not self._context.is_active()

    def sleep(self, seconds: float) -> bool:
        """Wait ``seconds``, or less if the RPC ends first; ``False`` if it did."""
        if seconds > 0 and self._terminated.wait(seconds):
            return False
        return not self.cancelled

    def read(self, requests: Iterator[bytes]) -> Iterator[bytes]:
        """The client's messages; stops (and marks the call cancelled) if it is cancelled."""
        try:
            yield from requests
        except grpc.RpcError:  # gRPC's request iterator says so when the call is cancelled
            self._read_cancelled = True

    def finish(self, code: str | None) -> None:
        """End the call with ``code`` (a ``grpc.StatusCode`` name) if one was asked for."""
        if code is not None:
            self._abort(code, f"the request asked for {code}")

    def parse(self, data: bytes) -> WorkRequest:
        """A later request of this call (``id`` optional); invalid, it fails the call."""
        try:
            return WorkRequest.parse(data, default_id=self._id)
        except ValueError as exc:
            self._abort("INVALID_ARGUMENT", f"bad work request: {exc}")
            raise AssertionError("context.abort returned") from None

    def _abort(self, code: str, details: str) -> None:
        self._failed = code
        self._context.abort(_FAILURE_CODES[code], details)


def _parse_or_abort(data: bytes, context: grpc.ServicerContext) -> WorkRequest:
    """The first request of a call: invalid, it ends the call before any execution."""
    try:
        return WorkRequest.parse(data)
    except ValueError as exc:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad work request: {exc}")
        raise AssertionError("context.abort returned") from None  # for the type checker


def _first_or_abort(requests: Iterator[bytes], context: grpc.ServicerContext) -> WorkRequest:
    try:
        first = next(requests, None)
    except grpc.RpcError:  # cancelled before its first message: not an execution
        first = None
    if first is None:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad work request: no message")
        raise AssertionError("context.abort returned")
    return _parse_or_abort(first, context)


# -- the log, read from the test process ----------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LogEntry:
    """One line of the execution log.

    Attributes:
        event: ``"start"`` or ``"end"``.
        id: the execution id (the request's ``id``).
        pid: the server process that ran it.
        outcome: for ``end``: ``ok``, ``cancelled``, ``failed:<CODE>``, ``error:<Type>``.
    """

    event: str
    id: str
    pid: int
    outcome: str | None = None

    @classmethod
    def parse(cls, line: str) -> LogEntry:
        parts = line.split(" ")
        if len(parts) == 3 and parts[0] == "start":
            return cls("start", parts[1], int(parts[2]))
        if len(parts) == 4 and parts[0] == "end":
            return cls("end", parts[1], int(parts[2]), parts[3])
        raise ValueError(f"not an execution log line: {line!r}")


@dataclasses.dataclass(frozen=True)
class LogSnapshot:
    """The execution log as it was when read. Immutable."""

    entries: tuple[LogEntry, ...]

    def starts(self, execution_id: str) -> list[LogEntry]:
        """The ``start`` entries of ``execution_id``, oldest first."""
        return [e for e in self.entries if e.event == "start" and e.id == execution_id]

    def ends(self, execution_id: str) -> list[LogEntry]:
        """The ``end`` entries of ``execution_id``, oldest first."""
        return [e for e in self.entries if e.event == "end" and e.id == execution_id]

    def outcomes(self, execution_id: str) -> list[str]:
        return [e.outcome or "" for e in self.ends(execution_id)]

    def executions(self) -> dict[str, int]:
        """How many times each id was executed (its ``start`` entries)."""
        return dict(Counter(e.id for e in self.entries if e.event == "start"))

    def unfinished(self) -> dict[str, int]:
        """Ids with more ``start`` than ``end`` entries, and by how many (a server killed
        mid-call leaves one; so does a call still running)."""
        counts: Counter[str] = Counter()
        for entry in self.entries:
            counts[entry.id] += 1 if entry.event == "start" else -1
        return {key: count for key, count in counts.items() if count > 0}


class ExecutionLog:
    """Reads the execution log that work servers append to (see the module docstring).

    Every query reads the file afresh; :meth:`wait_for` waits for another process to
    write what a test expects. Thread-safe (it holds no state but the path).

    Example::

        assert log.wait_for(lambda snap: snap.outcomes("a") == ["ok"], timeout=5), log
        assert log.executions() == {"a": 1}
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def read(self) -> LogSnapshot:
        """Parse the file now. A missing file is an empty log; a last line without its
        newline (never written by one ``os.write``, but cheap to allow) is skipped.

        Raises:
            ValueError: a line that no work server writes (interleaved writes, say).
        """
        try:
            data = self.path.read_bytes().decode("utf-8")
        except FileNotFoundError:
            return LogSnapshot(())
        lines = data.split("\n")[:-1]  # the part after the last newline is incomplete
        return LogSnapshot(tuple(LogEntry.parse(line) for line in lines if line))

    def text(self) -> str:
        try:
            return self.path.read_text("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def starts(self, execution_id: str) -> list[LogEntry]:
        return self.read().starts(execution_id)

    def ends(self, execution_id: str) -> list[LogEntry]:
        return self.read().ends(execution_id)

    def outcomes(self, execution_id: str) -> list[str]:
        return self.read().outcomes(execution_id)

    def executions(self) -> dict[str, int]:
        return self.read().executions()

    def unfinished(self) -> dict[str, int]:
        return self.read().unfinished()

    def wait_for(self, predicate: Callable[[LogSnapshot], bool], timeout: float) -> bool:
        """Block until ``predicate(snapshot)`` is true, at most ``timeout`` s.

        Polls the file every 10 ms: its writers are other processes, so there is no
        event to wait on. Returns the predicate's last value.
        """
        deadline = time.monotonic() + timeout
        pause = threading.Event()  # never set: a bounded pause between reads
        while True:
            if predicate(self.read()):
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            pause.wait(min(0.01, remaining))

    def wait_for_end(self, execution_id: str, timeout: float) -> LogEntry:
        """Block until ``execution_id`` has an ``end`` entry; return the first one.

        Raises:
            AssertionError: none within ``timeout``; the message has the whole log.
        """
        if not self.wait_for(lambda snap: bool(snap.ends(execution_id)), timeout):
            raise AssertionError(f"no end of {execution_id!r} within {timeout}s in\n{self}")
        return self.ends(execution_id)[0]

    def __str__(self) -> str:
        return f"--- execution log {self.path} ---\n{self.text() or '(empty)'}"

    def __repr__(self) -> str:
        return f"<ExecutionLog {self.path}>"


# -- the server process ---------------------------------------------------------------------


class _BindError(Exception):
    """The server cannot listen on its address."""


class _App:
    """One flavor of server around the work service, as ``main`` drives it.

    ``begin_stop`` and ``set_serving`` run on the control thread, ``start`` and
    ``stop_now`` on the main thread; ``stopped`` is set once the server has stopped.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.stopped = threading.Event()
        self._lock = threading.Lock()
        self._stopping = False  # guarded by _lock

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def stopping(self) -> bool:
        with self._lock:
            return self._stopping

    def start(self) -> None:
        raise NotImplementedError

    def begin_stop(self, grace: float) -> float:
        """Start a graceful stop (again: a shorter grace ends it sooner); return once the
        listening socket is closed, with how long that took in ms."""
        with self._lock:
            first, self._stopping = not self._stopping, True
        started = time.monotonic()
        self._begin_stop(grace)
        if first:  # later, another server may listen on the port already
            _wait_refused(self.host, self.port, timeout=5.0)
        return (time.monotonic() - started) * 1000

    def stop_now(self) -> None:
        """Stop at once, cancelling the calls in flight; block until stopped."""
        raise NotImplementedError

    def set_serving(self, serving: bool) -> bool:
        """Set the health status; ``False`` when this flavor has no health service."""
        return False

    def kernel(self) -> DevServer | None:
        """The dev kernel, for the flavor that has one."""
        return None

    def _begin_stop(self, grace: float) -> None:
        raise NotImplementedError


class _DevServerApp(_App):
    """``--flavor kernel``: the library's dev kernel with the work service added."""

    def __init__(
        self,
        host: str,
        port: int,
        work: WorkService,
        keepalive_interval: float,
        *,
        auth: bool = False,
        tls: bool = False,
    ) -> None:
        super().__init__(host, port)
        self._server = DevServer(
            host,
            port,
            keepalive_interval=keepalive_interval,
            auth=True if auth else None,
            tls=True if tls else None,
            max_workers=WORKERS,
            logger=_stderr_logger(logging.INFO),
            handlers=[work.generic_handler()],
        )

    def start(self) -> None:
        try:
            self._server.start()
        except DevServerBindError as exc:
            raise _BindError(str(exc)) from exc
        self.port = self._server.port

    def _begin_stop(self, grace: float) -> None:
        # DevServer.stop blocks until stopped: run it on a thread; begin_stop() learns
        # that the listener has closed from the port itself.
        def stop() -> None:
            self._server.stop(grace)
            self.stopped.set()

        threading.Thread(target=stop, name=f"workbench-stop-{grace}", daemon=True).start()

    def stop_now(self) -> None:
        self._server.stop(None)  # cuts a graceful stop in progress short
        self.stopped.set()

    def set_serving(self, serving: bool) -> bool:
        self._server.set_serving(serving)
        return True

    def kernel(self) -> DevServer | None:
        return self._server


class _GrpcApp(_App):
    """``--flavor grpc-health`` and ``plain``: a ``grpc.server`` nobody here wrote."""

    def __init__(self, host: str, port: int, work: WorkService, *, health: bool) -> None:
        super().__init__(host, port)
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="workbench"),
            options=[("grpc.so_reuseport", 0)],  # a second server on the port fails
        )
        self._server.add_generic_rpc_handlers((work.generic_handler(),))
        self._health: Any = None
        if health:
            self._health = official_health.HealthServicer()
            self._health.set("", health_pb2.HealthCheckResponse.SERVING)
            health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)

    def start(self) -> None:
        try:
            self.port = self._server.add_insecure_port(self.address)
        except RuntimeError as exc:  # grpc only says "Failed to bind"
            raise _BindError(_bind_failure(self.host, self.port)) from exc
        self._server.start()

    def _begin_stop(self, grace: float) -> None:
        if self._health is not None:
            # What a well-behaved server does first: NOT_SERVING to every watcher.
            self._health.enter_graceful_shutdown()
        done = self._server.stop(grace)  # closes the listener before it returns

        def wait_stopped() -> None:
            done.wait()
            self.stopped.set()

        threading.Thread(target=wait_stopped, name="workbench-stopped", daemon=True).start()

    def stop_now(self) -> None:
        self._server.stop(None).wait()
        self.stopped.set()

    def set_serving(self, serving: bool) -> bool:
        if self._health is None:
            return False
        response = health_pb2.HealthCheckResponse
        self._health.set("", response.SERVING if serving else response.NOT_SERVING)
        return True


def _wait_refused(host: str, port: int, timeout: float) -> None:
    """Block until a connect to ``host:port`` is refused (the listener is closed).

    A bounded poll: only the kernel flavor needs more than one try (DevServer.stop is
    busy on another thread), and a closing listener sends no event to wait on.

    Raises:
        TimeoutError: still accepting after ``timeout`` s.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    deadline = time.monotonic() + timeout
    pause = threading.Event()  # never set
    while True:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.settimeout(1.0)
            try:
                probe.connect((host, port))
            except ConnectionRefusedError:
                return
            except ConnectionResetError:
                pass  # it was in the backlog of the closing listener: try once more
            except TimeoutError:
                pass  # no answer within 1 s (a busy machine, a closing listener): again
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{host}:{port} still accepts connections after {timeout}s")
        pause.wait(0.002)


CONTROL_COMMANDS = (
    "stop [GRACE]",
    "serving",
    "not-serving",
    "stats",
    "pause-keepalives",
    "resume-keepalives",
)


def _control(app: _App, work: WorkService, flavor: str, command: str) -> dict[str, Any]:
    """Carry out one control command; return the JSON object to answer with."""
    name, *args = command.split()
    if name == "stop" and len(args) <= 1:
        try:
            grace = float(args[0]) if args else 0.0
        except ValueError:
            grace = -1.0
        if not (math.isfinite(grace) and grace >= 0):
            return {"ok": False, "error": f"stop takes a grace in seconds >= 0: {command!r}"}
        in_flight = work.counts()["in_flight"]
        try:
            closed_ms = app.begin_stop(grace)
        except TimeoutError as exc:
            return {"ok": False, "error": str(exc)}
        return {
            "ok": True,
            "grace": grace,
            "in_flight": in_flight,
            "listener_closed_ms": round(closed_ms, 2),
        }
    if name in ("serving", "not-serving") and not args:
        if not app.set_serving(name == "serving"):
            return {"ok": False, "error": f"the {flavor} flavor has no health service"}
        return {"ok": True}
    kernel = app.kernel()
    if name in ("pause-keepalives", "resume-keepalives") and not args:
        if kernel is None:
            return {"ok": False, "error": f"the {flavor} flavor has no kernel"}
        if name == "pause-keepalives":
            kernel.pause_keepalives()
        else:
            kernel.resume_keepalives()
        return {"ok": True}
    if name == "stats" and not args:
        answer: dict[str, Any] = {
            "ok": True,
            "flavor": flavor,
            "pid": os.getpid(),
            "address": app.address,
            "stopping": app.stopping,
            **work.counts(),
        }
        if kernel is not None:  # what the dev-server's stats say
            answer["connect_requests"] = len(kernel.connect_requests)
            answer["keepalive_answers"] = len(kernel.keepalive_answers)
            answer["keepalives_sent"] = kernel.keepalives_sent
            answer["connection_ids"] = kernel.connection_ids
        return answer
    known = ", ".join(CONTROL_COMMANDS)
    return {"ok": False, "error": f"unknown command {command!r} (known: {known})"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tests.harness.appserver",
        description="Serve the workbench.Work service (and more, by flavor); see the "
        "module docstring of tests.harness.appserver.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="127.0.0.1 or ::1")
    parser.add_argument("--port", type=int, required=True, help="port (0: any free port)")
    parser.add_argument("--work-log", required=True, metavar="PATH", help="execution log")
    parser.add_argument("--flavor", choices=FLAVORS, default="kernel")
    parser.add_argument(
        "--keepalive-interval",
        type=float,
        metavar="SECONDS",
        help="keep-alive interval of the kernel flavor's Connect streams (default 1.0)",
    )
    parser.add_argument(
        "--auth",
        action="store_true",
        help="kernel flavor: require the development client's tokens (DevServer auth=True)",
    )
    parser.add_argument(
        "--tls", action="store_true", help="kernel flavor: self-signed TLS (DevServer tls=True)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one server until ``stop``, end of stdin, SIGTERM or SIGINT; return the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        check_loopback(args.host)
    except ValueError as exc:
        parser.error(str(exc))
    if args.keepalive_interval is not None and args.flavor != "kernel":
        parser.error("--keepalive-interval is for --flavor kernel")
    if (args.auth or args.tls) and args.flavor != "kernel":
        parser.error("--auth and --tls are for --flavor kernel")
    work = WorkService(args.work_log)
    app: _App
    if args.flavor == "kernel":
        interval = 1.0 if args.keepalive_interval is None else args.keepalive_interval
        app = _DevServerApp(args.host, args.port, work, interval, auth=args.auth, tls=args.tls)
    else:
        app = _GrpcApp(args.host, args.port, work, health=args.flavor == "grpc-health")

    wake = _Wakeup()
    previous_handlers = {}
    for signum in (signal.SIGTERM, signal.SIGINT):
        previous_handlers[signum] = signal.signal(signum, wake.set)
    previous_wakeup_fd = wake.install_as_wakeup_fd()  # see cli._run_dev_server
    output = _LineWriter(sys.stdout)
    # Set once a stop command is answered: a stop with nothing in flight completes at
    # once, and the answer must be on stdout before the process exits.
    stop_answered = threading.Event()

    def control_loop() -> None:
        for line in _stdin_lines():
            if not line.strip():
                continue
            try:
                answer = _control(app, work, args.flavor, line.strip())
            except Exception as exc:  # answered, not raised: the loop must go on
                traceback.print_exc()
                answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            output.write(json.dumps(answer))
            if line.split()[0] == "stop":
                stop_answered.set()
        wake.set()  # end of input: whoever controlled this server is gone

    def wake_when_stopped() -> None:
        app.stopped.wait()
        stop_answered.wait()
        wake.set()

    try:
        try:
            app.start()
        except _BindError as exc:
            print(f"{_PROG}: {exc}", file=sys.stderr)
            return 1
        output.write(f"workbench {args.flavor} server listening on {app.address}")
        for target in (control_loop, wake_when_stopped):
            threading.Thread(
                target=target, name=f"workbench-{target.__name__}", daemon=True
            ).start()
        wake.wait()
    finally:
        if not app.stopped.is_set():
            app.stop_now()  # end of input or a signal, not a completed graceful stop
        output.close()
        signal.set_wakeup_fd(previous_wakeup_fd)
        for signum, previous in previous_handlers.items():
            signal.signal(signum, previous)
    return 0


# -- the test side: a server process ---------------------------------------------------------


class AppServerProcess(ServerProcess):
    """A work server (``python -m tests.harness.appserver``) in a child process.

    On top of :class:`~tests.harness.kernel.ServerProcess` (``start``, ``kill``,
    ``restart``, ``command``, ``address``, stderr capture): :meth:`stop_gracefully`,
    :meth:`set_serving`, :meth:`stats`, and :attr:`log`, the :class:`ExecutionLog` that
    every child of this object appends to (restarts included). Give two objects the same
    ``work_log`` to count executions across both.

    Args:
        port: the port; ``None`` picks a free one (kept across restarts).
        flavor: ``"kernel"``, ``"grpc-health"`` or ``"plain"`` (see the module docstring).
        work_log: the execution log's path; ``None`` makes a temporary file, removed by
            :meth:`close`.
        keepalive_interval: the kernel flavor's keep-alive interval (``None``: 1 s).
        host: ``127.0.0.1`` or ``::1``.
        env: extra environment variables for the child.
        extra_args: more command-line arguments for the child.

    Example::

        server = AppServerProcess(flavor="plain").start()
        with grpc.insecure_channel(server.address) as channel:
            call = WorkStub(channel).unary.future(work_request("a", sleep=1), timeout=10)
            server.log.wait_for(lambda snap: snap.starts("a"), timeout=5)
            old = server.stop_gracefully(grace=5)  # "a" keeps running; the port is free
            server.restart()  # a new process on the same port, while "a" finishes
            assert work_response(call.result())["pid"] == old.pid
            assert old.wait(timeout=10) == 0
        server.close()
    """

    kind: ClassVar[str] = "app server"
    listening: ClassVar[re.Pattern[str]] = APP_LISTENING

    def __init__(
        self,
        port: int | None = None,
        *,
        flavor: str = "kernel",
        work_log: str | os.PathLike[str] | None = None,
        keepalive_interval: float | None = None,
        host: str = "127.0.0.1",
        env: dict[str, str] | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        if flavor not in FLAVORS:
            raise ValueError(f"flavor must be one of {FLAVORS}, not {flavor!r}")
        if keepalive_interval is not None and flavor != "kernel":
            raise ValueError("keepalive_interval is for the kernel flavor")
        super().__init__(port, host=host, env=env, extra_args=extra_args)
        self.flavor = flavor
        self.keepalive_interval = keepalive_interval
        self._owns_log = work_log is None
        if work_log is None:
            fd, name = tempfile.mkstemp(prefix="workbench-", suffix=".log")
            os.close(fd)
            work_log = name
        self.log = ExecutionLog(work_log)

    def build_argv(self) -> list[str]:
        argv = [sys.executable, "-m", "tests.harness.appserver", "--host", self.host]
        argv += ["--port", str(self.port), "--work-log", str(self.log.path)]
        argv += ["--flavor", self.flavor]
        if self.keepalive_interval is not None:
            argv += ["--keepalive-interval", str(self.keepalive_interval)]
        return argv + list(self.extra_args)

    def stop_gracefully(self, grace: float, timeout: float = 5.0) -> StoppingServer:
        """Tell the current child to stop with ``grace`` seconds for its calls in flight.

        Returns as soon as the child has answered, which it does once its listening
        socket is closed: new connections to the port are refused from then on (until
        a new child starts), while the old child still finishes its calls. The child is
        detached: ``start()``/``restart()`` may start a new one on the same port right
        away. Wait for the old one's exit with the returned handle's ``wait()``.

        Raises:
            ServerCommandError: no ``ok`` answer within ``timeout``.
        """
        if not (math.isfinite(grace) and grace >= 0):
            raise ValueError(f"grace must be >= 0 seconds, not {grace!r}")
        return self._stop_gracefully(f"stop {grace}", timeout)

    def set_serving(self, serving: bool) -> dict[str, Any]:
        """Flip health (``kernel`` and ``grpc-health`` flavors) SERVING / NOT_SERVING."""
        return self.command("serving" if serving else "not-serving")

    def stats(self) -> dict[str, Any]:
        """``flavor``, ``pid``, ``address``, ``stopping``, ``started``, ``ended``,
        ``in_flight`` (executions in the current child); the kernel flavor adds
        ``connect_requests``, ``keepalive_answers``, ``keepalives_sent``,
        ``connection_ids``."""
        return self.command("stats")

    def pause_keepalives(self) -> dict[str, Any]:
        """Kernel flavor: ``Connect`` streams stay open but send nothing (a hung kernel)."""
        return self.command("pause-keepalives")

    def resume_keepalives(self) -> dict[str, Any]:
        return self.command("resume-keepalives")

    def report_sections(self) -> list[tuple[str, str]]:
        return [
            *super().report_sections(),
            (f"{self.kind} {self.address} execution log", self.log.text() or "(empty)"),
        ]

    def close(self) -> None:
        """Kill every child; remove the stderr files, and the log if this object made it."""
        try:
            super().close()
        finally:
            if self._owns_log:
                self.log.path.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
